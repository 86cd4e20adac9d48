package driver

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/agenttest"
	"github.com/cutover/cutover/engine"
	pgengine "github.com/cutover/cutover/engine/postgres"
	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/integration/load"
	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/switch/health/checks"
	"github.com/cutover/cutover/switch/target/targets"
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

func newCluster(t testing.TB, opts Options) *agenttest.Cluster {
	t.Helper()
	if opts.ReportDir == "" {
		opts.ReportDir = t.TempDir()
	}
	if opts.Engines == nil {
		opts.Engines = testEngines
	}
	if opts.NewTarget == nil {
		opts.NewTarget = targets.New
	}
	if opts.NewHealthCheck == nil {
		opts.NewHealthCheck = checks.New
	}
	return agenttest.New(t, agenttest.Options{Nodes: 3, Driver: func(i int) agent.Driver {
		o := opts
		o.LagPoll = 50 * time.Millisecond
		return New(o)
	}})
}

// testEngines are the engines the driver runs in these tests, as
// cmd/cutover registers them.
var testEngines = engine.Registry{config.Postgres: pgengine.Engine{}}

func createAndStart(t testing.TB, c *agenttest.Cluster, spec config.Plan) {
	t.Helper()
	ctx := agenttest.Ctx(t, 30*time.Second)
	raw, err := json.Marshal(specForAPI(spec))
	if err != nil {
		t.Fatal(err)
	}
	c.Leader(15 * time.Second)
	cl := c.Client(0)
	if _, err := cl.CreatePlan(ctx, agent.CreatePlanRequest{Spec: raw, Reason: "test", AllowLiteralSecrets: true}); err != nil {
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
			"scope": map[string]any{"tables": p.Scope.Tables, "schemas": p.Scope.Schemas, "exclude_tables": p.Scope.ExcludeTables}, "fence_roles": p.FenceRoles,
		})
	}
	var targets []map[string]any
	for _, t := range spec.Switch.Targets {
		targets = append(targets, map[string]any{"type": t.Type, "dsn": t.DSN.Reveal(), "key": t.Key, "channel": t.Channel, "timeout": t.Timeout.D().String()})
	}
	fence := map[string]any{"max_fence_window": spec.Fence.MaxFenceWindow.D().String(), "drain_grace": spec.Fence.DrainGrace.D().String()}
	if spec.Fence.Green != "" {
		fence["green"] = spec.Fence.Green
	}
	return map[string]any{
		"name": spec.Name, "pairs": pairs,
		"lag":      map[string]any{"max_bytes": int64(spec.Lag.MaxBytes), "max_delay": spec.Lag.MaxDelay.D().String(), "hold": spec.Lag.Hold.D().String()},
		"fence":    fence,
		"verify":   map[string]any{"enabled": *spec.Verify.Enabled, "chunk_time": spec.Verify.ChunkTime.D().String(), "parallel": spec.Verify.Parallel},
		"switch":   map[string]any{"targets": targets},
		"rollback": map[string]any{"window": spec.Rollback.Window.D().String(), "watch": spec.Rollback.Watch.D().String(), "interval": spec.Rollback.Interval.D().String(), "failures": spec.Rollback.Failures},
	}
}

