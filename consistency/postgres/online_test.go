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
	skip        int // but never this one (0: none)
	batch       int // rows per write (one transaction): 1 unless set

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
	seq int64
	ids []int
	v   int
	at  time.Time // written on blue
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
			ids := make([]int, 0, max(f.batch, 1))
			for len(ids) < cap(ids) {
				if id := r.IntN(f.keys) + 1; id != f.skip {
					ids = append(ids, id)
				}
			}
			if !f.write(ctx, r.IntN(1_000_000), ids...) {
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

// write changes rows on blue in one transaction and queues the change.
// The statement is not cancelled with the writer: a write cancelled while
// committing could be on blue without being queued, a change lost.
func (f *fakeStream) write(ctx context.Context, v int, ids ...int) bool {
	seq := f.issued.Add(1)
	if _, err := f.blue.Exec(context.WithoutCancel(ctx), "UPDATE accounts SET balance = $2 WHERE id = ANY($1)", ids, v); err != nil {
		f.t.Error(err)
		f.issued.Add(-1)
		return false
	}
	f.mu.Lock()
	for _, id := range ids {
		f.keysW[id] = true
	}
	f.mu.Unlock()
	f.changes <- change{seq: seq, ids: ids, v: v, at: time.Now()}
	return true
}

func (f *fakeStream) apply(c change) {
	// The hook runs before the change is visible on green.
	for _, id := range c.ids {
		f.dirty.MarkChanged("public.accounts", []string{strconv.Itoa(id)})
	}
	if !f.drop.Load() {
		if _, err := f.green.Exec(context.Background(), "UPDATE accounts SET balance = $2 WHERE id = ANY($1)", c.ids, c.v); err != nil {
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
	// Writers may issue a few more after the count is read: the bound
	// below is what was issued in the end, not 1,000.
	issued := f.issued.Load()
	f.changes = make(chan change, 1)
	f.drop.Store(true)
	f.write(ctx, -1, 4321)
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
	if rep.Totals.RowsBlue > issued+1 {
		t.Errorf("the dirty pass compared %d rows for %d changes", rep.Totals.RowsBlue, issued+1)
	}
}

func TestOnlinePassNeedsAPositionWaiter(t *testing.T) {
	v := consistency.NewVerifier(nil, nil, consistency.Options{})
	if _, err := v.Online(context.Background(), nil, nil, nil); err == nil {
		t.Fatal("online pass without a waiter ran")
	}
}

// hotOptions makes 10 chunks of the 20,000 accounts: under a hot stream
// (hotStream) every chunk changes between blue's read and green's, at
// every re-check.
func hotOptions() consistency.Options {
	o := onlineOptions()
	o.InitialChunkRows, o.MinChunkRows, o.MaxChunkRows = 2000, 2000, 2000
	return o
}

// hotStream writes up to 8,000 rows a second at random over all 20,000
// accounts (but skip), 20 per transaction, replicated with 100 ms of lag.
func hotStream(t *testing.T, p *pair, d *consistency.DirtySet, skip int) *fakeStream {
	f := newFakeStream(t, p, d, 20000, 100*time.Millisecond)
	f.skip, f.batch = skip, 20
	f.start(400)
	// Under way (connected, lagging) before the pass starts.
	for f.applied.Load() < 20 {
		time.Sleep(time.Millisecond)
	}
	return f
}

func TestOnlinePassSettlesHotChunksExceptTheKeysChangedWhileReading(t *testing.T) {
	p := newAccounts(t)
	ctx := context.Background()

	// Without settling except keys (today's behaviour when the engine
	// cannot read at a snapshot), hot chunks are left whole to the fence.
	t.Run("baseline", func(t *testing.T) {
		d := consistency.NewDirtySet(0)
		f := hotStream(t, p, d, 0)
		o := hotOptions()
		o.MaxExceptKeys = -1
		rep, err := consistency.NewVerifier(p.blueDB, p.greenDB, o).Online(ctx, []string{"accounts"}, f, d)
		if err != nil || rep.Verdict != consistency.Equal {
			t.Fatalf("online: %v %v %+v", rep.Verdict, err, diffs(rep))
		}
		f.stop()
		tab := rep.Tables[0]
		t.Logf("without: %d chunks, %d differed, %d re-checks, %d unsettled; dirty set %+v",
			tab.Chunks, tab.ChunksDiffering, tab.Rechecked, tab.Unsettled, d.Stats())
		if tab.Unsettled == 0 {
			t.Log("no chunk left unsettled: the load was not hot enough to show the difference")
		}
	})

	d := consistency.NewDirtySet(0)
	f := hotStream(t, p, d, 0)
	v := consistency.NewVerifier(p.blueDB, p.greenDB, hotOptions())
	rep, err := v.Online(ctx, []string{"accounts"}, f, d)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Verdict != consistency.Equal {
		t.Fatalf("online verdict %s: %+v %v", rep.Verdict, diffs(rep), tableErrors(rep))
	}
	tab := rep.Tables[0]
	stats := d.Stats()
	t.Logf("with: %d chunks, %d differed, %d re-checks, %d unsettled, %d settled except %d keys; dirty set %+v",
		tab.Chunks, tab.ChunksDiffering, tab.Rechecked, tab.Unsettled, tab.SettledExcept, tab.ExceptKeys, stats)
	if tab.ChunksDiffering == 0 {
		t.Fatal("no chunk differed at first sight: the load did not show")
	}
	if tab.SettledExcept == 0 || tab.Unsettled != 0 {
		t.Errorf("%d chunks settled except keys, %d left whole; want every moving chunk settled", tab.SettledExcept, tab.Unsettled)
	}
	if stats.Ranges != 0 || stats.WholeTables != 0 || stats.Keys == 0 {
		t.Errorf("dirty set %+v after the online pass; want exact keys only", stats)
	}

	// A plan holding before the fence lets changes pile up; a refresh
	// right before fencing leaves only what changed while it ran.
	time.Sleep(time.Second)
	before := d.Stats()
	ref, err := v.Refresh(ctx, []string{"accounts"}, f, d)
	if err != nil || ref.Verdict != consistency.Equal {
		t.Fatalf("refresh: %v %v %+v %v", ref.Verdict, err, diffs(ref), tableErrors(ref))
	}
	after := d.Stats()
	rt := ref.Tables[0]
	t.Logf("refresh: %+v -> %+v in %.0f ms (%d spans, %d rows, %d settled except %d keys, %d unsettled)", before, after,
		ref.DurationSeconds*1000, rt.Chunks, rt.RowsBlue, rt.SettledExcept, rt.ExceptKeys, rt.Unsettled)
	if after.Ranges != 0 || after.WholeTables != 0 || after.Keys >= before.Keys {
		t.Errorf("refresh left %+v of %+v", after, before)
	}

	// The fence: the dirty pass hashes exactly the keys left.
	f.stop()
	stats = d.Stats()
	dirty, err := v.Dirty(ctx, []string{"accounts"}, d)
	if err != nil {
		t.Fatal(err)
	}
	if dirty.Verdict != consistency.Equal {
		t.Fatalf("dirty verdict %s: %+v %v", dirty.Verdict, diffs(dirty), tableErrors(dirty))
	}
	t.Logf("dirty pass: %d rows in %d chunks for %d keys, %.0f ms", dirty.Totals.RowsBlue, dirty.Totals.Chunks, stats.Keys, dirty.DurationSeconds*1000)
	if dirty.Totals.RowsBlue != int64(stats.Keys) || dirty.Totals.Chunks > int64(stats.Keys/consistency.DefaultKeysPerQuery+1) {
		t.Errorf("dirty pass compared %d rows in %d chunks; want exactly the %d keys left", dirty.Totals.RowsBlue, dirty.Totals.Chunks, stats.Keys)
	}
	full, err := v.Full(ctx, []string{"accounts"})
	if err != nil || full.Verdict != consistency.Equal {
		t.Fatalf("full verdict %v %v: %+v", full.Verdict, err, diffs(full))
	}
}

func TestARowChangedBehindTheStreamsBackInAHotChunkIsStillFound(t *testing.T) {
	p := newAccounts(t)
	ctx := context.Background()
	// Green holds a row the stream never touched nor marked, in a chunk
	// written all the time.
	exec(t, p.green, "UPDATE accounts SET note = 'corrupt' WHERE id = 19990")
	d := consistency.NewDirtySet(0)
	f := hotStream(t, p, d, 19990)
	v := consistency.NewVerifier(p.blueDB, p.greenDB, hotOptions())
	rep, err := v.Online(ctx, []string{"accounts"}, f, d)
	if err != nil {
		t.Fatal(err)
	}
	tab := rep.Tables[0]
	t.Logf("online: verdict %s, %d differences, %d re-checks, %d unsettled, %d settled except keys; dirty set %+v",
		rep.Verdict, tab.DifferenceCount, tab.Rechecked, tab.Unsettled, tab.SettledExcept, d.Stats())
	if ds := diffs(rep); len(ds) > 1 || (len(ds) == 1 && ds[0].Key[0].Value != "19990") {
		t.Fatalf("online differences %+v", ds)
	}
	if tab.DifferenceCount == 0 && tab.Unsettled == 0 {
		t.Fatal("the chunk holding a real difference was settled")
	}
	if tab.SettledExcept == 0 {
		t.Error("no other hot chunk was settled except keys")
	}
	f.stop()
	dirty, err := v.Dirty(ctx, []string{"accounts"}, d)
	if err != nil {
		t.Fatal(err)
	}
	if ds := diffs(dirty); dirty.Verdict != consistency.Different || len(ds) != 1 || ds[0].Key[0].Value != "19990" || ds[0].Columns[0].Column != "note" {
		t.Fatalf("dirty: verdict %s, differences %+v", dirty.Verdict, ds)
	}
}

func TestDigestOfAChunkMinusSomeKeysIsTheDigestOfTheRest(t *testing.T) {
	p := newAccounts(t)
	ctx := context.Background()
	tables, err := p.blueDB.Describe(ctx, []string{"accounts"})
	if err != nil {
		t.Fatal(err)
	}
	tab := tables[0]
	chunk := consistency.Span{Lo: []string{"1000"}, Hi: []string{"3000"}}
	keys := consistency.Span{Keys: [][]string{{"1000"}, {"1500"}, {"2999"}, {"-4"}}} // -4 does not exist
	snap, err := p.blueDB.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Close()
	all, err := snap.Checksum(ctx, tab, chunk)
	if err != nil {
		t.Fatal(err)
	}
	// A commit after the snapshot's first read is not seen by it.
	exec(t, p.blue, "UPDATE accounts SET note = 'later' WHERE id = 2000")
	some, err := snap.Checksum(ctx, tab, keys)
	if err != nil {
		t.Fatal(err)
	}
	again, err := snap.Checksum(ctx, tab, chunk)
	if err != nil || again != all {
		t.Fatalf("the snapshot saw a later commit: %v then %v (%v)", all, again, err)
	}
	rest, err := p.blueDB.Minus(all, some)
	if err != nil {
		t.Fatal(err)
	}
	// The same rows, hashed without those keys, on green.
	exec(t, p.green, "DELETE FROM accounts WHERE id IN (1000, 1500, 2999)")
	want, err := p.greenDB.Checksum(ctx, tab, chunk)
	if err != nil {
		t.Fatal(err)
	}
	if rest != want || rest.Rows != 1997 {
		t.Fatalf("chunk minus keys %+v, chunk without them %+v", rest, want)
	}
}
