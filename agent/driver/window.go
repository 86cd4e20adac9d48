package driver

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/engine"
	"github.com/cutover/cutover/fencing"
	"github.com/cutover/cutover/internal/clock"
	"github.com/cutover/cutover/internal/config"
)

// cutover runs the write outage: fence blue, drain, prove catch-up through
// the stream, sync sequences, verify what changed, and open the gate, all
// within max_fence_window; otherwise blue is unfenced and the plan aborts.
func (rt *planRT) cutover(ctx context.Context, plan agent.Plan, p agent.Proposer, log *zap.Logger) error {
	// A pool a deposed leader paused before its window is let go first.
	if err := rt.resumeLeftPaused(ctx, plan.Epoch); err != nil {
		return err
	}
	// Everything that can happen before the fence happens before it.
	if err := rt.streamingAndVerified(ctx, plan, p); err != nil {
		return err
	}
	if err := rt.sidesStillMatch(ctx, plan, p); err != nil {
		return err
	}
	// Made ready before the refresh: the rows written while this runs
	// (a few hundred ms) would otherwise all be re-hashed in the fence.
	if err := rt.readyWindow(ctx, func(pr *pairRT) (engine.Fencer, engine.Stream) { return pr.blueFence, pr.fwd }); err != nil {
		return err
	}
	if err := rt.forEach(func(pr *pairRT) error { return rt.prepareReverse(ctx, pr, plan.Epoch) }); err != nil {
		return err
	}
	if err := rt.warmTargets(ctx); err != nil {
		return err
	}
	// Green's unfence ends the write outage at the flip: it becomes a
	// login unlock (flat in the number of tables), and its sessions
	// resolve and plan it now, outside the outage.
	if err := rt.shiftGreenToLogins(ctx, plan.Epoch, log); err != nil {
		return err
	}
	if err := rt.forEach(func(pr *pairRT) error { return pr.greenFence.WarmUnfence(ctx) }); err != nil {
		return err
	}
	// What changed since the online pass would otherwise all be re-hashed
	// inside the fence: re-check it now, online, so that the pass inside
	// the fence only covers the last moments' changes.
	if err := rt.refresh(ctx, plan, p, log); err != nil {
		return err
	}
	// The outage never starts on a lagging replica: the latest lag must be
	// under the thresholds right now.
	if err := rt.lagGate(ctx, 0, log); err != nil {
		return err
	}
	rt.lagDip(ctx, log)
	if err := rt.d.fault("before fence"); err != nil {
		return err
	}
	// Pools (PgBouncer) hold new transactions from here to the flip:
	// the application waits instead of failing on the fence.
	if err := rt.pause(ctx, plan.Epoch, log); err != nil {
		return err
	}
	epoch, err := p.Intent(ctx, plan.Name, "fence", plan.Epoch)
	if err != nil {
		rt.resumeAfterFailure(ctx, plan.Epoch, "", log)
		return err
	}
	var latest atomic.Uint64 // the newest epoch: what the lift must carry
	latest.Store(epoch)
	win := &window{rt: rt, plan: plan, p: p, log: log, epoch: epoch, latest: &latest}
	grace := rt.spec.Fence.DrainGrace.D()
	w := fencing.Window{
		Max: maxWindow(rt.spec),
		// Invariant 4 starts here: from now on no application write lands
		// on blue.
		// Fence, drain and marker go in two round trips per pair
		// (FenceDrain, holding the drain's lock): on a busy server every
		// round trip inside the outage costs milliseconds.
		Fence: func(ctx context.Context) error {
			m := &fenceMark{mono: time.Now(), wall: clock.Now()}
			rt.fenceStart.Store(m)
			rt.lastFenceStart.Store(m)
			return rt.forEach(func(pr *pairRT) error {
				d, err := pr.blueFence.FenceDrain(ctx, epoch, grace)
				pr.marker = d.Marker
				pr.terminated = d.Terminated
				return err
			})
		},
		Lift: func(ctx context.Context) error {
			return rt.forEach(func(pr *pairRT) error { return pr.blueFence.Unfence(ctx, latest.Load()) })
		},
		Steps: []fencing.Step{
			{Name: "drain", Run: win.drain},
			{Name: "catch_up", Run: win.catchUp},
			{Name: "verify", Run: win.verify},
			{Name: "authorize", Run: win.authorize},
		},
		OnStep: func(name string, took time.Duration, err error) {
			log.Info("window step", zap.String("step", name), zap.Duration("took", took), zap.Error(err))
		},
	}
	out, err := w.Run(ctx)
	// The fenced writers stay held on the drain's lock through the flip
	// (the CPU they would spend retrying is what the window's steps and
	// the flip need); the flip releases them, when the traffic is on green
	// (releaseBlue). A failed window's lift has let them go already.
	rt.fenceStart.Store(nil)
	outageSeconds.WithLabelValues(plan.Name).Set(out.Outage.Seconds())
	if err == nil {
		log.Info("gate open", zap.Duration("outage", out.Outage))
		return nil
	}
	if ctx.Err() != nil {
		// Deposed: the window lifted the fence; the next leader aborts
		// (and resumes the pools at blue with its higher epoch).
		rt.resumeAfterFailure(ctx, latest.Load(), "", log)
		return ctx.Err()
	}
	reason := fmt.Sprintf("cutover window failed after %s (fence lifted: %v): %v", out.Outage.Round(time.Millisecond), out.Lifted, err)
	return rt.abort(ctx, plan.Name, p, latest.Load(), reason)
}

