package postgres

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/cutover/cutover/internal/config"
)

// Logical replication does not carry sequences: green's stay where the
// copy left them (at their start) while blue's advance. They are synced at
// cutover, after the fence, when blue's can no longer move: read blue's,
// set green's to match or exceed.

// SequenceSync is what SyncSequences did to one sequence.
type SequenceSync struct {
	Sequence TableName
	// Blue and Green are the next values each side would hand out before
	// the sync (Green's after it is max of the two).
	Blue, Green int64
	Set         bool // green was behind and was moved
}

// sequence is a sequence in scope.
type sequence struct {
	name      TableName
	increment int64
}

const sequencesSQL = `
SELECT n.nspname, c.relname, s.seqincrement,
	coalesce((SELECT dn.nspname || '.' || dc.relname FROM pg_depend d
		JOIN pg_class dc ON dc.oid = d.refobjid JOIN pg_namespace dn ON dn.oid = dc.relnamespace
		WHERE d.classid = 'pg_class'::regclass AND d.objid = s.seqrelid AND d.refclassid = 'pg_class'::regclass
			AND d.deptype IN ('a', 'i') LIMIT 1), '')
FROM pg_sequence s
JOIN pg_class c ON c.oid = s.seqrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname <> ALL ($1::text[]) AND n.nspname NOT LIKE 'pg\_%'
ORDER BY 1, 2`

// scopedSequences lists blue's sequences in scope: those owned by (serial,
// identity) a table in scope, and unowned ones in a schema that holds a
// table in scope or is named in scope.schemas.
func scopedSequences(ctx context.Context, blue *pgxpool.Pool, scope config.Scope) ([]sequence, error) {
	all, err := listTables(ctx, blue)
	if err != nil {
		return nil, err
	}
	tables, problems := resolveScope(all, scope)
	if len(problems) > 0 {
		return nil, fmt.Errorf("scope: %s", strings.Join(problems, "; "))
	}
	inScope := map[string]bool{}
	schemas := map[string]bool{}
	for _, t := range tables {
		inScope[t.Name.String()] = true
		schemas[t.Name.Schema] = true
	}
	for _, s := range scope.Schemas {
		schemas[s] = true
	}
	rows, err := blue.Query(ctx, sequencesSQL, systemSchemas)
	if err != nil {
		return nil, fmt.Errorf("blue: list sequences: %w", err)
	}
	var out []sequence
	for rows.Next() {
		var s sequence
		var owner string
		if err := rows.Scan(&s.name.Schema, &s.name.Name, &s.increment, &owner); err != nil {
			rows.Close()
			return nil, fmt.Errorf("blue: list sequences: %w", err)
		}
		if (owner != "" && inScope[owner]) || (owner == "" && schemas[s.name.Schema]) {
			out = append(out, s)
		}
	}
	return out, rows.Err()
}

// readSequence returns the next value the sequence would hand out.
func readSequence(ctx context.Context, q queryer, s sequence) (next, last int64, called bool, err error) {
	err = q.QueryRow(ctx, `SELECT last_value, is_called FROM `+s.name.Quoted()).Scan(&last, &called)
	if err != nil {
		return 0, 0, false, err
	}
	next = last
	if called {
		next = last + s.increment
	}
	return next, last, called, nil
}

// SyncSequences sets every sequence in scope on green to at least blue's
// value; it never moves one backwards (green may have handed out values
// of its own). Call it after the fence, when blue's sequences are still.
func (r *Replicator) SyncSequences(ctx context.Context) error {
	_, err := r.SyncSequencesReport(ctx)
	return err
}

// SyncSequencesReport is SyncSequences, saying what it did.
func (r *Replicator) SyncSequencesReport(ctx context.Context) ([]SequenceSync, error) {
	if r.blue == nil || r.green == nil {
		return nil, fmt.Errorf("sync sequences: replicator not started")
	}
	seqs, err := scopedSequences(ctx, r.blue, r.opts.Pair.Scope)
	if err != nil {
		return nil, err
	}
	var out []SequenceSync
	var missing []string
	for _, s := range seqs {
		bnext, blast, bcalled, err := readSequence(ctx, r.blue, s)
		if err != nil {
			return out, fmt.Errorf("blue: read sequence %s: %w", s.name, err)
		}
		res := SequenceSync{Sequence: s.name, Blue: bnext}
		err = pgx.BeginFunc(ctx, r.green, func(tx pgx.Tx) error {
			// LOCK TABLE refuses sequences (42809), so a transaction-scoped
			// advisory lock keeps two syncs from racing each other. Nothing
			// else calls setval on green before the flip.
			if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtext('cutover.sequence_sync'), hashtext($1))`, s.name.String()); err != nil {
				return err
			}
			gnext, _, _, err := readSequence(ctx, tx, s)
			if err != nil {
				return err
			}
			res.Green = gnext
			behind := gnext < bnext
			if s.increment < 0 {
				behind = gnext > bnext
			}
			if !behind {
				return nil
			}
			if _, err := tx.Exec(ctx, `SELECT setval($1::regclass, $2, $3)`, s.name.Quoted(), blast, bcalled); err != nil {
				return err
			}
			res.Set = true
			res.Green = bnext
			return nil
		})
		if err != nil {
			if undefinedTable(err) {
				missing = append(missing, s.name.String())
				continue
			}
			return out, fmt.Errorf("green: sync sequence %s: %w", s.name, err)
		}
		if res.Set {
			r.log.Info("sequence synced", zap.Stringer("sequence", s.name), zap.Int64("next", res.Green))
		}
		out = append(out, res)
	}
	if len(missing) > 0 {
		return out, fmt.Errorf("green lacks sequence(s) %s that blue's tables in scope use", strings.Join(missing, ", "))
	}
	return out, nil
}
