package driver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/cutover/cutover/consistency"
	cpg "github.com/cutover/cutover/consistency/postgres"
	"github.com/cutover/cutover/fencing"
	fpg "github.com/cutover/cutover/fencing/postgres"
	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/internal/pgscope"
	"github.com/cutover/cutover/internal/redact"
	rpg "github.com/cutover/cutover/replication/postgres"
	"github.com/cutover/cutover/switch/target"
)

// planRT is what the leader holds for one plan during one term.
type planRT struct {
	ctx   context.Context // the term's context for this plan
	d     *Driver
	spec  config.Plan
	pairs []*pairRT

	onlineClean bool // this term's online verification passed
	// fenceStart is when the current cutover window's fence began (unix
	// nanoseconds), 0 when no window runs.
	fenceStart atomic.Int64
	// lastFenceStart is when this term's last window began (0: none), so
	// that the flip can tell the whole write outage: fence to traffic on
	// green.
	lastFenceStart atomic.Int64

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
	// (replication's Options.GreenFencedSince).
	greenFencedSince time.Time
	// greenGrantsOnly: green's fence stays on its grants (the agent's role
	// may not lock logins; see shiftGreenToLogins).
	greenGrantsOnly bool
	// scope is the pair's scope resolved on blue (internal/pgscope):
	// tables are its roots, what verification compares, as schema.table
	// (the verifier matches them exactly, case and all); fenceTables are
	// all of its tables, partitions included, as quoted identifiers.
	scopeMu     sync.Mutex
	scope       *pgscope.Set
	tables      []string
	fenceTables []string
	rootOf      map[string]string // partition -> its root, schema.table
	// fwdSlot and revSlot name the slots and publications of each
	// direction (rpg.PlanNames).
	fwdSlot, revSlot string

	bluePool, greenPool *pgxpool.Pool
	// The fences' own pools: their sessions are warmed for the fence
	// (fpg.Fencer.Warm) and never busy with other work.
	blueFencePool, greenFencePool *pgxpool.Pool
	blueFence                     *fpg.Fencer
	greenFence                    *fpg.Fencer

	dirty *consistency.DirtySet
	fwd   *rpg.Replicator // blue -> green
	rev   *rpg.Replicator // green -> blue, after the flip
	// revPrepared is the reverse replication made ready before the
	// window (connected, checked, publication created), started at the
	// flip (prepareReverse).
	revPrepared *rpg.Replicator

	marker fencing.Marker
	// terminated: sessions the drain ended (said in the log and audit).
	terminated []fencing.Session
	markerLSN  pglogrepl.LSN

	blueDB, greenDB *cpg.DB
	verifier        *consistency.Verifier

	// live guards fwd and verifier for Live, which API handlers call.
	live sync.Mutex
}

func (pr *pairRT) setFwd(r *rpg.Replicator) {
	pr.live.Lock()
	pr.fwd = r
	pr.live.Unlock()
}

// fwdRunning is the forward replicator, for Live.
func (pr *pairRT) fwdRunning() *rpg.Replicator {
	pr.live.Lock()
	defer pr.live.Unlock()
	return pr.fwd
}

// verifierNow is the verifier, for Live.
func (pr *pairRT) verifierNow() *consistency.Verifier {
	pr.live.Lock()
	defer pr.live.Unlock()
	return pr.verifier
}

