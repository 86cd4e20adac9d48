package driver

import (
	"context"
	"errors"
	"time"

	"go.uber.org/zap"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/internal/clock"
	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/switch/health"
)

// switched: keep the way back open, watch health, and complete when the
// rollback window closes.
func (rt *planRT) switched(ctx context.Context, plan agent.Plan, p agent.Proposer, log *zap.Logger) error {
	for _, pr := range rt.pairs {
		if err := rt.ensureReverse(ctx, pr, plan.Epoch); err != nil {
			return err
		}
	}
	flippedAt, err := time.Parse(time.RFC3339Nano, plan.Facts["flipped_at"])
	if err != nil {
		flippedAt = plan.Updated
	}
	// Time left from the flip: by this leader's monotonic clock when it
	// flipped, else by the wall clock against flipped_at, which assumes
	// the agents' clocks agree (a leader whose clock is ahead by J closes
	// the window J early; docs/agent.md).
	until := func(d time.Duration) time.Duration { return clock.Until(flippedAt.Add(d)) }
	if m := rt.flippedAt.Load(); m != nil {
		until = func(d time.Duration) time.Duration { return time.Until(m.mono.Add(d)) }
	}
	rb := rt.spec.Rollback
	rt.goBackground(func() {
		watch := until(rb.Watch.D())
		if watch <= 0 || len(rb.Checks) == 0 {
			return
		}
		w := health.Watcher{Checks: rt.d.healthChecks(rb.Checks), Interval: rb.Interval.D(), Period: watch, Failures: rb.Failures}
		if err := w.Watch(ctx); err != nil && errors.Is(err, health.ErrUnhealthy) {
			log.Error("automatic rollback", zap.Error(err))
			p.Transition(ctx, plan.Name, agent.PhaseRollingBack, plan.Epoch, "automatic rollback: "+err.Error())
		}
	}, func() {
		select {
		case <-ctx.Done():
		case <-time.After(until(rb.Window.D())):
			p.Transition(ctx, plan.Name, agent.PhaseDone, plan.Epoch, "rollback window closed")
		}
	})
	return nil
}

func (d *Driver) healthChecks(cs []config.HealthCheck) []health.Check {
	var out []health.Check
	for _, c := range cs {
		if d.opts.NewHealthCheck == nil {
			continue
		}
		if h := d.opts.NewHealthCheck(c); h != nil {
			out = append(out, h)
		}
	}
	return out
}
