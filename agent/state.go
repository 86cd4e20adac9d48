package agent

import (
	"encoding/json"
	"maps"
	"os"
	"slices"
	"strconv"
	"time"

	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/internal/redact"
)

// state is the whole replicated state. It is what snapshots hold, and it is
// only changed by FSM.Apply and FSM.Restore.
type state struct {
	Plans   map[string]*planRecord `json:"plans"`
	Members map[string]Member      `json:"members"`
	// Audit is append-only: every command applied or refused adds one
	// entry; past the cap the oldest are folded into one (compactAudit).
	Audit []AuditEntry `json:"audit"`
	// Index is the Raft index of the last command applied.
	Index uint64 `json:"index"`
}

func newState() *state {
	return &state{Plans: map[string]*planRecord{}, Members: map[string]Member{}}
}

// planRecord is a plan as the state machine keeps it. Spec holds secrets;
// the exported view (Plan) keeps it out of JSON.
type planRecord struct {
	Name   string          `json:"name"`
	Spec   json.RawMessage `json:"spec"`
	Source string          `json:"source,omitempty"`
	Phase  Phase           `json:"phase"`
	// Epoch is the Raft index of the command that began the current step
	// (an intent or a transition); it only grows.
	Epoch uint64 `json:"epoch"`
	// Index is the Raft index of the last command that changed the plan.
	Index   uint64            `json:"index"`
	Created time.Time         `json:"created"`
	Updated time.Time         `json:"updated"`
	Reason  string            `json:"reason,omitempty"`
	Steps   []Step            `json:"steps,omitempty"`
	Facts   map[string]string `json:"facts,omitempty"`
	// Finalized is when the driver's Finalize succeeded (terminal plans).
	Finalized time.Time `json:"finalized,omitzero"`
	// Manual is the spec's manual flag, read once at creation: operators
	// drive the phases, the driver does not.
	Manual bool `json:"manual,omitempty"`
	// Driver is how the leader's driver fares (driver_error commands).
	Driver *DriverStatus `json:"driver,omitempty"`
}

// DriverStatus is how the leader's driver fares with a plan it retries.
//
// It lives in the replicated state, not in the leader's memory (Live):
// every agent then shows it (status asked of any follower, metrics scraped
// from every node), and a new leader continues the counts instead of
// starting from zero. The leader rate-limits the commands (see leader.go),
// so a plan failing every second does not flood the log.
type DriverStatus struct {
	// Failures counts the driver's consecutive failures; 0 once it succeeds.
	Failures int `json:"failures"`
	// Retries counts every failure the driver retried over the plan's life.
	Retries int `json:"retries"`
	// LastError is the last failure's error, redacted; kept after a success.
	LastError string `json:"last_error,omitempty"`
	// Phase is the phase the last failure happened in.
	Phase Phase     `json:"phase,omitempty"`
	At    time.Time `json:"at,omitzero"`
}

// flipBegun reports whether the driver committed a flip intent: from then
// on green may take writes at any moment, so nothing may unfence blue
// until green is proven fenced again (the driver's own abort step does).
func (p *planRecord) flipBegun() bool {
	if p.Phase != PhaseAuthorized {
		return false
	}
	for _, st := range p.Steps {
		if st.Name == StepFlip && st.Phase == PhaseAuthorized {
			return true
		}
	}
	return false
}

// openStep returns the step begun by the last intent if it has no outcome.
func (p *planRecord) openStep() *Step {
	if n := len(p.Steps); n > 0 && p.Steps[n-1].Outcome == "" {
		return &p.Steps[n-1]
	}
	return nil
}

// view copies the record into a Plan that shares no memory with the state.
func (p *planRecord) view() Plan {
	v := Plan{
		Name: p.Name, Source: p.Source, Phase: p.Phase, Epoch: p.Epoch, Index: p.Index,
		Created: p.Created, Updated: p.Updated, Reason: p.Reason,
		Steps: slices.Clone(p.Steps), Facts: maps.Clone(p.Facts), Finalized: p.Finalized,
		Manual: p.Manual, sealed: slices.Clone(p.Spec),
	}
	if p.Driver != nil {
		d := *p.Driver
		v.Driver = &d
	}
	if s := p.openStep(); s != nil {
		c := *s
		v.Step = &c
	}
	return v
}

