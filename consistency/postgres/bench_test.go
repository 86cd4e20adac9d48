package postgres

import (
	"context"
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cutover/cutover/consistency"
	"github.com/cutover/cutover/integration"
)

// BenchmarkVerify compares, side by side on the same tables, the rows per
// second of a cutover full pass against whole-table in-database hashing
// (md5 of string_agg in key order; sum(hashtext(row::text)) as pgcopydb's
// compare does) and against COPY ... TO STDOUT hashed with SHA-256 by the
// client, each run on both sides at once as a comparison needs; then the
// time of a dirty pass after 1,000 changed rows with uniformly random keys
// against the full pass. Each figure is the median of benchRounds
// rounds. Run it alone (it takes several minutes on two cores):
//
//	go test -run '^$' -bench BenchmarkVerify -benchtime 1x -timeout 60m ./consistency/postgres/
func BenchmarkVerify(b *testing.B) {
	for _, rows := range []int{1_000_000, 5_000_000} {
		b.Run(fmt.Sprintf("rows=%dM", rows/1_000_000), func(b *testing.B) {
			benchSize(b, rows)
		})
	}
}

const benchTable = `
CREATE TABLE bench (id bigint PRIMARY KEY, account int NOT NULL, amount numeric(12,2) NOT NULL,
	created timestamptz NOT NULL, note text, flag boolean NOT NULL);
INSERT INTO bench SELECT g, g %% 100000, (g %% 1000000) / 100.0,
	'2024-01-01 00:00:00+00'::timestamptz + g * interval '1.5 seconds', 'order ' || md5(g::text), g %% 3 = 0
FROM generate_series(1, %d) g;
`

type benchPair struct {
	blue, green         *integration.Postgres
	bluePool, greenPool *pgxpool.Pool
	blueDB, greenDB     *DB
}

func benchSetup(b testing.TB, rows int) *benchPair {
	b.Helper()
	ctx := context.Background()
	p := &benchPair{}
	var wg sync.WaitGroup
	start := time.Now()
	for _, side := range []**integration.Postgres{&p.blue, &p.green} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pg, err := integration.StartPostgres(ctx, integration.PostgresOptions{Settings: map[string]string{"shared_buffers": "256MB"}})
			if err != nil {
				b.Error(err)
				return
			}
			*side = pg
			if err := pg.Exec(ctx, fmt.Sprintf(benchTable, rows)); err != nil {
				b.Error(err)
				return
			}
			if err := pg.Exec(ctx, "VACUUM (ANALYZE, FREEZE) bench"); err != nil {
				b.Error(err)
				return
			}
			// The load and the freeze leave about the table's size in
			// dirty buffers, and the load's WAL has started a checkpoint
			// spread over minutes: without this, whichever contender runs
			// while it writes (or evicts a dirty buffer) pays for it.
			if err := pg.Exec(ctx, "CHECKPOINT"); err != nil {
				b.Error(err)
			}
		}()
	}
	wg.Wait()
	for _, pg := range []*integration.Postgres{p.blue, p.green} {
		if pg != nil {
			b.Cleanup(func() { _ = pg.Stop(context.Background()) })
		}
	}
	if b.Failed() {
		b.FailNow()
	}
	b.Logf("loaded %d rows on each side in %v", rows, time.Since(start).Round(time.Second))
	var err error
	if p.bluePool, err = pgxpool.New(ctx, p.blue.DSN()); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(p.bluePool.Close)
	if p.greenPool, err = pgxpool.New(ctx, p.green.DSN()); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(p.greenPool.Close)
	for _, x := range []struct {
		dsn string
		out **DB
	}{{p.blue.DSN(), &p.blueDB}, {p.green.DSN(), &p.greenDB}} {
		db, err := Open(ctx, x.dsn, 6)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(db.Close)
		*x.out = db
	}
	return p
}

// onBoth runs f against both sides at once and checks they agree.
func (p *benchPair) onBoth(b *testing.B, f func(ctx context.Context, pool *pgxpool.Pool) (string, error)) time.Duration {
	b.Helper()
	ctx := context.Background()
	var res [2]string
	var errs [2]error
	var wg sync.WaitGroup
	start := time.Now()
	for i, pool := range []*pgxpool.Pool{p.bluePool, p.greenPool} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res[i], errs[i] = f(ctx, pool)
		}()
	}
	wg.Wait()
	took := time.Since(start)
	for _, err := range errs {
		if err != nil {
			b.Fatal(err)
		}
	}
	if res[0] != res[1] {
		b.Fatalf("sides disagree: %s / %s", res[0], res[1])
	}
	return took
}

func scalar(sql string) func(ctx context.Context, pool *pgxpool.Pool) (string, error) {
	return func(ctx context.Context, pool *pgxpool.Pool) (string, error) {
		var s string
		err := pool.QueryRow(ctx, sql).Scan(&s)
		return s, err
	}
}

