package postgres

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cutover/cutover/integration"
)

// withoutPublic drops PUBLIC's lines from a privileges listing.
func withoutPublic(s string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if !strings.Contains(l, "->PUBLIC ") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func canLogIn(role string) string {
	return "SELECT rolcanlogin FROM pg_roles WHERE rolname = '" + role + "'"
}

// A fence shifted to logins keeps the application out of the database
// with its grants back (PUBLIC's aside): its roles cannot log in, the
// sessions they had are ended, and the lift at the flip unlocks the logins
// and gives back PUBLIC's grants, nothing else, leaving the database
// exactly as it was before the fence.
func TestAFenceShiftedToLoginsKeepsTheApplicationOutAndItsLiftUnlocksOnlyLogins(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	f := prepared(t, e.pg.DSN(), Options{Plan: "p1", Pair: "db", Tables: allTables, Roles: []string{"app"}})
	before := privileges(t, f.pool)
	appDSN := e.pg.DSNFor("cutover", "app", "app-password")
	open := connect(t, appDSN)
	outsider := connect(t, e.pg.DSNFor("cutover", "outsider", "outsider-password"))
	if err := f.Fence(ctx, 3); err != nil {
		t.Fatal(err)
	}
	shift, err := f.ShiftToLogins(ctx, 3, 100*time.Millisecond, false)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(shift.Logins, []string{"app"}) || shift.Terminated != 1 || shift.KeptPublic != 1 || shift.Restored == 0 {
		t.Errorf("shift = %+v, want logins [app], 1 session ended, 1 PUBLIC grant kept, grants restored", shift)
	}
	if got, want := privileges(t, f.pool), withoutPublic(before); got != want {
		t.Errorf("grants under the login fence:\n%s\nwant (before, PUBLIC's aside):\n%s", got, want)
	}
	if _, err := pgx.Connect(ctx, appDSN); sqlState(err) != "28000" {
		t.Errorf("application login under the login fence: %v, want 28000 (not permitted to log in)", err)
	}
	if _, err := open.Exec(ctx, "SELECT 1"); err == nil {
		t.Error("the application's session opened before the lock is still alive")
	}
	// Roles outside the fence are untouched.
	if _, err := outsider.Exec(ctx, "SELECT 1"); err != nil {
		t.Errorf("outsider's session: %v", err)
	}
	if st, err := f.State(ctx); err != nil || !st.Fenced {
		t.Errorf("state under the login fence: %+v (%v), want fenced", st, err)
	}
	// Warming the lift changes nothing.
	if err := f.WarmUnfence(ctx); err != nil {
		t.Fatal(err)
	}
	var login bool
	if err := f.pool.QueryRow(ctx, canLogIn("app")).Scan(&login); err != nil || login {
		t.Fatalf("app may log in after the warm-up: %v %v", login, err)
	}

	if err := f.Unfence(ctx, 4); err != nil {
		t.Fatal(err)
	}
	if got := privileges(t, f.pool); got != before {
		t.Errorf("privileges after the lift:\n%s\nwant:\n%s", got, before)
	}
	if err := canWrite(t, appDSN, "UPDATE accounts SET balance = 1 WHERE id = 1"); err != nil {
		t.Errorf("application write after the lift: %v", err)
	}
	if st, err := f.State(ctx); err != nil || st.Fenced {
		t.Errorf("state after the lift: %+v (%v)", st, err)
	}
}

// A login that got past the lock (here: a lock lifted by hand) is found at
// the flip: the lift refuses, names the session, and the fence stays up.
func TestTheLiftRefusesWhenASessionOfALockedRoleIsConnected(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	f := prepared(t, e.pg.DSN(), Options{Plan: "p1", Pair: "db", Tables: allTables, Roles: []string{"app"}})
	if err := f.Fence(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if _, err := f.ShiftToLogins(ctx, 1, 0, false); err != nil {
		t.Fatal(err)
	}
	if _, err := f.pool.Exec(ctx, "ALTER ROLE app LOGIN"); err != nil {
		t.Fatal(err)
	}
	intruder := connect(t, e.pg.DSNFor("cutover", "app", "app-password"))
	err := f.Unfence(ctx, 2)
	if err == nil || !strings.Contains(err.Error(), "breached") || !strings.Contains(err.Error(), "user app") {
		t.Fatalf("lift with a session of a locked role connected: %v, want a breach naming it", err)
	}
	if st, err := f.State(ctx); err != nil || !st.Fenced {
		t.Errorf("state after the refused lift: %+v (%v), want fenced", st, err)
	}
	intruder.Close(ctx)
	// The break-glass unfence gives everything back whatever it finds.
	res, err := f.BreakGlassUnfence(ctx)
	if err != nil || !res.WasFenced {
		t.Fatalf("break-glass: %+v %v", res, err)
	}
	var login bool
	if err := f.pool.QueryRow(ctx, canLogIn("app")).Scan(&login); err != nil || !login {
		t.Errorf("app may log in after break-glass: %v %v", login, err)
	}
}

// The grants come back under the login fence only while no role that can
// log in would get one: a role made able to log in by hand after the lock
// stops the shift's second step, which changes nothing.
func TestGrantsComeBackUnderTheLoginFenceOnlyWhenNoHolderCanLogIn(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	f := prepared(t, e.pg.DSN(), Options{Plan: "p1", Pair: "db", Tables: allTables, Roles: []string{"app"}})
	if err := f.Fence(ctx, 1); err != nil {
		t.Fatal(err)
	}
	fenced := privileges(t, f.pool)
	var raw []byte
	if err := f.pool.QueryRow(ctx, "SELECT "+loginsFuncName+"('p1', 'db', 1, false)").Scan(&raw); err != nil {
		t.Fatal(err)
	}
	// A new member of writers that may log in, after the lock.
	if _, err := f.pool.Exec(ctx, "CREATE ROLE latecomer LOGIN; GRANT writers TO latecomer"); err != nil {
		t.Fatal(err)
	}
	_, err := f.unfence(ctx, 1, false, true)
	if sqlState(errors.Unwrap(err)) != "CU004" && !strings.Contains(err.Error(), "latecomer") {
		t.Fatalf("grants back with latecomer able to log in: %v, want CU004 naming latecomer", err)
	}
	if got := privileges(t, f.pool); got != fenced {
		t.Errorf("privileges changed by the refused step:\n%s\nwant:\n%s", got, fenced)
	}
	// Locking again takes latecomer too; then the grants come back.
	shift, err := f.ShiftToLogins(ctx, 1, 0, false)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(shift.Logins, "latecomer") || !slices.Contains(shift.Logins, "app") {
		t.Errorf("locked %v, want app and latecomer", shift.Logins)
	}
	if err := f.Unfence(ctx, 2); err != nil {
		t.Fatal(err)
	}
	for _, r := range []string{"app", "latecomer"} {
		var login bool
		if err := f.pool.QueryRow(ctx, canLogIn(r)).Scan(&login); err != nil || !login {
			t.Errorf("%s may log in after the lift: %v %v", r, login, err)
		}
	}
}

// An agent that may not alter roles keeps the fence on the grants:
// ShiftToLogins says so and changes nothing.
func TestShiftingToLoginsWithoutCreateroleChangesNothing(t *testing.T) {
	ctx := context.Background()
	// No superuser fencer first: it would own schema cutover.
	pg := integration.NewPostgres(t, integration.PostgresOptions{})
	if err := pg.Exec(ctx, appSetup); err != nil {
		t.Fatal(err)
	}
	e := &env{pg: pg, agent: newPool(t, pg.DSN())}
	if err := e.pg.Exec(ctx, `
		CREATE ROLE fencer LOGIN PASSWORD 'fencer-password';
		GRANT pg_signal_backend TO fencer;
		GRANT CREATE ON DATABASE cutover TO fencer;
		ALTER TABLE accounts OWNER TO fencer; ALTER TABLE history OWNER TO fencer; ALTER TABLE notes OWNER TO fencer;`); err != nil {
		t.Fatal(err)
	}
	f := prepared(t, e.pg.DSNFor("cutover", "fencer", "fencer-password"), Options{Plan: "p1", Pair: "db", Tables: allTables, Roles: []string{"app"}})
	if err := f.Fence(ctx, 1); err != nil {
		t.Fatal(err)
	}
	fenced := privileges(t, f.pool)
	_, err := f.ShiftToLogins(ctx, 1, 0, false)
	if !errors.Is(err, ErrLoginFenceUnavailable) {
		t.Fatalf("shift without CREATEROLE: %v, want ErrLoginFenceUnavailable", err)
	}
	var login bool
	if err := e.agent.QueryRow(ctx, canLogIn("app")).Scan(&login); err != nil || !login {
		t.Errorf("app may log in: %v %v", login, err)
	}
	if got := privileges(t, f.pool); got != fenced {
		t.Errorf("privileges changed:\n%s\nwant:\n%s", got, fenced)
	}
	if err := f.Unfence(ctx, 2); err != nil {
		t.Fatal(err)
	}
}

// A login lock holds for the whole cluster: while the roles may connect to
// another database of it (one already switched, say), the shift refuses
// and changes nothing, unless told the other databases may be locked out.
func TestTheLoginFenceRefusesWhenTheRolesUseAnotherDatabaseOfTheCluster(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	f := prepared(t, e.pg.DSN(), Options{Plan: "p1", Pair: "db", Tables: allTables, Roles: []string{"app"}})
	if err := e.pg.Exec(ctx, "CREATE DATABASE live"); err != nil {
		t.Fatal(err)
	}
	if err := f.Fence(ctx, 1); err != nil {
		t.Fatal(err)
	}
	fenced := privileges(t, f.pool)
	_, err := f.ShiftToLogins(ctx, 1, 0, false)
	if !errors.Is(err, ErrLoginFenceUnsafe) || !strings.Contains(err.Error(), "live") {
		t.Fatalf("shift with database live open to app: %v, want ErrLoginFenceUnsafe naming live", err)
	}
	var login bool
	if err := f.pool.QueryRow(ctx, canLogIn("app")).Scan(&login); err != nil || !login {
		t.Errorf("app may log in: %v %v", login, err)
	}
	if got := privileges(t, f.pool); got != fenced {
		t.Errorf("privileges changed:\n%s\nwant:\n%s", got, fenced)
	}
	// Closed to app, the other database no longer stops it.
	if err := e.pg.Exec(ctx, "REVOKE CONNECT ON DATABASE live FROM PUBLIC"); err != nil {
		t.Fatal(err)
	}
	if _, err := f.ShiftToLogins(ctx, 1, 0, false); err != nil {
		t.Fatal(err)
	}
	if err := f.Unfence(ctx, 2); err != nil {
		t.Fatal(err)
	}
}

// More tables than the drain can lock at once are refused at Prepare,
// naming the setting to raise, before anything is changed.
func TestPrepareRefusesMoreTablesThanTheDrainCanLock(t *testing.T) {
	ctx := context.Background()
	// 10 connections x 10 locks: a lock table of 100 entries.
	pg := integration.NewPostgres(t, integration.PostgresOptions{Settings: map[string]string{"max_connections": "10", "max_locks_per_transaction": "10"}})
	if err := pg.Exec(ctx, appSetup); err != nil {
		t.Fatal(err)
	}
	tables := slices.Clone(allTables)
	for i := 0; i < 60; i++ {
		if err := pg.Exec(ctx, fmt.Sprintf("CREATE TABLE extra_%d (id int PRIMARY KEY); GRANT INSERT ON extra_%d TO app", i, i)); err != nil {
			t.Fatal(err)
		}
		tables = append(tables, fmt.Sprintf("public.extra_%d", i))
	}
	f := New(newPool(t, pg.DSN()), Options{Plan: "p1", Pair: "db", Tables: tables, Roles: []string{"app"}})
	err := f.Prepare(ctx)
	if err == nil || !strings.Contains(err.Error(), "max_locks_per_transaction to at least") {
		t.Fatalf("prepare with 63 tables and a lock table of 100: %v, want a refusal naming max_locks_per_transaction", err)
	}
	var exists bool
	if err := newPool(t, pg.DSN()).QueryRow(ctx, "SELECT to_regnamespace('cutover') IS NOT NULL").Scan(&exists); err != nil || exists {
		t.Errorf("schema cutover created by a refused prepare: %v %v", exists, err)
	}
	if err := New(newPool(t, pg.DSN()), Options{Plan: "p1", Pair: "db", Tables: allTables, Roles: []string{"app"}}).Prepare(ctx); err != nil {
		t.Errorf("prepare with 3 tables: %v", err)
	}
}
