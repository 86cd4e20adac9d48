package postgres

import (
	"context"
	"fmt"
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

// counting is a real engine that counts the statements the verifier asks
// of it, to prove a pass over many tables takes few round trips.
type counting struct {
	*DB
	checksums, keyAts, batches atomic.Int64
}

func (c *counting) Checksum(ctx context.Context, t *consistency.Table, s consistency.Span) (consistency.Digest, error) {
	c.checksums.Add(1)
	return c.DB.Checksum(ctx, t, s)
}

func (c *counting) KeyAt(ctx context.Context, t *consistency.Table, s consistency.Span, n int64) ([]string, error) {
	c.keyAts.Add(1)
	return c.DB.KeyAt(ctx, t, s, n)
}

func (c *counting) ChecksumTables(ctx context.Context, ts []*consistency.Table) ([]consistency.Digest, error) {
	c.batches.Add(1)
	return c.DB.ChecksumTables(ctx, ts)
}

func (c *counting) statements() int64 { return c.checksums.Load() + c.keyAts.Load() + c.batches.Load() }

func (c *counting) reset() {
	c.checksums.Store(0)
	c.keyAts.Store(0)
	c.batches.Store(0)
}

const manyTables = 500

// TestManySmallTables runs the passes over 500 small tables (three rows
// each) as a schema of many tables puts them on a plan.
func TestManySmallTables(t *testing.T) {
	p := newPair(t, integration.PostgresOptions{}, integration.PostgresOptions{})
	ctx := context.Background()
	var wg sync.WaitGroup
	for _, pg := range []*integration.Postgres{p.blue, p.green} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := createManyTables(ctx, pg, 1, manyTables); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	blue, green := &counting{DB: p.blueDB}, &counting{DB: p.greenDB}
	opts := consistency.Options{Parallel: 2}

	t.Run("a difference in one table is named to the row in a few round trips", func(t *testing.T) {
		exec(t, p.green, `UPDATE many_317 SET v = 'changed' WHERE id = 2`)
		exec(t, p.green, `DELETE FROM many_42 WHERE id = 3`)
		defer exec(t, p.green, `UPDATE many_317 SET v = 'row 2' WHERE id = 2; INSERT INTO many_42 VALUES (3, 'row 3', 30)`)
		for _, pass := range []string{"full", "online"} {
			blue.reset()
			green.reset()
			v := consistency.NewVerifier(blue, green, opts)
			var rep *consistency.Report
			var err error
			if pass == "full" {
				rep, err = v.Full(ctx, nil)
			} else {
				rep, err = v.Online(ctx, nil, quiet{}, consistency.NewDirtySet(0))
			}
			if err != nil {
				t.Fatal(err)
			}
			if rep.Verdict != consistency.Different || rep.Totals.Tables != manyTables || len(rep.Tables) != manyTables {
				t.Fatalf("%s: verdict %s, %d tables (%d entries), want different over %d", pass, rep.Verdict, rep.Totals.Tables, len(rep.Tables), manyTables)
			}
			if rep.Totals.RowsBlue != 3*manyTables || rep.Totals.RowsGreen != 3*manyTables-1 {
				t.Errorf("%s: rows %d/%d", pass, rep.Totals.RowsBlue, rep.Totals.RowsGreen)
			}
			// The report lists every table, in order, each compared.
			for i, tab := range rep.Tables {
				if i > 0 && tab.Name <= rep.Tables[i-1].Name {
					t.Errorf("%s: entry %d is %s, after %s", pass, i, tab.Name, rep.Tables[i-1].Name)
				}
				if tab.Chunks != 1 || tab.Error != "" {
					t.Errorf("%s: %s: %d chunks, error %q", pass, tab.Name, tab.Chunks, tab.Error)
				}
			}
			got := map[string]string{}
			for _, tab := range rep.Tables {
				for _, d := range tab.Differences {
					got[tab.Name] = fmt.Sprintf("%s %s=%s", d.Kind, d.Key[0].Column, d.Key[0].Value)
				}
			}
			want := map[string]string{"public.many_317": "changed id=2", "public.many_42": "missing_on_green id=3"}
			if fmt.Sprint(got) != fmt.Sprint(want) || rep.Totals.Differences != 2 {
				t.Errorf("%s: differences %v (%d), want %v", pass, got, rep.Totals.Differences, want)
			}
			// Five batches of a hundred tables per side, then the two
			// differing tables bisected (a few statements each); a walk
			// of each table would take two statements per table and side.
			if n := blue.statements() + green.statements(); n > 40 {
				t.Errorf("%s: %d statements for %d tables (%d batches, %d checksums, %d boundaries): not batched",
					pass, n, manyTables, blue.batches.Load()+green.batches.Load(), blue.checksums.Load()+green.checksums.Load(), blue.keyAts.Load()+green.keyAts.Load())
			}
		}
	})

	t.Run("the dirty pass re-checks only the tables the stream marked", func(t *testing.T) {
		d := consistency.NewDirtySet(0)
		v := consistency.NewVerifier(blue, green, opts)
		if rep, err := v.Online(ctx, nil, quiet{}, d); err != nil || rep.Verdict != consistency.Equal {
			t.Fatalf("online: %v %v", rep, err)
		}
		// A change the stream reported but green lost; a table the
		// stream reported truncated, green missing a row; and a change
		// on a table it did not report (never re-checked inside the
		// fence: green changed behind the stream's back after the
		// online pass, out of what a dirty pass can see).
		exec(t, p.green, `UPDATE many_5 SET n = -1 WHERE id = 1`)
		exec(t, p.green, `DELETE FROM many_9 WHERE id = 2`)
		exec(t, p.green, `UPDATE many_20 SET n = -1 WHERE id = 1`)
		defer exec(t, p.green, `UPDATE many_5 SET n = 10 WHERE id = 1; INSERT INTO many_9 VALUES (2, 'row 2', 20) ON CONFLICT DO NOTHING; UPDATE many_20 SET n = 10 WHERE id = 1`)
		d.MarkChanged("public.many_5", []string{"1"})
		d.MarkChanged("public.many_9", nil)
		blue.reset()
		green.reset()
		rep, err := v.Dirty(ctx, nil, d)
		if err != nil {
			t.Fatal(err)
		}
		if rep.Verdict != consistency.Different || len(rep.Tables) != manyTables {
			t.Fatalf("dirty: verdict %s, %d entries", rep.Verdict, len(rep.Tables))
		}
		got := map[string]string{}
		for _, tab := range rep.Tables {
			for _, d := range tab.Differences {
				got[tab.Name] = fmt.Sprintf("%s %s=%s", d.Kind, d.Key[0].Column, d.Key[0].Value)
			}
		}
		want := map[string]string{"public.many_5": "changed id=1", "public.many_9": "missing_on_green id=2"}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("differences %v, want %v", got, want)
		}
		// Two tables re-checked: a handful of statements, none for the
		// 498 others.
		if n := blue.statements() + green.statements(); n > 16 {
			t.Errorf("%d statements for 2 changed tables of %d", n, manyTables)
		}
		// The fixes reach green; the stream reports them; the next
		// dirty pass is clean and settles them.
		exec(t, p.green, `UPDATE many_5 SET n = 10 WHERE id = 1; INSERT INTO many_9 VALUES (2, 'row 2', 20)`)
		d.MarkChanged("public.many_5", []string{"1"})
		rep, err = v.Dirty(ctx, nil, d)
		if err != nil || rep.Verdict != consistency.Equal {
			t.Fatalf("dirty after the fix: %v %v", rep.Verdict, err)
		}
		if s := d.Stats(); s.Tables != 0 {
			t.Errorf("dirty set after a clean pass: %+v", s)
		}
	})

	t.Run("no false positive under writes to small tables", func(t *testing.T) {
		d := consistency.NewDirtySet(0)
		s := newManyStream(t, p, d, 20, 25*time.Millisecond)
		s.start(300)
		v := consistency.NewVerifier(blue, green, opts)
		rep, err := v.Online(ctx, nil, s, d)
		if err != nil {
			t.Fatal(err)
		}
		if rep.Verdict == consistency.Different || len(rep.Tables) != manyTables {
			t.Fatalf("online under writes: verdict %s, %d entries: %+v", rep.Verdict, len(rep.Tables), diffs(rep))
		}
		s.stop() // the fence: writes stop, green catches up
		if s.written.Load() == 0 {
			t.Fatal("nothing was written during the online pass")
		}
		rep, err = v.Dirty(ctx, nil, d)
		if err != nil || rep.Verdict != consistency.Equal {
			t.Fatalf("dirty in the fence: %v %v %+v", rep.Verdict, err, diffs(rep))
		}
		t.Logf("%d writes to %d small tables during the online pass; dirty pass re-read %d rows", s.written.Load(), 20, rep.Totals.RowsBlue)
	})
}

