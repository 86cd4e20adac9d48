package postgres

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
)

const basicSchema = `
CREATE TABLE accounts (id bigint PRIMARY KEY, owner text NOT NULL, balance numeric(12,2) NOT NULL DEFAULT 0);
CREATE TABLE events (id bigserial PRIMARY KEY, account bigint, note text, at timestamptz DEFAULT now());
`

func TestReplicatesCopyAndStream(t *testing.T) {
	e := newPairEnv(t, basicSchema)
	e.exec(t, e.blue, `INSERT INTO accounts SELECT g, 'owner ' || g, g * 1.5 FROM generate_series(1, 1000) g`)
	e.exec(t, e.blue, `INSERT INTO events (account, note) SELECT g % 100, 'note ' || g FROM generate_series(1, 500) g`)
	r := e.start(t, e.options(t))
	e.sync(t, r)
	e.requireSame(t, "accounts", "events")

	e.exec(t, e.blue, `UPDATE accounts SET balance = balance + 1 WHERE id % 7 = 0`)
	e.exec(t, e.blue, `DELETE FROM accounts WHERE id % 11 = 0`)
	e.exec(t, e.blue, `INSERT INTO accounts SELECT g, 'new ' || g, 0 FROM generate_series(2001, 2100) g`)
	e.exec(t, e.blue, `UPDATE accounts SET id = id + 10000 WHERE id BETWEEN 100 AND 110`)
	e.exec(t, e.blue, `INSERT INTO events (account, note) VALUES (1, 'x'), (2, 'y')`)
	e.sync(t, r)
	e.requireSame(t, "accounts", "events")

	e.exec(t, e.blue, `TRUNCATE events`)
	e.exec(t, e.blue, `INSERT INTO events (account, note) VALUES (3, 'after truncate')`)
	e.sync(t, r)
	e.requireSame(t, "accounts", "events")
	if r.Err() != nil {
		t.Fatal(r.Err())
	}
	if st := r.Status(); st.Phase != PhaseStreaming || !strings.HasPrefix(st.Slot, "cutover_") {
		t.Errorf("status = %+v", st)
	}
}

func TestCopySplitsLargeTablesIntoBlockRanges(t *testing.T) {
	e := newPairEnv(t, basicSchema)
	e.exec(t, e.blue, `INSERT INTO accounts SELECT g, 'owner ' || g, g FROM generate_series(1, 20000) g`)
	// Holes and rows moved to later blocks: the ranges must still cover
	// every row exactly once.
	e.exec(t, e.blue, `DELETE FROM accounts WHERE id % 13 = 0`)
	e.exec(t, e.blue, `UPDATE accounts SET balance = -balance WHERE id % 17 = 0`)
	e.exec(t, e.blue, `INSERT INTO events (account, note) VALUES (1, 'small')`)
	opts := e.options(t)
	opts.CopyParallel = 3
	opts.copySplitBytes = 1 // split every table
	r := e.start(t, opts)
	e.sync(t, r)
	e.requireSame(t, "accounts", "events")

	var oid uint32
	var blocks int64
	conn, err := pgx.Connect(context.Background(), e.blue.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if err := conn.QueryRow(context.Background(), `SELECT 'accounts'::regclass::oid, pg_relation_size('accounts') / 8192`).Scan(&oid, &blocks); err != nil {
		t.Fatal(err)
	}
	pieces, err := r.copyPieces(context.Background(), []*tableInfo{{Name: TableName{"public", "accounts"}, OID: oid, BytesEst: 1 << 30}})
	if err != nil {
		t.Fatal(err)
	}
	if len(pieces) != 3 || pieces[0].from != 0 || pieces[2].to != -1 || pieces[1].from != pieces[0].to || pieces[2].from != pieces[1].to || pieces[1].from == 0 {
		t.Errorf("accounts (%d blocks) split into %+v", blocks, pieces)
	}
	if r.Err() != nil {
		t.Fatal(r.Err())
	}
}

// A backlog of many small transactions with a table's definition changed
// in the middle: batches are gathered while the previous one commits, and
// the changed relation (which needs green's catalog) must wait for that
// commit and apply in order.
func TestBacklogAcrossASchemaChangeAppliesInOrder(t *testing.T) {
	e := newPairEnv(t, basicSchema)
	opts := e.options(t)
	// Small batches: many commits for the changed relations to arrive
	// during.
	opts.MaxBatchChanges = 5
	r := e.start(t, opts)
	e.sync(t, r)
	r.Pause()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, e.blue.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	id := 0
	for round := 0; round < 5; round++ {
		col := fmt.Sprint("note", round)
		for i := 0; i < 100; i++ {
			id++
			if _, err := conn.Exec(ctx, `INSERT INTO accounts (id, owner, balance) VALUES ($1, 'o', $2)`, id, id); err != nil {
				t.Fatal(err)
			}
			if round > 0 {
				if _, err := conn.Exec(ctx, `UPDATE accounts SET note`+fmt.Sprint(round-1)+` = $2 WHERE id = $1`, id-1, fmt.Sprint("n", id)); err != nil {
					t.Fatal(err)
				}
			}
		}
		e.exec(t, e.green, `ALTER TABLE accounts ADD COLUMN `+col+` text`)
		e.exec(t, e.blue, `ALTER TABLE accounts ADD COLUMN `+col+` text`)
	}
	r.Resume()
	e.sync(t, r)
	e.requireSame(t, "accounts")
	if r.Err() != nil {
		t.Fatal(r.Err())
	}
}
