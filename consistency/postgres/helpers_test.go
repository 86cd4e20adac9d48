package postgres

import (
	"context"
	"io"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/cutover/cutover/consistency"
	"github.com/cutover/cutover/integration"
)

// pair is a blue and a green server with consistency engines on both.
type pair struct {
	blue, green     *integration.Postgres
	blueDB, greenDB *DB
}

// newPair starts two servers at once (each start takes about a second).
func newPair(t *testing.T, blueOpts, greenOpts integration.PostgresOptions) *pair {
	t.Helper()
	if testing.Short() {
		t.Skip("needs PostgreSQL servers")
	}
	p := &pair{}
	var wg sync.WaitGroup
	var errs [2]error
	start := func(i int, opts integration.PostgresOptions, out **integration.Postgres) {
		defer wg.Done()
		pg, err := integration.StartPostgres(context.Background(), opts)
		if err != nil {
			errs[i] = err
			return
		}
		*out = pg
	}
	wg.Add(2)
	go start(0, blueOpts, &p.blue)
	go start(1, greenOpts, &p.green)
	wg.Wait()
	for _, pg := range []*integration.Postgres{p.blue, p.green} {
		if pg != nil {
			t.Cleanup(func() { _ = pg.Stop(context.Background()) })
		}
	}
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	p.blueDB = openDB(t, p.blue.DSN())
	p.greenDB = openDB(t, p.green.DSN())
	return p
}

func openDB(t *testing.T, dsn string) *DB {
	t.Helper()
	db, err := Open(context.Background(), dsn, 6)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(db.Close)
	return db
}

// both runs sql on both servers.
func (p *pair) both(t *testing.T, sql string) {
	t.Helper()
	for _, pg := range []*integration.Postgres{p.blue, p.green} {
		if err := pg.Exec(context.Background(), sql); err != nil {
			t.Fatal(err)
		}
	}
}

func exec(t *testing.T, pg *integration.Postgres, sql string) {
	t.Helper()
	if err := pg.Exec(context.Background(), sql); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

// copyTable copies a table from blue to green exactly (binary COPY), as
// an initial copy would, whatever either server's settings.
func (p *pair) copyTable(t *testing.T, table string) {
	t.Helper()
	ctx := context.Background()
	src, err := pgx.Connect(ctx, p.blue.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close(ctx)
	dst, err := pgx.Connect(ctx, p.green.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close(ctx)
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		_, err := src.PgConn().CopyTo(ctx, pw, "COPY "+table+" TO STDOUT (FORMAT binary)")
		pw.CloseWithError(err)
		done <- err
	}()
	if _, err := dst.PgConn().CopyFrom(ctx, pr, "COPY "+table+" FROM STDIN (FORMAT binary)"); err != nil {
		pr.CloseWithError(err)
		<-done
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// smallChunks makes chunks of exactly n rows (adaptation off), so that
// small tables have a first, middle and last chunk.
func smallChunks(n int64) consistency.Options {
	return consistency.Options{InitialChunkRows: n, MinChunkRows: n, MaxChunkRows: n, Parallel: 2}
}

func (p *pair) verify(t *testing.T, opts consistency.Options, tables ...string) *consistency.Report {
	t.Helper()
	v := consistency.NewVerifier(p.blueDB, p.greenDB, opts)
	rep, err := v.Full(context.Background(), tables)
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

// diffs returns all differences of a report.
func diffs(rep *consistency.Report) []consistency.Difference {
	var out []consistency.Difference
	for _, t := range rep.Tables {
		out = append(out, t.Differences...)
	}
	return out
}

func tableErrors(rep *consistency.Report) []string {
	out := append([]string(nil), rep.Errors...)
	for _, t := range rep.Tables {
		if t.Error != "" {
			out = append(out, t.Name+": "+t.Error)
		}
		out = append(out, t.Schema...)
	}
	return out
}

func connect(t *testing.T, dsn string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	return conn
}
