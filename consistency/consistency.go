// Package consistency proves that green holds exactly blue's rows.
//
// The core here is engine-neutral: it chunks each table by primary key
// (boundaries computed once, on blue, and applied to both sides), asks each
// side for a digest of every chunk (computed inside the database, both sides
// at once), bisects chunks that differ down to a few rows, fetches those rows
// and classifies each difference (missing on green, extra on green, changed,
// key changed). Engines implement Database in a subpackage named after the
// engine (consistency/postgres).
//
// A table without a usable key is compared as a multiset of row hashes
// instead (engines implementing MultisetHasher): buckets of rows by a
// prefix of their row hash, differing buckets bisected by longer prefixes,
// differing rows named by their values with their copies on each side. An
// engine that cannot do so refuses the table with ErrNoPrimaryKey; every
// refusal matches ErrUnverifiable.
//
// # Passes
//
// A Verifier runs three kinds of pass:
//
//   - Full: every chunk of every table, compared once. Both sides must be
//     quiet (standalone `cutover verify`, or inside the fence): the result is
//     exact.
//   - Online: the same walk while replication runs. A chunk that differs is
//     re-checked after green has applied past the position at which blue was
//     read (see PositionWaiter); only a difference that persists is
//     reported. Chunks found clean are recorded in a DirtySet, so that
//     changes seen before the check need not be re-checked later. A chunk
//     still being written is settled except for the keys changed while it
//     was read (engines implementing Snapshotter): only those keys are left
//     to the fence, not the chunk.
//   - Dirty: inside the fence, only what the change stream touched since the
//     online pass (exact keys, narrow ranges once the set grew too large, and
//     chunks the online pass could not settle). Its cost is proportional to
//     what changed, not to the size of the database; except for a key-less
//     table changed since, which is re-hashed whole (its rows have no key
//     to mark). A table with nothing to re-check costs no query and no log
//     line, only its entry in the report: the pass does not grow with the
//     number of tables in scope.
//
// # Many small tables
//
// Walking a table costs round trips whatever its size (a chunk boundary
// and a digest per side), which dominate a schema of thousands of small
// tables. Tables with a key and at most Options.BatchBytes on disk are
// therefore hashed whole, up to a hundred in one statement per side
// (engines implementing BatchHasher), a few batches ahead of the table
// being compared. A table whose whole digest differs is then handled as a
// chunk that differs (re-checked online, bisected to rows); the report
// has the same entry per table either way. Engines describe all tables in
// a fixed number of catalog queries.
//
// The plan driver wires them: create a DirtySet, hand its MarkChanged to
// the replication engine as the OnRowChange hook before the stream starts,
// run Online while replicating, fence, prove catch-up, then run Dirty.
//
// The canonical row encoding of each engine is described in ENCODING.md.
package consistency

import (
	"context"
	"errors"
	"fmt"
	"strings"
)

// Sentinel errors. Engines wrap them with the table name.
var (
	// ErrUnverifiable: the tables asked for cannot be compared at all, and
	// asking again will not change that (a server too old, sides that hash
	// differently, a table that can be neither chunked by a key nor hashed
	// whole). Every such refusal matches it with errors.Is, so that a
	// caller can stop instead of retrying; ErrNoPrimaryKey, ErrUnsupported
	// and ErrIncompatible all match it.
	ErrUnverifiable = errors.New("cannot be verified")
	// ErrNoPrimaryKey: the table has no usable key, and the engine cannot
	// compare it whole (it does not implement MultisetHasher). Add a
	// primary key or leave the table out of scope.
	ErrNoPrimaryKey error = &unverifiable{"table has no primary key"}
	// ErrUnsupported: a server or a column the engine cannot hash
	// reliably (too old a version).
	ErrUnsupported error = &unverifiable{"unsupported"}
	// ErrIncompatible: the two sides would hash equal rows differently (a
	// different server encoding, a different hash function build), so no
	// comparison of digests would mean anything.
	ErrIncompatible error = &unverifiable{"sides hash differently"}
)

