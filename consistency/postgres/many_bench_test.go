package postgres

import (
	"context"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/cutover/cutover/consistency"
	"github.com/cutover/cutover/integration"
)

// BenchmarkVerifyManyTables times the per-table overhead of the passes on
// many small tables (three rows each), as a schema of many tables puts it
// on a plan: the online pass over all of them (describe included, as the
// driver runs it), and the dirty pass inside the fence after rows changed
// in two of them (the rest unchanged). Every table is named, as the
// driver names the tables in scope. Table counts come from
// CUTOVER_BENCH_TABLES (comma-separated, default 10,500). Run it alone:
//
//	CUTOVER_BENCH_TABLES=10,500,5000 go test -run '^$' -bench BenchmarkVerifyManyTables -benchtime 5x -timeout 60m ./consistency/postgres/
func BenchmarkVerifyManyTables(b *testing.B) {
	counts := []int{10, 500}
	if s := os.Getenv("CUTOVER_BENCH_TABLES"); s != "" {
		counts = nil
		for _, f := range strings.Split(s, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || n < 2 {
				b.Fatalf("CUTOVER_BENCH_TABLES: %q is not a table count of 2 or more", f)
			}
			counts = append(counts, n)
		}
	}
	for _, n := range counts {
		b.Run(fmt.Sprintf("tables=%d", n), func(b *testing.B) {
			p := manyTablesSetup(b, n)
			ctx := context.Background()
			// The driver logs at Info into a file; JSON into io.Discard
			// keeps the cost of the lines without the disk.
			log := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), zapcore.AddSync(io.Discard), zap.InfoLevel))
			opts := consistency.Options{Parallel: 2, Logger: log}
			// The driver names every table in scope.
			names := make([]string, n)
			for i := range names {
				names[i] = fmt.Sprintf("public.many_%d", i+1)
			}
			b.Run("online", func(b *testing.B) {
				for i := 0; i < b.N; i++ {
					v := consistency.NewVerifier(p.blueDB, p.greenDB, opts)
					rep, err := v.Online(ctx, names, quiet{}, consistency.NewDirtySet(0))
					if err != nil || rep.Verdict != consistency.Equal || rep.Totals.Tables != n {
						b.Fatalf("online: %v %v", rep, err)
					}
				}
			})
			b.Run("dirty", func(b *testing.B) {
				d := consistency.NewDirtySet(0)
				v := consistency.NewVerifier(p.blueDB, p.greenDB, opts)
				if rep, err := v.Online(ctx, names, quiet{}, d); err != nil || rep.Verdict != consistency.Equal {
					b.Fatalf("online: %v %v", rep, err)
				}
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					// Two load tables took writes since the online pass.
					for _, tab := range []string{"public.many_1", "public.many_2"} {
						for k := 1; k <= 3; k++ {
							d.MarkChanged(tab, []string{strconv.Itoa(k)})
						}
					}
					rep, err := v.Dirty(ctx, names, d)
					if err != nil || rep.Verdict != consistency.Equal || rep.Totals.Tables != n || rep.Totals.RowsBlue != 6 {
						b.Fatalf("dirty: %+v %v", rep.Totals, err)
					}
				}
			})
		})
	}
}

// manyTablesSetup starts two servers holding the same n tables
// public.many_1 .. many_n of three rows each.
func manyTablesSetup(b testing.TB, n int) *pair {
	b.Helper()
	ctx := context.Background()
	p := &pair{}
	var wg sync.WaitGroup
	start := time.Now()
	for _, side := range []**integration.Postgres{&p.blue, &p.green} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pg, err := integration.StartPostgres(ctx, integration.PostgresOptions{})
			if err != nil {
				b.Error(err)
				return
			}
			*side = pg
			if err := createManyTables(ctx, pg, 1, n); err != nil {
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
	b.Logf("created %d tables on each side in %v", n, time.Since(start).Round(time.Second))
	for _, x := range []struct {
		dsn string
		out **DB
	}{{p.blue.DSN(), &p.blueDB}, {p.green.DSN(), &p.greenDB}} {
		db, err := Open(ctx, x.dsn, consistency.DefaultParallel+2)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(db.Close)
		*x.out = db
	}
	return p
}

// createManyTables creates public.many_from .. many_to, three rows each,
// 200 tables a transaction (each takes several locks until commit).
func createManyTables(ctx context.Context, pg *integration.Postgres, from, to int) error {
	for lo := from; lo <= to; lo += 200 {
		hi := min(lo+199, to)
		err := pg.Exec(ctx, fmt.Sprintf(`DO $$ BEGIN FOR i IN %d..%d LOOP
			EXECUTE format('CREATE TABLE many_%%s (id int PRIMARY KEY, v text NOT NULL, n bigint)', i);
			EXECUTE format('INSERT INTO many_%%s SELECT g, ''row '' || g, g * 10 FROM generate_series(1, 3) g', i);
			END LOOP; END $$`, lo, hi))
		if err != nil {
			return err
		}
	}
	return pg.Exec(ctx, "ANALYZE")
}
