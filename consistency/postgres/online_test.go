package postgres

import (
	"context"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cutover/cutover/consistency"
	"github.com/cutover/cutover/integration"
)

// fakeStream stands in for the replication engine: a writer updates
// random rows on blue, an applier copies each change to green after a
// delay (replication lag), calling the dirty set's MarkChanged first, as
// the engine's OnRowChange hook does. Positions are change sequence
// numbers.
type fakeStream struct {
	t           *testing.T
	blue, green *pgxpool.Pool
	dirty       *consistency.DirtySet
	lag         time.Duration
	keys        int // writes hit ids 1..keys

	issued  atomic.Int64 // sequence of the latest change written to blue
	applied atomic.Int64 // sequence of the latest change applied to green
	changes chan change
	// drop, when set, makes the applier mark a change but not apply it:
	// a lost change.
	drop atomic.Bool

	cancel context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex
	keysW  map[int]bool // distinct keys written
}

type change struct {
	seq   int64
	id, v int
	at    time.Time // written on blue
}

var _ consistency.PositionWaiter = (*fakeStream)(nil)

func newFakeStream(t *testing.T, p *pair, d *consistency.DirtySet, keys int, lag time.Duration) *fakeStream {
	t.Helper()
	ctx := context.Background()
	blue, err := pgxpool.New(ctx, p.blue.DSN())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(blue.Close)
	green, err := pgxpool.New(ctx, p.green.DSN())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(green.Close)
	return &fakeStream{t: t, blue: blue, green: green, dirty: d, lag: lag, keys: keys,
		changes: make(chan change, 100000), keysW: map[int]bool{}}
}

// start runs the writer (at most rate writes per second) and the applier
// until stop.
func (f *fakeStream) start(rate int) {
	ctx, cancel := context.WithCancel(context.Background())
	f.cancel = cancel
	f.t.Cleanup(f.stop) // also when the test fails early; stop is idempotent
	f.wg.Add(2)
	go func() { // writer
		defer f.wg.Done()
		defer close(f.changes)
		r := rand.New(rand.NewPCG(7, 11))
		tick := time.NewTicker(time.Second / time.Duration(rate))
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			if !f.write(ctx, r.IntN(f.keys)+1, r.IntN(1_000_000)) {
				return
			}
		}
	}()
	go func() { // applier
		defer f.wg.Done()
		for c := range f.changes {
			time.Sleep(time.Until(c.at.Add(f.lag)))
			f.apply(c)
		}
	}()
}

// write changes one row on blue and queues the change.
func (f *fakeStream) write(ctx context.Context, id, v int) bool {
	seq := f.issued.Add(1)
	if _, err := f.blue.Exec(ctx, "UPDATE accounts SET balance = $2 WHERE id = $1", id, v); err != nil {
		if ctx.Err() == nil {
			f.t.Error(err)
		}
		f.issued.Add(-1)
		return false
	}
	f.mu.Lock()
	f.keysW[id] = true
	f.mu.Unlock()
	f.changes <- change{seq: seq, id: id, v: v, at: time.Now()}
	return true
}

func (f *fakeStream) apply(c change) {
	// The hook runs before the change is visible on green.
	f.dirty.MarkChanged("public.accounts", []string{strconv.Itoa(c.id)})
	if !f.drop.Load() {
		if _, err := f.green.Exec(context.Background(), "UPDATE accounts SET balance = $2 WHERE id = $1", c.id, c.v); err != nil {
			f.t.Error(err)
		}
	}
	f.applied.Store(c.seq)
}

// stop ends the writer, lets the applier drain (the fence and catch-up),
// and waits for both.
func (f *fakeStream) stop() {
	f.cancel()
	f.wg.Wait()
}

func (f *fakeStream) BluePosition(ctx context.Context) (string, error) {
	return strconv.FormatInt(f.issued.Load(), 10), nil
}

func (f *fakeStream) WaitGreenApplied(ctx context.Context, pos string) error {
	want, err := strconv.ParseInt(pos, 10, 64)
	if err != nil {
		return err
	}
	for f.applied.Load() < want {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Millisecond):
		}
	}
	return nil
}

const accountsSetup = `
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL, note text);
INSERT INTO accounts SELECT g, g * 10, 'account ' || g FROM generate_series(1, 20000) g;
`

func newAccounts(t *testing.T) *pair {
	t.Helper()
	p := newPair(t, integration.PostgresOptions{}, integration.PostgresOptions{})
	p.both(t, accountsSetup)
	return p
}

func onlineOptions() consistency.Options {
	o := smallChunks(500)
	o.BisectRows = 8
	return o
}

