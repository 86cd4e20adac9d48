package postgres

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/replication"
)

func TestWaitMarkerAndChangesAfterTheMarker(t *testing.T) {
	e := newPairEnv(t, loadSchema)
	seedLoad(t, e)
	var mu sync.Mutex
	var after []replication.Change
	opts := e.options(t)
	opts.OnChangeAfterMarker = func(c replication.Change) {
		mu.Lock()
		after = append(after, c)
		mu.Unlock()
	}
	r := e.start(t, opts)
	e.exec(t, e.blue, `UPDATE acct SET balance = 1 WHERE id = 1`)
	first := e.sync(t, r)
	if changes, complete := r.ChangesAfter(first); len(changes) != 0 || !complete {
		t.Fatalf("right after the marker: %v, complete %v", changes, complete)
	}
	// A marker waited for before it is written.
	nonce := randomNonce()
	got := make(chan pglogrepl.LSN, 1)
	go func() {
		lsn, err := r.WaitMarker(context.Background(), nonce)
		if err != nil {
			t.Error(err)
		}
		got <- lsn
	}()
	time.Sleep(200 * time.Millisecond)
	e.exec(t, e.blue, `INSERT INTO cutover.markers (nonce, plan, epoch) VALUES ($1, $2, 2)`, nonce, e.plan)
	// A write that got past the fence, after the marker.
	e.exec(t, e.blue, `UPDATE acct SET balance = 2 WHERE id = 7; INSERT INTO hist (acct, delta) VALUES (7, 1)`)
	var marker pglogrepl.LSN
	select {
	case marker = <-got:
	case <-time.After(30 * time.Second):
		t.Fatal("WaitMarker did not return")
	}
	if marker <= first {
		t.Errorf("marker at %s, not after the first one at %s", marker, first)
	}
	e.sync(t, r)
	changes, complete := r.ChangesAfter(marker)
	if !complete {
		t.Error("ChangesAfter says incomplete")
	}
	var tables []string
	for _, c := range changes {
		if c.Table == "public.acct" && (len(c.Key) != 1 || c.Key[0] != "7" || c.Kind != replication.Update) {
			t.Errorf("change %+v", c)
		}
		tables = append(tables, c.Table)
	}
	if len(changes) != 2 {
		t.Fatalf("changes after the marker: %+v", changes)
	}
	mu.Lock()
	if len(after) != 2 {
		t.Errorf("OnChangeAfterMarker got %+v", after)
	}
	mu.Unlock()
	// A marker applied by an earlier run is found on green.
	_ = r.Stop(context.Background())
	r2 := e.start(t, e.options(t))
	lsn, err := r2.WaitMarker(context.Background(), nonce)
	if err != nil || lsn < marker {
		t.Errorf("WaitMarker after restart = %s, %v; want at least %s", lsn, err, marker)
	}
}

func TestDeposedApplierStopsWithoutApplyingTwice(t *testing.T) {
	e := newPairEnv(t, loadSchema)
	seedLoad(t, e)
	r := e.start(t, e.options(t))
	e.sync(t, r)
	// Another applier moved green's position far ahead.
	e.exec(t, e.green, `UPDATE cutover.applied SET lsn = 'FFFF/0'`)
	e.exec(t, e.blue, `INSERT INTO hist (acct, delta) VALUES (1, 1)`)
	select {
	case <-r.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("the replicator did not stop")
	}
	if !errors.Is(r.Err(), replication.ErrSuperseded) {
		t.Fatalf("err = %v, want ErrSuperseded", r.Err())
	}
	if n := count(t, e.green, "hist"); n != 0 {
		t.Errorf("green applied %d rows behind the guard", n)
	}
}

