package agent

import (
	"context"
	"errors"
	"time"

	"go.uber.org/zap"

	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/internal/redact"
)

// Driver runs a plan's steps on the leader. Later issues plug the database
// steps (copy, replication, fence, catch-up proof, verification, flip) in
// here; in this issue the default driver does nothing and steps are driven
// through the API.
//
// The contract:
//
//   - Drive runs only on the leader, only after the leader's Barrier: the
//     plan it gets includes everything earlier leaders committed. It is
//     called for every plan that is not in a terminal phase, in one
//     goroutine per plan: calls for one plan never overlap; calls for
//     different plans run concurrently.
//   - ctx is cancelled the moment this node loses leadership, when the plan
//     reaches a terminal phase (an operator aborted it), and when the agent
//     stops. Drive must then return promptly. A deposed leader may still
//     act for a moment before it notices; that is why every side effect
//     carries the epoch and every target refuses an epoch lower than one it
//     has seen.
//   - A step with a side effect goes: Proposer.Intent (committed first; it
//     returns the epoch), then the side effect carrying that epoch, then
//     Proposer.Outcome with that epoch, moving the plan to its next phase
//     in the same entry. If the leader dies in between, the next leader's
//     Drive finds plan.Step set (an intent without outcome) and must resume
//     the step under a new intent (side effects are idempotent per epoch
//     and accept a higher one) or abort the plan.
//   - Return nil when there is nothing to do until the plan changes: Drive
//     is called again after the next committed change to the plan (its own
//     proposals, an operator's call, a restore). Return an error to be
//     called again after a backoff (1s, doubling to 30s); the error is
//     logged and recorded (redacted) in the plan's DriverStatus, so it must
//     not hold secrets. An error that retrying cannot heal, wrapped with
//     Permanent, aborts the plan instead, with the error as the reason.
//   - Drive may block as long as a step takes (waiting for lag to settle,
//     draining writes), honouring ctx.
//   - Proposals fail with ErrNotLeader or ErrLeadershipLost when leadership
//     moved (ctx is being cancelled too), ErrStaleEpoch when the plan moved
//     on under the driver (re-read it and decide), ErrIllegalTransition
//     when the phase change is not allowed.
//   - Once a plan is terminal, Drive is no longer called; a driver that
//     must clean up (drop slots, unfence after an operator's abort)
//     implements Finalizer too.
type Driver interface {
	Drive(ctx context.Context, plan Plan, p Proposer) error
}

// Finalizer is an optional interface of a Driver. The leader calls
// Finalize for each plan that has reached a terminal phase (done, aborted,
// rolled_back) and is not finalized yet, in the plan's goroutine (never
// concurrently with Drive for that plan), until it returns nil; it then
// commits that the plan is finalized, and no later leader calls it again.
//
// Finalize releases what the plan still holds: slots and publications, and,
// for an aborted plan, fences (an operator may abort a fenced plan through
// the API; only the driver knows how to unfence). It must be idempotent: a
// leader that dies after Finalize but before the commit leaves the next
// leader to call it again. ctx is cancelled on loss of leadership; errors
// are retried after a backoff, like Drive's.
type Finalizer interface {
	Finalize(ctx context.Context, plan Plan) error
}

// LiveReporter is an optional interface of a Driver: what the leader's
// driver knows about a plan right now that is not replicated state. Live is
// called from API handlers; it must not block. Nil means nothing to say.
type LiveReporter interface {
	Live(plan string) *Live
}

// Live is the leader driver's view of a running plan.
type Live struct {
	// OutageMS is how long the application has been fenced, when the
	// fence is up in a cutover window; 0 otherwise.
	OutageMS int64      `json:"outage_ms,omitempty"`
	Pairs    []LivePair `json:"pairs,omitempty"`
}

// LivePair is one pair's live figures.
type LivePair struct {
	Name        string `json:"name"`
	Replication string `json:"replication,omitempty"` // copying, streaming, ...
	LagBytes    int64  `json:"lag_bytes"`
	LagMS       int64  `json:"lag_ms"`
	// Verification progress of the running (or last) pass.
	VerifyPass string `json:"verify_pass,omitempty"`
	VerifyRows int64  `json:"verify_rows,omitempty"`
	VerifyETA  string `json:"verify_eta,omitempty"`
}

