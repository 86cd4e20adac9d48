// Package engine is the seam between the plan driver (agent/driver) and the
// database engines: what the driver asks of a pair of databases, and one
// registry of the engines a binary carries.
//
// The interfaces are small and say what the driver consumes; abilities
// that only some engines have are optional interfaces the driver asks for
// with a type assertion (SequenceSyncer, SchemaComparer, ScopeChecker,
// PrivilegeChecker, LoginFencer, HoldingFencer), in the style of
// switch/target (a small Target, an optional Warmer). Positions in a
// stream are opaque to the driver (Position): only the engine that made
// one reads it.
//
// This package imports no database client: the driver that depends on it
// links none. An engine lives in its own package (engine/postgres) and is
// registered in cmd/cutover (Registry), the one place a binary chooses
// the engines it carries.
//
// Adding an engine: a package implementing Engine (and the optional
// interfaces it can honour), and one line in cmd/cutover's registry.
package engine

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/cutover/cutover/consistency"
	"github.com/cutover/cutover/fencing"
	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/replication"
)

// Engine opens the pairs of one database engine.
type Engine interface {
	// Open connects to both sides of a pair for one plan during one
	// leadership term, resolves its scope and prepares both fences:
	// everything that can happen before a fence happens here.
	Open(ctx context.Context, o PairOptions) (Pair, error)
	// Finalize releases what a finished plan holds on the pair's
	// databases (the replication's state in both directions) and, when
	// unfenceBlue, lifts blue's fence with epoch (a stale epoch is not an
	// error: a newer plan or leader owns it).
	Finalize(ctx context.Context, o PairOptions, unfenceBlue bool, epoch uint64) error
}

// PairOptions say which pair of which plan to open.
type PairOptions struct {
	Plan config.Plan
	Pair config.Pair
	// Facts are the plan's replicated facts (names recorded by an earlier
	// term, see Pair.NameFacts).
	Facts      map[string]string
	Logger     *zap.Logger
	Registerer prometheus.Registerer
}

// Colour names a side of a pair.
type Colour string

const (
	Blue  Colour = "blue"
	Green Colour = "green"
)

// Pair is one pair of databases open for a plan's term.
type Pair interface {
	// Fence is the side's fence, prepared by Open. Its sessions belong to
	// the fence alone.
	Fence(c Colour) Fencer
	// Forward makes the blue -> green stream, not started.
	Forward(o StreamOptions) (Stream, error)
	// Reverse makes the green -> blue stream, not started: it streams
	// from the slot's position when started (a resumed rollback path),
	// without a copy.
	Reverse(epoch uint64) (Stream, error)
	// PrepareReverse readies the green -> blue stream before the window
	// (connected, checked, its slot created), so that the flip only
	// records where it starts (PreparedStream.Start).
	PrepareReverse(ctx context.Context, epoch uint64) (PreparedStream, error)
	// Tables are the names verification compares (each partitioned
	// table as a whole).
	Tables() []string
	// NameFacts are the facts that name this pair's replication state,
	// recorded in the plan so that a later term and cleanup find it.
	NameFacts() map[string]string
	// Verifier is the pair's verifier, opened on first use and kept for
	// the term.
	Verifier(ctx context.Context) (Verifier, error)
	// Close releases the pair's connections; a fence stays as it is.
	Close()
}

// StreamOptions configure a forward stream.
type StreamOptions struct {
	Epoch uint64
	// GreenFencedSince is when green's fence went up (a copy may empty
	// what only cutover wrote there since).
	GreenFencedSince time.Time
	// OnRowChange is told every replicated row change, under the table
	// verification compares (a partition's under its root).
	OnRowChange func(table string, key []string)
}

// Position is a place in a stream, opaque to the driver: only the engine
// that returned it reads it.
type Position interface{ String() string }

// Status is what the driver reads of a stream.
type Status struct {
	Phase      string // engine's words, for status and the live view
	Streaming  bool   // the copy is done: changes stream
	CopiedRows int64
	Lag        replication.Lag
}

// Stream is one direction of replication.
type Stream interface {
	// Start connects, copies when needed, and streams in the background.
	Start(ctx context.Context) error
	Stop(ctx context.Context) error
	Done() <-chan struct{}
	Err() error
	Status() Status
	Lag(ctx context.Context) (replication.Lag, error)
	// WaitMarker waits until the fence marker with nonce has been applied
	// on the other side and returns its position in the stream.
	WaitMarker(ctx context.Context, nonce string) (Position, error)
	// ChangesAfter are the application changes the stream carried after
	// pos; complete is false when some were not recorded.
	ChangesAfter(pos Position) (changes []replication.Change, complete bool)
	// Cleanup drops what the stream holds on the databases.
	Cleanup(ctx context.Context) error
}

// PreparedStream is a reverse stream made ready before the window. The
// only legal next step is Start (or Stop): the types allow no other order.
type PreparedStream interface {
	// Start records the epoch and streams from the other side's position
	// now: what it applied before is skipped.
	Start(ctx context.Context, run context.Context, epoch uint64) (Stream, error)
	Stop(ctx context.Context) error
}