func copySHA256(ctx context.Context, pool *pgxpool.Pool) (string, error) {
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return "", err
	}
	defer conn.Release()
	// Without this, a seq scan may start where the previous one stopped
	// (synchronized scans), and the two sides' COPY output would be
	// rotated differently: COPY compares only with sync scans off and
	// identical physical layouts, its best case here.
	if _, err := conn.Exec(ctx, "SET synchronize_seqscans = off"); err != nil {
		return "", err
	}
	h := sha256.New()
	if _, err := conn.Conn().PgConn().CopyTo(ctx, h, "COPY bench TO STDOUT"); err != nil {
		return "", err
	}
	return fmt.Sprintf("%x", h.Sum(nil)), nil
}

// benchRounds is how many rounds BenchmarkVerify times (the median
// counts); CUTOVER_BENCH_ROUNDS overrides it.
var benchRounds = func() int {
	if n, err := strconv.Atoi(os.Getenv("CUTOVER_BENCH_ROUNDS")); err == nil && n > 0 {
		return n
	}
	return 5
}()

// quiet is the PositionWaiter of sides that nothing writes.
type quiet struct{}

func (quiet) BluePosition(context.Context) (string, error)   { return "", nil }
func (quiet) WaitGreenApplied(context.Context, string) error { return nil }

func benchSize(b *testing.B, rows int) {
	p := benchSetup(b, rows)
	ctx := context.Background()
	rate := func(d time.Duration) float64 { return float64(rows) / d.Seconds() }
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		// Warm the caches (table and primary key index) so that every
		// method reads from memory.
		p.onBoth(b, scalar(`SELECT count(*)::text FROM bench`))
		p.onBoth(b, scalar(`SELECT count(*)::text FROM bench WHERE id > 0`))

		// Every method runs once per round, in an order rotated by one
		// each round, so none always runs first (or right after the
		// same neighbour); the median of the rounds counts.
		type method struct {
			name string
			run  func() time.Duration
		}
		cutover := func(parallel int) func() time.Duration {
			return func() time.Duration {
				v := consistency.NewVerifier(p.blueDB, p.greenDB, consistency.Options{Parallel: parallel})
				start := time.Now()
				rep, err := v.Full(ctx, []string{"bench"})
				took := time.Since(start)
				if err != nil || rep.Verdict != consistency.Equal || rep.Totals.RowsBlue != int64(rows) {
					b.Fatalf("verify: %v %v", rep, err)
				}
				return took
			}
		}
		methods := []method{
			{"md5_string_agg", func() time.Duration {
				return p.onBoth(b, scalar(`SELECT md5(string_agg(t::text, '' ORDER BY id)) FROM bench t`))
			}},
			{"sum_hashtext", func() time.Duration {
				return p.onBoth(b, scalar(`SELECT sum(hashtext(t::text))::text FROM bench t`))
			}},
			{"copy_sha256", func() time.Duration { return p.onBoth(b, copySHA256) }},
			{"cutover_full_parallel1", cutover(1)},
			{"cutover_full_parallel2", cutover(2)},
		}
		times := make(map[string][]time.Duration)
		for round := 0; round < benchRounds; round++ {
			for j := range methods {
				m := methods[(round+j)%len(methods)]
				times[m.name] = append(times[m.name], m.run())
			}
		}
		results := make(map[string]time.Duration)
		for name, ds := range times {
			results[name] = slices.Sorted(slices.Values(ds))[len(ds)/2]
		}
		var full time.Duration

		// The fence scenario: an online pass (here on quiet sides)
		// records the walk; 1,000 rows then change at uniformly random
		// keys, reported by the stream; the dirty pass re-checks them.
		d := consistency.NewDirtySet(0)
		v := consistency.NewVerifier(p.blueDB, p.greenDB, consistency.Options{Parallel: 1})
		start := time.Now()
		if rep, err := v.Online(ctx, []string{"bench"}, quiet{}, d); err != nil || rep.Verdict != consistency.Equal {
			b.Fatalf("online: %v %v", rep, err)
		}
		full = time.Since(start)
		r := rand.New(rand.NewPCG(uint64(rows), 42))
		keys := make([]int64, 1000)
		for j := range keys {
			keys[j] = int64(r.IntN(rows)) + 1
		}
		for _, pool := range []*pgxpool.Pool{p.bluePool, p.greenPool} {
			if _, err := pool.Exec(ctx, `UPDATE bench SET amount = amount + 1 WHERE id = ANY($1)`, keys); err != nil {
				b.Fatal(err)
			}
		}
		for _, k := range keys {
			d.MarkChanged("public.bench", []string{strconv.FormatInt(k, 10)})
		}
		start = time.Now()
		rep, err := v.Dirty(ctx, []string{"bench"}, d)
		dirty := time.Since(start)
		if err != nil || rep.Verdict != consistency.Equal {
			b.Fatalf("dirty: %v %v", rep, err)
		}

		for _, name := range []string{"md5_string_agg", "sum_hashtext", "copy_sha256", "cutover_full_parallel1", "cutover_full_parallel2"} {
			b.ReportMetric(rate(results[name]), name+"_rows/s")
			var rounds []string
			for _, d := range times[name] {
				rounds = append(rounds, strconv.FormatFloat(d.Seconds(), 'f', 2, 64))
			}
			// Few lines: go test cuts a benchmark's log after ten.
			b.Logf("%-24s median %6.2fs %10.0f rows/s (rounds %s s)", name, results[name].Seconds(), rate(results[name]), strings.Join(rounds, " "))
		}
		b.ReportMetric(full.Seconds(), "online_full_s")
		b.ReportMetric(dirty.Seconds()*1000, "dirty_1000_ms")
		b.ReportMetric(full.Seconds()/dirty.Seconds(), "full/dirty")
		b.Logf("online full pass %v, dirty pass after 1,000 changed rows %v (%d rows compared): %.0fx faster",
			full.Round(time.Millisecond), dirty.Round(time.Millisecond), rep.Totals.RowsBlue, full.Seconds()/dirty.Seconds())
	}
}