func waitPhase(t testing.TB, c *agenttest.Cluster, plan string, timeout time.Duration, want ...agent.Phase) agent.PlanInfo {
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
	core, observed := observer.New(zap.InfoLevel)
	c := newCluster(t, Options{Logger: zap.New(core)})
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
	// The write outage, the headline figure, is recorded with the flip.
	if ms, ok := p.WriteOutageMS(); !ok || ms <= 0 {
		t.Errorf("write_outage_ms = %q: the flip did not record the write outage", p.Facts["write_outage_ms"])
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
	// The fenced writers were held on the drain's lock, and the hold was
	// let go once caught up: nothing holds blue's tables now.
	drains := observed.FilterMessage("drained").All()
	for _, d := range drains {
		if d.ContextMap()["holding"] != true {
			t.Errorf("a drain did not hold the fenced writers: %v", d.ContextMap())
		}
	}
	// Blue's fence (fence.blue: auto, the agent a superuser) is the write
	// proxies' memberships: no REVOKE per table inside the window.
	for _, d := range drains {
		if m := d.ContextMap(); m["side"] == "blue" && (m["memberships_revoked"] != int64(1) || m["revokes"] != int64(0)) {
			t.Errorf("blue's fence revoked %v memberships and ran %v REVOKEs, want 1 and 0", m["memberships_revoked"], m["revokes"])
		}
	}
	if released := observed.FilterMessage("released the hold on the tables").Len(); len(drains) == 0 || released == 0 {
		t.Errorf("%d drains, %d releases of the hold", len(drains), released)
	}
	blue, err := pgxConnect(s.blue.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer blue.Close(context.Background())
	var share int
	if err := blue.QueryRow(context.Background(), `SELECT count(*) FROM pg_locks WHERE mode = 'ShareLock' AND relation = 'load_accounts'::regclass`).Scan(&share); err != nil || share != 0 {
		t.Errorf("%d SHARE locks still held on blue's load_accounts after the flip (%v)", share, err)
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

func TestAChecksumDifferenceOnGreenKeepsTheGateClosedAbortsAndNamesTheRow(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := newScenario(t, 500)
	reports := t.TempDir()
	var injected atomic.Bool
	c := newCluster(t, Options{ReportDir: reports, Fault: func(point string) error {
		if point == "before online verification" && injected.CompareAndSwap(false, true) {
			// Behind the stream's back: green now differs from blue in one
			// row, one the application never writes (a write on blue would
			// replicate over it and heal it).
			return s.green.Exec(context.Background(), "UPDATE load_accounts SET balance = balance + 1000000 WHERE id = 450")
		}
		return nil
	}})
	l := load.Start(ctx, load.Options{Run: "diff", Target: s.appDSN, Writers: 2, Accounts: 400, Think: 5 * time.Millisecond})
	createAndStart(t, c, s.spec)
	p := waitPhase(t, c, "shop", 90*time.Second, agent.PhaseAborted, agent.PhaseAuthorized, agent.PhaseSwitched)
	receipts, _ := l.Stop()
	if p.Phase != agent.PhaseAborted {
		t.Fatalf("plan reached %s despite a difference on green", p.Phase)
	}
	if !strings.Contains(p.Reason, "public.load_accounts") || !strings.Contains(p.Reason, "id 450") {
		t.Errorf("abort reason does not name the row: %s", p.Reason)
	}
	// The gate never opened: no authorized in the audit log.
	ctxA, cancelA := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancelA()
	audit, err := c.Client(0).Audit(ctxA, "shop", 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range audit {
		if e.To == agent.PhaseAuthorized && e.Refused == "" {
			t.Errorf("the gate opened: %+v", e)
		}
	}
	// Blue is not fenced: the application writes there.
	app, err := pgxConnect(s.blue.DSNFor("cutover", "app", "app-password"))
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close(context.Background())
	if _, err := app.Exec(context.Background(), "UPDATE load_accounts SET balance = 0 WHERE id = 1"); err != nil {
		t.Errorf("blue still fenced after the abort: %v", err)
	}
	// The report names the row.
	found := false
	files, _ := filepath.Glob(filepath.Join(reports, "*.json"))
	for _, f := range files {
		data, _ := os.ReadFile(f)
		if strings.Contains(string(data), `"different"`) && strings.Contains(string(data), `"450"`) {
			found = true
		}
	}
	if !found {
		t.Errorf("no report in %s names the row (files %v)", reports, files)
	}
	missing, err := load.Missing(context.Background(), s.blue.DSN(), "diff", receipts)
	if err != nil || len(missing) > 0 {
		t.Errorf("acknowledged writes missing on blue: %d (%v)", len(missing), err)
	}
}

func pgxConnect(dsn string) (*pgx.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return pgx.Connect(ctx, dsn)
}

func TestAFailingHealthCheckAfterTheFlipRollsBackAutomatically(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := newScenario(t, 300)
	s.followRoute(ctx)
	var healthy atomic.Bool // the application is broken on green
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !healthy.Load() {
			w.WriteHeader(http.StatusBadGateway)
		}
	}))
	defer srv.Close()
	s.spec.Rollback = config.Rollback{Window: config.Duration(time.Hour), Watch: config.Duration(time.Minute), Interval: config.Duration(100 * time.Millisecond), Failures: 3,
		Checks: []config.HealthCheck{{Type: "http", URL: srv.URL, MaxLatency: config.Duration(time.Second)}}}
	// The first attempt's catch-up outlasts max_fence_window: green must be
	// unfenced within the window (traffic stays on green) and the next
	// attempt completes the rollback.
	var slowed atomic.Bool
	c := newCluster(t, Options{Fault: func(point string) error {
		if point == "before rollback catch-up" && slowed.CompareAndSwap(false, true) {
			time.Sleep(s.spec.Fence.MaxFenceWindow.D() + time.Second)
		}
		return nil
	}})
	l := load.Start(ctx, load.Options{Run: "auto", Target: s.appDSN, Writers: 2, Accounts: 300, Think: 5 * time.Millisecond})
	createAndStartWithHealth(t, c, s.spec, srv.URL)
	p := waitPhase(t, c, "shop", 90*time.Second, agent.PhaseRolledBack, agent.PhaseAborted, agent.PhaseDone)
	receipts, _ := l.Stop()
	if p.Phase != agent.PhaseRolledBack {
		t.Fatalf("plan ended %s (%s), want rolled_back", p.Phase, p.Reason)
	}
	if s.route.Load() != "blue" {
		t.Errorf("route = %v after the automatic rollback", s.route.Load())
	}
	missing, err := load.Missing(context.Background(), s.blue.DSN(), "auto", receipts)
	if err != nil || len(missing) > 0 {
		t.Errorf("%d acknowledged writes missing on blue after the rollback (%v)", len(missing), err)
	}
	ctxA, cancelA := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancelA()
	audit, err := c.Client(0).Audit(ctxA, "shop", 0)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	var failedAt, rolledBackAt time.Time
	for _, e := range audit {
		found = found || (e.To == agent.PhaseRollingBack && strings.Contains(e.Reason, "automatic rollback"))
		if strings.Contains(e.Detail, "rollback window failed") && strings.Contains(e.Detail, "fence window exceeded") && strings.Contains(e.Detail, "green unfenced: true") {
			failedAt = e.At
		}
		if e.To == agent.PhaseRolledBack {
			rolledBackAt = e.At
		}
	}
	if !found {
		t.Error("the audit log does not say the rollback was automatic")
	}
	if failedAt.IsZero() {
		t.Fatalf("the audit log does not show the rollback attempt that outlasted the window: %+v", audit)
	}
	// Between the failed attempt and the rollback, the application wrote
	// on green: the failed window lifted green's fence.
	onGreen := 0
	for _, r := range receipts {
		if strings.Contains(r.DSN, fmt.Sprint(s.green.Port)) && r.At.After(failedAt) && r.At.Before(rolledBackAt) {
			onGreen++
		}
	}
	if onGreen == 0 {
		t.Errorf("no write acknowledged on green between the failed rollback attempt (%s) and the rollback (%s)", failedAt, rolledBackAt)
	}
}

// createAndStartWithHealth posts the spec with its health checks.
func createAndStartWithHealth(t *testing.T, c *agenttest.Cluster, spec config.Plan, url string) {
	t.Helper()
	ctx := agenttest.Ctx(t, 30*time.Second)
	m := specForAPI(spec)
	rb := m["rollback"].(map[string]any)
	rb["checks"] = []map[string]any{{"type": "http", "url": url, "max_latency": "1s"}}
	raw, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	c.Leader(15 * time.Second)
	if _, err := c.Client(0).CreatePlan(ctx, agent.CreatePlanRequest{Spec: raw, Reason: "test", AllowLiteralSecrets: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Client(0).Start(ctx, spec.Name, "test"); err != nil {
		t.Fatal(err)
	}
}

// A role the plan does not fence writes during the window: held on the
// drain's lock, it is caught before its write lands, the plan aborts, and
// the write then lands on blue, which is the primary again.
func TestAWriterOutsideTheFenceHeldInTheWindowAbortsThePlan(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := newScenario(t, 200)
	if err := s.blue.Exec(ctx, `CREATE ROLE batch LOGIN PASSWORD 'batch-password'; GRANT SELECT, UPDATE ON load_accounts TO batch`); err != nil {
		t.Fatal(err)
	}
	batch, err := pgxConnect(s.blue.DSNFor("cutover", "batch", "batch-password"))
	if err != nil {
		t.Fatal(err)
	}
	defer batch.Close(context.Background())
	written := make(chan error, 1)
	var started atomic.Bool
	c := newCluster(t, Options{Fault: func(point string) error {
		if point == "before catch-up" && started.CompareAndSwap(false, true) {
			go func() {
				// An account the load below never touches (it writes
				// accounts 1-100): the balance then tells whether this
				// write landed.
				_, err := batch.Exec(context.Background(), "UPDATE load_accounts SET balance = 4242 WHERE id = 150")
				written <- err
			}()
			time.Sleep(100 * time.Millisecond) // the write reaches the hold
		}
		return nil
	}})
	l := load.Start(ctx, load.Options{Run: "outside", Target: s.appDSN, Writers: 2, Accounts: 100, Think: 5 * time.Millisecond})
	createAndStart(t, c, s.spec)
	p := waitPhase(t, c, "shop", 90*time.Second, agent.PhaseAborted, agent.PhaseAuthorized, agent.PhaseSwitched)
	receipts, _ := l.Stop()
	if p.Phase != agent.PhaseAborted {
		t.Fatalf("plan reached %s with a writer outside the fence", p.Phase)
	}
	if !strings.Contains(p.Reason, "fence breach") || !strings.Contains(p.Reason, "user batch") {
		t.Errorf("abort reason does not name the breach: %s", p.Reason)
	}
	select {
	case err := <-written:
		if err != nil {
			t.Errorf("the held write, once the fence was lifted: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the held write never ended")
	}
	var balance int64
	if err := batch.QueryRow(context.Background(), "SELECT balance FROM load_accounts WHERE id = 150").Scan(&balance); err != nil || balance != 4242 {
		t.Errorf("the held write is not on blue: balance %d, %v", balance, err)
	}
	missing, err := load.Missing(context.Background(), s.blue.DSN(), "outside", receipts)
	if err != nil || len(missing) > 0 {
		t.Errorf("acknowledged writes missing on blue: %d (%v)", len(missing), err)
	}
}

// Green without a grant the application has on blue would take the
// traffic and refuse its writes: the plan stays in replicating, naming
// the grant, until it is given on green; then it cuts over.
func TestAGreenLackingAnApplicationGrantStaysInReplicatingUntilItIsGiven(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := newScenario(t, 200)
	if err := s.green.Exec(ctx, "REVOKE UPDATE ON load_accounts FROM app"); err != nil {
		t.Fatal(err)
	}
	s.followRoute(ctx)
	c := newCluster(t, Options{})
	createAndStart(t, c, s.spec)
	deadline := time.Now().Add(90 * time.Second)
	for !c.LogsContain("on blue, not on green once unfenced: role app may UPDATE on public.load_accounts") {
		if time.Now().After(deadline) {
			t.Fatalf("the missing grant was never named\n%s", tail(c.Logs(), 40))
		}
		time.Sleep(100 * time.Millisecond)
	}
	p, err := c.Client(0).Plan(ctx, "shop")
	if err != nil {
		t.Fatal(err)
	}
	if p.Phase != agent.PhaseReplicating {
		t.Fatalf("plan is %s with green lacking a grant, want replicating (%s)", p.Phase, p.Reason)
	}
	// Granted while green is fenced: the next check fences it again (the
	// grant is saved, not usable) and finds the sides equal.
	if err := s.green.Exec(ctx, "GRANT UPDATE ON load_accounts TO app"); err != nil {
		t.Fatal(err)
	}
	p = waitPhase(t, c, "shop", 120*time.Second, agent.PhaseSwitched, agent.PhaseAborted)
	if p.Phase != agent.PhaseSwitched {
		t.Fatalf("plan ended %s: %s\n%s", p.Phase, p.Reason, tail(c.Logs(), 40))
	}
	app, err := pgxConnect(s.green.DSNFor("cutover", "app", "app-password"))
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close(context.Background())
	if _, err := app.Exec(ctx, "UPDATE load_accounts SET balance = balance + 1 WHERE id = 1"); err != nil {
		t.Errorf("the application cannot update on green after the flip: %v", err)
	}
}
