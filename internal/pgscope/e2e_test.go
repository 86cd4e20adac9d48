package pgscope_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cutover/cutover/consistency"
	cpg "github.com/cutover/cutover/consistency/postgres"
	fpg "github.com/cutover/cutover/fencing/postgres"
	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/internal/pgscope"
	rpg "github.com/cutover/cutover/replication/postgres"
)

// partitionedSQL is an application with a partitioned table of two levels
// a mixed-case table beside its lower-case namesake, and a table whose
// name holds a dot.
const partitionedSQL = `
DO $$ BEGIN CREATE ROLE app LOGIN PASSWORD 'app-password'; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
CREATE TABLE public.events (id int, at date, region text, note text, PRIMARY KEY (id, at, region)) PARTITION BY RANGE (at);
CREATE TABLE public.events_2025 PARTITION OF public.events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01') PARTITION BY LIST (region);
CREATE TABLE public.events_2025_eu PARTITION OF public.events_2025 FOR VALUES IN ('eu');
CREATE TABLE public.events_2025_us PARTITION OF public.events_2025 FOR VALUES IN ('us');
CREATE TABLE public.events_2026 PARTITION OF public.events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE TABLE public."Orders" (id int PRIMARY KEY, total int);
CREATE TABLE public.orders (id int PRIMARY KEY, total int);
CREATE TABLE public."odd.name" (id int PRIMARY KEY);
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO app;
`

