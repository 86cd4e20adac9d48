package driver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cutover/cutover/consistency"
	"github.com/cutover/cutover/engine"
	"github.com/cutover/cutover/fencing"
	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/switch/target"
)

// fenceMark is when a fence began: mono (with Go's monotonic reading) for
// the durations this leader measures, so that a jump of the wall clock
// does not enter the outage figures; wall for the fact another leader
// may need (fence_started_at).
type fenceMark struct {
	mono time.Time
	wall time.Time
}

// planRT is what the leader holds for one plan during one term.
type planRT struct {
	ctx   context.Context // the term's context for this plan
	d     *Driver
	spec  config.Plan
	pairs []*pairRT

	onlineClean bool // this term's online verification passed
	// fenceStart is when the current cutover window's fence began, nil
	// when no window runs.
	fenceStart atomic.Pointer[fenceMark]
	// lastFenceStart is when this term's last window began (nil: none),
	// so that the flip can tell the whole write outage: fence to traffic
	// on green.
	lastFenceStart atomic.Pointer[fenceMark]
	// flippedAt is when this term flipped the traffic to green (nil: it
	// did not), so that its rollback window and watch run on the
	// monotonic clock.
	flippedAt atomic.Pointer[fenceMark]

	// targets are the flip targets, built once (switchTargets).
	targetsMu sync.Mutex
	targets   []target.Target
	// Pools (target.Pauser): pausedAt is when this term paused them (unix
	// nanoseconds, 0: not paused by this term); mustResume says they may
	// be paused (by this term or a deposed leader) until a flip or an
	// abort resumes them; leftPausedChecked: this term has resumed what a
	// deposed leader may have left paused before its window (pause.go).
	pausedAt          atomic.Int64
	mustResume        atomic.Bool
	leftPausedChecked bool

	// Background work of the switched phase (health watch, window timer);
	// bgMu orders starting it with close waiting for it.
	bgMu      sync.Mutex
	bgStarted bool
	closed    bool
	bg        sync.WaitGroup
}

// bgWrite runs fn in a goroutine that close waits for.
func (rt *planRT) bgWrite(fn func()) {
	rt.bgMu.Lock()
	defer rt.bgMu.Unlock()
	if rt.closed {
		return
	}
	rt.bg.Add(1)
	go func() { defer rt.bg.Done(); fn() }()
}

// goBackground runs each fn once per term in its own goroutine, owned by
// the runtime: close waits for them.
func (rt *planRT) goBackground(fns ...func()) {
	rt.bgMu.Lock()
	defer rt.bgMu.Unlock()
	if rt.bgStarted || rt.closed {
		return
	}
	rt.bgStarted = true
	for _, fn := range fns {
		rt.bg.Add(1)
		go func() { defer rt.bg.Done(); fn() }()
	}
}

// pairRT is what the leader holds for one pair.
type pairRT struct {
	cfg config.Pair
	// greenFencedSince is when green's fence went up, read at copying
	// (engine.StreamOptions.GreenFencedSince).
	greenFencedSince time.Time
	// greenGrantsOnly: green's fence stays on its grants (the agent's role
	// may not lock logins; see shiftGreenToLogins).
	greenGrantsOnly bool

	// pair is the engine's side of the pair (engine.Pair): its
	// connections, its scope and its fences.
	pair                  engine.Pair
	blueFence, greenFence engine.Fencer

	dirty *consistency.DirtySet
	fwd   engine.Stream // blue -> green
	rev   engine.Stream // green -> blue, after the flip
	// revPrepared is the reverse replication made ready before the
	// window (connected, checked, publication created), started at the
	// flip (prepareReverse).
	revPrepared engine.PreparedStream

	marker fencing.Marker
	// terminated: sessions the drain ended (said in the log and audit).
	terminated []fencing.Session
	// markerPos is where the fence marker was applied in the forward
	// stream (opaque: only its engine reads it).
	markerPos engine.Position

	verifier engine.Verifier

	// live guards fwd and verifier for Live, which API handlers call, and
	// the streams for close, which runs when the term ends.
	live sync.Mutex
}

func (pr *pairRT) setFwd(r engine.Stream) {
	pr.live.Lock()
	pr.fwd = r
	pr.live.Unlock()
}

// setReverse sets the reverse streams, which close reads from another
// goroutine (the term's end).
func (pr *pairRT) setReverse(rev engine.Stream, prepared engine.PreparedStream) {
	pr.live.Lock()
	pr.rev, pr.revPrepared = rev, prepared
	pr.live.Unlock()
}

// streams are what close stops.
func (pr *pairRT) streams() []interface{ Stop(context.Context) error } {
	pr.live.Lock()
	defer pr.live.Unlock()
	var out []interface{ Stop(context.Context) error }
	if pr.fwd != nil {
		out = append(out, pr.fwd)
	}
	if pr.rev != nil {
		out = append(out, pr.rev)
	}
	if pr.revPrepared != nil {
		out = append(out, pr.revPrepared)
	}
	return out
}

// fwdRunning is the forward replicator, for Live.
func (pr *pairRT) fwdRunning() engine.Stream {
	pr.live.Lock()
	defer pr.live.Unlock()
	return pr.fwd
}

// verifierNow is the verifier, for Live.
func (pr *pairRT) verifierNow() engine.Verifier {
	pr.live.Lock()
	defer pr.live.Unlock()
	return pr.verifier
}