// Plan is a read-only copy of one plan's replicated state. It holds the
// plan's sealed specification but never renders it: JSON encoding leaves it
// out; Spec decodes it (with secrets, for drivers) and RedactedSpec renders
// it with every DSN password and secret masked (for people).
type Plan struct {
	Name   string `json:"name"`
	Source string `json:"source,omitempty"`
	Phase  Phase  `json:"phase"`
	// Epoch is the fencing token: the Raft index of the command that began
	// the current step. Side effects carry it; it only grows.
	Epoch uint64 `json:"epoch"`
	// Index is the Raft index of the last change to the plan.
	Index   uint64    `json:"index"`
	Created time.Time `json:"created"`
	Updated time.Time `json:"updated"`
	// Reason is why the plan last changed phase.
	Reason string `json:"reason,omitempty"`
	// Step is the step in progress: an intent without an outcome yet. A new
	// leader that finds one must resume the step or abort it.
	Step *Step `json:"step,omitempty"`
	// Steps is every step begun, oldest first.
	Steps []Step `json:"steps,omitempty"`
	// Facts are what outcomes recorded (positions, slot names, ...).
	Facts map[string]string `json:"facts,omitempty"`
	// Finalized is when the driver's Finalize succeeded; zero until then.
	Finalized time.Time `json:"finalized,omitzero"`
	// Manual: the plan declared manual: operators move its phases through
	// the API and the driver leaves it alone.
	Manual bool `json:"manual,omitempty"`
	// Driver is how the leader's driver fares with the plan: its
	// consecutive failures, retries and last error; nil while it never
	// failed.
	Driver *DriverStatus `json:"driver,omitempty"`

	sealed json.RawMessage
	// env resolves the spec's references; nil means the process
	// environment. A pointer (not a func) so that plans of agents sharing
	// it still compare equal.
	env *envSource
}

// envSource is where an agent reads the variables plans reference.
type envSource struct {
	lookup func(string) (string, bool)
}

// getenv resolves reference names: ${NAME} from the process environment
// and ${file:/path} from the file, unless a lookup was given (tests give
// each in-process agent its own, answering for both kinds of names).
func (e *envSource) getenv() func(string) (string, bool) {
	if e == nil || e.lookup == nil {
		return config.WithSecretFiles(os.LookupEnv)
	}
	return e.lookup
}

// GateOpen reports whether the committed phase opens the gate.
func (p Plan) GateOpen() bool { return p.Phase.GateOpen() }

// Spec decodes the plan's specification and resolves its ${NAME}
// references from this agent's environment, secrets included: only pass
// its DSNs to the drivers that need them. An agent that lacks a variable
// gets a *config.MissingEnvError naming it, which the driver reports as
// the plan's driver status. The resolved secrets are registered with the
// redactor, so that no error or log line shows them.
func (p Plan) Spec() (config.Plan, error) {
	spec, err := openSpec(p.sealed)
	if err != nil {
		return spec, err
	}
	getenv := p.env.getenv()
	resolved, err := spec.Resolve(getenv)
	if err != nil {
		return config.Plan{}, err
	}
	redact.Register(resolved.Secrets(getenv)...)
	return resolved, nil
}

// MissingEnv lists the variables the plan's references need that this
// agent's environment lacks, and the secret files it cannot use, each
// with the reason ("file /run/x: mode 0644 gives group or others access;
// chmod 600 it (or 400)").
func (p Plan) MissingEnv() []string {
	spec, err := openSpec(p.sealed)
	if err != nil {
		return nil
	}
	names := spec.MissingEnv(p.env.getenv())
	for i, n := range names {
		names[i] = config.DescribeMissing(n)
	}
	return names
}

// LiteralSecrets lists the fields of the plan's sealed specification that
// hold a secret itself rather than a ${NAME} reference: plans created
// before references were kept, or posted with allow_literal_secrets. The
// replicated state (Raft log, snapshots) holds those values.
func (p Plan) LiteralSecrets() []string {
	spec, err := openSpec(p.sealed)
	if err != nil {
		return nil
	}
	return spec.LiteralSecrets()
}