// unverifiable is a sentinel that also matches ErrUnverifiable.
type unverifiable struct{ msg string }

func (e *unverifiable) Error() string        { return e.msg }
func (e *unverifiable) Is(target error) bool { return target == ErrUnverifiable }

// KeyKind says how values of a key column order, so that the DirtySet can
// compare keys in Go exactly as the engine orders them.
type KeyKind int

// Key kinds.
const (
	// KindOther: no ordering known in Go. Dirty keys of such tables stay
	// exact until the set overflows, then the whole table is re-checked.
	KindOther KeyKind = iota
	// KindInt: decimal integers.
	KindInt
	// KindNumeric: decimal numbers; "NaN" sorts after every number.
	KindNumeric
	// KindText: byte order (UTF-8 code point order), as COLLATE "C".
	KindText
)

// Column is one column of a table.
type Column struct {
	Name string `json:"name"`
	// Type is the engine's name of the column type, compared across sides.
	Type string `json:"type"`
	// Kind orders key values in Go; meaningful for key columns.
	Kind KeyKind `json:"-"`
	// Hash is the engine's canonical encoding class of the column (opaque
	// to the core); the sides must agree on it.
	Hash string `json:"-"`
}

// Table describes one table, as both sides must have it.
type Table struct {
	// Name is schema.table, unquoted, as the OnRowChange hook names it.
	Name    string
	Columns []Column
	// Key lists the indexes into Columns of the primary key, in key order.
	Key []int
	// EstimatedRows is the engine's estimate (planner statistics), for
	// progress and ETA only.
	EstimatedRows int64
	// Bytes is the table's size on disk (rows and out-of-line values),
	// and MaxRows the most rows that size can hold, both read from the
	// files when it was described (not from statistics, which a table
	// never analyzed lacks); MaxRows is -1 when the engine does not say.
	// A table that surely fits in one chunk (MaxRows at most
	// Options.InitialChunkRows) and holds at most Options.BatchBytes is
	// hashed whole together with other small tables (see BatchHasher).
	Bytes   int64
	MaxRows int64
	// Warnings are things an operator should know (a key ordering that
	// cannot use the primary key index, say).
	Warnings []string
}

// KeyColumns returns the key columns in key order.
func (t *Table) KeyColumns() []Column {
	out := make([]Column, len(t.Key))
	for i, k := range t.Key {
		out[i] = t.Columns[k]
	}
	return out
}

// KeyKinds returns the kinds of the key columns in key order.
func (t *Table) KeyKinds() []KeyKind {
	out := make([]KeyKind, len(t.Key))
	for i, k := range t.Key {
		out[i] = t.Columns[k].Kind
	}
	return out
}

// Span is a set of rows of one table: either a key range in the engine's
// canonical key order, or an explicit set of keys.
//
// Keys are given in the engine's text form of each key column, in key
// order.
type Span struct {
	// Lo is the inclusive lower bound; nil means from the first row.
	Lo []string
	// Hi is the upper bound; nil means to the last row.
	Hi []string
	// HiInclusive makes Hi inclusive (dirty ranges are closed intervals).
	HiInclusive bool
	// Keys, when not nil, makes the span exactly these keys; Lo and Hi are
	// then ignored.
	Keys [][]string
}

// IsKeySet reports whether s is an explicit set of keys.
func (s Span) IsKeySet() bool { return s.Keys != nil }

// String renders s for logs and reports.
func (s Span) String() string {
	if s.IsKeySet() {
		if len(s.Keys) == 1 {
			return "key " + keyString(s.Keys[0])
		}
		return fmt.Sprintf("%d keys", len(s.Keys))
	}
	lo, hi := "-inf", "+inf"
	if s.Lo != nil {
		lo = keyString(s.Lo)
	}
	if s.Hi != nil {
		hi = keyString(s.Hi)
	}
	closer := ")"
	if s.HiInclusive && s.Hi != nil {
		closer = "]"
	}
	return "[" + lo + ", " + hi + closer
}

