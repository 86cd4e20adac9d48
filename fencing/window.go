package fencing

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Step is one named piece of work done while the fence is up (drain,
// catch-up, sequence sync, verification...).
type Step struct {
	Name string
	Run  func(ctx context.Context) error
}

// Window runs the fence and the steps behind it under max_fence_window. Side
// effects are passed in as functions so that the fail-closed ordering can be
// tested without a database.
type Window struct {
	// Max bounds the outage: from the call to Fence to the end of the last
	// step.
	Max time.Duration
	// Fence puts up the fence on every pair. The outage clock starts when it
	// is called.
	Fence func(ctx context.Context) error
	// Lift takes the fence down on every pair. It is called when Fence or a
	// step fails or the window runs out, with a context of its own (bounded
	// by LiftTimeout) so that a cancelled caller still lifts.
	Lift        func(ctx context.Context) error
	LiftTimeout time.Duration
	Steps       []Step
	// OnStep, if set, is told each step's duration as it ends.
	OnStep func(name string, took time.Duration, err error)
}

// Timing is how long one step took.
type Timing struct {
	Name string
	Took time.Duration
}

// Outcome describes a window run.
type Outcome struct {
	Start time.Time
	// Outage is from the start of Fence to the end of the last step (or to
	// the lift, when the window failed).
	Outage time.Duration
	Steps  []Timing
	// Lifted says the fence was taken down because the window failed.
	Lifted bool
	// LiftErr is set when lifting failed: the side may still be fenced and
	// needs attention (the caller must retry with its epoch).
	LiftErr error
}

// Run puts up the fence and runs every step within Max. On success the
// fence stays up (the flip or a later Lift takes it down). When the fence,
// a step or the window fails, Run lifts the fence before it returns; the
// error wraps ErrWindowExceeded when the window ran out.
//
// A step that ignores its context cannot hold the fence past Max: Run lifts
// the fence at the deadline and then waits for the step to return.
//
// Run also lifts when ctx is cancelled (say, leadership was lost): a fence
// must never stay up with nobody in charge of it. A new leader that wants to
// go on fences again with its higher epoch, which makes this lift moot (the
// fence refuses a lower epoch).
func (w Window) Run(ctx context.Context) (Outcome, error) {
	out := Outcome{Start: time.Now()}
	deadline := out.Start.Add(w.Max)
	wctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()

	all := append([]Step{{Name: "fence", Run: w.Fence}}, w.Steps...)
	var failed error
	for _, step := range all {
		began := time.Now()
		err := runBounded(wctx, step.Run)
		took := time.Since(began)
		out.Steps = append(out.Steps, Timing{Name: step.Name, Took: took})
		if w.OnStep != nil {
			w.OnStep(step.Name, took, err)
		}
		if err == nil && wctx.Err() != nil {
			err = wctx.Err()
		}
		if err != nil {
			if errors.Is(wctx.Err(), context.DeadlineExceeded) && ctx.Err() == nil {
				failed = fmt.Errorf("%w: %s > %s, in step %s: %v", ErrWindowExceeded, time.Since(out.Start).Round(time.Millisecond), w.Max, step.Name, err)
			} else {
				failed = fmt.Errorf("step %s: %w", step.Name, err)
			}
			break
		}
	}
	if failed == nil {
		out.Outage = time.Since(out.Start)
		return out, nil
	}
	liftTimeout := w.LiftTimeout
	if liftTimeout <= 0 {
		liftTimeout = 10 * time.Second
	}
	lctx, lcancel := context.WithTimeout(context.WithoutCancel(ctx), liftTimeout)
	defer lcancel()
	out.LiftErr = w.Lift(lctx)
	out.Lifted = out.LiftErr == nil
	out.Outage = time.Since(out.Start)
	if out.LiftErr != nil {
		return out, fmt.Errorf("%w; lifting the fence also failed: %v", failed, out.LiftErr)
	}
	return out, failed
}

// runBounded runs fn and returns when it returns or when ctx ends, whichever
// is first. When ctx ends first, fn keeps running in the background with the
// cancelled context and its result is dropped.
func runBounded(ctx context.Context, fn func(context.Context) error) error {
	done := make(chan error, 1)
	go func() { done <- fn(ctx) }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}
