package postgres

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cutover/cutover/fencing"
	"github.com/cutover/cutover/integration"
)

var allTables = []string{"public.accounts", "public.history", "public.notes"}

// prepared returns a prepared Fencer over a pool of its own.
func prepared(t *testing.T, dsn string, opts Options) *Fencer {
	t.Helper()
	f := New(newPool(t, dsn), opts)
	if err := f.Prepare(context.Background()); err != nil {
		t.Fatal(err)
	}
	return f
}

// canWrite reports whether sql, run by the role of dsn, is allowed
// (rolled back either way).
func canWrite(t *testing.T, dsn, sql string) error {
	t.Helper()
	ctx := context.Background()
	c := connect(t, dsn)
	tx, err := c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	_, err = tx.Exec(ctx, sql)
	return err
}

func TestASecondPlanFencingAFencedDatabaseAdoptsTheSavedGrantsAndItsUnfenceGivesThemBack(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	appDSN := e.pg.DSNFor("cutover", "app", "app-password")
	before := privileges(t, e.agent)
	// Plan a fences (green during its copy), then is refused and left.
	a := prepared(t, e.pg.DSN(), Options{Plan: "a", Pair: "db", Tables: allTables, Roles: []string{"app"}})
	if err := a.Fence(ctx, 10); err != nil {
		t.Fatal(err)
	}
	// Plan b, later (higher epochs), fences the same database again and
	// unfences it at its flip.
	b := prepared(t, e.pg.DSN(), Options{Plan: "b", Pair: "db", Tables: allTables, Roles: []string{"app"}})
	if err := b.Fence(ctx, 20); err != nil {
		t.Fatal(err)
	}
	st, err := b.State(ctx)
	if err != nil || !st.Fenced || st.Epoch != 20 {
		t.Fatalf("state after the second fence: %+v, %v", st, err)
	}
	if st.Plan != "b" || st.Pair != "db" {
		t.Errorf("owner after the second fence: %s/%s, want b/db", st.Plan, st.Pair)
	}
	if err := b.Unfence(ctx, 21); err != nil {
		t.Fatal(err)
	}
	if err := canWrite(t, appDSN, "UPDATE accounts SET balance = 1 WHERE id = 1"); err != nil {
		t.Errorf("the application cannot write after the second plan's unfence: %v", err)
	}
	if after := privileges(t, e.agent); after != before {
		t.Errorf("privileges after the second plan's unfence differ:\n--- before\n%s\n--- after\n%s", before, after)
	}
	// The epoch guard is the database's: the first plan's leader, deposed
	// by the second's higher epochs, can no longer touch it.
	if err := a.Fence(ctx, 11); !errors.Is(err, fencing.ErrStaleEpoch) {
		t.Errorf("the first plan's fence at a lower epoch than the second's unfence: %v, want ErrStaleEpoch", err)
	}
}

func TestAFenceLeftInTheOldPerPlanStateIsFoldedInAndUnfenced(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	before := privileges(t, e.agent)
	// What a v2 agent left: its state row, and app's grants revoked.
	err := e.pg.Exec(ctx, `
		CREATE TABLE cutover.fence_state (plan text NOT NULL, pair text NOT NULL, epoch bigint NOT NULL, fenced boolean NOT NULL,
			saved jsonb NOT NULL DEFAULT '[]', fenced_at timestamptz, unfenced_at timestamptz, PRIMARY KEY (plan, pair));
		INSERT INTO cutover.fence_state VALUES ('old', 'db', 40, true,
			'[{"table": "accounts", "grantor": "postgres", "grantee": "app", "privilege": "UPDATE", "grantable": false},
			  {"table": "accounts", "grantor": "postgres", "grantee": "app", "privilege": "INSERT", "grantable": false}]', now(), NULL);
		REVOKE INSERT, UPDATE ON accounts FROM app;`)
	if err != nil {
		t.Fatal(err)
	}
	f := prepared(t, e.pg.DSN(), Options{Plan: "new", Pair: "db", Tables: allTables, Roles: []string{"app"}})
	st, err := f.State(ctx)
	if err != nil || !st.Fenced || st.Epoch != 40 || st.Plan != "old" {
		t.Fatalf("state after Prepare over an old fence: %+v, %v; want fenced at 40 by old", st, err)
	}
	if err := f.Unfence(ctx, 41); err != nil {
		t.Fatal(err)
	}
	if after := privileges(t, e.agent); after != before {
		t.Errorf("privileges after the unfence differ:\n--- before\n%s\n--- after\n%s", before, after)
	}
	var stillFenced int
	if err := e.agent.QueryRow(ctx, `SELECT count(*) FROM cutover.fence_state WHERE fenced`).Scan(&stillFenced); err != nil || stillFenced != 0 {
		t.Errorf("old rows still fenced: %d, %v", stillFenced, err)
	}
}

