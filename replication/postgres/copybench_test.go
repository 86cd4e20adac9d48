package postgres

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"

	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/internal/config"
)

// copyBenchSchema is the table BenchmarkInitialCopy copies: a key, a
// secondary index on a column whose order is unrelated to the key's, and
// a mix of types.
const copyBenchSchema = `
CREATE TABLE copy_bench (
	id      bigint PRIMARY KEY,
	account int NOT NULL,
	amount  numeric(12,2) NOT NULL,
	note    text,
	created timestamptz NOT NULL
);
CREATE INDEX copy_bench_account ON copy_bench (account);`

// copyVariant is a configuration of cutover's copy, for the table of what
// each step buys.
type copyVariant struct {
	name  string
	apply func(*Options)
}

var copySteps = []copyVariant{
	{"text, one COPY per table, indexes maintained", func(o *Options) {
		o.copySplitBytes, o.copyNoDefer, o.copyNoBinary, o.copyNoFreeze = 1<<62, true, true, true
	}},
	{"+ split across workers", func(o *Options) { o.copyNoDefer, o.copyNoBinary, o.copyNoFreeze = true, true, true }},
	{"+ indexes and keys deferred", func(o *Options) { o.copyNoBinary, o.copyNoFreeze = true, true }},
	{"+ binary", func(o *Options) { o.copyNoFreeze = true }},
	{"+ FREEZE (all steps)", func(o *Options) {}},
}

// BenchmarkInitialCopy compares initial copies of one table with a
// secondary index, at each size, in one run on the same machine: native
// logical replication's initial sync (CREATE SUBSCRIPTION into a green
// that has the table and its indexes, until the table is ready), cutover's
// copy (Start until streaming, slot and index builds included), and
// pgcopydb clone (into an empty green: it restores the schema, copies,
// builds indexes and constraints, and vacuums; skipped with a message when
// pgcopydb is not installed: apt-get install pgcopydb). Each run gives
// every contender a fresh database; the order rotates between runs; the
// figures are medians.
//
//	flock /tmp/cutover-bench.lock go test -run '^$' -bench InitialCopy -benchtime 1x -timeout 60m ./replication/postgres/
//
// CUTOVER_BENCH_COPY_ROWS (comma-separated sizes, default
// 1000000,5000000), CUTOVER_BENCH_COPY_RUNS (default 3),
// CUTOVER_BENCH_COPY_JOBS (workers for cutover and pgcopydb, default 2),
// CUTOVER_BENCH_COPY_STEPS=1 also times cutover with its steps turned on
// one at a time, at the first size.
func BenchmarkInitialCopy(b *testing.B) {
	sizes := []int{1000000, 5000000}
	if v := os.Getenv("CUTOVER_BENCH_COPY_ROWS"); v != "" {
		sizes = nil
		for _, f := range strings.Split(v, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || n <= 0 {
				b.Fatalf("CUTOVER_BENCH_COPY_ROWS: %q is not a row count", f)
			}
			sizes = append(sizes, n)
		}
	}
	runs := envInt("CUTOVER_BENCH_COPY_RUNS", 3)
	jobs := envInt("CUTOVER_BENCH_COPY_JOBS", 2)
	pgcopydb, _ := exec.LookPath("pgcopydb")
	if pgcopydb == "" {
		fmt.Fprintln(os.Stderr, "bench: pgcopydb not installed (apt-get install pgcopydb): compared with native only")
	}
	var summary []string
	for i := 0; i < b.N; i++ {
		for si, rows := range sizes {
			summary = append(summary, runCopyBench(b, rows, runs, jobs, pgcopydb, si == 0 && os.Getenv("CUTOVER_BENCH_COPY_STEPS") != ""))
		}
	}
	out := strings.Join(summary, "\n")
	b.Log(out)
	fmt.Fprintln(os.Stderr, out)
}

