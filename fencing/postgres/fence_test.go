package postgres

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cutover/cutover/fencing"
	"github.com/cutover/cutover/integration"
)

const appSetup = `
CREATE ROLE app LOGIN PASSWORD 'app-password';
CREATE ROLE writers NOLOGIN;
CREATE ROLE reporting LOGIN PASSWORD 'reporting-password';
CREATE ROLE outsider LOGIN PASSWORD 'outsider-password';
GRANT writers TO app;
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL DEFAULT 0);
CREATE TABLE history (id bigserial PRIMARY KEY, account int NOT NULL, delta bigint NOT NULL, note text);
CREATE TABLE notes (id int PRIMARY KEY, body text);
INSERT INTO accounts SELECT g, 0 FROM generate_series(1, 100) g;
GRANT SELECT, INSERT, UPDATE, DELETE ON accounts TO app;
GRANT SELECT ON accounts, history, notes TO reporting;
GRANT INSERT, SELECT ON history TO writers;
GRANT USAGE ON SEQUENCE history_id_seq TO writers;
GRANT INSERT (id, body), SELECT ON notes TO app;
GRANT UPDATE ON notes TO PUBLIC;
GRANT SELECT, UPDATE ON notes TO reporting WITH GRANT OPTION;
GRANT ALL ON accounts, history, notes TO outsider;
GRANT USAGE ON SEQUENCE history_id_seq TO outsider;
`

type env struct {
	pg     *integration.Postgres
	agent  *pgxpool.Pool
	fencer *Fencer
}

func newEnv(t *testing.T) *env {
	t.Helper()
	ctx := context.Background()
	pg := integration.NewPostgres(t, integration.PostgresOptions{})
	if err := pg.Exec(ctx, appSetup); err != nil {
		t.Fatal(err)
	}
	e := &env{pg: pg, agent: newPool(t, pg.DSN())}
	e.fencer = e.newFencer(t)
	return e
}

func (e *env) newFencer(t *testing.T) *Fencer {
	t.Helper()
	f := New(newPool(t, e.pg.DSN()), Options{Plan: "p1", Pair: "db", Tables: []string{"public.accounts", "public.history", "public.notes"}, Roles: []string{"app"}})
	if err := f.Prepare(context.Background()); err != nil {
		t.Fatal(err)
	}
	return f
}

