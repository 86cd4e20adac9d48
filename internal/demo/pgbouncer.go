package demo

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/client"
	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/switch/target/pgbouncer"
)

// ViaPgBouncer is the Options.Via that runs the application through
// PgBouncer: pgbench's TPC-B clients, a pgbouncer flip target that pauses
// the pool through the window.
const ViaPgBouncer = "pgbouncer"

// PgBouncerSummary is what the application saw through PgBouncer.
type PgBouncerSummary struct {
	Clients int `json:"clients"`
	// Committed is pgbench's count of transactions processed; History the
	// rows of pgbench_history on the side serving at the end (one per
	// transaction: LostWrites = Committed - History, never negative).
	Committed         int `json:"transactions_committed"`
	ApplicationErrors int `json:"application_errors"`
	History           int `json:"history_rows"`
	LostWrites        int `json:"lost_writes"`
	// BalanceMismatch: the accounts' balances do not add up to the
	// history's deltas (a lost or doubled update).
	BalanceMismatch bool `json:"balance_mismatch"`
	// The clients' longest transactions (the stall each saw), p50, p99 and
	// max across clients, and the median transaction latency.
	StallP50MS   float64 `json:"stall_p50_ms"`
	StallP99MS   float64 `json:"stall_p99_ms"`
	StallMaxMS   float64 `json:"stall_max_ms"`
	LatencyP50MS float64 `json:"latency_p50_ms"`
	// PoolPauseMS is the driver's pause to resume (fact pool_pause_ms).
	PoolPauseMS int64  `json:"pool_pause_ms"`
	Route       string `json:"route"`
	// Stalls are every client's longest transaction, sorted (benchmarks
	// pool them across runs).
	Stalls []time.Duration `json:"-"`
}