func TestNewLeaderTakesTheSlotOverAndTheOldOneStops(t *testing.T) {
	for _, tc := range []struct {
		name         string
		oldEp, newEp uint64
	}{
		{"a newer epoch wins", 7, 9},
		{"with equal epochs the newest replicator wins", 3, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newPairEnv(t, loadSchema)
			seedLoad(t, e)
			opts := e.options(t)
			opts.Epoch = tc.oldEp
			old := e.start(t, opts)
			e.sync(t, old)
			w := startWriter(t, e.blue.DSN(), 3)
			time.Sleep(500 * time.Millisecond)
			// The old leader has not noticed it lost leadership: its
			// replicator still runs when the new one starts.
			opts.Epoch = tc.newEp
			cur := e.start(t, opts)
			select {
			case <-old.Done():
			case <-time.After(30 * time.Second):
				t.Fatal("the old replicator is still running")
			}
			if !errors.Is(old.Err(), replication.ErrSuperseded) {
				t.Fatalf("old replicator ended with %v, want ErrSuperseded", old.Err())
			}
			time.Sleep(500 * time.Millisecond)
			w.stop(t)
			e.sync(t, cur)
			e.requireSame(t, "acct", "hist", "logbook")
			if cur.Err() != nil {
				t.Fatal(cur.Err())
			}
		})
	}
}

