package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"slices"
	"sort"
	"sync"

	"github.com/hashicorp/raft"
)

// FSM is the replicated state machine: plans, their phases and epochs, step
// intents and outcomes, members, and the audit log.
//
// Raft calls Apply, Snapshot and Restore from its FSM goroutine, one at a
// time. Apply is deterministic: it reads nothing but the state and the
// command (the time comes from the command), so every node that applies the
// same log holds the same state. Readers (the API, the gate, the leader's
// drivers) use the read methods, which return copies and may be called from
// any goroutine.
type FSM struct {
	mu sync.RWMutex
	st *state
	// changed is closed and replaced after every Apply and Restore, so that
	// readers can wait for the next change without polling.
	changed chan struct{}
	// env resolves the ${NAME} references of plan specs (Plan.Spec); nil
	// means the process environment.
	env *envSource
	// maxVersion is the newest command version this node applies: 0 means
	// CommandVersion. Tests lower it to play a node of an older build.
	maxVersion int
}

var _ raft.FSM = (*FSM)(nil)

// NewFSM returns an empty state machine.
func NewFSM() *FSM {
	return &FSM{st: newState(), changed: make(chan struct{})}
}

// maxCommandVersion is the newest command version this node applies.
func (f *FSM) maxCommandVersion() int {
	if f.maxVersion > 0 {
		return f.maxVersion
	}
	return CommandVersion
}

// Apply applies one committed log entry and returns a *Result. Commands the
// state machine refuses (illegal transition, stale epoch, unknown version)
// change nothing but the audit log, and carry the reason in Result.Err.
func (f *FSM) Apply(l *raft.Log) any {
	if l.Type != raft.LogCommand {
		return nil
	}
	f.mu.Lock()
	res := f.st.apply(l.Index, l.Data, f.maxCommandVersion())
	ch := f.changed
	f.changed = make(chan struct{})
	f.mu.Unlock()
	close(ch)
	return res
}

// apply is the deterministic core of Apply.
func (s *state) apply(index uint64, data []byte, maxVersion int) *Result {
	res := &Result{Index: index}
	s.Index = index
	var cmd Command
	if err := json.Unmarshal(data, &cmd); err != nil {
		res.Err = fmt.Errorf("%w: undecodable: %v", ErrInvalidCommand, err)
		s.Audit = append(s.Audit, AuditEntry{Index: index, Refused: res.Err.Error()})
		return res
	}
	entry := AuditEntry{
		Index: index, At: cmd.At, Node: cmd.Node, Via: cmd.Via, Actor: cmd.Actor, Origin: cmd.Origin,
		Op: cmd.Op, Plan: cmd.Plan, To: cmd.To, Step: cmd.Step, Reason: cmd.Reason, Detail: cmd.Detail,
	}
	if cmd.Member != nil {
		entry.Member = cmd.Member.ID
	}
	if p := s.Plans[cmd.Plan]; p != nil {
		entry.From = p.Phase
	}
	var err error
	switch {
	case cmd.Version < minCommandVersion || cmd.Version > maxVersion:
		err = fmt.Errorf("%w: %d (this build understands %d to %d): upgrade this agent to apply %s", ErrUnsupportedVersion, cmd.Version, minCommandVersion, maxVersion, cmd.Op)
	case cmd.Version < opVersion[cmd.Op]:
		err = fmt.Errorf("%w: %s needs command version %d, not %d", ErrUnsupportedVersion, cmd.Op, opVersion[cmd.Op], cmd.Version)
	default:
		err = s.dispatch(index, &cmd)
	}
	if err != nil {
		entry.Refused = err.Error()
		res.Err = err
	}
	if p := s.Plans[cmd.Plan]; p != nil {
		entry.Epoch = p.Epoch
		v := p.view()
		res.Plan = &v
	}
	s.Audit = append(s.Audit, entry)
	s.compactAudit(cmd.AuditMax)
	if p := s.Plans[cmd.Plan]; p != nil {
		p.compactSteps(cmd.StepsMax)
	}
	return res
}

