// Package postgres is the PostgreSQL engine of consistency: it describes
// tables, walks chunk boundaries, hashes chunks and fetches rows inside the
// server. ENCODING.md in the parent folder gives the canonical row encoding.
//
// It needs PostgreSQL 14 or later on both sides (hash_record_extended).
package postgres

import (
	"context"
	"errors"
	"fmt"
	"math/big"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cutover/cutover/consistency"
)

var (
	_ consistency.Database    = (*DB)(nil)
	_ consistency.Snapshotter = (*DB)(nil)
	_ consistency.BatchHasher = (*DB)(nil)
)

// sessionSettings pin every setting that changes how a value prints, so
// that text forms (of keys, of the types hashed through their text form,
// of values in reports) are the same on both sides whatever each server's
// configuration says. The rest keep chunk queries cheap and the session
// harmless.
var sessionSettings = map[string]string{
	"TimeZone":                        "UTC",
	"DateStyle":                       "ISO, YMD",
	"IntervalStyle":                   "postgres",
	"extra_float_digits":              "3", // shortest exact (PostgreSQL >= 12)
	"bytea_output":                    "hex",
	"lc_monetary":                     "C",
	"client_encoding":                 "UTF8",
	"jit":                             "off", // compile time dwarfs a chunk query
	"max_parallel_workers_per_gather": "0",   // chunks are small; parallelism is ours
	"default_transaction_read_only":   "on",  // verification never writes
	"application_name":                "cutover-verify",
}

// hashSettings are added for the connections that hash chunks. A chunk is
// a key range of thousands to millions of rows: a bitmap heap scan reads
// its pages once each, in physical order, faster than an index scan
// visiting rows in key order, and far faster when key order and physical
// order disagree (uuid keys). Boundaries need index-only scans, which
// enable_indexscan=off would also turn off: they use the other pool.
// enable_seqscan=off keeps the bitmap scan for chunks the planner deems
// large (about 40% of a table and up): a chunk's seq scan reads the whole
// table, so a pass cut into many such chunks reads it many times. Where
// no index serves the range (a text key in a non-C collation), the seq
// scan is still chosen.
var hashSettings = map[string]string{"enable_indexscan": "off", "enable_seqscan": "off"}

// DB is one side, over two pools of connections with sessionSettings:
// one hashes chunks, the other walks boundaries and fetches rows.
type DB struct {
	pool     *pgxpool.Pool
	hashPool *pgxpool.Pool

	// scans is how many statements read one key-less table at once, in
	// block ranges (see Buckets): the verifier's Parallel.
	scans int

	mu sync.Mutex
	// partitioned holds the partitioned tables Describe saw on this
	// server: they are read with their partitions, plain tables without
	// inheritance children (which are tables of their own).
	partitioned map[string]bool
}

// Open connects to dsn with a pool of at most maxConns connections (give
// it the verifier's Parallel plus 2: the boundary walk and positions).
// The DSN is never included in errors.
func Open(ctx context.Context, dsn string, maxConns int) (*DB, error) {
	pool, err := openPool(ctx, dsn, maxConns, nil)
	if err != nil {
		return nil, err
	}
	hashPool, err := openPool(ctx, dsn, maxConns, hashSettings)
	if err != nil {
		pool.Close()
		return nil, err
	}
	return &DB{pool: pool, hashPool: hashPool, scans: max(maxConns-2, 1), partitioned: make(map[string]bool)}, nil
}

func openPool(ctx context.Context, dsn string, maxConns int, extra map[string]string) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		// pgx's parse errors can quote the DSN; keep only the kind.
		return nil, errors.New("parse dsn: malformed PostgreSQL connection string")
	}
	if maxConns > 0 {
		cfg.MaxConns = int32(maxConns)
	}
	for k, v := range sessionSettings {
		cfg.ConnConfig.RuntimeParams[k] = v
	}
	for k, v := range extra {
		cfg.ConnConfig.RuntimeParams[k] = v
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("connect: %w", err)
	}
	return pool, nil
}

// Close closes the pools.
func (db *DB) Close() {
	db.pool.Close()
	db.hashPool.Close()
}

