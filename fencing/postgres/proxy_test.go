package postgres

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/cutover/cutover/integration"
)

// proxyFencer is e's fence with the write proxies (fence.blue: proxy).
func (e *env) proxyFencer(t *testing.T, logger *zap.Logger, hold time.Duration) *Fencer {
	t.Helper()
	if logger == nil {
		logger = zap.NewNop()
	}
	return prepared(t, e.pg.DSN(), Options{Plan: "p1", Pair: "db", Tables: allTables, Roles: []string{"app"}, WriteProxy: ProxyOn, Hold: hold, Logger: logger})
}

func proxies(t *testing.T, e *env) []string {
	t.Helper()
	var names []string
	if err := e.agent.QueryRow(context.Background(), `SELECT coalesce(array_agg(rolname ORDER BY rolname), '{}') FROM pg_roles WHERE rolname LIKE 'cutover\_w\_%'`).Scan(&names); err != nil {
		t.Fatal(err)
	}
	return names
}

// The fence on the write proxies revokes a membership per grantee, and
// stops the next write of every session of the application as the REVOKE
// on the tables did: idle, in a transaction that wrote, with a prepared
// statement, in REPEATABLE READ, in a COPY, and new sessions. The unfence
// gives back exactly the privileges there were.
func TestWriteProxyFenceStopsOpenSessionsAndUnfenceRestoresTheGrantsExactly(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	appDSN := e.pg.DSNFor("cutover", "app", "app-password")
	before := privileges(t, e.agent)
	core, logs := observer.New(zap.InfoLevel)
	f := e.proxyFencer(t, zap.New(core), 0)

	// Prepare moved app's and writers' grants (writers: app is a member)
	// to a proxy each; the application notices nothing.
	if got := proxies(t, e); len(got) != 2 {
		t.Fatalf("proxies after Prepare: %v, want one for app and one for writers", got)
	}
	var direct int
	if err := e.agent.QueryRow(ctx, `SELECT count(*) FROM aclexplode((SELECT relacl FROM pg_class WHERE oid = 'accounts'::regclass)) a WHERE a.grantee = 'app'::regrole AND a.privilege_type = 'INSERT'`).Scan(&direct); err != nil || direct != 0 {
		t.Errorf("app's INSERT on accounts still granted directly after Prepare: %d, %v", direct, err)
	}
	for _, sql := range []string{"UPDATE accounts SET balance = 1 WHERE id = 1", "INSERT INTO history (account, delta) VALUES (1, 1)", "INSERT INTO notes (id, body) VALUES (1000, 'x')"} {
		if err := canWrite(t, appDSN, sql); err != nil {
			t.Errorf("%s through the proxies: %v", sql, err)
		}
	}
	// Preparing again changes nothing.
	if err := f.Prepare(ctx); err != nil {
		t.Fatal(err)
	}

	idle := connect(t, appDSN)
	midTxn := connect(t, appDSN)
	prepared := connect(t, appDSN)
	repeatable := connect(t, appDSN)
	copier := connect(t, appDSN)
	for _, c := range []*pgx.Conn{idle, midTxn, prepared, repeatable, copier} {
		mustExec(t, c, "SELECT 1")
	}
	mustExec(t, midTxn, "BEGIN")
	mustExec(t, midTxn, "UPDATE accounts SET balance = balance + 1 WHERE id = 2")
	if _, err := prepared.Prepare(ctx, "upd", "UPDATE accounts SET balance = balance + 1 WHERE id = $1"); err != nil {
		t.Fatal(err)
	}
	if _, err := prepared.Exec(ctx, "upd", 3); err != nil {
		t.Fatal(err)
	}
	mustExec(t, repeatable, "BEGIN ISOLATION LEVEL REPEATABLE READ")
	mustExec(t, repeatable, "UPDATE accounts SET balance = balance + 1 WHERE id = 4")
	mustExec(t, copier, "BEGIN")
	if _, err := copier.CopyFrom(ctx, pgx.Identifier{"notes"}, []string{"id", "body"}, pgx.CopyFromRows([][]any{{2000, "before"}})); err != nil {
		t.Fatal(err)
	}

	if err := f.Fence(ctx, 10); err != nil {
		t.Fatal(err)
	}
	fenced := logs.FilterMessage("fenced").All()
	if len(fenced) != 1 || fenced[0].ContextMap()["memberships_revoked"] != int64(2) || fenced[0].ContextMap()["revokes"] != int64(1) {
		// One REVOKE: PUBLIC's UPDATE on notes, which no proxy takes.
		t.Errorf("fence: %v, want 2 memberships and 1 REVOKE (PUBLIC's)", fenced)
	}

	for name, sql := range map[string]string{
		"update":          "UPDATE accounts SET balance = 5 WHERE id = 3",
		"insert via role": "INSERT INTO history (account, delta) VALUES (1, 1)",
		"column insert":   "INSERT INTO notes (id, body) VALUES (1, 'x')",
		"public update":   "UPDATE notes SET body = 'y'",
		"delete":          "DELETE FROM accounts WHERE id = 4",
	} {
		if _, err := idle.Exec(ctx, sql); sqlState(err) != "42501" {
			t.Errorf("%s in an open session after the fence: %v, want 42501", name, err)
		}
	}
	if _, err := midTxn.Exec(ctx, "UPDATE accounts SET balance = balance + 1 WHERE id = 2"); sqlState(err) != "42501" {
		t.Errorf("second write of an open transaction: %v, want 42501", err)
	}
	if _, err := prepared.Exec(ctx, "upd", 3); sqlState(err) != "42501" {
		t.Errorf("prepared statement after the fence: %v, want 42501", err)
	}
	if _, err := repeatable.Exec(ctx, "UPDATE accounts SET balance = balance + 1 WHERE id = 4"); sqlState(err) != "42501" {
		t.Errorf("REPEATABLE READ transaction after the fence: %v, want 42501", err)
	}
	if _, err := copier.CopyFrom(ctx, pgx.Identifier{"notes"}, []string{"id", "body"}, pgx.CopyFromRows([][]any{{2001, "after"}})); sqlState(err) != "42501" {
		t.Errorf("COPY in an open transaction after the fence: %v, want 42501", err)
	}
	if err := canWrite(t, appDSN, "UPDATE accounts SET balance = 1 WHERE id = 5"); sqlState(err) != "42501" {
		t.Errorf("write in a new session: %v, want 42501", err)
	}
	var n int
	if err := idle.QueryRow(ctx, "SELECT count(*) FROM accounts").Scan(&n); err != nil || n != 100 {
		t.Errorf("read after the fence: n=%d err=%v", n, err)
	}
	// Parity sees what app may do once unfenced, proxies included.
	lines, err := f.privilegeLines(ctx)
	if err != nil || !strings.Contains(strings.Join(lines, "\n"), "role app may INSERT on public.accounts") {
		t.Errorf("privilege lines while fenced on the proxies miss app's INSERT on accounts (%v):\n%s", err, strings.Join(lines, "\n"))
	}

	if err := f.Unfence(ctx, 11); err != nil {
		t.Fatal(err)
	}
	if err := canWrite(t, appDSN, "UPDATE accounts SET balance = 1 WHERE id = 1"); err != nil {
		t.Errorf("write after the unfence: %v", err)
	}
	if after := privileges(t, e.agent); after != before {
		t.Errorf("privileges after the unfence differ:\n--- before\n%s\n--- after\n%s", before, after)
	}
	if got := proxies(t, e); len(got) != 0 {
		t.Errorf("proxies left after the unfence: %v", got)
	}
	var members int
	if err := e.agent.QueryRow(ctx, `SELECT count(*) FROM pg_auth_members WHERE member = 'app'::regrole`).Scan(&members); err != nil || members != 1 {
		t.Errorf("app is a member of %d roles after the unfence (%v), want 1 (writers)", members, err)
	}
}