func (s *state) dispatch(index uint64, c *Command) error {
	switch c.Op {
	case OpCreatePlan:
		return s.createPlan(index, c)
	case OpTransition:
		return s.transition(index, c)
	case OpIntent:
		return s.intent(index, c)
	case OpOutcome:
		return s.outcome(index, c)
	case OpFinalize:
		if err := driverOnly(c); err != nil {
			return err
		}
		return s.finalize(c)
	case OpDriverError:
		return s.driverError(c)
	case OpDeletePlan:
		return s.deletePlan(c)
	case OpSetMember:
		if c.Member == nil || c.Member.ID == "" {
			return fmt.Errorf("%w: set_member needs a member id", ErrInvalidCommand)
		}
		s.Members[c.Member.ID] = *c.Member
		return nil
	case OpRemoveMember:
		if c.Member == nil || c.Member.ID == "" {
			return fmt.Errorf("%w: remove_member needs a member id", ErrInvalidCommand)
		}
		delete(s.Members, c.Member.ID)
		return nil
	}
	return fmt.Errorf("%w: unknown op %q", ErrInvalidCommand, c.Op)
}

func (s *state) createPlan(index uint64, c *Command) error {
	if !planNameRE.MatchString(c.Plan) {
		return fmt.Errorf("%w: %q is not a valid plan name", ErrInvalidCommand, c.Plan)
	}
	if _, ok := s.Plans[c.Plan]; ok {
		return fmt.Errorf("%w: %s", ErrPlanExists, c.Plan)
	}
	spec, err := openSpec(c.Spec)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrInvalidCommand, err)
	}
	if spec.Name != c.Plan {
		return fmt.Errorf("%w: spec names plan %q, command names %q", ErrInvalidCommand, spec.Name, c.Plan)
	}
	s.Plans[c.Plan] = &planRecord{
		Name: c.Plan, Spec: slices.Clone(c.Spec), Source: c.Source, Phase: PhasePending,
		Epoch: index, Index: index, Created: c.At, Updated: c.At, Reason: c.Reason,
		Manual: spec.Manual,
	}
	return nil
}

// plan finds the command's plan and checks its IfEpoch guard.
func (s *state) plan(c *Command) (*planRecord, error) {
	p := s.Plans[c.Plan]
	if p == nil {
		return nil, fmt.Errorf("%w: %q", ErrPlanNotFound, c.Plan)
	}
	if c.IfEpoch != 0 && c.IfEpoch != p.Epoch {
		return nil, fmt.Errorf("%w: plan %s is at epoch %d, the command expected %d", ErrStaleEpoch, p.Name, p.Epoch, c.IfEpoch)
	}
	return p, nil
}

// supersede closes the open step, if any: a later intent or transition has
// taken over from it (a new leader resuming, an operator aborting).
func (p *planRecord) supersede(index uint64, c *Command, by string) {
	if st := p.openStep(); st != nil {
		st.Outcome = StepSuperseded
		st.Detail = "superseded by " + by
		st.Ended = c.At
		st.EndIndex = index
	}
}

func (s *state) transition(index uint64, c *Command) error {
	p, err := s.plan(c)
	if err != nil {
		return err
	}
	if err := CheckTransition(p.Name, p.Phase, c.To); err != nil {
		return err
	}
	if err := checkTransitionOrigin(p, c); err != nil {
		return err
	}
	p.supersede(index, c, fmt.Sprintf("transition to %s at %d", c.To, index))
	p.Phase = c.To
	p.Epoch = index
	p.Index = index
	p.Updated = c.At
	p.Reason = c.Reason
	return nil
}

func (s *state) intent(index uint64, c *Command) error {
	p, err := s.plan(c)
	if err != nil {
		return err
	}
	if c.Step == "" {
		return fmt.Errorf("%w: an intent names its step", ErrInvalidCommand)
	}
	if err := driverOnly(c); err != nil {
		return err
	}
	if p.Phase.Terminal() {
		return &TransitionError{Plan: p.Name, From: p.Phase, To: p.Phase, Reason: fmt.Sprintf("%s is terminal: no step can begin", p.Phase)}
	}
	p.supersede(index, c, fmt.Sprintf("step %s at %d", c.Step, index))
	p.Steps = append(p.Steps, Step{Name: c.Step, Epoch: index, Phase: p.Phase, Node: c.Node, Began: c.At})
	p.Epoch = index
	p.Index = index
	p.Updated = c.At
	return nil
}

