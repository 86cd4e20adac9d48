package postgres

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
)

// Deferred indexes. Maintaining a secondary index row by row during COPY
// costs a random btree insert per row and index; building it once the
// data is in is a sort, several times cheaper. Green's deferrable indexes
// are dropped before the copy and built again after it, before the copy
// is recorded as done (so before any change is applied).
//
// Durability: each index's definition is written to
// cutover.deferred_indexes in the same transaction that drops it, and
// deleted in the same transaction that builds it again. A copy that dies
// in between leaves the definitions behind; the next copy (a retry, of
// this plan or another) builds them all after its data, and Cleanup (an
// aborted plan) builds this slot's. So green always ends with exactly the
// indexes it had.
//
// Only plain indexes are deferred. Kept in place: indexes behind a
// constraint (primary key, unique, exclusion: the pre-checks read green's
// primary key, and foreign keys depend on them), the replica-identity
// index, indexes of partitions attached to a partitioned index, and any
// index with settings pg_get_indexdef does not carry (a tablespace, a
// CLUSTER mark, a comment, per-column statistics targets) or that is
// invalid, or that something else depends on.

// deferrableIndexesSQL lists green's deferrable indexes of the given
// tables (quoted names), with the table's size for ordering the rebuild.
const deferrableIndexesSQL = `
SELECT n.nspname::text, ic.relname::text, i.indrelid::regclass::text, pg_get_indexdef(i.indexrelid)
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
JOIN pg_namespace n ON n.oid = ic.relnamespace
WHERE i.indrelid IN (SELECT to_regclass(x) FROM unnest($1::text[]) x)
	AND i.indisvalid AND i.indisready AND i.indislive
	AND NOT i.indisreplident AND NOT i.indisclustered AND ic.reltablespace = 0
	AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
	AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.indexrelid)
	AND NOT EXISTS (SELECT 1 FROM pg_description d WHERE d.objoid = i.indexrelid AND d.classoid = 'pg_class'::regclass)
	AND NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = i.indexrelid AND a.attstattarget > 0)
	AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = i.indexrelid AND d.deptype = 'n')
ORDER BY 1, 2`

// deferIndexes records and drops green's deferrable indexes of tables, in
// one transaction. It returns how many it dropped.
func (r *Replicator) deferIndexes(ctx context.Context, tables []*tableInfo) (int, error) {
	var n int
	err := pgx.BeginFunc(ctx, r.green, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, deferrableIndexesSQL, quotedNames(tables))
		if err != nil {
			return fmt.Errorf("list indexes: %w", err)
		}
		type idx struct{ schema, name, table, def string }
		list, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (idx, error) {
			var x idx
			err := row.Scan(&x.schema, &x.name, &x.table, &x.def)
			return x, err
		})
		if err != nil {
			return fmt.Errorf("list indexes: %w", err)
		}
		for _, x := range list {
			// A definition left by a copy that died is replaced by the index
			// that exists now under that name: that is green's index.
			if _, err := tx.Exec(ctx, `INSERT INTO cutover.deferred_indexes (schema_name, index_name, table_name, def, slot)
				VALUES ($1, $2, $3, $4, $5)
				ON CONFLICT (schema_name, index_name) DO UPDATE SET table_name = EXCLUDED.table_name, def = EXCLUDED.def, slot = EXCLUDED.slot, deferred_at = now()`,
				x.schema, x.name, x.table, x.def, r.name); err != nil {
				return fmt.Errorf("record index %s: %w", x.name, err)
			}
			if _, err := tx.Exec(ctx, "DROP INDEX "+quoteIdent(x.schema)+"."+quoteIdent(x.name)); err != nil {
				return fmt.Errorf("drop index %s: %w", x.name, err)
			}
		}
		n = len(list)
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("green: defer indexes: %w", err)
	}
	return n, nil
}

// deferredIndex is a row of cutover.deferred_indexes.
type deferredIndex struct {
	schema, name, table, def string
	bytes                    int64
}

