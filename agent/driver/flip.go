package driver

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/engine"
	"github.com/cutover/cutover/internal/clock"
	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/switch/target"
)

// flip: set up the way back, let green take writes, flip every target.
func (rt *planRT) flip(ctx context.Context, plan agent.Plan, p agent.Proposer, log *zap.Logger) error {
	if err := rt.d.fault("before flip intent"); err != nil {
		return err
	}
	epoch, err := p.Intent(ctx, plan.Name, agent.StepFlip, plan.Epoch)
	if err != nil {
		return err
	}
	// Blue's writers held since the drain are let go right after the
	// targets flip (below), or whenever this step ends before that.
	defer rt.releaseBlue(ctx, log)
	// Pools paused in the window are resumed by their flip, or at blue by
	// an abort.
	rt.mustResume.Store(true)
	if err := rt.d.fault("before flip"); err != nil {
		return err
	}
	began := time.Now()
	// Reverse replication starts while green is still fenced, so that it
	// begins exactly where blue and green are equal.
	for _, pr := range rt.pairs {
		if err := rt.ensureReverse(ctx, pr, epoch); err != nil {
			return err
		}
	}
	reverseReady := time.Since(began)
	targets, err := rt.switchTargets()
	if err != nil {
		return err
	}
	positions := map[string]string{}
	for _, pr := range rt.pairs {
		positions[pr.cfg.Name] = plan.Facts["marker."+pr.cfg.Name]
	}
	flipped := &fenceMark{mono: time.Now(), wall: clock.Now()}
	f := target.Flip{Plan: plan.Name, From: "blue", To: "green", Epoch: epoch, Positions: positions, At: flipped.wall.UTC()}
	// Green takes writes from here; blue stays fenced (invariant 1).
	if err := rt.forEach(func(pr *pairRT) error { return pr.greenFence.Unfence(ctx, epoch) }); err != nil {
		if errors.Is(err, engine.ErrLoginBreach) && ctx.Err() == nil {
			// Someone is on green past its login lock, with the grants
			// back: fence its grants, then abort (green may have taken a
			// write; the plan cannot flip to it).
			if ferr := rt.refenceGreen(ctx, epoch, log); ferr != nil {
				return fmt.Errorf("%w; and green could not be fenced again, so blue stays fenced: %v", err, ferr)
			}
			return rt.abort(ctx, plan.Name, p, epoch, "green's fence was breached before the flip: "+err.Error())
		}
		return err
	}
	greenUnfenced := time.Since(began)
	outcomes, err := flipWithRetry(ctx, targets, f, log)
	rt.releaseBlue(ctx, log)
	if err != nil && !anyOK(outcomes) && !errors.Is(err, target.ErrStaleEpoch) && ctx.Err() == nil {
		// Nothing flipped: close green again and abort cleanly. The abort
		// unfences blue, so it only runs once green is fenced again;
		// otherwise blue stays fenced and the flip is retried.
		if ferr := rt.refenceGreen(ctx, epoch, log); ferr != nil {
			return fmt.Errorf("flip failed before any target switched (%v), and green could not be fenced again, so blue stays fenced and the flip is retried: %w", err, ferr)
		}
		return rt.abort(ctx, plan.Name, p, epoch, "flip failed before any target switched: "+err.Error())
	}
	if err != nil {
		return err
	}
	fields := []zap.Field{zap.Duration("reverse_ready_after", reverseReady), zap.Duration("green_unfenced_after", greenUnfenced), zap.Duration("targets_flipped_after", time.Since(began))}
	facts := map[string]string{"flipped_at": f.At.Format(time.RFC3339Nano), "route": "green"}
	rt.flippedAt.Store(flipped)
	if at := rt.pausedAt.Swap(0); at != 0 {
		// Pools held new transactions from the pause to here: what the
		// application saw as a stall instead of errors.
		stall := time.Since(time.Unix(0, at))
		fields = append(fields, zap.Duration("pool_pause", stall))
		facts["pool_pause_ms"] = strconv.FormatInt(stall.Milliseconds(), 10)
	}
	rt.mustResume.Store(false)
	if outage, ok := writeOutage(rt.lastFenceStart.Load(), plan.Facts["fence_started_at"]); ok {
		// The application's whole write outage, the headline figure: from
		// the fence on blue to traffic on a writable green.
		fields = append(fields, zap.Duration("write_outage", outage))
		facts["write_outage_ms"] = strconv.FormatInt(outage.Milliseconds(), 10)
	}
	log.Info("traffic flipped", fields...)
	if err := rt.d.fault("after flip"); err != nil {
		return err
	}
	// Blue is fenced and quiet: the forward stream has nothing left to carry.
	for _, pr := range rt.pairs {
		if pr.fwd != nil {
			pr.fwd.Cleanup(ctx)
			pr.setFwd(nil)
		}
	}
	return p.Outcome(ctx, plan.Name, epoch, agent.Outcome{OK: true, To: agent.PhaseSwitched, Detail: fmt.Sprintf("flipped %d targets to green", len(targets)), Reason: "traffic flipped to green", Facts: facts})
}