const (
	pgbDatabase = "appdb"
	pgbAdminEnv = "CUTOVER_DEMO_PGBOUNCER_ADMIN"
)

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// runViaPgBouncer is Run with the application behind PgBouncer.
func runViaPgBouncer(ctx context.Context, opts Options, w io.Writer) (*Summary, error) {
	if opts.Clients <= 0 {
		opts.Clients = 32
	}
	if opts.Seconds <= 0 {
		opts.Seconds = 30
	}
	start := time.Now()
	w = &lockedWriter{w: w}
	say := func(format string, args ...any) {
		fmt.Fprintf(w, "%6.2fs  %s\n", time.Since(start).Seconds(), fmt.Sprintf(format, args...))
	}
	dir, err := os.MkdirTemp("", "cutover-demo-")
	if err != nil {
		return nil, err
	}
	if !opts.KeepDir {
		defer os.RemoveAll(dir)
	}
	blue, err := integration.StartPostgres(ctx, integration.PostgresOptions{})
	if err != nil {
		return nil, fmt.Errorf("start blue: %w", err)
	}
	defer blue.Stop(context.Background())
	green, err := integration.StartPostgres(ctx, integration.PostgresOptions{})
	if err != nil {
		return nil, fmt.Errorf("start green: %w", err)
	}
	defer green.Stop(context.Background())
	say("blue PostgreSQL on 127.0.0.1:%d, green on 127.0.0.1:%d", blue.Port, green.Port)
	if err := integration.PgbenchInit(ctx, blue, 1); err != nil {
		return nil, fmt.Errorf("blue: %w", err)
	}
	if err := integration.PgbenchInit(ctx, green, 0); err != nil {
		return nil, fmt.Errorf("green: %w", err)
	}
	for _, side := range []*integration.Postgres{blue, green} {
		if err := side.Exec(ctx, fmt.Sprintf(`CREATE ROLE %s LOGIN PASSWORD '%s';
GRANT SELECT, INSERT, UPDATE, DELETE ON pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history TO %s`, appUser, appPass, appUser)); err != nil {
			return nil, err
		}
	}
	say("pgbench tables (scale 1) on blue, empty on green; application role %q", appUser)
	pgb, err := integration.StartPgBouncer(ctx, integration.PgBouncerOptions{
		Databases: map[string]string{pgbDatabase: blue.PgBouncerEntry(blue.Database)},
		Users:     map[string]string{appUser: appPass},
	})
	if err != nil {
		return nil, err
	}
	defer pgb.Stop(context.Background())
	if opts.KeepDir {
		// PgBouncer's directory goes with it: its log is kept beside the agents'.
		defer func() {
			if data, err := os.ReadFile(pgb.LogFile); err == nil {
				os.WriteFile(filepath.Join(dir, "pgbouncer.log"), data, 0o600)
			}
		}()
	}
	say("PgBouncer on %s (transaction pooling): database %s -> blue", pgb.Addr(), pgbDatabase)

	token := randomToken()
	plans := pgbouncerPlanYAML(planName, blue, green, pgb)
	agents, err := StartAgents(ctx, opts.Binary, dir, token, []string{pgbAdminEnv + "=" + pgb.AdminDSN()}, plans)
	if err != nil {
		return nil, err
	}
	defer func() {
		for _, a := range agents {
			a.Kill()
		}
	}()
	clients := make([]*client.Client, len(agents))
	for i, a := range agents {
		clients[i] = client.New(a.API, token)
	}
	api := &anyAgent{clients: clients}
	if err := retry(ctx, func() error {
		_, err := api.CreatePlan(ctx, agent.CreatePlanRequest{ConfigPlan: planName, Reason: "demo via pgbouncer"})
		return err
	}); err != nil {
		return nil, fmt.Errorf("create plan: %w (logs in %s)", err, dir)
	}
	if _, err := api.Start(ctx, planName, "demo via pgbouncer"); err != nil {
		return nil, fmt.Errorf("start plan: %w", err)
	}
	say("3 agents up; plan %q started", planName)

	var bench *integration.PgbenchRun
	defer func() {
		if bench != nil {
			select {
			case <-bench.Done():
			default:
				bench.Kill()
			}
		}
	}()
	last := agent.Phase("")
	var final agent.PlanInfo
	watch := func(until ...agent.Phase) (agent.PlanInfo, error) {
		deadline := time.Now().Add(3 * time.Minute)
		for {
			p, err := newestPlan(ctx, clients, planName)
			if err == nil && p.Phase != last {
				last = p.Phase
				say("phase %-12s epoch %-5d %s", p.Phase, p.Epoch, p.Reason)
				if p.Phase == agent.PhaseReplicating && bench == nil {
					bench, err = integration.StartPgbench(ctx, integration.PgbenchOptions{
						DSN:      fmt.Sprintf("postgres://%s@%s/%s?sslmode=disable", appUser, pgb.Addr(), pgbDatabase),
						Password: appPass, Clients: opts.Clients, Seconds: opts.Seconds, LogDir: filepath.Join(dir, "pgbench"),
					})
					if err != nil {
						return p, err
					}
					say("application: pgbench TPC-B, %d clients through PgBouncer for %ds", opts.Clients, opts.Seconds)
				}
			}
			if err == nil {
				for _, u := range until {
					if p.Phase == u {
						return p, nil
					}
				}
			}
			if bench != nil {
				select {
				case <-bench.Done():
					res, _ := bench.Wait(ctx)
					return p, fmt.Errorf("pgbench ended before the plan reached %v (%d clients aborted on errors, %d transactions failed: %q; or raise --seconds); logs in %s", until, res.Aborted, res.Failed, res.Errors, dir)
				default:
				}
			}
			if time.Now().After(deadline) {
				return p, fmt.Errorf("plan stuck in %s; logs in %s", last, dir)
			}
			select {
			case <-ctx.Done():
				return p, ctx.Err()
			case <-time.After(10 * time.Millisecond):
			}
		}
	}
	p, err := watch(agent.PhaseSwitched, agent.PhaseAborted)
	if err != nil {
		return nil, err
	}
	final = p
	sum := &Summary{Phase: string(p.Phase), Dir: dir, Plan: planName}
	if opts.Rollback && p.Phase == agent.PhaseSwitched {
		time.Sleep(time.Second) // the application writes on green
		if err := retry(ctx, func() error {
			_, err := api.Transition(ctx, planName, agent.TransitionRequest{To: agent.PhaseRollingBack, Reason: "demo --rollback"})
			return err
		}); err != nil {
			return nil, fmt.Errorf("rollback: %w", err)
		}
		if p, err = watch(agent.PhaseRolledBack); err != nil {
			return nil, err
		}
		sum.Phase, sum.RolledBack = string(p.Phase), true
	}
	say("waiting for pgbench to end")
	res, err := bench.Wait(ctx)
	if err != nil {
		return nil, err
	}
	if p.Phase == agent.PhaseSwitched {
		if err := retry(ctx, func() error {
			_, err := api.Transition(ctx, planName, agent.TransitionRequest{To: agent.PhaseDone, Reason: "demo complete"})
			return err
		}); err == nil {
			if p, err = watch(agent.PhaseDone); err == nil {
				sum.Phase = string(p.Phase)
			}
		}
	}
	sum.WriteOutageMS = -1
	if ms, ok := final.WriteOutageMS(); ok {
		sum.WriteOutageMS = ms
	}
	sum.OutageMS = fenceToGate(ctx, clients, planName)
	ps := &PgBouncerSummary{
		Clients: opts.Clients, Committed: res.Processed, ApplicationErrors: res.Failed + res.Aborted,
		Stalls: res.Stalls, StallP50MS: ms(res.StallPercentile(50)), StallP99MS: ms(res.StallPercentile(99)), LatencyP50MS: ms(res.Latency),
	}
	if n := len(res.Stalls); n > 0 {
		ps.StallMaxMS = ms(res.Stalls[n-1])
	}
	fmt.Sscan(final.Facts["pool_pause_ms"], &ps.PoolPauseMS)
	tg, err := pgbouncer.NewPgBouncer(pgbouncer.PgBouncerOptions{AdminDSN: pgb.AdminDSN(), Database: pgbDatabase, File: pgb.DatabasesFile,
		Blue: blue.PgBouncerEntry(blue.Database), Green: green.PgBouncerEntry(green.Database)})
	if err == nil {
		ps.Route, _, _ = tg.Route()
		tg.Close()
	}
	sum.Route = ps.Route
	serving := green
	if sum.RolledBack || p.Phase == agent.PhaseAborted {
		serving = blue
	}
	if ps.History, ps.BalanceMismatch, err = tpcbCheck(ctx, serving); err != nil {
		return nil, err
	}
	ps.LostWrites = max(res.Processed-ps.History, 0)
	sum.WritesAcknowledged, sum.WritesMissing = res.Processed, ps.LostWrites
	sum.PgBouncer = ps
	sum.Via = ViaPgBouncer

	fmt.Fprintln(w)
	fmt.Fprintf(w, "through PgBouncer, %d TPC-B clients:\n", ps.Clients)
	fmt.Fprintf(w, "  transactions committed %d, application errors %d, history rows on %s %d, lost writes %d, balances add up: %v\n",
		ps.Committed, ps.ApplicationErrors, ps.Route, ps.History, ps.LostWrites, !ps.BalanceMismatch)
	fmt.Fprintf(w, "  client-observed stall (each client's longest transaction): p50 %.1f ms, p99 %.1f ms, max %.1f ms (median transaction %.1f ms)\n",
		ps.StallP50MS, ps.StallP99MS, ps.StallMaxMS, ps.LatencyP50MS)
	fmt.Fprintf(w, "  pool paused (driver's clock, pause to resume): %d ms\n", ps.PoolPauseMS)
	fmt.Fprintf(w, "  write outage (fence on blue to a writable green, route flipped): %d ms; fence to gate open %d ms\n", sum.WriteOutageMS, sum.OutageMS)
	for _, e := range res.Errors {
		fmt.Fprintf(w, "  pgbench: %s\n", e)
	}
	if opts.KeepDir {
		fmt.Fprintf(w, "  agents' data and logs kept in %s\n", dir)
	}
	out, _ := json.Marshal(sum)
	fmt.Fprintln(w, string(out))
	return sum, nil
}

