package postgres

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/cutover/cutover/consistency"
	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/internal/pgscope"
)

// Built-in type OIDs (fixed across PostgreSQL versions).
const (
	oidBool        = 16
	oidBytea       = 17
	oidChar        = 18
	oidName        = 19
	oidInt8        = 20
	oidInt2        = 21
	oidInt4        = 23
	oidText        = 25
	oidOID         = 26
	oidFloat4      = 700
	oidFloat8      = 701
	oidBpchar      = 1042
	oidVarchar     = 1043
	oidDate        = 1082
	oidTime        = 1083
	oidTimestamp   = 1114
	oidTimestamptz = 1184
	oidTimetz      = 1266
	oidNumeric     = 1700
	oidUUID        = 2950
)

// valueHashed are the types hashed by their own hash function: for these,
// two values hash alike exactly when they are the same value, whatever the
// server settings (see ENCODING.md for floats' -0 and NaN). Every other
// type is hashed through its text form, printed under sessionSettings.
var valueHashed = map[uint32]bool{
	oidBool: true, oidBytea: true, oidChar: true, oidName: true, oidInt8: true, oidInt2: true,
	oidInt4: true, oidText: true, oidOID: true, oidFloat4: true, oidFloat8: true, oidBpchar: true,
	oidVarchar: true, oidDate: true, oidTime: true, oidTimestamp: true, oidTimestamptz: true,
	oidTimetz: true, oidUUID: true,
}

// hashTemplate returns the canonical encoding of a column as SQL, with
// %s standing for the column reference. It is a comma-separated list of
// expressions (numeric needs two) placed inside ROW(...).
func hashTemplate(base uint32, baseName string, domain, collatable bool) string {
	ref := "%s"
	if domain {
		// Hash the base type: a domain adds constraints, not values.
		ref = "%s::" + baseName
	}
	switch {
	case base == oidInt8:
		// hashint8extended hashes lo ^ hi (32 bits): 5 and 4294967300
		// hash alike. The high half, hashed as its own field, tells
		// them apart.
		return ref + ", " + ref + " >> 32"
	case base == oidTimestamp || base == oidTimestamptz:
		// Their hash is hashint8extended of the int64 microseconds, folded
		// the same way: 2024-01-01 00:00:00 and 2023-12-31
		// 22:48:25.032705 hash alike. date_part('epoch') is a float8
		// (hashed over all 8 bytes), computed from the microseconds
		// alone: no TimeZone, no text. It is exact to the microsecond
		// for years 1698 to 2242; beyond, two values can share it only
		// within a few milliseconds, while two that fold alike are at
		// least 2^31 us apart, so the pair is exact over the whole range
		// (and +-infinity). Cheaper than any exact integer or numeric
		// form at hand.
		return ref + ", date_part('epoch', " + ref + ")"
	case base == oidTime:
		// Also hashed as folded int64 microseconds. Under 2^37 of them
		// (a day), microseconds / 10^6 is exact as a float8: that field
		// alone is the value, so it replaces the type's hash.
		return "date_part('epoch', " + ref + ")"
	case base == oidTimetz:
		// Its hash XORs the folded hash of the local time's microseconds
		// with a full 64-bit hash of the zone offset. The local time
		// (::time drops the zone, no TimeZone involved), exact as for
		// time above, closes the fold; the type's hash still covers the
		// zone (12:00+02 and 11:00+01 are different values).
		return ref + ", date_part('epoch', " + ref + "::time)"
	case base == oidNumeric:
		// hash_numeric ignores display scale (1.10 = 1.1); the scale is
		// part of the value a replica copies, so hash it too.
		return ref + ", scale(" + ref + ")"
	case valueHashed[base]:
		if collatable {
			// Hash the bytes, never a non-deterministic collation's
			// sort key.
			return ref + ` COLLATE "C"`
		}
		return ref
	}
	return "(" + ref + `::text) COLLATE "C"`
}

// hashExprs instantiates c's canonical encoding for the column reference.
func hashExprs(c consistency.Column, ref string) []string {
	return []string{strings.ReplaceAll(c.Hash, "%s", ref)}
}

func keyKind(base uint32) consistency.KeyKind {
	switch base {
	case oidInt2, oidInt4, oidInt8:
		return consistency.KindInt
	case oidNumeric:
		return consistency.KindNumeric
	case oidText, oidVarchar, oidName, oidUUID:
		// Ordered in "C" (byte) order on both sides; uuid prints as
		// lowercase hex, whose text order is its byte order.
		return consistency.KindText
	}
	return consistency.KindOther
}

