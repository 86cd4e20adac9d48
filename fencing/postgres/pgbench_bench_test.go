package postgres

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/integration/load"
	"github.com/cutover/cutover/internal/config"
	rpg "github.com/cutover/cutover/replication/postgres"
)

// benchmarkOutagePgbench is BenchmarkOutage under pgbench's TPC-B as the
// fenced role app (tpcb clients), beside long clients running 1-second
// write transactions and idle sessions idle in a write transaction across
// the fence. pgbench cannot outlive a fence (a client ends at its first
// error), so every iteration starts pgbench afresh, lets it commit, fences
// with the driver's hold, waits for the marker on green, unfences, and
// waits for pgbench to end. It reports, besides the outage, the failed
// transactions (fenced: a permission error, the fence at work; other:
// anything else), the terminated sessions (only idle-in-transaction ones
// may be: terminated_not_idle), and proves at the end that every
// transaction pgbench logged as committed is on green (lost).
func benchmarkOutagePgbench(b *testing.B, tpcb, long, idle int) {
	ctx := context.Background()
	bin, err := integration.PostgresTool("pgbench")
	if err != nil {
		b.Fatal(err)
	}
	e := &pairEnv{
		blue:  integration.NewPostgres(b, integration.PostgresOptions{}),
		green: integration.NewPostgres(b, integration.PostgresOptions{}),
	}
	dir := b.TempDir()
	server := func(pg *integration.Postgres, user, password string) load.PgbenchServer {
		return load.PgbenchServer{Bin: bin, Host: pg.Host, Port: pg.Port, DB: pg.Database, User: user, Password: password, Dir: dir}
	}
	for _, side := range []*integration.Postgres{e.blue, e.green} {
		if err := side.Exec(ctx, `CREATE ROLE app LOGIN PASSWORD 'app-password'`); err != nil {
			b.Fatal(err)
		}
		if err := load.PgbenchInit(server(side, "postgres", ""), 1, side == e.blue); err != nil {
			b.Fatal(err)
		}
		if err := side.Exec(ctx, load.PgbenchGrants); err != nil {
			b.Fatal(err)
		}
	}
	e.appDSN = e.blue.DSNFor(e.blue.Database, "app", "app-password")
	pair := config.Pair{Name: "db", Engine: config.Postgres,
		Blue:  config.Endpoint{DSN: config.DSN(e.blue.DSN())},
		Green: config.Endpoint{DSN: config.DSN(e.green.DSN())},
		Scope: config.Scope{Tables: load.PgbenchTables},
	}
	repl, err := rpg.New(rpg.Options{Plan: "p1", Pair: pair, StatusInterval: 200 * time.Millisecond})
	if err != nil {
		b.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	if err := repl.Start(rctx); err != nil {
		cancel()
		b.Fatal(err)
	}
	b.Cleanup(func() {
		repl.Stop(context.Background())
		cancel()
	})
	e.repl = repl
	e.fencer = New(newPool(b, e.blue.DSN()), Options{Plan: "p1", Pair: "db", Tables: load.PgbenchTables, Roles: []string{"app"}, Hold: 5 * time.Second})
	if err := e.fencer.Prepare(ctx); err != nil {
		b.Fatal(err)
	}
	e.waitStreaming(b)

	app := server(e.blue, "app", "app-password")
	var outages, drains, waits, catchups []time.Duration
	terminated, notIdle, fenced, other, committedTPCB, committedLong := 0, 0, 0, 0, 0, 0
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		before, _, _, err := load.PgbenchHistory(ctx, e.blue.DSN())
		if err != nil {
			b.Fatal(err)
		}
		var runs []*load.Pgbench
		for _, k := range []struct {
			kind    string
			clients int
		}{{"tpcb", tpcb}, {"long", long}} {
			if k.clients > 0 {
				pb, err := load.StartPgbench(app, k.kind, k.clients, 60)
				if err != nil {
					b.Fatal(err)
				}
				runs = append(runs, pb)
			}
		}
		var idlers []*pgx.Conn
		if idle > 0 {
			if idlers, err = load.IdleInTransaction(ctx, e.appDSN, idle); err != nil {
				b.Fatal(err)
			}
		}
		// Every client connected and committing: pgbench's connections
		// take a while on a busy machine; then half a second of load (the
		// 1-second transactions are mid-flight at the fence).
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			n, _, _, err := load.PgbenchHistory(ctx, e.blue.DSN())
			if err != nil {
				b.Fatal(err)
			}
			if n >= before+5*tpcb {
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("pgbench committed %d transactions in 30 s", n-before)
			}
		}
		time.Sleep(500 * time.Millisecond)
		waitLagUnder(b, e, 256<<10, 100*time.Millisecond, outageDip)
		b.StartTimer()
		epoch := uint64(2*i + 2)
		start := time.Now()
		drained, err := e.fencer.FenceDrain(ctx, epoch, 500*time.Millisecond)
		if err != nil {
			b.Fatal(err)
		}
		drainedAt := time.Now()
		if _, err := e.repl.WaitMarker(ctx, drained.Marker.Nonce); err != nil {
			b.Fatal(err)
		}
		outage := time.Since(start)
		e.fencer.Release(ctx)
		b.StopTimer()
		outages = append(outages, outage)
		drains = append(drains, drainedAt.Sub(start))
		waits = append(waits, drained.Waited)
		catchups = append(catchups, time.Since(drainedAt))
		for _, s := range drained.Terminated {
			terminated++
			if s.Application != load.IdleApplication {
				notIdle++
				b.Logf("iteration %d: terminated a session that was not idle in a transaction: %+v", i, s)
			}
		}
		for _, c := range idlers {
			c.Close(ctx)
		}
		if err := e.fencer.Unfence(ctx, epoch+1); err != nil {
			b.Fatal(err)
		}
		line := fmt.Sprintf("outage %6.1fms: fence+drain %5.1f (lock wait %5.1f) catch-up %5.1f; terminated %d", load.MS(outage), load.MS(drainedAt.Sub(start)), load.MS(drained.Waited), load.MS(time.Since(drainedAt)), len(drained.Terminated))
		for _, pb := range runs {
			res, err := pb.Wait(30 * time.Second)
			if err != nil {
				b.Fatalf("pgbench %s: %v\n%s", pb.Kind, err, res.Output)
			}
			for _, l := range res.OtherErrors {
				b.Logf("iteration %d: pgbench %s: %s", i, pb.Kind, l)
			}
			fenced += res.Fenced
			other += res.Other
			if pb.Kind == "tpcb" {
				committedTPCB += res.Committed
			} else {
				committedLong += res.Committed
			}
			line += fmt.Sprintf("; %s committed %d, failed fenced %d other %d", pb.Kind, res.Committed, res.Fenced, res.Other)
		}
		if testing.Verbose() {
			b.Logf("%s", line)
		}
		b.StartTimer()
	}
	b.StopTimer()
	b.ReportMetric(load.PercentileMS(outages, 0.50), "p50_ms")
	b.ReportMetric(load.PercentileMS(outages, 0.90), "p90_ms")
	b.ReportMetric(load.PercentileMS(outages, 0.99), "p99_ms")
	b.ReportMetric(load.PercentileMS(drains, 0.99), "fencedrain_p99_ms")
	b.ReportMetric(load.PercentileMS(waits, 0.99), "lockwait_p99_ms")
	b.ReportMetric(load.PercentileMS(catchups, 0.99), "catchup_p99_ms")
	b.ReportMetric(float64(terminated)/float64(b.N), "terminated/op")
	b.ReportMetric(float64(notIdle), "terminated_not_idle")
	b.ReportMetric(float64(fenced)/float64(b.N), "failed_fenced/op")
	b.ReportMetric(float64(other)/float64(b.N), "failed_other/op")
	b.ReportMetric(float64(committedTPCB+committedLong)/float64(b.N), "committed/op")
	// No committed transaction may be lost across all those fences: each
	// inserted one pgbench_history row.
	waitApplied(b, e)
	bt, bl, bs, err := load.PgbenchHistory(ctx, e.blue.DSN())
	if err != nil {
		b.Fatal(err)
	}
	gt, gl, gs, err := load.PgbenchHistory(ctx, e.green.DSN())
	if err != nil {
		b.Fatal(err)
	}
	if gt < committedTPCB || gl < committedLong || bt != gt || bl != gl || bs != gs {
		b.Fatalf("pgbench committed %d TPC-B and %d long transactions; blue holds %d/%d history rows (sum %d), green %d/%d (sum %d)", committedTPCB, committedLong, bt, bl, bs, gt, gl, gs)
	}
	b.ReportMetric(0, "lost")
	if notIdle > 0 && long == 0 {
		b.Errorf("%d sessions terminated that were not idle in a transaction", notIdle)
	}
}
