package driver

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/consistency"
	"github.com/cutover/cutover/engine"
)

// The named steps of a window (fencing.Window): drain, catch-up, verify
// and authorize on the way forward (cutover); catch-up and the held
// writers' check, shared, on the way back (rollback).

// window is one cutover window in progress: what its steps share.
type window struct {
	rt    *planRT
	plan  agent.Plan
	p     agent.Proposer
	log   *zap.Logger
	epoch uint64 // the fence intent's
	// latest is the newest epoch: what the lift must carry.
	latest *atomic.Uint64
}

// drain records that blue is fenced and drained, with the marker of each
// pair and the sessions the drain ended.
func (w *window) drain(ctx context.Context) error {
	rt, log := w.rt, w.log
	terminated := 0
	for _, pr := range rt.pairs {
		for _, s := range pr.terminated {
			log.Warn("terminated a session still writing after the grace period", zap.String("pair", pr.cfg.Name), zap.Int32("pid", s.PID), zap.String("user", s.User), zap.String("application", s.Application), zap.Duration("xact_age", s.XactAge))
		}
		terminated += len(pr.terminated)
	}
	facts := map[string]string{"terminated_sessions": itoa(terminated)}
	if m := rt.fenceStart.Load(); m != nil {
		// For the write outage, whichever leader flips.
		facts["fence_started_at"] = m.wall.UTC().Format(time.RFC3339Nano)
	}
	for _, pr := range rt.pairs {
		facts["marker."+pr.cfg.Name] = pr.marker.Nonce + "@" + pr.marker.Position
	}
	// Invariant: every write transaction begun before the fence
	// has ended; the marker was written after all of them.
	return w.p.Outcome(ctx, w.plan.Name, w.epoch, agent.Outcome{OK: true, To: agent.PhaseFenced, Detail: fmt.Sprintf("fenced and drained; %d sessions terminated", terminated), Reason: "blue fenced and drained", Facts: facts})
}

// catchUp proves through the forward stream that green applied blue's
// fence marker and nothing after it (catchUp), then records caught_up.
func (w *window) catchUp(ctx context.Context) error {
	rt := w.rt
	if err := rt.d.fault("before catch-up"); err != nil {
		return err
	}
	err := rt.catchUp(ctx, catchUp{
		stream: func(pr *pairRT) engine.Stream { return pr.fwd },
		nonce:  func(_ int, pr *pairRT) string { return pr.marker.Nonce },
		proof:  !skipCatchUpProof, // true but in a mutant build (mutation.go)
		caught: func(pr *pairRT, pos engine.Position) { pr.markerPos = pos },
		log:    w.log,
	})
	if err != nil {
		return err
	}
	// Invariant 4: every write acknowledged on blue before the
	// fence is applied on green.
	e, err := w.p.Transition(ctx, w.plan.Name, agent.PhaseCaughtUp, w.epoch, "fence marker applied on green; sequences synced")
	w.latest.Store(e)
	return err
}

// verify compares, inside the fence, the rows the stream changed since the
// online pass, then records verified.
func (w *window) verify(ctx context.Context) error {
	rt, log := w.rt, w.log
	if err := rt.d.fault("before verify"); err != nil {
		return err
	}
	if verifyEnabled(rt.spec) {
		err := rt.forEach(func(pr *pairRT) error {
			rep, err := rt.verify(ctx, pr, consistency.PassDirty)
			if err != nil {
				return err
			}
			log.Info("verified in the fence", zap.String("pair", pr.cfg.Name), zap.Int64("rows_blue", rep.Totals.RowsBlue), zap.Int64("rows_green", rep.Totals.RowsGreen),
				zap.Int64("chunks", rep.Totals.Chunks), zap.Float64("seconds", rep.DurationSeconds))
			if rep.Verdict != consistency.Equal {
				return fmt.Errorf("verification in the fence found %s", describe(rep))
			}
			return breachCheck(pr)
		})
		if err != nil {
			return err
		}
	}
	e, err := w.p.Transition(ctx, w.plan.Name, agent.PhaseVerified, w.latest.Load(), "rows changed since the online pass are equal on both sides")
	w.latest.Store(e)
	return err
}

// authorize checks the held writers on blue (heldWriters), its hold still
// there, and opens the gate.
func (w *window) authorize(ctx context.Context) error {
	rt := w.rt
	if err := rt.d.fault("before authorize"); err != nil {
		return err
	}
	// The hold must still be there: once lost, writers of roles outside
	// the fence may have landed unseen.
	if err := rt.heldWriters(ctx, engine.Blue, true); err != nil {
		return err
	}
	e, err := w.p.Transition(ctx, w.plan.Name, agent.PhaseAuthorized, w.latest.Load(), "caught up and verified: the gate opens")
	w.latest.Store(e)
	return err
}

// catchUp says which stream a catch-up proves, and what it records.
type catchUp struct {
	stream func(pr *pairRT) engine.Stream
	// nonce is the fence marker's of pair i.
	nonce func(i int, pr *pairRT) string
	// proof: wait for the marker and check that nothing came after it
	// (false only in the forward mutant).
	proof bool
	// caught, when set, is told where the marker was applied.
	caught func(pr *pairRT, pos engine.Position)
	// log, when set, is told how long each pair took.
	log *zap.Logger
}

// catchUp proves, for every pair at once, that the stream applied the
// fence marker and carried no application change after it. Sequences are
// not in the stream: the fenced side's are final once drained (inserts
// are fenced), so they are synced while the marker travels, off the
// outage's critical path.
func (rt *planRT) catchUp(ctx context.Context, c catchUp) error {
	return rt.forEachIndexed(func(i int, pr *pairRT) error {
		s := c.stream(pr)
		began := time.Now()
		synced := make(chan error, 1)
		var syncTook time.Duration
		go func() {
			err := syncSequences(ctx, s)
			syncTook = time.Since(began)
			synced <- err
		}()
		var pos engine.Position
		var err error
		if c.proof {
			pos, err = s.WaitMarker(ctx, c.nonce(i, pr))
		}
		markerTook := time.Since(began)
		if err == nil && c.proof {
			if c.caught != nil {
				c.caught(pr, pos)
			}
			err = breachCheckOn(s, pos)
		}
		if serr := <-synced; err == nil && serr != nil {
			err = fmt.Errorf("sync sequences: %w", serr)
		}
		if c.log != nil {
			c.log.Info("caught up", zap.String("pair", pr.cfg.Name), zap.Duration("marker_applied_after", markerTook), zap.Duration("sequences_synced_after", syncTook), zap.Error(err))
		}
		return err
	})
}

// heldWriters fails when writers of roles outside the fence, held since
// the drain on the fenced side, would land once the hold is released: a
// breach, caught before it lands. checkHold: the hold must still be there
// (a fence whose drain holds, engine.HoldingFencer).
func (rt *planRT) heldWriters(ctx context.Context, side engine.Colour, checkHold bool) error {
	return rt.forEach(func(pr *pairRT) error {
		f := pr.blueFence
		if side == engine.Green {
			f = pr.greenFence
		}
		if h, ok := f.(engine.HoldingFencer); ok && checkHold {
			if err := h.CheckHold(ctx); err != nil {
				return err
			}
		}
		return heldBreachCheck(ctx, f, string(side), pr.cfg.Name)
	})
}