func (s *state) outcome(index uint64, c *Command) error {
	p := s.Plans[c.Plan]
	if p == nil {
		return fmt.Errorf("%w: %q", ErrPlanNotFound, c.Plan)
	}
	st := p.openStep()
	switch {
	case st == nil:
		return fmt.Errorf("%w: plan %s has no step in progress (outcome for epoch %d)", ErrStaleEpoch, p.Name, c.Epoch)
	case st.Epoch != c.Epoch:
		return fmt.Errorf("%w: outcome for epoch %d, but the step in progress (%s) began at %d", ErrStaleEpoch, c.Epoch, st.Name, st.Epoch)
	}
	if err := driverOnly(c); err != nil {
		return err
	}
	if c.To != "" {
		if err := CheckTransition(p.Name, p.Phase, c.To); err != nil {
			return err
		}
		if c.To == PhaseAborted && p.flipBegun() && st.Name != StepAbort {
			return &TransitionError{Plan: p.Name, From: p.Phase, To: c.To, Reason: fmt.Sprintf("the flip has begun: only the driver's %s step, which fences green again first, may abort the plan (not step %s)", StepAbort, st.Name)}
		}
	}
	st.Outcome = StepFailed
	if c.OK {
		st.Outcome = StepOK
	}
	st.Detail = c.Detail
	st.Ended = c.At
	st.EndIndex = index
	if len(c.Facts) > 0 {
		if p.Facts == nil {
			p.Facts = map[string]string{}
		}
		maps.Copy(p.Facts, c.Facts)
	}
	if c.To != "" {
		// The phase change completes the step begun at the epoch, so the
		// epoch (the token the side effect carried) stays.
		p.Phase = c.To
		p.Reason = c.Reason
	}
	p.Index = index
	p.Updated = c.At
	return nil
}

// driverError records the driver's failures of a plan (see DriverStatus).
// It leaves the plan's Index alone: that is not a change to drive on.
func (s *state) driverError(c *Command) error {
	if err := driverOnly(c); err != nil {
		return err
	}
	p := s.Plans[c.Plan]
	if p == nil {
		return fmt.Errorf("%w: %q", ErrPlanNotFound, c.Plan)
	}
	if c.Failures < 0 || c.Retries < 0 {
		return fmt.Errorf("%w: negative failure counts", ErrInvalidCommand)
	}
	d := DriverStatus{Failures: c.Failures, Retries: c.Retries, LastError: c.Detail, Phase: p.Phase, At: c.At}
	if c.Failures == 0 && p.Driver != nil {
		// A success: the streak ends, the last error stays for the record.
		d.LastError, d.Phase, d.At = p.Driver.LastError, p.Driver.Phase, p.Driver.At
	}
	p.Driver = &d
	return nil
}

// driverOnly refuses a command that only the driver proposes (intents,
// outcomes, finalize, driver_error) when it comes from elsewhere. Version
// 1 commands carry no origin and are applied as older builds did.
func driverOnly(c *Command) error {
	if c.Version < 2 || c.Origin == OriginDriver {
		return nil
	}
	return fmt.Errorf("%w: only the plan driver proposes %s commands (origin %q)", ErrInvalidCommand, c.Op, c.Origin)
}

// checkTransitionOrigin applies the rules of who may move a plan (the move
// itself is legal: CheckTransition passed).
//
// The driver owns the phases from copying to authorized and the rollback:
// an operator who moves them while the driver runs races it (walking a
// plan to authorized with blue never fenced loses writes). So an operator
// may only start a plan, abort it, roll a switched plan back or complete
// it, unless the plan is manual (spec manual: true; the driver leaves it
// alone).
//
// Once the driver committed a flip intent, green may take writes at any
// moment: no transition may abort the plan then (an abort unfences blue),
// whoever asks. The driver's own abort step, which fences green again
// first, is the only way to aborted (see outcome).
func checkTransitionOrigin(p *planRecord, c *Command) error {
	if c.Version < 2 {
		return nil
	}
	refuse := func(why string) error {
		return &TransitionError{Plan: p.Name, From: p.Phase, To: c.To, Reason: why}
	}
	if c.To == PhaseAborted && p.flipBegun() {
		return refuse("the flip has begun: green may already take writes, and an abort would unfence blue; wait for the flip to end and roll back then (cutover rollback), or let the driver abort it (it does once green is fenced again)")
	}
	if c.Origin == OriginDriver || p.Manual {
		return nil
	}
	switch {
	case c.To == PhaseAborted,
		p.Phase == PhasePending && c.To == PhaseCopying,
		p.Phase == PhaseSwitched && (c.To == PhaseRollingBack || c.To == PhaseDone):
		return nil
	}
	return refuse("the plan driver owns this move: while it runs the plan, an operator may only start it, abort it (up to authorized, before the flip), roll it back or complete it once switched; wait for the driver, or abort; to move the phases by hand, create the plan with manual: true")
}

