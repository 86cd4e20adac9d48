package postgres

import (
	"bytes"
	"cmp"
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// statements builds one pipelined round trip of apply statements. Every
// value travels in PostgreSQL's text format, exactly as pgoutput sent it,
// and is cast to green's column type in SQL: text is portable where binary
// is not (arrays and records of user types embed type OIDs, which differ
// between blue and green).
type statements struct {
	conn   *pgconn.PgConn
	b      pgconn.Batch
	n      int
	checks []rowCheck
	seq    *int
}

// rowCheck is how many rows a statement must touch; fewer means green was
// missing rows that blue changed (reported, as native apply does, not
// fatal).
type rowCheck struct {
	stmt  int
	want  int64
	table TableName
	what  string
}

func (s *statements) exec(sql string) {
	s.b.ExecParams(sql, nil, nil, nil, nil)
	s.n++
}

func (s *statements) execParams(sql string, params [][]byte) {
	s.b.ExecParams(sql, params, nil, nil, nil)
	s.n++
}

// prepared runs the statement of rs with this shape, preparing it on first
// use.
func (s *statements) prepared(ctx context.Context, rs *relState, shape string, build func() string, params [][]byte) error {
	sd := rs.stmts[shape]
	if sd == nil {
		*s.seq++
		name := "cutover_" + strconv.Itoa(*s.seq)
		var err error
		sd, err = s.conn.Prepare(ctx, name, build(), nil)
		if err != nil {
			return fmt.Errorf("prepare statement for %s: %w", rs.name, err)
		}
		rs.stmts[shape] = sd
	}
	s.b.ExecStatement(sd, params, nil, nil)
	s.n++
	return nil
}

func (s *statements) expect(want int64, rs *relState, what string) {
	s.checks = append(s.checks, rowCheck{stmt: s.n - 1, want: want, table: rs.name, what: what})
}

// appendArray appends a text[] literal of vals; nil values are NULL.
func appendArray(dst []byte, vals []value) []byte {
	dst = append(dst, '{')
	for i, v := range vals {
		if i > 0 {
			dst = append(dst, ',')
		}
		if v.Kind == valNull {
			dst = append(dst, "NULL"...)
			continue
		}
		dst = append(dst, '"')
		for _, c := range v.Data {
			if c == '"' || c == '\\' {
				dst = append(dst, '\\')
			}
			dst = append(dst, c)
		}
		dst = append(dst, '"')
	}
	return append(dst, '}')
}

// column arrays: one text[] per column over ops.
func columnArrays(ops []*op, cols []int, pick func(o *op) tuple) [][]byte {
	params := make([][]byte, len(cols))
	vals := make([]value, len(ops))
	for i, c := range cols {
		for j, o := range ops {
			vals[j] = pick(o)[c]
		}
		params[i] = appendArray(nil, vals)
	}
	return params
}

func rowParam(v value) []byte {
	if v.Kind == valNull {
		return nil
	}
	if v.Data == nil {
		return []byte{}
	}
	return v.Data
}

func colList(rs *relState, cols []int) string {
	var b strings.Builder
	for i, c := range cols {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(quoteIdent(rs.rel.Columns[c].Name))
	}
	return b.String()
}

func shapeKey(prefix string, cols ...[]int) string {
	var b strings.Builder
	b.WriteString(prefix)
	for _, cs := range cols {
		b.WriteByte('|')
		for _, c := range cs {
			b.WriteString(strconv.Itoa(c))
			b.WriteByte(',')
		}
	}
	return b.String()
}

func allCols(rs *relState) []int {
	out := make([]int, len(rs.rel.Columns))
	for i := range out {
		out[i] = i
	}
	return out
}

// present lists the positions of t's values that are not unchanged TOAST,
// optionally skipping the key columns.
func present(rs *relState, t tuple, skipKey bool) []int {
	var out []int
	for i, v := range t {
		if v.Kind == valUnchanged {
			continue
		}
		if skipKey && isKey(rs, i) {
			continue
		}
		out = append(out, i)
	}
	return out
}

func isKey(rs *relState, col int) bool {
	for _, k := range rs.keyCols {
		if k == col {
			return true
		}
	}
	return false
}

func (rs *relState) upsertClause() string {
	if !rs.upsert || len(rs.keyCols) == 0 {
		return ""
	}
	var set []string
	for i, c := range rs.rel.Columns {
		if !isKey(rs, i) {
			set = append(set, quoteIdent(c.Name)+" = EXCLUDED."+quoteIdent(c.Name))
		}
	}
	clause := " ON CONFLICT (" + colList(rs, rs.keyCols) + ")"
	if len(set) == 0 {
		return clause + " DO NOTHING"
	}
	return clause + " DO UPDATE SET " + strings.Join(set, ", ")
}

// bulkInsert inserts rows (complete tuples) in one statement.
func (s *statements) bulkInsert(ctx context.Context, rs *relState, ops []*op) error {
	if len(ops) == 1 {
		return s.rowInsert(ctx, rs, ops[0])
	}
	cols := allCols(rs)
	err := s.prepared(ctx, rs, "bI", func() string {
		var sel, args, alias []string
		for i, c := range cols {
			sel = append(sel, "v.a"+strconv.Itoa(i)+"::"+rs.types[c])
			args = append(args, "$"+strconv.Itoa(i+1)+"::text[]")
			alias = append(alias, "a"+strconv.Itoa(i))
		}
		return "INSERT INTO " + rs.name.Quoted() + " (" + colList(rs, cols) + ") SELECT " + strings.Join(sel, ", ") +
			" FROM unnest(" + strings.Join(args, ", ") + ") AS v(" + strings.Join(alias, ", ") + ")" + rs.upsertClause()
	}, columnArrays(ops, cols, func(o *op) tuple { return o.row }))
	return err
}

func (s *statements) rowInsert(ctx context.Context, rs *relState, o *op) error {
	cols := allCols(rs)
	params := make([][]byte, len(cols))
	for i, c := range cols {
		params[i] = rowParam(o.row[c])
	}
	return s.prepared(ctx, rs, "rI", func() string {
		var args []string
		for i, c := range cols {
			args = append(args, "$"+strconv.Itoa(i+1)+"::"+rs.types[c])
		}
		return "INSERT INTO " + rs.name.Quoted() + " (" + colList(rs, cols) + ") VALUES (" + strings.Join(args, ", ") + ")" + rs.upsertClause()
	}, params)
}

// bulkUpdate updates rows found by key (distinct keys), setting the
// columns in set, in one statement.
func (s *statements) bulkUpdate(ctx context.Context, rs *relState, set []int, ops []*op) error {
	if len(ops) == 1 {
		return s.rowUpdate(ctx, rs, ops[0], set)
	}
	nk := len(rs.keyCols)
	params := columnArrays(ops, seq(nk), func(o *op) tuple { return o.key })
	params = append(params, columnArrays(ops, set, func(o *op) tuple { return o.row })...)
	err := s.prepared(ctx, rs, shapeKey("bU", set), func() string {
		var sets, args, alias, where []string
		for i, k := range rs.keyCols {
			args = append(args, "$"+strconv.Itoa(i+1)+"::text[]")
			alias = append(alias, "k"+strconv.Itoa(i))
			where = append(where, "t."+quoteIdent(rs.rel.Columns[k].Name)+" = v.k"+strconv.Itoa(i)+"::"+rs.types[k])
		}
		for i, c := range set {
			args = append(args, "$"+strconv.Itoa(nk+i+1)+"::text[]")
			alias = append(alias, "a"+strconv.Itoa(i))
			sets = append(sets, quoteIdent(rs.rel.Columns[c].Name)+" = v.a"+strconv.Itoa(i)+"::"+rs.types[c])
		}
		return "UPDATE " + rs.name.Quoted() + " AS t SET " + strings.Join(sets, ", ") +
			" FROM unnest(" + strings.Join(args, ", ") + ") AS v(" + strings.Join(alias, ", ") + ") WHERE " + strings.Join(where, " AND ")
	}, params)
	if err == nil {
		s.expect(int64(len(ops)), rs, "update")
	}
	return err
}

// bulkDelete deletes rows by key in one statement.
func (s *statements) bulkDelete(ctx context.Context, rs *relState, ops []*op) error {
	if len(ops) == 1 {
		return s.rowDelete(ctx, rs, ops[0])
	}
	nk := len(rs.keyCols)
	err := s.prepared(ctx, rs, "bD", func() string {
		var args, alias, where []string
		for i, k := range rs.keyCols {
			args = append(args, "$"+strconv.Itoa(i+1)+"::text[]")
			alias = append(alias, "k"+strconv.Itoa(i))
			where = append(where, "t."+quoteIdent(rs.rel.Columns[k].Name)+" = v.k"+strconv.Itoa(i)+"::"+rs.types[k])
		}
		return "DELETE FROM " + rs.name.Quoted() + " AS t USING unnest(" + strings.Join(args, ", ") + ") AS v(" + strings.Join(alias, ", ") + ") WHERE " + strings.Join(where, " AND ")
	}, columnArrays(ops, seq(nk), func(o *op) tuple { return o.key }))
	if err == nil {
		s.expect(int64(len(ops)), rs, "delete")
	}
	return err
}

func seq(n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = i
	}
	return out
}

