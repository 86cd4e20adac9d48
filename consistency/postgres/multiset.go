package postgres

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/cutover/cutover/consistency"
)

var _ consistency.MultisetHasher = (*DB)(nil)

// Buckets hashes a table without a usable key in one pass: every row's
// canonical row hash h (the same as keyed tables', see rowHash), its
// bucket the top nbits bits of h, and per bucket count(*) and the exact
// sum of hashint8extended(h, h), as Checksum. The bucket comes from h and
// the sum from its mix, so that the rows of one bucket still differ in all
// 64 bits of what is summed.
//
// It runs on the pool without hashSettings: a key-less table is read
// whole, by a sequential scan, never through some other index.
func (db *DB) Buckets(ctx context.Context, t *consistency.Table, under []uint64, from, nbits int) (map[uint64]consistency.Digest, error) {
	if nbits < from || nbits > 64 || from < 0 {
		return nil, fmt.Errorf("buckets: %d bits under prefixes of %d", nbits, from)
	}
	q := db.newQuery(t)
	sql := `SELECT ` + prefixExpr("h", nbits) + `, count(*), sum(hashint8extended(h, h))::text FROM (SELECT ` +
		q.rowHash() + ` AS h FROM ` + q.from() + ` OFFSET 0) s` + q.prefixWhere("h", under, from) + ` GROUP BY 1`
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
	return " WHERE " + prefixExpr(h, from) + " = ANY(" + q.arg(ps) + "::int8[])"
}
