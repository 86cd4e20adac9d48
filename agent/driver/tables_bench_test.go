package driver

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/integration/load"
	"github.com/cutover/cutover/internal/config"
)

// BenchmarkWriteOutageByTables measures the application's write outage
// (fence on blue to traffic on a writable green, route flipped) as the
// schema grows: 10, 500 and 5,000 tables in scope beside the load's two,
// each granted to the fenced role, under CUTOVER_BENCH_WRITERS writers
// (default 8), with green's fence lifted by logins and, side by side, by
// grants (fence.green). Each iteration is a whole plan on databases of its
// own, dropped once done (a login lock is taken only while the roles may
// connect to no other database of green's cluster). Run:
//
//	go test ./agent/driver -run '^$' -bench WriteOutageByTables -benchtime 5x -timeout 60m
//
// CUTOVER_BENCH_TABLES=10,500 picks the sizes.
func BenchmarkWriteOutageByTables(b *testing.B) {
	writers := 8
	if v, err := strconv.Atoi(os.Getenv("CUTOVER_BENCH_WRITERS")); err == nil && v > 0 {
		writers = v
	}
	sizes := []int{10, 500, 5000}
	if v := os.Getenv("CUTOVER_BENCH_TABLES"); v != "" {
		sizes = nil
		for _, f := range strings.Split(v, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || n < 0 {
				b.Fatalf("CUTOVER_BENCH_TABLES: %q", v)
			}
			sizes = append(sizes, n)
		}
	}
	const accounts = 2000
	ctx := context.Background()
	// The drain locks every table at once: 5,000 need more than the
	// default lock table (the fence's Prepare says so).
	wide := integration.PostgresOptions{Settings: map[string]string{"max_locks_per_transaction": "256"}}
	blue := integration.NewPostgres(b, wide)
	green := integration.NewPostgres(b, wide)
	rds := integration.NewRedis(b, integration.RedisOptions{})
	// The harness's own database stands for nothing the application uses.
	if err := green.Exec(ctx, "REVOKE CONNECT ON DATABASE cutover FROM PUBLIC"); err != nil {
		b.Fatal(err)
	}
	core, observed := observer.New(zap.DebugLevel)
	c := newCluster(b, Options{Logger: zap.New(core)})
	run := 0
	for _, tables := range sizes {
		for _, lift := range []string{config.GreenFenceLogins, config.GreenFenceGrants} {
			b.Run(fmt.Sprintf("tables=%d/green=%s", tables, lift), func(b *testing.B) {
				var writeOutages, gateOutages, unfences []time.Duration
				var steps stepTimes
				for i := 0; i < b.N; i++ {
					run++
					name := fmt.Sprintf("wide%d", run)
					spec := benchPlan(b, name, blue, green, rds, accounts)
					spec.Pairs[0].Scope = config.Scope{Schemas: []string{"public"}}
					spec.Fence.Green = lift
					spec.Fence.MaxFenceWindow = config.Duration(30 * time.Second)
					for _, side := range []*integration.Postgres{blue, green} {
						// In transactions of 500 tables: each takes a lock.
						for from := 1; from <= tables; from += 500 {
							if err := execIn(ctx, side.DSNFor(name, "postgres", ""), wideSchema(from, min(from+499, tables), side == blue)); err != nil {
								b.Fatal(err)
							}
						}
					}
					l := load.Start(ctx, load.Options{Run: name, Target: func() string { return blue.DSNFor(name, "app", "app-password") }, Writers: writers, Accounts: accounts})
					createAndStart(b, c, spec)
					// Per-table work before the window (copy, online verification) grows
					// with the schema; the window itself must not.
					p := waitPhase(b, c, name, 10*time.Minute+time.Duration(tables)*300*time.Millisecond, agent.PhaseSwitched, agent.PhaseAborted)
					receipts, _ := l.Stop()
					if p.Phase != agent.PhaseSwitched {
						b.Fatalf("plan %s ended %s: %s", name, p.Phase, p.Reason)
					}
					missing, err := load.Missing(ctx, green.DSNFor(name, "postgres", ""), name, receipts)
					if err != nil || len(missing) > 0 {
						b.Fatalf("plan %s: %d acknowledged writes missing on green (%v)", name, len(missing), err)
					}
					ofPlan := observed.FilterField(zap.String("plan", name))
					flips := ofPlan.FilterMessage("traffic flipped").All()
					gate := ofPlan.FilterMessage("gate open").All()
					if len(flips) != 1 || len(gate) != 1 {
						b.Fatalf("plan %s: %d 'traffic flipped', %d 'gate open' lines", name, len(flips), len(gate))
					}
					w, _ := flips[0].ContextMap()["write_outage"].(time.Duration)
					g, _ := gate[0].ContextMap()["outage"].(time.Duration)
					writeOutages, gateOutages = append(writeOutages, w), append(gateOutages, g)
					shifted := len(ofPlan.FilterMessage("fence shifted to logins").All()) > 0
					if shifted != (lift == config.GreenFenceLogins) {
						b.Fatalf("plan %s: green=%s, but the fence shifted to logins: %v", name, lift, shifted)
					}
					for _, e := range ofPlan.FilterMessage("unfenced").All() {
						if e.ContextMap()["side"] == "green" {
							d, _ := e.ContextMap()["took"].(time.Duration)
							unfences = append(unfences, d)
						}
					}
					line := steps.add(ofPlan)
					if testing.Verbose() {
						b.Logf("%s: write outage %.1f ms, fence to gate %.1f ms (%s), %d acknowledged", name, load.MS(w), load.MS(g), line, len(receipts))
					}
					complete(b, c, name)
					for _, side := range []*integration.Postgres{blue, green} {
						if err := side.Exec(ctx, "DROP DATABASE "+name+" WITH (FORCE)"); err != nil {
							b.Fatal(err)
						}
					}
				}
				b.ReportMetric(load.PercentileMS(writeOutages, 0.50), "write_outage_p50_ms")
				b.ReportMetric(load.PercentileMS(writeOutages, 0.99), "write_outage_p99_ms")
				b.ReportMetric(load.PercentileMS(gateOutages, 0.50), "fence_to_gate_p50_ms")
				b.ReportMetric(load.PercentileMS(gateOutages, 0.99), "fence_to_gate_p99_ms")
				b.ReportMetric(load.PercentileMS(unfences, 0.50), "green_unfence_p50_ms")
				steps.report(b, 0.50, "_p50_ms")
			})
		}
	}
}

// wideSchema creates tables wide_from..wide_to written by the
// application's role, with a row each when withRows (blue; green's are
// filled by the copy).
func wideSchema(from, to int, withRows bool) string {
	insert := ""
	if withRows {
		insert = "EXECUTE format('INSERT INTO wide_%s VALUES (1, 0)', i);"
	}
	return fmt.Sprintf(`DO $$ BEGIN
	FOR i IN %d..%d LOOP
		EXECUTE format('CREATE TABLE wide_%%s (id int PRIMARY KEY, v int NOT NULL)', i);
		%s
		EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON wide_%%s TO app', i);
	END LOOP;
END $$`, from, to, insert)
}
