package driver

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"go.uber.org/zap"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/consistency"
	cpg "github.com/cutover/cutover/consistency/postgres"
	"github.com/cutover/cutover/fencing"
	fpg "github.com/cutover/cutover/fencing/postgres"
	"github.com/cutover/cutover/internal/clock"
	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/replication"
	rpg "github.com/cutover/cutover/replication/postgres"
	"github.com/cutover/cutover/switch/health"
	"github.com/cutover/cutover/switch/target"
)

// copying: fence green against application writes (it must never take one
// before the flip), then copy and start streaming.
func (rt *planRT) copying(ctx context.Context, plan agent.Plan, p agent.Proposer, log *zap.Logger) error {
	epoch, err := p.Intent(ctx, plan.Name, "replicate", plan.Epoch)
	if err != nil {
		return err
	}
	if err := rt.forEach(func(pr *pairRT) error {
		if err := pr.greenFence.Fence(ctx, epoch); err != nil {
			return err
		}
		// Since when green has been fenced (an earlier plan's fence is
		// adopted, with its time): a copy may empty what only cutover
		// wrote there meanwhile (a retried plan).
		st, err := pr.greenFence.State(ctx)
		pr.greenFencedSince = st.Since
		return err
	}); err != nil {
		return rt.abort(ctx, plan.Name, p, epoch, "fence green: "+err.Error())
	}
	for _, pr := range rt.pairs {
		if err := rt.ensureForward(ctx, pr, epoch); err != nil {
			if isPrecheck(err) {
				return rt.abort(ctx, plan.Name, p, epoch, err.Error())
			}
			return err
		}
	}
	log.Info("copying")
	if err := rt.waitStreaming(ctx); err != nil {
		return err
	}
	facts := map[string]string{}
	for _, pr := range rt.pairs {
		maps.Copy(facts, pr.nameFacts())
		facts["copied_rows."+pr.cfg.Name] = fmt.Sprint(pr.fwd.Status().Copy.Rows)
	}
	return p.Outcome(ctx, plan.Name, epoch, agent.Outcome{OK: true, To: agent.PhaseReplicating, Detail: "initial copy done; streaming", Reason: "initial copy done", Facts: facts})
}

func isPrecheck(err error) bool { return errors.Is(err, replication.ErrPrecheck) }

// streamingAndVerified makes sure every pair streams (a new leader resumes
// from green's stored position) and this term's online verification ran.
func (rt *planRT) streamingAndVerified(ctx context.Context, plan agent.Plan, p agent.Proposer) error {
	for _, pr := range rt.pairs {
		if err := rt.ensureForward(ctx, pr, plan.Epoch); err != nil {
			return err
		}
	}
	if err := rt.waitStreaming(ctx); err != nil {
		return err
	}
	return rt.online(ctx, plan, p)
}

// replicating: stream, verify online, and wait until lag has stayed under
// the plan's thresholds for its hold time.
func (rt *planRT) replicating(ctx context.Context, plan agent.Plan, p agent.Proposer, log *zap.Logger) error {
	if err := rt.streamingAndVerified(ctx, plan, p); err != nil {
		return err
	}
	if err := rt.lagGate(ctx, rt.spec.Lag.Hold.D(), log); err != nil {
		return err
	}
	if err := rt.checkDrift(ctx); err != nil {
		if errors.Is(err, errDrift) {
			return rt.abort(ctx, plan.Name, p, plan.Epoch, err.Error())
		}
		return err // the schemas could not be read (a lost connection): retried
	}
	if err := rt.checkScope(ctx); err != nil {
		return err
	}
	if err := rt.privilegeParity(ctx, plan.Epoch); err != nil {
		return err // stays in replicating with the reason: grants can be fixed
	}
	_, err := p.Transition(ctx, plan.Name, agent.PhaseReady, plan.Epoch, "lag under threshold for the hold time; online verification clean; schemas match")
	return err
}

