package driver

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/engine"
	"github.com/cutover/cutover/fencing"
	"github.com/cutover/cutover/internal/clock"
	"github.com/cutover/cutover/switch/target"
)

// rollback: fence green, prove through the reverse stream that blue has
// every write green acknowledged, flip back, unfence blue.
//
// The way back has the same bounded outage as the way forward: fence,
// drain, catch-up through the reverse stream, sequences and the held
// breach check run in a fencing.Window of max_fence_window. When it fails,
// green is unfenced (traffic stays on green, nothing is lost), the failed
// attempt is audited, and the driver tries again later.
func (rt *planRT) rollback(ctx context.Context, plan agent.Plan, p agent.Proposer, log *zap.Logger) error {
	epoch, err := p.Intent(ctx, plan.Name, "rollback", plan.Epoch)
	if err != nil {
		return err
	}
	for _, pr := range rt.pairs {
		if err := rt.ensureReverse(ctx, pr, plan.Epoch); err != nil {
			return err
		}
	}
	if err := rt.readyWindow(ctx, func(pr *pairRT) (engine.Fencer, engine.Stream) { return pr.greenFence, pr.rev }); err != nil {
		return err
	}
	if err := rt.pause(ctx, epoch, log); err != nil {
		return err // traffic stays on green; tried again
	}
	grace := rt.spec.Fence.DrainGrace.D()
	markers := make([]fencing.Marker, len(rt.pairs))
	w := fencing.Window{
		Max: maxWindow(rt.spec),
		Fence: func(ctx context.Context) error {
			return rt.forEachIndexed(func(i int, pr *pairRT) error {
				d, err := pr.greenFence.FenceDrain(ctx, epoch, grace)
				markers[i] = d.Marker
				return err
			})
		},
		Lift: func(ctx context.Context) error {
			return rt.forEach(func(pr *pairRT) error { return pr.greenFence.Unfence(ctx, epoch) })
		},
		Steps: []fencing.Step{
			{Name: "catch_up", Run: func(ctx context.Context) error {
				if err := rt.d.fault("before rollback catch-up"); err != nil {
					return err
				}
				return rt.catchUp(ctx, catchUp{
					stream: func(pr *pairRT) engine.Stream { return pr.rev },
					nonce:  func(i int, _ *pairRT) string { return markers[i].Nonce },
					proof:  true,
				})
			}},
			{Name: "held_writers", Run: func(ctx context.Context) error {
				return rt.heldWriters(ctx, engine.Green, false)
			}},
		},
		OnStep: func(name string, took time.Duration, err error) {
			log.Info("rollback window step", zap.String("step", name), zap.Duration("took", took), zap.Error(err))
		},
	}
	out, err := w.Run(ctx)
	if err != nil {
		rt.forEach(func(pr *pairRT) error { pr.greenFence.Release(ctx); return nil })
		rt.resumeAfterFailure(ctx, epoch, "green", log)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		detail := fmt.Sprintf("rollback window failed after %s (green unfenced: %v), traffic stays on green; will try again: %v", out.Outage.Round(time.Millisecond), out.Lifted, err)
		log.Warn("rollback attempt failed", zap.String("detail", detail))
		p.Outcome(ctx, plan.Name, epoch, agent.Outcome{OK: false, Detail: detail})
		return errors.New(detail)
	}
	log.Info("rollback caught up", zap.Duration("outage_so_far", out.Outage))
	targets, err := rt.switchTargets()
	if err != nil {
		return err
	}
	f := target.Flip{Plan: plan.Name, From: "green", To: "blue", Epoch: epoch, At: clock.Now().UTC()}
	// Blue takes writes before the targets flip, as green does on the way
	// forward (green stays fenced: invariant 1), so that a pool resumed
	// by its flip sends the held transactions to a writable blue.
	if err := rt.forEach(func(pr *pairRT) error { return pr.blueFence.Unfence(ctx, epoch) }); err != nil {
		return err
	}
	if _, err := flipWithRetry(ctx, targets, f, log); err != nil {
		return err
	}
	rt.pausedAt.Store(0)
	// Green's writers, held since the drain, now fail on its fence.
	rt.forEach(func(pr *pairRT) error { pr.greenFence.Release(ctx); return nil })
	return p.Outcome(ctx, plan.Name, epoch, agent.Outcome{OK: true, To: agent.PhaseRolledBack, Detail: "traffic back on blue; nothing written on green is lost", Reason: "rolled back", Facts: map[string]string{"route": "blue", "rolled_back_at": f.At.Format(time.RFC3339Nano)}})
}