func TestPauseHoldsTheStreamAndResumeDrainsIt(t *testing.T) {
	e := newPairEnv(t, loadSchema)
	seedLoad(t, e)
	reg := prometheus.NewRegistry()
	opts := e.options(t)
	opts.Registerer = reg
	r := e.start(t, opts)
	e.sync(t, r)
	r.Pause()
	e.exec(t, e.blue, `INSERT INTO hist (acct, delta) SELECT 1, g FROM generate_series(1, 5000) g`)
	time.Sleep(time.Second)
	if n := count(t, e.green, "hist"); n != 0 {
		t.Fatalf("paused, yet green has %d rows", n)
	}
	l, err := r.Lag(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if l.Bytes < 100000 || l.Delay < 500*time.Millisecond {
		t.Errorf("paused with a backlog, lag reads %d bytes / %s", l.Bytes, l.Delay)
	}
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	found := map[string]float64{}
	for _, f := range families {
		for _, m := range f.GetMetric() {
			if m.GetGauge() != nil {
				found[f.GetName()] = m.GetGauge().GetValue()
			}
		}
	}
	if v, ok := found["cutover_replication_lag_bytes"]; !ok || v < 100000 {
		t.Errorf("lag bytes gauge = %v (%v)", v, ok)
	}
	if _, ok := found["cutover_replication_lag_seconds"]; !ok {
		t.Error("no lag seconds gauge")
	}
	r.Resume()
	e.sync(t, r)
	e.requireSame(t, "hist")
}

func TestSyncSequencesNeverLowersAndCompareSchemasNamesDrift(t *testing.T) {
	e := newPairEnv(t, loadSchema+`CREATE SEQUENCE down INCREMENT -1 START 0 MINVALUE -1000000 MAXVALUE 0; CREATE TABLE ident (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v int); CREATE SEQUENCE lone;`)
	r := e.start(t, e.options(t))
	e.exec(t, e.blue, `INSERT INTO hist (acct, delta) SELECT 1, g FROM generate_series(1, 50) g; SELECT nextval('down') FROM generate_series(1, 10); INSERT INTO ident (v) SELECT g FROM generate_series(1, 5) g`)
	// Set but not called: blue hands out 500 next, which green must too.
	e.exec(t, e.blue, `SELECT setval('lone', 500, false)`)
	e.exec(t, e.green, `SELECT setval('ident_id_seq', 1000)`) // green ahead: must stay
	e.sync(t, r)
	// Resolved before the outage, as the driver does.
	if err := r.ResolveSequences(context.Background()); err != nil {
		t.Fatal(err)
	}
	res, err := r.SyncSequencesReport(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]SequenceSync{}
	for _, s := range res {
		got[s.Sequence.String()] = s
	}
	if s := got["public.hist_id_seq"]; !s.Set || s.Blue != 51 {
		t.Errorf("hist_id_seq: %+v", s)
	}
	if s := got["public.down"]; !s.Set || s.Blue != -10 {
		t.Errorf("down: %+v", s)
	}
	if s := got["public.ident_id_seq"]; s.Set || s.Green != 1001 {
		t.Errorf("ident_id_seq (green ahead): %+v", s)
	}
	if s := got["public.lone"]; !s.Set || s.Blue != 500 {
		t.Errorf("lone (set, not called): %+v", s)
	}
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, e.green.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var next int64
	if err := conn.QueryRow(ctx, `SELECT nextval('hist_id_seq')`).Scan(&next); err != nil || next != 51 {
		t.Errorf("green's hist_id_seq hands out %d (%v), want 51", next, err)
	}
	if err := conn.QueryRow(ctx, `SELECT nextval('lone')`).Scan(&next); err != nil || next != 500 {
		t.Errorf("green's lone hands out %d (%v), want 500", next, err)
	}
	if err := r.SyncSequences(ctx); err != nil { // idempotent
		t.Fatal(err)
	}
	e.exec(t, e.green, `DROP SEQUENCE lone`)
	if err := r.SyncSequences(ctx); err == nil || !strings.Contains(err.Error(), "green lacks sequence(s) public.lone") {
		t.Errorf("a sequence missing on green: err = %v", err)
	}
	e.exec(t, e.blue, `DROP SEQUENCE lone`)
	if err := r.SyncSequences(ctx); err != nil { // dropped on blue since resolved: skipped
		t.Errorf("a sequence dropped on blue since it was resolved: %v", err)
	}

	diffs, err := r.CompareSchemas(ctx)
	if err != nil || len(diffs) != 0 {
		t.Fatalf("no drift expected: %v %v", diffs, err)
	}
	bf, gf, err := r.SchemaFingerprint(ctx)
	if err != nil || bf != gf {
		t.Fatalf("fingerprints %s / %s, %v", bf, gf, err)
	}
	e.exec(t, e.blue, `ALTER TABLE acct ADD COLUMN flag boolean; ALTER TABLE hist ALTER COLUMN delta TYPE numeric`)
	diffs, err = r.CompareSchemas(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{
		"column public.acct.flag (boolean) is missing on green":           true,
		"column public.hist.delta is numeric on blue but bigint on green": true,
	}
	for _, d := range diffs {
		if !want[d.String()] {
			t.Errorf("unexpected difference %q", d)
		}
		delete(want, d.String())
	}
	for w := range want {
		t.Errorf("difference not reported: %q", w)
	}
	if bf2, gf2, _ := r.SchemaFingerprint(ctx); bf2 == gf2 || bf2 == bf {
		t.Error("fingerprints do not show the drift")
	}
}

func TestCleanupDropsSlotAndPublication(t *testing.T) {
	e := newPairEnv(t, loadSchema)
	r := e.start(t, e.options(t))
	e.sync(t, r)
	left, err := Leftovers(context.Background(), e.pair.Blue.DSN, NamePrefix)
	if err != nil || len(left) != 2 {
		t.Fatalf("leftovers before cleanup: %+v %v", left, err)
	}
	if err := r.Cleanup(context.Background()); err != nil {
		t.Fatal(err)
	}
	left, err = Leftovers(context.Background(), e.pair.Blue.DSN, NamePrefix)
	if err != nil || len(left) != 0 {
		t.Fatalf("leftovers after cleanup: %+v %v", left, err)
	}
	if err := r.Cleanup(context.Background()); err != nil {
		t.Fatalf("second cleanup: %v", err)
	}
}

func TestSkipCopyStreamsFromNowOnEqualSides(t *testing.T) {
	e := newPairEnv(t, loadSchema)
	for _, s := range []*integration.Postgres{e.blue, e.green} {
		e.exec(t, s, `INSERT INTO acct (id, balance) SELECT g, 7 FROM generate_series(1, 100) g`)
	}
	opts := e.options(t)
	opts.SkipCopy = true
	r := e.start(t, opts)
	e.exec(t, e.blue, `UPDATE acct SET balance = 8 WHERE id <= 10; INSERT INTO hist (acct, delta) VALUES (1, 1)`)
	e.sync(t, r)
	e.requireSame(t, "acct", "hist")
}

// A slot created ahead (PrepareSlot) streams from the position StartAt is
// given: what committed on the source before it is not applied, what
// committed after it is — the reverse replication's start at the flip.
func TestAPreparedSlotStreamsFromThePositionStartAtGives(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE kv (k int PRIMARY KEY, v text);`)
	ctx := context.Background()
	opts := e.options(t)
	opts.SkipCopy = true
	r, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Stop(context.Background()) })
	if err := r.StartAt(ctx, 0); err == nil {
		t.Fatal("StartAt without a prepared slot started")
	}
	r, err = New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Stop(context.Background()) })
	if err := r.Prepare(ctx); err != nil {
		t.Fatal(err)
	}
	if err := r.PrepareSlot(ctx); err != nil {
		t.Fatal(err)
	}
	// Before the chosen start: on both sides already (as what green
	// applied from blue is at the flip), so it must not be applied again.
	for _, side := range []*integration.Postgres{e.blue, e.green} {
		e.exec(t, side, `INSERT INTO kv VALUES (1, 'both sides already')`)
	}
	var pos string
	if err := pgxQueryRow(t, e.blue, `SELECT pg_current_wal_lsn()::text`, &pos); err != nil {
		t.Fatal(err)
	}
	e.exec(t, e.blue, `INSERT INTO kv VALUES (2, 'after the start')`)
	start, err := pglogrepl.ParseLSN(pos)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.StartAt(ctx, start); err != nil {
		t.Fatal(err)
	}
	e.sync(t, r) // a duplicate of row 1 would have failed the apply
	if got := rows(t, e.green, "kv"); fmt.Sprint(got) != fmt.Sprint([]string{`(1,"both sides already")`, `(2,"after the start")`}) {
		t.Errorf("green has %v", got)
	}
	if r.Err() != nil {
		t.Errorf("replicator: %v", r.Err())
	}
}

func pgxQueryRow(t *testing.T, s *integration.Postgres, sql string, dst any) error {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), s.DSN())
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	return conn.QueryRow(context.Background(), sql).Scan(dst)
}

func TestPairsAndDirectionsWhoseOldNamesCollideGetTheirOwnSlotsAndCleanupLeavesTheOthers(t *testing.T) {
	e := newPairEnv(t, loadSchema)
	ctx := context.Background()
	// Slots and publications made without a copy, so that four replicators
	// can share one pair of servers.
	prepare := func(pair, slot string) *Replicator {
		t.Helper()
		opts := e.options(t)
		opts.Plan = "shop"
		opts.Pair.Name = pair
		opts.Slot = slot
		opts.SkipCopy = true
		r, err := New(opts)
		if err != nil {
			t.Fatal(err)
		}
		if err := r.Prepare(ctx); err != nil {
			t.Fatalf("prepare %s: %v", pair, err)
		}
		if err := r.PrepareSlot(ctx); err != nil {
			t.Fatalf("prepare slot of %s: %v", pair, err)
		}
		t.Cleanup(func() { _ = r.Stop(ctx) })
		return r
	}
	// Pair names that differ only by - and _; a pair db-rev and the way
	// back of pair db (the driver's reverse replicator is pair db-rev).
	rs := []*Replicator{
		prepare("db-1", ""),
		prepare("db_1", ""),
		prepare("db-rev", ""),
		prepare("db-rev", Name("shop", "db", Reverse)),
	}
	names := map[string]bool{}
	for _, r := range rs {
		names[r.SlotName()] = true
	}
	if len(names) != len(rs) {
		t.Fatalf("%d replicators share %d names: %v", len(rs), len(names), names)
	}
	slots := func() map[string]bool {
		t.Helper()
		left, err := Leftovers(ctx, e.pair.Blue.DSN, NamePrefix)
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]bool{}
		for _, l := range left {
			if l.Kind == "slot" {
				out[l.Name] = true
			}
		}
		return out
	}
	if got := slots(); len(got) != len(rs) {
		t.Fatalf("blue holds slots %v, want one for each of the %d replicators", got, len(rs))
	}
	// Cleaning up one leaves every other's slot and publication in place.
	for _, i := range []int{0, 3} {
		if err := rs[i].Cleanup(ctx); err != nil {
			t.Fatal(err)
		}
	}
	got := slots()
	for i, r := range rs {
		if want := i == 1 || i == 2; got[r.SlotName()] != want {
			t.Errorf("slot %s of replicator %d present = %v, want %v", r.SlotName(), i, got[r.SlotName()], want)
		}
	}
}