// writeOutage is the time since the fence on blue began: by this leader's
// monotonic clock when it fenced (lastFenceStart), else from the fact the
// drain recorded by the wall clock of the leader that fenced (another
// leader: the figure then assumes their clocks agree).
func writeOutage(lastFenceStart *fenceMark, fact string) (time.Duration, bool) {
	if lastFenceStart != nil {
		return time.Since(lastFenceStart.mono), true
	}
	if at, err := time.Parse(time.RFC3339Nano, fact); err == nil {
		return clock.Since(at), true
	}
	return 0, false
}

// refenceAttempts bounds the tries to fence green again after a failed
// flip, within one flip attempt.
const refenceAttempts = 5

// refenceGreen fences green again after a flip that switched no target,
// retrying with a backoff; nil means every pair's fence is committed.
func (rt *planRT) refenceGreen(ctx context.Context, epoch uint64, log *zap.Logger) error {
	backoff := 200 * time.Millisecond
	for attempt := 1; ; attempt++ {
		err := rt.d.fault("before refence green")
		if err == nil {
			err = rt.forEach(func(pr *pairRT) error { return pr.greenFence.Fence(ctx, epoch) })
		}
		if err == nil {
			return nil
		}
		log.Error("GREEN MAY TAKE WRITES: fencing green again after a failed flip failed; blue stays fenced", zap.Int("attempt", attempt), zap.Error(err))
		if attempt == refenceAttempts {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(backoff):
		}
		backoff *= 2
	}
}

func anyOK(outcomes []target.Outcome) bool {
	for _, o := range outcomes {
		if o.OK {
			return true
		}
	}
	return false
}

// flipWithRetry flips every target; a partial flip is reported loudly and
// the failed targets are retried until they succeed or ctx ends.
func flipWithRetry(ctx context.Context, targets []target.Target, f target.Flip, log *zap.Logger) ([]target.Outcome, error) {
	outcomes, err := target.FlipAll(ctx, targets, f)
	backoff := 500 * time.Millisecond
	for {
		var partial *target.PartialFlipError
		if !errors.As(err, &partial) {
			return outcomes, err
		}
		log.Error("PARTIAL FLIP: traffic may be split; retrying the failed targets", zap.Error(err))
		select {
		case <-ctx.Done():
			return outcomes, err
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 10*time.Second)
		var rest []target.Target
		for _, i := range partial.Failed() {
			rest = append(rest, targets[i])
		}
		var more []target.Outcome
		more, err = target.FlipAll(ctx, rest, f)
		outcomes = append(outcomes, more...)
		if err != nil && !anyOK(more) && !errors.Is(err, target.ErrStaleEpoch) {
			err = &target.PartialFlipError{Outcomes: append(outcomes[:0:0], more...)}
		}
	}
}

// switchTargets returns the plan's flip targets, built once per term (a
// Redis target keeps its connection), and closed by close.
func (rt *planRT) switchTargets() ([]target.Target, error) {
	rt.targetsMu.Lock()
	defer rt.targetsMu.Unlock()
	if rt.targets == nil {
		ts, err := rt.d.buildTargets(rt.spec)
		if err != nil {
			return nil, err
		}
		rt.targets = ts
	}
	return rt.targets, nil
}

// warmTargets readies the flip targets before the outage; one that cannot
// be reached keeps the fence down.
func (rt *planRT) warmTargets(ctx context.Context) error {
	targets, err := rt.switchTargets()
	if err != nil {
		return err
	}
	for _, t := range targets {
		if w, ok := t.(target.Warmer); ok {
			if err := w.Warm(ctx); err != nil {
				return fmt.Errorf("flip target not ready, not fencing: %w", err)
			}
		}
	}
	return nil
}

func (d *Driver) buildTargets(spec config.Plan) ([]target.Target, error) {
	var out []target.Target
	for i, tc := range spec.Switch.Targets {
		if d.opts.NewTarget == nil {
			return nil, fmt.Errorf("switch target %d: this driver builds no targets (Options.NewTarget)", i)
		}
		t, err := d.opts.NewTarget(tc)
		if err != nil {
			return nil, fmt.Errorf("switch target %d: %w", i, err)
		}
		out = append(out, t)
	}
	return out, nil
}