func TestTheDefaultFenceRunByASuperuserAgentFencesTheApplicationRoles(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	// e.agent connects as the superuser postgres; no role is named.
	f := prepared(t, e.pg.DSN(), Options{Plan: "p", Pair: "db", Tables: allTables})
	if err := f.Fence(ctx, 1); err != nil {
		t.Fatal(err)
	}
	for _, who := range []struct{ role, pw, sql string }{
		{"app", "app-password", "UPDATE accounts SET balance = 1 WHERE id = 1"},
		{"outsider", "outsider-password", "INSERT INTO history (account, delta) VALUES (1, 1)"},
	} {
		if err := canWrite(t, e.pg.DSNFor("cutover", who.role, who.pw), who.sql); sqlState(err) != "42501" {
			t.Errorf("%s wrote after the default fence: %v, want 42501", who.role, err)
		}
	}
	if err := f.Unfence(ctx, 2); err != nil {
		t.Fatal(err)
	}
}

func TestAFenceThatWouldStopOnlyPublicIsRefusedAtPrepare(t *testing.T) {
	ctx := context.Background()
	pg := integration.NewPostgres(t, integration.PostgresOptions{})
	if err := pg.Exec(ctx, `
		CREATE ROLE app LOGIN PASSWORD 'app-password';
		CREATE TABLE t (id int PRIMARY KEY);
		GRANT SELECT, INSERT ON t TO PUBLIC;`); err != nil {
		t.Fatal(err)
	}
	for _, roles := range [][]string{nil, {"app"}} {
		err := New(newPool(t, pg.DSN()), Options{Plan: "p", Pair: "db", Tables: []string{"public.t"}, Roles: roles}).Prepare(ctx)
		if err == nil || !strings.Contains(err.Error(), "only PUBLIC's write privileges") || !strings.Contains(err.Error(), "would stop no application role") {
			t.Errorf("roles %v: err = %v, want a refusal naming PUBLIC-only", roles, err)
		}
	}
	if err := canWrite(t, pg.DSNFor("cutover", "app", "app-password"), "INSERT INTO t VALUES (1)"); err != nil {
		t.Errorf("a refused Prepare changed privileges: %v", err)
	}
}

func TestPrepareRefusesACutoverSchemaThatAnotherRoleCreatedAndRunsNothingInIt(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	// A fresh database, so that the schema is not there yet.
	if err := e.pg.Exec(ctx, `CREATE DATABASE other`); err != nil {
		t.Fatal(err)
	}
	otherDSN := strings.Replace(e.pg.DSN(), "/cutover?", "/other?", 1)
	other := newPool(t, otherDSN)
	if _, err := other.Exec(ctx, strings.SplitN(appSetup, "GRANT writers TO app;", 2)[1]+`
		CREATE ROLE mallory LOGIN PASSWORD 'mallory-password';
		GRANT CREATE ON DATABASE other TO mallory;`); err != nil {
		t.Fatal(err)
	}
	mallory := newPool(t, strings.Replace(e.pg.DSNFor("cutover", "mallory", "mallory-password"), "/cutover?", "/other?", 1))
	if _, err := mallory.Exec(ctx, `
		CREATE SCHEMA cutover;
		CREATE TABLE cutover.ran (at timestamptz);
		CREATE FUNCTION cutover.unfence_v4(text, text, bigint, boolean) RETURNS jsonb LANGUAGE sql
			AS $$ INSERT INTO cutover.ran VALUES (now()); SELECT '{"restored": 0}'::jsonb $$;`); err != nil {
		t.Fatal(err)
	}
	f := New(other, Options{Plan: "p", Pair: "db", Tables: allTables, Roles: []string{"app"}})
	err := f.Prepare(ctx)
	if err == nil || !strings.Contains(err.Error(), "schema cutover is owned by mallory") {
		t.Fatalf("Prepare over mallory's schema: %v, want a refusal naming mallory", err)
	}
	if _, err := f.Inspect(ctx); err == nil || !strings.Contains(err.Error(), "owned by mallory") {
		t.Errorf("break-glass unfence over mallory's schema: %v, want a refusal", err)
	}
	var ran int
	if err := other.QueryRow(ctx, `SELECT count(*) FROM cutover.ran`).Scan(&ran); err != nil || ran != 0 {
		t.Errorf("mallory's function ran %d times (%v)", ran, err)
	}
	var body string
	if err := other.QueryRow(ctx, `SELECT prosrc FROM pg_proc WHERE oid = 'cutover.unfence_v4'::regproc`).Scan(&body); err != nil || !strings.Contains(body, "cutover.ran") {
		t.Errorf("mallory's function was replaced: %q, %v", body, err)
	}

	// On a schema of its own: nobody else may create there, and every
	// function pins its search path.
	if err := e.fencer.Prepare(ctx); err != nil {
		t.Fatal(err)
	}
	var publicCreate bool
	if err := e.agent.QueryRow(ctx, `SELECT has_schema_privilege('app', 'cutover', 'CREATE')`).Scan(&publicCreate); err != nil || publicCreate {
		t.Errorf("app may create in schema cutover: %v, %v", publicCreate, err)
	}
	rows, err := e.agent.Query(ctx, `SELECT p.oid::regprocedure::text, p.prokind, coalesce(array_to_string(p.proconfig, ';'), ''), p.prosrc
		FROM pg_proc p WHERE p.pronamespace = 'cutover'::regnamespace AND p.proname LIKE '%\_v_'`)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for rows.Next() {
		var name, kind, conf, src string
		if err := rows.Scan(&name, &kind, &conf, &src); err != nil {
			t.Fatal(err)
		}
		n++
		pinned := conf == "search_path=pg_catalog, pg_temp" ||
			(kind == "p" && strings.Contains(src, "set_config('search_path', 'pg_catalog, pg_temp', true)"))
		if !pinned {
			t.Errorf("%s does not pin its search path (config %q)", name, conf)
		}
	}
	if n != len(serverObjects) {
		t.Errorf("%d versioned functions in schema cutover, want %d", n, len(serverObjects))
	}
}