// BenchmarkVerifyKeyLess compares the rows per second of a full pass over
// a key-less table (a multiset of row hashes, see MultisetHasher) with a
// full pass over the same rows under a primary key, both with Parallel 2
// (median of 3 rounds each, alternating), on 1M rows; then times naming a
// changed row of the key-less table (bisection included). Run it alone:
//
//	go test -run '^$' -bench BenchmarkVerifyKeyLess -benchtime 1x -timeout 30m ./consistency/postgres/
func BenchmarkVerifyKeyLess(b *testing.B) {
	const rows = 1_000_000
	p := benchSetup(b, rows)
	ctx := context.Background()
	for _, pg := range []*integration.Postgres{p.blue, p.green} {
		for _, sql := range []string{"CREATE TABLE bench_heap AS SELECT * FROM bench ORDER BY id", "VACUUM (ANALYZE, FREEZE) bench_heap", "CHECKPOINT"} {
			if err := pg.Exec(ctx, sql); err != nil {
				b.Fatal(err)
			}
		}
	}
	// Parallel 2 and its connections, as `cutover verify` opens them.
	var dbs [2]*DB
	for i, pg := range []*integration.Postgres{p.blue, p.green} {
		db, err := Open(ctx, pg.DSN(), consistency.DefaultParallel+2)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(db.Close)
		dbs[i] = db
	}
	full := func(table string, want consistency.Verdict) (time.Duration, *consistency.Report) {
		v := consistency.NewVerifier(dbs[0], dbs[1], consistency.Options{Parallel: consistency.DefaultParallel})
		start := time.Now()
		rep, err := v.Full(ctx, []string{table})
		took := time.Since(start)
		if err != nil || rep.Verdict != want || rep.Totals.RowsBlue != rows {
			b.Fatalf("verify %s: %v %v", table, rep, err)
		}
		return took, rep
	}
	rate := func(d time.Duration) float64 { return float64(rows) / d.Seconds() }
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		p.onBoth(b, scalar(`SELECT count(*)::text FROM bench`))
		p.onBoth(b, scalar(`SELECT count(*)::text FROM bench_heap`))
		times := map[string][]time.Duration{}
		for round := 0; round < 3; round++ {
			order := []string{"bench", "bench_heap"}
			if round%2 == 1 {
				slices.Reverse(order)
			}
			for _, table := range order {
				d, _ := full(table, consistency.Equal)
				times[table] = append(times[table], d)
			}
		}
		keyed := slices.Sorted(slices.Values(times["bench"]))[1]
		keyLess := slices.Sorted(slices.Values(times["bench_heap"]))[1]
		b.ReportMetric(rate(keyed), "keyed_rows/s")
		b.ReportMetric(rate(keyLess), "keyless_rows/s")
		b.Logf("full pass over %d rows: keyed %v (%.0f rows/s), key-less %v (%.0f rows/s)",
			rows, keyed.Round(time.Millisecond), rate(keyed), keyLess.Round(time.Millisecond), rate(keyLess))

		if _, err := p.greenPool.Exec(ctx, `UPDATE bench_heap SET note = 'changed' WHERE id = 424242`); err != nil {
			b.Fatal(err)
		}
		d, rep := full("bench_heap", consistency.Different)
		if _, err := p.greenPool.Exec(ctx, `UPDATE bench_heap SET note = 'order ' || md5(id::text) WHERE id = 424242`); err != nil {
			b.Fatal(err)
		}
		tab := rep.Tables[0]
		if tab.DifferenceCount != 1 || tab.Differences[0].Kind != consistency.Changed {
			b.Fatalf("differences %+v", tab.Differences)
		}
		b.ReportMetric(d.Seconds(), "keyless_one_changed_row_s")
		b.Logf("key-less, one changed row: named in %v (%d buckets, %d levels of bisection)", d.Round(time.Millisecond), tab.Chunks, tab.BisectLevels)
	}
}