// finalize marks a terminal plan finalized. A second finalize (two leaders
// racing, a retry after a lost answer) changes nothing and is not an error.
func (s *state) finalize(c *Command) error {
	p := s.Plans[c.Plan]
	if p == nil {
		return fmt.Errorf("%w: %q", ErrPlanNotFound, c.Plan)
	}
	if !p.Phase.Terminal() {
		return &TransitionError{Plan: p.Name, From: p.Phase, To: p.Phase, Reason: fmt.Sprintf("only a terminal plan is finalized; %s is not terminal", p.Phase)}
	}
	if p.Finalized.IsZero() {
		p.Finalized = c.At
	}
	return nil
}

// Snapshot captures the state for Raft. It encodes at once (the state is
// small), so that Persist never races with Apply.
func (f *FSM) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	data, err := encodeSnapshot(f.st)
	if err != nil {
		return nil, err
	}
	return &fsmSnapshot{data: data}, nil
}

// Restore replaces the state with a snapshot's.
func (f *FSM) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	st, err := decodeSnapshot(rc)
	if err != nil {
		return err
	}
	f.mu.Lock()
	f.st = st
	ch := f.changed
	f.changed = make(chan struct{})
	f.mu.Unlock()
	close(ch)
	return nil
}

// snapshotVersion is the format version of snapshots.
const snapshotVersion = 1

type snapshotFile struct {
	Version int    `json:"version"`
	State   *state `json:"state"`
}

func encodeSnapshot(st *state) ([]byte, error) {
	data, err := json.Marshal(snapshotFile{Version: snapshotVersion, State: st})
	if err != nil {
		return nil, fmt.Errorf("encode snapshot: %w", err)
	}
	return data, nil
}

func decodeSnapshot(r io.Reader) (*state, error) {
	var sf snapshotFile
	if err := json.NewDecoder(r).Decode(&sf); err != nil {
		return nil, fmt.Errorf("decode snapshot: %w", err)
	}
	if sf.Version != snapshotVersion {
		return nil, fmt.Errorf("decode snapshot: %w: snapshot version %d", ErrUnsupportedVersion, sf.Version)
	}
	st := sf.State
	if st == nil {
		st = newState()
	}
	if st.Plans == nil {
		st.Plans = map[string]*planRecord{}
	}
	if st.Members == nil {
		st.Members = map[string]Member{}
	}
	return st, nil
}

type fsmSnapshot struct{ data []byte }

func (s *fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	if _, err := sink.Write(s.data); err != nil {
		sink.Cancel()
		return fmt.Errorf("write snapshot: %w", err)
	}
	return sink.Close()
}

func (s *fsmSnapshot) Release() {}

// Index returns the Raft index of the last command applied.
func (f *FSM) Index() uint64 {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.st.Index
}

// Changed returns a channel closed at the next Apply or Restore.
func (f *FSM) Changed() <-chan struct{} {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.changed
}

// WaitIndex blocks until a command at index or later has been applied, or
// ctx ends.
func (f *FSM) WaitIndex(ctx context.Context, index uint64) error {
	for {
		f.mu.RLock()
		done, ch := f.st.Index >= index, f.changed
		f.mu.RUnlock()
		if done {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Plan returns a copy of the named plan.
func (f *FSM) Plan(name string) (Plan, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	p := f.st.Plans[name]
	if p == nil {
		return Plan{}, false
	}
	v := p.view()
	v.env = f.env
	return v, true
}

// Plans returns copies of every plan, sorted by name.
func (f *FSM) Plans() []Plan {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := make([]Plan, 0, len(f.st.Plans))
	for _, p := range f.st.Plans {
		v := p.view()
		v.env = f.env
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Members returns the recorded members, sorted by id.
func (f *FSM) Members() []Member {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := slices.Collect(maps.Values(f.st.Members))
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// Member returns the recorded member with that id.
func (f *FSM) Member(id string) (Member, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	m, ok := f.st.Members[id]
	return m, ok
}

// Audit returns the audit log, oldest first: the whole log, or the entries
// of one plan when plan is not empty; at most the last limit entries when
// limit > 0.
func (f *FSM) Audit(plan string, limit int) []AuditEntry {
	f.mu.RLock()
	defer f.mu.RUnlock()
	var out []AuditEntry
	for _, e := range f.st.Audit {
		if plan == "" || e.Plan == plan {
			out = append(out, e)
		}
	}
	if limit > 0 && len(out) > limit {
		out = out[len(out)-limit:]
	}
	return out
}