// online runs the online verification pass once per term.
func (rt *planRT) online(ctx context.Context, plan agent.Plan, p agent.Proposer) error {
	if rt.onlineClean || !verifyEnabled(rt.spec) {
		return nil
	}
	if err := rt.d.fault("before online verification"); err != nil {
		return err
	}
	for _, pr := range rt.pairs {
		rep, err := rt.verify(ctx, pr, consistency.PassOnline)
		if err != nil {
			return err
		}
		if rep.Verdict == consistency.Different {
			return rt.abort(ctx, plan.Name, p, plan.Epoch, fmt.Sprintf("online verification of %s found %s", pr.cfg.Name, describe(rep)))
		}
	}
	rt.onlineClean = true
	return nil
}

// refresh re-checks online what the dirty sets hold, up to three times
// while that keeps shrinking them, so that the pass inside the fence is
// small.
func (rt *planRT) refresh(ctx context.Context, plan agent.Plan, p agent.Proposer, log *zap.Logger) error {
	if !verifyEnabled(rt.spec) {
		return nil
	}
	for _, pr := range rt.pairs {
		v, err := rt.verifier(ctx, pr)
		if err != nil {
			return err
		}
		for i := 0; i < 3; i++ {
			before := pr.dirty.Stats()
			rep, err := v.Refresh(ctx, pr.tables, waiter{pr}, pr.dirty)
			if err != nil {
				return err
			}
			if rep.Verdict == consistency.Different {
				return rt.abort(ctx, plan.Name, p, plan.Epoch, fmt.Sprintf("online re-check of %s found %s", pr.cfg.Name, describe(rep)))
			}
			after := pr.dirty.Stats()
			log.Debug("online re-check", zap.String("pair", pr.cfg.Name), zap.Int("keys_before", before.Keys), zap.Int("keys_after", after.Keys), zap.Int("ranges_after", after.Ranges))
			if after.Ranges == 0 && after.WholeTables == 0 && after.Keys*2 >= before.Keys {
				break
			}
		}
	}
	return nil
}

func verifyEnabled(spec config.Plan) bool { return spec.Verify.Enabled == nil || *spec.Verify.Enabled }

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

