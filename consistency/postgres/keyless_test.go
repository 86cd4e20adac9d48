package postgres

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cutover/cutover/consistency"
	"github.com/cutover/cutover/integration"
)

// eventsSetup is a key-less table (REPLICA IDENTITY FULL, as replication
// needs it) with NULLs, an all-NULL row and three copies of one row; %s
// orders the insert, so that the sides can hold the rows in different
// physical orders.
const eventsSetup = `
CREATE TABLE events (at timestamptz, what text, n int, amount numeric(10,2));
ALTER TABLE events REPLICA IDENTITY FULL;
INSERT INTO events SELECT '2025-01-01 00:00:00+00'::timestamptz + g * interval '1 second', 'event ' || g, g % 7, g / 100.0
	FROM generate_series(1, 3000) g ORDER BY g %s;
INSERT INTO events VALUES (NULL, NULL, NULL, NULL), (NULL, 'no time', 1, NULL);
INSERT INTO events SELECT '2025-06-01 00:00:00+00', 'dup', 1, 1.00 FROM generate_series(1, 3);
ANALYZE events;
`

func newEvents(t *testing.T) *pair {
	t.Helper()
	p := newPair(t, integration.PostgresOptions{}, integration.PostgresOptions{})
	exec(t, p.blue, strings.Replace(eventsSetup, "%s", "ASC", 1))
	exec(t, p.green, strings.Replace(eventsSetup, "%s", "DESC", 1))
	return p
}

// onGreen changes green for one subtest and puts events back after it.
func onGreen(t *testing.T, p *pair, sql string) {
	t.Helper()
	exec(t, p.green, "CREATE TABLE saved AS SELECT * FROM events; "+sql)
	t.Cleanup(func() {
		exec(t, p.green, "TRUNCATE events; INSERT INTO events SELECT * FROM saved; DROP TABLE saved")
	})
}

func keyText(k []consistency.NamedValue) string {
	parts := make([]string, len(k))
	for i, v := range k {
		parts[i] = v.Column + "=" + v.Value
	}
	return strings.Join(parts, ", ")
}