// Proposer commits a driver's decisions through Raft. Every call blocks
// until the command is committed and applied (or refused), and returns the
// state machine's verdict.
type Proposer interface {
	// Intent commits that step is about to run on plan, before its side
	// effect, and returns the new epoch: the fencing token the side effect
	// must carry. ifEpoch, when not zero, makes the intent conditional on the
	// plan still being at that epoch (else ErrStaleEpoch).
	Intent(ctx context.Context, plan, step string, ifEpoch uint64) (epoch uint64, err error)
	// Outcome records how the step begun at epoch ended, after its side
	// effect. If o.To is set the plan moves there in the same entry; the
	// epoch stays (the phase change completes the step). An outcome for any
	// other epoch than the open step's is refused with ErrStaleEpoch.
	Outcome(ctx context.Context, plan string, epoch uint64, o Outcome) error
	// Transition moves plan to phase to in one step and returns the new
	// epoch (the transition's own index).
	Transition(ctx context.Context, plan string, to Phase, ifEpoch uint64, reason string) (epoch uint64, err error)
}

// Outcome is how a step ended.
type Outcome struct {
	OK bool
	// To is the phase the plan moves to with this outcome; empty stays.
	To Phase
	// Detail says what happened (or the error); no secrets.
	Detail string
	// Reason is recorded as the plan's reason when To is set.
	Reason string
	// Facts are merged into the plan's facts: positions, slot names, marker
	// ids. No secrets.
	Facts map[string]string
}

// NopDriver does nothing: steps are driven through the API.
type NopDriver struct{}

// Drive returns at once.
func (NopDriver) Drive(context.Context, Plan, Proposer) error { return nil }

// proposer is the Proposer given to drivers: it commits as actor "driver"
// with OriginDriver, the only way to that origin.
type proposer struct{ n *Node }

func (p proposer) Intent(ctx context.Context, plan, step string, ifEpoch uint64) (uint64, error) {
	res, err := p.n.Propose(ctx, Command{Op: OpIntent, Plan: plan, Step: step, IfEpoch: ifEpoch, Actor: "driver", Origin: OriginDriver})
	if err != nil {
		return 0, err
	}
	return res.Index, nil
}

func (p proposer) Outcome(ctx context.Context, plan string, epoch uint64, o Outcome) error {
	_, err := p.n.Propose(ctx, Command{Op: OpOutcome, Plan: plan, Epoch: epoch, OK: o.OK, To: o.To, Detail: o.Detail, Reason: o.Reason, Facts: o.Facts, Actor: "driver", Origin: OriginDriver})
	return err
}

func (p proposer) Transition(ctx context.Context, plan string, to Phase, ifEpoch uint64, reason string) (uint64, error) {
	res, err := p.n.Propose(ctx, Command{Op: OpTransition, Plan: plan, To: to, IfEpoch: ifEpoch, Reason: reason, Actor: "driver", Origin: OriginDriver})
	if err != nil {
		return 0, err
	}
	return res.Index, nil
}

// monitorLeadership runs one leader loop per term, as Consul does:
// leadership comes from raft.Config.NotifyCh (which, unlike LeaderCh, never
// drops a transition), and the loop's context is cancelled as soon as Raft
// reports the loss.
func (n *Node) monitorLeadership(ctx context.Context) {
	defer close(n.done)
	var (
		stopLeader context.CancelFunc
		leaderDone chan struct{}
	)
	stop := func() {
		if stopLeader != nil {
			stopLeader()
			<-leaderDone
			stopLeader, leaderDone = nil, nil
		}
	}
	defer stop()
	for {
		select {
		case isLeader := <-n.notifyCh:
			switch {
			case isLeader && stopLeader == nil:
				lctx, cancel := context.WithCancel(ctx)
				stopLeader, leaderDone = cancel, make(chan struct{})
				go func(done chan struct{}) {
					defer close(done)
					n.leaderLoop(lctx)
				}(leaderDone)
				n.log.Info("gained leadership")
			case !isLeader && stopLeader != nil:
				stop()
				n.log.Info("lost leadership")
			}
		case <-ctx.Done():
			return
		}
	}
}

// barrierAttempts is how often a new leader tries to catch up before it
// hands leadership to another node.
const barrierAttempts = 3

// leaderLoop establishes leadership, then runs the drivers until ctx ends.
func (n *Node) leaderLoop(ctx context.Context) {
	// Barrier: apply everything earlier leaders committed before acting on
	// the state (and before answering the gate from it).
	for attempt := 1; ; attempt++ {
		err := n.raft.Barrier(n.cfg.HeartbeatTimeout * 5).Error()
		if err == nil {
			break
		}
		n.log.Warn("leader barrier failed", zap.Int("attempt", attempt), zap.Error(err))
		if attempt >= barrierAttempts {
			// Consul's rule: a leader that cannot establish itself steps
			// aside rather than hold the cluster.
			if err := n.raft.LeadershipTransfer().Error(); err != nil {
				n.log.Warn("leadership transfer failed", zap.Error(err))
			}
			<-ctx.Done()
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(100 * time.Millisecond):
		}
	}
	n.established.Store(true)
	defer n.established.Store(false)
	n.log.Info("leadership established", zap.Uint64("fsm_index", n.fsm.Index()))

	n.registerSelf(ctx)
	n.runDrivers(ctx)
}