func newPool(t testing.TB, dsn string) *pgxpool.Pool {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

func connect(t testing.TB, dsn string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// privileges returns every privilege on the tables in scope, on tables and
// columns, one line each.
func privileges(t *testing.T, pool *pgxpool.Pool) string {
	t.Helper()
	var out string
	err := pool.QueryRow(context.Background(), `
		SELECT string_agg(x, E'\n' ORDER BY x) FROM (
			SELECT c.relname || ' ' || pg_get_userbyid(a.grantor) || '->' || CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END || ' ' || a.privilege_type || ' ' || a.is_grantable AS x
			FROM pg_class c, aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
			WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'
			UNION ALL
			SELECT c.relname || '.' || att.attname || ' ' || pg_get_userbyid(a.grantor) || '->' || pg_get_userbyid(a.grantee) || ' ' || a.privilege_type || ' ' || a.is_grantable
			FROM pg_class c JOIN pg_attribute att ON att.attrelid = c.oid AND att.attacl IS NOT NULL, aclexplode(att.attacl) a
			WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r') s`).Scan(&out)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func sqlState(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return ""
}

func TestFenceStopsWritesInOpenSessionsAndLeavesReadsAndIdleSessionsAlone(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	appDSN := e.pg.DSNFor("cutover", "app", "app-password")

	openSession := connect(t, appDSN) // connected before the fence, idle
	idleReader := connect(t, appDSN)  // idle in a read transaction
	idleWriter := connect(t, appDSN)  // idle in a transaction that wrote
	midTxn := connect(t, appDSN)      // wrote once, will try again after the fence
	for _, c := range []*pgx.Conn{openSession, idleReader, idleWriter, midTxn} {
		if _, err := c.Exec(ctx, "SELECT 1"); err != nil {
			t.Fatal(err)
		}
	}
	mustExec(t, idleReader, "BEGIN")
	mustExec(t, idleReader, "SELECT count(*) FROM accounts")
	mustExec(t, idleWriter, "BEGIN")
	mustExec(t, idleWriter, "UPDATE accounts SET balance = balance + 1 WHERE id = 1")
	mustExec(t, midTxn, "BEGIN")
	mustExec(t, midTxn, "UPDATE accounts SET balance = balance + 1 WHERE id = 2")

	if err := e.fencer.Fence(ctx, 10); err != nil {
		t.Fatal(err)
	}

	for name, sql := range map[string]string{
		"update":          "UPDATE accounts SET balance = 5 WHERE id = 3",
		"insert via role": "INSERT INTO history (account, delta) VALUES (1, 1)",
		"column insert":   "INSERT INTO notes (id, body) VALUES (1, 'x')",
		"public update":   "UPDATE notes SET body = 'y'",
		"delete":          "DELETE FROM accounts WHERE id = 4",
	} {
		_, err := openSession.Exec(ctx, sql)
		if got := sqlState(err); got != "42501" {
			t.Errorf("%s in an open session after the fence: err = %v (SQLSTATE %q), want 42501", name, err, got)
		}
	}
	if _, err := midTxn.Exec(ctx, "UPDATE accounts SET balance = balance + 1 WHERE id = 2"); sqlState(err) != "42501" {
		t.Errorf("second write of an open transaction: err = %v, want 42501", err)
	}
	fresh := connect(t, appDSN)
	if _, err := fresh.Exec(ctx, "UPDATE accounts SET balance = 1 WHERE id = 5"); sqlState(err) != "42501" {
		t.Errorf("write in a new session: err = %v, want 42501", err)
	}
	var n int
	if err := openSession.QueryRow(ctx, "SELECT count(*) FROM accounts").Scan(&n); err != nil || n != 100 {
		t.Errorf("read after the fence: n=%d err=%v", n, err)
	}

	drained, err := e.fencer.Drain(ctx, 10, 200*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	var killedPIDs []uint32
	for _, s := range drained.Terminated {
		killedPIDs = append(killedPIDs, uint32(s.PID))
	}
	if got, want := fmt.Sprint(killedPIDs), fmt.Sprint([]uint32{idleWriter.PgConn().PID()}); got != want {
		t.Errorf("terminated %v, want only the idle writer %v", got, want)
	}
	if drained.Marker.Nonce == "" || drained.Marker.Position == "" || drained.Marker.Epoch != 10 {
		t.Errorf("marker = %+v", drained.Marker)
	}
	if err := idleReader.QueryRow(ctx, "SELECT count(*) FROM accounts").Scan(&n); err != nil {
		t.Errorf("the idle reader was disturbed: %v", err)
	}
	if err := openSession.Ping(ctx); err != nil {
		t.Errorf("the idle session was killed: %v", err)
	}
	// The idle writer's uncommitted update is gone with its session.
	var bal int64
	if err := e.agent.QueryRow(ctx, "SELECT balance FROM accounts WHERE id = 1").Scan(&bal); err != nil || bal != 0 {
		t.Errorf("balance of the terminated writer's row = %d, %v; want 0", bal, err)
	}
	var markerBeforePosition bool
	if err := e.agent.QueryRow(ctx, "SELECT pg_current_wal_lsn() >= $1::pg_lsn", drained.Marker.Position).Scan(&markerBeforePosition); err != nil || !markerBeforePosition {
		t.Errorf("marker position %s is not a past WAL position: %v", drained.Marker.Position, err)
	}
	st, err := e.fencer.State(ctx)
	if err != nil || !st.Fenced || st.Epoch != 10 {
		t.Errorf("state = %+v, %v", st, err)
	}
}

func TestNoWriteCommitsAfterTheMarkerUnderConcurrentWriters(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	appDSN := e.pg.DSNFor("cutover", "app", "app-password")
	const writers = 8
	var acked sync.Map // history id -> struct{}
	var ackCount, failed atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		conn := connect(t, appDSN)
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				var id int64
				err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
					if _, err := tx.Exec(ctx, "UPDATE accounts SET balance = balance + 1 WHERE id = $1", 1+(w*7+i)%100); err != nil {
						return err
					}
					if i%5 == 0 {
						time.Sleep(20 * time.Millisecond) // some transactions are long
					}
					return tx.QueryRow(ctx, "INSERT INTO history (account, delta, note) VALUES ($1, 1, $2) RETURNING id", 1+(w*7+i)%100, fmt.Sprintf("w%d-%d", w, i)).Scan(&id)
				})
				if err == nil {
					acked.Store(id, struct{}{})
					ackCount.Add(1)
				} else {
					failed.Add(1)
					if conn.IsClosed() {
						return
					}
					time.Sleep(time.Millisecond)
				}
			}
		}(w)
	}
	time.Sleep(300 * time.Millisecond)
	if err := e.fencer.Fence(ctx, 1); err != nil {
		t.Fatal(err)
	}
	drained, err := e.fencer.Drain(ctx, 1, 100*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // writers keep trying behind the fence
	close(stop)
	wg.Wait()
	if ackCount.Load() == 0 {
		t.Fatal("no write was acknowledged before the fence")
	}
	// Every acknowledged write is on blue, and none committed after the
	// marker: the marker's transaction id is the newest of all.
	var missing int
	acked.Range(func(k, _ any) bool {
		var one int
		if err := e.agent.QueryRow(ctx, "SELECT 1 FROM history WHERE id = $1", k).Scan(&one); err != nil {
			missing++
		}
		return true
	})
	if missing > 0 {
		t.Errorf("%d acknowledged writes missing on blue", missing)
	}
	var after int
	err = e.agent.QueryRow(ctx, `SELECT count(*) FROM history h
		WHERE h.xmin::text::bigint > (SELECT m.xmin::text::bigint FROM cutover.markers m WHERE nonce = $1)`, drained.Marker.Nonce).Scan(&after)
	if err != nil {
		t.Fatal(err)
	}
	if after != 0 {
		t.Errorf("%d writes committed after the marker", after)
	}
	t.Logf("acknowledged %d, refused %d, terminated %d, drain waited %s", ackCount.Load(), failed.Load(), len(drained.Terminated), drained.Waited)
}

