package postgres

import (
	"bytes"
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/replication"
)

const indexSchema = `
CREATE TABLE parent (id int PRIMARY KEY, code text NOT NULL, CONSTRAINT parent_code_key UNIQUE (code));
CREATE TABLE orders (
	id bigint PRIMARY KEY,
	parent int NOT NULL REFERENCES parent (id),
	account int NOT NULL,
	note text,
	placed timestamptz NOT NULL,
	CHECK (account >= 0)
);
CREATE INDEX orders_account ON orders (account);
CREATE UNIQUE INDEX orders_note_unique ON orders (note) WHERE note IS NOT NULL;
CREATE INDEX orders_lower_note ON orders (lower(note)) INCLUDE (account);
CREATE INDEX "Orders Placed" ON orders USING brin (placed) WITH (pages_per_range = 16);
CREATE INDEX orders_commented ON orders (placed);
COMMENT ON INDEX orders_commented IS 'kept in place: a comment is not in pg_get_indexdef';
CREATE TABLE keyed (k int NOT NULL, v text);
CREATE UNIQUE INDEX keyed_k ON keyed (k);
ALTER TABLE keyed REPLICA IDENTITY USING INDEX keyed_k;
CREATE INDEX keyed_v ON keyed (v);
`

// catalogOf returns green's indexes and constraints of the public schema,
// with their definitions, sorted: what a copy must leave as it found it.
func catalogOf(t testing.TB, pg *integration.Postgres) []string {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, pg.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, `
		SELECT 'index ' || indexname || ': ' || indexdef FROM pg_indexes WHERE schemaname = 'public'
		UNION ALL
		SELECT 'constraint ' || conname || ': ' || pg_get_constraintdef(oid) || ' valid=' || convalidated FROM pg_constraint WHERE connamespace = 'public'::regnamespace
		UNION ALL
		SELECT 'identity ' || relname || ': ' || relreplident::text FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind = 'r'
		UNION ALL
		SELECT 'comment ' || c.relname || ': ' || d.description FROM pg_description d JOIN pg_class c ON c.oid = d.objoid AND d.classoid = 'pg_class'::regclass WHERE c.relnamespace = 'public'::regnamespace`)
	if err != nil {
		t.Fatal(err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(out)
	return out
}

func deferredCount(t testing.TB, pg *integration.Postgres) int {
	t.Helper()
	var n int
	conn, err := pgx.Connect(context.Background(), pg.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if err := conn.QueryRow(context.Background(), `SELECT count(*) FROM cutover.deferred_indexes`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// killMidCopy starts a replicator and cancels it once the copy is under
// way (rows copied, tables left), as a crash of the agent would.
func killMidCopy(t *testing.T, e *pairEnv, opts Options) {
	t.Helper()
	ctx, kill := context.WithCancel(context.Background())
	killed := make(chan replication.Progress, 1)
	opts.progressEvery = 10 * time.Millisecond
	opts.OnCopyProgress = func(p replication.Progress) {
		if p.Rows > 1000 && p.TablesDone < p.TablesTotal {
			select {
			case killed <- p:
				kill()
			default:
			}
		}
	}
	r, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	<-r.Done()
	select {
	case p := <-killed:
		t.Logf("killed during copy at %+v", p)
	default:
		t.Fatal("the copy finished before it could be killed")
	}
}

func seedOrders(t *testing.T, e *pairEnv, n int) {
	e.exec(t, e.blue, `INSERT INTO parent SELECT g, 'c' || g FROM generate_series(1, 100) g`)
	e.exec(t, e.blue, `INSERT INTO orders SELECT g, g % 100 + 1, g % 977, CASE WHEN g % 3 = 0 THEN 'note ' || g END, '2026-01-01'::timestamptz + g * interval '1 second' FROM generate_series(1, $1::int) g`, n)
	e.exec(t, e.blue, `INSERT INTO keyed SELECT g, 'v' || g FROM generate_series(1, 1000) g`)
}

// Green's plain secondary indexes are dropped for the copy and built after
// it; a copy killed in between leaves their definitions on green, and the
// retried copy ends with exactly green's original indexes and constraints.
func TestCopyDefersSecondaryIndexesAndARetryRestoresThemExactly(t *testing.T) {
	e := newPairEnv(t, indexSchema)
	seedOrders(t, e, 300000)
	before := catalogOf(t, e.green)

	opts := e.options(t)
	opts.CopyParallel = 1 // one table at a time: the kill lands with tables left
	killMidCopy(t, e, opts)

	// Mid-copy: the deferrable indexes are gone from green and recorded.
	mid := catalogOf(t, e.green)
	deferred := []string{"orders_account", "orders_note_unique", "orders_lower_note", "Orders Placed", "keyed_v", "orders_pkey", "parent_code_key"}
	for _, gone := range deferred {
		if slices.ContainsFunc(mid, func(l string) bool { return strings.HasPrefix(l, "index "+gone+":") }) {
			t.Errorf("index %s still on green during the copy", gone)
		}
	}
	if n := deferredCount(t, e.green); n != len(deferred) {
		t.Errorf("%d deferred index definitions recorded on green, want %d", n, len(deferred))
	}
	// Kept: a key a foreign key depends on, the replica identity, an index
	// with a comment.
	for _, kept := range []string{"index parent_pkey:", "index keyed_k:", "index orders_commented:"} {
		if !slices.ContainsFunc(mid, func(l string) bool { return strings.HasPrefix(l, kept) }) {
			t.Errorf("%s was dropped; constraint, replica-identity and commented indexes stay", kept)
		}
	}

	r := e.start(t, e.options(t))
	e.exec(t, e.blue, `UPDATE orders SET account = account + 1 WHERE id % 1000 = 0`)
	e.sync(t, r)
	e.requireSame(t, "parent", "orders", "keyed")
	if after := catalogOf(t, e.green); !slices.Equal(before, after) {
		t.Errorf("green's catalog after the retried copy differs:\nbefore %q\nafter  %q", before, after)
	}
	if n := deferredCount(t, e.green); n != 0 {
		t.Errorf("%d deferred index definitions left after the copy", n)
	}
	// The retry built the dead copy's indexes before its pre-checks (they
	// read green's keys), then deferred them again.
	if st := r.lastCopyStats(); st.IndexesBuilt != len(deferred) {
		t.Errorf("copy stats %+v, want %d indexes built", st, len(deferred))
	}
}

// A plan aborted mid-copy gives green its indexes back at cleanup.
func TestCleanupAfterAKilledCopyRestoresGreensIndexes(t *testing.T) {
	e := newPairEnv(t, indexSchema)
	seedOrders(t, e, 200000)
	before := catalogOf(t, e.green)
	opts := e.options(t)
	opts.CopyParallel = 1
	killMidCopy(t, e, opts)
	if deferredCount(t, e.green) == 0 {
		t.Fatal("no index was deferred")
	}
	r, err := New(e.options(t))
	if err != nil {
		t.Fatal(err)
	}
	d, err := Cleanup(context.Background(), e.plan, e.pair, r.SlotName(), testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	if d.IndexesRebuilt != 7 {
		t.Errorf("cleanup rebuilt %d indexes, want 7", d.IndexesRebuilt)
	}
	if after := catalogOf(t, e.green); !slices.Equal(before, after) {
		t.Errorf("green's catalog after cleanup differs:\nbefore %q\nafter  %q", before, after)
	}
}

// Tables whose every column has the same built-in type (or an enum) on
// both sides go in binary; a type without binary I/O (aclitem), a domain
// and a composite type whose OIDs differ between the servers go in text;
// a table another table's foreign key references is not FROZEN (TRUNCATE
// would refuse it). Every path copies exactly, and the streamed changes
// apply on top.
func TestCopyFormatsBinaryWhereTypesAllowFreezeWhereSafe(t *testing.T) {
	if testing.Short() {
		t.Skip("needs PostgreSQL servers")
	}
	e := newPairEnv(t, "")
	// Shift green's OIDs so user-defined types differ between the sides.
	e.exec(t, e.green, `CREATE TYPE unused_a AS (x int); CREATE TYPE unused_b AS ENUM ('z')`)
	schema := `
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TYPE pair2 AS (a int, b text);
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TABLE bin (id int PRIMARY KEY, t text, n numeric(20,5), at timestamptz, ints int[], j jsonb, u uuid, m mood, r int4range, b bytea, f float8, iv interval, c char(5));
CREATE TABLE acl (id int PRIMARY KEY, a aclitem);
CREATE TABLE comp (id int PRIMARY KEY, p pair2);
CREATE TABLE dom (id int PRIMARY KEY, d posint);
CREATE TABLE referenced (id int PRIMARY KEY);
CREATE TABLE referencing (id int PRIMARY KEY, ref int REFERENCES referenced (id));`
	e.exec(t, e.blue, schema)
	e.exec(t, e.green, schema)
	e.exec(t, e.green, `CREATE EXTENSION pg_visibility`)
	e.exec(t, e.blue, `INSERT INTO bin SELECT g, 'line' || g || E'\n\ttab\\', g * 1.5 / 7, '2026-01-01 00:00:00.123456+00'::timestamptz + g * interval '1 minute',
		ARRAY[g, NULL, -g], jsonb_build_object('k', g, 'a', ARRAY[1, 2]), md5(g::text)::uuid, (ARRAY['sad','ok','happy'])[g % 3 + 1]::mood,
		int4range(g, g + 10), decode(md5(g::text), 'hex'), g / 3.0, g * interval '1.5 second', 'c' || (g % 100)
		FROM generate_series(1, 5000) g`)
	e.exec(t, e.blue, `INSERT INTO bin (id) VALUES (0)`)
	e.exec(t, e.blue, `INSERT INTO acl SELECT g, ('postgres=r' || CASE WHEN g % 2 = 0 THEN 'w' ELSE '' END || '/postgres')::aclitem FROM generate_series(1, 100) g`)
	e.exec(t, e.blue, `INSERT INTO comp SELECT g, ROW(g, 'x' || g)::pair2 FROM generate_series(1, 100) g`)
	e.exec(t, e.blue, `INSERT INTO dom SELECT g, g FROM generate_series(1, 100) g`)
	e.exec(t, e.blue, `INSERT INTO referenced SELECT g FROM generate_series(1, 100) g`)
	e.exec(t, e.blue, `INSERT INTO referencing SELECT g, g FROM generate_series(1, 100) g`)

	r := e.start(t, e.options(t))
	e.exec(t, e.blue, `UPDATE bin SET t = 'streamed', m = 'happy' WHERE id % 100 = 0`)
	e.exec(t, e.blue, `UPDATE comp SET p = ROW(-1, 'streamed')::pair2 WHERE id = 5`)
	e.sync(t, r)
	tables := []string{"bin", "acl", "comp", "dom", "referenced", "referencing"}
	e.requireSame(t, tables...)

	all, err := listTables(context.Background(), r.blue)
	if err != nil {
		t.Fatal(err)
	}
	var infos []*tableInfo
	for _, name := range tables {
		infos = append(infos, all[TableName{"public", name}])
	}
	plans, err := r.copyPlans(context.Background(), infos)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]copyPlan{
		"bin": {binary: true, freeze: true}, "acl": {freeze: true}, "comp": {freeze: true}, "dom": {freeze: true},
		"referenced": {binary: true}, "referencing": {binary: true, freeze: true},
	}
	for _, ti := range infos {
		if got := plans[ti]; got != want[ti.Name.Name] {
			t.Errorf("%s: plan %+v, want %+v", ti.Name.Name, got, want[ti.Name.Name])
		}
	}
	// Progress counts binary rows from the stream, however it is cut.
	bconn, err := pgx.Connect(context.Background(), e.blue.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer bconn.Close(context.Background())
	var buf bytes.Buffer
	tag, err := bconn.PgConn().CopyTo(context.Background(), &buf, `COPY bin TO STDOUT WITH (FORMAT binary)`)
	if err != nil {
		t.Fatal(err)
	}
	for _, chunk := range []int{1, 3, 7, 4096, buf.Len()} {
		var br binaryRows
		var n int64
		for data := buf.Bytes(); len(data) > 0; {
			k := min(chunk, len(data))
			n += br.feed(data[:k])
			data = data[k:]
		}
		if n != tag.RowsAffected() {
			t.Errorf("binary stream in chunks of %d: counted %d rows, COPY sent %d", chunk, n, tag.RowsAffected())
		}
	}

	// FREEZE wrote the rows frozen: the visibility map says so without a
	// vacuum; the referenced table was copied without it.
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, e.green.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	for name, frozen := range map[string]bool{"acl": true, "dom": true, "referencing": true, "referenced": false} {
		var n int64
		if err := conn.QueryRow(ctx, `SELECT all_frozen FROM pg_visibility_map_summary($1::regclass)`, name).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if (n > 0) != frozen {
			t.Errorf("%s: %d all-frozen pages after the copy, want frozen=%v", name, n, frozen)
		}
	}
}

// The same tables copied with binary and FREEZE turned off (text, plain
// COPY) end the same: the fallback path is whole.
func TestCopyTextFallbackWithoutFreeze(t *testing.T) {
	e := newPairEnv(t, indexSchema)
	seedOrders(t, e, 20000)
	opts := e.options(t)
	opts.copyNoBinary, opts.copyNoFreeze, opts.copyNoDefer = true, true, true
	opts.CopyParallel, opts.copySplitBytes = 3, 1
	r := e.start(t, opts)
	e.sync(t, r)
	e.requireSame(t, "parent", "orders", "keyed")
	if st := r.lastCopyStats(); st.IndexesBuilt != 0 {
		t.Errorf("indexes built with deferral off: %+v", st)
	}
}