// where renders the row lookup of a single-row update or delete: by key,
// or for REPLICA IDENTITY FULL by every value of the old row (first
// match, like native apply), and appends its parameters. It returns the
// statement's shape for the cache of prepared statements.
func (rs *relState) where(o *op, firstParam int, params [][]byte) (string, []int, [][]byte) {
	len0 := len(params)
	if len(rs.keyCols) > 0 {
		var where []string
		for i, k := range rs.keyCols {
			where = append(where, quoteIdent(rs.rel.Columns[k].Name)+" = $"+strconv.Itoa(firstParam+i)+"::"+rs.types[k])
			params = append(params, rowParam(o.key[i]))
		}
		return strings.Join(where, " AND "), nil, params
	}
	// A value is matched with = and a NULL with IS NULL, not both with
	// IS NOT DISTINCT FROM (the same test for non-NULL values), because
	// no index can serve IS NOT DISTINCT FROM: with =, an index on green
	// (any index, not only a key) saves a scan of the whole table per
	// change. The shape of the statement then depends on which values
	// are NULL: such columns are listed as -(c+1).
	var shape []int
	var where []string
	for _, c := range present(rs, o.old, false) {
		name := quoteIdent(rs.rel.Columns[c].Name)
		if o.old[c].Kind == valNull {
			where = append(where, name+" IS NULL")
			shape = append(shape, -(c + 1))
			continue
		}
		p := "$" + strconv.Itoa(firstParam+len(params)-len0)
		if rs.textCmp[c] {
			where = append(where, name+"::text = "+p+"::text")
		} else {
			where = append(where, name+" = "+p+"::"+rs.types[c])
		}
		shape = append(shape, c)
		params = append(params, rowParam(o.old[c]))
	}
	return "ctid = (SELECT ctid FROM " + rs.name.Quoted() + " WHERE " + strings.Join(where, " AND ") + " LIMIT 1)", shape, params
}

