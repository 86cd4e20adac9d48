package agent

import (
	"errors"
	"fmt"
)

// Errors returned by the agent. Callers branch on them with errors.Is; the
// HTTP API maps each to a status code (see api.go).
var (
	// ErrNotLeader: the call must run on the leader and this node is not it
	// (or stopped being it while waiting). Nothing was committed.
	ErrNotLeader = errors.New("not the leader")
	// ErrNoLeader: the cluster has no known leader right now (an election is
	// in progress, or this node cannot reach a majority). Retry later.
	ErrNoLeader = errors.New("no leader")
	// ErrLeadershipLost: leadership was lost after the command was handed to
	// Raft; it may or may not have been committed. Read the state before
	// retrying.
	ErrLeadershipLost = errors.New("leadership lost: the command may or may not have been committed")
	// ErrStaleEpoch: the command names an epoch (fencing token) that is no
	// longer the plan's current one; whoever sent it acted on an old view,
	// typically a deposed leader or a racing operator.
	ErrStaleEpoch = errors.New("stale epoch")
	// ErrIllegalTransition: the state machine refuses the phase change; the
	// *TransitionError that wraps it says why.
	ErrIllegalTransition = errors.New("illegal transition")
	// ErrPlanNotFound: no plan of that name in the replicated state.
	ErrPlanNotFound = errors.New("plan not found")
	// ErrPlanExists: a plan of that name already exists.
	ErrPlanExists = errors.New("plan already exists")
	// ErrUnsupportedVersion: the command's format version is not one this
	// build understands; it is refused (the same way on every node running
	// this build) and recorded in the audit log.
	ErrUnsupportedVersion = errors.New("unsupported command version")
	// ErrInvalidCommand: the command is malformed (unknown op, missing
	// field, undecodable bytes).
	ErrInvalidCommand = errors.New("invalid command")
	// ErrStopped: the agent is shutting down.
	ErrStopped = errors.New("agent stopped")
	// ErrPermanent marks a driver error that retrying cannot heal (a
	// pre-check that refuses the schema, a spec the driver cannot run, a
	// table it cannot verify): the leader aborts the plan with the error as
	// its reason instead of retrying it forever. Drivers wrap such errors
	// with Permanent.
	ErrPermanent = errors.New("cannot be healed by retrying")
)

// Permanent marks err as one that retrying cannot heal: a Driver that
// returns it has its plan aborted (see ErrPermanent). Nil stays nil.
func Permanent(err error) error {
	if err == nil || errors.Is(err, ErrPermanent) {
		return err
	}
	return &permanentError{err: err}
}

type permanentError struct{ err error }

func (e *permanentError) Error() string { return e.err.Error() }
func (e *permanentError) Unwrap() []error {
	return []error{e.err, ErrPermanent}
}

// TransitionError is a phase change the state machine refused, with the
// reason. It matches ErrIllegalTransition with errors.Is.
type TransitionError struct {
	Plan   string
	From   Phase
	To     Phase
	Reason string
}

func (e *TransitionError) Error() string {
	return fmt.Sprintf("plan %s: %s -> %s refused: %s", e.Plan, e.From, e.To, e.Reason)
}

// Is makes errors.Is(err, ErrIllegalTransition) true.
func (e *TransitionError) Is(target error) bool { return target == ErrIllegalTransition }
