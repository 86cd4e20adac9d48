package postgres

import (
	"context"
	"fmt"
	"math/big"
	"slices"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"golang.org/x/sync/errgroup"

	"github.com/cutover/cutover/consistency"
)

var _ consistency.MultisetHasher = (*DB)(nil)

// Buckets hashes a table without a usable key in one pass: every row's
// canonical row hash h (the same as keyed tables', see rowHash), its
// bucket the top nbits bits of h, and per bucket count(*) and the exact
// sum of hashint8extended(h, h), as Checksum. The bucket comes from h and
// the sum from its mix, so that the rows of one bucket still differ in all
// 64 summed bits.
//
// A large plain table is read by several statements at once, each over a
// range of its blocks (a TID range scan), their digests added: as many as
// the verifier compares chunks at once. Quiet sides read exactly; on a
// table being written a row moved between ranges meanwhile can count
// twice or not at all, which is a change the stream marks, so an online
// re-check never takes it for a difference (see PositionWaiter).
//
// It runs on the pool without hashSettings: a key-less table is read
// whole, by sequential or TID range scans, never through some other index.
func (db *DB) Buckets(ctx context.Context, t *consistency.Table, under []uint64, from, nbits int) (map[uint64]consistency.Digest, error) {
	if nbits < from || nbits > 64 || from < 0 {
		return nil, fmt.Errorf("buckets: %d bits under prefixes of %d", nbits, from)
	}
	ranges, err := db.blockRanges(ctx, t)
	if err != nil {
		return nil, err
	}
	parts := make([]map[uint64]consistency.Digest, len(ranges))
	g, gctx := errgroup.WithContext(ctx)
	for i, r := range ranges {
		g.Go(func() (err error) {
			parts[i], err = db.bucketsIn(gctx, t, r, under, from, nbits)
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	if len(parts) == 1 {
		return parts[0], nil
	}
	sums := make(map[uint64]*big.Int)
	out := make(map[uint64]consistency.Digest)
	for _, part := range parts {
		for p, d := range part {
			x, ok := new(big.Int).SetString(d.Hash, 10)
			if !ok {
				return nil, fmt.Errorf("buckets: digest %q is not an integer", d.Hash)
			}
			if s := sums[p]; s != nil {
				x.Add(x, s)
			}
			sums[p] = x
			o := out[p]
			o.Rows += d.Rows
			out[p] = o
		}
	}
	for p, s := range sums {
		o := out[p]
		o.Hash = s.String()
		out[p] = o
	}
	return out, nil
}

// blockRange is a range of a table's blocks, [lo, hi); -1 is open.
type blockRange struct{ lo, hi int64 }

// minSplitBlocks: below 8 MB (in 8 kB blocks), one statement reads the
// table faster than several start. A variable for tests.
var minSplitBlocks int64 = 1024

// blockRanges cuts a plain table into db.scans ranges of blocks; a small
// or partitioned table (whose partitions number their blocks each) is one
// range. The first range is open below and the last open above, so rows
// written to new blocks meanwhile are still read.
func (db *DB) blockRanges(ctx context.Context, t *consistency.Table) ([]blockRange, error) {
	whole := []blockRange{{-1, -1}}
	q := db.newQuery(t)
	if db.scans <= 1 || q.partitioned {
		return whole, nil
	}
	schema, name, _ := strings.Cut(t.Name, ".")
	var blocks int64
	if err := db.pool.QueryRow(ctx, `SELECT pg_relation_size($1::regclass) / current_setting('block_size')::int8`,
		pgx.Identifier{schema, name}.Sanitize()).Scan(&blocks); err != nil {
		return nil, fmt.Errorf("table size: %w", err)
	}
	if blocks < minSplitBlocks {
		return whole, nil
	}
	n := int64(db.scans)
	out := make([]blockRange, n)
	for i := range n {
		out[i] = blockRange{lo: i * blocks / n, hi: (i + 1) * blocks / n}
	}
	out[0].lo, out[n-1].hi = -1, -1
	return out, nil
}

// where is the condition on ctid keeping the rows of r.
func (r blockRange) where() string {
	var conds []string
	if r.lo >= 0 {
		conds = append(conds, "t.ctid >= '("+strconv.FormatInt(r.lo, 10)+",0)'::tid")
	}
	if r.hi >= 0 {
		conds = append(conds, "t.ctid < '("+strconv.FormatInt(r.hi, 10)+",0)'::tid")
	}
	if len(conds) == 0 {
		return ""
	}
	return " WHERE " + strings.Join(conds, " AND ")
}

func (db *DB) bucketsIn(ctx context.Context, t *consistency.Table, r blockRange, under []uint64, from, nbits int) (map[uint64]consistency.Digest, error) {
	q := db.newQuery(t)
	sql := `SELECT ` + prefixExpr("h", nbits) + `, count(*), sum(hashint8extended(h, h))::text FROM (SELECT ` +
		q.rowHash() + ` AS h FROM ` + q.from() + r.where() + ` OFFSET 0) s` + q.prefixWhere("h", under, from) + ` GROUP BY 1`
	rows, err := db.pool.Query(ctx, sql, q.args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := make(map[uint64]consistency.Digest)
	for rows.Next() {
		var p int64
		var d consistency.Digest
		if err := rows.Scan(&p, &d.Rows, &d.Hash); err != nil {
			return nil, err
		}
		out[uint64(p)] = d
	}
	return out, rows.Err()
}

// BucketRows returns the distinct rows of the buckets in, each with its
// number of copies, ordered by row hash (unsigned, as its hex text sorts).
// The row hash is computed once per row, below the filter; text forms and
// column hashes only for the rows of the buckets.
func (db *DB) BucketRows(ctx context.Context, t *consistency.Table, in []uint64, nbits int, limit int) ([]consistency.Row, error) {
	if len(in) == 0 {
		return nil, nil
	}
	q := db.newQuery(t)
	h := pgx.Identifier{hashColumn(t)}.Sanitize()
	values := make([]string, len(t.Columns))
	hashes := make([]string, len(t.Columns))
	for i, c := range t.Columns {
		ref := q.col(c.Name)
		values[i] = ref + "::text"
		hashes[i] = "hash_record_extended(ROW(" + strings.Join(hashExprs(c, ref), ", ") + "), 0)::text"
	}
	// The sign bit flipped, int8 order is the unsigned order of the hex
	// text.
	const unsigned = ` # '-9223372036854775808'::int8`
	sql := `SELECT DISTINCT ON (` + h + unsigned + `) lpad(to_hex(` + h + `), 16, '0'), count(*) OVER (PARTITION BY ` + h + `), ARRAY[` +
		strings.Join(values, ", ") + `]::text[], ARRAY[` + strings.Join(hashes, ", ") + `]::text[] FROM (SELECT t.*, ` + q.rowHash() + ` AS ` + h +
		` FROM ` + q.from() + ` OFFSET 0) t` + q.prefixWhere(h, in, nbits) +
		` ORDER BY ` + h + unsigned + ` LIMIT ` + strconv.Itoa(limit)
	rows, err := db.pool.Query(ctx, sql, q.args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []consistency.Row
	for rows.Next() {
		var r consistency.Row
		var hs []*string
		if err := rows.Scan(&r.Hash, &r.Count, &r.Values, &hs); err != nil {
			return nil, err
		}
		r.Hashes = make([]string, len(hs))
		for i, x := range hs {
			if x != nil {
				r.Hashes[i] = *x
			}
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// hashColumn names the row hash next to a table's own columns: a name no
// column of t has.
func hashColumn(t *consistency.Table) string {
	name := "cutover row hash"
	for slices.ContainsFunc(t.Columns, func(c consistency.Column) bool { return c.Name == name }) {
		name += "_"
	}
	return name
}

// prefixExpr is the top nbits bits of the 64-bit hash h, as a
// non-negative int8 (all 64 bits, signed, for 64).
func prefixExpr(h string, nbits int) string {
	switch {
	case nbits <= 0:
		return "0::int8"
	case nbits >= 64:
		return h
	}
	mask := int64(1)<<nbits - 1
	return "((" + h + " >> " + strconv.Itoa(64-nbits) + ") & " + strconv.FormatInt(mask, 10) + "::int8)"
}

// prefixWhere keeps the rows whose prefix of from bits is one of under;
// every row when under is empty.
func (q *query) prefixWhere(h string, under []uint64, from int) string {
	if len(under) == 0 || from == 0 {
		return ""
	}
	ps := make([]int64, len(under))
	for i, p := range under {
		ps[i] = int64(p)
	}
	// IN a subquery: a hash (semi-join) lookup per row, where = ANY of
	// a parameter would search the array.
	return " WHERE " + prefixExpr(h, from) + " IN (SELECT unnest(" + q.arg(ps) + "::int8[]))"
}