// rowUpdate updates one row, setting set (nil: every present column; the
// key columns too when the key changed).
func (s *statements) rowUpdate(ctx context.Context, rs *relState, o *op, set []int) error {
	if set == nil {
		set = present(rs, o.row, o.kind != opKeyUpdate && len(rs.keyCols) > 0)
	}
	if len(set) == 0 {
		return nil // only unchanged TOAST values: nothing to write
	}
	params := make([][]byte, 0, len(set)+len(rs.keyCols))
	for _, c := range set {
		params = append(params, rowParam(o.row[c]))
	}
	whereSQL, oldCols, params := rs.where(o, len(set)+1, params)
	err := s.prepared(ctx, rs, shapeKey("rU", set, oldCols), func() string {
		var sets []string
		for i, c := range set {
			sets = append(sets, quoteIdent(rs.rel.Columns[c].Name)+" = $"+strconv.Itoa(i+1)+"::"+rs.types[c])
		}
		return "UPDATE " + rs.name.Quoted() + " SET " + strings.Join(sets, ", ") + " WHERE " + whereSQL
	}, params)
	if err == nil {
		s.expect(1, rs, "update")
	}
	return err
}

func (s *statements) rowDelete(ctx context.Context, rs *relState, o *op) error {
	whereSQL, oldCols, params := rs.where(o, 1, nil)
	err := s.prepared(ctx, rs, shapeKey("rD", oldCols), func() string {
		return "DELETE FROM " + rs.name.Quoted() + " WHERE " + whereSQL
	}, params)
	if err == nil {
		s.expect(1, rs, "delete")
	}
	return err
}

