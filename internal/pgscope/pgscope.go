// Package pgscope resolves a pair's scope (config.Scope) to the PostgreSQL
// tables it covers, with one rule for every part of cutover: replication
// publishes and copies Leaves, the fence revokes and locks All, and
// verification compares Roots. Tables are named to the rest of the code by
// Ident, a quoted identifier ("public"."Orders"): never unquoted text, which
// to_regclass would fold to lower case.
//
// The rule:
//   - Candidates are ordinary ('r') and partitioned ('p') tables outside the
//     system schemas (pg_*, information_schema) and the agent's own schema
//     cutover; temporary tables never are.
//   - scope.tables, when given, picks the named tables; every name must
//     exist. Otherwise scope.schemas, when given, picks the tables of those
//     schemas that are not partitions; otherwise every table that is not a
//     partition is picked.
//   - A picked partitioned table brings its partitions, at every level and
//     whatever their schema. Partitions attached later are covered at the
//     next Resolve.
//   - scope.exclude_tables removes the named tables and, for a partitioned
//     table, its partitions. Names that do not exist are ignored (a table
//     may be dropped after the config was written).
//   - An empty result is an error: a pair that covers nothing is a mistake.
//
// Names in scope are "table" (schema public) or "schema.table"; a part is
// matched exactly as written (case-sensitive, not folded to lower case),
// and a part in double quotes may hold dots and doubled quotes:
// public."Orders", "my.schema"."a""b".
package pgscope

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/cutover/cutover/internal/config"
)

// ErrScope is wrapped by every error about the scope itself (names that do
// not exist, nothing in scope), as opposed to errors reading the catalog.
var ErrScope = errors.New("scope")

// Querier is what Resolve needs: a pool, a connection or a transaction.
type Querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// Table is one table in scope.
type Table struct {
	OID    uint32
	Schema string
	Name   string
	// Kind is pg_class.relkind: 'r' (ordinary, partitions included) or 'p'
	// (partitioned: holds no rows itself).
	Kind byte
	// Parent is the OID of the partitioned table this one is a partition
	// of, 0 when it is not a partition.
	Parent uint32
}

// Ident is the table as a quoted SQL identifier: "schema"."name".
func (t Table) Ident() string { return pgx.Identifier{t.Schema, t.Name}.Sanitize() }

// String is schema.name unquoted, for messages.
func (t Table) String() string { return t.Schema + "." + t.Name }

// Partitioned reports whether the table is a partitioned parent.
func (t Table) Partitioned() bool { return t.Kind == 'p' }

// Set is a resolved scope, ordered by schema and name.
type Set struct {
	tables []Table
	byOID  map[uint32]int
}

// All is every table in scope: partitioned parents and their partitions.
// The fence revokes and locks these (a direct write to a partition checks
// the partition's privileges, not its parent's).
func (s *Set) All() []Table { return append([]Table(nil), s.tables...) }

// Leaves are the tables that hold rows: ordinary tables, partitions
// included, and no partitioned parents. Replication publishes and copies
// these.
func (s *Set) Leaves() []Table {
	var out []Table
	for _, t := range s.tables {
		if !t.Partitioned() {
			out = append(out, t)
		}
	}
	return out
}

// Roots are the tables whose parent is not in scope: ordinary tables that
// are not partitions, partitioned parents (which cover their partitions'
// rows), and partitions named on their own. Verification compares these.
func (s *Set) Roots() []Table {
	var out []Table
	for _, t := range s.tables {
		if _, ok := s.byOID[t.Parent]; t.Parent == 0 || !ok {
			out = append(out, t)
		}
	}
	return out
}

// Root is the root (see Roots) of the table with this OID, and whether the
// table is in scope: what a change to a partition counts against.
func (s *Set) Root(oid uint32) (Table, bool) {
	i, ok := s.byOID[oid]
	if !ok {
		return Table{}, false
	}
	t := s.tables[i]
	for t.Parent != 0 {
		j, ok := s.byOID[t.Parent]
		if !ok {
			break
		}
		t = s.tables[j]
	}
	return t, true
}

// Lookup finds a table in scope by schema and name.
func (s *Set) Lookup(schema, name string) (Table, bool) {
	for _, t := range s.tables {
		if t.Schema == schema && t.Name == name {
			return t, true
		}
	}
	return Table{}, false
}

// Idents are the tables' quoted identifiers, in order.
func Idents(tables []Table) []string {
	out := make([]string, len(tables))
	for i, t := range tables {
		out[i] = t.Ident()
	}
	return out
}

// Names are the tables' unquoted schema.name, in order, for messages.
func Names(tables []Table) []string {
	out := make([]string, len(tables))
	for i, t := range tables {
		out[i] = t.String()
	}
	return out
}

// candidatesSQL lists every table that can be in a scope, with its
// partition parent.
const candidatesSQL = `
SELECT c.oid, n.nspname, c.relname, c.relkind::text,
	coalesce((SELECT i.inhparent FROM pg_inherits i WHERE i.inhrelid = c.oid AND c.relispartition), 0)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't'
	AND n.nspname NOT IN ('information_schema', 'cutover') AND n.nspname NOT LIKE 'pg\_%'
ORDER BY n.nspname COLLATE "C", c.relname COLLATE "C"`