func TestAMixedCaseTableAndPartitionsAreFencedExactly(t *testing.T) {
	ctx := context.Background()
	pg := integration.NewPostgres(t, integration.PostgresOptions{})
	if err := pg.Exec(ctx, `
		CREATE ROLE app LOGIN PASSWORD 'app-password';
		CREATE TABLE "Orders" (id int PRIMARY KEY);
		CREATE TABLE orders (id int PRIMARY KEY);
		CREATE TABLE events (id int, at date NOT NULL, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
		CREATE TABLE "Events 2026" PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
		GRANT SELECT, INSERT, UPDATE, DELETE ON "Orders", orders, events, "Events 2026" TO app;`); err != nil {
		t.Fatal(err)
	}
	appDSN := pg.DSNFor("cutover", "app", "app-password")
	f := prepared(t, pg.DSN(), Options{Plan: "p", Pair: "db", Roles: []string{"app"},
		Tables: []string{`"public"."Orders"`, `"public"."events"`, `"public"."Events 2026"`}})
	if _, err := f.FenceDrain(ctx, 1, 100*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	for _, sql := range []string{
		`INSERT INTO "Orders" VALUES (1)`,
		`INSERT INTO events VALUES (1, '2026-05-01')`,
		`INSERT INTO "Events 2026" VALUES (2, '2026-05-01')`,
	} {
		if err := canWrite(t, appDSN, sql); sqlState(err) != "42501" {
			t.Errorf("%s after the fence: %v, want 42501", sql, err)
		}
	}
	if err := canWrite(t, appDSN, `INSERT INTO orders VALUES (1)`); err != nil {
		t.Errorf("orders (not in scope) was fenced: %v", err)
	}
	if err := f.Unfence(ctx, 2); err != nil {
		t.Fatal(err)
	}
	for _, sql := range []string{`INSERT INTO "Orders" VALUES (1)`, `INSERT INTO "Events 2026" VALUES (2, '2026-05-01')`} {
		if err := canWrite(t, appDSN, sql); err != nil {
			t.Errorf("%s after the unfence: %v", sql, err)
		}
	}
}

func TestANoinheritMemberOfAFencedRoleCannotSetRoleAndWrite(t *testing.T) {
	ctx := context.Background()
	pg := integration.NewPostgres(t, integration.PostgresOptions{})
	if err := pg.Exec(ctx, `
		CREATE ROLE writers NOLOGIN;
		CREATE ROLE app LOGIN NOINHERIT PASSWORD 'app-password';
		GRANT writers TO app;
		CREATE TABLE t (id int PRIMARY KEY);
		GRANT SELECT ON t TO app;
		GRANT INSERT ON t TO writers;`); err != nil {
		t.Fatal(err)
	}
	f := prepared(t, pg.DSN(), Options{Plan: "p", Pair: "db", Tables: []string{"public.t"}, Roles: []string{"app"}})
	if err := f.Fence(ctx, 1); err != nil {
		t.Fatal(err)
	}
	c := connect(t, pg.DSNFor("cutover", "app", "app-password"))
	mustExec(t, c, "SET ROLE writers")
	if _, err := c.Exec(ctx, "INSERT INTO t VALUES (1)"); sqlState(err) != "42501" {
		t.Errorf("a NOINHERIT member of the fenced role wrote as writers after the fence: %v, want 42501", err)
	}
	if err := f.Unfence(ctx, 2); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, "INSERT INTO t VALUES (2)"); err != nil {
		t.Errorf("write as writers after the unfence: %v", err)
	}
}