// registerSelf records this node's Raft and API addresses, so that
// followers can forward to it.
func (n *Node) registerSelf(ctx context.Context) {
	me := Member{ID: n.cfg.NodeID, Address: n.RaftAddress(), API: n.apiURL}
	if m, ok := n.fsm.Member(me.ID); ok && m == me {
		return
	}
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := n.Propose(pctx, Command{Op: OpSetMember, Member: &me, Actor: "leader", Reason: "register leader API address"}); err != nil {
		n.log.Warn("register member", zap.Error(err))
	}
}

type driverRun struct {
	final  bool // finalizing a terminal plan rather than driving it
	cancel context.CancelFunc
	done   chan struct{}
}

// wantsFinalize reports whether a terminal plan still needs Finalize.
func (n *Node) wantsFinalize(p Plan) bool {
	_, ok := n.cfg.Driver.(Finalizer)
	return ok && p.Finalized.IsZero()
}

// runDrivers keeps one goroutine per plan that needs the driver (driving a
// live plan, or finalizing a terminal one) until ctx ends, then stops them
// all and waits for them. A plan that turns terminal has its Drive cancelled
// before its Finalize starts.
func (n *Node) runDrivers(ctx context.Context) {
	runs := map[string]*driverRun{}
	stop := func(name string) {
		r := runs[name]
		r.cancel()
		<-r.done
		delete(runs, name)
	}
	defer func() {
		for _, r := range runs {
			r.cancel()
		}
		for name := range runs {
			stop(name)
		}
	}()
	for {
		changed := n.fsm.Changed()
		want := map[string]bool{} // plan name -> final
		for _, p := range n.fsm.Plans() {
			switch {
			case !p.Phase.Terminal():
				want[p.Name] = false
			case n.wantsFinalize(p):
				want[p.Name] = true
			}
		}
		for name, r := range runs {
			if final, ok := want[name]; !ok || final != r.final {
				stop(name)
			}
		}
		for name, final := range want {
			if _, ok := runs[name]; ok {
				continue
			}
			rctx, cancel := context.WithCancel(ctx)
			r := &driverRun{final: final, cancel: cancel, done: make(chan struct{})}
			runs[name] = r
			go func(name string) {
				defer close(r.done)
				if r.final {
					n.finalizePlan(rctx, name)
				} else {
					n.drivePlan(rctx, name)
				}
			}(name)
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
	}
}

const (
	driverBackoffMin = time.Second
	driverBackoffMax = 30 * time.Second
)

// drivePlan calls the driver for one plan: at once, then after each
// committed change to the plan, or after a backoff when it failed. An error
// marked permanent (ErrPermanent) aborts the plan instead; the others are
// retried, and recorded in the replicated state (recordFailure) so that
// every agent shows the retries and the last error.
func (n *Node) drivePlan(ctx context.Context, name string) {
	log := n.log.With(zap.String("plan", name))
	var (
		seen    uint64
		retry   bool
		backoff = driverBackoffMin
		rep     failureReport
	)
	for ctx.Err() == nil {
		changed := n.fsm.Changed()
		p, ok := n.fsm.Plan(name)
		if !ok || p.Phase.Terminal() {
			return
		}
		if p.Index == seen && !retry {
			select {
			case <-ctx.Done():
				return
			case <-changed:
			}
			continue
		}
		seen = p.Index
		err := n.cfg.Driver.Drive(ctx, p, proposer{n})
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			retry = false
			backoff = driverBackoffMin
			n.recordSuccess(ctx, name, &rep, log)
			continue
		}
		if errors.Is(err, ErrPermanent) && n.abortForGood(ctx, p, err, log) {
			retry = false
			continue
		}
		retry = true
		level := log.Warn
		if errors.Is(err, ErrStaleEpoch) {
			level = log.Info
		} else {
			n.recordFailure(ctx, name, err, &rep, log)
		}
		if missing := (*config.MissingEnvError)(nil); errors.As(err, &missing) {
			n.handOver(ctx, name, missing, log)
		}
		level("driver failed; retrying", zap.String("phase", string(p.Phase)), zap.Uint64("epoch", p.Epoch), zap.Duration("backoff", backoff), zap.Error(err))
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, driverBackoffMax)
	}
}

