package postgres

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/internal/pgscope"
)

// bookkeeping tables are replicated with every pair but are not application
// tables: changes to them are never breaches and never reach OnRowChange.
var (
	heartbeatTable = TableName{"cutover", "heartbeat"}
	markersTable   = TableName{"cutover", "markers"}
)

// systemSchemas never hold tables in scope.
var systemSchemas = []string{"pg_catalog", "information_schema", "cutover"}

// column is one column of a table as the catalog describes it.
type column struct {
	Name      string
	Type      string // format_type(atttypid, atttypmod)
	NotNull   bool
	Generated bool
	Key       int // 1-based position in the primary key, 0 when not part of it
}

// tableInfo is one table in scope with what the pre-checks and the copy
// need to know.
type tableInfo struct {
	Name     TableName
	OID      uint32
	Identity byte // relreplident: d(efault), f(ull), i(ndex), n(othing)
	HasPK    bool
	Columns  []column
	// Estimated rows and bytes (pg_class), for progress.
	RowsEst  int64
	BytesEst int64
}

// copyColumns are the columns COPY moves: generated columns are computed
// on green.
func (t *tableInfo) copyColumns() []string {
	var out []string
	for _, c := range t.Columns {
		if !c.Generated {
			out = append(out, quoteIdent(c.Name))
		}
	}
	return out
}

// queryer is what the catalog queries need from a pool or a connection.
type queryer interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// listTablesSQL lists ordinary tables (partitions included, partitioned
// parents excluded: their rows live in the partitions) outside the system
// schemas, with their columns.
const listTablesSQL = `
SELECT n.nspname, c.relname, c.oid::int8, c.relreplident::text,
	EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
	greatest(c.reltuples, 0)::int8, pg_table_size(c.oid)::int8,
	a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attgenerated <> '',
	coalesce((SELECT array_position(i.indkey::int2[], a.attnum) FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), 0)
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relkind = 'r' AND c.relpersistence <> 't'
	AND n.nspname <> ALL ($1::text[]) AND n.nspname NOT LIKE 'pg\_%'
ORDER BY n.nspname, c.relname, a.attnum`

// listTables returns every user table of the database, by name.
func listTables(ctx context.Context, q queryer) (map[TableName]*tableInfo, error) {
	rows, err := q.Query(ctx, listTablesSQL, systemSchemas)
	if err != nil {
		return nil, fmt.Errorf("list tables: %w", err)
	}
	defer rows.Close()
	out := map[TableName]*tableInfo{}
	for rows.Next() {
		var (
			tn             TableName
			oid            int64
			ident          string
			hasPK          bool
			rowsEst, bytes int64
			col            column
			generated      bool
			keyPos         int32
		)
		if err := rows.Scan(&tn.Schema, &tn.Name, &oid, &ident, &hasPK, &rowsEst, &bytes,
			&col.Name, &col.Type, &col.NotNull, &generated, &keyPos); err != nil {
			return nil, fmt.Errorf("list tables: %w", err)
		}
		col.Generated = generated
		col.Key = int(keyPos)
		t := out[tn]
		if t == nil {
			t = &tableInfo{Name: tn, OID: uint32(oid), HasPK: hasPK, RowsEst: rowsEst, BytesEst: bytes}
			if ident != "" {
				t.Identity = ident[0]
			}
			out[tn] = t
		}
		t.Columns = append(t.Columns, col)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list tables: %w", err)
	}
	return out, nil
}

// scopeTables resolves the pair's scope on blue (internal/pgscope: the
// rule every part of cutover shares) and returns the tables replication
// publishes and copies, its leaves, with their details. Problems with the
// scope itself come back as problems, for the pre-check's report.
func scopeTables(ctx context.Context, q queryer, scope config.Scope) (tables []*tableInfo, set *pgscope.Set, problems []string, err error) {
	set, err = pgscope.Resolve(ctx, q, scope)
	if errors.Is(err, pgscope.ErrScope) {
		return nil, nil, []string{err.Error() + " on blue"}, nil
	}
	if err != nil {
		return nil, nil, nil, err
	}
	all, err := listTables(ctx, q)
	if err != nil {
		return nil, nil, nil, err
	}
	for _, l := range set.Leaves() {
		t, ok := all[TableName{l.Schema, l.Name}]
		if !ok {
			// Dropped between the two reads, or a table without a column.
			problems = append(problems, fmt.Sprintf("table %s has no columns to replicate (or was dropped meanwhile)", l))
			continue
		}
		tables = append(tables, t)
	}
	return tables, set, problems, nil
}

// resolveTables is scopeTables for the checks that run after the
// pre-check: any problem is an error.
func resolveTables(ctx context.Context, q queryer, scope config.Scope) ([]*tableInfo, *pgscope.Set, error) {
	tables, set, problems, err := scopeTables(ctx, q, scope)
	if err != nil {
		return nil, nil, err
	}
	if len(problems) > 0 {
		return nil, nil, fmt.Errorf("scope: %s", strings.Join(problems, "; "))
	}
	return tables, set, nil
}

// PublishedTables lists the application tables in the replicator's
// publication on blue (pg_publication_tables, partitions as themselves),
// as quoted identifiers, sorted; the cutover schema's bookkeeping tables
// are left out.
func (r *Replicator) PublishedTables(ctx context.Context) ([]string, error) {
	if r.blue == nil {
		return nil, errors.New("published tables: replicator not started")
	}
	rows, err := r.blue.Query(ctx, `SELECT schemaname::text, tablename::text FROM pg_publication_tables
		WHERE pubname = $1 AND schemaname <> 'cutover' ORDER BY schemaname COLLATE "C", tablename COLLATE "C"`, r.name)
	if err != nil {
		return nil, fmt.Errorf("blue: list the publication's tables: %w", err)
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (string, error) {
		var schema, name string
		err := row.Scan(&schema, &name)
		return pgx.Identifier{schema, name}.Sanitize(), err
	})
}