func TestAPartitionedAndAMixedCaseTableAreReplicatedFencedAndVerified(t *testing.T) {
	ctx := context.Background()
	blue := integration.NewPostgres(t, integration.PostgresOptions{})
	green := integration.NewPostgres(t, integration.PostgresOptions{})
	for _, s := range []*integration.Postgres{blue, green} {
		if err := s.Exec(ctx, partitionedSQL); err != nil {
			t.Fatal(err)
		}
	}
	mustExec(t, blue, `INSERT INTO events VALUES (1, '2025-03-01', 'eu', 'a'), (2, '2025-04-01', 'us', 'b'), (3, '2026-05-01', 'eu', 'c');
		INSERT INTO "Orders" VALUES (1, 10), (2, 20); INSERT INTO orders VALUES (1, 99)`)
	scope := config.Scope{Tables: []string{"public.events", "Orders", `public."odd.name"`}}
	pair := config.Pair{Name: "db", Engine: config.Postgres, Scope: scope,
		Blue: config.Endpoint{DSN: config.DSN(blue.DSN())}, Green: config.Endpoint{DSN: config.DSN(green.DSN())}}
	bluePool := pool(t, blue.DSN())
	set, err := pgscope.Resolve(ctx, bluePool, scope)
	if err != nil {
		t.Fatal(err)
	}

	// Replicated: the copy, then rows written through the parent and
	// straight into a partition of the second level.
	r, err := rpg.New(rpg.Options{Plan: "parts", Pair: pair, Epoch: 1, StatusInterval: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if err := r.Start(rctx); err != nil {
		t.Fatalf("start replication: %v", err)
	}
	t.Cleanup(func() { _ = r.Cleanup(context.Background()) })
	waitStreaming(t, r)
	mustExec(t, blue, `INSERT INTO events VALUES (4, '2025-06-01', 'eu', 'via parent'), (5, '2026-06-01', 'us', 'via parent');
		INSERT INTO events_2025_us VALUES (6, '2025-07-01', 'us', 'into a partition');
		UPDATE events_2026 SET note = 'updated in a partition' WHERE id = 3;
		INSERT INTO "Orders" VALUES (3, 30); INSERT INTO "odd.name" VALUES (1)`)
	waitApplied(t, blue, r)
	var n int
	if err := pool(t, green.DSN()).QueryRow(ctx, `SELECT (SELECT count(*) FROM events) * 1000 + (SELECT count(*) FROM "Orders") * 100 + (SELECT count(*) FROM orders) * 10 + (SELECT count(*) FROM "odd.name")`).Scan(&n); err != nil || n != 6301 {
		t.Fatalf("green holds %d (events*1000 + Orders*100 + orders*10 + odd.name), want 6301: %v", n, err)
	}

	// Verified: equal, then a difference in a partition is found under
	// the partitioned table.
	verify := func() *consistency.Report {
		t.Helper()
		b, err := cpg.Open(ctx, blue.DSN(), 4)
		if err != nil {
			t.Fatal(err)
		}
		defer b.Close()
		g, err := cpg.Open(ctx, green.DSN(), 4)
		if err != nil {
			t.Fatal(err)
		}
		defer g.Close()
		rep, err := consistency.NewVerifier(b, g, consistency.Options{Parallel: 2}).Full(ctx, pgscope.Names(set.Roots()))
		if err != nil {
			t.Fatalf("verify: %v", err)
		}
		return rep
	}
	if rep := verify(); rep.Verdict != consistency.Equal || len(rep.Tables) != 3 {
		t.Fatalf("verdict %s over %d tables, want equal over 3", rep.Verdict, len(rep.Tables))
	}

	// Fenced: every table in scope, partitions included, refuses the
	// application's writes, whichever way they are addressed.
	f := fpg.New(pool(t, blue.DSN()), fpg.Options{Plan: "parts", Pair: "db", Tables: pgscope.Idents(set.All()), Roles: []string{"app"}})
	if err := f.Prepare(ctx); err != nil {
		t.Fatalf("fence prepare: %v", err)
	}
	if err := f.Fence(ctx, 2); err != nil {
		t.Fatalf("fence: %v", err)
	}
	app := connect(t, blue.DSNFor("cutover", "app", "app-password"))
	for _, sql := range []string{
		`INSERT INTO events VALUES (10, '2025-03-02', 'eu', 'x')`,
		`INSERT INTO events_2025_eu VALUES (11, '2025-03-02', 'eu', 'x')`,
		`UPDATE events_2026 SET note = 'x'`,
		`INSERT INTO "Orders" VALUES (10, 1)`,
		`INSERT INTO "odd.name" VALUES (10)`,
	} {
		_, err := app.Exec(ctx, sql)
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pgErr.Code != "42501" {
			t.Errorf("after the fence %s: err = %v, want permission denied", sql, err)
		}
	}
	// The lower-case namesake is out of scope and stays writable.
	if _, err := app.Exec(ctx, `INSERT INTO orders VALUES (10, 1)`); err != nil {
		t.Errorf("orders (out of scope) was fenced too: %v", err)
	}
	if err := f.Unfence(ctx, 3); err != nil {
		t.Fatalf("unfence: %v", err)
	}
	if _, err := app.Exec(ctx, `INSERT INTO events_2025_eu VALUES (12, '2025-03-03', 'eu', 'after unfence')`); err != nil {
		t.Errorf("unfenced partition refuses a write: %v", err)
	}
	waitApplied(t, blue, r)

	mustExec(t, green, `UPDATE events_2025_us SET note = 'changed behind the stream' WHERE id = 6`)
	rep := verify()
	if rep.Verdict != consistency.Different {
		t.Fatalf("verdict %s after a change on green, want different", rep.Verdict)
	}
	named := false
	for _, tab := range rep.Tables {
		if tab.Name == "public.events" && len(tab.Differences) > 0 {
			named = true
		}
	}
	if !named {
		t.Errorf("the difference is not reported under public.events: %+v", rep.Tables)
	}
}

func mustExec(t *testing.T, s *integration.Postgres, sql string) {
	t.Helper()
	if err := s.Exec(context.Background(), sql); err != nil {
		t.Fatalf("exec %q: %v", sql, err)
	}
}

func pool(t *testing.T, dsn string) *pgxpool.Pool {
	t.Helper()
	p, err := pgxpool.New(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

func connect(t *testing.T, dsn string) *pgx.Conn {
	t.Helper()
	c, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

func waitStreaming(t *testing.T, r *rpg.Replicator) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for r.Status().Phase != rpg.PhaseStreaming {
		if st := r.Status(); st.Phase == rpg.PhaseFailed || time.Now().After(deadline) {
			t.Fatalf("replication did not reach streaming: %+v", st)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitApplied writes a marker on blue and waits until green applied it.
func waitApplied(t *testing.T, blue *integration.Postgres, r *rpg.Replicator) {
	t.Helper()
	b := make([]byte, 8)
	rand.Read(b)
	nonce := hex.EncodeToString(b)
	if err := blue.Exec(context.Background(), `INSERT INTO cutover.markers (nonce, plan, epoch) VALUES ($1, 'parts', 1)`, nonce); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := r.WaitMarker(ctx, nonce); err != nil {
		t.Fatalf("wait for green: %v (replication: %v)", err, r.Err())
	}
}