// abortForGood aborts a plan whose driver failed with an error retrying
// cannot heal, through the normal abort (Finalize then releases what the
// plan holds and unfences blue). It reports whether the abort committed;
// the state machine refuses it once the flip has begun, and the plan is
// then retried.
func (n *Node) abortForGood(ctx context.Context, p Plan, err error, log *zap.Logger) bool {
	reason := "aborted: the driver cannot go on and retrying cannot heal it: " + boundText(redact.Text(err.Error()))
	log.Error("driver failed for good; aborting the plan", zap.String("phase", string(p.Phase)), zap.Error(err))
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, perr := n.Propose(pctx, Command{Op: OpTransition, Plan: p.Name, To: PhaseAborted, Reason: reason, Actor: "driver", Origin: OriginDriver}); perr != nil {
		log.Error("could not abort the plan after a permanent driver error; retrying the plan", zap.Error(perr))
		return false
	}
	return true
}

// driverErrorEvery is how often, at most, the leader records a plan's
// failures while its error stays the same. The driver's backoff reaches
// 30s after a few failures, so in a long streak every failure is recorded;
// the limit only folds the first quick retries into one command.
const driverErrorEvery = 30 * time.Second

// failureReport is what drivePlan knows of a plan's failures and has or
// has not recorded yet.
type failureReport struct {
	loaded            bool
	failures, retries int
	lastText          string
	lastAt            time.Time
}

// load starts the counts from the replicated state, so that a new leader
// carries on from its predecessor's.
func (r *failureReport) load(n *Node, name string) {
	if r.loaded {
		return
	}
	r.loaded = true
	if p, ok := n.fsm.Plan(name); ok && p.Driver != nil {
		r.failures, r.retries = p.Driver.Failures, p.Driver.Retries
	}
}

func (n *Node) recordFailure(ctx context.Context, name string, err error, r *failureReport, log *zap.Logger) {
	r.load(n, name)
	r.failures++
	r.retries++
	text := boundText(redact.Text(err.Error()))
	if text == r.lastText && time.Since(r.lastAt) < driverErrorEvery {
		return
	}
	r.lastText, r.lastAt = text, time.Now()
	n.proposeDriverError(ctx, Command{Op: OpDriverError, Plan: name, Failures: r.failures, Retries: r.retries, Detail: text}, log)
}

func (n *Node) recordSuccess(ctx context.Context, name string, r *failureReport, log *zap.Logger) {
	r.load(n, name)
	p, ok := n.fsm.Plan(name)
	if r.failures == 0 && (!ok || p.Driver == nil || p.Driver.Failures == 0) {
		return
	}
	r.failures, r.lastText = 0, ""
	n.proposeDriverError(ctx, Command{Op: OpDriverError, Plan: name, Failures: 0, Retries: r.retries, Reason: "driver succeeded"}, log)
}

func (n *Node) proposeDriverError(ctx context.Context, c Command, log *zap.Logger) {
	c.Actor, c.Origin = "driver", OriginDriver
	if c.Reason == "" {
		c.Reason = "driver failed; retrying"
	}
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := n.Propose(pctx, c); err != nil && ctx.Err() == nil {
		log.Warn("record driver failures", zap.Error(err))
	}
}

// boundText keeps an error text short enough for the replicated state.
func boundText(s string) string {
	const limit = 2000
	if len(s) <= limit {
		return s
	}
	return s[:limit] + "..."
}

// finalizePlan calls the driver's Finalize for a terminal plan until it
// succeeds, then commits that the plan is finalized.
func (n *Node) finalizePlan(ctx context.Context, name string) {
	fin, ok := n.cfg.Driver.(Finalizer)
	if !ok {
		return
	}
	log := n.log.With(zap.String("plan", name))
	backoff := driverBackoffMin
	for ctx.Err() == nil {
		p, ok := n.fsm.Plan(name)
		if !ok || !n.wantsFinalize(p) {
			return
		}
		err := fin.Finalize(ctx, p)
		if err == nil {
			_, err = n.Propose(ctx, Command{Op: OpFinalize, Plan: name, Actor: "driver", Origin: OriginDriver, Reason: "finalized after " + string(p.Phase)})
		}
		if err == nil {
			log.Info("plan finalized", zap.String("phase", string(p.Phase)))
			return
		}
		if ctx.Err() != nil {
			return
		}
		log.Warn("finalize failed; retrying", zap.Duration("backoff", backoff), zap.Error(err))
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, driverBackoffMax)
	}
}
