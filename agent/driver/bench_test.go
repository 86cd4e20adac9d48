package driver

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/agenttest"
	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/integration/load"
	"github.com/cutover/cutover/internal/config"
)

// BenchmarkCutoverWindow measures the write outage as the design defines
// it, from the fence to the gate opening, through the whole driver: fence
// and drain, catch-up through the stream, breach check and sequence sync,
// the dirty verification inside the fence, and the Raft commits of
// fenced, caught_up, verified and authorized, on a three-agent cluster.
// Each iteration is a whole plan on a database of its own (copy,
// replication, online verification, window, flip, complete); every write
// acknowledged on blue must be on green. Run:
//
//	go test ./agent/driver -run '^$' -bench CutoverWindow -benchtime 20x -timeout 60m
//
// Loads (sub-benchmarks):
//
//   - writers=N (CUTOVER_BENCH_WRITERS, default 32): application-like
//     writers that follow the Redis routing key by subscribing to its
//     channel (load.Follow); besides the outage it reports the client-seen
//     switch gap, from the last write acknowledged on blue to the first on
//     green (client_gap_*).
//   - tpcb/clients=8 and 32: pgbench's built-in TPC-B script as the fenced
//     role against blue (pgbench cannot follow a route: its clients fail
//     on the fence and pgbench ends), scale CUTOVER_BENCH_SCALE (default 1).
//   - tpcb+long/clients=32: the same beside 4 clients running 1-second
//     write transactions (an UPDATE, pg_sleep(1), an INSERT).
//   - tpcb+idle/clients=32: the same beside 2 sessions idle in a write
//     transaction across the fence; they are the only sessions the drain
//     may terminate, once drain_grace has passed.
//
// The pgbench loads report failed transactions (a pgbench client ends at
// its first error: failed_fenced counts permission errors, the fence at
// work; failed_other anything else, before or after the fence), sessions
// the drain terminated (terminated, and terminated_not_idle: any that was
// not an idle-in-transaction session fails the run), and lost writes:
// every committed TPC-B transaction inserts one pgbench_history row, so the
// transactions pgbench logged as committed (-l) must all be on green, and
// green must hold exactly blue's history rows.
//
// It reports the outage's percentiles (nearest rank: with fewer than 100
// runs p99 is the worst), each window step's p99, and the application's
// whole write outage, fence to traffic on a writable green.
func BenchmarkCutoverWindow(b *testing.B) {
	writers := 32
	if v, err := strconv.Atoi(os.Getenv("CUTOVER_BENCH_WRITERS")); err == nil && v > 0 {
		writers = v
	}
	b.Run(fmt.Sprintf("writers=%d", writers), func(b *testing.B) { benchmarkWindow(b, windowLoad{writers: writers}) })
	for _, clients := range []int{8, 32} {
		b.Run(fmt.Sprintf("tpcb/clients=%d", clients), func(b *testing.B) { benchmarkWindow(b, windowLoad{tpcb: clients}) })
	}
	b.Run("tpcb+long/clients=32", func(b *testing.B) { benchmarkWindow(b, windowLoad{tpcb: 32, long: 4}) })
	b.Run("tpcb+idle/clients=32", func(b *testing.B) { benchmarkWindow(b, windowLoad{tpcb: 32, idle: 2}) })
}

func fieldNames(m map[string]any) []string {
	var out []string
	for k, v := range m {
		if k != "plan" {
			out = append(out, fmt.Sprintf("%s=%v", k, v))
		}
	}
	sort.Strings(out)
	return out
}

// windowLoad is what runs against the application during one iteration.
type windowLoad struct {
	writers int // channel-following application writers
	tpcb    int // pgbench TPC-B clients as the fenced role
	long    int // pgbench clients running 1-second write transactions
	idle    int // sessions idle in a write transaction across the fence
}