// rebuildIndexes builds every index recorded in cutover.deferred_indexes
// (slot "" for all of them, else only the slot's), largest table first,
// on up to parallel connections of green, each with maintenance_work_mem
// raised. Each build and the removal of its record commit together.
func rebuildIndexes(ctx context.Context, connect func(context.Context) (*pgx.Conn, error), slot string, parallel int, log *zap.Logger) (int, error) {
	conn, err := connect(ctx)
	if err != nil {
		return 0, fmt.Errorf("green: connect to rebuild indexes: %w", err)
	}
	rows, err := conn.Query(ctx, `SELECT d.schema_name, d.index_name, d.table_name, d.def, coalesce(pg_table_size(to_regclass(d.table_name)), -1)::int8
		FROM cutover.deferred_indexes d WHERE $1 = '' OR d.slot = $1`, slot)
	if err != nil {
		conn.Close(context.WithoutCancel(ctx))
		if undefinedTable(err) {
			return 0, nil
		}
		return 0, fmt.Errorf("green: read deferred indexes: %w", err)
	}
	list, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (deferredIndex, error) {
		var x deferredIndex
		err := row.Scan(&x.schema, &x.name, &x.table, &x.def, &x.bytes)
		return x, err
	})
	if err != nil {
		conn.Close(context.WithoutCancel(ctx))
		return 0, fmt.Errorf("green: read deferred indexes: %w", err)
	}
	var todo []deferredIndex
	for _, x := range list {
		if x.bytes < 0 {
			// Its table was dropped since: nothing left to index.
			log.Warn("the table of a deferred index is gone; forgetting the index", zap.String("index", x.schema+"."+x.name), zap.String("table", x.table))
			if _, err := conn.Exec(ctx, `DELETE FROM cutover.deferred_indexes WHERE schema_name = $1 AND index_name = $2`, x.schema, x.name); err != nil {
				conn.Close(context.WithoutCancel(ctx))
				return 0, fmt.Errorf("green: forget index %s: %w", x.name, err)
			}
			continue
		}
		todo = append(todo, x)
	}
	conn.Close(context.WithoutCancel(ctx))
	if len(todo) == 0 {
		return 0, nil
	}
	slices.SortStableFunc(todo, func(a, b deferredIndex) int {
		return cmp.Or(cmp.Compare(b.bytes, a.bytes), strings.Compare(a.name, b.name))
	})
	work := make(chan deferredIndex, len(todo))
	for _, x := range todo {
		work <- x
	}
	close(work)
	parallel = max(1, min(parallel, len(todo)))
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errs := make(chan error, parallel)
	var wg sync.WaitGroup
	for range parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := buildWorker(cctx, connect, work, log); err != nil {
				errs <- err
				cancel()
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return 0, err
	}
	return len(todo), ctx.Err()
}

func buildWorker(ctx context.Context, connect func(context.Context) (*pgx.Conn, error), work <-chan deferredIndex, log *zap.Logger) error {
	conn, err := connect(ctx)
	if err != nil {
		return fmt.Errorf("green: connect to rebuild indexes: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	// A sort that fits in memory is the fast path of a btree build.
	if _, err := conn.Exec(ctx, "SET maintenance_work_mem = '256MB'"); err != nil {
		return fmt.Errorf("green: set up index build: %w", err)
	}
	for x := range work {
		start := time.Now()
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, x.def); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, `DELETE FROM cutover.deferred_indexes WHERE schema_name = $1 AND index_name = $2`, x.schema, x.name)
			return err
		})
		if err != nil {
			return fmt.Errorf("green: rebuild index %s.%s on %s: %w", x.schema, x.name, x.table, err)
		}
		log.Info("index rebuilt", zap.String("index", x.schema+"."+x.name), zap.Duration("took", time.Since(start).Round(time.Millisecond)))
	}
	return nil
}

// copyPlan is how each table is copied: the format, and whether COPY
// FREEZE may be used.
type copyPlan struct {
	binary bool
	freeze bool
}

