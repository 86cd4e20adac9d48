// Package replication says what a change stream from blue into green is, what
// lag is and what schema drift is, independently of the engine. Each engine
// implements it in a subpackage named after the engine
// (replication/postgres).
//
// The plan driver on the leader runs one Replicator per pair: it starts it
// when the plan enters `copying`, watches Lag to decide `ready`, syncs
// sequences and compares schemas before the fence, waits for the fence
// marker through the stream (engine-specific: positions are engine types),
// and calls Cleanup on abort or completion so that nothing pins the source's
// log.
package replication

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Errors returned by replicators. Callers branch on them with errors.Is.
var (
	// ErrSuperseded: another applier stored a position at or beyond the
	// batch this one was about to apply. This replicator is a deposed
	// leader's and has stopped without applying anything twice.
	ErrSuperseded = errors.New("replication superseded by another applier")
	// ErrStopped: the replicator was stopped (or its context ended) before
	// the call could complete.
	ErrStopped = errors.New("replicator stopped")
	// ErrSlotLost: green holds an applied position but the source has no
	// slot any more (dropped by hand, or by cleanup): the changes since
	// cannot be replayed and green must be copied again from scratch.
	ErrSlotLost = errors.New("replication slot lost")
	// ErrPrecheck is matched by every *PrecheckError.
	ErrPrecheck = errors.New("replication pre-check failed")
)

// Replicator keeps green an exact copy of blue for the tables in scope.
//
// Start runs the pre-checks (failing without creating anything when one
// fails), creates what replication needs, copies, then streams until Stop or
// until the context given to Start ends. The methods below may be called
// from any goroutine once Start has returned nil.
type Replicator interface {
	// Start pre-checks, prepares and launches replication; it returns once
	// the work runs in the background (copying or streaming). A
	// *PrecheckError (matching ErrPrecheck) means nothing was created.
	Start(ctx context.Context) error
	// Stop ends the background work and waits for it. Already applied
	// changes stay applied; the next Start resumes exactly after them.
	// Safe to call more than once and before Start.
	Stop(ctx context.Context) error
	// Done is closed when the background work has ended; Err then says why
	// (nil after Stop).
	Done() <-chan struct{}
	Err() error
	// Pause holds the applier back (the stream backs up on the source);
	// Resume lets it go on. Both return at once and are idempotent.
	Pause()
	Resume()
	// Lag measures how far green is behind blue now. It queries the source.
	Lag(ctx context.Context) (Lag, error)
	// SyncSequences sets every sequence in scope on green to at least its
	// value on blue; it never moves a sequence backwards.
	SyncSequences(ctx context.Context) error
	// CompareSchemas lists every difference between blue's and green's
	// tables in scope (columns, types, nullability, primary keys).
	CompareSchemas(ctx context.Context) ([]Difference, error)
	// Cleanup stops replication and drops everything it made on the source
	// (slot, publication); it is idempotent.
	Cleanup(ctx context.Context) error
}

// Lag is how far green is behind blue at one moment.
type Lag struct {
	// Bytes is the source's current log position minus the last position
	// known applied on green (0 when caught up).
	Bytes int64
	// Delay is how long green has been behind: 0 when the newest heartbeat
	// written on blue has been applied, else the age of the oldest
	// heartbeat not applied yet (accurate to the heartbeat interval).
	Delay time.Duration
	// CommitAge is the age of the last applied source commit (by the
	// source's clock); it grows while the source is idle and is only
	// meaningful under load.
	CommitAge time.Duration
	// Source and Applied are the two positions, in the engine's text form.
	Source, Applied string
	At              time.Time
}

// ChangeKind is the kind of a row change.
type ChangeKind byte

// Row change kinds.
const (
	Insert   ChangeKind = 'I'
	Update   ChangeKind = 'U'
	Delete   ChangeKind = 'D'
	Truncate ChangeKind = 'T'
)

func (k ChangeKind) String() string {
	switch k {
	case Insert:
		return "insert"
	case Update:
		return "update"
	case Delete:
		return "delete"
	case Truncate:
		return "truncate"
	}
	return fmt.Sprintf("ChangeKind(%d)", byte(k))
}

// Change is one applied row change, as reported to breach detection.
type Change struct {
	// Table is schema.table.
	Table string
	Kind  ChangeKind
	// Key is the row's primary key (replica identity) values in key order,
	// in the engine's text format; nil for Truncate (the whole table) and
	// for tables replicated with a full-row identity.
	Key []string
	// Position is the end of the source transaction that made the change,
	// in the engine's text form.
	Position string
	// CommitTime is the source commit time.
	CommitTime time.Time
}

// DifferenceKind classifies a schema difference.
type DifferenceKind string

// Schema difference kinds.
const (
	MissingTable   DifferenceKind = "missing_table"
	MissingColumn  DifferenceKind = "missing_column"
	ExtraColumn    DifferenceKind = "extra_column"
	TypeMismatch   DifferenceKind = "type_mismatch"
	NullMismatch   DifferenceKind = "nullability_mismatch"
	KeyMismatch    DifferenceKind = "primary_key_mismatch"
	DefaultMissing DifferenceKind = "generated_mismatch"
)

// Difference is one difference between blue's and green's schema.
type Difference struct {
	Kind   DifferenceKind
	Table  string
	Column string
	Blue   string
	Green  string
}

func (d Difference) String() string {
	switch d.Kind {
	case MissingTable:
		return fmt.Sprintf("table %s is missing on green", d.Table)
	case MissingColumn:
		return fmt.Sprintf("column %s.%s (%s) is missing on green", d.Table, d.Column, d.Blue)
	case ExtraColumn:
		return fmt.Sprintf("column %s.%s (%s) exists only on green", d.Table, d.Column, d.Green)
	case TypeMismatch:
		return fmt.Sprintf("column %s.%s is %s on blue but %s on green", d.Table, d.Column, d.Blue, d.Green)
	}
	col := d.Table
	if d.Column != "" {
		col += "." + d.Column
	}
	return fmt.Sprintf("%s: %s: blue %s, green %s", strings.ReplaceAll(string(d.Kind), "_", " "), col, d.Blue, d.Green)
}

// PrecheckError reports a pre-check that failed before anything was
// created. Problems lists every problem found, each naming what to fix.
type PrecheckError struct {
	Side     string // "blue", "green" or "" for both
	Problems []string
}

func (e *PrecheckError) Error() string {
	prefix := "pre-check failed"
	if e.Side != "" {
		prefix += " on " + e.Side
	}
	if len(e.Problems) == 1 {
		return prefix + ": " + e.Problems[0]
	}
	return prefix + ":\n  - " + strings.Join(e.Problems, "\n  - ")
}

// Is makes errors.Is(err, ErrPrecheck) true.
func (e *PrecheckError) Is(target error) bool { return target == ErrPrecheck }

// Progress is the initial copy's progress.
type Progress struct {
	TablesTotal, TablesDone int
	// Rows and Bytes copied so far; RowsTotal and BytesTotal are the
	// source's estimates (pg_class), so ETA is an estimate too.
	Rows, RowsTotal   int64
	Bytes, BytesTotal int64
	Elapsed, ETA      time.Duration
}