func newPlanRT(ctx context.Context, d *Driver, spec config.Plan, facts map[string]string) (*planRT, error) {
	rt := &planRT{ctx: ctx, d: d, spec: spec}
	for _, pc := range spec.Pairs {
		if pc.Engine != config.Postgres {
			rt.close()
			return nil, fmt.Errorf("pair %s: the plan driver supports postgres pairs; %s is not supported yet", pc.Name, pc.Engine)
		}
		pr := &pairRT{cfg: pc, dirty: consistency.NewDirtySet(0)}
		pr.fwdSlot, pr.revSlot = rpg.PlanNames(spec.Name, pc.Name, facts)
		rt.pairs = append(rt.pairs, pr)
		var err error
		if pr.bluePool, err = openPool(ctx, pc.Blue.DSN, "blue", 6); err != nil {
			rt.close()
			return nil, fmt.Errorf("pair %s: %w", pc.Name, err)
		}
		if pr.greenPool, err = openPool(ctx, pc.Green.DSN, "green", 6); err != nil {
			rt.close()
			return nil, fmt.Errorf("pair %s: %w", pc.Name, err)
		}
		set, err := pgscope.Resolve(ctx, pr.bluePool, pc.Scope)
		if err != nil {
			rt.close()
			return nil, fmt.Errorf("pair %s: blue: %w", pc.Name, err)
		}
		pr.setScope(set)
		log := d.log.With(zap.String("plan", spec.Name))
		// Blue's fenced writers wait on the drain's lock until the gate
		// opens instead of retrying against the fence, which on a busy
		// server takes the CPU the window's steps need; the hold never
		// outlives the window (the server ends it by itself if the agent
		// goes away).
		if pr.blueFencePool, err = openPool(ctx, pc.Blue.DSN, "blue", 3); err != nil {
			rt.close()
			return nil, fmt.Errorf("pair %s: %w", pc.Name, err)
		}
		if pr.greenFencePool, err = openPool(ctx, pc.Green.DSN, "green", 3); err != nil {
			rt.close()
			return nil, fmt.Errorf("pair %s: %w", pc.Name, err)
		}
		pr.blueFence = fpg.New(pr.blueFencePool, fpg.Options{Plan: spec.Name, Pair: pc.Name, Tables: pr.fenceTables, Roles: pc.FenceRoles, Hold: maxWindow(spec), WriteProxy: spec.Fence.BlueMode(), Logger: log.With(zap.String("side", "blue"))})
		// Green's, the same for the way back (rollback).
		pr.greenFence = fpg.New(pr.greenFencePool, fpg.Options{Plan: spec.Name, Pair: pc.Name, Tables: pr.fenceTables, Roles: pc.FenceRoles, Hold: maxWindow(spec), Logger: log.With(zap.String("side", "green"))})
		// Everything that can happen before the fence happens here.
		if err := pr.blueFence.Prepare(ctx); err != nil {
			rt.close()
			return nil, fmt.Errorf("pair %s: blue: %w", pc.Name, err)
		}
		if err := pr.greenFence.Prepare(ctx); err != nil {
			rt.close()
			return nil, fmt.Errorf("pair %s: green: %w", pc.Name, err)
		}
	}
	return rt, nil
}

func openPool(ctx context.Context, dsn config.DSN, side string, maxConns int32) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(dsn.Reveal())
	if err != nil {
		return nil, fmt.Errorf("%s: %s", side, redact.Text(err.Error()))
	}
	cfg.MaxConns = maxConns
	cfg.ConnConfig.RuntimeParams["application_name"] = "cutover-driver"
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("%s: %s", side, redact.Text(err.Error()))
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("%s: %s", side, redact.Text(err.Error()))
	}
	return pool, nil
}

// fenceTables lists every table of a pair's scope on the server behind
// pool, partitions included, as quoted identifiers: what a fence revokes
// and locks.
func fenceTables(ctx context.Context, pool *pgxpool.Pool, scope config.Scope) ([]string, error) {
	set, err := pgscope.Resolve(ctx, pool, scope)
	if err != nil {
		return nil, err
	}
	return pgscope.Idents(set.All()), nil
}

// setScope installs a resolved scope.
func (pr *pairRT) setScope(set *pgscope.Set) {
	pr.scopeMu.Lock()
	defer pr.scopeMu.Unlock()
	pr.scope = set
	pr.tables = pgscope.Names(set.Roots())
	pr.fenceTables = pgscope.Idents(set.All())
	pr.rootOf = map[string]string{}
	for _, t := range set.Leaves() {
		if root, _ := set.Root(t.OID); root.OID != t.OID {
			pr.rootOf[t.String()] = root.String()
		}
	}
}