// SequenceSyncer is a stream that carries sequences outside the stream
// (PostgreSQL): resolved before the window, synced in it.
type SequenceSyncer interface {
	ResolveSequences(ctx context.Context) error
	SyncSequences(ctx context.Context) error
}

// SchemaComparer is a stream whose sides have schemas to compare.
type SchemaComparer interface {
	CompareSchemas(ctx context.Context) ([]replication.Difference, error)
}

// ScopeChecker is a pair whose scope can change under it (tables created or
// dropped): CheckScope lists how the scope resolved now differs from what
// fwd carries and what the fences cover; none is nil.
type ScopeChecker interface {
	CheckScope(ctx context.Context, fwd Stream) (problems []string, err error)
}

// PrivilegeChecker is a pair whose fenced roles have privileges: the
// differences between what they will have on green once unfenced and what
// they have on blue.
type PrivilegeChecker interface {
	PrivilegeParity(ctx context.Context) ([]string, error)
}

// Fencer stops application writes on one side.
type Fencer interface {
	Fence(ctx context.Context, epoch uint64) error
	// FenceDrain fences, drains the writes in flight and writes the
	// marker, holding the drain's lock when the engine can (HoldingFencer).
	FenceDrain(ctx context.Context, epoch uint64, grace time.Duration) (fencing.Drained, error)
	Unfence(ctx context.Context, epoch uint64) error
	State(ctx context.Context) (fencing.State, error)
	// Warm readies the fence's sessions before a window.
	Warm(ctx context.Context) error
	// WarmUnfence readies the unfence likewise.
	WarmUnfence(ctx context.Context) error
	// HeldBreaches lists writers of roles outside the fence waiting on
	// the drain's hold.
	HeldBreaches(ctx context.Context) ([]fencing.Session, error)
	// Release lets go of the drain's hold, if any.
	Release(ctx context.Context)
}

// HoldingFencer is a fence whose drain holds the fenced writers until the
// flip: the hold must still be there at the gate, and its release refuses
// what arrived since.
type HoldingFencer interface {
	CheckHold(ctx context.Context) error
	ReleaseRefusingAll(ctx context.Context) ([]fencing.Session, error)
}

// LoginFencer is a fence that can move from the grants to the logins, so
// that the unfence is flat in the number of tables. otherDatabases: the
// operator says the cluster serves these roles no other database.
type LoginFencer interface {
	ShiftToLogins(ctx context.Context, epoch uint64, settle time.Duration, otherDatabases bool) error
}

// Errors an engine's operations match (with errors.Is) for the driver's
// decisions.
var (
	// ErrScope: the pair's scope cannot be resolved (a table named that
	// does not exist, nothing in scope).
	ErrScope = errors.New("scope")
	// ErrLoginFenceUnavailable: the agent's role may not lock the logins;
	// retrying does not heal it.
	ErrLoginFenceUnavailable = errors.New("login fence unavailable")
	// ErrLoginFenceUnsafe: a login lock would reach other databases.
	ErrLoginFenceUnsafe = errors.New("login fence unsafe")
	// ErrLoginBreach: a session of a role whose login is locked is
	// connected.
	ErrLoginBreach = errors.New("login breach")
)

// Cleaner is an engine whose replication leaves state on the databases
// (slots, publications): the cleanup command drops a plan's for a pair, in
// both directions, and names what it dropped. It stops at the first error.
type Cleaner interface {
	Cleanup(ctx context.Context, o PairOptions) (dropped []string, err error)
}

// TableResolver is an engine whose pairs have a scope of tables: the
// names verification compares, resolved on blue by the rule the plan
// uses (the verify command's --config).
type TableResolver interface {
	VerifyTables(ctx context.Context, p config.Pair) ([]string, error)
}

// Verifier runs the verification passes of a pair. Each pass returns a
// report; an engine whose keys cannot be range-scanned implements them
// its own way.
type Verifier interface {
	// Online compares while the application writes, waiting for green to
	// apply past where blue was read.
	Online(ctx context.Context, dirty *consistency.DirtySet) (*consistency.Report, error)
	// Refresh re-checks online what dirty holds.
	Refresh(ctx context.Context, dirty *consistency.DirtySet) (*consistency.Report, error)
	// Dirty compares, inside the fence, what dirty holds.
	Dirty(ctx context.Context, dirty *consistency.DirtySet) (*consistency.Report, error)
	Full(ctx context.Context) (*consistency.Report, error)
	Progress() consistency.Progress
}

// Registry is the engines a binary carries, by name.
type Registry map[config.Engine]Engine

// Lookup returns the pair's engine, or an error naming the engines carried.
func (r Registry) Lookup(e config.Engine) (Engine, error) {
	if eng, ok := r[e]; ok {
		return eng, nil
	}
	return nil, fmt.Errorf("engine %s: %w (it carries %s pairs only)", e, ErrUnsupported, r.names())
}

// ErrUnsupported: no registered engine carries the pair.
var ErrUnsupported = errors.New("not supported by the plan driver")

func (r Registry) names() string {
	var out []string
	for e := range r {
		out = append(out, string(e))
	}
	sort.Strings(out)
	if len(out) == 0 {
		return "no"
	}
	return strings.Join(out, ", ")
}