func newPlanRT(ctx context.Context, d *Driver, spec config.Plan, facts map[string]string) (*planRT, error) {
	rt := &planRT{ctx: ctx, d: d, spec: spec}
	for _, pc := range spec.Pairs {
		eng, err := d.opts.Engines.Lookup(pc.Engine)
		if err != nil {
			rt.close()
			return nil, fmt.Errorf("pair %s: %w", pc.Name, err)
		}
		pr := &pairRT{cfg: pc, dirty: consistency.NewDirtySet(0)}
		// Everything that can happen before the fence happens here.
		pr.pair, err = eng.Open(ctx, engine.PairOptions{Plan: spec, Pair: pc, Facts: facts, Logger: d.log, Registerer: d.opts.Registerer})
		if err != nil {
			rt.close()
			return nil, fmt.Errorf("pair %s: %w", pc.Name, err)
		}
		pr.blueFence, pr.greenFence = pr.pair.Fence(engine.Blue), pr.pair.Fence(engine.Green)
		rt.pairs = append(rt.pairs, pr)
	}
	return rt, nil
}

// close stops everything this term started for the plan. Fences stay as
// they are: the next leader decides.
func (rt *planRT) close() {
	rt.bgMu.Lock()
	rt.closed = true
	rt.bgMu.Unlock()
	rt.bg.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rt.targetsMu.Lock()
	for _, t := range rt.targets {
		if c, ok := t.(io.Closer); ok {
			c.Close()
		}
	}
	rt.targets = nil
	rt.targetsMu.Unlock()
	for _, pr := range rt.pairs {
		// Read under the lock: the term's last step may still be running.
		for _, r := range pr.streams() {
			r.Stop(ctx)
		}
		// The engine releases the fences' sessions and closes its pools.
		if pr.pair != nil {
			pr.pair.Close()
		}
	}
}

// ensureForward starts (or resumes) blue -> green replication.
func (rt *planRT) ensureForward(ctx context.Context, pr *pairRT, epoch uint64) error {
	if pr.fwd != nil {
		select {
		case <-pr.fwd.Done():
			err := pr.fwd.Err()
			pr.setFwd(nil)
			if err != nil {
				return fmt.Errorf("replication of %s stopped: %w", pr.cfg.Name, err)
			}
		default:
			return nil
		}
	}
	r, err := pr.pair.Forward(engine.StreamOptions{Epoch: epoch, GreenFencedSince: pr.greenFencedSince, OnRowChange: pr.dirty.MarkChanged})
	if err != nil {
		return err
	}
	if err := r.Start(rt.ctx); err != nil {
		return fmt.Errorf("start replication of %s: %w", pr.cfg.Name, err)
	}
	pr.setFwd(r)
	return nil
}

// ensureReverse starts (or resumes) green -> blue replication. It must
// first be called while both sides are fenced and equal: the reverse
// stream then starts at that point, without a copy.
func (rt *planRT) ensureReverse(ctx context.Context, pr *pairRT, epoch uint64) error {
	if pr.rev != nil {
		select {
		case <-pr.rev.Done():
			err := pr.rev.Err()
			pr.setReverse(nil, pr.revPrepared)
			if err != nil {
				return fmt.Errorf("reverse replication of %s stopped: %w", pr.cfg.Name, err)
			}
		default:
			return nil
		}
	}
	prep := pr.revPrepared
	pr.setReverse(pr.rev, nil)
	if prep == nil {
		r, err := pr.pair.Reverse(epoch)
		if err != nil {
			return err
		}
		if err := r.Start(rt.ctx); err != nil {
			return fmt.Errorf("start reverse replication of %s: %w", pr.cfg.Name, err)
		}
		pr.setReverse(r, nil)
		return nil
	}
	// Its slot was created before the window: it streams from green's
	// position now, with everything blue wrote applied (caught up) and
	// nothing of the application yet (green is still fenced).
	r, err := prep.Start(ctx, rt.ctx, epoch)
	if err != nil {
		return err
	}
	pr.setReverse(r, nil)
	return nil
}

// prepareReverse readies the reverse replication before the window: it
// connects, checks, creates the publication and the slot on green, all
// of which kept the application from a writable green for 150-300 ms when
// done at the flip. The flip only records where it streams from: green's
// position once caught up, before green is unfenced (ensureReverse);
// what green applied from blue before that is skipped.
func (rt *planRT) prepareReverse(ctx context.Context, pr *pairRT, epoch uint64) error {
	if pr.rev != nil || pr.revPrepared != nil {
		return nil
	}
	r, err := pr.pair.PrepareReverse(ctx, epoch)
	if err != nil {
		return err
	}
	pr.setReverse(pr.rev, r)
	return nil
}

// forEach runs fn for every pair at once and joins the errors.
func (rt *planRT) forEach(fn func(pr *pairRT) error) error {
	return rt.forEachIndexed(func(_ int, pr *pairRT) error { return fn(pr) })
}

// forEachIndexed is forEach, telling fn the pair's index in rt.pairs.
func (rt *planRT) forEachIndexed(fn func(i int, pr *pairRT) error) error {
	errs := make([]error, len(rt.pairs))
	var wg sync.WaitGroup
	for i, pr := range rt.pairs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(i, pr); err != nil {
				errs[i] = fmt.Errorf("pair %s: %w", pr.cfg.Name, err)
			}
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// waitStreaming waits until every forward replicator has finished its copy.
func (rt *planRT) waitStreaming(ctx context.Context) error {
	for {
		done := true
		for _, pr := range rt.pairs {
			select {
			case <-pr.fwd.Done():
				return fmt.Errorf("replication of %s stopped: %v", pr.cfg.Name, pr.fwd.Err())
			default:
			}
			if !pr.fwd.Status().Streaming {
				done = false
			}
		}
		if done {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}