// table emits tb's pending changes.
func (s *statements) table(ctx context.Context, tb *tableBatch) error {
	rs := tb.rs
	if !rs.compact {
		var run []*op
		flushRun := func() error {
			if len(run) == 0 {
				return nil
			}
			err := s.bulkInsert(ctx, rs, run)
			run = run[:0]
			return err
		}
		for i := range tb.ops {
			o := &tb.ops[i]
			if o.kind == opDead {
				continue
			}
			if o.kind == msgInsert {
				run = append(run, o)
				continue
			}
			if err := flushRun(); err != nil {
				return err
			}
			if err := s.row(ctx, rs, o); err != nil {
				return err
			}
		}
		return flushRun()
	}
	// Compact: segments of distinct keys between the ops that must run
	// alone; within a segment order does not matter.
	var (
		dels, ins []*op
		upds      = map[string][]*op{}
		updSets   = map[string][]int{}
		updOrder  []string
	)
	flushSeg := func() error {
		// Visit rows in key order: the index and heap pages are then read
		// in order, once each, instead of at random.
		sortByKey(rs, dels)
		for _, ops := range upds {
			sortByKey(rs, ops)
		}
		sortByKey(rs, ins)
		if len(dels) > 0 {
			if err := s.bulkDelete(ctx, rs, dels); err != nil {
				return err
			}
		}
		for _, k := range updOrder {
			if err := s.bulkUpdate(ctx, rs, updSets[k], upds[k]); err != nil {
				return err
			}
		}
		if len(ins) > 0 {
			if err := s.bulkInsert(ctx, rs, ins); err != nil {
				return err
			}
		}
		dels, ins, updOrder = nil, nil, nil
		clear(upds)
		clear(updSets)
		return nil
	}
	for i := range tb.ops {
		o := &tb.ops[i]
		switch {
		case o.kind == opDead:
		case o.alone:
			if err := flushSeg(); err != nil {
				return err
			}
			if err := s.row(ctx, rs, o); err != nil {
				return err
			}
		case o.kind == msgDelete:
			dels = append(dels, o)
		case o.kind == msgInsert:
			ins = append(ins, o)
		case o.kind == msgUpdate:
			set := present(rs, o.row, true)
			if len(set) == 0 {
				continue
			}
			k := shapeKey("", set)
			if _, ok := upds[k]; !ok {
				updOrder = append(updOrder, k)
				updSets[k] = set
			}
			upds[k] = append(upds[k], o)
		}
	}
	return flushSeg()
}

func (s *statements) row(ctx context.Context, rs *relState, o *op) error {
	switch o.kind {
	case msgInsert:
		return s.rowInsert(ctx, rs, o)
	case msgUpdate, opKeyUpdate:
		return s.rowUpdate(ctx, rs, o, nil)
	case msgDelete:
		return s.rowDelete(ctx, rs, o)
	}
	return nil
}

// sortByKey orders ops by their key: numerically for a single integer
// key, bytewise otherwise (a locality hint only; correctness does not
// depend on the order within a segment, whose keys are distinct). Integer
// keys are parsed once, not at every comparison.
func sortByKey(rs *relState, ops []*op) {
	if len(ops) < 2 || len(rs.keyCols) == 0 {
		return
	}
	if len(rs.keyCols) == 1 && isIntegerType(rs.types[rs.keyCols[0]]) {
		type keyed struct {
			k int64
			o *op
		}
		ks := make([]keyed, len(ops))
		ok := true
		for i, o := range ops {
			k, err := strconv.ParseInt(string(o.key[0].Data), 10, 64)
			if err != nil {
				ok = false
				break
			}
			ks[i] = keyed{k, o}
		}
		if ok {
			slices.SortFunc(ks, func(a, b keyed) int { return cmp.Compare(a.k, b.k) })
			for i := range ks {
				ops[i] = ks[i].o
			}
			return
		}
	}
	slices.SortFunc(ops, func(a, b *op) int {
		for i := range a.key {
			if c := bytes.Compare(a.key[i].Data, b.key[i].Data); c != 0 {
				return c
			}
		}
		return 0
	})
}

func isIntegerType(t string) bool {
	switch t {
	case "smallint", "integer", "bigint":
		return true
	}
	return false
}