func TestGrantsAFencedRoleGaveOutsideTheFenceComeBackAtUnfence(t *testing.T) {
	ctx := context.Background()
	pg := integration.NewPostgres(t, integration.PostgresOptions{})
	if err := pg.Exec(ctx, `
		CREATE ROLE app LOGIN PASSWORD 'app-password';
		CREATE ROLE etl LOGIN PASSWORD 'etl-password';
		CREATE ROLE audit LOGIN PASSWORD 'audit-password';
		CREATE TABLE t (id int PRIMARY KEY, v int);
		GRANT SELECT, INSERT, UPDATE ON t TO app WITH GRANT OPTION;
		SET ROLE app;
		GRANT SELECT, UPDATE ON t TO etl WITH GRANT OPTION;
		GRANT INSERT (id) ON t TO etl;
		RESET ROLE;
		SET ROLE etl;
		GRANT UPDATE ON t TO audit;
		RESET ROLE;`); err != nil {
		t.Fatal(err)
	}
	agent := newPool(t, pg.DSN())
	before := privileges(t, agent)
	f := prepared(t, pg.DSN(), Options{Plan: "p", Pair: "db", Tables: []string{"public.t"}, Roles: []string{"app"}})
	if err := f.Fence(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if err := f.Unfence(ctx, 2); err != nil {
		t.Fatal(err)
	}
	if after := privileges(t, agent); after != before {
		t.Errorf("privileges after the unfence differ:\n--- before\n%s\n--- after\n%s", before, after)
	}
	for _, who := range []struct{ role, sql string }{{"etl", "UPDATE t SET v = 1"}, {"audit", "UPDATE t SET v = 2"}, {"etl", "INSERT INTO t (id) VALUES (9)"}} {
		if err := canWrite(t, pg.DSNFor("cutover", who.role, who.role+"-password"), who.sql); err != nil {
			t.Errorf("%s after the unfence: %v", who.role, err)
		}
	}
}

func TestTheHoldOutlivesTheServersIdleTimeoutWhileTheFencerKeepsIt(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	// A bound the keepalive (every third of it) keeps ahead of on a
	// loaded machine; kept well past it below.
	const hold = time.Second
	f := prepared(t, e.pg.DSN(), Options{Plan: "p1", Pair: "db", Tables: allTables, Roles: []string{"app"}, Hold: hold})
	// A failed check must not leave the hold (and the blocked writer)
	// behind: the pool's close would wait for the held session forever.
	t.Cleanup(func() { f.Release(context.Background()) })
	if err := f.CheckHold(ctx); !errors.Is(err, fencing.ErrHoldLost) {
		t.Errorf("CheckHold before any hold: %v, want ErrHoldLost", err)
	}
	if _, err := f.FenceDrain(ctx, 1, 100*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	outsider := connect(t, e.pg.DSNFor("cutover", "outsider", "outsider-password"))
	write := startWrite(outsider, "INSERT INTO history (account, delta) VALUES (1, 1)")
	waitForLock(t, e.agent, outsider.PgConn().PID(), write)
	// Kept for more than three times the server's bound.
	deadline := time.Now().Add(3500 * time.Millisecond)
	for time.Now().Before(deadline) {
		select {
		case err := <-write:
			t.Fatalf("the write outside the fence went through while held (%v)", err)
		case <-time.After(50 * time.Millisecond):
		}
		if !f.Holding() {
			t.Fatal("the Fencer no longer holds")
		}
	}
	if err := f.CheckHold(ctx); err != nil {
		t.Errorf("CheckHold while held: %v", err)
	}
	f.Release(ctx)
	if err := result(t, write); err != nil {
		t.Errorf("the write outside the fence after the release: %v", err)
	}
	if f.Holding() {
		t.Error("still holding after the release")
	}

	// A hold whose session is gone is reported lost.
	if _, err := f.FenceDrain(ctx, 2, 100*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	pid := f.held.conn.Conn().PgConn().PID()
	f.mu.Unlock()
	if _, err := e.agent.Exec(ctx, `SELECT pg_terminate_backend($1)`, pid); err != nil {
		t.Fatal(err)
	}
	lostBy := time.Now().Add(20 * time.Second)
	for f.CheckHold(ctx) == nil {
		if time.Now().After(lostBy) {
			t.Fatal("a terminated hold is still reported held")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := f.CheckHold(ctx); !errors.Is(err, fencing.ErrHoldLost) {
		t.Errorf("CheckHold after the session ended: %v, want ErrHoldLost", err)
	}
	f.Release(ctx)
	if err := f.Unfence(ctx, 3); err != nil {
		t.Fatal(err)
	}
}

func TestPrivilegeParityNamesWhatGreenWouldLackOnceUnfenced(t *testing.T) {
	ctx := context.Background()
	blue := integration.NewPostgres(t, integration.PostgresOptions{})
	green := integration.NewPostgres(t, integration.PostgresOptions{})
	for _, pg := range []*integration.Postgres{blue, green} {
		if err := pg.Exec(ctx, appSetup+`
			ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
			CREATE POLICY mine ON notes FOR ALL TO app USING (id > 0);`); err != nil {
			t.Fatal(err)
		}
	}
	opts := func() Options { return Options{Plan: "p", Pair: "db", Tables: allTables, Roles: []string{"app"}} }
	bf := prepared(t, blue.DSN(), opts())
	gf := prepared(t, green.DSN(), opts())
	// Green fenced (as it is from the copy on): what is saved counts.
	if err := gf.Fence(ctx, 1); err != nil {
		t.Fatal(err)
	}
	diffs, err := PrivilegeParity(ctx, bf, gf)
	if err != nil || len(diffs) != 0 {
		t.Fatalf("equal privileges, green fenced: %q, %v", diffs, err)
	}
	if err := gf.Unfence(ctx, 2); err != nil {
		t.Fatal(err)
	}
	if err := green.Exec(ctx, `
		REVOKE UPDATE ON accounts FROM app;
		DROP POLICY mine ON notes;
		ALTER DEFAULT PRIVILEGES GRANT INSERT ON TABLES TO app;`); err != nil {
		t.Fatal(err)
	}
	if err := gf.Fence(ctx, 3); err != nil {
		t.Fatal(err)
	}
	diffs, err = PrivilegeParity(ctx, bf, gf)
	if err != nil {
		t.Fatal(err)
	}
	all := strings.Join(diffs, "\n")
	for _, want := range []string{
		"on blue, not on green once unfenced: role app may UPDATE on public.accounts",
		"on blue, not on green once unfenced: policy mine on public.notes",
		"on green once unfenced, not on blue: default privileges of postgres in every schema on tables: app may INSERT",
	} {
		if !strings.Contains(all, want) {
			t.Errorf("differences lack %q:\n%s", want, all)
		}
	}
	if len(diffs) != 3 {
		t.Errorf("%d differences, want 3:\n%s", len(diffs), all)
	}
}

var _ = pgxpool.Pool{}

// WarmUnfence's dry run changes nothing: the fence stays up, the saved
// grants stay saved, the application still cannot write; the unfence after
// it restores them all.
func TestWarmingTheUnfenceChangesNothing(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	f := prepared(t, e.pg.DSN(), Options{Plan: "p1", Pair: "db", Tables: allTables, Roles: []string{"app"}})
	before := privileges(t, f.pool)
	if err := f.Fence(ctx, 5); err != nil {
		t.Fatal(err)
	}
	fenced := privileges(t, f.pool)
	st, err := f.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		if err := f.WarmUnfence(ctx); err != nil {
			t.Fatalf("warm unfence: %v", err)
		}
	}
	if after := privileges(t, f.pool); after != fenced {
		t.Errorf("privileges changed by the dry run:\n%s\n---\n%s", fenced, after)
	}
	if st2, err := f.State(ctx); err != nil || st2 != st {
		t.Errorf("fence state after the dry run: %+v (%v), before %+v", st2, err, st)
	}
	app := connect(t, e.pg.DSNFor("cutover", "app", "app-password"))
	if _, err := app.Exec(ctx, "INSERT INTO history (account, delta) VALUES (1, 1)"); sqlState(err) != "42501" {
		t.Errorf("application write after the dry run: %v, want 42501", err)
	}
	if err := f.Unfence(ctx, 6); err != nil {
		t.Fatal(err)
	}
	if after := privileges(t, f.pool); after != before {
		t.Errorf("privileges after the unfence:\n%s\n---\n%s", before, after)
	}
}