// Grants added after Prepare, straight to the application's role, are
// still fenced: the fence revokes what is direct the old way.
func TestWriteProxyFenceRevokesGrantsMadeAfterPrepare(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	appDSN := e.pg.DSNFor("cutover", "app", "app-password")
	before := privileges(t, e.agent) + "\nnotes postgres->app UPDATE false"
	f := e.proxyFencer(t, nil, 0)
	if _, err := e.agent.Exec(ctx, `GRANT INSERT, UPDATE ON notes TO app`); err != nil {
		t.Fatal(err)
	}
	if _, err := f.FenceDrain(ctx, 1, time.Second); err != nil {
		t.Fatal(err)
	}
	if err := canWrite(t, appDSN, "UPDATE notes SET body = 'x'"); sqlState(err) != "42501" {
		t.Errorf("a grant made after Prepare let a write through the fence: %v", err)
	}
	if err := f.Unfence(ctx, 2); err != nil {
		t.Fatal(err)
	}
	// As before, with the grants made since: the INSERT on every column
	// and the UPDATE.
	want := strings.Split(before, "\n")
	want = append(want, "notes postgres->app INSERT false")
	slices.Sort(want)
	want = slices.Compact(want)
	got := strings.Split(privileges(t, e.agent), "\n")
	slices.Sort(got)
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("privileges after the unfence differ:\n--- want\n%s\n--- got\n%s", strings.Join(want, "\n"), strings.Join(got, "\n"))
	}
}

