package driver

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/agenttest"
	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/integration/load"
	"github.com/cutover/cutover/internal/config"
)

const appRole = `
DO $$ BEGIN CREATE ROLE app LOGIN PASSWORD 'app-password'; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
GRANT SELECT, INSERT, UPDATE, DELETE ON load_accounts, load_history TO app;
GRANT USAGE ON SEQUENCE load_history_id_seq TO app;`

type scenario struct {
	blue, green *integration.Postgres
	redis       *integration.Redis
	spec        config.Plan
	route       atomic.Value // "blue" or "green"
	rdb         *redis.Client
}

func newScenario(t *testing.T, accounts int) *scenario {
	t.Helper()
	ctx := context.Background()
	s := &scenario{
		blue:  integration.NewPostgres(t, integration.PostgresOptions{}),
		green: integration.NewPostgres(t, integration.PostgresOptions{}),
		redis: integration.NewRedis(t, integration.RedisOptions{}),
	}
	for _, side := range []*integration.Postgres{s.blue, s.green} {
		if err := load.Setup(ctx, side.DSN(), accounts); err != nil {
			t.Fatal(err)
		}
		if err := side.Exec(ctx, appRole); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.green.Exec(ctx, "TRUNCATE load_accounts"); err != nil { // the initial copy fills it
		t.Fatal(err)
	}
	on := true
	s.spec = config.Plan{
		Name: "shop",
		Pairs: []config.Pair{{
			Name: "db", Engine: config.Postgres,
			Blue:       config.Endpoint{DSN: config.DSN(s.blue.DSN())},
			Green:      config.Endpoint{DSN: config.DSN(s.green.DSN())},
			Scope:      config.Scope{Tables: []string{"public.load_accounts", "public.load_history"}},
			FenceRoles: []string{"app"},
		}},
		Lag:      config.Lag{MaxBytes: 1 << 20, MaxDelay: config.Duration(time.Second), Hold: config.Duration(300 * time.Millisecond)},
		Fence:    config.Fence{MaxFenceWindow: config.Duration(3 * time.Second), DrainGrace: config.Duration(200 * time.Millisecond)},
		Verify:   config.Verify{Enabled: &on, ChunkTime: config.Duration(100 * time.Millisecond), Parallel: 2},
		Switch:   config.Switch{Targets: []config.Target{{Type: config.TargetRedis, DSN: config.DSN(s.redis.URL()), Key: "cutover:shop:route", Channel: "cutover:shop:route", Timeout: config.Duration(5 * time.Second)}}},
		Rollback: config.Rollback{Window: config.Duration(time.Hour), Watch: config.Duration(time.Minute), Interval: config.Duration(time.Second), Failures: 3},
	}
	s.rdb = redis.NewClient(&redis.Options{Addr: s.redis.Addr()})
	t.Cleanup(func() { s.rdb.Close() })
	s.route.Store("blue")
	return s
}

// appDSN routes the application by the Redis key, as a proxy would.
func (s *scenario) appDSN() string {
	if s.route.Load() == "green" {
		return s.green.DSNFor("cutover", "app", "app-password")
	}
	return s.blue.DSNFor("cutover", "app", "app-password")
}

func (s *scenario) followRoute(ctx context.Context) {
	go func() {
		for ctx.Err() == nil {
			if v, err := s.rdb.Get(ctx, "cutover:shop:route").Result(); err == nil {
				s.route.Store(v)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
}

func newCluster(t *testing.T, opts Options) *agenttest.Cluster {
	t.Helper()
	return agenttest.New(t, agenttest.Options{Nodes: 3, Driver: func(i int) agent.Driver {
		o := opts
		o.ReportDir = t.TempDir()
		o.LagPoll = 50 * time.Millisecond
		return New(o)
	}})
}

func createAndStart(t *testing.T, c *agenttest.Cluster, spec config.Plan) {
	t.Helper()
	ctx := agenttest.Ctx(t, 30*time.Second)
	raw, err := json.Marshal(specForAPI(spec))
	if err != nil {
		t.Fatal(err)
	}
	c.Leader(15 * time.Second)
	cl := c.Client(0)
	if _, err := cl.CreatePlan(ctx, agent.CreatePlanRequest{Spec: raw, Reason: "test"}); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.Start(ctx, spec.Name, "test"); err != nil {
		t.Fatal(err)
	}
}

// specForAPI renders the spec with its secrets, as an operator would post it.
func specForAPI(spec config.Plan) map[string]any {
	var pairs []map[string]any
	for _, p := range spec.Pairs {
		pairs = append(pairs, map[string]any{
			"name": p.Name, "engine": p.Engine, "blue": map[string]any{"dsn": p.Blue.DSN.Reveal()}, "green": map[string]any{"dsn": p.Green.DSN.Reveal()},
			"scope": map[string]any{"tables": p.Scope.Tables}, "fence_roles": p.FenceRoles,
		})
	}
	var targets []map[string]any
	for _, t := range spec.Switch.Targets {
		targets = append(targets, map[string]any{"type": t.Type, "dsn": t.DSN.Reveal(), "key": t.Key, "channel": t.Channel, "timeout": t.Timeout.D().String()})
	}
	return map[string]any{
		"name": spec.Name, "pairs": pairs,
		"lag":      map[string]any{"max_bytes": int64(spec.Lag.MaxBytes), "max_delay": spec.Lag.MaxDelay.D().String(), "hold": spec.Lag.Hold.D().String()},
		"fence":    map[string]any{"max_fence_window": spec.Fence.MaxFenceWindow.D().String(), "drain_grace": spec.Fence.DrainGrace.D().String()},
		"verify":   map[string]any{"enabled": *spec.Verify.Enabled, "chunk_time": spec.Verify.ChunkTime.D().String(), "parallel": spec.Verify.Parallel},
		"switch":   map[string]any{"targets": targets},
		"rollback": map[string]any{"window": spec.Rollback.Window.D().String(), "watch": spec.Rollback.Watch.D().String(), "interval": spec.Rollback.Interval.D().String(), "failures": spec.Rollback.Failures},
	}
}

func waitPhase(t *testing.T, c *agenttest.Cluster, plan string, timeout time.Duration, want ...agent.Phase) agent.PlanInfo {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last agent.PlanInfo
	for time.Now().Before(deadline) {
		for i := range c.Members() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			p, err := c.Client(i).Plan(ctx, plan)
			cancel()
			if err != nil {
				continue
			}
			last = p
			for _, w := range want {
				if p.Phase == w {
					return p
				}
			}
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("plan %s did not reach %v within %s; it is %s (%s)\n%s", plan, want, timeout, last.Phase, last.Reason, tail(c.Logs(), 40))
	return last
}

func TestCutoverUnderLoadFlipsAndLosesNothing(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := newScenario(t, 1000)
	s.followRoute(ctx)
	c := newCluster(t, Options{})
	l := load.Start(ctx, load.Options{Run: "e2e", Target: s.appDSN, Writers: 8, Accounts: 1000})
	createAndStart(t, c, s.spec)
	// Green is fenced from the first step of the plan on; from then on the
	// application must never be able to write to both sides.
	waitPhase(t, c, "shop", 60*time.Second, agent.PhaseReplicating, agent.PhaseReady, agent.PhaseFenced, agent.PhaseSwitched, agent.PhaseAborted)
	prober := load.StartProber(ctx, s.blue.DSNFor("cutover", "app", "app-password"), s.green.DSNFor("cutover", "app", "app-password"), 10*time.Millisecond)

	p := waitPhase(t, c, "shop", 90*time.Second, agent.PhaseSwitched, agent.PhaseAborted)
	if p.Phase != agent.PhaseSwitched {
		t.Fatalf("plan ended %s: %s\n%s", p.Phase, p.Reason, tail(c.Logs(), 40))
	}
	time.Sleep(500 * time.Millisecond) // the application writes on green now
	receipts, refused := l.Stop()
	samples := prober.Stop()
	if both := load.BothWritable(samples); len(both) > 0 {
		t.Errorf("invariant 1 broken: both sides took a write at %v (%d of %d samples)", both[0].At, len(both), len(samples))
	}
	if s.route.Load() != "green" {
		t.Errorf("route = %v, want green", s.route.Load())
	}
	// Every write acknowledged, on blue before the flip or on green after
	// it, is on green.
	missing, err := load.Missing(context.Background(), s.green.DSN(), "e2e", receipts)
	if err != nil {
		t.Fatal(err)
	}
	if len(missing) > 0 {
		t.Errorf("%d of %d acknowledged writes missing on green; first %+v", len(missing), len(receipts), missing[0])
	}
	onGreen := 0
	for _, r := range receipts {
		if strings.Contains(r.DSN, fmt.Sprint(s.green.Port)) {
			onGreen++
		}
	}
	if onGreen == 0 {
		t.Errorf("no write was acknowledged on green after the flip (refused %v)", refused)
	}
	t.Logf("acknowledged %d (%d on green), refused %v, %d samples", len(receipts), onGreen, refused, len(samples))
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