// Fingerprint checks the server version and returns the server encoding
// and a probe hash: sides with different encodings, or whose hash
// functions differ (a big-endian build), must not be compared.
func (db *DB) Fingerprint(ctx context.Context) (string, error) {
	var version int
	if err := db.pool.QueryRow(ctx, `SELECT current_setting('server_version_num')::int`).Scan(&version); err != nil {
		return "", fmt.Errorf("server version: %w", err)
	}
	if version < 140000 {
		return "", fmt.Errorf("%w: PostgreSQL %d.%d: row hashing needs 14 or later (hash_record_extended)",
			consistency.ErrUnsupported, version/10000, version%10000)
	}
	var enc, probe string
	err := db.pool.QueryRow(ctx, `SELECT current_setting('server_encoding'),
		hashint8extended(h, h)::text FROM (SELECT hash_record_extended(ROW(
			-42::int8, 'cutover probe'::text COLLATE "C", 1.5::float8, '\xdeadbeef'::bytea,
			'2000-01-02 03:04:05.678901+00'::timestamptz, 1.10::numeric, scale(1.10::numeric),
			'6f1c2a4e-9d3b-4c8a-b5e7-0f1e2d3c4b5a'::uuid, true, '2001-02-03'::date), 7) AS h) s`).Scan(&enc, &probe)
	if err != nil {
		return "", fmt.Errorf("hash probe: %w", err)
	}
	return "postgres encoding=" + enc + " probe=" + probe, nil
}

// Position returns the current WAL position (the replay position on a
// standby).
func (db *DB) Position(ctx context.Context) (string, error) {
	var pos string
	err := db.pool.QueryRow(ctx, `SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text`).Scan(&pos)
	if err != nil {
		return "", fmt.Errorf("position: %w", err)
	}
	return pos, nil
}

// Checksum hashes the rows of s: count, and the exact sum (as numeric)
// of a 64-bit hash of each row's canonical encoding.
func (db *DB) Checksum(ctx context.Context, t *consistency.Table, s consistency.Span) (consistency.Digest, error) {
	return db.checksum(ctx, db.hashPool, t, s)
}

// querier is a pool or a connection.
type querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

func (db *DB) checksum(ctx context.Context, on querier, t *consistency.Table, s consistency.Span) (consistency.Digest, error) {
	sql, args := db.checksumSQL(t, s)
	var d consistency.Digest
	if err := on.QueryRow(ctx, sql, args...).Scan(&d.Rows, &d.Hash); err != nil {
		return d, err
	}
	return d, nil
}

// checksumSQL is the statement hashing the rows of s, and its arguments.
func (db *DB) checksumSQL(t *consistency.Table, s consistency.Span) (string, []any) {
	q := db.newQuery(t)
	where := q.where(s)
	return `SELECT count(*), coalesce(sum(hashint8extended(h, h)), 0)::text FROM (SELECT ` +
		q.rowHash() + ` AS h FROM ` + q.from() + ` WHERE ` + where + ` OFFSET 0) s`, q.args
}

// ChecksumTables hashes each table whole, as Checksum does, all in one
// statement (a UNION ALL of the tables' digests): one round trip for
// many small tables.
func (db *DB) ChecksumTables(ctx context.Context, ts []*consistency.Table) ([]consistency.Digest, error) {
	if len(ts) == 0 {
		return nil, nil
	}
	parts := make([]string, len(ts))
	for i, t := range ts {
		q := db.newQuery(t)
		parts[i] = `SELECT ` + strconv.Itoa(i) + `, count(*), coalesce(sum(hashint8extended(h, h)), 0)::text FROM (SELECT ` +
			q.rowHash() + ` AS h FROM ` + q.from() + ` OFFSET 0) s`
	}
	rows, err := db.hashPool.Query(ctx, strings.Join(parts, " UNION ALL "))
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := make([]consistency.Digest, len(ts))
	seen := 0
	for rows.Next() {
		var i int
		var d consistency.Digest
		if err := rows.Scan(&i, &d.Rows, &d.Hash); err != nil {
			return nil, err
		}
		if i < 0 || i >= len(ts) {
			return nil, fmt.Errorf("batch digest: unexpected table index %d", i)
		}
		out[i] = d
		seen++
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	if seen != len(ts) {
		return nil, fmt.Errorf("batch digest: %d digests for %d tables", seen, len(ts))
	}
	return out, nil
}

// Snapshot opens a REPEATABLE READ, READ ONLY transaction on a hashing
// connection: its snapshot is taken by its first statement, and every
// later statement sees the same rows. It holds a connection of the
// hashing pool until closed; keep it short (it holds back vacuum).
func (db *DB) Snapshot(ctx context.Context) (consistency.Snapshot, error) {
	conn, err := db.hashPool.Acquire(ctx)
	if err != nil {
		return nil, err
	}
	if _, err := conn.Exec(ctx, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"); err != nil {
		// The connection may be mid-statement: do not reuse it.
		conn.Conn().Close(context.WithoutCancel(ctx)) //nolint:errcheck // it is dropped either way
		conn.Release()
		return nil, err
	}
	return &snapshot{db: db, conn: conn}, nil
}

type snapshot struct {
	db   *DB
	conn *pgxpool.Conn
}

func (s *snapshot) Checksum(ctx context.Context, t *consistency.Table, span consistency.Span) (consistency.Digest, error) {
	return s.db.checksum(ctx, s.conn, t, span)
}

func (s *snapshot) Close() {
	if s.conn == nil {
		return
	}
	// A read-only transaction has nothing to undo; ROLLBACK frees the
	// snapshot. If it fails (a cancelled context broke the connection),
	// the connection is closed rather than returned to the pool inside a
	// transaction.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := s.conn.Exec(ctx, "ROLLBACK"); err != nil {
		s.conn.Conn().Close(ctx) //nolint:errcheck // it is dropped either way
	}
	s.conn.Release()
	s.conn = nil
}