// markChanged records a replicated row change in the dirty set under the
// table verification compares: a partition's rows under its partitioned
// table in scope.
func (pr *pairRT) markChanged(table string, key []string) {
	pr.scopeMu.Lock()
	if root, ok := pr.rootOf[table]; ok {
		table = root
	}
	pr.scopeMu.Unlock()
	pr.dirty.MarkChanged(table, key)
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
		for _, r := range []*rpg.Replicator{pr.fwd, pr.rev, pr.revPrepared} {
			if r != nil {
				r.Stop(ctx)
			}
		}
		// A held session is out of its pool, and Close waits for it.
		for _, f := range []*fpg.Fencer{pr.blueFence, pr.greenFence} {
			if f != nil {
				f.Release(ctx)
			}
		}
		for _, p := range []*pgxpool.Pool{pr.bluePool, pr.greenPool, pr.blueFencePool, pr.greenFencePool} {
			if p != nil {
				p.Close()
			}
		}
		for _, db := range []*cpg.DB{pr.blueDB, pr.greenDB} {
			if db != nil {
				db.Close()
			}
		}
	}
}

func reversePair(p config.Pair) config.Pair {
	return config.Pair{Name: p.Name + "-rev", Engine: p.Engine, Blue: p.Green, Green: p.Blue, Scope: p.Scope, FenceRoles: p.FenceRoles}
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
	r, err := rpg.New(rpg.Options{
		Plan: rt.spec.Name, Pair: pr.cfg, Slot: pr.fwdSlot, Epoch: epoch,
		GreenFencedSince: pr.greenFencedSince,
		Logger:           rt.d.log.With(zap.String("plan", rt.spec.Name), zap.String("pair", pr.cfg.Name)),
		Registerer:       rt.d.opts.Registerer,
		OnRowChange:      pr.markChanged,
	})
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
			pr.rev = nil
			if err != nil {
				return fmt.Errorf("reverse replication of %s stopped: %w", pr.cfg.Name, err)
			}
		default:
			return nil
		}
	}
	r := pr.revPrepared
	pr.revPrepared = nil
	if r == nil {
		var err error
		if r, err = rt.newReverse(pr, epoch); err != nil {
			return err
		}
		if err := r.Start(rt.ctx); err != nil {
			return fmt.Errorf("start reverse replication of %s: %w", pr.cfg.Name, err)
		}
		pr.rev = r
		return nil
	}
	// Its slot was created before the window: it streams from green's
	// position now, with everything blue wrote applied (caught up) and
	// nothing of the application yet (green is still fenced).
	if err := r.SetEpoch(epoch); err != nil {
		r.Stop(ctx)
		return err
	}
	var pos string
	if err := pr.greenPool.QueryRow(ctx, `SELECT pg_current_wal_lsn()::text`).Scan(&pos); err != nil {
		r.Stop(ctx)
		return fmt.Errorf("green: read WAL position: %w", err)
	}
	lsn, err := pglogrepl.ParseLSN(pos)
	if err != nil {
		r.Stop(ctx)
		return err
	}
	if err := r.StartAt(rt.ctx, lsn); err != nil {
		return fmt.Errorf("start reverse replication of %s: %w", pr.cfg.Name, err)
	}
	pr.rev = r
	return nil
}

func (rt *planRT) newReverse(pr *pairRT, epoch uint64) (*rpg.Replicator, error) {
	return rpg.New(rpg.Options{
		Plan: rt.spec.Name, Pair: reversePair(pr.cfg), Slot: pr.revSlot, Epoch: epoch,
		Logger:   rt.d.log.With(zap.String("plan", rt.spec.Name), zap.String("pair", pr.cfg.Name), zap.String("direction", "reverse")),
		SkipCopy: true,
	})
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
	r, err := rt.newReverse(pr, epoch)
	if err != nil {
		return err
	}
	if err := r.Prepare(ctx); err != nil {
		return fmt.Errorf("prepare reverse replication of %s: %w", pr.cfg.Name, err)
	}
	if err := r.PrepareSlot(ctx); err != nil {
		r.Stop(ctx)
		return fmt.Errorf("prepare reverse replication of %s: %w", pr.cfg.Name, err)
	}
	pr.revPrepared = r
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
			if pr.fwd.Status().Phase != rpg.PhaseStreaming {
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
