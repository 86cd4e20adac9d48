package postgres

import (
	"strings"
	"testing"
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