// Minus subtracts digests: Checksum's hash is an exact sum (numeric, no
// wrap-around), so the digest of a set of rows minus a subset is the
// difference of counts and of sums.
func (db *DB) Minus(a, b consistency.Digest) (consistency.Digest, error) {
	x, ok := new(big.Int).SetString(a.Hash, 10)
	if !ok {
		return consistency.Digest{}, fmt.Errorf("digest %q is not an integer", a.Hash)
	}
	y, ok := new(big.Int).SetString(b.Hash, 10)
	if !ok {
		return consistency.Digest{}, fmt.Errorf("digest %q is not an integer", b.Hash)
	}
	return consistency.Digest{Rows: a.Rows - b.Rows, Hash: x.Sub(x, y).String()}, nil
}

// KeyAt returns the key at offset n of the range s in canonical key order.
func (db *DB) KeyAt(ctx context.Context, t *consistency.Table, s consistency.Span, n int64) ([]string, error) {
	if s.IsKeySet() {
		return nil, errors.New("key at: a key set has no offsets")
	}
	q := db.newQuery(t)
	where := q.where(s)
	// The key is printed outside the OFFSET: a projection below the Limit
	// would print all n skipped keys too (about 2/3 of the walk's time on
	// a bigint key).
	sql := `SELECT ` + q.keyText() + ` FROM (SELECT ` + q.keyCols() + ` FROM ` + q.from() + ` WHERE ` + where +
		` ORDER BY ` + q.orderBy() + ` OFFSET ` + strconv.FormatInt(n, 10) + ` LIMIT 1) t`
	var key []string
	err := db.pool.QueryRow(ctx, sql, q.args...).Scan(&key)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return key, nil
}