// tpcbCheck counts pgbench_history on the serving side and checks that the
// accounts' balances add up to the history's deltas.
func tpcbCheck(ctx context.Context, p *integration.Postgres) (rows int, mismatch bool, err error) {
	conn, err := pgx.Connect(ctx, p.DSN())
	if err != nil {
		return 0, false, err
	}
	defer conn.Close(context.Background())
	var hist, acc int64
	err = conn.QueryRow(ctx, `SELECT (SELECT count(*) FROM pgbench_history), (SELECT coalesce(sum(delta), 0) FROM pgbench_history), (SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts)`).Scan(&rows, &hist, &acc)
	return rows, hist != acc, err
}

// fenceToGate reads, from the audit log, the fence's intent to the gate
// opening (leader's clock), in milliseconds.
func fenceToGate(ctx context.Context, clients []*client.Client, plan string) int64 {
	for _, c := range clients {
		entries, err := c.Audit(ctx, plan, 0)
		if err != nil {
			continue
		}
		var fenceAt time.Time
		for _, e := range entries {
			if e.Op == agent.OpIntent && e.Step == "fence" && e.Refused == "" {
				fenceAt = e.At
			}
			if e.To == agent.PhaseAuthorized && e.Refused == "" && !fenceAt.IsZero() {
				return e.At.Sub(fenceAt).Milliseconds()
			}
		}
	}
	return -1
}

// pgbouncerPlanYAML is the demo's plan through PgBouncer: the pgbench
// tables, flipped by a pgbouncer target.
func pgbouncerPlanYAML(name string, blue, green *integration.Postgres, pgb *integration.PgBouncer) string {
	return fmt.Sprintf(`  - name: %s
    pairs:
      - name: bench
        engine: postgres
        blue: {dsn: "%s"}
        green: {dsn: "%s"}
        scope: {tables: [public.pgbench_accounts, public.pgbench_branches, public.pgbench_tellers, public.pgbench_history]}
        fence_roles: [%s]
    lag: {max_bytes: 1MiB, max_delay: 500ms, hold: 2s}
    fence: {max_fence_window: 5s, drain_grace: 300ms}
    verify: {enabled: true, chunk_time: 100ms, parallel: 2}
    switch:
      targets:
        - type: pgbouncer
          dsn: "${%s}"
          database: %s
          databases_file: "%s"
          blue: "%s"
          green: "%s"
          pause_timeout: 2s
    rollback: {window: 1h, watch: 30s}
`, name, blue.DSN(), green.DSN(), appUser, pgbAdminEnv, pgbDatabase, pgb.DatabasesFile,
		blue.PgBouncerEntry(blue.Database), green.PgBouncerEntry(green.Database))
}
