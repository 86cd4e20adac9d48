package driver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"go.uber.org/zap"

	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/switch/target"
)

// Pools that hold the application's transactions through the window
// (target.Pauser, e.g. PgBouncer): paused right before the fence, resumed
// by the flip (pointing at the new side) or, when the attempt ends
// without one, pointing at the side that then takes the writes. Every
// call carries the plan's epoch: a pool refuses a deposed leader.

// pauseResumeTimeout bounds resuming the pools after a failure.
const pauseResumeTimeout = 10 * time.Second

// pause pauses the plan's pools; when that fails they have been resumed
// and the attempt stops before the fence.
func (rt *planRT) pause(ctx context.Context, epoch uint64, log *zap.Logger) error {
	targets, err := rt.switchTargets()
	if err != nil || !target.HasPauser(targets) {
		return err
	}
	began := time.Now()
	if err := target.PauseAll(ctx, targets, epoch); err != nil {
		return fmt.Errorf("pools not paused, not fencing: %w", err)
	}
	rt.pausedAt.Store(began.UnixNano())
	rt.mustResume.Store(true)
	// How long PAUSE waited for the transactions in flight to end.
	log.Info("pools paused", zap.Duration("pause_wait", time.Since(began)))
	return nil
}

// resumeAfterFailure resumes the pools this term paused, pointing at
// colour ("": where they point), when an attempt ends before its flip.
// It is best effort: the caller is failing already; a pool it cannot
// resume is resumed by the next abort or flip.
func (rt *planRT) resumeAfterFailure(ctx context.Context, epoch uint64, colour string, log *zap.Logger) {
	if rt.pausedAt.Load() == 0 {
		return
	}
	targets, err := rt.switchTargets()
	if err != nil {
		return
	}
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), pauseResumeTimeout)
	defer cancel()
	if err := target.ResumeAll(rctx, targets, epoch, colour); err != nil {
		log.Error("POOLS MAY STAY PAUSED: resuming after a failed attempt failed", zap.Error(err))
		return
	}
	rt.pausedAt.Store(0)
	rt.mustResume.Store(false)
}

// resumeAt resumes the pools pointing at colour after an abort. When they
// may be paused (mustResume) a failure is returned, so that the abort is
// retried; otherwise it is only logged.
func (rt *planRT) resumeAt(ctx context.Context, epoch uint64, colour string) error {
	targets, err := rt.switchTargets()
	if err != nil || !target.HasPauser(targets) {
		return err
	}
	must := rt.mustResume.Load() || rt.pausedAt.Load() != 0
	rctx, cancel := context.WithTimeout(ctx, pauseResumeTimeout)
	defer cancel()
	if err := target.ResumeAll(rctx, targets, epoch, colour); err != nil && !errors.Is(err, target.ErrStaleEpoch) {
		if must {
			return fmt.Errorf("resume the pools at %s: %w", colour, err)
		}
		rt.d.log.Warn("resume the pools after an abort", zap.String("plan", rt.spec.Name), zap.Error(err))
		return nil
	}
	rt.pausedAt.Store(0)
	rt.mustResume.Store(false)
	return nil
}

// resumeLeftPaused resumes, once per term and before any window, pools a
// deposed leader may have paused right before a window it never ran.
func (rt *planRT) resumeLeftPaused(ctx context.Context, epoch uint64) error {
	if rt.leftPausedChecked {
		return nil
	}
	targets, err := rt.switchTargets()
	if err != nil || !target.HasPauser(targets) {
		return err
	}
	if err := target.ResumeAll(ctx, targets, epoch, ""); err != nil {
		return err
	}
	rt.leftPausedChecked = true
	return nil
}

// resumeAborted resumes an aborted plan's pools pointing at blue.
func (d *Driver) resumeAborted(ctx context.Context, spec config.Plan, epoch uint64) error {
	targets, err := d.buildTargets(spec)
	if err != nil || !target.HasPauser(targets) {
		return err
	}
	defer func() {
		for _, t := range targets {
			if c, ok := t.(io.Closer); ok {
				c.Close()
			}
		}
	}()
	rctx, cancel := context.WithTimeout(ctx, pauseResumeTimeout)
	defer cancel()
	err = target.ResumeAll(rctx, targets, epoch, "blue")
	if errors.Is(err, target.ErrStaleEpoch) {
		return nil // a newer plan or leader owns the pool
	}
	return err
}
