// Package target flips traffic from one colour to the other when the gate
// opens: a Redis routing key (package redistarget), an HTTP webhook, a
// command, or a PgBouncer database entry (package pgbouncer; paused through
// the window: see Pauser). This package links no database client: the plan
// driver depends on it; package targets builds a target from its config.
//
// Every flip carries the plan's epoch (fencing token). Targets that keep
// state refuse an epoch lower than one they have seen, so a deposed leader
// cannot flip back; every target is idempotent for the same epoch, so a new
// leader may retry a flip that may or may not have happened.
package target

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
)

// ErrStaleEpoch: the target has seen a higher epoch than the flip carries.
var ErrStaleEpoch = errors.New("stale epoch")

// Flip is what every target is told.
type Flip struct {
	Plan  string `json:"plan"`
	From  string `json:"from"`
	To    string `json:"to"`
	Epoch uint64 `json:"epoch"`
	// Positions are the log positions at which each pair was proven caught
	// up, keyed by pair name.
	Positions map[string]string `json:"positions,omitempty"`
	// Report links to the consistency report, when one was written.
	Report string    `json:"report,omitempty"`
	At     time.Time `json:"at"`
}

// Target is one place where traffic is switched.
//
// Flip may block (network, a child process) and honours ctx. It must be
// idempotent for the same epoch and must refuse a lower epoch than one it has
// applied, when it can know (ErrStaleEpoch).
type Target interface {
	// Name says what the target is, for logs and reports; it holds no secret.
	Name() string
	Flip(ctx context.Context, f Flip) error
}

// Warmer is a target that can get ready before the write outage (connect,
// load its script), so that the flip inside it is one round trip, and an
// unreachable target is found before the fence rather than after.
type Warmer interface {
	Warm(ctx context.Context) error
}

// Pauser is a target that can hold the application's new transactions
// through the write outage, so that they wait instead of failing on the
// fence (PgBouncer's PAUSE). The driver pauses right before it fences and
// resumes once the route is settled: Flip resumes after repointing, and
// an attempt that ends without a flip resumes pointing at the side that
// takes the writes. Both refuse an epoch lower than one the target has
// seen (ErrStaleEpoch).
type Pauser interface {
	Target
	// Pause waits for in-flight transactions to end and holds new ones,
	// within the target's own bound; when it fails, the target has been
	// resumed as it was.
	Pause(ctx context.Context, epoch uint64) error
	// Resume points the target at colour ("blue" or "green"; "" leaves
	// the route as it is) and lets the held transactions go. Resuming a
	// target that is not paused is not an error.
	Resume(ctx context.Context, epoch uint64, colour string) error
}

// PauseAll pauses every Pauser among targets. When one fails, those
// already paused are resumed (route unchanged) and the error returned.
func PauseAll(ctx context.Context, targets []Target, epoch uint64) error {
	var paused []Pauser
	for _, t := range targets {
		p, ok := t.(Pauser)
		if !ok {
			continue
		}
		if err := p.Pause(ctx, epoch); err != nil {
			for _, q := range paused {
				q.Resume(context.WithoutCancel(ctx), epoch, "")
			}
			return fmt.Errorf("pause %s: %w", t.Name(), err)
		}
		paused = append(paused, p)
	}
	return nil
}

// ResumeAll resumes every Pauser among targets pointing at colour, and
// joins the errors: each is tried.
func ResumeAll(ctx context.Context, targets []Target, epoch uint64, colour string) error {
	var errs []error
	for _, t := range targets {
		if p, ok := t.(Pauser); ok {
			if err := p.Resume(ctx, epoch, colour); err != nil {
				errs = append(errs, fmt.Errorf("resume %s: %w", t.Name(), err))
			}
		}
	}
	return errors.Join(errs...)
}

// HasPauser reports whether any target is a Pauser.
func HasPauser(targets []Target) bool {
	for _, t := range targets {
		if _, ok := t.(Pauser); ok {
			return true
		}
	}
	return false
}

// Outcome is the result of flipping one target.
type Outcome struct {
	Target string        `json:"target"`
	OK     bool          `json:"ok"`
	Error  string        `json:"error,omitempty"`
	Took   time.Duration `json:"took_ns"`
}

// PartialFlipError means some targets flipped and some did not: traffic may
// be split. It must be reported loudly and the failed targets retried with
// the same epoch; it is never safe to ignore.
type PartialFlipError struct {
	Outcomes []Outcome
}

func (e *PartialFlipError) Error() string {
	var ok, failed []string
	for _, o := range e.Outcomes {
		if o.OK {
			ok = append(ok, o.Target)
		} else {
			failed = append(failed, o.Target+": "+o.Error)
		}
	}
	return fmt.Sprintf("flip is partial: done on %s; failed on %s", strings.Join(ok, ", "), strings.Join(failed, "; "))
}

// Failed returns the indexes of the targets that did not flip.
func (e *PartialFlipError) Failed() []int {
	var out []int
	for i, o := range e.Outcomes {
		if !o.OK {
			out = append(out, i)
		}
	}
	return out
}

// FlipAll flips every target in order and stops at the first failure.
//
// When the first target fails, nothing has flipped and the error is that
// target's (the plan can abort cleanly). When a later one fails, the error is
// a *PartialFlipError listing what flipped and what did not. A stale epoch
// anywhere stops at once: this leader has been deposed.
func FlipAll(ctx context.Context, targets []Target, f Flip) ([]Outcome, error) {
	outcomes := make([]Outcome, 0, len(targets))
	for i, t := range targets {
		start := time.Now()
		err := t.Flip(ctx, f)
		o := Outcome{Target: t.Name(), OK: err == nil, Took: time.Since(start)}
		if err != nil {
			o.Error = err.Error()
		}
		outcomes = append(outcomes, o)
		if err == nil {
			continue
		}
		if i == 0 || errors.Is(err, ErrStaleEpoch) {
			return outcomes, fmt.Errorf("flip %s: %w", t.Name(), err)
		}
		for _, rest := range targets[i+1:] {
			outcomes = append(outcomes, Outcome{Target: rest.Name(), Error: "not attempted"})
		}
		return outcomes, &PartialFlipError{Outcomes: outcomes}
	}
	return outcomes, nil
}
