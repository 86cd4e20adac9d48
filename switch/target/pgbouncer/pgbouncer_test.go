package pgbouncer

import (
	"context"
	"errors"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/switch/target"
)

// bouncerRig is a blue and a green PostgreSQL behind one PgBouncer whose
// database "appdb" points at blue, and a pgbouncer target for it.
type bouncerRig struct {
	blue, green *integration.Postgres
	pgb         *integration.PgBouncer
	target      *PgBouncer
}

func newBouncerRig(t *testing.T, poolMode string, pauseTimeout time.Duration) *bouncerRig {
	t.Helper()
	ctx := context.Background()
	r := &bouncerRig{blue: integration.NewPostgres(t, integration.PostgresOptions{}), green: integration.NewPostgres(t, integration.PostgresOptions{})}
	for _, p := range []*integration.Postgres{r.blue, r.green} {
		if err := p.Exec(ctx, `CREATE ROLE app LOGIN PASSWORD 'app-pw'; CREATE TABLE t (x int); GRANT SELECT, INSERT ON t TO app`); err != nil {
			t.Fatal(err)
		}
	}
	r.pgb = integration.NewPgBouncer(t, integration.PgBouncerOptions{
		Databases: map[string]string{"appdb": r.blue.PgBouncerEntry(r.blue.Database), "other": r.blue.PgBouncerEntry(r.blue.Database)},
		Users:     map[string]string{"app": "app-pw"},
		PoolMode:  poolMode,
	})
	var err error
	r.target, err = NewPgBouncer(PgBouncerOptions{
		AdminDSN: r.pgb.AdminDSN(), Database: "appdb", File: r.pgb.DatabasesFile,
		Blue: r.blue.PgBouncerEntry(r.blue.Database), Green: r.green.PgBouncerEntry(r.green.Database),
		PauseTimeout: pauseTimeout,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.target.Close() })
	return r
}

