// Package fencing stops application writes on one side of a pair for the
// cutover's write outage, and proves afterwards that nothing written before
// the fence is missing on the other side.
//
// The outage starts at the fence. Everything that can run before it (checks,
// connection setup, lag settling) runs before it; Window bounds what runs
// inside it and lifts the fence when the bound is exceeded.
package fencing

import (
	"context"
	"errors"
	"time"
)

// Errors returned by fences. Callers branch on them with errors.Is.
var (
	// ErrStaleEpoch: the side has seen a higher epoch (fencing token) than
	// the one presented, so the caller is a deposed leader and must stop.
	ErrStaleEpoch = errors.New("stale epoch")
	// ErrWindowExceeded: the fence was held longer than max_fence_window;
	// the fence has been lifted and the step must abort.
	ErrWindowExceeded = errors.New("fence window exceeded")
	// ErrNotFenced: an operation that needs the fence found it lifted.
	ErrNotFenced = errors.New("not fenced")
	// ErrHoldLost: the drain's hold on the fenced side (Drained.Held) is
	// no longer there, so writers outside the fence may have written
	// since; the gate must not open on its strength.
	ErrHoldLost = errors.New("hold lost")
)

// Fencer fences one database. Implementations keep their state (the epoch
// they last saw, what they changed) on the fenced database itself, so that
// any agent can finish or undo a fence begun by another.
//
// Every method may block on the database and honours ctx. Every method is
// idempotent for the same epoch and refuses a lower one with ErrStaleEpoch.
type Fencer interface {
	// Prepare does everything that can be done before the outage starts:
	// connects, checks privileges, resolves roles and tables, creates the
	// fencer's bookkeeping. It changes no application-visible state.
	Prepare(ctx context.Context) error
	// Fence stops new application writes at once, in existing sessions as
	// well as new ones. Reads keep working. It does not wait for in-flight
	// write transactions: Drain does.
	Fence(ctx context.Context, epoch uint64) error
	// Drain waits up to grace for in-flight write transactions to end,
	// terminates those that remain, then writes the catch-up marker and
	// returns it with the position taken after it. It must be called after
	// Fence with the same epoch.
	Drain(ctx context.Context, epoch uint64, grace time.Duration) (Drained, error)
	// Unfence restores exactly the state that Fence changed, and releases
	// any hold. Calling it when not fenced is a no-op that still records
	// the epoch.
	Unfence(ctx context.Context, epoch uint64) error
	// Release lets go of the writers that the drain kept waiting
	// (Drained.Held): they fail on the fence, or go on if it was lifted. A
	// no-op when nothing is held. It changes no fence state, so it cannot
	// fail in a way the caller could act on.
	Release(ctx context.Context)
	// HeldBreaches lists the sessions that wait on the hold to write and
	// that the fence would not stop once released (roles outside it): a
	// breach caught before it lands. Empty when nothing is held.
	HeldBreaches(ctx context.Context) ([]Session, error)
	// State reports whether the side is fenced and at which epoch.
	State(ctx context.Context) (State, error)
}

// Drained is what Drain did and the marker that proves catch-up.
type Drained struct {
	// Marker was written after every write transaction that began before
	// the fence had ended; once it is applied on the other side, so is every
	// write acknowledged before the fence.
	Marker Marker
	// Terminated lists the sessions ended because they still held write
	// locks when the grace period ran out.
	Terminated []Session
	// Waited is how long the drain waited for in-flight writers.
	Waited time.Duration
	// Held says the fenced writers are kept waiting, not refused, until
	// Release (or Unfence): the engine can hold them at no cost to the
	// catch-up that follows.
	Held bool
}

// Marker is a unique row written on the fenced side.
type Marker struct {
	Nonce string
	Epoch uint64
	// Position is the fenced side's log position after the marker committed
	// (a PostgreSQL LSN, a binlog GTID set...), in the engine's text form.
	Position string
}

// Session is a database session that the drain terminated.
type Session struct {
	PID         int32
	User        string
	Application string
	State       string
	// XactAge is how long its transaction had been open.
	XactAge time.Duration
}

// State is a side's fence state.
type State struct {
	Fenced bool
	Epoch  uint64
	// Since is when the current fence was put up (zero when not fenced).
	Since time.Time
	// Plan and Pair own the fence: the last to put it up (or, unfenced,
	// the last that did). Empty when unknown.
	Plan, Pair string
}