// Describe lists user tables: every table outside the system schemas and
// the agent's own schema "cutover" when names is empty (partitions are
// covered through their partitioned table), or the tables named
// (schema.table, or a table visible in the search path). Names not found
// are left out: the verifier reports a table missing on one side.
//
// It costs a fixed number of catalog queries whatever the number of
// tables (one for the tables, one for all their columns, one for all
// their keys): a schema of thousands of tables is described in about the
// time of one.
func (db *DB) Describe(ctx context.Context, names []string) ([]*consistency.Table, error) {
	type rel struct {
		oid         uint32
		schema      string
		name        string
		kind        string
		reltuples   int64
		bytes       int64
		maxRows     int64
		partitioned bool
	}
	// The size (pg_table_size: heap and TOAST) and the most rows the heap
	// can hold (its pages times MaxHeapTuplesPerPage: a page header of 24
	// bytes, and at least 28 bytes per row with its line pointer) are read
	// from the files, not from statistics that a table never analyzed
	// lacks: they decide whether a table is hashed whole in a batch.
	const cols = `SELECT c.oid, n.nspname, c.relname, c.relkind::text,
		CASE WHEN c.relkind = 'p' THEN coalesce((SELECT sum(greatest(p.reltuples, 0)) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhrelid WHERE i.inhparent = c.oid), 0)
		ELSE greatest(c.reltuples, 0) END::int8,
		CASE WHEN c.relkind = 'p' THEN coalesce((SELECT sum(pg_table_size(pt.relid)) FROM pg_partition_tree(c.oid) pt), 0)
		ELSE pg_table_size(c.oid) END::int8,
		CASE WHEN c.relkind = 'p' THEN -1
		ELSE pg_relation_size(c.oid) / current_setting('block_size')::int8 * ((current_setting('block_size')::int8 - 24) / 28) END
		FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace `
	var rels []rel
	scan := func(rows pgx.Rows) error {
		defer rows.Close()
		for rows.Next() {
			var r rel
			if err := rows.Scan(&r.oid, &r.schema, &r.name, &r.kind, &r.reltuples, &r.bytes, &r.maxRows); err != nil {
				return err
			}
			r.partitioned = r.kind == "p"
			rels = append(rels, r)
		}
		return rows.Err()
	}
	if len(names) == 0 {
		// Every table, by the scope rule replication and the fence use
		// (internal/pgscope): its roots, partitions under their parent.
		var oids []uint32
		set, err := pgscope.Resolve(ctx, db.pool, config.Scope{})
		if err != nil && !errors.Is(err, pgscope.ErrScope) { // ErrScope: no table at all
			return nil, err
		}
		if set != nil {
			for _, t := range set.Roots() {
				oids = append(oids, t.OID)
			}
		}
		rows, err := db.pool.Query(ctx, cols+`WHERE c.oid = ANY($1::oid[]) ORDER BY n.nspname, c.relname`, oids)
		if err != nil {
			return nil, fmt.Errorf("list tables: %w", err)
		}
		if err := scan(rows); err != nil {
			return nil, fmt.Errorf("list tables: %w", err)
		}
	} else {
		// All names in one query, in the order given.
		schemas := make([]string, len(names))
		tables := make([]string, len(names))
		for i, name := range names {
			schema, table, qualified := strings.Cut(name, ".")
			if !qualified {
				schema, table = "", name
			}
			schemas[i], tables[i] = schema, table
		}
		// name[]: relname = name joins by hash or by the catalog's
		// index, where name = text would compare every pair.
		rows, err := db.pool.Query(ctx, cols+`JOIN unnest($1::name[], $2::name[]) WITH ORDINALITY AS q(schema, name, ord)
			ON c.relname = q.name AND CASE WHEN q.schema = '' THEN pg_table_is_visible(c.oid) ELSE n.nspname = q.schema END
			WHERE c.relkind IN ('r', 'p') ORDER BY q.ord`, schemas, tables)
		if err != nil {
			return nil, fmt.Errorf("find tables %s: %w", strings.Join(names, ", "), err)
		}
		if err := scan(rows); err != nil {
			return nil, fmt.Errorf("find tables %s: %w", strings.Join(names, ", "), err)
		}
	}
	var datcollate string
	if err := db.pool.QueryRow(ctx, `SELECT datcollate FROM pg_database WHERE datname = current_database()`).Scan(&datcollate); err != nil {
		return nil, fmt.Errorf("database collation: %w", err)
	}
	oids := make([]uint32, len(rels))
	for i, r := range rels {
		oids[i] = r.oid
	}
	described, err := db.describeAll(ctx, oids, datcollate)
	if err != nil {
		return nil, err
	}
	var out []*consistency.Table
	seen := make(map[string]bool)
	for _, r := range rels {
		t := described[r.oid]
		if t == nil {
			// Dropped between the two queries.
			return nil, fmt.Errorf("describe %s.%s: table dropped while being described", r.schema, r.name)
		}
		t.Name = r.schema + "." + r.name
		if seen[t.Name] {
			continue
		}
		seen[t.Name] = true
		t.EstimatedRows = r.reltuples
		t.Bytes, t.MaxRows = r.bytes, r.maxRows
		out = append(out, t)
		db.mu.Lock()
		db.partitioned[t.Name] = r.partitioned
		db.mu.Unlock()
	}
	return out, nil
}