// Rows fetches up to limit rows of s in canonical key order, with the text
// form and the canonical hash of every column.
func (db *DB) Rows(ctx context.Context, t *consistency.Table, s consistency.Span, limit int) ([]consistency.Row, error) {
	q := db.newQuery(t)
	where := q.where(s)
	values := make([]string, len(t.Columns))
	hashes := make([]string, len(t.Columns))
	for i, c := range t.Columns {
		ref := q.col(c.Name)
		values[i] = ref + "::text"
		hashes[i] = "hash_record_extended(ROW(" + strings.Join(hashExprs(c, ref), ", ") + "), 0)::text"
	}
	sql := `SELECT ` + q.keyText() + `, ARRAY[` + strings.Join(values, ", ") + `]::text[], ARRAY[` +
		strings.Join(hashes, ", ") + `]::text[] FROM ` + q.from() + ` WHERE ` + where +
		` ORDER BY ` + q.orderBy() + ` LIMIT ` + strconv.Itoa(limit)
	rows, err := db.pool.Query(ctx, sql, q.args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []consistency.Row
	for rows.Next() {
		var r consistency.Row
		var hs []*string
		if err := rows.Scan(&r.Key, &r.Values, &hs); err != nil {
			return nil, err
		}
		r.Hashes = make([]string, len(hs))
		for i, h := range hs {
			if h != nil {
				r.Hashes[i] = *h
			}
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// query builds the SQL of one statement on one table.
type query struct {
	t           *consistency.Table
	partitioned bool
	args        []any
}

func (db *DB) newQuery(t *consistency.Table) *query {
	db.mu.Lock()
	defer db.mu.Unlock()
	return &query{t: t, partitioned: db.partitioned[t.Name]}
}

func (q *query) from() string {
	schema, name, _ := strings.Cut(q.t.Name, ".")
	only := "ONLY "
	if q.partitioned {
		only = ""
	}
	return only + pgx.Identifier{schema, name}.Sanitize() + " t"
}

func (q *query) col(name string) string { return "t." + pgx.Identifier{name}.Sanitize() }

func (q *query) arg(v any) string {
	q.args = append(q.args, v)
	return "$" + strconv.Itoa(len(q.args))
}

// keyRefs are the key columns as ordered: text-like keys in "C" order,
// so that both sides order them alike whatever their collations.
func (q *query) keyRefs() []string {
	out := make([]string, len(q.t.Key))
	for i, k := range q.t.Key {
		c := q.t.Columns[k]
		out[i] = q.col(c.Name)
		if collatable(c) {
			out[i] += ` COLLATE "C"`
		}
	}
	return out
}

// collatable reports whether c is a collatable type hashed by value (its
// template, from hashTemplate, ends in COLLATE "C" without a text cast).
func collatable(c consistency.Column) bool {
	return strings.HasSuffix(c.Hash, ` COLLATE "C"`) && !strings.HasPrefix(c.Hash, "(")
}

func (q *query) orderBy() string { return strings.Join(q.keyRefs(), ", ") }

// keyCols selects the key columns under their own names, for keyText
// to print from a subquery aliased t.
func (q *query) keyCols() string {
	parts := make([]string, len(q.t.Key))
	for i, k := range q.t.Key {
		parts[i] = q.col(q.t.Columns[k].Name)
	}
	return strings.Join(parts, ", ")
}

func (q *query) keyText() string {
	parts := make([]string, len(q.t.Key))
	for i, k := range q.t.Key {
		parts[i] = q.col(q.t.Columns[k].Name) + "::text"
	}
	return "ARRAY[" + strings.Join(parts, ", ") + "]::text[]"
}

// bound renders a key as parameters cast to the key types.
func (q *query) bound(key []string) string {
	parts := make([]string, len(q.t.Key))
	for i, k := range q.t.Key {
		parts[i] = q.arg(key[i]) + "::" + q.t.Columns[k].Type
	}
	return "(" + strings.Join(parts, ", ") + ")"
}

func (q *query) where(s consistency.Span) string {
	keys := "(" + strings.Join(q.keyRefs(), ", ") + ")"
	if s.IsKeySet() {
		if len(s.Keys) == 0 {
			return "false"
		}
		// Key equality needs no "C": key collations are deterministic
		// (Describe refuses others), so equal means byte-equal, and the
		// primary key index serves the lookup.
		if len(q.t.Key) == 1 {
			// = ANY(array) plans as an index scan over the keys; a join
			// with unnest may be planned as a hash join over the table.
			c := q.t.Columns[q.t.Key[0]]
			vals := make([]string, len(s.Keys))
			for j, key := range s.Keys {
				vals[j] = key[0]
			}
			return q.col(c.Name) + " = ANY(" + q.arg(vals) + "::text[]::" + c.Type + "[])"
		}
		plain := make([]string, len(q.t.Key))
		cols := make([]string, len(q.t.Key))
		for i, k := range q.t.Key {
			c := q.t.Columns[k]
			plain[i] = q.col(c.Name)
			vals := make([]string, len(s.Keys))
			for j, key := range s.Keys {
				vals[j] = key[i]
			}
			cols[i] = q.arg(vals) + "::text[]::" + c.Type + "[]"
		}
		return "(" + strings.Join(plain, ", ") + ") IN (SELECT * FROM unnest(" + strings.Join(cols, ", ") + "))"
	}
	var conds []string
	if s.Lo != nil {
		conds = append(conds, keys+" >= "+q.bound(s.Lo))
	}
	if s.Hi != nil {
		op := " < "
		if s.HiInclusive {
			op = " <= "
		}
		conds = append(conds, keys+op+q.bound(s.Hi))
	}
	if len(conds) == 0 {
		return "true"
	}
	return strings.Join(conds, " AND ")
}

// rowHash is the 64-bit hash of a row's canonical encoding. The outer
// hashint8extended(h, h) in Checksum mixes it: hash_record_extended
// combines column hashes linearly, and a plain sum of linear combinations
// would not see two rows swapping a column's values.
func (q *query) rowHash() string {
	var exprs []string
	for _, c := range q.t.Columns {
		exprs = append(exprs, hashExprs(c, q.col(c.Name))...)
	}
	return "hash_record_extended(ROW(" + strings.Join(exprs, ", ") + "), 0)"
}
