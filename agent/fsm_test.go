package agent

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/internal/redact"
)

const testPassword = "blue-pw-Zq81xx"

func testSpec(name string) config.Plan {
	on := true
	return config.Plan{
		Name: name,
		Pairs: []config.Pair{{
			Name: "db", Engine: config.Postgres,
			Blue:       config.Endpoint{DSN: config.DSN("postgres://app:" + testPassword + "@127.0.0.1:5432/shop")},
			Green:      config.Endpoint{DSN: "postgres://app:green-pw-Zq81@127.0.0.1:5433/shop"},
			Scope:      config.Scope{Schemas: []string{"public"}},
			FenceRoles: []string{"shop_app"},
		}},
		Lag:    config.Lag{MaxBytes: 1 << 20, MaxDelay: config.Duration(time.Second), Hold: config.Duration(5 * time.Second)},
		Fence:  config.Fence{MaxFenceWindow: config.Duration(5 * time.Second), DrainGrace: config.Duration(500 * time.Millisecond)},
		Verify: config.Verify{Enabled: &on, ChunkTime: config.Duration(250 * time.Millisecond), Parallel: 2},
		Switch: config.Switch{Targets: []config.Target{{
			Type: config.TargetWebhook, URL: "https://deploy.internal/hook",
			Headers: map[string]redact.Secret{"Authorization": "Bearer hook-secret-Zq81"},
			Timeout: config.Duration(10 * time.Second), Retries: 3,
		}}},
		Rollback: config.Rollback{Window: config.Duration(time.Hour), Watch: config.Duration(5 * time.Minute), Interval: config.Duration(5 * time.Second), Failures: 3},
	}
}

// harness applies commands to an FSM with increasing indexes and clock.
type harness struct {
	t     *testing.T
	fsm   *FSM
	index uint64
	log   [][]byte
}

func newHarness(t *testing.T) *harness { return &harness{t: t, fsm: NewFSM()} }

func (h *harness) at() time.Time {
	return time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC).Add(time.Duration(h.index) * time.Second)
}

func (h *harness) applyRaw(data []byte) *Result {
	h.t.Helper()
	h.index++
	h.log = append(h.log, data)
	res, _ := h.fsm.Apply(&raft.Log{Index: h.index, Type: raft.LogCommand, Data: data}).(*Result)
	if res == nil {
		h.t.Fatalf("Apply returned no *Result")
	}
	return res
}

func (h *harness) apply(c Command) *Result {
	h.t.Helper()
	if c.Version == 0 {
		c.Version = versionOf(c.Op)
	}
	if c.At.IsZero() {
		c.At = h.at()
	}
	if c.Node == "" {
		c.Node = "n1"
	}
	if c.Origin == "" && c.Version >= 2 {
		// The harness plays the driver unless a test says otherwise.
		c.Origin = OriginDriver
	}
	data, err := json.Marshal(c)
	if err != nil {
		h.t.Fatal(err)
	}
	return h.applyRaw(data)
}

func (h *harness) mustApply(c Command) *Result {
	h.t.Helper()
	res := h.apply(c)
	if res.Err != nil {
		h.t.Fatalf("%s %s: %v", c.Op, c.To, res.Err)
	}
	return res
}

func (h *harness) create(name string) *Result {
	h.t.Helper()
	sealed, err := SealPlan(testSpec(name))
	if err != nil {
		h.t.Fatal(err)
	}
	return h.mustApply(Command{Op: OpCreatePlan, Plan: name, Spec: sealed, Source: "config", Actor: "test", Reason: "create"})
}

// walk moves plan p along the forward path up to phase to.
func (h *harness) walk(p string, to Phase) {
	h.t.Helper()
	for _, ph := range forward[1:] {
		h.mustApply(Command{Op: OpTransition, Plan: p, To: ph})
		if ph == to {
			return
		}
	}
}