func TestUnfenceRestoresExactlyThePreFenceState(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	before := privileges(t, e.agent)
	if err := e.fencer.Fence(ctx, 3); err != nil {
		t.Fatal(err)
	}
	during := privileges(t, e.agent)
	if during == before {
		t.Fatal("fence changed no privilege")
	}
	if !strings.Contains(during, "postgres->outsider INSERT") {
		t.Errorf("fence touched a role outside its scope:\n%s", during)
	}
	if err := e.fencer.Fence(ctx, 3); err != nil {
		t.Fatalf("second fence: %v", err)
	}
	if err := e.fencer.Unfence(ctx, 4); err != nil {
		t.Fatal(err)
	}
	if after := privileges(t, e.agent); after != before {
		t.Errorf("privileges after unfence differ:\n--- before\n%s\n--- after\n%s", before, after)
	}
	if err := e.fencer.Unfence(ctx, 4); err != nil {
		t.Fatalf("second unfence: %v", err)
	}
	if after := privileges(t, e.agent); after != before {
		t.Errorf("second unfence changed privileges")
	}
	app := connect(t, e.pg.DSNFor("cutover", "app", "app-password"))
	for _, sql := range []string{
		"UPDATE accounts SET balance = 1 WHERE id = 1",
		"INSERT INTO history (account, delta) VALUES (1, 1)",
		"INSERT INTO notes (id, body) VALUES (7, 'back')",
	} {
		if _, err := app.Exec(ctx, sql); err != nil {
			t.Errorf("%s after unfence: %v", sql, err)
		}
	}
}