// RedactedSpec renders the specification for people: references stay
// references (their values are never shown), DSN passwords and header
// values are masked, and so are the user-info password and every query
// value of webhook and health-check URLs.
func (p Plan) RedactedSpec() (json.RawMessage, error) {
	spec, err := openSpec(p.sealed)
	if err != nil {
		return nil, err
	}
	spec.Refs = nil
	for i := range spec.Switch.Targets {
		t := &spec.Switch.Targets[i]
		t.URL = redact.URL(t.URL)
		for j, arg := range t.Command {
			t.Command[j] = redact.Text(arg)
		}
	}
	for i := range spec.Rollback.Checks {
		spec.Rollback.Checks[i].URL = redact.URL(spec.Rollback.Checks[i].URL)
	}
	return json.Marshal(spec)
}

// Step is one step of a plan: the intent committed before the side effect
// and, once known, its outcome.
type Step struct {
	Name string `json:"name"`
	// Epoch is the Raft index of the intent; the side effect carries it.
	Epoch uint64 `json:"epoch"`
	// Phase is the plan's phase when the intent was committed.
	Phase Phase     `json:"phase"`
	Node  string    `json:"node"`
	Began time.Time `json:"began"`
	// Outcome is "" while the step runs, then ok, failed or superseded (a
	// later intent or transition took over: a new leader, an operator).
	Outcome  StepOutcome `json:"outcome,omitempty"`
	Detail   string      `json:"detail,omitempty"`
	Ended    time.Time   `json:"ended,omitzero"`
	EndIndex uint64      `json:"end_index,omitempty"`
	// Compacted is how many steps a summary step (named compacted) stands
	// for; see compactSteps.
	Compacted int `json:"compacted,omitempty"`
}

// StepFlip and StepAbort are the names of the driver's flip and abort
// steps; the state machine knows them because a committed flip intent
// changes what may follow (see CheckOrigin).
const (
	StepFlip  = "flip"
	StepAbort = "abort"
)

// StepOutcome is how a step ended.
type StepOutcome string

// Step outcomes.
const (
	StepOK         StepOutcome = "ok"
	StepFailed     StepOutcome = "failed"
	StepSuperseded StepOutcome = "superseded"
)

// Member is one agent of the cluster as the replicated state knows it.
type Member struct {
	ID string `json:"id"`
	// Address is the member's Raft address.
	Address string `json:"address"`
	// API is the base URL of the member's HTTP API; followers forward writes
	// and gate reads to the leader's.
	API string `json:"api,omitempty"`
}

// AuditEntry is one line of the append-only audit log: when, which node,
// who asked, what, why, and whether the state machine refused it.
type AuditEntry struct {
	Index uint64    `json:"index"`
	At    time.Time `json:"at"`
	// Node proposed the command; Via received the API call if forwarded.
	Node  string `json:"node"`
	Via   string `json:"via,omitempty"`
	Actor string `json:"actor,omitempty"`
	// Origin says whether the driver or an operator asked.
	Origin CommandOrigin `json:"origin,omitempty"`
	Op     Op            `json:"op"`
	Plan   string        `json:"plan,omitempty"`
	From   Phase         `json:"from,omitempty"`
	To     Phase         `json:"to,omitempty"`
	Step   string        `json:"step,omitempty"`
	// Epoch is the plan's epoch after the command.
	Epoch  uint64 `json:"epoch,omitempty"`
	Member string `json:"member,omitempty"`
	Reason string `json:"reason,omitempty"`
	Detail string `json:"detail,omitempty"`
	// Refused is the state machine's reason for refusing; empty if applied.
	Refused string `json:"refused,omitempty"`
	// Summary, on an entry of op compacted, counts the older entries it
	// stands for (see compactAudit).
	Summary *AuditSummary `json:"summary,omitempty"`
}

// WriteOutageMS is the application's write outage of the plan's flip, as
// the driver recorded it (fact write_outage_ms): from the fence on blue to
// a writable green with the route flipped. False before the flip.
func (p Plan) WriteOutageMS() (int64, bool) {
	v, ok := p.Facts["write_outage_ms"]
	if !ok {
		return 0, false
	}
	ms, err := strconv.ParseInt(v, 10, 64)
	return ms, err == nil
}
