package demo

import (
	"strings"
	"testing"
)

// Through PgBouncer the cutover costs the application a stall, not an
// error: 32 TPC-B clients, none fails, every committed transaction is on
// green (pgbench_history and the balances), and the stall is reported next
// to the write outage.
func TestDemoViaPgBouncerZeroErrorsZeroLostWrites(t *testing.T) {
	for _, rollback := range []bool{false, true} {
		name := "forward"
		if rollback {
			name = "rollback"
		}
		t.Run(name, func(t *testing.T) {
			sum, out := runDemo(t, Options{Via: ViaPgBouncer, Clients: 32, Seconds: 40, Rollback: rollback})
			pb := sum.PgBouncer
			if pb == nil {
				t.Fatal("no pgbouncer summary")
			}
			want, route := "done", "green"
			if rollback {
				want, route = "rolled_back", "blue"
			}
			if sum.Phase != want || pb.Route != route {
				t.Fatalf("phase %s route %s, want %s and %s", sum.Phase, pb.Route, want, route)
			}
			if pb.ApplicationErrors != 0 {
				t.Errorf("%d application errors through PgBouncer", pb.ApplicationErrors)
			}
			if pb.Committed == 0 || pb.History != pb.Committed || pb.LostWrites != 0 || pb.BalanceMismatch {
				t.Errorf("committed %d, history rows %d, lost %d, balance mismatch %v", pb.Committed, pb.History, pb.LostWrites, pb.BalanceMismatch)
			}
			if pb.StallP50MS <= 0 || pb.StallP99MS < pb.StallP50MS || pb.PoolPauseMS <= 0 || sum.WriteOutageMS <= 0 {
				t.Errorf("stall p50 %.1f p99 %.1f ms, pool pause %d ms, write outage %d ms: not measured", pb.StallP50MS, pb.StallP99MS, pb.PoolPauseMS, sum.WriteOutageMS)
			}
			last := strings.TrimSpace(out[strings.LastIndex(strings.TrimSpace(out), "\n")+1:])
			for _, key := range []string{`"application_errors"`, `"lost_writes"`, `"stall_p50_ms"`, `"stall_p99_ms"`, `"write_outage_ms"`} {
				if !strings.Contains(last, key) {
					t.Errorf("last line %q lacks %s", last, key)
				}
			}
		})
	}
}
