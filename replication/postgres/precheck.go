package postgres

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/cutover/cutover/replication"
)

// checked is what the pre-checks found out and the rest of Start uses.
type checked struct {
	tables     []*tableInfo
	slotExists bool
	// applied is green's stored row for the slot, if any.
	applied *appliedRow
}

type appliedRow struct {
	LSN    string
	Copied bool
}

// precheck runs every check that can fail before anything is created, on
// both sides, and reports all problems of a side at once. It only reads.
func (r *Replicator) precheck(ctx context.Context) (*checked, error) {
	out := &checked{}
	var blueProblems []string

	var walLevel string
	if err := r.blue.QueryRow(ctx, `SELECT current_setting('wal_level')`).Scan(&walLevel); err != nil {
		return nil, fmt.Errorf("blue: read wal_level: %w", err)
	}
	if walLevel != "logical" {
		blueProblems = append(blueProblems, fmt.Sprintf("wal_level is %q, logical decoding needs \"logical\": set wal_level = logical in postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart the server", walLevel))
	}

	var (
		role                            string
		super, repl, canCreate          bool
		maxSlots, usedSlots, maxSenders int
		slotExists                      bool
		slotPlugin                      string
	)
	err := r.blue.QueryRow(ctx, `
		SELECT current_user, r.rolsuper, r.rolreplication,
			has_database_privilege(current_database(), 'CREATE'),
			current_setting('max_replication_slots')::int,
			(SELECT count(*) FROM pg_replication_slots)::int,
			current_setting('max_wal_senders')::int,
			EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1),
			coalesce((SELECT plugin FROM pg_replication_slots WHERE slot_name = $1), '')
		FROM pg_roles r WHERE r.rolname = current_user`, r.name).Scan(
		&role, &super, &repl, &canCreate, &maxSlots, &usedSlots, &maxSenders, &slotExists, &slotPlugin)
	if err != nil {
		return nil, fmt.Errorf("blue: read role and slots: %w", err)
	}
	out.slotExists = slotExists
	if !super && !repl {
		blueProblems = append(blueProblems, fmt.Sprintf("role %q may not replicate: ALTER ROLE %s REPLICATION (or connect as a superuser)", role, quoteIdent(role)))
	}
	if !super && !canCreate {
		blueProblems = append(blueProblems, fmt.Sprintf("role %q lacks CREATE on the database, needed for the publication and the cutover schema: GRANT CREATE ON DATABASE ... TO %s", role, quoteIdent(role)))
	}
	if slotExists && slotPlugin != "pgoutput" {
		blueProblems = append(blueProblems, fmt.Sprintf("a slot named %s exists with plugin %q, not pgoutput: drop it (cutover cleanup) or rename the plan", r.name, slotPlugin))
	}
	if !slotExists && usedSlots >= maxSlots {
		blueProblems = append(blueProblems, fmt.Sprintf("no free replication slot: %d of max_replication_slots = %d are used (see pg_replication_slots; raise max_replication_slots and restart, or drop unused slots)", usedSlots, maxSlots))
	}
	if maxSenders == 0 {
		blueProblems = append(blueProblems, "max_wal_senders is 0: raise it and restart the server")
	}

	tables, _, problems, err := scopeTables(ctx, r.blue, r.opts.Pair.Scope)
	if err != nil {
		return nil, fmt.Errorf("blue: %w", err)
	}
	blueProblems = append(blueProblems, problems...)
	var noKey, notOwned []string
	for _, t := range tables {
		switch {
		case t.Identity == 'f' || t.Identity == 'i':
		case t.Identity == 'd' && t.HasPK:
		default:
			noKey = append(noKey, t.Name.String())
		}
	}
	if len(noKey) > 0 {
		blueProblems = append(blueProblems, fmt.Sprintf("tables without a primary key or replica identity cannot replicate updates and deletes: %s (add a primary key, or ALTER TABLE ... REPLICA IDENTITY FULL)", strings.Join(noKey, ", ")))
	}
	if !super && len(tables) > 0 {
		rows, err := r.blue.Query(ctx, `SELECT t FROM unnest($1::text[]) t WHERE NOT pg_has_role(current_user, (SELECT relowner FROM pg_class WHERE oid = t::regclass), 'USAGE')`, quotedNames(tables))
		if err != nil {
			return nil, fmt.Errorf("blue: check table ownership: %w", err)
		}
		notOwned, err = pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			return nil, fmt.Errorf("blue: check table ownership: %w", err)
		}
		display := map[string]string{}
		for _, t := range tables {
			display[t.Name.Quoted()] = t.Name.String()
		}
		for i, q := range notOwned {
			notOwned[i] = display[q]
		}
		if len(notOwned) > 0 {
			blueProblems = append(blueProblems, fmt.Sprintf("role %q does not own %s: a publication needs the tables' owner or a superuser", role, strings.Join(notOwned, ", ")))
		}
	}
	if len(blueProblems) > 0 {
		return nil, &replication.PrecheckError{Side: "blue", Problems: blueProblems}
	}
	out.tables = tables

	// Green.
	var greenProblems []string
	var greenSuper bool
	if err := r.green.QueryRow(ctx, `SELECT rolsuper FROM pg_roles WHERE rolname = current_user`).Scan(&greenSuper); err != nil {
		return nil, fmt.Errorf("green: read role: %w", err)
	}
	if !greenSuper {
		// session_replication_role = replica (no triggers, no foreign-key
		// checks while applying, as native apply does) is superuser-only.
		greenProblems = append(greenProblems, "the green role is not a superuser: applying changes needs session_replication_role = replica, which only a superuser may set")
	}
	greenAll, err := listTables(ctx, r.green)
	if err != nil {
		return nil, fmt.Errorf("green: %w", err)
	}
	for _, d := range compareTables(tables, greenAll) {
		greenProblems = append(greenProblems, d.String())
	}
	if len(greenProblems) == 0 {
		row := &appliedRow{}
		err := r.green.QueryRow(ctx, `SELECT lsn::text, copied_at IS NOT NULL FROM cutover.applied WHERE slot = $1`, r.name).Scan(&row.LSN, &row.Copied)
		var pgErr interface{ SQLState() string }
		switch {
		case err == nil:
			out.applied = row
		case errors.Is(err, pgx.ErrNoRows):
		case errors.As(err, &pgErr) && pgErr.SQLState() == "42P01": // no cutover.applied yet
		default:
			return nil, fmt.Errorf("green: read applied position: %w", err)
		}
		if out.applied == nil && !slotExists && !r.opts.SkipCopy {
			// A first copy truncates nothing it did not fill: green's
			// tables must start empty.
			nonEmpty, err := nonEmptyTables(ctx, r.green, tables)
			if err != nil {
				return nil, fmt.Errorf("green: %w", err)
			}
			if len(nonEmpty) > 0 {
				onlyOurs, err := filledByCutoverSince(ctx, r.green, r.opts.GreenFencedSince)
				if err != nil {
					return nil, fmt.Errorf("green: %w", err)
				}
				if onlyOurs {
					r.log.Warn("green's tables hold rows that only cutover wrote (an earlier plan's copy) while green stayed fenced; the copy empties them", zap.Strings("tables", nonEmpty), zap.Time("green_fenced_since", r.opts.GreenFencedSince))
				} else {
					greenProblems = append(greenProblems, fmt.Sprintf("tables already hold rows on green, and the initial copy needs them empty: %s (TRUNCATE them on green, or check that the green DSN points where you think; rows left by an earlier plan's copy are emptied by the copy only while green has stayed fenced since that copy began)", strings.Join(nonEmpty, ", ")))
				}
			}
		}
		if out.applied != nil && out.applied.Copied && !slotExists {
			return nil, fmt.Errorf("%w: green has applied %s up to %s but blue has no slot %s; drop the tables' rows on green and cutover.applied's row (cutover cleanup --forget) and copy again", replication.ErrSlotLost, r.name, out.applied.LSN, r.name)
		}
	}
	if len(greenProblems) > 0 {
		return nil, &replication.PrecheckError{Side: "green", Problems: greenProblems}
	}
	return out, nil
}

