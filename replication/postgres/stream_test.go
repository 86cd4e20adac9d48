package postgres

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/replication"
)

func TestConcurrentLoadEndsIdenticalWithLagMeasuredThroughout(t *testing.T) {
	e := newPairEnv(t, loadSchema)
	seedLoad(t, e)
	var mu sync.Mutex
	changed := map[string]int{}
	opts := e.options(t)
	opts.OnRowChange = func(table string, key []string) {
		mu.Lock()
		changed[table]++
		mu.Unlock()
	}
	r := e.start(t, opts)
	e.sync(t, r)

	w := startWriter(t, e.blue.DSN(), 6)
	green, err := pgxpool.New(context.Background(), e.green.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer green.Close()
	deadline := time.Now().Add(loadDuration())
	var samples, atomicChecks int
	var maxLag replication.Lag
	for time.Now().Before(deadline) {
		time.Sleep(300 * time.Millisecond)
		l, err := r.Lag(context.Background())
		if err != nil {
			t.Fatalf("lag: %v", err)
		}
		samples++
		if l.Bytes > maxLag.Bytes {
			maxLag = l
		}
		// Every transfer is one transaction: green's sum never moves.
		sum, err := sumBalances(context.Background(), green)
		if err != nil {
			t.Fatal(err)
		}
		if sum != loadAccounts*1000 {
			t.Fatalf("green shows a partial transaction: sum of balances %d, want %d", sum, loadAccounts*1000)
		}
		atomicChecks++
		if r.Err() != nil {
			t.Fatal(r.Err())
		}
	}
	w.stop(t)
	e.sync(t, r)
	e.requireSame(t, "acct", "hist", "logbook")
	final, err := r.Lag(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	// The background probe keeps measuring by itself (gauges, status):
	// a sample newer than the last one taken here appears. (Checked after
	// the load: under the race detector on a starved two-core machine a
	// single measurement was seen to take over 10 s, so a wall-clock
	// bound during the load measured the machine, not the probe.)
	for deadline := time.Now().Add(30 * time.Second); !r.LastLag().At.After(final.At); {
		if time.Now().After(deadline) {
			t.Fatalf("no background lag sample after %s: last %+v", final.At, r.LastLag())
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("%d commits on blue; %d lag samples, max lag %d bytes / %s; final lag %d bytes / %s; status %+v",
		w.commits.Load(), samples, maxLag.Bytes, maxLag.Delay, final.Bytes, final.Delay, r.Status())
	if w.commits.Load() < 100 {
		t.Errorf("only %d commits: the load did not run", w.commits.Load())
	}
	if final.Delay > 2*time.Second {
		t.Errorf("caught up but lag reads %s", final.Delay)
	}
	mu.Lock()
	defer mu.Unlock()
	if changed["public.acct"] == 0 || changed["public.hist"] == 0 || changed["public.logbook"] == 0 {
		t.Errorf("OnRowChange saw %v", changed)
	}
	if _, ok := changed["cutover.heartbeat"]; ok {
		t.Errorf("OnRowChange reported bookkeeping tables: %v", changed)
	}
}

// TestRestartAfterKillMidStreamIsExactlyOnce kills the replicator several
// times under load (its context is cancelled without any shutdown work,
// as when the leader dies) and restarts it: green must end identical to
// blue, with every history row exactly once.
func TestRestartAfterKillMidStreamIsExactlyOnce(t *testing.T) {
	e := newPairEnv(t, loadSchema)
	seedLoad(t, e)
	w := startWriter(t, e.blue.DSN(), 4)
	for round := 0; round < 4; round++ {
		r, err := New(e.options(t))
		if err != nil {
			t.Fatal(err)
		}
		ctx, kill := context.WithCancel(context.Background())
		if err := r.Start(ctx); err != nil {
			t.Fatalf("round %d: start: %v", round, err)
		}
		time.Sleep(time.Duration(700+round*300) * time.Millisecond)
		kill()
		<-r.Done()
		if r.Err() != nil {
			t.Fatalf("round %d: %v", round, r.Err())
		}
	}
	w.stop(t)
	r := e.start(t, e.options(t))
	e.sync(t, r)
	e.requireSame(t, "acct", "hist", "logbook")
	if st := r.Status(); st.Restarts > 0 {
		t.Logf("status %+v", st)
	}
}

// TestRestartAfterKillMidCopyStartsTheCopyOver cancels the replicator
// while it copies, with writes going on, and restarts it.
func TestRestartAfterKillMidCopyStartsTheCopyOver(t *testing.T) {
	e := newPairEnv(t, loadSchema)
	seedLoad(t, e)
	e.exec(t, e.blue, `INSERT INTO hist (acct, delta) SELECT g % 1000 + 1, 0 FROM generate_series(1, 400000) g`)
	w := startWriter(t, e.blue.DSN(), 2)
	defer w.stop(t)

	opts := e.options(t)
	ctx, kill := context.WithCancel(context.Background())
	killed := make(chan replication.Progress, 1)
	opts.progressEvery = 20 * time.Millisecond
	opts.OnCopyProgress = func(p replication.Progress) {
		if p.Rows > 1000 && p.TablesDone < p.TablesTotal {
			select {
			case killed <- p:
				kill()
			default:
			}
		}
	}
	r, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	<-r.Done()
	select {
	case p := <-killed:
		t.Logf("killed during copy at %+v", p)
	default:
		t.Fatal("the copy finished before it could be killed")
	}

	r2 := e.start(t, e.options(t))
	time.Sleep(time.Second)
	w.stop(t)
	e.sync(t, r2)
	e.requireSame(t, "acct", "hist", "logbook")
}

func TestTransactionsAppearWholeEvenWhenAppliedInPieces(t *testing.T) {
	e := newPairEnv(t, loadSchema)
	seedLoad(t, e)
	opts := e.options(t)
	opts.MaxPendingChanges = 500 // a 20000-row transaction goes to green in 40 pieces
	r := e.start(t, opts)
	e.sync(t, r)

	green, err := pgxpool.New(context.Background(), e.green.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer green.Close()
	stop := make(chan struct{})
	seen := make(chan int64, 1000)
	go func() {
		defer close(seen)
		for {
			select {
			case <-stop:
				return
			default:
			}
			var n int64
			if err := green.QueryRow(context.Background(), `SELECT count(*) FROM hist`).Scan(&n); err == nil {
				seen <- n
			}
		}
	}()
	e.exec(t, e.blue, `INSERT INTO hist (acct, delta) SELECT g % 1000 + 1, 1 FROM generate_series(1, 20000) g`)
	e.exec(t, e.blue, `BEGIN; UPDATE acct SET balance = balance - 5 WHERE id = 1; UPDATE acct SET balance = balance + 5 WHERE id = 2; DELETE FROM hist WHERE id <= 100; COMMIT`)
	e.sync(t, r)
	close(stop)
	for n := range seen {
		if n != 0 && n != 20000 && n != 19900 {
			t.Fatalf("green showed %d history rows: a transaction was visible in part", n)
		}
	}
	e.requireSame(t, "acct", "hist")
}

func TestTablesOutsideTheScopeAreIgnored(t *testing.T) {
	e := newPairEnv(t, loadSchema+`CREATE TABLE skipped (id int PRIMARY KEY, v text);`)
	e.pair.Scope = config.Scope{ExcludeTables: []string{"public.skipped"}}
	r := e.start(t, e.options(t))
	e.exec(t, e.blue, `CREATE TABLE added_later (id int PRIMARY KEY, v text); INSERT INTO added_later VALUES (1, 'x')`)
	e.exec(t, e.blue, `INSERT INTO skipped VALUES (1, 'not replicated')`)
	e.exec(t, e.blue, `INSERT INTO acct VALUES (1, 5)`)
	e.sync(t, r)
	e.requireSame(t, "acct")
	if n := count(t, e.green, "skipped"); n != 0 {
		t.Errorf("green's skipped table has %d rows", n)
	}
	if r.Err() != nil {
		t.Fatal(r.Err())
	}
}