func benchmarkWindow(b *testing.B, wl windowLoad) {
	const accounts = 10000
	ctx := context.Background()
	blue := integration.NewPostgres(b, integration.PostgresOptions{})
	green := integration.NewPostgres(b, integration.PostgresOptions{})
	rds := integration.NewRedis(b, integration.RedisOptions{})
	core, observed := observer.New(zap.DebugLevel)
	c := newCluster(b, Options{Logger: zap.New(core)})
	b.Cleanup(func() {
		if b.Failed() {
			all := observed.All()
			for _, e := range all[max(0, len(all)-60):] {
				b.Logf("driver: %s %s %v", e.Level, e.Message, e.ContextMap())
			}
		}
	})
	var pgb *pgbenchLoad
	if wl.tpcb > 0 {
		pgb = newPgbenchLoad(b)
	}

	var outages, writeOutages, gaps, afterFlip, reconnects []time.Duration
	var steps stepTimes
	acked, refused, terminated, notIdle, failedFenced, failedOther := 0, 0, 0, 0, 0, 0
	fromChannel, fromPolling := 0, 0
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		name := fmt.Sprintf("shop%d", i)
		spec := benchPlan(b, name, blue, green, rds, accounts)
		var l *load.Load
		var follower *load.Follower
		var blueApp, greenApp string
		var run *pgbenchRun
		if wl.writers > 0 {
			blueApp, greenApp = blue.DSNFor(name, "app", "app-password"), green.DSNFor(name, "app", "app-password")
			t := spec.Switch.Targets[0]
			var err error
			follower, err = load.Follow(ctx, load.FollowOptions{URL: rds.URL(), Key: t.Key, Channel: t.Channel, Poll: time.Second})
			if err != nil {
				b.Fatal(err)
			}
			l = load.Start(ctx, load.Options{Run: name, Target: follower.Target(map[string]string{"blue": blueApp, "green": greenApp}), Writers: wl.writers, Accounts: accounts})
		}
		if pgb != nil {
			pgb.setup(b, name, blue, green, &spec)
			run = pgb.start(b, name, blue, wl)
		}
		createAndStart(b, c, spec)
		var idle []*pgx.Conn
		if wl.idle > 0 {
			// Not before replication streams: creating the slot waits for
			// every open write transaction to end.
			waitPhase(b, c, name, 3*time.Minute, agent.PhaseReplicating, agent.PhaseReady)
			var err error
			if idle, err = load.IdleInTransaction(ctx, blue.DSNFor(name, "app", "app-password"), wl.idle); err != nil {
				b.Fatal(err)
			}
		}
		p := waitPhase(b, c, name, 3*time.Minute, agent.PhaseSwitched, agent.PhaseAborted)
		for _, conn := range idle {
			conn.Close(context.Background())
		}
		if p.Phase != agent.PhaseSwitched {
			b.Fatalf("plan %s ended %s: %s", name, p.Phase, p.Reason)
		}
		line := ""
		if l != nil {
			// Let the writers reach green before they stop.
			deadline := time.Now().Add(10 * time.Second)
			for follower.Colour() != "green" && time.Now().Before(deadline) {
				time.Sleep(time.Millisecond)
			}
			time.Sleep(300 * time.Millisecond)
			receipts, errs := l.Stop()
			ch, polled, _ := follower.Learnt()
			follower.Close()
			fromChannel += ch
			fromPolling += polled
			missing, err := load.Missing(ctx, green.DSNFor(name, "postgres", ""), name, receipts)
			if err != nil || len(missing) > 0 {
				b.Fatalf("plan %s: %d acknowledged writes missing on green (%v)", name, len(missing), err)
			}
			gap, ok := load.SwitchGap(receipts, blueApp, greenApp)
			if !ok {
				b.Fatalf("plan %s: no write acknowledged on one side (errors %v)", name, errs)
			}
			gaps = append(gaps, gap)
			line += fmt.Sprintf(" client gap %.1fms;", load.MS(gap))
			// The gap's part after the flip: the route's message, the
			// held writers' release, reconnecting, the first commit.
			if flips := observed.FilterField(zap.String("plan", name)).FilterMessage("traffic flipped").All(); len(flips) == 1 {
				if first, ok := firstAckOn(receipts, greenApp); ok {
					afterFlip = append(afterFlip, first.Sub(flips[0].Time))
					line += fmt.Sprintf(" first write on green %.1fms after the flip;", load.MS(first.Sub(flips[0].Time)))
				}
			}
			reconnects = append(reconnects, l.Switches()...)
			acked += len(receipts)
			refused += errs["42501"]
		}
		if run != nil {
			res := run.finish(b, name, blue, green)
			acked += res.committed
			failedFenced += res.fenced
			failedOther += res.other
			line += fmt.Sprintf(" pgbench committed %d, failed fenced %d other %d;", res.committed, res.fenced, res.other)
		}

		ofPlan := observed.FilterField(zap.String("plan", name))
		for _, e := range ofPlan.FilterMessage("terminated a session still writing after the grace period").All() {
			terminated++
			if app, _ := e.ContextMap()["application"].(string); app != load.IdleApplication {
				notIdle++
				// Reported with the 1-second mix (terminated_not_idle),
				// a failure otherwise.
				report := b.Errorf
				if wl.long > 0 {
					report = b.Logf
				}
				report("plan %s: terminated a session that was not idle in a transaction: %v", name, e.ContextMap())
			}
		}
		gate := ofPlan.FilterMessage("gate open").All()
		if len(gate) != 1 {
			b.Fatalf("plan %s: %d 'gate open' lines", name, len(gate))
		}
		outage, _ := gate[0].ContextMap()["outage"].(time.Duration)
		outages = append(outages, outage)
		if flips := ofPlan.FilterMessage("traffic flipped").All(); len(flips) == 1 {
			w, _ := flips[0].ContextMap()["write_outage"].(time.Duration)
			writeOutages = append(writeOutages, w)
		}
		line = fmt.Sprintf("outage %6.1fms:", load.MS(outage)) + line
		line += steps.add(ofPlan)
		if testing.Verbose() {
			for _, msg := range []string{"drain round trips", "caught up", "verified in the fence", "traffic flipped"} {
				for _, e := range ofPlan.FilterMessage(msg).All() {
					f := e.ContextMap()
					delete(f, "plan")
					delete(f, "phase")
					delete(f, "epoch")
					line += fmt.Sprintf("; %s %v", msg, f)
				}
			}
			b.Logf("%s", line)
		}
		if os.Getenv("CUTOVER_BENCH_TRACE") != "" {
			for _, e := range ofPlan.All() {
				b.Logf("trace %s %s %s", e.Time.Format("15:04:05.000"), e.Message, strings.Join(fieldNames(e.ContextMap()), " "))
			}
		}
		complete(b, c, name)
	}
	b.StopTimer()
	b.ReportMetric(load.PercentileMS(outages, 0.50), "p50_ms")
	b.ReportMetric(load.PercentileMS(outages, 0.90), "p90_ms")
	b.ReportMetric(load.PercentileMS(outages, 0.99), "p99_ms")
	// What the application sees: from the fence on blue to traffic on a
	// writable green (the flip: reverse replication's slot, green
	// unfenced, targets flipped).
	b.ReportMetric(load.PercentileMS(writeOutages, 0.50), "write_outage_p50_ms")
	b.ReportMetric(load.PercentileMS(writeOutages, 0.90), "write_outage_p90_ms")
	b.ReportMetric(load.PercentileMS(writeOutages, 0.99), "write_outage_p99_ms")
	steps.report(b, 0.99, "_p99_ms")
	if len(gaps) > 0 {
		b.ReportMetric(load.PercentileMS(gaps, 0.50), "client_gap_p50_ms")
		b.ReportMetric(load.PercentileMS(gaps, 0.99), "client_gap_p99_ms")
		b.ReportMetric(load.PercentileMS(afterFlip, 0.50), "gap_after_flip_p50_ms")
		b.ReportMetric(load.PercentileMS(afterFlip, 0.99), "gap_after_flip_p99_ms")
		b.ReportMetric(load.PercentileMS(reconnects, 0.99), "reconnect_p99_ms")
		b.ReportMetric(float64(fromChannel), "flips_from_channel")
		b.ReportMetric(float64(fromPolling), "flips_from_polling")
	}
	b.ReportMetric(float64(acked)/float64(b.N), "acked_writes/op")
	b.ReportMetric(float64(refused)/float64(b.N), "refused_writes/op")
	b.ReportMetric(float64(terminated)/float64(b.N), "terminated/op")
	b.ReportMetric(float64(notIdle), "terminated_not_idle")
	if pgb != nil {
		b.ReportMetric(float64(failedFenced)/float64(b.N), "failed_fenced/op")
		b.ReportMetric(float64(failedOther)/float64(b.N), "failed_other/op")
		b.ReportMetric(0, "lost") // any loss failed the run
	}
}