func TestOnlinePassUnderWritesThenDirtyPassInTheFence(t *testing.T) {
	p := newAccounts(t)
	d := consistency.NewDirtySet(0)
	f := newFakeStream(t, p, d, 20000, 20*time.Millisecond)
	f.start(400)
	v := consistency.NewVerifier(p.blueDB, p.greenDB, onlineOptions())
	ctx := context.Background()

	rep, err := v.Online(ctx, []string{"accounts"}, f, d)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Verdict != consistency.Equal {
		t.Fatalf("online verdict %s under writes: %+v %v", rep.Verdict, diffs(rep), tableErrors(rep))
	}
	tab := rep.Tables[0]
	t.Logf("online: %d chunks, %d differed at first sight, %d re-checks, %d unsettled; dirty set %+v",
		tab.Chunks, tab.ChunksDiffering, tab.Rechecked, tab.Unsettled, d.Stats())
	if tab.ChunksDiffering == 0 {
		t.Log("no chunk differed at first sight: the lag did not show (re-check path not exercised)")
	}

	// The fence: writes stop, green catches up.
	f.stop()
	written := len(f.keysW)
	dirty, err := v.Dirty(ctx, []string{"accounts"}, d)
	if err != nil {
		t.Fatal(err)
	}
	if dirty.Verdict != consistency.Equal || dirty.Pass != consistency.PassDirty {
		t.Fatalf("dirty verdict %s: %+v %v", dirty.Verdict, diffs(dirty), tableErrors(dirty))
	}
	rows := dirty.Totals.RowsBlue
	t.Logf("dirty pass: %d rows in %d chunks (%d distinct keys written in all)", rows, dirty.Totals.Chunks, written)
	if rows == 0 || rows > int64(written)+tab.Unsettled*500 {
		t.Errorf("the dirty pass compared %d rows; want between 1 and the %d keys written (+ unsettled chunks)", rows, written)
	}
	if s := d.Stats(); s.Keys != 0 || s.Ranges != 0 || s.WholeTables != 0 {
		t.Errorf("a clean dirty pass left %+v", s)
	}
}

func TestOnlinePassReportsADifferenceThatPersists(t *testing.T) {
	p := newAccounts(t)
	// A row green lost without the stream knowing.
	exec(t, p.green, "UPDATE accounts SET note = 'corrupt' WHERE id = 7")
	d := consistency.NewDirtySet(0)
	f := newFakeStream(t, p, d, 20000, 5*time.Millisecond)
	f.start(200)
	v := consistency.NewVerifier(p.blueDB, p.greenDB, onlineOptions())
	ctx := context.Background()
	rep, err := v.Online(ctx, []string{"accounts"}, f, d)
	if err != nil {
		t.Fatal(err)
	}
	ds := diffs(rep)
	if rep.Verdict != consistency.Different || len(ds) != 1 || ds[0].Key[0].Value != "7" || ds[0].Columns[0].Column != "note" {
		t.Fatalf("online: verdict %s, differences %+v", rep.Verdict, ds)
	}
	if rep.Tables[0].Rechecked == 0 {
		t.Error("the difference was reported without a re-check after green caught up")
	}
	f.stop()
	dirty, err := v.Dirty(ctx, []string{"accounts"}, d)
	if err != nil {
		t.Fatal(err)
	}
	if ds := diffs(dirty); dirty.Verdict != consistency.Different || len(ds) != 1 || ds[0].Key[0].Value != "7" {
		t.Fatalf("dirty: verdict %s, differences %+v", dirty.Verdict, ds)
	}
}

func TestDirtyPassFindsAChangeLostAfterTheOnlinePass(t *testing.T) {
	p := newAccounts(t)
	d := consistency.NewDirtySet(0)
	f := newFakeStream(t, p, d, 20000, 0)
	v := consistency.NewVerifier(p.blueDB, p.greenDB, onlineOptions())
	ctx := context.Background()
	if rep, err := v.Online(ctx, nil, f, d); err != nil || rep.Verdict != consistency.Equal {
		t.Fatalf("online: %v %v", rep, err)
	}
	// 1,000 changes after the online pass, one of them lost by the
	// applier (marked, not applied).
	f.start(100000)
	for f.issued.Load() < 999 {
		time.Sleep(time.Millisecond)
	}
	f.stop()
	f.changes = make(chan change, 1)
	f.drop.Store(true)
	f.write(ctx, 4321, -1)
	f.apply(<-f.changes)

	start := time.Now()
	rep, err := v.Dirty(ctx, nil, d)
	if err != nil {
		t.Fatal(err)
	}
	ds := diffs(rep)
	if len(ds) != 1 || ds[0].Key[0].Value != "4321" || ds[0].Columns[0].Column != "balance" {
		t.Fatalf("differences %+v, errors %v", ds, tableErrors(rep))
	}
	t.Logf("dirty pass over %d keys took %v", rep.Totals.RowsBlue, time.Since(start))
	if rep.Totals.RowsBlue > 1001 {
		t.Errorf("the dirty pass compared %d rows for 1,000 changes", rep.Totals.RowsBlue)
	}
}

func TestOnlinePassNeedsAPositionWaiter(t *testing.T) {
	v := consistency.NewVerifier(nil, nil, consistency.Options{})
	if _, err := v.Online(context.Background(), nil, nil, nil); err == nil {
		t.Fatal("online pass without a waiter ran")
	}
}