// manyStream writes random rows of the first tables small tables on blue
// and applies each change to green after lag, marking it first, as the
// replication engine's hook does.
type manyStream struct {
	t           *testing.T
	blue, green *pgxpool.Pool
	dirty       *consistency.DirtySet
	tables      int
	lag         time.Duration

	issued, applied, written atomic.Int64
	changes                  chan manyChange
	cancel                   context.CancelFunc
	wg                       sync.WaitGroup
	once                     sync.Once
}

type manyChange struct {
	seq       int64
	table, id int
	v         int
	at        time.Time
}

func newManyStream(t *testing.T, p *pair, d *consistency.DirtySet, tables int, lag time.Duration) *manyStream {
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
	return &manyStream{t: t, blue: blue, green: green, dirty: d, tables: tables, lag: lag, changes: make(chan manyChange, 100000)}
}

func (s *manyStream) start(rate int) {
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	s.t.Cleanup(s.stop)
	s.wg.Add(2)
	go func() {
		defer s.wg.Done()
		defer close(s.changes)
		r := rand.New(rand.NewPCG(3, 5))
		tick := time.NewTicker(time.Second / time.Duration(rate))
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			c := manyChange{table: r.IntN(s.tables) + 1, id: r.IntN(3) + 1, v: r.IntN(1_000_000)}
			c.seq = s.issued.Add(1)
			// Not cancelled with the writer: a write cancelled while
			// committing could be on blue without being queued.
			if _, err := s.blue.Exec(context.Background(), fmt.Sprintf("UPDATE many_%d SET n = $2 WHERE id = $1", c.table), c.id, c.v); err != nil {
				s.t.Error(err)
				s.issued.Add(-1)
				return
			}
			s.written.Add(1)
			c.at = time.Now()
			s.changes <- c
		}
	}()
	go func() {
		defer s.wg.Done()
		for c := range s.changes {
			time.Sleep(time.Until(c.at.Add(s.lag)))
			s.dirty.MarkChanged(fmt.Sprintf("public.many_%d", c.table), []string{strconv.Itoa(c.id)})
			if _, err := s.green.Exec(context.Background(), fmt.Sprintf("UPDATE many_%d SET n = $2 WHERE id = $1", c.table), c.id, c.v); err != nil {
				s.t.Error(err)
			}
			s.applied.Store(c.seq)
		}
	}()
}

func (s *manyStream) stop() {
	s.once.Do(func() {
		s.cancel()
		s.wg.Wait()
	})
}

func (s *manyStream) BluePosition(context.Context) (string, error) {
	return strconv.FormatInt(s.issued.Load(), 10), nil
}

func (s *manyStream) WaitGreenApplied(ctx context.Context, pos string) error {
	want, err := strconv.ParseInt(pos, 10, 64)
	if err != nil {
		return err
	}
	for s.applied.Load() < want {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Millisecond):
		}
	}
	return nil
}
