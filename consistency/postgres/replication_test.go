package postgres

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cutover/cutover/consistency"
	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/internal/config"
	replpg "github.com/cutover/cutover/replication/postgres"
)

// replWaiter is the PositionWaiter a plan driver builds from the
// replication engine: blue's WAL position, and green's applied position.
type replWaiter struct {
	blue *pgxpool.Pool
	r    *replpg.Replicator
}

func (w replWaiter) BluePosition(ctx context.Context) (string, error) {
	var pos string
	err := w.blue.QueryRow(ctx, `SELECT pg_current_wal_lsn()::text`).Scan(&pos)
	return pos, err
}

func (w replWaiter) WaitGreenApplied(ctx context.Context, pos string) error {
	want, err := pglogrepl.ParseLSN(pos)
	if err != nil {
		return err
	}
	for w.r.Applied() < want {
		if err := w.r.Err(); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
	return nil
}

func TestNoFalsePositiveOnRowsReplicatedByTheReplicationEngine(t *testing.T) {
	p := newPair(t, integration.PostgresOptions{}, integration.PostgresOptions{
		Settings: map[string]string{"TimeZone": "America/Sao_Paulo", "extra_float_digits": "0", "DateStyle": "German"},
	})
	p.both(t, zooSetup+accountsSetup)
	exec(t, p.green, "TRUNCATE zoo, accounts") // green gets its rows from the initial copy

	d := consistency.NewDirtySet(0)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	name := "pverifyrepl"
	r, err := replpg.New(replpg.Options{
		Plan: name,
		Pair: config.Pair{Name: "db", Engine: config.Postgres,
			Blue:  config.Endpoint{DSN: config.DSN(p.blue.DSN())},
			Green: config.Endpoint{DSN: config.DSN(p.green.DSN())}},
		OnRowChange:    d.MarkChanged,
		StatusInterval: 200 * time.Millisecond,
		MaxBatchDelay:  50 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Stop(context.Background()) })
	bluePool, err := pgxpool.New(ctx, p.blue.DSN())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(bluePool.Close)
	catchUp := func(t *testing.T) {
		t.Helper()
		b := make([]byte, 8)
		_, _ = crand.Read(b)
		nonce := hex.EncodeToString(b)
		exec(t, p.blue, "INSERT INTO cutover.markers (nonce, plan, epoch) VALUES ('"+nonce+"', '"+name+"', 1)")
		wctx, wcancel := context.WithTimeout(ctx, time.Minute)
		defer wcancel()
		if _, err := r.WaitMarker(wctx, nonce); err != nil {
			t.Fatalf("wait marker: %v (replicator: %v)", err, r.Err())
		}
	}
	catchUp(t)

	// Writes go on while the online pass runs.
	wctx, stopWriting := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		rnd := rand.New(rand.NewPCG(3, 4))
		for wctx.Err() == nil {
			id := rnd.IntN(20000) + 1
			zid := 2 * (rnd.IntN(3000) + 1)
			_, err := bluePool.Exec(wctx, `UPDATE accounts SET balance = balance + 1 WHERE id = $1;`, id)
			if err == nil {
				_, err = bluePool.Exec(wctx, `UPDATE zoo SET f8 = f8 * 1.5, tstz = now(), txt = txt || '·', num = num + 0.10 WHERE id = $1`, zid)
			}
			if err != nil && wctx.Err() == nil {
				t.Error(err)
				return
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	t.Cleanup(func() { stopWriting(); wg.Wait() })

	opts := smallChunks(500)
	v := consistency.NewVerifier(p.blueDB, p.greenDB, opts)
	rep, err := v.Online(ctx, []string{"zoo", "accounts"}, replWaiter{blue: bluePool, r: r}, d)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Verdict != consistency.Equal {
		t.Fatalf("online verdict %s: %+v %v", rep.Verdict, diffs(rep), tableErrors(rep))
	}
	var rechecked, unsettled int64
	for _, tab := range rep.Tables {
		rechecked += tab.Rechecked
		unsettled += tab.Unsettled
	}
	t.Logf("online: %d chunks, %d differed at first sight, %d re-checks, %d unsettled; dirty %+v",
		rep.Totals.Chunks, rep.Totals.ChunksDiffering, rechecked, unsettled, d.Stats())

	// The fence: writes stop, green catches up, the dirty pass runs.
	stopWriting()
	wg.Wait()
	catchUp(t)
	dirty, err := v.Dirty(ctx, []string{"zoo", "accounts"}, d)
	if err != nil {
		t.Fatal(err)
	}
	if dirty.Verdict != consistency.Equal {
		t.Fatalf("dirty verdict %s: %+v %v", dirty.Verdict, diffs(dirty), tableErrors(dirty))
	}
	t.Logf("dirty: %d rows compared", dirty.Totals.RowsBlue)
	full, err := v.Full(ctx, []string{"zoo", "accounts"})
	if err != nil || full.Verdict != consistency.Equal {
		t.Fatalf("full verdict %v %v: %+v", full.Verdict, err, diffs(full))
	}

	// And a row green lost behind the engine's back is still found.
	exec(t, p.green, "SET session_replication_role = replica; UPDATE zoo SET note = 'lost' WHERE id = 4000")
	full = p.verify(t, opts, "zoo")
	if ds := diffs(full); len(ds) != 1 || !strings.Contains(ds[0].Columns[0].Green.String(), "lost") {
		t.Fatalf("differences %+v", ds)
	}
}

// TestKeyLessAndIndexIdentityTablesReplicatedByTheEngineAreVerified runs
// the replication engine on a key-less table (REPLICA IDENTITY FULL) and
// on a keyed table whose replica identity is another unique index: its
// stream names rows by that index, not by the primary key the verifier
// uses. Changes lost in the fence on either must still be found.
func TestKeyLessAndIndexIdentityTablesReplicatedByTheEngineAreVerified(t *testing.T) {
	p := newPair(t, integration.PostgresOptions{}, integration.PostgresOptions{})
	const setup = `
CREATE TABLE events (at timestamptz, what text, n int);
ALTER TABLE events REPLICA IDENTITY FULL;
INSERT INTO events SELECT '2025-01-01 00:00:00+00'::timestamptz + g * interval '1 minute', 'event ' || g, g % 10 FROM generate_series(1, 5000) g;
CREATE TABLE tagged (id int PRIMARY KEY, code int NOT NULL UNIQUE, v int);
ALTER TABLE tagged REPLICA IDENTITY USING INDEX tagged_code_key;
INSERT INTO tagged SELECT g, 100000 + g, 0 FROM generate_series(1, 5000) g;
`
	p.both(t, setup)
	exec(t, p.green, "TRUNCATE events, tagged")

	d := consistency.NewDirtySet(0)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	name := "pverifyheap"
	r, err := replpg.New(replpg.Options{
		Plan: name,
		Pair: config.Pair{Name: "db", Engine: config.Postgres,
			Blue:  config.Endpoint{DSN: config.DSN(p.blue.DSN())},
			Green: config.Endpoint{DSN: config.DSN(p.green.DSN())}},
		OnRowChange:    d.MarkChanged,
		StatusInterval: 200 * time.Millisecond,
		MaxBatchDelay:  50 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Stop(context.Background()) })
	bluePool, err := pgxpool.New(ctx, p.blue.DSN())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(bluePool.Close)
	catchUp := func(t *testing.T) {
		t.Helper()
		b := make([]byte, 8)
		_, _ = crand.Read(b)
		nonce := hex.EncodeToString(b)
		exec(t, p.blue, "INSERT INTO cutover.markers (nonce, plan, epoch) VALUES ('"+nonce+"', '"+name+"', 1)")
		wctx, wcancel := context.WithTimeout(ctx, time.Minute)
		defer wcancel()
		if _, err := r.WaitMarker(wctx, nonce); err != nil {
			t.Fatalf("wait marker: %v (replicator: %v)", err, r.Err())
		}
	}
	catchUp(t)
	v := consistency.NewVerifier(p.blueDB, p.greenDB, smallChunks(500))
	tables := []string{"events", "tagged"}
	rep, err := v.Online(ctx, tables, replWaiter{blue: bluePool, r: r}, d)
	if err != nil || rep.Verdict != consistency.Equal {
		t.Fatalf("online: %v, %v %v", err, diffs(rep), tableErrors(rep))
	}

	// Writes after the online pass, then the fence; green loses two of
	// them (as a broken applier would).
	exec(t, p.blue, `UPDATE events SET n = -1 WHERE what = 'event 77';
		INSERT INTO events VALUES (NULL, 'late', 3), (NULL, 'late', 3);
		UPDATE tagged SET v = 1 WHERE id IN (10, 20, 30)`)
	catchUp(t)
	exec(t, p.green, `SET session_replication_role = replica;
		UPDATE events SET n = 77 % 10 WHERE what = 'event 77';
		UPDATE tagged SET v = 0 WHERE id = 20`)
	dirty, err := v.Dirty(ctx, tables, d)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, tab := range dirty.Tables {
		for _, d := range tab.Differences {
			got = append(got, tab.Name+" "+string(d.Kind)+" "+keyText(d.Key))
		}
	}
	want := "public.events changed at=2025-01-01 01:17:00+00, what=event 77\npublic.tagged changed id=20"
	if strings.Join(got, "\n") != want {
		t.Fatalf("dirty pass: verdict %s, differences:\n%s\nerrors %v\nwant:\n%s", dirty.Verdict, strings.Join(got, "\n"), tableErrors(dirty), want)
	}
}
