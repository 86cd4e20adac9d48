package postgres

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/internal/config"
)

// pairEnv is a blue and a green server with the same application schema.
type pairEnv struct {
	blue, green *integration.Postgres
	pair        config.Pair
	plan        string
}

func newPairEnv(t *testing.T, schema string) *pairEnv {
	t.Helper()
	if testing.Short() {
		t.Skip("needs PostgreSQL servers")
	}
	blue := integration.NewPostgres(t, integration.PostgresOptions{})
	green := integration.NewPostgres(t, integration.PostgresOptions{})
	ctx := context.Background()
	if schema != "" {
		for _, s := range []*integration.Postgres{blue, green} {
			if err := s.Exec(ctx, schema); err != nil {
				t.Fatalf("create schema: %v", err)
			}
		}
	}
	name := strings.ToLower(strings.NewReplacer("/", "_", " ", "_").Replace(t.Name()))
	if len(name) > 20 {
		name = name[len(name)-20:]
	}
	return &pairEnv{
		blue: blue, green: green, plan: "p" + name,
		pair: config.Pair{Name: "db", Engine: config.Postgres,
			Blue:  config.Endpoint{DSN: config.DSN(blue.DSN())},
			Green: config.Endpoint{DSN: config.DSN(green.DSN())}},
	}
}

func (e *pairEnv) options(t testing.TB) Options {
	return Options{Plan: e.plan, Pair: e.pair, Logger: testLogger(t), StatusInterval: 200 * time.Millisecond}
}

func testLogger(t testing.TB) *zap.Logger {
	if os.Getenv("CUTOVER_TEST_LOG") != "" {
		return zaptest.NewLogger(t)
	}
	return zap.NewNop()
}

// start starts a replicator and stops it at the end of the test.
func (e *pairEnv) start(t *testing.T, opts Options) *Replicator {
	t.Helper()
	r, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	// The context bounds the replicator's whole life, as leadership would.
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if err := r.Start(ctx); err != nil {
		t.Fatalf("start: %v", err)
	}
	t.Cleanup(func() { _ = r.Stop(context.Background()) })
	return r
}

func (e *pairEnv) exec(t testing.TB, s *integration.Postgres, sql string, args ...any) {
	t.Helper()
	if err := s.Exec(context.Background(), sql, args...); err != nil {
		t.Fatalf("exec %q: %v", sql, err)
	}
}

// sync writes a marker on blue and waits until green has applied it.
//
// A backlog left by a load on a starved machine (the race detector, other
// packages' tests beside) can take long to apply: it waits as long as green
// keeps applying, and fails after 60 s without progress (a stall) or 5 min
// in all.
func (e *pairEnv) sync(t testing.TB, r *Replicator) pglogrepl.LSN {
	t.Helper()
	nonce := randomNonce()
	e.exec(t, e.blue, `INSERT INTO cutover.markers (nonce, plan, epoch) VALUES ($1, $2, 1)`, nonce, e.plan)
	start := time.Now()
	progressAt, applied := start, r.Applied()
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		lsn, err := r.WaitMarker(ctx, nonce)
		cancel()
		if err == nil {
			if took := time.Since(start); took > 5*time.Second {
				t.Logf("green took %s to apply the backlog", took.Round(time.Millisecond))
			}
			return lsn
		}
		if !errors.Is(err, context.DeadlineExceeded) || r.Err() != nil {
			t.Fatalf("wait marker: %v (replicator err: %v)", err, r.Err())
		}
		if now := r.Applied(); now > applied {
			progressAt, applied = time.Now(), now
		}
		if time.Since(progressAt) > 60*time.Second || time.Since(start) > 5*time.Minute {
			t.Fatalf("wait marker: green applied nothing for %s (at %s after %s; status %+v)", time.Since(progressAt).Round(time.Second), applied, time.Since(start).Round(time.Second), r.Status())
		}
	}
}

func randomNonce() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// rows returns every row of table as text, sorted.
func rows(t testing.TB, s *integration.Postgres, table string) []string {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, s.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "SET extra_float_digits = 3; SET TimeZone = 'UTC'; SET DateStyle = ISO; SET IntervalStyle = postgres"); err != nil {
		t.Fatal(err)
	}
	rs, err := conn.Query(ctx, `SELECT cutover_row::text FROM `+table+` AS cutover_row`)
	if err != nil {
		t.Fatalf("read %s: %v", table, err)
	}
	out, err := pgx.CollectRows(rs, pgx.RowTo[string])
	if err != nil {
		t.Fatalf("read %s: %v", table, err)
	}
	slices.Sort(out)
	return out
}

// requireSame fails unless table holds the same rows on both sides.
func (e *pairEnv) requireSame(t testing.TB, tables ...string) {
	t.Helper()
	for _, table := range tables {
		b, g := rows(t, e.blue, table), rows(t, e.green, table)
		if !slices.Equal(b, g) {
			t.Errorf("%s differs: blue has %d rows, green %d", table, len(b), len(g))
			bs, gs := map[string]bool{}, map[string]bool{}
			for _, r := range b {
				bs[r] = true
			}
			for _, r := range g {
				gs[r] = true
			}
			shown := 0
			for _, r := range b {
				if !gs[r] && shown < 5 {
					t.Errorf("  only on blue:  %.300s", r)
					shown++
				}
			}
			shown = 0
			for _, r := range g {
				if !bs[r] && shown < 5 {
					t.Errorf("  only on green: %.300s", r)
					shown++
				}
			}
		}
	}
}

func count(t testing.TB, s *integration.Postgres, table string) int64 {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, s.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var n int64
	if err := conn.QueryRow(ctx, fmt.Sprintf(`SELECT count(*) FROM %s`, table)).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}
