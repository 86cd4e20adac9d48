package postgres

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Rows of a table without a key are found on green by every value of the
// old row: NULLs (IS NULL), duplicates (one copy changes), and through an
// index on green when there is one (= rather than IS NOT DISTINCT FROM,
// which no index serves).
func TestUpdatesAndDeletesOfAKeylessTableFindTheirRowWithNullsAndDuplicates(t *testing.T) {
	e := newPairEnv(t, `
CREATE TABLE events (kind text, n int, note text);
ALTER TABLE events REPLICA IDENTITY FULL;`)
	e.exec(t, e.green, `CREATE INDEX events_kind_n ON events (kind, n)`)
	e.exec(t, e.blue, `INSERT INTO events VALUES ('a', 1, NULL), ('a', 1, NULL), ('b', NULL, 'x'), (NULL, NULL, NULL), ('c', 3, 'y')`)
	r := e.start(t, e.options(t))
	e.sync(t, r)
	for _, sql := range []string{
		`UPDATE events SET note = 'one of two' WHERE ctid = (SELECT ctid FROM events WHERE kind = 'a' LIMIT 1)`,
		`UPDATE events SET note = 'was null' WHERE kind = 'b'`,
		`UPDATE events SET kind = 'all null before' WHERE kind IS NULL`,
		`DELETE FROM events WHERE kind = 'c'`,
		`INSERT INTO events SELECT 'bulk', g, NULL FROM generate_series(1, 2000) g`,
		`UPDATE events SET note = 'bulk ' || n WHERE kind = 'bulk' AND n % 7 = 0`,
		`DELETE FROM events WHERE kind = 'bulk' AND n % 5 = 0`,
	} {
		e.exec(t, e.blue, sql)
	}
	e.sync(t, r)
	e.requireSame(t, "events")
	// The lookups of the last statements went through green's index.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, e.green.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var idxScans int64
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		if err := conn.QueryRow(ctx, `SELECT coalesce(idx_scan, 0) FROM pg_stat_user_indexes WHERE indexrelname = 'events_kind_n'`).Scan(&idxScans); err != nil {
			t.Fatal(err)
		}
		if idxScans >= 500 || time.Now().After(deadline) {
			break
		}
	}
	if idxScans < 500 {
		t.Fatalf("green's index on the key-less table was scanned %d times for about 690 changes: the row lookups do not use it", idxScans)
	}
}