// app connects as the application through PgBouncer (transaction pooling:
// the simple protocol, no prepared statements kept across transactions).
func (r *bouncerRig) app(t *testing.T) *pgx.Conn {
	t.Helper()
	c, err := pgx.Connect(context.Background(), r.pgb.DSNFor("appdb", "app", "app-pw")+"&default_query_exec_mode=simple_protocol")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// side says which server answers a new transaction through PgBouncer.
func (r *bouncerRig) side(t *testing.T, c *pgx.Conn) string {
	t.Helper()
	var port int
	if err := c.QueryRow(context.Background(), "SELECT current_setting('port')::int").Scan(&port); err != nil {
		t.Fatal(err)
	}
	switch port {
	case r.blue.Port:
		return "blue"
	case r.green.Port:
		return "green"
	}
	return "?"
}

func (r *bouncerRig) paused(t *testing.T) bool {
	t.Helper()
	db, err := r.target.showDatabase(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return db["paused"] == "1"
}

func count(t *testing.T, p *integration.Postgres) int {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), p.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var n int
	if err := conn.QueryRow(context.Background(), "SELECT count(*) FROM t").Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// Pause waits for a transaction in flight, which then commits on blue;
// a transaction begun while paused waits, then runs on green once the
// entry is repointed and the pool resumed; neither sees an error.
func TestPgBouncerPauseRepointResumeMovesTransactionsToGreen(t *testing.T) {
	ctx := context.Background()
	r := newBouncerRig(t, "", 5*time.Second)
	if err := r.target.Warm(ctx); err != nil {
		t.Fatal(err)
	}
	inTx, waiter := r.app(t), r.app(t)
	if got := r.side(t, inTx); got != "blue" {
		t.Fatalf("before the flip: %s", got)
	}
	tx, err := inTx.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "INSERT INTO t VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	var commitErr error
	var committedAt time.Time
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		time.Sleep(300 * time.Millisecond)
		if _, err := tx.Exec(ctx, "INSERT INTO t VALUES (2)"); err != nil {
			commitErr = err
			return
		}
		// PgBouncer frees the server connection when the COMMIT's answer
		// passes through it, about when the client reads it: PAUSE may
		// return a moment before Commit does, never before it was sent.
		committedAt = time.Now()
		commitErr = tx.Commit(ctx)
	}()
	began := time.Now()
	if err := r.target.Pause(ctx, 7); err != nil {
		t.Fatal(err)
	}
	pausedAt := time.Now()
	wg.Wait()
	if commitErr != nil {
		t.Fatalf("the transaction across PAUSE failed: %v", commitErr)
	}
	if pausedAt.Before(committedAt) || pausedAt.Sub(began) < 250*time.Millisecond {
		t.Fatalf("PAUSE returned after %s, before the transaction in flight committed", pausedAt.Sub(began))
	}
	if !r.paused(t) {
		t.Fatal("not paused after Pause")
	}
	// A new transaction waits in PgBouncer while paused.
	type result struct {
		side string
		err  error
		at   time.Time
	}
	done := make(chan result, 1)
	go func() {
		var port int
		_, err := waiter.Exec(ctx, "INSERT INTO t VALUES (3)")
		if err == nil {
			err = waiter.QueryRow(ctx, "SELECT current_setting('port')::int").Scan(&port)
		}
		side := "blue"
		if port == r.green.Port {
			side = "green"
		}
		done <- result{side, err, time.Now()}
	}()
	time.Sleep(200 * time.Millisecond)
	select {
	case res := <-done:
		t.Fatalf("a transaction ran while paused: %+v", res)
	default:
	}
	resumedAt := time.Now()
	if err := r.target.Flip(ctx, target.Flip{Plan: "p", From: "blue", To: "green", Epoch: 8}); err != nil {
		t.Fatal(err)
	}
	res := <-done
	if res.err != nil || res.side != "green" {
		t.Fatalf("the held transaction: side %s, err %v; want green, no error", res.side, res.err)
	}
	if res.at.Before(resumedAt) {
		t.Fatal("the held transaction finished before the flip")
	}
	if r.paused(t) {
		t.Fatal("still paused after the flip")
	}
	if got := r.side(t, inTx); got != "green" {
		t.Fatalf("after the flip, the connected client's next transaction runs on %s", got)
	}
	if b, g := count(t, r.blue), count(t, r.green); b != 2 || g != 1 {
		t.Fatalf("rows: blue %d (want 2), green %d (want 1)", b, g)
	}
	colour, epoch, err := r.target.Route()
	if err != nil || colour != "green" || epoch != 8 {
		t.Fatalf("route %s@%d %v", colour, epoch, err)
	}
	// The other entry of the file is left alone; the previous content is kept.
	data, _ := os.ReadFile(r.pgb.DatabasesFile)
	if !strings.Contains(string(data), "other = "+r.blue.PgBouncerEntry(r.blue.Database)) {
		t.Fatalf("the other entry changed:\n%s", data)
	}
	if prev, err := os.ReadFile(r.pgb.DatabasesFile + ".prev"); err != nil || !strings.Contains(string(prev), "appdb = "+r.blue.PgBouncerEntry(r.blue.Database)) {
		t.Fatalf("previous content not kept: %v\n%s", err, prev)
	}
	// The same flip again (a new leader's retry) is harmless.
	if err := r.target.Flip(ctx, target.Flip{Plan: "p", From: "blue", To: "green", Epoch: 8}); err != nil {
		t.Fatalf("retry: %v", err)
	}
}

// A lower epoch can neither pause, resume nor repoint.
func TestPgBouncerRefusesStaleEpoch(t *testing.T) {
	ctx := context.Background()
	r := newBouncerRig(t, "", time.Second)
	if err := r.target.Pause(ctx, 20); err != nil {
		t.Fatal(err)
	}
	if err := r.target.Flip(ctx, target.Flip{To: "green", Epoch: 19}); !errors.Is(err, target.ErrStaleEpoch) {
		t.Fatalf("stale flip: %v", err)
	}
	if err := r.target.Resume(ctx, 19, ""); !errors.Is(err, target.ErrStaleEpoch) {
		t.Fatalf("stale resume: %v", err)
	}
	if !r.paused(t) {
		t.Fatal("a stale resume let the pool go")
	}
	if err := r.target.Pause(ctx, 19); !errors.Is(err, target.ErrStaleEpoch) {
		t.Fatalf("stale pause: %v", err)
	}
	colour, epoch, _ := r.target.Route()
	if colour != "blue" || epoch != 20 {
		t.Fatalf("route %s@%d, want blue@20", colour, epoch)
	}
	// Another target instance (a new leader) with a higher epoch proceeds.
	other, err := NewPgBouncer(PgBouncerOptions{AdminDSN: r.pgb.AdminDSN(), Database: "appdb", File: r.pgb.DatabasesFile,
		Blue: r.blue.PgBouncerEntry(r.blue.Database), Green: r.green.PgBouncerEntry(r.green.Database)})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if err := other.Flip(ctx, target.Flip{To: "green", Epoch: 21}); err != nil {
		t.Fatal(err)
	}
	if got := r.side(t, r.app(t)); got != "green" {
		t.Fatalf("after the new leader's flip: %s", got)
	}
	if err := r.target.Flip(ctx, target.Flip{To: "blue", Epoch: 20}); !errors.Is(err, target.ErrStaleEpoch) {
		t.Fatalf("the deposed leader repointed: %v", err)
	}
}

// The way back: pause on green, repoint to blue, resume.
func TestPgBouncerRollbackToBlue(t *testing.T) {
	ctx := context.Background()
	r := newBouncerRig(t, "", time.Second)
	c := r.app(t)
	if err := r.target.Pause(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if err := r.target.Flip(ctx, target.Flip{To: "green", Epoch: 2}); err != nil {
		t.Fatal(err)
	}
	if got := r.side(t, c); got != "green" {
		t.Fatalf("after the flip: %s", got)
	}
	if err := r.target.Pause(ctx, 3); err != nil {
		t.Fatal(err)
	}
	if err := r.target.Resume(ctx, 4, "blue"); err != nil {
		t.Fatal(err)
	}
	if got := r.side(t, c); got != "blue" {
		t.Fatalf("after the rollback: %s", got)
	}
	if r.paused(t) {
		t.Fatal("paused after the rollback")
	}
}

// A transaction that outlives the pause timeout: Pause fails, the pool is
// resumed and still points at blue, and that transaction commits.
func TestPgBouncerPauseTimeoutResumes(t *testing.T) {
	ctx := context.Background()
	r := newBouncerRig(t, "", 300*time.Millisecond)
	long, other := r.app(t), r.app(t)
	tx, err := long.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "INSERT INTO t VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	err = r.target.Pause(ctx, 5)
	if err == nil || !strings.Contains(err.Error(), "pause timeout") {
		t.Fatalf("Pause with a transaction past the timeout: %v", err)
	}
	if took := time.Since(began); took > 2*time.Second {
		t.Fatalf("Pause took %s past a 300ms timeout", took)
	}
	if r.paused(t) {
		t.Fatal("the pool stays paused after a pause timeout")
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatalf("the long transaction: %v", err)
	}
	if got := r.side(t, other); got != "blue" {
		t.Fatalf("after a failed pause: %s", got)
	}
}

// Warm refuses what would make the pause or the flip fail inside the
// window: session pooling, an entry that is neither side.
func TestPgBouncerWarmRefuses(t *testing.T) {
	ctx := context.Background()
	r := newBouncerRig(t, "session", time.Second)
	if err := r.target.Warm(ctx); err == nil || !strings.Contains(err.Error(), "pool_mode is session") {
		t.Fatalf("session pooling: %v", err)
	}
	r2 := newBouncerRig(t, "", time.Second)
	if err := os.WriteFile(r2.pgb.DatabasesFile, []byte("appdb = host=127.0.0.1 port=1 dbname=x\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := r2.target.Warm(ctx); err == nil || !strings.Contains(err.Error(), "neither the configured blue nor green") {
		t.Fatalf("unknown entry: %v", err)
	}
	// PgBouncer's default server_login_retry (15 s): a login cut short by
	// PAUSE would hold the clients that long after RESUME.
	slow := integration.NewPgBouncer(t, integration.PgBouncerOptions{
		Databases: map[string]string{"appdb": r2.blue.PgBouncerEntry(r2.blue.Database)},
		Settings:  map[string]string{"server_login_retry": "15"},
	})
	st, err := NewPgBouncer(PgBouncerOptions{AdminDSN: slow.AdminDSN(), Database: "appdb", File: slow.DatabasesFile,
		Blue: r2.blue.PgBouncerEntry(r2.blue.Database), Green: r2.green.PgBouncerEntry(r2.green.Database)})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if err := st.Warm(ctx); err == nil || !strings.Contains(err.Error(), "server_login_retry") {
		t.Fatalf("server_login_retry 15s: %v", err)
	}
	if _, err := NewPgBouncer(PgBouncerOptions{AdminDSN: r2.pgb.AdminDSN(), Database: "appdb", File: r2.pgb.DatabasesFile, Blue: "host=a password=secret", Green: "host=b"}); err == nil || strings.Contains(err.Error(), "secret") {
		t.Fatalf("a password in an entry: %v", err)
	}
}
