package postgres

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cutover/cutover/replication"
)

// A plan aborted after its copy leaves green's tables full; the next plan
// on the same pair copies again only when nothing but cutover wrote them:
// green fenced since before the first copy began.
func TestARetriedPlanCopiesAgainOnlyOverRowsCutoverWroteWhileGreenWasFenced(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE items (id int PRIMARY KEY, v text)`)
	e.exec(t, e.blue, `INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 500) g`)
	var fencedAt time.Time
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, e.green.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if err := conn.QueryRow(ctx, `SELECT now()`).Scan(&fencedAt); err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * time.Millisecond)

	// The first plan copies, then stops (aborted): its slot is dropped.
	first := e.options(t)
	first.Slot = "cutover_retry_first"
	r1 := e.start(t, first)
	e.sync(t, r1)
	if err := r1.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if err := r1.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	e.exec(t, e.blue, `UPDATE items SET v = 'after the abort' WHERE id <= 10`)

	retry := func(slot string, since time.Time) (*Replicator, error) {
		opts := e.options(t)
		opts.Slot, opts.GreenFencedSince = slot, since
		r, err := New(opts)
		if err != nil {
			t.Fatal(err)
		}
		rctx, rcancel := context.WithCancel(context.Background())
		t.Cleanup(rcancel)
		if err := r.Start(rctx); err != nil {
			return nil, err
		}
		t.Cleanup(func() { _ = r.Stop(context.Background()) })
		return r, nil
	}
	t.Run("green not known to be fenced: refused, naming the table", func(t *testing.T) {
		_, err := retry("cutover_retry_unknown", time.Time{})
		if !errors.Is(err, replication.ErrPrecheck) || !strings.Contains(err.Error(), "public.items") {
			t.Fatalf("err = %v, want a pre-check error naming public.items", err)
		}
	})
	t.Run("green fenced only after the first copy began: refused", func(t *testing.T) {
		_, err := retry("cutover_retry_late", time.Now().Add(time.Hour))
		if !errors.Is(err, replication.ErrPrecheck) {
			t.Fatalf("err = %v, want a pre-check error", err)
		}
	})
	t.Run("green fenced since before the first copy: copied again", func(t *testing.T) {
		r, err := retry("cutover_retry_second", fencedAt)
		if err != nil {
			t.Fatalf("start: %v", err)
		}
		e.sync(t, r)
		e.requireSame(t, "items")
	})
}