func TestTransitions(t *testing.T) {
	tests := []struct {
		name     string
		from, to Phase
		wantWhy  string // "" means allowed
	}{
		{"pending starts copying", PhasePending, PhaseCopying, ""},
		{"copying moves on to replicating", PhaseCopying, PhaseReplicating, ""},
		{"replicating becomes ready", PhaseReplicating, PhaseReady, ""},
		{"ready is fenced", PhaseReady, PhaseFenced, ""},
		{"fenced catches up", PhaseFenced, PhaseCaughtUp, ""},
		{"caught up is verified", PhaseCaughtUp, PhaseVerified, ""},
		{"verified is authorized", PhaseVerified, PhaseAuthorized, ""},
		{"authorized switches", PhaseAuthorized, PhaseSwitched, ""},
		{"authorized aborts when the flip failed on every target", PhaseAuthorized, PhaseAborted, ""},
		{"switched completes", PhaseSwitched, PhaseDone, ""},
		{"switched rolls back", PhaseSwitched, PhaseRollingBack, ""},
		{"rolling back ends rolled back", PhaseRollingBack, PhaseRolledBack, ""},
		{"fenced straight to authorized is refused because it skips two phases", PhaseFenced, PhaseAuthorized, "skips caught_up, verified"},
		{"pending cannot jump to fenced", PhasePending, PhaseFenced, "skips copying, replicating, ready"},
		{"phases never move backward", PhaseVerified, PhaseFenced, "only move forward"},
		{"switched cannot abort: traffic has flipped", PhaseSwitched, PhaseAborted, "only a phase up to authorized can abort"},
		{"done is terminal", PhaseDone, PhaseRollingBack, "terminal"},
		{"aborted is terminal", PhaseAborted, PhasePending, "terminal"},
		{"rolled back is terminal", PhaseRolledBack, PhaseSwitched, "terminal"},
		{"only a switched plan rolls back", PhaseVerified, PhaseRollingBack, "only a switched plan can roll back"},
		{"a rollback cannot go back to switched", PhaseRollingBack, PhaseSwitched, "can only end in rolled_back"},
		{"switched cannot go back to authorized", PhaseSwitched, PhaseAuthorized, "complete (done) or roll back"},
		{"a phase cannot move to itself", PhaseReady, PhaseReady, "already in that phase"},
		{"an unknown phase is refused", PhaseReady, Phase("flipped"), "not a phase"},
	}
	for _, p := range forward[:7] {
		tests = append(tests, struct {
			name     string
			from, to Phase
			wantWhy  string
		}{fmt.Sprintf("%s can abort", p), p, PhaseAborted, ""})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := CheckTransition("p", tt.from, tt.to)
			if tt.wantWhy == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrIllegalTransition) {
				t.Fatalf("err = %v, want ErrIllegalTransition", err)
			}
			if !strings.Contains(err.Error(), tt.wantWhy) {
				t.Errorf("reason %q does not say %q", err, tt.wantWhy)
			}
		})
	}
}