func TestKeyLessTablesAreComparedAsMultisetsOfRows(t *testing.T) {
	p := newEvents(t)
	opts := smallChunks(500) // 8 buckets of about 400 rows

	t.Run("equal rows in another physical order are equal", func(t *testing.T) {
		rep := p.verify(t, opts, "events")
		if rep.Verdict != consistency.Equal {
			t.Fatalf("verdict %s: %+v %v", rep.Verdict, diffs(rep), tableErrors(rep))
		}
		tab := rep.Tables[0]
		if !tab.KeyLess || tab.RowsBlue != 3005 || tab.RowsGreen != 3005 || tab.Chunks < 2 {
			t.Fatalf("table %+v: want key-less, 3005 rows on each side, several buckets", tab)
		}
	})

	t.Run("a changed row is named by its values, with the column that changed", func(t *testing.T) {
		onGreen(t, p, "UPDATE events SET amount = 99 WHERE what = 'event 10'")
		rep := p.verify(t, opts, "events")
		ds := diffs(rep)
		if rep.Verdict != consistency.Different || len(ds) != 1 || ds[0].Kind != consistency.Changed {
			t.Fatalf("verdict %s, differences %+v, errors %v; want one changed row", rep.Verdict, ds, tableErrors(rep))
		}
		if k := keyText(ds[0].Key); k != "at=2025-01-01 00:00:10+00, what=event 10, n=3" {
			t.Errorf("row named %q", k)
		}
		if c := ds[0].Columns; len(c) != 1 || c[0].Column != "amount" || c[0].Blue.Text != "0.10" || c[0].Green.Text != "99.00" {
			t.Errorf("columns %+v, want amount 0.10 -> 99.00", c)
		}
	})

	t.Run("a row held three times on blue and twice on green is named with its copies", func(t *testing.T) {
		onGreen(t, p, "DELETE FROM events WHERE ctid = (SELECT ctid FROM events WHERE what = 'dup' LIMIT 1)")
		rep := p.verify(t, opts, "events")
		ds := diffs(rep)
		if len(ds) != 1 || ds[0].Kind != consistency.MissingOnGreen || ds[0].Copies == nil || *ds[0].Copies != (consistency.Copies{Blue: 3, Green: 2}) {
			t.Fatalf("differences %+v, errors %v; want one row missing on green, 3 copies on blue, 2 on green", ds, tableErrors(rep))
		}
		if k := keyText(ds[0].Key); k != "at=2025-06-01 00:00:00+00, what=dup, n=1, amount=1.00" {
			t.Errorf("row named %q", k)
		}
	})

	t.Run("a row on green only is extra on green", func(t *testing.T) {
		onGreen(t, p, "INSERT INTO events VALUES ('2030-01-01 00:00:00+00', 'stray', 5, 5.55)")
		rep := p.verify(t, opts, "events")
		ds := diffs(rep)
		if len(ds) != 1 || ds[0].Kind != consistency.ExtraOnGreen || *ds[0].Copies != (consistency.Copies{Blue: 0, Green: 1}) ||
			keyText(ds[0].Key) != "at=2030-01-01 00:00:00+00, what=stray, n=5, amount=5.55" {
			t.Fatalf("differences %+v, errors %v; want the stray row extra on green", ds, tableErrors(rep))
		}
	})

	t.Run("a row on blue only is missing on green", func(t *testing.T) {
		onGreen(t, p, "DELETE FROM events WHERE what = 'event 2999'")
		rep := p.verify(t, opts, "events")
		ds := diffs(rep)
		if len(ds) != 1 || ds[0].Kind != consistency.MissingOnGreen || *ds[0].Copies != (consistency.Copies{Blue: 1, Green: 0}) ||
			!strings.Contains(keyText(ds[0].Key), "what=event 2999") {
			t.Fatalf("differences %+v, errors %v; want event 2999 missing on green", ds, tableErrors(rep))
		}
	})

	t.Run("NULL and the empty string are told apart", func(t *testing.T) {
		onGreen(t, p, "UPDATE events SET what = '' WHERE at IS NULL AND what IS NULL")
		rep := p.verify(t, opts, "events")
		ds := diffs(rep)
		if len(ds) != 1 || ds[0].Kind != consistency.Changed || keyText(ds[0].Key) != "at=NULL, n=NULL, amount=NULL" {
			t.Fatalf("differences %+v, errors %v; want the all-NULL row changed", ds, tableErrors(rep))
		}
		if c := ds[0].Columns[0]; c.Column != "what" || !c.Blue.Null || c.Green.Null || c.Green.Text != "" {
			t.Errorf("column %+v %+v %+v, want what NULL -> ''", c, c.Blue, c.Green)
		}
	})

	t.Run("a key-less table and a keyed table are compared in one pass", func(t *testing.T) {
		p.both(t, "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint); INSERT INTO accounts SELECT g, g FROM generate_series(1, 2000) g")
		t.Cleanup(func() { p.both(t, "DROP TABLE accounts") })
		rep := p.verify(t, opts)
		if rep.Verdict != consistency.Equal || len(rep.Tables) != 2 {
			t.Fatalf("verdict %s, %d tables: %+v %v", rep.Verdict, len(rep.Tables), diffs(rep), tableErrors(rep))
		}
		exec(t, p.green, "UPDATE accounts SET balance = -1 WHERE id = 1500")
		t.Cleanup(func() { exec(t, p.green, "UPDATE accounts SET balance = 1500 WHERE id = 1500") })
		onGreen(t, p, "DELETE FROM events WHERE what = 'event 1'")
		rep = p.verify(t, opts)
		var got []string
		for _, tab := range rep.Tables {
			for _, d := range tab.Differences {
				got = append(got, tab.Name+" "+string(d.Kind)+" "+keyText(d.Key))
			}
		}
		want := []string{"public.accounts changed id=1500", "public.events missing_on_green at=2025-01-01 00:00:01+00, what=event 1, n=1, amount=0.01"}
		if strings.Join(got, "\n") != strings.Join(want, "\n") {
			t.Fatalf("differences:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
	})

	t.Run("an engine that cannot hash a table whole refuses it as unverifiable, naming it", func(t *testing.T) {
		// The same databases, through the Database interface alone.
		type keyedOnly struct{ consistency.Database }
		v := consistency.NewVerifier(keyedOnly{p.blueDB}, keyedOnly{p.greenDB}, opts)
		_, err := v.Full(context.Background(), nil)
		if !errors.Is(err, consistency.ErrUnverifiable) || !errors.Is(err, consistency.ErrNoPrimaryKey) || !strings.Contains(err.Error(), "public.events") {
			t.Fatalf("err = %v, want ErrUnverifiable naming public.events", err)
		}
	})
}

func TestAChangedRowInALargeKeyLessTableIsFoundSeveralLevelsDown(t *testing.T) {
	p := newPair(t, integration.PostgresOptions{}, integration.PostgresOptions{})
	p.both(t, `CREATE TABLE log (line text, n int);
		INSERT INTO log SELECT 'line ' || g, g FROM generate_series(1, 50000) g;
		ANALYZE log`)
	// Read in block ranges, several statements at once, as a large
	// table is.
	saved := minSplitBlocks
	minSplitBlocks = 16
	t.Cleanup(func() { minSplitBlocks = saved })
	ctx := context.Background()
	tabs, err := p.blueDB.Describe(ctx, []string{"log"})
	if err != nil {
		t.Fatal(err)
	}
	if ranges, err := p.blueDB.blockRanges(ctx, tabs[0]); err != nil || len(ranges) != p.blueDB.scans || len(ranges) < 2 {
		t.Fatalf("block ranges %v, err %v: want %d", ranges, err, p.blueDB.scans)
	}
	split, err := p.blueDB.Buckets(ctx, tabs[0], nil, 0, 10)
	if err != nil {
		t.Fatal(err)
	}
	minSplitBlocks = 1 << 40
	whole, err := p.blueDB.Buckets(ctx, tabs[0], nil, 0, 10)
	minSplitBlocks = 16
	if err != nil || len(whole) < 1000 || !reflect.DeepEqual(split, whole) {
		t.Fatalf("the block ranges' buckets (%d) do not add up to the whole table's (%d), err %v", len(split), len(whole), err)
	}

	exec(t, p.green, "UPDATE log SET line = 'LINE 31337' WHERE n = 31337; INSERT INTO log VALUES ('line 7', 7)")
	opts := smallChunks(5000) // 16 buckets of about 3,000 rows
	opts.BisectRows = 2
	rep := p.verify(t, opts, "log")
	tab := rep.Tables[0]
	var got []string
	for _, d := range tab.Differences {
		got = append(got, string(d.Kind)+" "+keyText(d.Key)+" "+d.Copies.String())
	}
	want := []string{"extra_on_green line=line 7, n=7 1 on blue, 2 on green", "changed n=31337 "}
	if len(got) != 2 || !(got[0] == want[0] && got[1] == want[1] || got[0] == want[1] && got[1] == want[0]) {
		t.Fatalf("differences:\n%s\nerrors %v; want:\n%s", strings.Join(got, "\n"), tableErrors(rep), strings.Join(want, "\n"))
	}
	t.Logf("%d buckets, %d differing, %d levels of bisection", tab.Chunks, tab.ChunksDiffering, tab.BisectLevels)
	if tab.Chunks != 16 || tab.BisectLevels < 2 {
		t.Errorf("%d buckets, %d levels: want 16 buckets and at least two levels of bisection", tab.Chunks, tab.BisectLevels)
	}
}

func TestAKeyWithANonDeterministicCollationIsComparedAsAKeyLessTable(t *testing.T) {
	p := newPair(t, integration.PostgresOptions{}, integration.PostgresOptions{})
	p.both(t, `CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
		CREATE TABLE tags (name text COLLATE ci PRIMARY KEY, uses int);
		INSERT INTO tags SELECT 'Tag' || g, g FROM generate_series(1, 500) g`)
	exec(t, p.green, "UPDATE tags SET name = 'TAG7' WHERE name = 'Tag7'")
	rep := p.verify(t, smallChunks(100), "tags")
	ds := diffs(rep)
	if rep.Verdict != consistency.Different || len(ds) != 1 || ds[0].Kind != consistency.Changed || keyText(ds[0].Key) != "uses=7" ||
		ds[0].Columns[0].Blue.Text != "Tag7" || ds[0].Columns[0].Green.Text != "TAG7" {
		t.Fatalf("verdict %s, differences %+v, errors %v; want Tag7 -> TAG7", rep.Verdict, ds, tableErrors(rep))
	}
	if tab := rep.Tables[0]; !tab.KeyLess || len(tab.Warnings) == 0 || !strings.Contains(tab.Warnings[0], "non-deterministic") {
		t.Errorf("table %+v: want key-less with a warning naming the collation", tab)
	}
}

// heapStream stands in for the replication engine on a key-less table:
// a writer inserts and updates rows of log on blue, an applier repeats
// each write on green after a delay, calling MarkChanged first with the
// key a REPLICA IDENTITY USING INDEX stream would give (the verifier must
// not take it for a row it can look up). Positions are write numbers.
type heapStream struct {
	*fakeStream
}

func newHeapStream(t *testing.T, p *pair, d *consistency.DirtySet, lag time.Duration) *heapStream {
	return &heapStream{newFakeStream(t, p, d, 0, lag)}
}

func (h *heapStream) start(rate int) {
	f := h.fakeStream
	ctx, cancel := context.WithCancel(context.Background())
	f.cancel = cancel
	f.t.Cleanup(f.stop)
	f.wg.Add(2)
	go func() { // writer
		defer f.wg.Done()
		defer close(f.changes)
		tick := time.NewTicker(time.Second / time.Duration(rate))
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			seq := f.issued.Add(1)
			if _, err := f.blue.Exec(context.WithoutCancel(ctx), heapWrite, i); err != nil {
				f.t.Error(err)
				return
			}
			f.changes <- change{seq: seq, v: i, at: time.Now()}
		}
	}()
	go func() { // applier
		defer f.wg.Done()
		for c := range f.changes {
			time.Sleep(time.Until(c.at.Add(f.lag)))
			f.dirty.MarkChanged("public.log", []string{strconv.Itoa(c.v)})
			if _, err := f.green.Exec(context.Background(), heapWrite, c.v); err != nil {
				f.t.Error(err)
			}
			f.applied.Store(c.seq)
		}
	}()
}

// heapWrite adds a copy of a row (duplicates included) and changes others.
const heapWrite = `WITH u AS (UPDATE log SET n = n + 1 WHERE line = 'line ' || ($1::int * 7 % 20000) RETURNING 1)
	INSERT INTO log SELECT 'written ' || ($1::int % 50), $1::int % 3`

func newLog(t *testing.T) *pair {
	t.Helper()
	p := newPair(t, integration.PostgresOptions{}, integration.PostgresOptions{})
	p.both(t, `CREATE TABLE log (line text, n int); ALTER TABLE log REPLICA IDENTITY FULL;
		INSERT INTO log SELECT 'line ' || g, g FROM generate_series(1, 20000) g; ANALYZE log`)
	return p
}

func TestOnlinePassOnAKeyLessTableUnderWritesThenDirtyPassInTheFence(t *testing.T) {
	p := newLog(t)
	d := consistency.NewDirtySet(0)
	s := newHeapStream(t, p, d, 20*time.Millisecond)
	s.start(200)
	v := consistency.NewVerifier(p.blueDB, p.greenDB, onlineOptions())
	ctx := context.Background()

	rep, err := v.Online(ctx, []string{"log"}, s, d)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Verdict != consistency.Equal {
		t.Fatalf("online verdict %s under writes: %+v %v", rep.Verdict, diffs(rep), tableErrors(rep))
	}
	tab := rep.Tables[0]
	t.Logf("online: %d buckets, %d differed at first sight, %d re-checks, %d unsettled; dirty set %+v",
		tab.Chunks, tab.ChunksDiffering, tab.Rechecked, tab.Unsettled, d.Stats())

	// The fence: writes stop, green catches up; the whole table is
	// re-hashed (its changes name no row).
	s.stop()
	if st := d.Stats(); st.WholeTables != 1 || st.Keys != 0 {
		t.Fatalf("dirty set %+v after writes to a key-less table: want it whole, no key", st)
	}
	dirty, err := v.Dirty(ctx, []string{"log"}, d)
	if err != nil {
		t.Fatal(err)
	}
	if dirty.Verdict != consistency.Equal || dirty.Totals.RowsBlue < 20000 {
		t.Fatalf("dirty verdict %s over %d rows: %+v %v", dirty.Verdict, dirty.Totals.RowsBlue, diffs(dirty), tableErrors(dirty))
	}
	if st := d.Stats(); st.WholeTables != 0 {
		t.Errorf("a clean dirty pass left %+v", st)
	}
}

func TestAKeyLessRowChangedBehindTheStreamsBackIsFound(t *testing.T) {
	p := newLog(t)
	exec(t, p.green, "UPDATE log SET line = 'corrupt' WHERE n = 4242")
	d := consistency.NewDirtySet(0)
	s := newHeapStream(t, p, d, 5*time.Millisecond)
	v := consistency.NewVerifier(p.blueDB, p.greenDB, onlineOptions())
	ctx := context.Background()
	want := "changed n=4242; line: line 4242 -> corrupt"
	named := func(rep *consistency.Report) string {
		ds := diffs(rep)
		if len(ds) != 1 || len(ds[0].Columns) != 1 {
			return fmt.Sprintf("%+v %v", ds, tableErrors(rep))
		}
		c := ds[0].Columns[0]
		return fmt.Sprintf("%s %s; %s: %s -> %s", ds[0].Kind, keyText(ds[0].Key), c.Column, c.Blue, c.Green)
	}

	// Quiet: the online pass re-checks after green caught up and names
	// the row.
	rep, err := v.Online(ctx, []string{"log"}, s, d)
	if err != nil {
		t.Fatal(err)
	}
	if got := named(rep); rep.Verdict != consistency.Different || got != want || rep.Tables[0].Rechecked == 0 {
		t.Fatalf("online: verdict %s, %s, %d re-checks; want %s after a re-check", rep.Verdict, got, rep.Tables[0].Rechecked, want)
	}

	// Under writes the online pass may leave the table to the fence; the
	// fence pass names the row.
	s.start(200)
	if _, err := v.Refresh(ctx, []string{"log"}, s, d); err != nil {
		t.Fatal(err)
	}
	s.stop()
	dirty, err := v.Dirty(ctx, []string{"log"}, d)
	if err != nil {
		t.Fatal(err)
	}
	if got := named(dirty); dirty.Verdict != consistency.Different || got != want {
		t.Fatalf("dirty: verdict %s, %s; want %s", dirty.Verdict, got, want)
	}
}