// A session that did SET ROLE to a proxy before the fence keeps the
// proxy's privileges (PostgreSQL 15 has no SET FALSE on a membership):
// its write waits on the hold like the fenced ones, and the release
// cancels it, so it never lands on blue after the flip.
func TestWriteProxySetRoleSessionIsCancelledAtTheRelease(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	appDSN := e.pg.DSNFor("cutover", "app", "app-password")
	f := e.proxyFencer(t, nil, 10*time.Second)
	names := proxies(t, e)
	var appProxy string
	if err := e.agent.QueryRow(ctx, `SELECT r.rolname FROM pg_roles r JOIN pg_auth_members m ON m.roleid = r.oid WHERE m.member = 'app'::regrole AND r.rolname LIKE 'cutover\_w\_%'`).Scan(&appProxy); err != nil {
		t.Fatalf("app's proxy among %v: %v", names, err)
	}
	sneaky := connect(t, appDSN)
	mustExec(t, sneaky, "SET ROLE "+pgx.Identifier{appProxy}.Sanitize())
	// An INSERT: the proxy holds the write privileges only (an UPDATE
	// with a WHERE needs SELECT, which stays with app).
	mustExec(t, sneaky, "INSERT INTO accounts VALUES (1001, 1)")
	if _, err := f.FenceDrain(ctx, 1, time.Second); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := sneaky.Exec(ctx, "INSERT INTO accounts VALUES (1002, 777)")
		done <- err
	}()
	waitFor(t, func() bool {
		var waiting bool
		if err := e.agent.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_locks WHERE NOT granted AND pid = $1)`, sneaky.PgConn().PID()).Scan(&waiting); err != nil {
			t.Fatal(err)
		}
		return waiting
	})
	if _, err := f.ReleaseRefusingAll(ctx); err != nil {
		t.Fatal(err)
	}
	err := <-done
	if err == nil || sqlState(err) == "42501" {
		t.Errorf("the SET ROLE session's write after the release: %v, want it cancelled", err)
	}
	var landed bool
	if err := e.agent.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM accounts WHERE id = 1002)").Scan(&landed); err != nil || landed {
		t.Errorf("the SET ROLE session's write landed on the fenced side: %v, %v", landed, err)
	}
}

// Without CREATEROLE the agent cannot create proxies: fence.blue: proxy
// fails Prepare and changes nothing; auto keeps the fence on the grants.
func TestWriteProxyNeedsCreateRole(t *testing.T) {
	ctx := context.Background()
	// No fence prepared by a superuser first: the owner's creates schema
	// cutover.
	pg := integration.NewPostgres(t, integration.PostgresOptions{})
	if err := pg.Exec(ctx, appSetup); err != nil {
		t.Fatal(err)
	}
	e := &env{pg: pg, agent: newPool(t, pg.DSN())}
	if _, err := e.agent.Exec(ctx, `CREATE ROLE owner LOGIN PASSWORD 'owner-password';
		ALTER TABLE accounts OWNER TO owner; ALTER TABLE history OWNER TO owner; ALTER TABLE notes OWNER TO owner;
		GRANT CREATE ON DATABASE cutover TO owner`); err != nil {
		t.Fatal(err)
	}
	before := privileges(t, e.agent)
	ownerDSN := e.pg.DSNFor("cutover", "owner", "owner-password")
	f := New(newPool(t, ownerDSN), Options{Plan: "p1", Pair: "db", Tables: allTables, Roles: []string{"app"}, WriteProxy: ProxyOn})
	if err := f.Prepare(ctx); !errors.Is(err, ErrWriteProxyUnavailable) {
		t.Fatalf("Prepare with proxy and no CREATEROLE: %v, want ErrWriteProxyUnavailable", err)
	}
	if after := privileges(t, e.agent); after != before || len(proxies(t, e)) != 0 {
		t.Errorf("a refused proxy changed privileges or roles: %v", proxies(t, e))
	}
	g := New(newPool(t, ownerDSN), Options{Plan: "p1", Pair: "db", Tables: allTables, Roles: []string{"app"}, WriteProxy: ProxyAuto})
	if err := g.Prepare(ctx); err != nil {
		t.Fatal(err)
	}
	if err := g.Fence(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if err := canWrite(t, e.pg.DSNFor("cutover", "app", "app-password"), "UPDATE accounts SET balance = 1"); sqlState(err) != "42501" {
		t.Errorf("auto without CREATEROLE: a write through the fence: %v", err)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10 s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// What a proxy cannot take stays direct and is fenced the old way: a
// NOINHERIT role's grants (it would lose them), grants with a grant
// option (and what was granted with them); the rest goes to proxies.
func TestWriteProxyLeavesNoInheritAndGrantOptionGrantsDirectAndStillFencesThem(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	if _, err := e.agent.Exec(ctx, `ALTER ROLE app NOINHERIT`); err != nil {
		t.Fatal(err)
	}
	appDSN := e.pg.DSNFor("cutover", "app", "app-password")
	reportingDSN := e.pg.DSNFor("cutover", "reporting", "reporting-password")
	before := privileges(t, e.agent)
	core, logs := observer.New(zap.InfoLevel)
	f := prepared(t, e.pg.DSN(), Options{Plan: "p1", Pair: "db", Tables: allTables, Roles: []string{"app", "reporting"}, WriteProxy: ProxyOn, Logger: zap.New(core)})
	warned := logs.FilterMessageSnippet("stay direct").All()
	if len(warned) != 1 {
		t.Fatalf("Prepare did not say which grants stay direct: %v", logs.All())
	}
	direct, _ := warned[0].ContextMap()["direct"].(map[string]int)
	if direct["noinherit"] == 0 || direct["grant option"] == 0 {
		t.Errorf("grants left direct: %v, want app's (NOINHERIT) and reporting's UPDATE WITH GRANT OPTION", direct)
	}
	// Only writers (INHERIT) got a proxy.
	if got := proxies(t, e); len(got) != 1 {
		t.Errorf("proxies: %v, want writers' only", got)
	}
	if err := canWrite(t, appDSN, "INSERT INTO accounts VALUES (1000, 1)"); err != nil {
		t.Errorf("app (NOINHERIT) lost its grant to the proxy: %v", err)
	}
	if err := f.Fence(ctx, 1); err != nil {
		t.Fatal(err)
	}
	for dsn, sql := range map[string]string{
		appDSN:       "INSERT INTO accounts VALUES (1001, 1)",
		reportingDSN: "UPDATE notes SET body = 'x'",
	} {
		if err := canWrite(t, dsn, sql); sqlState(err) != "42501" {
			t.Errorf("%s after the fence: %v, want 42501", sql, err)
		}
	}
	if err := canWrite(t, appDSN, "SET ROLE writers; INSERT INTO history (account, delta) VALUES (1, 1)"); sqlState(err) != "42501" {
		t.Errorf("app as writers after the fence: %v, want 42501", err)
	}
	if err := f.Unfence(ctx, 2); err != nil {
		t.Fatal(err)
	}
	if after := privileges(t, e.agent); after != before {
		t.Errorf("privileges after the unfence differ:\n--- before\n%s\n--- after\n%s", before, after)
	}
}