func runCopyBench(b *testing.B, rows, runs, jobs int, pgcopydb string, steps bool) string {
	ctx := context.Background()
	blue := integration.NewPostgres(b, integration.PostgresOptions{})
	native := integration.NewPostgres(b, integration.PostgresOptions{})
	ours := integration.NewPostgres(b, integration.PostgresOptions{})
	var other *integration.Postgres
	if pgcopydb != "" {
		other = integration.NewPostgres(b, integration.PostgresOptions{})
	}
	mustExec(b, blue, copyBenchSchema)
	mustExec(b, blue, fmt.Sprintf(`INSERT INTO copy_bench SELECT g, (g::int8 * 7919) %% 100000, (g %% 100000) / 100.0, 'note ' || md5(g::text),
		'2026-01-01'::timestamptz + g * interval '1 second' FROM generate_series(1, %d) g`, rows))
	mustExec(b, blue, `VACUUM ANALYZE copy_bench`)
	var tableBytes int64
	bconn, err := pgx.Connect(ctx, blue.DSN())
	if err != nil {
		b.Fatal(err)
	}
	defer bconn.Close(ctx)
	if err := bconn.QueryRow(ctx, `SELECT pg_table_size('copy_bench')`).Scan(&tableBytes); err != nil {
		b.Fatal(err)
	}
	var checksum string
	sumSQL := `SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM copy_bench t`
	if err := bconn.QueryRow(ctx, sumSQL).Scan(&checksum); err != nil {
		b.Fatal(err)
	}
	check := func(pg *integration.Postgres, db, who string) {
		conn, err := pgx.Connect(ctx, pg.DSNFor(db, "postgres", ""))
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close(ctx)
		var sum string
		var indexes int
		if err := conn.QueryRow(ctx, sumSQL).Scan(&sum); err != nil {
			b.Fatal(err)
		}
		if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_indexes WHERE tablename = 'copy_bench'`).Scan(&indexes); err != nil {
			b.Fatal(err)
		}
		if sum != checksum || indexes != 2 {
			b.Fatalf("%s: copy differs from blue (checksum %s vs %s, %d indexes)", who, sum, checksum, indexes)
		}
	}
	newDB := func(pg *integration.Postgres, db string, schema bool) {
		mustExec(b, pg, `CREATE DATABASE `+db)
		if schema {
			conn, err := pgx.Connect(ctx, pg.DSNFor(db, "postgres", ""))
			if err != nil {
				b.Fatal(err)
			}
			defer conn.Close(ctx)
			if _, err := conn.Exec(ctx, copyBenchSchema); err != nil {
				b.Fatal(err)
			}
		}
	}
	dropDB := func(pg *integration.Postgres, db string) {
		mustExec(b, pg, `DROP DATABASE IF EXISTS `+db+` WITH (FORCE)`)
	}
	mustExec(b, blue, `CREATE PUBLICATION bench_copy_pub FOR TABLE copy_bench`)

	runNative := func(run int) time.Duration {
		db := fmt.Sprintf("native_%d", run)
		newDB(native, db, true)
		conn, err := pgx.Connect(ctx, native.DSNFor(db, "postgres", ""))
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close(ctx)
		sub := fmt.Sprintf("bench_copy_sub_%d", run)
		start := time.Now()
		if _, err := conn.Exec(ctx, fmt.Sprintf(`CREATE SUBSCRIPTION %s CONNECTION %s PUBLICATION bench_copy_pub`, sub, quoteLiteral(blue.DSN()))); err != nil {
			b.Fatal(err)
		}
		waitFor(b, "native initial sync", 30*time.Minute, func() bool {
			var ready bool
			err := conn.QueryRow(ctx, `SELECT count(*) = 1 AND bool_and(srsubstate = 'r') FROM pg_subscription_rel`).Scan(&ready)
			return err == nil && ready
		})
		d := time.Since(start)
		check(native, db, "native")
		if _, err := conn.Exec(ctx, `DROP SUBSCRIPTION `+sub); err != nil {
			b.Fatal(err)
		}
		conn.Close(ctx)
		dropDB(native, db)
		return d
	}
	runOurs := func(run int, v copyVariant) (time.Duration, copyStats) {
		db := fmt.Sprintf("ours_%d", run)
		newDB(ours, db, true)
		log := zap.NewNop()
		if path := os.Getenv("CUTOVER_BENCH_LOG"); path != "" {
			cfg := zap.NewDevelopmentConfig()
			cfg.OutputPaths = []string{path}
			log, _ = cfg.Build()
		}
		opts := Options{Plan: fmt.Sprintf("copybench%d", run), Logger: log, CopyParallel: jobs,
			Pair: config.Pair{Name: "db", Engine: config.Postgres,
				Blue: config.Endpoint{DSN: config.DSN(blue.DSN())}, Green: config.Endpoint{DSN: config.DSN(ours.DSNFor(db, "postgres", ""))}}}
		v.apply(&opts)
		r, err := New(opts)
		if err != nil {
			b.Fatal(err)
		}
		rctx, cancel := context.WithCancel(ctx)
		defer cancel()
		start := time.Now()
		if err := r.Start(rctx); err != nil {
			b.Fatal(err)
		}
		waitFor(b, "cutover initial copy ("+v.name+")", 30*time.Minute, func() bool {
			if err := r.Err(); err != nil {
				b.Fatal(err)
			}
			return r.Status().Phase == PhaseStreaming
		})
		d := time.Since(start)
		st := r.lastCopyStats()
		fmt.Fprintf(os.Stderr, "bench: cutover (%s): %.2f s: data %.2f s, %d index builds %.2f s\n", v.name, d.Seconds(), st.Data.Seconds(), st.IndexesBuilt, st.Indexes.Seconds())
		check(ours, db, "cutover")
		if err := r.Cleanup(ctx); err != nil {
			b.Fatal(err)
		}
		dropDB(ours, db)
		return d, st
	}
	runPgcopydb := func(run int) time.Duration {
		db := fmt.Sprintf("pgcopydb_%d", run)
		newDB(other, db, false)
		dir := b.TempDir()
		filters := filepath.Join(dir, "filters.ini")
		if err := os.WriteFile(filters, []byte("[include-only-table]\npublic.copy_bench\n"), 0o644); err != nil {
			b.Fatal(err)
		}
		cmd := exec.Command(pgcopydb, "clone", "--source", blue.DSN(), "--target", other.DSNFor(db, "postgres", ""),
			"--dir", filepath.Join(dir, "work"), "--table-jobs", strconv.Itoa(jobs), "--index-jobs", strconv.Itoa(jobs),
			"--split-tables-larger-than", "32MB", "--filters", filters, "--no-owner", "--no-acl")
		cmd.Env = append(os.Environ(), "PATH="+pgBinDir()+":"+os.Getenv("PATH"))
		start := time.Now()
		if out, err := cmd.CombinedOutput(); err != nil {
			b.Fatalf("pgcopydb clone: %v\n%s", err, out)
		}
		d := time.Since(start)
		check(other, db, "pgcopydb")
		dropDB(other, db)
		return d
	}

	var nat, our, pcd []float64
	stepTimes := make([][]float64, len(copySteps))
	var dataSecs, indexSecs []float64
	full := copySteps[len(copySteps)-1]
	for run := 0; run < runs; run++ {
		contenders := []func(){
			func() { nat = append(nat, runNative(run).Seconds()) },
			func() {
				d, st := runOurs(run, full)
				our = append(our, d.Seconds())
				dataSecs, indexSecs = append(dataSecs, st.Data.Seconds()), append(indexSecs, st.Indexes.Seconds())
			},
		}
		if pgcopydb != "" {
			contenders = append(contenders, func() { pcd = append(pcd, runPgcopydb(run).Seconds()) })
		}
		for k := range contenders {
			contenders[(k+run)%len(contenders)]()
		}
		if steps {
			for i, v := range copySteps {
				d, _ := runOurs(100+run*10+i, v)
				stepTimes[i] = append(stepTimes[i], d.Seconds())
			}
		}
		fmt.Fprintf(os.Stderr, "bench: %d rows, run %d: native %.2f s, cutover %.2f s, pgcopydb %s s\n", rows, run+1, nat[run], our[run], fmtList(pcd[min(run, len(pcd)):]))
	}
	mb := float64(tableBytes) / (1 << 20)
	s := fmt.Sprintf(`initial copy of %d rows (%.0f MiB table, a primary key and a secondary index), %d runs, %d workers, medians:
  native initial sync %6.2f s  (runs %s)
  cutover             %6.2f s  (runs %s; data %.2f s + index builds %.2f s)   %.2fx native`,
		rows, mb, runs, jobs, median(nat), fmtList(nat), median(our), fmtList(our), median(dataSecs), median(indexSecs), median(nat)/median(our))
	if len(pcd) > 0 {
		s += fmt.Sprintf("\n  pgcopydb clone      %6.2f s  (runs %s)   cutover is %.2fx pgcopydb", median(pcd), fmtList(pcd), median(pcd)/median(our))
	}
	if steps {
		s += "\n  cutover, step by step:"
		for i, v := range copySteps {
			s += fmt.Sprintf("\n    %-48s %6.2f s  (runs %s)", v.name, median(stepTimes[i]), fmtList(stepTimes[i]))
		}
	}
	b.ReportMetric(median(nat)/median(our), fmt.Sprintf("copy-vs-native-%d", rows))
	if len(pcd) > 0 {
		b.ReportMetric(median(pcd)/median(our), fmt.Sprintf("copy-vs-pgcopydb-%d", rows))
	}
	return s
}

// pgBinDir is where pg_dump and pg_restore are, for pgcopydb.
func pgBinDir() string {
	matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin/pg_dump")
	if len(matches) == 0 {
		return "/usr/bin"
	}
	return filepath.Dir(matches[len(matches)-1])
}