// releaseBlue lets go of blue's writers held since the drain, once the
// flip has run: fenced ones fail on the fence (and retry where the traffic
// now goes); writes of roles outside the fence that arrived after the gate
// opened are cancelled, so that none lands on blue after the traffic left
// it (the reverse replication waits for the release too).
func (rt *planRT) releaseBlue(ctx context.Context, log *zap.Logger) {
	rt.forEach(func(pr *pairRT) error {
		h, ok := pr.blueFence.(engine.HoldingFencer)
		if !ok {
			return nil
		}
		cancelled, err := h.ReleaseRefusingAll(ctx)
		if err != nil || len(cancelled) > 0 {
			log.Warn("writes of roles outside the fence reached blue after the gate opened; cancelled", zap.String("pair", pr.cfg.Name), zap.Int("sessions", len(cancelled)), zap.Error(err))
		}
		return nil
	})
}

// readyWindow does, right before a window and outside it, what would
// otherwise cost the outage: the fence's sessions compiled and planned (on
// a cold session the first fence costs 10-20 ms more under load), and the
// sequences to sync resolved, so that the sync inside the window is one
// round trip per side. sides picks each pair's fence and stream.
func (rt *planRT) readyWindow(ctx context.Context, sides func(pr *pairRT) (engine.Fencer, engine.Stream)) error {
	return rt.forEach(func(pr *pairRT) error {
		f, r := sides(pr)
		if err := f.Warm(ctx); err != nil {
			return err
		}
		if s, ok := r.(engine.SequenceSyncer); ok {
			return s.ResolveSequences(ctx)
		}
		return nil
	})
}

// syncSequences syncs a stream's sequences, when its engine has any
// outside the stream.
func syncSequences(ctx context.Context, r engine.Stream) error {
	if s, ok := r.(engine.SequenceSyncer); ok {
		return s.SyncSequences(ctx)
	}
	return nil
}

// loginSettle is how long after locking green's logins its grants come
// back (see engine.LoginFencer): far longer than a backend takes from its
// login check to showing in pg_stat_activity.
const loginSettle = 500 * time.Millisecond

