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

	"github.com/cutover/cutover/internal/pgsafe"
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
// Deferred: plain indexes, and primary-key and unique constraints (built
// again with ALTER TABLE ... ADD CONSTRAINT, which builds their index).
// Nothing reads green's keys during the copy: the apply starts after it,
// and a retried copy builds what a dead one left before its pre-checks
// read green's primary keys (rebuildBeforePrecheck). Kept in place:
// constraints a foreign key depends on, the replica-identity index,
// constraints and indexes of partitions attached to a partitioned parent,
// exclusion constraints, and anything with settings the definition does
// not carry (a tablespace, a CLUSTER mark, a comment, per-column
// statistics targets), invalid indexes, and indexes something else
// depends on.

// deferrableIndexesSQL lists green's deferrable indexes and key
// constraints of the given tables (quoted names): schema and name of the
// index, the table, the statement that builds it and the one that drops
// it.
const deferrableIndexesSQL = `
WITH t AS (SELECT to_regclass(x) AS oid FROM unnest($1::text[]) x),
idx AS (
	SELECT i.indexrelid, i.indrelid, ic.relname, ic.relnamespace
	FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
	WHERE i.indrelid IN (SELECT oid FROM t)
		AND i.indisvalid AND i.indisready AND i.indislive
		AND NOT i.indisreplident AND NOT i.indisclustered AND ic.reltablespace = 0
		AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.indexrelid)
		AND NOT EXISTS (SELECT 1 FROM pg_description d WHERE d.objoid = i.indexrelid AND d.classoid = 'pg_class'::regclass)
		AND NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = i.indexrelid AND a.attstattarget > 0)
		AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = i.indexrelid AND d.deptype = 'n')
)
SELECT n.nspname::text, idx.relname::text, idx.indrelid::regclass::text,
	pg_get_indexdef(idx.indexrelid),
	'DROP INDEX ' || quote_ident(n.nspname) || '.' || quote_ident(idx.relname)
FROM idx JOIN pg_namespace n ON n.oid = idx.relnamespace
WHERE NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = idx.indexrelid)
UNION ALL
SELECT n.nspname::text, idx.relname::text, idx.indrelid::regclass::text,
	'ALTER TABLE ONLY ' || idx.indrelid::regclass::text || ' ADD CONSTRAINT ' || quote_ident(c.conname) || ' ' || pg_get_constraintdef(c.oid),
	'ALTER TABLE ONLY ' || idx.indrelid::regclass::text || ' DROP CONSTRAINT ' || quote_ident(c.conname)
FROM idx JOIN pg_namespace n ON n.oid = idx.relnamespace
JOIN pg_constraint c ON c.conindid = idx.indexrelid AND c.conrelid = idx.indrelid AND c.contype IN ('p', 'u')
WHERE c.conparentid = 0 AND c.conname = idx.relname
	AND NOT EXISTS (SELECT 1 FROM pg_constraint o WHERE o.conindid = idx.indexrelid AND o.oid <> c.oid)
	AND NOT EXISTS (SELECT 1 FROM pg_description d WHERE d.objoid = c.oid AND d.classoid = 'pg_constraint'::regclass)
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
		type idx struct{ schema, name, table, def, drop string }
		list, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (idx, error) {
			var x idx
			err := row.Scan(&x.schema, &x.name, &x.table, &x.def, &x.drop)
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
			if _, err := tx.Exec(ctx, x.drop); err != nil {
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
	// The definitions are run as the agent: only from a schema no other
	// role can have put them in.
	if err := pgsafe.CheckSchema(ctx, conn, "cutover"); err != nil {
		conn.Close(context.WithoutCancel(ctx))
		return 0, fmt.Errorf("green: %w", err)
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
		if !strings.HasPrefix(x.def, "CREATE INDEX ") && !strings.HasPrefix(x.def, "CREATE UNIQUE INDEX ") && !strings.HasPrefix(x.def, "ALTER TABLE ONLY ") {
			conn.Close(context.WithoutCancel(ctx))
			return 0, fmt.Errorf("green: cutover.deferred_indexes holds %q for index %s.%s, which is not an index or key definition cutover wrote", x.def, x.schema, x.name)
		}
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
			// The extended protocol runs one statement, never a list.
			if _, err := conn.PgConn().ExecParams(ctx, x.def, nil, nil, nil, nil).Close(); err != nil {
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

// rebuildBeforePrecheck builds what a copy that died left deferred on
// green: the pre-checks compare green's primary keys with blue's, and a
// key dropped for the copy would read as a difference. A copy defers
// them again.
func (r *Replicator) rebuildBeforePrecheck(ctx context.Context) error {
	connect := func(ctx context.Context) (*pgx.Conn, error) { return pgx.Connect(ctx, r.opts.Pair.Green.DSN.Reveal()) }
	n, err := rebuildIndexes(ctx, connect, "", max(r.opts.CopyParallel, 2), r.log)
	if n > 0 {
		r.log.Warn("built green's indexes and keys that an interrupted copy had dropped", zap.Int("indexes", n))
	}
	return err
}