// firstAckOn is when the first write acknowledged on dsn was.
func firstAckOn(receipts []load.Receipt, dsn string) (time.Time, bool) {
	var first time.Time
	for _, r := range receipts {
		if r.DSN == dsn && (first.IsZero() || r.At.Before(first)) {
			first = r.At
		}
	}
	return first, !first.IsZero()
}

// benchPlan creates database name on both sides, with the load's tables
// (green's accounts empty: the copy fills them), and returns its plan.
func benchPlan(b *testing.B, name string, blue, green *integration.Postgres, rds *integration.Redis, accounts int) config.Plan {
	b.Helper()
	ctx := context.Background()
	for _, side := range []*integration.Postgres{blue, green} {
		if err := side.Exec(ctx, "CREATE DATABASE "+name); err != nil {
			b.Fatal(err)
		}
		if err := load.Setup(ctx, side.DSNFor(name, "postgres", ""), accounts); err != nil {
			b.Fatal(err)
		}
		if err := execIn(ctx, side.DSNFor(name, "postgres", ""), appRole); err != nil {
			b.Fatal(err)
		}
	}
	if err := execIn(ctx, green.DSNFor(name, "postgres", ""), "TRUNCATE load_accounts"); err != nil {
		b.Fatal(err)
	}
	on := true
	return config.Plan{
		Name: name,
		Pairs: []config.Pair{{
			Name: "db", Engine: config.Postgres,
			Blue:       config.Endpoint{DSN: config.DSN(blue.DSNFor(name, "postgres", ""))},
			Green:      config.Endpoint{DSN: config.DSN(green.DSNFor(name, "postgres", ""))},
			Scope:      config.Scope{Tables: []string{"public.load_accounts", "public.load_history"}},
			FenceRoles: []string{"app"},
		}},
		Lag:      config.Lag{MaxBytes: 1 << 20, MaxDelay: config.Duration(time.Second), Hold: config.Duration(300 * time.Millisecond)},
		Fence:    config.Fence{MaxFenceWindow: config.Duration(3 * time.Second), DrainGrace: config.Duration(200 * time.Millisecond)},
		Verify:   config.Verify{Enabled: &on, ChunkTime: config.Duration(100 * time.Millisecond), Parallel: 2},
		Switch:   config.Switch{Targets: []config.Target{{Type: config.TargetRedis, DSN: config.DSN(rds.URL()), Key: "cutover:" + name + ":route", Channel: "cutover:" + name + ":route", Timeout: config.Duration(5 * time.Second)}}},
		Rollback: config.Rollback{Window: config.Duration(time.Hour), Watch: config.Duration(time.Minute), Interval: config.Duration(time.Second), Failures: 3},
	}
}