func keyString(k []string) string {
	if len(k) == 1 {
		return k[0]
	}
	return "(" + strings.Join(k, ", ") + ")"
}

// Digest summarises the rows of a span: how many, and an order-independent
// hash of their canonical encodings. Two spans hold the same rows when both
// fields are equal (up to a 2^-64 chance per differing row).
type Digest struct {
	Rows int64
	Hash string
}

// Row is one row fetched for the report.
type Row struct {
	// Key is the key in text form, key order; nil for a table without a
	// key.
	Key []string
	// Hash is the row's hash in the engine's text form, and Count its
	// number of copies: set by MultisetHasher.BucketRows only.
	Hash  string
	Count int64
	// Values are the columns in text form, in Table.Columns order; nil is
	// NULL.
	Values []*string
	// Hashes are per-column hashes of the canonical encoding, in
	// Table.Columns order: two values are the same exactly when their
	// hashes are.
	Hashes []string
}

// Database is one side of a comparison. Implementations must be safe for
// concurrent use: the verifier calls them from several goroutines at once
// (Options.Parallel chunks, plus the chunk boundary walk). Every method
// blocks on the server; cancelling ctx abandons the call and returns
// ctx's error.
type Database interface {
	// Describe returns the tables named (schema.table, or table for the
	// default schema), or every user table when names is empty. A table
	// without a usable key has an empty Key (see MultisetHasher).
	Describe(ctx context.Context, names []string) ([]*Table, error)
	// Fingerprint returns a value that two sides share exactly when they
	// hash equal rows alike (engine, encoding, hash function build).
	Fingerprint(ctx context.Context) (string, error)
	// Position returns the server's current change-stream position (for
	// PostgreSQL, the WAL LSN), recorded in reports.
	Position(ctx context.Context) (string, error)
	// Checksum returns the digest of the rows of s. The verifier may pass a
	// Table described by the other side: its columns (names, types, hash
	// classes) have been checked to match.
	Checksum(ctx context.Context, t *Table, s Span) (Digest, error)
	// KeyAt returns the key of the row at offset n (0 is the first) of the
	// range s in key order, or nil when s has n rows or fewer. s is never a
	// key set.
	KeyAt(ctx context.Context, t *Table, s Span, n int64) ([]string, error)
	// Rows returns up to limit rows of s in key order.
	Rows(ctx context.Context, t *Table, s Span, limit int) ([]Row, error)
}

// MultisetHasher is optional for a Database: an engine that implements it
// lets the verifier compare a table without a usable key (Table.Key
// empty), whose rows can be neither chunked by key ranges nor matched by
// key. Such a table is a multiset of rows; it is compared as a multiset of
// row hashes.
//
// Rows are grouped into buckets by a prefix of their row hash (the top
// bits bits of the 64-bit row hash; bits 0 is the whole table). A bucket's
// digest is that of Checksum (count and an order-independent sum of the
// mixed row hashes), so equal multisets of rows give equal digests
// whatever their physical order, and duplicates count: a row held three
// times on blue and twice on green changes the count and the sum. The
// verifier reads all buckets of a table in one pass per side, bisects
// differing buckets by longer prefixes (one pass per level, all buckets of
// the level at once), then fetches the distinct rows of the small buckets
// left with their number of copies on each side.
type MultisetHasher interface {
	// Buckets returns the digest of every non-empty bucket of bits bits
	// (keyed by prefix) among the rows whose prefix of from bits is one
	// of under; from 0 and no under means every row. bits >= from: equal
	// re-reads the buckets under themselves.
	Buckets(ctx context.Context, t *Table, under []uint64, from, bits int) (map[uint64]Digest, error)
	// BucketRows returns the distinct rows whose prefix of bits bits is
	// one of in, each with Hash (a text that sorts in byte order as the
	// rows are returned, the same on both sides) and Count set, in Hash
	// order, at most limit of them.
	BucketRows(ctx context.Context, t *Table, in []uint64, bits int, limit int) ([]Row, error)
}

