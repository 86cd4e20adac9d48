package agent

import (
	"fmt"
	"slices"
	"strings"
)

// Phase is where a plan stands. The order and the allowed moves are those of
// docs/design.md:
//
//	pending -> copying -> replicating -> ready -> fenced -> caught_up -> verified -> authorized -> switched -> done
//	   any phase up to authorized   -> aborted
//	   switched                     -> rolling_back -> rolled_back
type Phase string

// The phases of a plan.
const (
	// PhasePending: created, nothing done yet.
	PhasePending Phase = "pending"
	// PhaseCopying: the initial consistent copy of blue into green runs.
	PhaseCopying Phase = "copying"
	// PhaseReplicating: changes stream from blue to green; lag is measured.
	PhaseReplicating Phase = "replicating"
	// PhaseReady: lag has stayed under the threshold for the hold time and
	// every pre-check passed. Nothing application-visible has changed yet.
	PhaseReady Phase = "ready"
	// PhaseFenced: application writes on blue are stopped. The outage clock
	// runs from here.
	PhaseFenced Phase = "fenced"
	// PhaseCaughtUp: the fence marker written on blue has been read on green,
	// so every write acknowledged before the fence is on green.
	PhaseCaughtUp Phase = "caught_up"
	// PhaseVerified: row checksums agree on both sides.
	PhaseVerified Phase = "verified"
	// PhaseAuthorized: the gate is open; flip targets run with the epoch.
	PhaseAuthorized Phase = "authorized"
	// PhaseSwitched: green takes writes; reverse replication keeps the way
	// back open.
	PhaseSwitched Phase = "switched"
	// PhaseDone: the rollback window closed; the plan is complete.
	PhaseDone Phase = "done"
	// PhaseAborted: stopped before any target flipped; blue unfenced, nothing
	// flipped.
	PhaseAborted Phase = "aborted"
	// PhaseRollingBack: traffic is being moved back to blue.
	PhaseRollingBack Phase = "rolling_back"
	// PhaseRolledBack: blue serves again.
	PhaseRolledBack Phase = "rolled_back"
)

// Phases lists every phase, forward path first.
var Phases = []Phase{
	PhasePending, PhaseCopying, PhaseReplicating, PhaseReady, PhaseFenced,
	PhaseCaughtUp, PhaseVerified, PhaseAuthorized, PhaseSwitched, PhaseDone,
	PhaseAborted, PhaseRollingBack, PhaseRolledBack,
}

// forward is the main path; each phase's successor is the next element.
var forward = []Phase{
	PhasePending, PhaseCopying, PhaseReplicating, PhaseReady, PhaseFenced,
	PhaseCaughtUp, PhaseVerified, PhaseAuthorized, PhaseSwitched, PhaseDone,
}

// Valid reports whether p is a known phase.
func (p Phase) Valid() bool { return slices.Contains(Phases, p) }

// Terminal reports whether nothing can follow p.
func (p Phase) Terminal() bool {
	return p == PhaseDone || p == PhaseAborted || p == PhaseRolledBack
}

// GateOpen reports whether the gate is open in phase p (invariant 2: open
// only when the committed phase is authorized or switched).
func (p Phase) GateOpen() bool { return p == PhaseAuthorized || p == PhaseSwitched }

// abortable: any phase up to authorized. Authorized may abort because a
// flip that failed on every target must end cleanly (DESIGN: "a failed flip
// before any target succeeded aborts cleanly"); green is still fenced then,
// so even a tool that already acted on the open gate cannot make both sides
// writable. From switched on, only a rollback undoes the flip.
func (p Phase) abortable() bool {
	i := slices.Index(forward, p)
	return i >= 0 && i <= slices.Index(forward, PhaseAuthorized)
}

// Next lists the phases p may move to.
func (p Phase) Next() []Phase {
	var out []Phase
	for _, q := range Phases {
		if checkTransition(p, q) == "" {
			out = append(out, q)
		}
	}
	return out
}

// CheckTransition returns nil if a plan may move from one phase to the
// other, and a *TransitionError with the reason if not.
func CheckTransition(plan string, from, to Phase) error {
	if why := checkTransition(from, to); why != "" {
		return &TransitionError{Plan: plan, From: from, To: to, Reason: why}
	}
	return nil
}

// checkTransition returns "" when from -> to is legal, else the reason.
func checkTransition(from, to Phase) string {
	switch {
	case !to.Valid():
		return fmt.Sprintf("%q is not a phase (phases: %s)", to, phaseList(Phases))
	case !from.Valid():
		return fmt.Sprintf("current phase %q is unknown", from)
	case from == to:
		return "the plan is already in that phase"
	case from.Terminal():
		return fmt.Sprintf("%s is terminal: nothing follows it", from)
	}
	if to == PhaseAborted {
		if from.abortable() {
			return ""
		}
		return fmt.Sprintf("only a phase up to authorized can abort; from %s traffic has flipped (roll back instead)", from)
	}
	switch from {
	case PhaseSwitched:
		if to == PhaseDone || to == PhaseRollingBack {
			return ""
		}
		return fmt.Sprintf("after switched the plan can only complete (done) or roll back (rolling_back)")
	case PhaseRollingBack:
		if to == PhaseRolledBack {
			return ""
		}
		return "a rollback can only end in rolled_back"
	}
	if to == PhaseRollingBack || to == PhaseRolledBack {
		return "only a switched plan can roll back"
	}
	fi, ti := slices.Index(forward, from), slices.Index(forward, to)
	switch {
	case ti == fi+1:
		return ""
	case ti < fi:
		return fmt.Sprintf("phases only move forward; the next phase after %s is %s", from, forward[fi+1])
	default:
		return fmt.Sprintf("skips %s; the next phase after %s is %s", phaseList(forward[fi+1:ti]), from, forward[fi+1])
	}
}

func phaseList(ps []Phase) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = string(p)
	}
	return strings.Join(s, ", ")
}