func execIn(ctx context.Context, dsn, sql string) error {
	conn, err := pgxConnect(dsn)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, sql)
	return err
}

// complete ends a switched plan (reverse replication stops, its slot goes).
func complete(b *testing.B, c *agenttest.Cluster, name string) {
	b.Helper()
	ctx := agenttest.Ctx(b, 30*time.Second)
	if _, err := c.Client(0).Transition(ctx, name, agent.TransitionRequest{To: agent.PhaseDone, Reason: "benchmark"}); err != nil {
		b.Fatal(err)
	}
	waitPhase(b, c, name, time.Minute, agent.PhaseDone)
}

// stepTimes gathers the window steps' durations ("window step" lines)
// across plans, in the order first seen.
type stepTimes struct {
	names []string
	took  map[string][]time.Duration
}

// add records one plan's steps and returns them as " step ms" pairs.
func (s *stepTimes) add(ofPlan *observer.ObservedLogs) string {
	if s.took == nil {
		s.took = map[string][]time.Duration{}
	}
	line := ""
	for _, e := range ofPlan.FilterMessage("window step").All() {
		f := e.ContextMap()
		step, _ := f["step"].(string)
		took, _ := f["took"].(time.Duration)
		if _, seen := s.took[step]; !seen {
			s.names = append(s.names, step)
		}
		s.took[step] = append(s.took[step], took)
		line += fmt.Sprintf(" %s %.1f", step, load.MS(took))
	}
	return line
}

// report reports each step's percentile q as <step><unit>.
func (s *stepTimes) report(b *testing.B, q float64, unit string) {
	for _, name := range s.names {
		b.ReportMetric(load.PercentileMS(s.took[name], q), name+unit)
	}
}