// shiftGreenToLogins moves green's fence from its grants to its logins
// (fence.green), so that the flip only unlocks logins. An agent whose role
// may not alter roles keeps the fence on the grants, unless the plan asks
// for logins.
func (rt *planRT) shiftGreenToLogins(ctx context.Context, epoch uint64, log *zap.Logger) error {
	mode := rt.spec.Fence.Green
	if mode == config.GreenFenceGrants {
		return nil
	}
	return rt.forEach(func(pr *pairRT) error {
		if pr.greenGrantsOnly {
			return nil
		}
		// Told "logins", the operator says green's cluster serves no other
		// database to these roles.
		lf, ok := pr.greenFence.(engine.LoginFencer)
		if !ok {
			if mode == config.GreenFenceLogins {
				return fmt.Errorf("fence.green: logins: the %s engine has no login fence: %w", pr.cfg.Engine, engine.ErrLoginFenceUnavailable)
			}
			pr.greenGrantsOnly = true
			return nil
		}
		err := lf.ShiftToLogins(ctx, epoch, loginSettle, mode == config.GreenFenceLogins)
		if (errors.Is(err, engine.ErrLoginFenceUnavailable) || errors.Is(err, engine.ErrLoginFenceUnsafe)) && mode != config.GreenFenceLogins {
			log.Warn("green stays fenced by its grants, and the flip gives them back inside the write outage (a catalog update per table): grant the agent's role CREATEROLE and keep these roles out of green's other databases, or set fence.green: grants to silence this", zap.String("pair", pr.cfg.Name), zap.Error(err))
			pr.greenGrantsOnly = true
			return nil
		}
		return err
	})
}

// breachCheck fails when the stream carried an application change after
// the fence marker: a write got past the fence.
func breachCheck(pr *pairRT) error {
	return breachCheckOn(pr.fwd, pr.markerPos)
}

func breachCheckOn(r engine.Stream, marker engine.Position) error {
	changes, complete := r.ChangesAfter(marker)
	if len(changes) > 0 {
		c := changes[0]
		return fmt.Errorf("%w: %d application change(s) after the fence marker, first %s on %s key %v at %s", errBreach, len(changes), c.Kind, c.Table, c.Key, c.Position)
	}
	if !complete {
		return fmt.Errorf("%w: cannot tell: changes after the marker were not all recorded", errBreach)
	}
	return nil
}

// heldBreachCheck fails when writers of roles outside the fence wait on
// the hold of the side's fence.
func heldBreachCheck(ctx context.Context, f engine.Fencer, side, pair string) error {
	held, err := f.HeldBreaches(ctx)
	if err != nil {
		return err
	}
	if len(held) > 0 {
		s := held[0]
		return fmt.Errorf("%w: %d session(s) of roles outside the fence wait to write on %s of %s, first pid %d user %s application %q; add their roles to fence_roles", errBreach, len(held), side, pair, s.PID, s.User, s.Application)
	}
	return nil
}

// abortInterruptedWindow: a new leader found the plan fenced but not
// authorized. See the resume rules in the package documentation.
func (rt *planRT) abortInterruptedWindow(ctx context.Context, plan agent.Plan, p agent.Proposer, log *zap.Logger) error {
	log.Warn("a cutover window was interrupted by a change of leader; unfencing blue and aborting")
	rt.mustResume.Store(true) // the old leader paused the pools
	return rt.abort(ctx, plan.Name, p, plan.Epoch, fmt.Sprintf("the leader changed while the plan was %s; the outage is bounded, so blue is unfenced and the plan aborts", plan.Phase))
}

// abort unfences blue and moves the plan to aborted. Green stays fenced:
// it no longer receives blue's changes, and the application must never be
// able to write to both sides (invariant 1).
func (rt *planRT) abort(ctx context.Context, name string, p agent.Proposer, epoch uint64, reason string) error {
	rt.d.log.Warn("aborting plan", zap.String("plan", name), zap.String("reason", reason))
	e, err := p.Intent(ctx, name, agent.StepAbort, 0)
	if err != nil {
		return err
	}
	var errs []error
	for _, pr := range rt.pairs {
		if err := pr.blueFence.Unfence(ctx, e); err != nil {
			errs = append(errs, fmt.Errorf("unfence blue of %s: %w", pr.cfg.Name, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		// Blue may still be fenced: keep the plan alive and retry, never
		// abort with a fence up and nobody in charge.
		p.Outcome(ctx, name, e, agent.Outcome{OK: false, Detail: err.Error()})
		return err
	}
	// Pools held since the window go back to blue, now writable.
	if err := rt.resumeAt(ctx, e, "blue"); err != nil {
		p.Outcome(ctx, name, e, agent.Outcome{OK: false, Detail: err.Error()})
		return err
	}
	if err := p.Outcome(ctx, name, e, agent.Outcome{OK: true, To: agent.PhaseAborted, Detail: "blue unfenced; green stays fenced", Reason: reason}); err != nil {
		return err
	}
	// Stop the caller's step: the plan is over.
	return errAborted
}
