package driver

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"testing"
	"time"

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
// fenced, caught_up, verified and authorized, on a three-agent cluster,
// under a pgbench-like load (CUTOVER_BENCH_WRITERS, default 32). Each
// iteration is a whole plan on a database of its own (copy, replication,
// online verification, window, flip, complete); every write acknowledged
// on blue must be on green. Run:
//
//	go test ./agent/driver -run '^$' -bench CutoverWindow -benchtime 20x -timeout 30m
//
// It reports the outage's percentiles (nearest rank: with fewer than 100
// runs p99 is the worst), each window step's p99, and the application's
// whole write outage, fence to traffic on a writable green.
func BenchmarkCutoverWindow(b *testing.B) {
	writers := 32
	if v, err := strconv.Atoi(os.Getenv("CUTOVER_BENCH_WRITERS")); err == nil && v > 0 {
		writers = v
	}
	const accounts = 10000
	ctx := context.Background()
	blue := integration.NewPostgres(b, integration.PostgresOptions{})
	green := integration.NewPostgres(b, integration.PostgresOptions{})
	rds := integration.NewRedis(b, integration.RedisOptions{})
	core, observed := observer.New(zap.DebugLevel)
	c := newCluster(b, Options{Logger: zap.New(core)})

	var outages, writeOutages []time.Duration
	steps := map[string][]time.Duration{}
	var stepNames []string
	acked, refused := 0, 0
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		name := fmt.Sprintf("shop%d", i)
		spec := benchPlan(b, name, blue, green, rds, accounts)
		l := load.Start(ctx, load.Options{Run: name, Target: func() string { return blue.DSNFor(name, "app", "app-password") }, Writers: writers, Accounts: accounts})
		createAndStart(b, c, spec)
		p := waitPhase(b, c, name, 3*time.Minute, agent.PhaseSwitched, agent.PhaseAborted)
		receipts, errs := l.Stop()
		if p.Phase != agent.PhaseSwitched {
			b.Fatalf("plan %s ended %s: %s", name, p.Phase, p.Reason)
		}
		missing, err := load.Missing(ctx, green.DSNFor(name, "postgres", ""), name, receipts)
		if err != nil || len(missing) > 0 {
			b.Fatalf("plan %s: %d acknowledged writes missing on green (%v)", name, len(missing), err)
		}
		acked += len(receipts)
		refused += errs["42501"]

		ofPlan := observed.FilterField(zap.String("plan", name))
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
		line := fmt.Sprintf("outage %6.1fms:", load.MS(outage))
		for _, e := range ofPlan.FilterMessage("window step").All() {
			f := e.ContextMap()
			step, _ := f["step"].(string)
			took, _ := f["took"].(time.Duration)
			if _, seen := steps[step]; !seen {
				stepNames = append(stepNames, step)
			}
			steps[step] = append(steps[step], took)
			line += fmt.Sprintf(" %s %.1f", step, load.MS(took))
		}
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
			b.Logf("%s; %d acknowledged", line, len(receipts))
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
	for _, s := range stepNames {
		b.ReportMetric(load.PercentileMS(steps[s], 0.99), s+"_p99_ms")
	}
	b.ReportMetric(float64(acked)/float64(b.N), "acked_writes/op")
	b.ReportMetric(float64(refused)/float64(b.N), "refused_writes/op")
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
