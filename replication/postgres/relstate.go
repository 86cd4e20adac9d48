package postgres

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// relState is what the applier knows about one relation of the stream: the
// latest Relation message and green's view of the table.
type relState struct {
	rel  *relation
	name TableName
	// app is false for the bookkeeping tables in schema cutover.
	app       bool
	markers   bool
	heartbeat bool
	upsert    bool
	// keyCols are the positions of the replica identity columns; empty
	// for REPLICA IDENTITY FULL.
	keyCols []int
	// compact: keyed, and green has no other unique or exclusion index,
	// so changes to different rows commute (see batch.go).
	compact bool
	// types are green's column types (format_type), by stream position.
	types []string
	// textCmp: the type has no default btree equality, so FULL-identity
	// lookups compare the text forms.
	textCmp []bool
	// stmts caches prepared statements by shape.
	stmts map[string]*pgconn.StatementDescription
}

func (rs *relState) keyOf(row tuple) tuple {
	if len(row) != len(rs.rel.Columns) {
		// An old key tuple may carry the key columns only.
		return row
	}
	k := make(tuple, len(rs.keyCols))
	for i, c := range rs.keyCols {
		k[i] = row[c]
	}
	return k
}

// keyStrings renders key values for OnRowChange and breach reports.
func (rs *relState) keyStrings(key tuple) []string {
	if len(rs.keyCols) == 0 {
		return nil
	}
	out := make([]string, len(key))
	for i, v := range key {
		out[i] = string(v.Data)
	}
	return out
}

// sameShape reports whether a new Relation message describes the same
// columns, so that cached statements and pending changes stay valid.
func (rs *relState) sameShape(rel *relation) bool {
	if rs == nil || rs.rel.Namespace != rel.Namespace || rs.rel.Name != rel.Name || rs.rel.Identity != rel.Identity || len(rs.rel.Columns) != len(rel.Columns) {
		return false
	}
	for i, c := range rel.Columns {
		o := rs.rel.Columns[i]
		if o.Name != c.Name || o.Key != c.Key || o.TypeID != c.TypeID || o.Typmod != c.Typmod {
			return false
		}
	}
	return true
}

const greenColumnsSQL = `
SELECT a.attname, format_type(a.atttypid, a.atttypmod),
	t.typcategory NOT IN ('A', 'E') AND NOT EXISTS (
		SELECT 1 FROM pg_opclass o JOIN pg_am m ON m.oid = o.opcmethod
		WHERE m.amname = 'btree' AND o.opcdefault
			AND o.opcintype = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END)
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped`

const greenUniqueSQL = `
SELECT i.indexprs IS NOT NULL OR i.indpred IS NOT NULL,
	array(SELECT a.attname FROM unnest(i.indkey::int2[]) k JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k)
FROM pg_index i WHERE i.indrelid = $1::regclass AND (i.indisunique OR i.indisexclusion)`

// newRelState reads green's definition of rel's table.
func newRelState(ctx context.Context, conn *pgx.Conn, rel *relation) (*relState, error) {
	rs := &relState{rel: rel, name: TableName{rel.Namespace, rel.Name}, stmts: map[string]*pgconn.StatementDescription{}}
	rs.app = rel.Namespace != "cutover"
	rs.markers = rs.name == markersTable
	rs.heartbeat = rs.name == heartbeatTable
	rs.upsert = !rs.app
	var keyNames []string
	for i, c := range rel.Columns {
		if c.Key && rel.Identity != 'f' {
			rs.keyCols = append(rs.keyCols, i)
			keyNames = append(keyNames, c.Name)
		}
	}
	rows, err := conn.Query(ctx, greenColumnsSQL, rs.name.Quoted())
	if err != nil {
		return nil, fmt.Errorf("green: read columns of %s: %w", rs.name, err)
	}
	type gcol struct {
		typ     string
		textCmp bool
	}
	green := map[string]gcol{}
	for rows.Next() {
		var name string
		var c gcol
		if err := rows.Scan(&name, &c.typ, &c.textCmp); err != nil {
			rows.Close()
			return nil, fmt.Errorf("green: read columns of %s: %w", rs.name, err)
		}
		green[name] = c
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("green: read columns of %s: %w", rs.name, err)
	}
	var missing []string
	for _, c := range rel.Columns {
		g, ok := green[c.Name]
		if !ok {
			missing = append(missing, c.Name)
			continue
		}
		rs.types = append(rs.types, g.typ)
		rs.textCmp = append(rs.textCmp, g.textCmp)
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("green: table %s lacks column(s) %s that blue replicates (schema drift: apply the same DDL on green)", rs.name, strings.Join(missing, ", "))
	}
	if len(rs.keyCols) > 0 {
		rs.compact = true
		rows, err := conn.Query(ctx, greenUniqueSQL, rs.name.Quoted())
		if err != nil {
			return nil, fmt.Errorf("green: read indexes of %s: %w", rs.name, err)
		}
		want := slices.Clone(keyNames)
		sort.Strings(want)
		for rows.Next() {
			var partial bool
			var cols []string
			if err := rows.Scan(&partial, &cols); err != nil {
				rows.Close()
				return nil, fmt.Errorf("green: read indexes of %s: %w", rs.name, err)
			}
			sort.Strings(cols)
			if partial || !slices.Equal(cols, want) {
				rs.compact = false
			}
		}
		if err := rows.Err(); err != nil {
			return nil, fmt.Errorf("green: read indexes of %s: %w", rs.name, err)
		}
	}
	return rs, nil
}