func (rt *planRT) checkDrift(ctx context.Context) error {
	var problems []string
	for _, pr := range rt.pairs {
		diffs, err := pr.fwd.CompareSchemas(ctx)
		if err != nil {
			return fmt.Errorf("compare schemas of %s: %w", pr.cfg.Name, err)
		}
		for _, d := range diffs {
			problems = append(problems, pr.cfg.Name+": "+d.String())
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("%w: %s", errDrift, strings.Join(problems, "; "))
	}
	return nil
}

// errDrift means the schemas differ: the plan aborts. Failing to read them
// is retried.
var errDrift = errors.New("schema drift")

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
	if err := rt.checkDrift(ctx); err != nil {
		if errors.Is(err, errDrift) {
			return rt.abort(ctx, plan.Name, p, plan.Epoch, err.Error())
		}
		return err // the schemas could not be read (a lost connection): retried
	}
	if err := rt.checkScope(ctx); err != nil {
		return err
	}
	if err := rt.privilegeParity(ctx, plan.Epoch); err != nil {
		return err
	}
	// Made ready before the refresh: the rows written while this runs
	// (a few hundred ms) would otherwise all be re-hashed in the fence.
	if err := rt.readyWindow(ctx, func(pr *pairRT) (*fpg.Fencer, *rpg.Replicator) { return pr.blueFence, pr.fwd }); err != nil {
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
	grace := rt.spec.Fence.DrainGrace.D()
	w := fencing.Window{
		Max: maxWindow(rt.spec),
		// Invariant 4 starts here: from now on no application write lands
		// on blue.
		// Fence, drain and marker go in two round trips per pair
		// (FenceDrain, holding the drain's lock): on a busy server every
		// round trip inside the outage costs milliseconds.
		Fence: func(ctx context.Context) error {
			now := clock.Now().UnixNano()
			rt.fenceStart.Store(now)
			rt.lastFenceStart.Store(now)
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
			{Name: "drain", Run: func(ctx context.Context) error {
				terminated := 0
				for _, pr := range rt.pairs {
					for _, s := range pr.terminated {
						log.Warn("terminated a session still writing after the grace period", zap.String("pair", pr.cfg.Name), zap.Int32("pid", s.PID), zap.String("user", s.User), zap.String("application", s.Application), zap.Duration("xact_age", s.XactAge))
					}
					terminated += len(pr.terminated)
				}
				facts := map[string]string{"terminated_sessions": itoa(terminated)}
				if at := rt.fenceStart.Load(); at != 0 {
					// For the write outage, whichever leader flips.
					facts["fence_started_at"] = time.Unix(0, at).UTC().Format(time.RFC3339Nano)
				}
				for _, pr := range rt.pairs {
					facts["marker."+pr.cfg.Name] = pr.marker.Nonce + "@" + pr.marker.Position
				}
				// Invariant: every write transaction begun before the fence
				// has ended; the marker was written after all of them.
				return p.Outcome(ctx, plan.Name, epoch, agent.Outcome{OK: true, To: agent.PhaseFenced, Detail: fmt.Sprintf("fenced and drained; %d sessions terminated", terminated), Reason: "blue fenced and drained", Facts: facts})
			}},
			{Name: "catch_up", Run: func(ctx context.Context) error {
				if err := rt.d.fault("before catch-up"); err != nil {
					return err
				}
				err := rt.forEach(func(pr *pairRT) error {
					// Sequences are not in the stream: blue's are final
					// once drained (inserts are fenced), so they are
					// synced while the marker travels, off the outage's
					// critical path.
					began := time.Now()
					synced := make(chan error, 1)
					var syncTook time.Duration
					go func() {
						err := pr.fwd.SyncSequences(ctx)
						syncTook = time.Since(began)
						synced <- err
					}()
					lsn, err := pglogrepl.LSN(0), error(nil)
					if !skipCatchUpProof { // false but in a mutant build (mutation.go)
						lsn, err = pr.fwd.WaitMarker(ctx, pr.marker.Nonce)
					}
					markerTook := time.Since(began)
					if err == nil && !skipCatchUpProof {
						pr.markerLSN = lsn
						err = breachCheck(pr)
					}
					if serr := <-synced; err == nil && serr != nil {
						err = fmt.Errorf("sync sequences: %w", serr)
					}
					log.Info("caught up", zap.String("pair", pr.cfg.Name), zap.Duration("marker_applied_after", markerTook), zap.Duration("sequences_synced_after", syncTook), zap.Error(err))
					return err
				})
				if err != nil {
					return err
				}
				// Invariant 4: every write acknowledged on blue before the
				// fence is applied on green.
				e, err := p.Transition(ctx, plan.Name, agent.PhaseCaughtUp, epoch, "fence marker applied on green; sequences synced")
				latest.Store(e)
				return err
			}},
			{Name: "verify", Run: func(ctx context.Context) error {
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
				e, err := p.Transition(ctx, plan.Name, agent.PhaseVerified, latest.Load(), "rows changed since the online pass are equal on both sides")
				latest.Store(e)
				return err
			}},
			{Name: "authorize", Run: func(ctx context.Context) error {
				if err := rt.d.fault("before authorize"); err != nil {
					return err
				}
				// Writers held since the drain that the fence would not
				// stop (roles outside it) would land on blue once the hold
				// is released: a breach, caught before it lands.
				// The hold must still be there: once lost, such writers
				// may have landed unseen.
				err := rt.forEach(func(pr *pairRT) error {
					if err := pr.blueFence.CheckHold(ctx); err != nil {
						return err
					}
					return heldBreachCheck(ctx, pr.blueFence, "blue", pr.cfg.Name)
				})
				if err != nil {
					return err
				}
				e, err := p.Transition(ctx, plan.Name, agent.PhaseAuthorized, latest.Load(), "caught up and verified: the gate opens")
				latest.Store(e)
				return err
			}},
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
	rt.fenceStart.Store(0)
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
		cancelled, err := pr.blueFence.ReleaseRefusingAll(ctx)
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
func (rt *planRT) readyWindow(ctx context.Context, sides func(pr *pairRT) (*fpg.Fencer, *rpg.Replicator)) error {
	return rt.forEach(func(pr *pairRT) error {
		f, r := sides(pr)
		if err := f.Warm(ctx); err != nil {
			return err
		}
		return r.ResolveSequences(ctx)
	})
}

// privilegeParity fails, listing the differences, unless every fenced role
// will have on green once unfenced what it has on blue: else the flip
// sends the application to a green it cannot write. Green is fenced again
// first, so that what an operator granted there to fix a difference is
// saved for the unfence, not left for the application to write with.
func (rt *planRT) privilegeParity(ctx context.Context, epoch uint64) error {
	return rt.forEach(func(pr *pairRT) error {
		if err := pr.greenFence.Fence(ctx, epoch); err != nil {
			return err
		}
		diffs, err := fpg.PrivilegeParity(ctx, pr.blueFence, pr.greenFence)
		if err != nil {
			return fmt.Errorf("privilege parity: %w", err)
		}
		if len(diffs) > 0 {
			return fmt.Errorf("the application's privileges on green once unfenced differ from blue's (grant them on green): %s", strings.Join(diffs, "; "))
		}
		return nil
	})
}

// loginSettle is how long after locking green's logins its grants come
// back (see fpg.ShiftToLogins): far longer than a backend takes from its
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
		_, err := pr.greenFence.ShiftToLogins(ctx, epoch, loginSettle, mode == config.GreenFenceLogins)
		if (errors.Is(err, fpg.ErrLoginFenceUnavailable) || errors.Is(err, fpg.ErrLoginFenceUnsafe)) && mode != config.GreenFenceLogins {
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
	return breachCheckOn(pr.fwd, pr.markerLSN)
}

func breachCheckOn(r *rpg.Replicator, markerLSN pglogrepl.LSN) error {
	changes, complete := r.ChangesAfter(markerLSN)
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
func heldBreachCheck(ctx context.Context, f *fpg.Fencer, side, pair string) error {
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
	f := target.Flip{Plan: plan.Name, From: "blue", To: "green", Epoch: epoch, Positions: positions, At: clock.Now().UTC()}
	// Green takes writes from here; blue stays fenced (invariant 1).
	if err := rt.forEach(func(pr *pairRT) error { return pr.greenFence.Unfence(ctx, epoch) }); err != nil {
		if errors.Is(err, fpg.ErrLoginBreach) && ctx.Err() == nil {
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

// writeOutage is the time since the fence on blue began: this leader's
// clock when it fenced (lastFenceStart, nanoseconds), else the fact the
// drain recorded (another leader fenced).
func writeOutage(lastFenceStart int64, fact string) (time.Duration, bool) {
	if lastFenceStart != 0 {
		return clock.Since(time.Unix(0, lastFenceStart)), true
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
		ts, err := buildTargets(rt.spec)
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

func buildTargets(spec config.Plan) ([]target.Target, error) {
	var out []target.Target
	for i, tc := range spec.Switch.Targets {
		t, err := target.New(tc)
		if err != nil {
			return nil, fmt.Errorf("switch target %d: %w", i, err)
		}
		out = append(out, t)
	}
	return out, nil
}

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
	rb := rt.spec.Rollback
	rt.goBackground(func() {
		watch := clock.Until(flippedAt.Add(rb.Watch.D()))
		if watch <= 0 || len(rb.Checks) == 0 {
			return
		}
		w := health.Watcher{Checks: healthChecks(rb.Checks), Interval: rb.Interval.D(), Period: watch, Failures: rb.Failures}
		if err := w.Watch(ctx); err != nil && errors.Is(err, health.ErrUnhealthy) {
			log.Error("automatic rollback", zap.Error(err))
			p.Transition(ctx, plan.Name, agent.PhaseRollingBack, plan.Epoch, "automatic rollback: "+err.Error())
		}
	}, func() {
		select {
		case <-ctx.Done():
		case <-time.After(clock.Until(flippedAt.Add(rb.Window.D()))):
			p.Transition(ctx, plan.Name, agent.PhaseDone, plan.Epoch, "rollback window closed")
		}
	})
	return nil
}

func healthChecks(cs []config.HealthCheck) []health.Check {
	var out []health.Check
	for _, c := range cs {
		switch c.Type {
		case "http":
			out = append(out, health.HTTP{URL: c.URL, Status: c.Status, MaxLatency: c.MaxLatency.D()})
		case "query":
			out = append(out, health.Query{DSN: c.DSN.Reveal(), SQL: c.Query, Max: c.Max})
		}
	}
	return out
}

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
	if err := rt.readyWindow(ctx, func(pr *pairRT) (*fpg.Fencer, *rpg.Replicator) { return pr.greenFence, pr.rev }); err != nil {
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
				return rt.forEachIndexed(func(i int, pr *pairRT) error {
					synced := make(chan error, 1)
					go func() { synced <- pr.rev.SyncSequences(ctx) }()
					lsn, err := pr.rev.WaitMarker(ctx, markers[i].Nonce)
					if err == nil {
						err = breachCheckOn(pr.rev, lsn)
					}
					if serr := <-synced; err == nil && serr != nil {
						err = fmt.Errorf("sync sequences: %w", serr)
					}
					return err
				})
			}},
			{Name: "held_writers", Run: func(ctx context.Context) error {
				return rt.forEach(func(pr *pairRT) error { return heldBreachCheck(ctx, pr.greenFence, "green", pr.cfg.Name) })
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

// finalizePair releases a finished plan's slots and publications in both
// directions, and unfences blue of an aborted plan (an operator may abort a
// fenced plan through the API). Green stays fenced after an abort.
func finalizePair(ctx context.Context, d *Driver, spec config.Plan, pair config.Pair, plan agent.Plan) error {
	var errs []error
	fwd, rev := rpg.PlanNames(spec.Name, pair.Name, plan.Facts)
	for _, c := range []struct {
		pair config.Pair
		name string
	}{{pair, fwd}, {reversePair(pair), rev}} {
		if _, err := rpg.Cleanup(ctx, spec.Name, c.pair, c.name, d.log); err != nil {
			errs = append(errs, err)
		}
	}
	if plan.Phase == agent.PhaseAborted {
		if err := unfenceSide(ctx, d, spec, pair, "blue", pair.Blue.DSN, plan.Epoch); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func unfenceSide(ctx context.Context, d *Driver, spec config.Plan, pair config.Pair, side string, dsn config.DSN, epoch uint64) error {
	pool, err := openPool(ctx, dsn, side, 6)
	if err != nil {
		return err
	}
	defer pool.Close()
	tables, err := fenceTables(ctx, pool, pair.Scope)
	if err != nil {
		return fmt.Errorf("%s: %w", side, err)
	}
	f := fpg.New(pool, fpg.Options{Plan: spec.Name, Pair: pair.Name, Tables: tables, Roles: pair.FenceRoles, Logger: d.log.With(zap.String("side", side))})
	if err := f.Prepare(ctx); err != nil {
		return fmt.Errorf("%s: %w", side, err)
	}
	if err := f.Unfence(ctx, epoch); err != nil && !errors.Is(err, fencing.ErrStaleEpoch) {
		return fmt.Errorf("%s: %w", side, err)
	}
	return nil
}

// verifier returns the pair's verifier, opening its connections on first
// use. It is kept for the term, so that the pass inside the fence neither
// connects nor reads the catalogs again.
func (rt *planRT) verifier(ctx context.Context, pr *pairRT) (*consistency.Verifier, error) {
	if pr.verifier != nil {
		return pr.verifier, nil
	}
	par := max(rt.spec.Verify.Parallel, 1)
	blue, err := cpg.Open(ctx, pr.cfg.Blue.DSN.Reveal(), par+2)
	if err != nil {
		return nil, fmt.Errorf("blue: %w", err)
	}
	green, err := cpg.Open(ctx, pr.cfg.Green.DSN.Reveal(), par+2)
	if err != nil {
		blue.Close()
		return nil, fmt.Errorf("green: %w", err)
	}
	pr.blueDB, pr.greenDB = blue, green
	v := consistency.NewVerifier(blue, green, consistency.Options{
		Plan: rt.spec.Name, BlueDSN: pr.cfg.Blue.DSN.String(), GreenDSN: pr.cfg.Green.DSN.String(),
		ChunkTime: rt.spec.Verify.ChunkTime.D(), Parallel: par, MaxRowsPerSecond: rt.spec.Verify.MaxRowsPerSecond,
		Logger: rt.d.log.With(zap.String("plan", rt.spec.Name), zap.String("pair", pr.cfg.Name)),
	})
	pr.live.Lock()
	pr.verifier = v
	pr.live.Unlock()
	return v, nil
}

// verify runs one verification pass on a pair and writes its report.
func (rt *planRT) verify(ctx context.Context, pr *pairRT, pass consistency.Pass) (*consistency.Report, error) {
	v, err := rt.verifier(ctx, pr)
	if err != nil {
		return nil, err
	}
	var rep *consistency.Report
	switch pass {
	case consistency.PassOnline:
		rep, err = v.Online(ctx, pr.tables, waiter{pr}, pr.dirty)
	case consistency.PassDirty:
		rep, err = v.Dirty(ctx, pr.tables, pr.dirty)
	default:
		rep, err = v.Full(ctx, pr.tables)
	}
	if rep != nil {
		name := fmt.Sprintf("%s-%s-%s-%s", rt.spec.Name, pr.cfg.Name, pass, clock.Now().UTC().Format("20060102T150405.000"))
		write := func() {
			if _, werr := rt.d.writeReport(name, func(j, h string) error { return writeReportFiles(rep, j, h) }); werr != nil {
				rt.d.log.Warn("write consistency report", zap.Error(werr))
			}
		}
		if pass == consistency.PassDirty {
			// Inside the fence: the report is written off the outage's path.
			rt.bgWrite(write)
		} else {
			write()
		}
	}
	return rep, err
}

// waiter lets an online pass compare a chunk after green has applied past
// the position at which blue was read.
type waiter struct{ pr *pairRT }

func (w waiter) BluePosition(ctx context.Context) (string, error) {
	var lsn string
	err := w.pr.bluePool.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text").Scan(&lsn)
	return lsn, err
}

func (w waiter) WaitGreenApplied(ctx context.Context, pos string) error {
	want, err := pglogrepl.ParseLSN(pos)
	if err != nil {
		return err
	}
	// The heartbeat commits on blue every few hundred ms, so the applied
	// position passes any position blue had.
	for w.pr.fwd.Applied() < want {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-w.pr.fwd.Done():
			return fmt.Errorf("replication stopped: %v", w.pr.fwd.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
	return nil
}

func describe(rep *consistency.Report) string {
	var parts []string
	for _, t := range rep.Tables {
		for _, d := range t.Differences {
			parts = append(parts, fmt.Sprintf("%s %s key %v", t.Name, d.Kind, d.Key))
			if len(parts) >= 5 {
				break
			}
		}
	}
	if len(parts) == 0 {
		return string(rep.Verdict)
	}
	return string(rep.Verdict) + ": " + strings.Join(parts, "; ")
}
