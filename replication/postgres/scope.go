package postgres

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/cutover/cutover/internal/config"
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

// parseTableName reads "schema.table" or "table" (schema public); quoted
// parts keep their case and dots.
func parseTableName(s string) TableName {
	s = strings.TrimSpace(s)
	parts := splitQualified(s)
	if len(parts) == 1 {
		return TableName{"public", parts[0]}
	}
	return TableName{parts[0], parts[1]}
}

func splitQualified(s string) []string {
	var parts []string
	var cur strings.Builder
	quoted := false
	for i := 0; i < len(s); i++ {
		ch := s[i]
		switch {
		case ch == '"' && quoted && i+1 < len(s) && s[i+1] == '"':
			cur.WriteByte('"')
			i++
		case ch == '"':
			quoted = !quoted
		case ch == '.' && !quoted && len(parts) == 0:
			parts = append(parts, cur.String())
			cur.Reset()
		default:
			cur.WriteByte(ch)
		}
	}
	return append(parts, cur.String())
}

// resolveScope picks the tables of scope out of all. Named tables that do
// not exist are errors; an empty result is an error too (a pair that
// replicates nothing is a mistake in the config).
func resolveScope(all map[TableName]*tableInfo, scope config.Scope) ([]*tableInfo, []string) {
	var problems []string
	schemas := map[string]bool{}
	for _, s := range scope.Schemas {
		schemas[s] = true
	}
	exclude := map[TableName]bool{}
	for _, t := range scope.ExcludeTables {
		exclude[parseTableName(t)] = true
	}
	picked := map[TableName]*tableInfo{}
	if len(scope.Tables) > 0 {
		for _, s := range scope.Tables {
			tn := parseTableName(s)
			t, ok := all[tn]
			if !ok {
				problems = append(problems, fmt.Sprintf("table %s named in scope.tables does not exist on blue", tn))
				continue
			}
			picked[tn] = t
		}
	} else {
		for tn, t := range all {
			if len(schemas) == 0 || schemas[tn.Schema] {
				picked[tn] = t
			}
		}
	}
	var out []*tableInfo
	for tn, t := range picked {
		if len(schemas) > 0 && !schemas[tn.Schema] && len(scope.Tables) == 0 {
			continue
		}
		if exclude[tn] {
			continue
		}
		out = append(out, t)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name.String() < out[j].Name.String() })
	if len(out) == 0 && len(problems) == 0 {
		problems = append(problems, "no table is in scope on blue (check scope.schemas, scope.tables and scope.exclude_tables)")
	}
	return out, problems
}