// columnTypesSQL lists the copied columns of a table with what decides
// the format: the type's OID, kind, and whether it has binary I/O.
const columnTypesSQL = `
SELECT a.attname::text, a.atttypid::int8, t.typtype::text, t.typsend <> 0 AND t.typreceive <> 0
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''`

type colType struct {
	oid      int64
	kind     string
	binaryIO bool
}

func columnTypes(ctx context.Context, q queryer, table string) (map[string]colType, error) {
	rows, err := q.Query(ctx, columnTypesSQL, table)
	if err != nil {
		return nil, err
	}
	out := map[string]colType{}
	for rows.Next() {
		var name string
		var c colType
		if err := rows.Scan(&name, &c.oid, &c.kind, &c.binaryIO); err != nil {
			rows.Close()
			return nil, err
		}
		out[name] = c
	}
	return out, rows.Err()
}

// firstNormalOID is where user-defined objects' OIDs start: below it, a
// type has the same OID (and binary format) on every server.
const firstNormalOID = 16384

// binaryCopyable says whether a column can go through COPY in binary:
// both sides have the same built-in type with binary I/O, or both have an
// enum (sent as its label). Binary COPY carries no type OIDs itself, but
// arrays and composites embed their element types' OIDs, which differ
// between servers for user-defined types; those, domains and anything
// else go as text.
func binaryCopyable(b, g colType) bool {
	switch {
	case !b.binaryIO || !g.binaryIO:
		return false
	case b.kind == "e" && g.kind == "e":
		return true
	case b.oid != g.oid || b.oid >= firstNormalOID:
		return false
	}
	return b.kind == "b" || b.kind == "r" || b.kind == "m"
}

// copyPlans decides, per table, the format (binary when every column can
// go in binary and both servers run the same major version; text
// otherwise) and whether the table may use COPY FREEZE on green (no other
// table's foreign key references it: TRUNCATE, which FREEZE needs in the
// same transaction, refuses such a table on its own).
func (r *Replicator) copyPlans(ctx context.Context, tables []*tableInfo) (map[*tableInfo]copyPlan, error) {
	out := map[*tableInfo]copyPlan{}
	var bv, gv int
	if err := r.blue.QueryRow(ctx, `SELECT current_setting('server_version_num')::int / 10000`).Scan(&bv); err != nil {
		return nil, fmt.Errorf("blue: server version: %w", err)
	}
	if err := r.green.QueryRow(ctx, `SELECT current_setting('server_version_num')::int / 10000`).Scan(&gv); err != nil {
		return nil, fmt.Errorf("green: server version: %w", err)
	}
	for _, t := range tables {
		var p copyPlan
		if !r.opts.copyNoBinary && bv == gv {
			bt, err := columnTypes(ctx, r.blue, t.Name.Quoted())
			if err != nil {
				return nil, fmt.Errorf("blue: column types of %s: %w", t.Name, err)
			}
			gt, err := columnTypes(ctx, r.green, t.Name.Quoted())
			if err != nil {
				return nil, fmt.Errorf("green: column types of %s: %w", t.Name, err)
			}
			p.binary = len(bt) > 0
			for name, b := range bt {
				if g, ok := gt[name]; !ok || !binaryCopyable(b, g) {
					p.binary = false
					break
				}
			}
		}
		if !r.opts.copyNoFreeze {
			if err := r.green.QueryRow(ctx, `SELECT NOT EXISTS (SELECT 1 FROM pg_constraint
				WHERE contype = 'f' AND confrelid = to_regclass($1) AND conrelid <> confrelid)`, t.Name.Quoted()).Scan(&p.freeze); err != nil {
				return nil, fmt.Errorf("green: foreign keys to %s: %w", t.Name, err)
			}
		}
		out[t] = p
	}
	return out, nil
}

// copyStats splits the last copy's time: the data (from the copy's start,
// slot creation included) and the index builds after it.
type copyStats struct {
	Data, Indexes time.Duration
	IndexesBuilt  int
}

func (r *Replicator) lastCopyStats() copyStats {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.copyStats
}