func TestStaleEpochIsRefusedAndANewAgentUnfencesAfterACrash(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	before := privileges(t, e.agent)
	if err := e.fencer.Fence(ctx, 7); err != nil {
		t.Fatal(err)
	}
	// The fencing agent "crashes": its pool goes away with the fence up.
	e.fencer.pool.Close()

	next := e.newFencer(t)
	st, err := next.State(ctx)
	if err != nil || !st.Fenced || st.Epoch != 7 {
		t.Fatalf("state seen by the next leader = %+v, %v", st, err)
	}
	if err := next.Unfence(ctx, 6); !errors.Is(err, fencing.ErrStaleEpoch) {
		t.Errorf("unfence with a lower epoch: err = %v, want ErrStaleEpoch", err)
	}
	if err := next.Fence(ctx, 5); !errors.Is(err, fencing.ErrStaleEpoch) {
		t.Errorf("fence with a lower epoch: err = %v, want ErrStaleEpoch", err)
	}
	if _, err := next.FenceDrain(ctx, 5, time.Millisecond); !errors.Is(err, fencing.ErrStaleEpoch) {
		t.Errorf("fence and drain with a lower epoch: err = %v, want ErrStaleEpoch", err)
	}
	if _, err := next.Drain(ctx, 6, time.Millisecond); !errors.Is(err, fencing.ErrStaleEpoch) {
		t.Errorf("drain with a lower epoch: err = %v, want ErrStaleEpoch", err)
	}
	if privileges(t, e.agent) == before {
		t.Error("a refused unfence restored privileges")
	}
	if err := next.Unfence(ctx, 9); err != nil {
		t.Fatal(err)
	}
	if after := privileges(t, e.agent); after != before {
		t.Errorf("privileges after the next leader's unfence differ:\n--- before\n%s\n--- after\n%s", before, after)
	}
	if _, err := next.Drain(ctx, 9, time.Millisecond); !errors.Is(err, fencing.ErrNotFenced) {
		t.Errorf("drain when not fenced: err = %v, want ErrNotFenced", err)
	}
}

func TestPrepareRefusesWhatCannotBeFenced(t *testing.T) {
	ctx := context.Background()
	pg := integration.NewPostgres(t, integration.PostgresOptions{})
	if err := pg.Exec(ctx, appSetup+"CREATE ROLE boss SUPERUSER LOGIN;"); err != nil {
		t.Fatal(err)
	}
	pool := newPool(t, pg.DSN())
	tests := []struct {
		name string
		opts Options
		want string
	}{
		{"missing table", Options{Tables: []string{"public.accounts", "public.nope"}, Roles: []string{"app"}}, "fence: tables not found: public.nope"},
		{"superuser role", Options{Tables: []string{"public.accounts"}, Roles: []string{"app", "boss"}}, "fence: roles boss are superusers"},
		{"unknown role", Options{Tables: []string{"public.accounts"}, Roles: []string{"ghost"}}, "fence: roles not found: ghost"},
		{"no tables", Options{Roles: []string{"app"}}, "fence: no tables in scope"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.opts.Plan, tt.opts.Pair = "p", "db"
			err := New(pool, tt.opts).Prepare(ctx)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("err = %v, want %q", err, tt.want)
			}
		})
	}
	app := newPool(t, pg.DSNFor("cutover", "app", "app-password"))
	err := New(app, Options{Plan: "p", Pair: "db", Tables: []string{"public.accounts"}}).Prepare(ctx)
	if err == nil || !strings.Contains(err.Error(), "fence: the agent's role can neither revoke nor grant on public.accounts") {
		t.Errorf("prepare as a role that may not create the schema or revoke: err = %v", err)
	}
}