// describeAll reads the columns and primary keys of the tables oids, in
// two queries for all of them.
func (db *DB) describeAll(ctx context.Context, oids []uint32, datcollate string) (map[uint32]*consistency.Table, error) {
	tables := make(map[uint32]*consistency.Table, len(oids))
	infos := make(map[uint32][]colInfo, len(oids))
	rows, err := db.pool.Query(ctx, `
		WITH RECURSIVE base(attrelid, attnum, oid, depth) AS (
			SELECT a.attrelid, a.attnum, a.atttypid, 0 FROM pg_attribute a
			WHERE a.attrelid = ANY($1::oid[]) AND a.attnum > 0 AND NOT a.attisdropped
			UNION ALL
			SELECT b.attrelid, b.attnum, t.typbasetype, b.depth + 1 FROM base b JOIN pg_type t ON t.oid = b.oid
			WHERE t.typtype = 'd'
		),
		-- The type under every domain, per column: a join, not a lookup
		-- per column into the CTE (which has no index: quadratic over
		-- thousands of tables).
		deepest AS (
			SELECT DISTINCT ON (attrelid, attnum) attrelid, attnum, oid FROM base ORDER BY attrelid, attnum, depth DESC
		)
		SELECT a.attrelid, a.attname, format_type(a.atttypid, a.atttypmod), bt.oid, format_type(bt.oid, NULL),
			ty.typtype = 'd', a.attcollation <> 0, coalesce(co.collname, ''), coalesce(co.collisdeterministic, true)
		FROM pg_attribute a
		JOIN pg_type ty ON ty.oid = a.atttypid
		JOIN deepest bt ON bt.attrelid = a.attrelid AND bt.attnum = a.attnum
		LEFT JOIN pg_collation co ON co.oid = a.attcollation
		WHERE a.attrelid = ANY($1::oid[]) AND a.attnum > 0 AND NOT a.attisdropped
		ORDER BY a.attrelid, a.attnum`, oids)
	if err != nil {
		return nil, fmt.Errorf("columns: %w", err)
	}
	for rows.Next() {
		var rel uint32
		var c consistency.Column
		var base uint32
		var baseName string
		var domain, collatable bool
		var ci colInfo
		if err := rows.Scan(&rel, &c.Name, &c.Type, &base, &baseName, &domain, &collatable, &ci.collation, &ci.deterministic); err != nil {
			rows.Close()
			return nil, fmt.Errorf("columns: %w", err)
		}
		c.Hash = hashTemplate(base, baseName, domain, collatable)
		c.Kind = keyKind(base)
		t := tables[rel]
		if t == nil {
			t = &consistency.Table{}
			tables[rel] = t
		}
		t.Columns = append(t.Columns, c)
		infos[rel] = append(infos[rel], ci)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("columns: %w", err)
	}
	for _, oid := range oids {
		if tables[oid] == nil {
			// A table without columns (CREATE TABLE t ()) has no rows to
			// tell apart but still is one.
			tables[oid] = &consistency.Table{}
		}
	}
	keys := make(map[uint32][]string, len(oids))
	rows, err = db.pool.Query(ctx, `
		SELECT i.indrelid, array_agg(a.attname ORDER BY k.ord)
		FROM pg_index i
		CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
		JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
		WHERE i.indrelid = ANY($1::oid[]) AND i.indisprimary
		GROUP BY i.indrelid`, oids)
	if err != nil {
		return nil, fmt.Errorf("primary keys: %w", err)
	}
	for rows.Next() {
		var rel uint32
		var key []string
		if err := rows.Scan(&rel, &key); err != nil {
			rows.Close()
			return nil, fmt.Errorf("primary keys: %w", err)
		}
		keys[rel] = key
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("primary keys: %w", err)
	}
	for oid, t := range tables {
		setKey(t, keys[oid], infos[oid], datcollate)
	}
	return tables, nil
}

// colInfo is what a column's collation says about its key use.
type colInfo struct {
	collation     string
	deterministic bool
}

// setKey sets t's key to the columns named key (the primary key, in key
// order), or leaves t without one (with a warning) when a key column's
// collation is not deterministic.
func setKey(t *consistency.Table, key []string, infos []colInfo, datcollate string) {
	for _, k := range key {
		for i, c := range t.Columns {
			if c.Name != k {
				continue
			}
			t.Key = append(t.Key, i)
			if infos[i].collation == "" {
				break
			}
			if !infos[i].deterministic {
				// Keys equal under it need not be the same bytes: the key
				// can neither cut both sides alike nor match rows. The
				// rows are still hashed by their bytes, as a multiset.
				t.Key = nil
				t.Warnings = append(t.Warnings, fmt.Sprintf(
					"key column %s uses the non-deterministic collation %s (equal keys need not be the same bytes): compared as a table without a key, a multiset of row hashes",
					c.Name, infos[i].collation))
				return
			}
			coll := infos[i].collation
			if coll == "default" {
				coll = datcollate
			}
			if c.Kind == consistency.KindText && coll != "C" && coll != "POSIX" && coll != "ucs_basic" {
				t.Warnings = append(t.Warnings, fmt.Sprintf(
					"key column %s has collation %s: chunks are ranges in \"C\" order (the same on both sides), which its primary key index cannot serve, so each chunk scans the table; an index on (%s COLLATE \"C\") avoids that",
					c.Name, coll, c.Name))
			}
			break
		}
	}
}
