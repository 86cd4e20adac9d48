package driver

import (
	"context"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/cutover/cutover/fencing"
)

// lagGate waits until every pair's lag has stayed under the thresholds for
// hold.
func (rt *planRT) lagGate(ctx context.Context, hold time.Duration, log *zap.Logger) error {
	gates := make([]fencing.LagGate, len(rt.pairs))
	for i := range gates {
		gates[i] = fencing.LagGate{MaxBytes: int64(rt.spec.Lag.MaxBytes), MaxDelay: rt.spec.Lag.MaxDelay.D(), Hold: hold, MaxAge: 5 * rt.d.opts.LagPoll}
	}
	lastLog := time.Now()
	for {
		ready, why := true, ""
		for i, pr := range rt.pairs {
			lag, err := pr.fwd.Lag(ctx)
			if err != nil {
				return fmt.Errorf("measure lag of %s: %w", pr.cfg.Name, err)
			}
			gates[i].Observe(fencing.LagSample{Bytes: lag.Bytes, Delay: lag.Delay, At: time.Now()})
			if ok, w := gates[i].Ready(time.Now()); !ok {
				ready, why = false, pr.cfg.Name+": "+w
			}
		}
		if ready {
			return nil
		}
		if time.Since(lastLog) > 5*time.Second {
			log.Info("waiting for lag", zap.String("why", why))
			lastLog = time.Now()
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(rt.d.opts.LagPoll):
		}
	}
}

// lagDipBytes and lagDipWait shape the last wait before the fence. Under
// load the applier trails blue by up to a batch, and catch-up inside the
// fence takes time in proportion to that backlog; fencing right after lag
// dips starts the outage with next to nothing to apply (fencing benchmark:
// lag at fence start 0-260 KB without the dip, at most 32 KB with it).
const (
	lagDipBytes = 32 << 10
	lagDipPoll  = 5 * time.Millisecond
	lagDipWait  = 2 * time.Second
)

// lagDip waits, briefly and before the outage clock starts, for a moment
// when every pair's lag is at or under lagDipBytes. It is an optimisation,
// not a gate: lag is already under the plan's thresholds, so when no dip
// comes within lagDipWait the fence goes up anyway.
func (rt *planRT) lagDip(ctx context.Context, log *zap.Logger) {
	dip := int64(lagDipBytes)
	if mb := int64(rt.spec.Lag.MaxBytes); mb > 0 && mb < dip {
		dip = mb
	}
	ctx, cancel := context.WithTimeout(ctx, lagDipWait)
	defer cancel()
	var worst int64
	for {
		worst = 0
		for _, pr := range rt.pairs {
			lag, err := pr.fwd.Lag(ctx)
			if err != nil {
				worst = -1
				break
			}
			worst = max(worst, lag.Bytes)
		}
		if worst >= 0 && worst <= dip {
			return
		}
		select {
		case <-ctx.Done():
			log.Info("lag did not dip before the fence; fencing anyway (lag is under the plan's thresholds)", zap.Int64("lag_bytes", worst), zap.Int64("dip_bytes", dip))
			return
		case <-time.After(lagDipPoll):
		}
	}
}
