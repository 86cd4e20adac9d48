package postgres

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/internal/config"
)

// BenchmarkReplicationVsNative compares cutover's replication with native
// PostgreSQL logical replication (CREATE SUBSCRIPTION) on pgbench's TPC-B
// tables and load, in one run on the same machine: one blue and two
// greens, one per contender.
//
//  1. Initial copy: native initial sync, then cutover's copy (one after
//     the other, so they do not share the CPU).
//  2. Steady-state lag: pgbench runs against blue while both replicate,
//     first flat out (on two cores, lag is then mostly who gets CPU), then
//     rate-limited to CUTOVER_BENCH_RATE tps (default 1000, which both
//     sustain); a probe row updated on blue every 25-75 ms is read on both
//     greens every 25-75 ms (random pauses, so that neither sampler stays
//     in phase with the writer), and lag is how old the newest visible
//     probe is (the same measure for both; the probe's own cadence, ~25 ms
//     on average, is in both figures).
//  3. Apply ceiling: both are held back (subscription disabled, replicator
//     paused; both walsenders exit), pgbench builds a backlog, a final row
//     is written, and each in turn is let go and timed, from ENABLE or
//     Resume (connection and stream start-up included for both) until the
//     final row is visible on its green. This is repeated
//     CUTOVER_BENCH_ROUNDS times (default 3), who goes first alternating,
//     and the median of the per-round ratios is reported.
//
// Run it with:
//
//	go test -run '^$' -bench ReplicationVsNative -benchtime 1x -timeout 30m ./replication/postgres/
//
// CUTOVER_BENCH_SCALE (pgbench scale, default 10), CUTOVER_BENCH_SECONDS
// (each load phase, default 20), CUTOVER_BENCH_CLIENTS (default 8),
// CUTOVER_BENCH_RATE and CUTOVER_BENCH_ROUNDS tune it. The initial copies
// run once, native first.
func BenchmarkReplicationVsNative(b *testing.B) {
	pgbench := findPgbench(b)
	scale := envInt("CUTOVER_BENCH_SCALE", 10)
	seconds := envInt("CUTOVER_BENCH_SECONDS", 20)
	clients := envInt("CUTOVER_BENCH_CLIENTS", 8)
	rounds := envInt("CUTOVER_BENCH_ROUNDS", 3)
	for i := 0; i < b.N; i++ {
		runReplicationBench(b, pgbench, scale, seconds, clients, rounds)
	}
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func findPgbench(b *testing.B) string {
	if p, err := exec.LookPath("pgbench"); err == nil {
		return p
	}
	matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin/pgbench")
	if len(matches) == 0 {
		b.Skip("pgbench not found")
	}
	slices.Sort(matches)
	return matches[len(matches)-1]
}

func runPgbench(b *testing.B, bin string, pg *integration.Postgres, args ...string) string {
	b.Helper()
	full := append([]string{"-h", pg.Host, "-p", strconv.Itoa(pg.Port), "-U", "postgres"}, args...)
	full = append(full, pg.Database)
	out, err := exec.Command(bin, full...).CombinedOutput()
	if err != nil {
		b.Fatalf("pgbench %v: %v\n%s", args, err, out)
	}
	return string(out)
}

var processedRe = regexp.MustCompile(`number of transactions actually processed: (\d+)`)
var tpsRe = regexp.MustCompile(`tps = ([0-9.]+)`)

func pgbenchLoad(b *testing.B, bin string, pg *integration.Postgres, clients, seconds int, extra ...string) (txns int, tps float64) {
	out := runPgbench(b, bin, pg, append([]string{"-n", "-c", strconv.Itoa(clients), "-j", "2", "-T", strconv.Itoa(seconds)}, extra...)...)
	if m := processedRe.FindStringSubmatch(out); m != nil {
		txns, _ = strconv.Atoi(m[1])
	}
	if m := tpsRe.FindStringSubmatch(out); m != nil {
		tps, _ = strconv.ParseFloat(m[1], 64)
	}
	return txns, tps
}

func mustExec(b *testing.B, pg *integration.Postgres, sql string) {
	b.Helper()
	if err := pg.Exec(context.Background(), sql); err != nil {
		b.Fatalf("%s: %v", sql, err)
	}
}

func waitFor(b *testing.B, what string, timeout time.Duration, cond func() bool) time.Duration {
	b.Helper()
	fmt.Fprintf(os.Stderr, "%s bench: waiting for %s\n", time.Now().Format("15:04:05"), what)
	start := time.Now()
	for !cond() {
		if time.Since(start) > timeout {
			b.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}

type lagStats struct {
	n                  int
	mean, p50, p99, mx time.Duration
}

func stats(samples []time.Duration) lagStats {
	if len(samples) == 0 {
		return lagStats{}
	}
	s := slices.Clone(samples)
	slices.Sort(s)
	var sum time.Duration
	for _, d := range s {
		sum += d
	}
	return lagStats{n: len(s), mean: sum / time.Duration(len(s)), p50: s[len(s)/2], p99: s[len(s)*99/100], mx: s[len(s)-1]}
}

func runReplicationBench(b *testing.B, pgbench string, scale, seconds, clients, rounds int) {
	ctx := context.Background()
	blue := integration.NewPostgres(b, integration.PostgresOptions{})
	native := integration.NewPostgres(b, integration.PostgresOptions{})
	ours := integration.NewPostgres(b, integration.PostgresOptions{Settings: benchGreenSettings()})

	runPgbench(b, pgbench, blue, "-i", "-q", "-s", strconv.Itoa(scale), "-I", "dtgvp")
	for _, g := range []*integration.Postgres{native, ours} {
		runPgbench(b, pgbench, g, "-i", "-q", "-s", "1", "-I", "dtp")
	}
	// pgbench_history has no key: both need a replica identity for it only
	// for updates and deletes, which TPC-B does not do; cutover's
	// pre-check insists, so give it one on blue.
	mustExec(b, blue, `ALTER TABLE pgbench_history REPLICA IDENTITY FULL`)
	for _, pg := range []*integration.Postgres{blue, native, ours} {
		mustExec(b, pg, `CREATE TABLE bench_probe (id int PRIMARY KEY, at timestamptz NOT NULL)`)
	}
	mustExec(b, blue, `INSERT INTO bench_probe VALUES (1, clock_timestamp())`)
	var bytes int64
	bpool, err := pgxpool.New(ctx, blue.DSN())
	if err != nil {
		b.Fatal(err)
	}
	defer bpool.Close()
	if err := bpool.QueryRow(ctx, `SELECT sum(pg_table_size(c.oid))::int8 FROM pg_class c WHERE relname LIKE 'pgbench_%' AND relkind = 'r'`).Scan(&bytes); err != nil {
		b.Fatal(err)
	}

	// 1. Initial copy.
	mustExec(b, blue, `CREATE PUBLICATION native_pub FOR TABLE pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history, bench_probe`)
	npool, err := pgxpool.New(ctx, native.DSN())
	if err != nil {
		b.Fatal(err)
	}
	defer npool.Close()
	start := time.Now()
	mustExec(b, native, fmt.Sprintf(`CREATE SUBSCRIPTION native_sub CONNECTION %s PUBLICATION native_pub`, quoteLiteral(blue.DSN())))
	waitFor(b, "native initial sync", 10*time.Minute, func() bool {
		var notReady, total int
		err := npool.QueryRow(ctx, `SELECT count(*) FILTER (WHERE srsubstate <> 'r'), count(*) FROM pg_subscription_rel`).Scan(&notReady, &total)
		return err == nil && total == 5 && notReady == 0
	})
	nativeCopy := time.Since(start)
	defer mustExec(b, native, `DROP SUBSCRIPTION native_sub`)

	log := zap.NewNop()
	if path := os.Getenv("CUTOVER_BENCH_LOG"); path != "" {
		cfg := zap.NewDevelopmentConfig()
		cfg.OutputPaths = []string{path}
		log, _ = cfg.Build()
	}
	r, err := New(Options{Plan: "bench", Logger: log, Pair: config.Pair{Name: "pgbench", Engine: config.Postgres,
		Blue: config.Endpoint{DSN: config.DSN(blue.DSN())}, Green: config.Endpoint{DSN: config.DSN(ours.DSN())}}})
	if err != nil {
		b.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	start = time.Now()
	if err := r.Start(rctx); err != nil {
		b.Fatal(err)
	}
	defer r.Stop(ctx)
	waitFor(b, "cutover initial copy", 10*time.Minute, func() bool { return r.Status().Phase == PhaseStreaming })
	oursCopy := time.Since(start)

	// 2. Steady-state lag under the same load, both replicating at once.
	opool, err := pgxpool.New(ctx, ours.DSN())
	if err != nil {
		b.Fatal(err)
	}
	defer opool.Close()
	lagPhase := func(extra ...string) (int, float64, lagStats, lagStats) {
		probeCtx, stopProbe := context.WithCancel(ctx)
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			for probeCtx.Err() == nil {
				_, _ = bpool.Exec(probeCtx, `UPDATE bench_probe SET at = clock_timestamp() WHERE id = 1`)
				time.Sleep(probePause())
			}
		}()
		sample := func(pool *pgxpool.Pool, out *[]time.Duration) {
			defer wg.Done()
			for probeCtx.Err() == nil {
				var at time.Time
				if err := pool.QueryRow(probeCtx, `SELECT at FROM bench_probe WHERE id = 1`).Scan(&at); err == nil {
					*out = append(*out, time.Since(at))
				}
				time.Sleep(probePause())
			}
		}
		var nativeLag, oursLag []time.Duration
		// Sample only once both greens show a probe written after this point
		// (the copied probe row is as old as the copy).
		probeStart := time.Now()
		for _, pool := range []*pgxpool.Pool{npool, opool} {
			waitFor(b, "a fresh probe", time.Minute, func() bool {
				var at time.Time
				err := pool.QueryRow(ctx, `SELECT at FROM bench_probe WHERE id = 1`).Scan(&at)
				return err == nil && at.After(probeStart)
			})
		}
		wg.Add(2)
		go sample(npool, &nativeLag)
		go sample(opool, &oursLag)
		txns, tps := pgbenchLoad(b, pgbench, blue, clients, seconds, extra...)
		stopProbe()
		wg.Wait()
		return txns, tps, stats(nativeLag), stats(oursLag)
	}
	// Flat out (pgbench takes what CPU it can, both replicators compete for
	// the rest), then at a fixed rate both can sustain.
	steadyTxns, steadyTPS, ns, os_ := lagPhase()
	rate := envInt("CUTOVER_BENCH_RATE", 1000)
	rateTxns, rateTPS, nsR, osR := lagPhase("-R", strconv.Itoa(rate))

	// 3. Apply ceiling: the same backlog drained by each alone, in several
	// rounds whose order alternates (who drains first finds blue's WAL
	// less cached, and one noisy moment on two cores should not decide).
	var (
		nativeDrains, oursDrains, ratios []float64
		backlogTxns                      int
		backlogTPS                       float64
		backlogBytes                     uint64
	)
	drainNative := func(pool *pgxpool.Pool, arrived func() bool) time.Duration {
		start := time.Now()
		mustExec(b, native, `ALTER SUBSCRIPTION native_sub ENABLE`)
		waitFor(b, "native drain", 30*time.Minute, arrived)
		return time.Since(start)
	}
	drainOurs := func(pool *pgxpool.Pool, arrived func() bool) time.Duration {
		start := time.Now()
		r.Resume()
		waitFor(b, "cutover drain", 30*time.Minute, arrived)
		d := time.Since(start)
		if r.Err() != nil {
			b.Fatal(r.Err())
		}
		return d
	}
	if path := os.Getenv("CUTOVER_BENCH_PROFILE"); path != "" {
		f, err := os.Create(path)
		if err == nil {
			_ = pprof.StartCPUProfile(f)
			defer pprof.StopCPUProfile()
		}
	}
	for round := 0; round < rounds; round++ {
		mustExec(b, native, `ALTER SUBSCRIPTION native_sub DISABLE`)
		r.Pause()
		waitFor(b, "both streams stopped", time.Minute, func() bool {
			var active int
			err := bpool.QueryRow(ctx, `SELECT count(*) FROM pg_replication_slots WHERE active`).Scan(&active)
			return err == nil && active == 0
		})
		lsn0 := currentLSN(b, bpool)
		txns, tps := pgbenchLoad(b, pgbench, blue, clients, seconds)
		probe := 10 + round
		mustExec(b, blue, fmt.Sprintf(`INSERT INTO bench_probe VALUES (%d, clock_timestamp())`, probe))
		backlogTxns += txns
		backlogTPS += tps
		backlogBytes += currentLSN(b, bpool) - lsn0
		arrived := func(pool *pgxpool.Pool) func() bool {
			return func() bool {
				var n int
				err := pool.QueryRow(ctx, `SELECT count(*) FROM bench_probe WHERE id = $1`, probe).Scan(&n)
				return err == nil && n == 1
			}
		}
		var nd, od time.Duration
		if round%2 == 0 {
			nd = drainNative(npool, arrived(npool))
			od = drainOurs(opool, arrived(opool))
		} else {
			od = drainOurs(opool, arrived(opool))
			nd = drainNative(npool, arrived(npool))
		}
		nativeDrains = append(nativeDrains, nd.Seconds())
		oursDrains = append(oursDrains, od.Seconds())
		ratios = append(ratios, nd.Seconds()/od.Seconds())
		fmt.Fprintf(os.Stderr, "bench: drain round %d (%d txns): native %.2f s, cutover %.2f s, ratio %.2f\n", round+1, txns, nd.Seconds(), od.Seconds(), nd.Seconds()/od.Seconds())
	}
	backlogTxns /= rounds
	backlogTPS /= float64(rounds)
	backlogBytes /= uint64(rounds)
	nativeDrain, oursDrain := median(nativeDrains), median(oursDrains)

	// Both greens must hold what blue holds.
	for _, table := range []string{"pgbench_accounts", "pgbench_tellers", "pgbench_branches"} {
		var bs, ns, cs string
		q := `SELECT md5(string_agg(t::text, ',' ORDER BY t::text)) FROM ` + table + ` t`
		_ = bpool.QueryRow(ctx, q).Scan(&bs)
		_ = npool.QueryRow(ctx, q).Scan(&ns)
		_ = opool.QueryRow(ctx, q).Scan(&cs)
		if bs != cs || bs != ns {
			b.Errorf("%s differs: blue %s native %s cutover %s", table, bs, ns, cs)
		}
	}

	if os.Getenv("CUTOVER_BENCH_EXPLAIN") != "" {
		if data, err := os.ReadFile(ours.LogFile); err == nil {
			_ = os.WriteFile("/tmp/cutover-bench-green.log", data, 0o644)
		}
	}
	mb := float64(bytes) / (1 << 20)
	b.ReportMetric(nativeCopy.Seconds(), "native-copy-s")
	b.ReportMetric(oursCopy.Seconds(), "cutover-copy-s")
	b.ReportMetric(nativeCopy.Seconds()/oursCopy.Seconds(), "copy-speedup")
	b.ReportMetric(float64(ns.p99.Milliseconds()), "native-lag-p99-ms")
	b.ReportMetric(float64(os_.p99.Milliseconds()), "cutover-lag-p99-ms")
	b.ReportMetric(float64(nsR.p50.Milliseconds()), "native-rate-lag-p50-ms")
	b.ReportMetric(float64(osR.p50.Milliseconds()), "cutover-rate-lag-p50-ms")
	b.ReportMetric(nativeDrain, "native-drain-s")
	b.ReportMetric(oursDrain, "cutover-drain-s")
	b.ReportMetric(median(ratios), "apply-ceiling-ratio")
	// The summary goes to stderr too: the testing package keeps only the
	// first lines of a benchmark's log.
	summary := fmt.Sprintf(`pgbench scale %d (%.0f MiB of tables), %d clients, %d s per load phase
initial copy:     native %6.2f s (%.1f MiB/s)   cutover %6.2f s (%.1f MiB/s)   cutover is %.2fx native
steady lag:       pgbench flat out, %d txns (%.0f tps) with both replicating
                  native  mean %s p50 %s p99 %s max %s (%d samples)
                  cutover mean %s p50 %s p99 %s max %s (%d samples)
                  pgbench at -R %d, %d txns (%.0f tps)
                  native  mean %s p50 %s p99 %s max %s (%d samples)
                  cutover mean %s p50 %s p99 %s max %s (%d samples)
apply ceiling:    %d rounds, order alternating; backlog per round %d txns (%.0f tps, %.1f MiB of WAL)
                  native  %s s   cutover %s s   ratio %s
                  median: native %6.2f s (%.0f txn/s)   cutover %6.2f s (%.0f txn/s)   cutover is %.2fx native (median of ratios)
status: %+v`,
		scale, mb, clients, seconds,
		nativeCopy.Seconds(), mb/nativeCopy.Seconds(), oursCopy.Seconds(), mb/oursCopy.Seconds(), nativeCopy.Seconds()/oursCopy.Seconds(),
		steadyTxns, steadyTPS,
		ns.mean.Round(time.Millisecond), ns.p50.Round(time.Millisecond), ns.p99.Round(time.Millisecond), ns.mx.Round(time.Millisecond), ns.n,
		os_.mean.Round(time.Millisecond), os_.p50.Round(time.Millisecond), os_.p99.Round(time.Millisecond), os_.mx.Round(time.Millisecond), os_.n,
		rate, rateTxns, rateTPS,
		nsR.mean.Round(time.Millisecond), nsR.p50.Round(time.Millisecond), nsR.p99.Round(time.Millisecond), nsR.mx.Round(time.Millisecond), nsR.n,
		osR.mean.Round(time.Millisecond), osR.p50.Round(time.Millisecond), osR.p99.Round(time.Millisecond), osR.mx.Round(time.Millisecond), osR.n,
		rounds, backlogTxns, backlogTPS, float64(backlogBytes)/(1<<20),
		fmtList(nativeDrains), fmtList(oursDrains), fmtList(ratios),
		nativeDrain, float64(backlogTxns)/nativeDrain, oursDrain, float64(backlogTxns)/oursDrain, median(ratios),
		r.Status())
	b.Log(summary)
	fmt.Fprintln(os.Stderr, summary)
}

// probePause is 25 to 75 ms, at random: with fixed pauses a sampler keeps
// its phase against the probe writer for long stretches, and whichever
// happens to read just before each update shows ~50 ms more lag.
func probePause() time.Duration {
	return 25*time.Millisecond + rand.N(50*time.Millisecond)
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 0 {
		return (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return s[len(s)/2]
}

func fmtList(xs []float64) string {
	var out []string
	for _, x := range xs {
		out = append(out, strconv.FormatFloat(x, 'f', 2, 64))
	}
	return strings.Join(out, " ")
}

func currentLSN(b *testing.B, pool *pgxpool.Pool) uint64 {
	var n int64
	if err := pool.QueryRow(context.Background(), `SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8`).Scan(&n); err != nil {
		b.Fatal(err)
	}
	return uint64(n)
}

// benchGreenSettings turns on auto_explain on cutover's green when
// CUTOVER_BENCH_EXPLAIN is set, to see where apply time goes.
func benchGreenSettings() map[string]string {
	if os.Getenv("CUTOVER_BENCH_EXPLAIN") == "" {
		return nil
	}
	return map[string]string{
		"session_preload_libraries":          "auto_explain",
		"auto_explain.log_min_duration":      "50ms",
		"auto_explain.log_analyze":           "on",
		"auto_explain.log_nested_statements": "on",
	}
}