func mustExec(t *testing.T, c *pgx.Conn, sql string) {
	t.Helper()
	if _, err := c.Exec(context.Background(), sql); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

// waitForLock waits until the session pid waits on a heavyweight lock.
func waitForLock(t *testing.T, pool *pgxpool.Pool, pid uint32, returned <-chan error) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var waiting bool
		if err := pool.QueryRow(context.Background(), `SELECT coalesce(wait_event_type = 'Lock', false) FROM pg_stat_activity WHERE pid = $1`, pid).Scan(&waiting); err != nil {
			t.Fatal(err)
		}
		if waiting {
			return
		}
		select {
		case err := <-returned:
			t.Fatalf("the write returned instead of waiting for the hold: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("the write never waited for the hold")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// startWrite runs sql on c in the background and reports its error.
func startWrite(c *pgx.Conn, sql string) <-chan error {
	done := make(chan error, 1)
	go func() {
		_, err := c.Exec(context.Background(), sql)
		done <- err
	}()
	return done
}

func result(t *testing.T, done <-chan error) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("the write is still waiting")
		return nil
	}
}

// shareLocks counts the SHARE locks held on the tables in scope.
func shareLocks(t *testing.T, pool *pgxpool.Pool) int {
	t.Helper()
	var n int
	err := pool.QueryRow(context.Background(), `SELECT count(*) FROM pg_locks WHERE mode = 'ShareLock' AND granted
		AND relation IN ('public.accounts'::regclass, 'public.history'::regclass, 'public.notes'::regclass)`).Scan(&n)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestHeldWritersWaitThenFailOnReleaseAndGoOnAfterUnfence(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	appDSN := e.pg.DSNFor("cutover", "app", "app-password")
	before := privileges(t, e.agent)
	f := New(newPool(t, e.pg.DSN()), Options{Plan: "p1", Pair: "db", Tables: []string{"public.accounts", "public.history", "public.notes"}, Roles: []string{"app"}, Hold: 5 * time.Second})
	if err := f.Prepare(ctx); err != nil {
		t.Fatal(err)
	}
	idleWriter := connect(t, appDSN)
	mustExec(t, idleWriter, "BEGIN")
	mustExec(t, idleWriter, "UPDATE accounts SET balance = balance + 1 WHERE id = 1")
	writer, reader := connect(t, appDSN), connect(t, appDSN)

	drained, err := f.FenceDrain(ctx, 3, 100*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if !drained.Held || len(drained.Terminated) != 1 || drained.Terminated[0].PID != int32(idleWriter.PgConn().PID()) {
		t.Fatalf("drained = %+v: want held, the idle writer terminated", drained)
	}
	if n := shareLocks(t, e.agent); n != 3 {
		t.Errorf("%d SHARE locks held on the 3 tables in scope", n)
	}
	// While held, a write waits (it neither fails nor lands) and reads go on.
	write := startWrite(writer, "UPDATE accounts SET balance = 7 WHERE id = 2")
	waitForLock(t, e.agent, writer.PgConn().PID(), write)
	var n int
	if err := reader.QueryRow(ctx, "SELECT count(*) FROM accounts").Scan(&n); err != nil || n != 100 {
		t.Errorf("read while held: n=%d err=%v", n, err)
	}
	f.Release(ctx)
	if err := result(t, write); sqlState(err) != "42501" {
		t.Errorf("held write after the release: err = %v, want 42501", err)
	}
	if n := shareLocks(t, e.agent); n != 0 {
		t.Errorf("%d SHARE locks left after the release", n)
	}
	f.Release(ctx) // twice is a no-op

	// Held again, then lifted: the waiting write goes through.
	if _, err := f.FenceDrain(ctx, 4, 100*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	write = startWrite(writer, "UPDATE accounts SET balance = 8 WHERE id = 2")
	waitForLock(t, e.agent, writer.PgConn().PID(), write)
	if err := f.Unfence(ctx, 5); err != nil {
		t.Fatal(err)
	}
	if err := result(t, write); err != nil {
		t.Errorf("held write after the unfence: %v", err)
	}
	if after := privileges(t, e.agent); after != before {
		t.Errorf("privileges after the unfence differ:\n%s\n---\n%s", before, after)
	}
	if n := shareLocks(t, e.agent); n != 0 {
		t.Errorf("%d SHARE locks left after the unfence", n)
	}

	// A refused fence leaves nothing held.
	if _, err := f.FenceDrain(ctx, 2, 100*time.Millisecond); !errors.Is(err, fencing.ErrStaleEpoch) {
		t.Errorf("stale fence and drain while holding: err = %v, want ErrStaleEpoch", err)
	}
	if n := shareLocks(t, e.agent); n != 0 {
		t.Errorf("%d SHARE locks left after a refused fence", n)
	}
	if _, err := writer.Exec(ctx, "UPDATE accounts SET balance = 9 WHERE id = 2"); err != nil {
		t.Errorf("write after a refused fence: %v", err)
	}
}

func TestAHoldNobodyReleasesEndsOnTheServerAfterItsBound(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	const hold = 300 * time.Millisecond
	f := New(newPool(t, e.pg.DSN()), Options{Plan: "p1", Pair: "db", Tables: []string{"public.accounts", "public.history", "public.notes"}, Roles: []string{"app"}, Hold: hold})
	if err := f.Prepare(ctx); err != nil {
		t.Fatal(err)
	}
	writer := connect(t, e.pg.DSNFor("cutover", "app", "app-password"))
	start := time.Now()
	if _, err := f.FenceDrain(ctx, 1, 100*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	// The agent "vanishes" without releasing: its keepalives stop, and the
	// server ends the hold.
	f.mu.Lock()
	f.held.stopKeepalive()
	f.mu.Unlock()
	write := startWrite(writer, "UPDATE accounts SET balance = 7 WHERE id = 2")
	err := result(t, write)
	if sqlState(err) != "42501" {
		t.Errorf("write after the hold's bound: err = %v, want 42501", err)
	}
	if took := time.Since(start); took < hold {
		t.Errorf("the hold ended after %s, before its bound %s", took, hold)
	}
	if n := shareLocks(t, e.agent); n != 0 {
		t.Errorf("%d SHARE locks left after the hold's bound", n)
	}
	st, err := f.State(ctx)
	if err != nil || !st.Fenced {
		t.Errorf("the fence must outlive the hold: state %+v, %v", st, err)
	}
	f.Release(ctx) // the session is gone: still no error, no hang
	if err := f.Unfence(ctx, 2); err != nil {
		t.Fatal(err)
	}
	if _, err := writer.Exec(ctx, "UPDATE accounts SET balance = 8 WHERE id = 2"); err != nil {
		t.Errorf("write after the unfence: %v", err)
	}
}

// A writer that holds one table in scope and wants another once the drain
// has begun is not blocked by the drain (which never sits in the lock
// queue): it reaches its statement, which goes on or is refused by the
// fence, ends by itself, and the drain takes the lock without terminating
// it. Queued, the drain deadlocked with it (found after deadlock_timeout).
func TestAWriterMidTransactionIsNotBlockedByTheDrainAndEndsByItself(t *testing.T) {
	for _, hold := range []time.Duration{0, 5 * time.Second} {
		t.Run(fmt.Sprintf("hold=%s", hold), func(t *testing.T) {
			ctx := context.Background()
			e := newEnv(t)
			f := New(newPool(t, e.pg.DSN()), Options{Plan: "p1", Pair: "db", Tables: []string{"public.accounts", "public.history", "public.notes"}, Roles: []string{"app"}, Hold: hold})
			if err := f.Prepare(ctx); err != nil {
				t.Fatal(err)
			}
			writer := connect(t, e.pg.DSNFor("cutover", "app", "app-password"))
			mustExec(t, writer, "BEGIN")
			mustExec(t, writer, "INSERT INTO history (account, delta) VALUES (1, 1)")

			type drainedErr struct {
				d   fencing.Drained
				err error
			}
			done := make(chan drainedErr, 1)
			go func() {
				d, err := f.FenceDrain(ctx, 1, 5*time.Second)
				done <- drainedErr{d, err}
			}()
			// The drain is trying for the lock.
			deadline := time.Now().Add(10 * time.Second)
			for {
				var trying bool
				if err := e.agent.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE state = 'active' AND (query LIKE '%drain_v4%' OR query LIKE '%fence_v5%') AND pid <> pg_backend_pid())`).Scan(&trying); err != nil {
					t.Fatal(err)
				}
				if trying {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("the drain never tried for the lock")
				}
				time.Sleep(5 * time.Millisecond)
			}
			start := time.Now()
			_, werr := writer.Exec(ctx, "UPDATE accounts SET balance = balance + 1 WHERE id = 1")
			// PostgreSQL ends one of the two: the drain (it waited first, so
			// its deadlock check usually fires first), which then retries,
			// or, on a starved machine, the writer.
			if werr != nil && sqlState(werr) != "42501" && sqlState(werr) != "40P01" {
				t.Errorf("the writer's second write: %v (want it to go on, be refused by the fence, or be the deadlock's victim)", werr)
			}
			if took := time.Since(start); took > time.Second {
				t.Errorf("the writer's second write took %s: the drain blocked it", took)
			}
			mustExec(t, writer, "ROLLBACK")
			var got drainedErr
			select {
			case got = <-done:
			case <-time.After(15 * time.Second):
				t.Fatal("the drain did not return")
			}
			if got.err != nil {
				t.Fatalf("drain: %v", got.err)
			}
			if len(got.d.Terminated) != 0 {
				t.Errorf("terminated %+v: the writer ended by itself", got.d.Terminated)
			}
			if got.d.Waited >= 5*time.Second {
				t.Errorf("the drain waited %s, its whole grace", got.d.Waited)
			}
			f.Release(ctx)
		})
	}
}

func TestHeldBreachesListsWaitingWritersTheFenceWouldNotStop(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	f := New(newPool(t, e.pg.DSN()), Options{Plan: "p1", Pair: "db", Tables: []string{"public.accounts", "public.history", "public.notes"}, Roles: []string{"app"}, Hold: 5 * time.Second})
	if err := f.Prepare(ctx); err != nil {
		t.Fatal(err)
	}
	if held, err := f.HeldBreaches(ctx); err != nil || len(held) != 0 {
		t.Fatalf("before any hold: %v, %v", held, err)
	}
	if _, err := f.FenceDrain(ctx, 1, 100*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	app := connect(t, e.pg.DSNFor("cutover", "app", "app-password"))
	outsider := connect(t, e.pg.DSNFor("cutover", "outsider", "outsider-password"))
	reporting := connect(t, e.pg.DSNFor("cutover", "reporting", "reporting-password"))
	appWrite := startWrite(app, "UPDATE accounts SET balance = 1 WHERE id = 1")
	outsiderWrite := startWrite(outsider, "INSERT INTO history (account, delta) VALUES (1, 1)")
	// reporting may update notes (granted to it, outside the fence's roles).
	reportingWrite := startWrite(reporting, "UPDATE notes SET body = 'x'")
	for _, w := range []struct {
		c    *pgx.Conn
		done <-chan error
	}{{app, appWrite}, {outsider, outsiderWrite}, {reporting, reportingWrite}} {
		waitForLock(t, e.agent, w.c.PgConn().PID(), w.done)
	}
	held, err := f.HeldBreaches(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var pids []uint32
	for _, s := range held {
		pids = append(pids, uint32(s.PID))
	}
	want := []uint32{outsider.PgConn().PID(), reporting.PgConn().PID()}
	sort.Slice(want, func(i, j int) bool { return want[i] < want[j] })
	if fmt.Sprint(pids) != fmt.Sprint(want) {
		t.Errorf("held breaches %v (%+v), want the outsider and reporting sessions %v, not the fenced app %d", pids, held, want, app.PgConn().PID())
	}
	f.Release(ctx)
	if err := result(t, appWrite); sqlState(err) != "42501" {
		t.Errorf("the fenced write after the release: %v, want 42501", err)
	}
	for _, done := range []<-chan error{outsiderWrite, reportingWrite} {
		if err := result(t, done); err != nil {
			t.Errorf("a write outside the fence after the release: %v", err)
		}
	}
	if held, err := f.HeldBreaches(ctx); err != nil || len(held) != 0 {
		t.Errorf("after the release: %v, %v", held, err)
	}
}

func TestUnfenceRefusesASavedStateThatNamesWhatDoesNotExist(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	if err := e.fencer.Fence(ctx, 1); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{
		`[{"table": "accounts; DROP TABLE notes", "grantee": "app", "grantor": "postgres", "privilege": "INSERT"}]`,
		`[{"table": "accounts", "grantee": "app; DROP TABLE notes", "grantor": "postgres", "privilege": "INSERT"}]`,
		`[{"table": "accounts", "grantee": "app", "grantor": "postgres", "privilege": "INSERT ON notes TO PUBLIC; DROP TABLE notes; --"}]`,
		`[{"table": "accounts", "column": "id) ON notes TO PUBLIC; --", "grantee": "app", "grantor": "postgres", "privilege": "INSERT"}]`,
	} {
		if _, err := e.agent.Exec(ctx, `UPDATE cutover.fence_state_v3 SET saved = $1::jsonb`, bad); err != nil {
			t.Fatal(err)
		}
		err := e.fencer.Unfence(ctx, 2)
		if err == nil || !strings.Contains(err.Error(), "no longer exist") {
			t.Errorf("unfence with saved state %s: err = %v", bad, err)
		}
	}
	var notes bool
	if err := e.agent.QueryRow(ctx, `SELECT to_regclass('public.notes') IS NOT NULL`).Scan(&notes); err != nil || !notes {
		t.Errorf("table notes is gone (%v)", err)
	}
	if st, err := e.fencer.State(ctx); err != nil || !st.Fenced {
		t.Errorf("a refused unfence changed the state: %+v, %v", st, err)
	}
}

func TestReleaseRefusingAllCancelsWritersOutsideTheFence(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	f := New(newPool(t, e.pg.DSN()), Options{Plan: "p1", Pair: "db", Tables: []string{"public.accounts", "public.history", "public.notes"}, Roles: []string{"app"}, Hold: 5 * time.Second})
	if err := f.Prepare(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := f.FenceDrain(ctx, 1, 100*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	app := connect(t, e.pg.DSNFor("cutover", "app", "app-password"))
	outsider := connect(t, e.pg.DSNFor("cutover", "outsider", "outsider-password"))
	appWrite := startWrite(app, "UPDATE accounts SET balance = 1 WHERE id = 1")
	outsiderWrite := startWrite(outsider, "UPDATE accounts SET balance = 99 WHERE id = 2")
	waitForLock(t, e.agent, app.PgConn().PID(), appWrite)
	waitForLock(t, e.agent, outsider.PgConn().PID(), outsiderWrite)
	cancelled, err := f.ReleaseRefusingAll(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(cancelled) != 1 || cancelled[0].PID != int32(outsider.PgConn().PID()) {
		t.Errorf("cancelled %+v, want the outsider's session only", cancelled)
	}
	if err := result(t, outsiderWrite); sqlState(err) != "57014" {
		t.Errorf("the outsider's held write: %v, want 57014 (cancelled)", err)
	}
	if err := result(t, appWrite); sqlState(err) != "42501" {
		t.Errorf("the fenced write: %v, want 42501", err)
	}
	var balance int64
	if err := e.agent.QueryRow(ctx, "SELECT balance FROM accounts WHERE id = 2").Scan(&balance); err != nil || balance != 0 {
		t.Errorf("the cancelled write landed: balance %d, %v", balance, err)
	}
	if err := outsider.Ping(ctx); err != nil {
		t.Errorf("the outsider's session was closed: %v", err)
	}
	if n := shareLocks(t, e.agent); n != 0 {
		t.Errorf("%d SHARE locks left", n)
	}
}