// Resolve reads the catalog through q and returns the tables in scope. An
// error wrapping ErrScope names what is wrong with the scope.
func Resolve(ctx context.Context, q Querier, scope config.Scope) (*Set, error) {
	rows, err := q.Query(ctx, candidatesSQL)
	if err != nil {
		return nil, fmt.Errorf("list tables: %w", err)
	}
	var all []Table
	for rows.Next() {
		var t Table
		var kind string
		if err := rows.Scan(&t.OID, &t.Schema, &t.Name, &kind, &t.Parent); err != nil {
			rows.Close()
			return nil, fmt.Errorf("list tables: %w", err)
		}
		t.Kind = kind[0]
		all = append(all, t)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list tables: %w", err)
	}
	return resolve(all, scope)
}

func resolve(all []Table, scope config.Scope) (*Set, error) {
	byName := map[[2]string]int{}
	children := map[uint32][]int{}
	for i, t := range all {
		byName[[2]string{t.Schema, t.Name}] = i
		if t.Parent != 0 {
			children[t.Parent] = append(children[t.Parent], i)
		}
	}
	// withPartitions marks i and everything partitioned under it.
	withPartitions := func(mark map[int]bool, i int) {
		stack := []int{i}
		for len(stack) > 0 {
			j := stack[len(stack)-1]
			stack = stack[:len(stack)-1]
			if mark[j] {
				continue
			}
			mark[j] = true
			stack = append(stack, children[all[j].OID]...)
		}
	}
	picked := map[int]bool{}
	var missing []string
	switch {
	case len(scope.Tables) > 0:
		for _, s := range scope.Tables {
			schema, name, err := ParseName(s)
			if err != nil {
				return nil, fmt.Errorf("%w: scope.tables: %v", ErrScope, err)
			}
			i, ok := byName[[2]string{schema, name}]
			if !ok {
				missing = append(missing, schema+"."+name)
				continue
			}
			withPartitions(picked, i)
		}
	default:
		schemas := map[string]bool{}
		for _, s := range scope.Schemas {
			schemas[s] = true
		}
		for i, t := range all {
			if t.Parent == 0 && (len(schemas) == 0 || schemas[t.Schema]) {
				withPartitions(picked, i)
			}
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("%w: tables named in scope.tables do not exist: %s", ErrScope, strings.Join(missing, ", "))
	}
	excluded := map[int]bool{}
	for _, s := range scope.ExcludeTables {
		schema, name, err := ParseName(s)
		if err != nil {
			return nil, fmt.Errorf("%w: scope.exclude_tables: %v", ErrScope, err)
		}
		if i, ok := byName[[2]string{schema, name}]; ok {
			withPartitions(excluded, i)
		}
	}
	set := &Set{byOID: map[uint32]int{}}
	for i, t := range all {
		if picked[i] && !excluded[i] {
			set.byOID[t.OID] = len(set.tables)
			set.tables = append(set.tables, t)
		}
	}
	if len(set.tables) == 0 {
		return nil, fmt.Errorf("%w: no table is in scope (check scope.schemas, scope.tables and scope.exclude_tables)", ErrScope)
	}
	// The catalog's order is by schema and name already; keep it stable
	// whatever the server's collation.
	sort.SliceStable(set.tables, func(i, j int) bool {
		a, b := set.tables[i], set.tables[j]
		if a.Schema != b.Schema {
			return a.Schema < b.Schema
		}
		return a.Name < b.Name
	})
	for i, t := range set.tables {
		set.byOID[t.OID] = i
	}
	return set, nil
}

// ParseName reads a scope name: "table" (schema public) or
// "schema.table", parts matched as written; a part in double quotes may
// hold dots, with "" for a quote.
func ParseName(s string) (schema, name string, err error) {
	var parts []string
	var cur strings.Builder
	quoted, wasQuoted := false, false
	for i := 0; i < len(s); i++ {
		ch := s[i]
		switch {
		case quoted && ch == '"' && i+1 < len(s) && s[i+1] == '"':
			cur.WriteByte('"')
			i++
		case ch == '"':
			if !quoted && cur.Len() > 0 {
				return "", "", fmt.Errorf("%q: a quote may only open a part", s)
			}
			quoted = !quoted
			wasQuoted = true
		case ch == '.' && !quoted:
			if cur.Len() == 0 && !wasQuoted {
				return "", "", fmt.Errorf("%q: empty part", s)
			}
			parts = append(parts, cur.String())
			cur.Reset()
			wasQuoted = false
		default:
			if wasQuoted && !quoted {
				return "", "", fmt.Errorf("%q: text after a closing quote", s)
			}
			cur.WriteByte(ch)
		}
	}
	if quoted {
		return "", "", fmt.Errorf("%q: unterminated quote", s)
	}
	if cur.Len() == 0 && !wasQuoted {
		return "", "", fmt.Errorf("%q: empty part", s)
	}
	parts = append(parts, cur.String())
	switch len(parts) {
	case 1:
		return "public", parts[0], nil
	case 2:
		return parts[0], parts[1], nil
	}
	return "", "", fmt.Errorf("%q: use table or schema.table (quote parts that hold dots)", s)
}