// BatchHasher is optional for a Database: an engine that implements it
// lets the verifier hash many small tables whole in one round trip
// instead of walking each one (a boundary query and a digest query per
// table, per side), so that a schema of thousands of small tables costs
// a few round trips per hundred tables. A table whose digest differs is
// then compared as usual (re-checked online, bisected to rows).
type BatchHasher interface {
	// ChecksumTables returns the digest of all the rows of each table,
	// in the order given: Checksum of each with an unbounded Span, in
	// one statement.
	ChecksumTables(ctx context.Context, ts []*Table) ([]Digest, error)
}

// Snapshotter is optional for a Database: an engine that implements it
// lets an online pass settle a chunk that is still being written (see
// Options.MaxExceptKeys). The verifier reads the chunk once on each side,
// each side at one snapshot, and subtracts the rows of the keys the change
// stream marked meanwhile, read in the same snapshots; what remains must
// be equal, and only the marked keys are left to the pass inside the
// fence.
type Snapshotter interface {
	// Snapshot opens a read-only session whose reads all see the database
	// as of its first read (not as of Snapshot). The caller closes it.
	Snapshot(ctx context.Context) (Snapshot, error)
	// Minus returns the digest of the rows of a that are not in b, where
	// b is the digest of a subset of a's rows: for every set of rows A
	// and subset B, Minus(digest(A), digest(B)) == digest(A \ B).
	Minus(a, b Digest) (Digest, error)
}

// Snapshot is a read-only session at one snapshot of the database.
// It is used by one goroutine at a time.
type Snapshot interface {
	// Checksum is Database.Checksum at the session's snapshot.
	Checksum(ctx context.Context, t *Table, s Span) (Digest, error)
	// Close ends the session; it is safe to call more than once.
	Close()
}

// PositionWaiter lets an online pass compare a chunk consistently while
// blue is still being written and replicated. The replication engine
// implements it; a nil PositionWaiter means both sides are quiet and every
// comparison is exact.
//
// When a chunk differs during an online pass, the verifier re-checks it so:
// hash the chunk on blue; call BluePosition (so the position is at or past
// every commit that hash saw); call WaitGreenApplied with it; hash the
// chunk on green. If the digests still differ and no change to the chunk's
// keys was recorded in the DirtySet since before the blue hash, the
// difference is real. If changes were recorded, the chunk is still moving.
// When both sides implement Snapshotter, the two hashes are read at one
// snapshot each, and the rows of the keys recorded since before the blue
// hash (taken after the green hash) are subtracted on both sides: if the
// rest is equal, the chunk is settled except for those keys, which stay in
// the DirtySet for the pass inside the fence. Otherwise it is re-checked a
// few times and then left dirty whole.
//
// The contract on the engine: MarkChanged for a change applied on green
// happens before WaitGreenApplied can return for a position at or past
// it. Leaving keys out never depends on it (a key left out stays in the
// DirtySet; a change green's read saw but that was marked too late only
// makes the rest differ, and the chunk is re-checked); but telling a real
// difference from a moving chunk does: a change marked after the verifier
// looked for changes would be reported as a difference. The verifier
// looks again after fetching the rows of a difference from both sides,
// several round trips after WaitGreenApplied returned, which covers a hook
// that runs right after the applied position is published.
// replication/postgres publishes the applied position in afterCommit
// before it calls OnRowChange for the batch; calling the hooks first
// would meet the contract exactly.
//
// Both methods may block and are called from several goroutines at once;
// they must honour ctx.
type PositionWaiter interface {
	// BluePosition returns blue's current position in the change stream.
	BluePosition(ctx context.Context) (string, error)
	// WaitGreenApplied returns once green has applied (and made visible)
	// every change up to pos, or with an error (ctx's, or the stream's).
	WaitGreenApplied(ctx context.Context, pos string) error
}