func TestFSMApply(t *testing.T) {
	tests := []struct {
		name string
		run  func(t *testing.T, h *harness)
	}{
		{"a created plan is pending with the creation index as epoch", func(t *testing.T, h *harness) {
			at := h.at()
			res := h.create("orders")
			p, _ := h.fsm.Plan("orders")
			if p.Phase != PhasePending || p.Epoch != res.Index || p.Source != "config" {
				t.Fatalf("plan = %+v", p)
			}
			if got, want := p.Created, at; !got.Equal(want) {
				t.Errorf("created %v, want the command's time %v", got, want)
			}
		}},
		{"creating a plan twice is refused", func(t *testing.T, h *harness) {
			h.create("orders")
			sealed, _ := SealPlan(testSpec("orders"))
			if res := h.apply(Command{Op: OpCreatePlan, Plan: "orders", Spec: sealed}); !errors.Is(res.Err, ErrPlanExists) {
				t.Fatalf("err = %v", res.Err)
			}
		}},
		{"a spec naming another plan is refused", func(t *testing.T, h *harness) {
			sealed, _ := SealPlan(testSpec("other"))
			if res := h.apply(Command{Op: OpCreatePlan, Plan: "orders", Spec: sealed}); !errors.Is(res.Err, ErrInvalidCommand) {
				t.Fatalf("err = %v", res.Err)
			}
		}},
		{"fenced straight to authorized is refused by the state machine with the reason", func(t *testing.T, h *harness) {
			h.create("orders")
			h.walk("orders", PhaseFenced)
			before, _ := h.fsm.Plan("orders")
			res := h.apply(Command{Op: OpTransition, Plan: "orders", To: PhaseAuthorized})
			var te *TransitionError
			if !errors.As(res.Err, &te) || te.From != PhaseFenced || !strings.Contains(te.Reason, "skips caught_up, verified") {
				t.Fatalf("err = %v", res.Err)
			}
			after, _ := h.fsm.Plan("orders")
			if after.Phase != PhaseFenced || after.Epoch != before.Epoch {
				t.Errorf("refused transition changed the plan: %+v", after)
			}
			audit := h.fsm.Audit("orders", 1)
			if len(audit) != 1 || !strings.Contains(audit[0].Refused, "skips") || audit[0].To != PhaseAuthorized {
				t.Errorf("refusal not audited: %+v", audit)
			}
		}},
		{"every transition makes its index the epoch", func(t *testing.T, h *harness) {
			h.create("orders")
			var last uint64
			for _, ph := range forward[1:] {
				res := h.mustApply(Command{Op: OpTransition, Plan: "orders", To: ph})
				if res.Plan.Epoch != res.Index || res.Plan.Epoch <= last {
					t.Fatalf("%s: epoch %d at index %d after %d", ph, res.Plan.Epoch, res.Index, last)
				}
				last = res.Plan.Epoch
			}
		}},
		{"an intent sets the epoch and its outcome keeps it while moving the phase", func(t *testing.T, h *harness) {
			h.create("orders")
			h.walk("orders", PhaseReady)
			in := h.mustApply(Command{Op: OpIntent, Plan: "orders", Step: "fence"})
			if in.Plan.Epoch != in.Index || in.Plan.Step == nil || in.Plan.Step.Name != "fence" || in.Plan.Step.Phase != PhaseReady {
				t.Fatalf("after intent: %+v", in.Plan)
			}
			out := h.mustApply(Command{Op: OpOutcome, Plan: "orders", Epoch: in.Index, OK: true, To: PhaseFenced, Detail: "fenced 2 roles", Facts: map[string]string{"db.marker": "m-1"}})
			p := out.Plan
			if p.Phase != PhaseFenced || p.Epoch != in.Index || p.Step != nil || p.Facts["db.marker"] != "m-1" {
				t.Fatalf("after outcome: %+v", p)
			}
			last := p.Steps[len(p.Steps)-1]
			if last.Outcome != StepOK || last.EndIndex != out.Index || last.Detail != "fenced 2 roles" {
				t.Errorf("step = %+v", last)
			}
		}},
		{"an outcome for an old epoch is refused as stale", func(t *testing.T, h *harness) {
			h.create("orders")
			old := h.mustApply(Command{Op: OpIntent, Plan: "orders", Step: "copy"})
			h.mustApply(Command{Op: OpIntent, Plan: "orders", Step: "copy"}) // a new leader took over
			res := h.apply(Command{Op: OpOutcome, Plan: "orders", Epoch: old.Index, OK: true, To: PhaseCopying})
			if !errors.Is(res.Err, ErrStaleEpoch) {
				t.Fatalf("err = %v", res.Err)
			}
			p, _ := h.fsm.Plan("orders")
			if p.Phase != PhasePending || p.Steps[0].Outcome != StepSuperseded {
				t.Errorf("plan = %+v", p)
			}
		}},
		{"an outcome without a step in progress is refused", func(t *testing.T, h *harness) {
			h.create("orders")
			p, _ := h.fsm.Plan("orders")
			if res := h.apply(Command{Op: OpOutcome, Plan: "orders", Epoch: p.Epoch, OK: true}); !errors.Is(res.Err, ErrStaleEpoch) {
				t.Fatalf("err = %v", res.Err)
			}
		}},
		{"an outcome with an illegal phase is refused and leaves the step open", func(t *testing.T, h *harness) {
			h.create("orders")
			in := h.mustApply(Command{Op: OpIntent, Plan: "orders", Step: "copy"})
			res := h.apply(Command{Op: OpOutcome, Plan: "orders", Epoch: in.Index, OK: true, To: PhaseReady})
			if !errors.Is(res.Err, ErrIllegalTransition) {
				t.Fatalf("err = %v", res.Err)
			}
			if p, _ := h.fsm.Plan("orders"); p.Step == nil || p.Step.Epoch != in.Index {
				t.Errorf("step closed by a refused outcome: %+v", p)
			}
		}},
		{"an abort supersedes the step in progress", func(t *testing.T, h *harness) {
			h.create("orders")
			h.walk("orders", PhaseReady)
			h.mustApply(Command{Op: OpIntent, Plan: "orders", Step: "fence"})
			res := h.mustApply(Command{Op: OpTransition, Plan: "orders", To: PhaseAborted, Reason: "operator"})
			p := res.Plan
			if p.Phase != PhaseAborted || p.Step != nil || p.Steps[0].Outcome != StepSuperseded || p.Reason != "operator" {
				t.Fatalf("plan = %+v", p)
			}
		}},
		{"no step can begin on a terminal plan", func(t *testing.T, h *harness) {
			h.create("orders")
			h.mustApply(Command{Op: OpTransition, Plan: "orders", To: PhaseAborted})
			if res := h.apply(Command{Op: OpIntent, Plan: "orders", Step: "copy"}); !errors.Is(res.Err, ErrIllegalTransition) {
				t.Fatalf("err = %v", res.Err)
			}
		}},
		{"a command guarded by an old epoch is refused", func(t *testing.T, h *harness) {
			c := h.create("orders")
			h.mustApply(Command{Op: OpTransition, Plan: "orders", To: PhaseCopying, IfEpoch: c.Index})
			if res := h.apply(Command{Op: OpTransition, Plan: "orders", To: PhaseReplicating, IfEpoch: c.Index}); !errors.Is(res.Err, ErrStaleEpoch) {
				t.Fatalf("err = %v", res.Err)
			}
		}},
		{"an unknown command version is refused and audited", func(t *testing.T, h *harness) {
			h.create("orders")
			res := h.apply(Command{Version: CommandVersion + 1, Op: OpTransition, Plan: "orders", To: PhaseCopying})
			if !errors.Is(res.Err, ErrUnsupportedVersion) {
				t.Fatalf("err = %v", res.Err)
			}
			if p, _ := h.fsm.Plan("orders"); p.Phase != PhasePending {
				t.Errorf("phase = %s", p.Phase)
			}
			if a := h.fsm.Audit("orders", 1); !strings.Contains(a[0].Refused, fmt.Sprintf("unsupported command version: %d", CommandVersion+1)) {
				t.Errorf("audit = %+v", a)
			}
		}},
		{"undecodable bytes are refused and audited", func(t *testing.T, h *harness) {
			res := h.applyRaw([]byte("{not json"))
			if !errors.Is(res.Err, ErrInvalidCommand) {
				t.Fatalf("err = %v", res.Err)
			}
			if a := h.fsm.Audit("", 0); len(a) != 1 || a[0].Refused == "" {
				t.Errorf("audit = %+v", a)
			}
		}},
		{"an unknown op is refused", func(t *testing.T, h *harness) {
			if res := h.apply(Command{Op: "flip"}); !errors.Is(res.Err, ErrInvalidCommand) {
				t.Fatalf("err = %v", res.Err)
			}
		}},
		{"only a terminal plan is finalized, once", func(t *testing.T, h *harness) {
			h.create("orders")
			if res := h.apply(Command{Op: OpFinalize, Plan: "orders"}); !errors.Is(res.Err, ErrIllegalTransition) {
				t.Fatalf("finalizing a pending plan: %v", res.Err)
			}
			h.mustApply(Command{Op: OpTransition, Plan: "orders", To: PhaseAborted})
			at := h.at()
			h.mustApply(Command{Op: OpFinalize, Plan: "orders"})
			h.mustApply(Command{Op: OpFinalize, Plan: "orders"}) // a second leader's retry
			if p, _ := h.fsm.Plan("orders"); !p.Finalized.Equal(at) {
				t.Fatalf("finalized at %v, want the first finalize's %v", p.Finalized, at)
			}
		}},
		{"members are recorded and forgotten", func(t *testing.T, h *harness) {
			h.mustApply(Command{Op: OpSetMember, Member: &Member{ID: "n2", Address: "10.0.0.2:8421", API: "http://10.0.0.2:8420"}})
			if m, ok := h.fsm.Member("n2"); !ok || m.API != "http://10.0.0.2:8420" {
				t.Fatalf("member = %+v", m)
			}
			h.mustApply(Command{Op: OpRemoveMember, Member: &Member{ID: "n2"}})
			if _, ok := h.fsm.Member("n2"); ok {
				t.Fatal("member still there")
			}
		}},
		{"the audit log says when, which node, who asked, what and why", func(t *testing.T, h *harness) {
			h.create("orders")
			h.mustApply(Command{Op: OpTransition, Plan: "orders", To: PhaseCopying, Node: "n2", Via: "n3", Actor: "operator@10.0.0.9", Origin: OriginOperator, Reason: "change 42"})
			e := h.fsm.Audit("orders", 1)[0]
			want := AuditEntry{Index: 2, At: h.at().Add(-time.Second), Node: "n2", Via: "n3", Actor: "operator@10.0.0.9", Origin: OriginOperator,
				Op: OpTransition, Plan: "orders", From: PhasePending, To: PhaseCopying, Epoch: 2, Reason: "change 42"}
			if !reflect.DeepEqual(e, want) {
				t.Fatalf("audit entry\n got %+v\nwant %+v", e, want)
			}
		}},
		{"audit entries and plan views never hold the spec's secrets", func(t *testing.T, h *harness) {
			h.create("orders")
			h.walk("orders", PhaseVerified)
			p, _ := h.fsm.Plan("orders")
			red, err := p.RedactedSpec()
			if err != nil {
				t.Fatal(err)
			}
			views, _ := json.Marshal(struct {
				Audit []AuditEntry
				Plans []Plan
				Spec  json.RawMessage
			}{h.fsm.Audit("", 0), h.fsm.Plans(), red})
			for _, secret := range []string{testPassword, "hook-secret-Zq81", "green-pw-Zq81"} {
				if bytes.Contains(views, []byte(secret)) {
					t.Errorf("views hold %q: %s", secret, views)
				}
			}
			if !bytes.Contains(red, []byte("127.0.0.1:5432")) {
				t.Errorf("redacted spec lost the host: %s", red)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { tt.run(t, newHarness(t)) })
	}
}

// richHistory applies a mix of every op to h.
func richHistory(h *harness) {
	h.create("orders")
	h.create("sessions")
	h.mustApply(Command{Op: OpSetMember, Member: &Member{ID: "n1", Address: "127.0.0.1:1", API: "http://127.0.0.1:2"}})
	h.walk("orders", PhaseReady)
	in := h.mustApply(Command{Op: OpIntent, Plan: "orders", Step: "fence", Actor: "driver"})
	h.mustApply(Command{Op: OpOutcome, Plan: "orders", Epoch: in.Index, OK: true, To: PhaseFenced, Facts: map[string]string{"lsn": "0/16B3748"}})
	h.apply(Command{Op: OpTransition, Plan: "orders", To: PhaseAuthorized}) // refused, audited
	h.mustApply(Command{Op: OpIntent, Plan: "sessions", Step: "copy"})
	h.mustApply(Command{Op: OpTransition, Plan: "sessions", To: PhaseAborted, Reason: "operator"})
	h.mustApply(Command{Op: OpFinalize, Plan: "sessions"})
	h.apply(Command{Version: 9, Op: OpIntent})
}

func TestSnapshotRestoreRoundTripsExactly(t *testing.T) {
	h := newHarness(t)
	richHistory(h)
	snap, err := h.fsm.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	sink := &memSink{}
	if err := snap.Persist(sink); err != nil {
		t.Fatal(err)
	}
	restored := NewFSM()
	changed := restored.Changed()
	if err := restored.Restore(io.NopCloser(bytes.NewReader(sink.Bytes()))); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(h.fsm.st, restored.st) {
		a, _ := json.Marshal(h.fsm.st)
		b, _ := json.Marshal(restored.st)
		t.Fatalf("restored state differs\nbefore %s\nafter  %s", a, b)
	}
	select {
	case <-changed:
	default:
		t.Error("Restore did not signal a change")
	}
	// Applying the same command to both keeps them equal: the restored
	// state is not just equal-looking but behaves the same.
	next := Command{Version: CommandVersion, Op: OpTransition, Plan: "orders", To: PhaseCaughtUp, At: h.at(), Node: "n1"}
	data, _ := json.Marshal(next)
	h.fsm.Apply(&raft.Log{Index: 100, Type: raft.LogCommand, Data: data})
	restored.Apply(&raft.Log{Index: 100, Type: raft.LogCommand, Data: data})
	if !reflect.DeepEqual(h.fsm.st, restored.st) {
		t.Fatal("states diverge after the same command")
	}
}

func TestRestoreRefusesAnUnknownSnapshotVersion(t *testing.T) {
	err := NewFSM().Restore(io.NopCloser(strings.NewReader(`{"version":7,"state":{}}`)))
	if !errors.Is(err, ErrUnsupportedVersion) {
		t.Fatalf("err = %v", err)
	}
}

func TestApplyIsDeterministic(t *testing.T) {
	h := newHarness(t)
	richHistory(h)
	replay := NewFSM()
	for i, data := range h.log {
		replay.Apply(&raft.Log{Index: uint64(i + 1), Type: raft.LogCommand, Data: data})
	}
	if !reflect.DeepEqual(h.fsm.st, replay.st) {
		t.Fatal("replaying the same log gave a different state")
	}
}

func TestSealPlanRoundTripsEveryField(t *testing.T) {
	spec := testSpec("orders")
	spec.Pairs = append(spec.Pairs, config.Pair{Name: "cache", Engine: config.Redis,
		Blue: config.Endpoint{DSN: "redis://:r-pw-1@127.0.0.1:6379/0"}, Green: config.Endpoint{DSN: "redis://:r-pw-2@127.0.0.1:6380/0"}})
	spec.Rollback.Checks = []config.HealthCheck{{Type: "query", DSN: "postgres://m:mon-pw@h/db", Query: "select 1", Max: 0.01}}
	spec.Switch.Targets = append(spec.Switch.Targets, config.Target{Type: config.TargetCommand, Command: []string{"kubectl", "patch"}, Timeout: config.Duration(time.Second)})
	sealed, err := SealPlan(spec)
	if err != nil {
		t.Fatal(err)
	}
	got, err := openSpec(sealed)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, spec) {
		t.Fatalf("round trip differs\n got %#v\nwant %#v", got, spec)
	}
	if got.Pairs[0].Blue.DSN.Reveal() != spec.Pairs[0].Blue.DSN.Reveal() {
		t.Fatal("the DSN password was lost")
	}
}

func TestParsePlanSpec(t *testing.T) {
	tests := []struct {
		name    string
		body    string
		wantErr string
	}{
		{"a plan written as in the config file is accepted with defaults", `{"name":"orders","pairs":[{"name":"db","engine":"postgres","blue":{"dsn":"postgres://a:pw@h1/db"},"green":{"dsn":"postgres://a:pw@h2/db"}}],"fence":{"max_fence_window":"3s"}}`, ""},
		{"a plan without pairs is refused with the key", `{"name":"orders","pairs":[]}`, "pairs: a plan needs at least one blue/green pair"},
		{"an unknown key is refused", `{"name":"orders","colour":"blue"}`, "colour: unknown key"},
		{"references to variables other than CUTOVER_* are refused", `{"name":"orders","pairs":[{"name":"db","engine":"postgres","blue":{"dsn":"postgres://a:${HOME}@h1/db"},"green":{"dsn":"postgres://a:pw@h2/db"}}]}`, "only CUTOVER_* environment variables, not HOME"},
		{"a reference to a variable the agent lacks is refused", `{"name":"orders","pairs":[{"name":"db","engine":"postgres","blue":{"dsn":"postgres://a:${CUTOVER_NOT_SET_HERE}@h1/db"},"green":{"dsn":"postgres://a:pw@h2/db"}}]}`, "environment variable CUTOVER_NOT_SET_HERE is not set"},
		{"a JSON array is refused", `[1]`, "must be a JSON object"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := ParsePlanSpec([]byte(tt.body), nil)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				if p.Fence.MaxFenceWindow.D() != 3*time.Second || p.Lag.Hold.D() != config.DefaultLagHold {
					t.Errorf("plan = %+v", p)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !errors.Is(err, ErrInvalidCommand) {
				t.Fatalf("err = %v, want %q", err, tt.wantErr)
			}
		})
	}
}

type memSink struct{ bytes.Buffer }

func (s *memSink) ID() string    { return "mem" }
func (s *memSink) Cancel() error { return nil }
func (s *memSink) Close() error  { return nil }