func quotedNames(tables []*tableInfo) []string {
	out := make([]string, len(tables))
	for i, t := range tables {
		out[i] = t.Name.Quoted()
	}
	return out
}

func nonEmptyTables(ctx context.Context, q *pgxpool.Pool, tables []*tableInfo) ([]string, error) {
	var out []string
	for _, t := range tables {
		var any bool
		if err := q.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM `+t.Name.Quoted()+`)`).Scan(&any); err != nil {
			return nil, fmt.Errorf("check %s is empty: %w", t.Name, err)
		}
		if any {
			out = append(out, t.Name.String())
		}
	}
	return out, nil
}

// compareTables lists how green's tables differ from blue's for the tables
// in scope: missing tables and columns, type and nullability differences,
// different primary keys. Columns extra on green are differences only when
// they are NOT NULL without being generated (an insert from blue would
// fail); nullable extra columns are reported too, as drift.
func compareTables(blue []*tableInfo, green map[TableName]*tableInfo) []replication.Difference {
	var out []replication.Difference
	for _, b := range blue {
		g, ok := green[b.Name]
		if !ok {
			out = append(out, replication.Difference{Kind: replication.MissingTable, Table: b.Name.String()})
			continue
		}
		gcols := map[string]column{}
		for _, c := range g.Columns {
			gcols[c.Name] = c
		}
		seen := map[string]bool{}
		for _, bc := range b.Columns {
			seen[bc.Name] = true
			gc, ok := gcols[bc.Name]
			switch {
			case !ok:
				out = append(out, replication.Difference{Kind: replication.MissingColumn, Table: b.Name.String(), Column: bc.Name, Blue: bc.Type})
			case gc.Type != bc.Type:
				out = append(out, replication.Difference{Kind: replication.TypeMismatch, Table: b.Name.String(), Column: bc.Name, Blue: bc.Type, Green: gc.Type})
			case gc.NotNull != bc.NotNull:
				out = append(out, replication.Difference{Kind: replication.NullMismatch, Table: b.Name.String(), Column: bc.Name, Blue: nullText(bc.NotNull), Green: nullText(gc.NotNull)})
			case gc.Generated != bc.Generated:
				out = append(out, replication.Difference{Kind: replication.DefaultMissing, Table: b.Name.String(), Column: bc.Name, Blue: genText(bc.Generated), Green: genText(gc.Generated)})
			}
		}
		var extra []string
		for _, gc := range g.Columns {
			if !seen[gc.Name] {
				extra = append(extra, gc.Name)
				out = append(out, replication.Difference{Kind: replication.ExtraColumn, Table: b.Name.String(), Column: gc.Name, Green: gc.Type})
			}
		}
		if bk, gk := keyText(b), keyText(g); bk != gk {
			out = append(out, replication.Difference{Kind: replication.KeyMismatch, Table: b.Name.String(), Blue: bk, Green: gk})
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Table < out[j].Table })
	return out
}

func nullText(notNull bool) string {
	if notNull {
		return "NOT NULL"
	}
	return "NULL"
}

func genText(g bool) string {
	if g {
		return "generated"
	}
	return "not generated"
}

func keyText(t *tableInfo) string {
	var key []string
	for i := 1; ; i++ {
		found := false
		for _, c := range t.Columns {
			if c.Key == i {
				key = append(key, c.Name)
				found = true
			}
		}
		if !found {
			break
		}
	}
	if len(key) == 0 {
		return "(none)"
	}
	return "(" + strings.Join(key, ", ") + ")"
}

// filledByCutoverSince reports whether everything in green's tables was
// written by cutover while green stayed fenced: a copy began on green
// (recorded in cutover.copies once its pre-check had found the tables
// empty), the first one after fencedSince, and green's fence has been up
// since then.
func filledByCutoverSince(ctx context.Context, green *pgxpool.Pool, fencedSince time.Time) (bool, error) {
	if fencedSince.IsZero() {
		return false, nil
	}
	var ours bool
	err := green.QueryRow(ctx, `SELECT count(*) > 0 AND min(began_at) >= $1 FROM cutover.copies`, fencedSince).Scan(&ours)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42P01" {
		return false, nil // no copy ever began here
	}
	if err != nil {
		return false, fmt.Errorf("read cutover.copies: %w", err)
	}
	return ours, nil
}
