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
	coalesce((SELECT d.refobjid::int8 FROM pg_depend d
		WHERE d.classid = 'pg_class'::regclass AND d.objid = s.seqrelid AND d.refclassid = 'pg_class'::regclass
			AND d.deptype IN ('a', 'i') LIMIT 1), 0)
FROM pg_sequence s
JOIN pg_class c ON c.oid = s.seqrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname <> ALL ($1::text[]) AND n.nspname NOT LIKE 'pg\_%'
ORDER BY 1, 2`

// scopedSequences lists blue's sequences in scope: those owned by (serial,
// identity) a table in scope, and unowned ones in a schema that holds a
// table in scope or is named in scope.schemas.
func scopedSequences(ctx context.Context, blue *pgxpool.Pool, scope config.Scope) ([]sequence, error) {
	_, set, err := resolveTables(ctx, blue, scope)
	if err != nil {
		return nil, err
	}
	// By OID, over every table in scope: a serial column of a partitioned
	// table is owned by the parent, not by its partitions.
	inScope := map[int64]bool{}
	schemas := map[string]bool{}
	for _, t := range set.All() {
		inScope[int64(t.OID)] = true
		schemas[t.Schema] = true
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
		var owner int64
		if err := rows.Scan(&s.name.Schema, &s.name.Name, &s.increment, &owner); err != nil {
			rows.Close()
			return nil, fmt.Errorf("blue: list sequences: %w", err)
		}
		if (owner != 0 && inScope[owner]) || (owner == 0 && schemas[s.name.Schema]) {
			out = append(out, s)
		}
	}
	return out, rows.Err()
}

// ResolveSequences finds the sequences in scope on blue now, so that a
// SyncSequences inside the write outage does not spend its catalog
// queries there. The drift check before the fence has run by then, so the
// set holds; a sequence dropped since is skipped.
func (r *Replicator) ResolveSequences(ctx context.Context) error {
	if r.blue == nil {
		return fmt.Errorf("resolve sequences: replicator not started")
	}
	seqs, err := scopedSequences(ctx, r.blue, r.opts.Pair.Scope)
	if err != nil {
		return err
	}
	r.seqMu.Lock()
	r.seqs = seqs
	r.seqMu.Unlock()
	return nil
}

// SyncSequences sets every sequence in scope on green to at least blue's
// value; it never moves one backwards (green may have handed out values
// of its own). Call it after the fence, when blue's sequences are still.
func (r *Replicator) SyncSequences(ctx context.Context) error {
	_, err := r.SyncSequencesReport(ctx)
	return err
}

// SyncSequencesReport is SyncSequences, saying what it did. It costs one
// round trip to each side whatever the number of sequences (plus the
// catalog queries of ResolveSequences, unless that ran before).
func (r *Replicator) SyncSequencesReport(ctx context.Context) ([]SequenceSync, error) {
	if r.blue == nil || r.green == nil {
		return nil, fmt.Errorf("sync sequences: replicator not started")
	}
	r.seqMu.Lock()
	seqs := r.seqs
	r.seqMu.Unlock()
	if seqs == nil {
		var err error
		if seqs, err = scopedSequences(ctx, r.blue, r.opts.Pair.Scope); err != nil {
			return nil, err
		}
	}
	if len(seqs) == 0 {
		return nil, nil
	}
	byName := make(map[string]sequence, len(seqs))
	names := make([]string, len(seqs))
	for i, s := range seqs {
		names[i] = s.name.Quoted()
		byName[names[i]] = s
	}
	rows, err := r.blue.Query(ctx, `SELECT name, present, last_value, is_called FROM cutover.read_sequences($1::text[])`, pgx.QueryExecModeSimpleProtocol, names)
	if err != nil {
		return nil, fmt.Errorf("blue: read sequences: %w", err)
	}
	var (
		syncNames []string
		lasts     []int64
		calleds   []bool
		incs      []int64
		out       []SequenceSync
	)
	blueNext := map[string]int64{}
	for rows.Next() {
		var name string
		var present bool
		var last *int64
		var called *bool
		if err := rows.Scan(&name, &present, &last, &called); err != nil {
			rows.Close()
			return nil, fmt.Errorf("blue: read sequences: %w", err)
		}
		if !present || last == nil || called == nil {
			continue // dropped since it was resolved: nothing to sync
		}
		s := byName[name]
		next := *last
		if *called {
			next += s.increment
		}
		blueNext[name] = next
		syncNames = append(syncNames, name)
		lasts = append(lasts, *last)
		calleds = append(calleds, *called)
		incs = append(incs, s.increment)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("blue: read sequences: %w", err)
	}
	rows, err = r.green.Query(ctx, `SELECT name, present, next_before, moved FROM cutover.sync_sequences($1::text[], $2::bigint[], $3::boolean[], $4::bigint[])`,
		pgx.QueryExecModeSimpleProtocol, syncNames, lasts, calleds, incs)
	if err != nil {
		return nil, fmt.Errorf("green: sync sequences: %w", err)
	}
	var missing []string
	for rows.Next() {
		var name string
		var present, moved bool
		var before *int64
		if err := rows.Scan(&name, &present, &before, &moved); err != nil {
			rows.Close()
			return nil, fmt.Errorf("green: sync sequences: %w", err)
		}
		s := byName[name]
		if !present {
			missing = append(missing, s.name.String())
			continue
		}
		res := SequenceSync{Sequence: s.name, Blue: blueNext[name], Set: moved}
		if before != nil {
			res.Green = *before
		}
		if moved {
			res.Green = res.Blue
			r.log.Info("sequence synced", zap.Stringer("sequence", s.name), zap.Int64("next", res.Green))
		}
		out = append(out, res)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("green: sync sequences: %w", err)
	}
	if len(missing) > 0 {
		return out, fmt.Errorf("green lacks sequence(s) %s that blue's tables in scope use", strings.Join(missing, ", "))
	}
	return out, nil
}
