package agent

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"strings"
	"testing"
)

// createManual creates a plan whose spec says manual: true.
func (h *harness) createManual(name string) {
	h.t.Helper()
	spec := testSpec(name)
	spec.Manual = true
	sealed, err := SealPlan(spec)
	if err != nil {
		h.t.Fatal(err)
	}
	h.mustApply(Command{Op: OpCreatePlan, Plan: name, Spec: sealed, Source: "api", Origin: OriginOperator})
}

// operator applies a transition as an API call would.
func (h *harness) operator(plan string, to Phase) *Result {
	h.t.Helper()
	return h.apply(Command{Op: OpTransition, Plan: plan, To: to, Actor: "operator@10.0.0.9", Origin: OriginOperator, Reason: "by hand"})
}

func TestOperatorsCannotMoveTheDriversPhases(t *testing.T) {
	t.Run("an operator walking a driven plan is refused at every phase the driver owns, with what to do", func(t *testing.T) {
		h := newHarness(t)
		h.create("orders")
		if res := h.operator("orders", PhaseCopying); res.Err != nil {
			t.Fatalf("start: %v", res.Err)
		}
		for _, step := range [][2]Phase{
			{PhaseCopying, PhaseReplicating}, {PhaseReplicating, PhaseReady}, {PhaseReady, PhaseFenced},
			{PhaseFenced, PhaseCaughtUp}, {PhaseCaughtUp, PhaseVerified}, {PhaseVerified, PhaseAuthorized},
			{PhaseAuthorized, PhaseSwitched},
		} {
			before, _ := h.fsm.Plan("orders")
			if before.Phase != step[0] {
				t.Fatalf("plan at %s, want %s", before.Phase, step[0])
			}
			res := h.operator("orders", step[1])
			var te *TransitionError
			if !errors.As(res.Err, &te) || !strings.Contains(te.Reason, "plan driver owns this move") || !strings.Contains(te.Reason, "manual: true") {
				t.Fatalf("%s -> %s by an operator: err = %v", step[0], step[1], res.Err)
			}
			after, _ := h.fsm.Plan("orders")
			if after.Phase != before.Phase || after.Epoch != before.Epoch {
				t.Fatalf("a refused move changed the plan: %+v", after)
			}
			a := h.fsm.Audit("orders", 1)[0]
			if a.Origin != OriginOperator || a.To != step[1] || !strings.Contains(a.Refused, "manual: true") {
				t.Errorf("refusal not audited with its reason: %+v", a)
			}
			// The driver makes the same move.
			h.mustApply(Command{Op: OpTransition, Plan: "orders", To: step[1], Origin: OriginDriver})
		}
		// Rolling back and completing stay the operator's; a rollback's end
		// is the driver's.
		if res := h.operator("orders", PhaseRollingBack); res.Err != nil {
			t.Fatalf("rollback: %v", res.Err)
		}
		if res := h.operator("orders", PhaseRolledBack); !errors.Is(res.Err, ErrIllegalTransition) {
			t.Fatalf("rolling_back -> rolled_back by an operator: err = %v", res.Err)
		}
	})

	t.Run("an operator may start, abort and complete a driven plan", func(t *testing.T) {
		h := newHarness(t)
		h.create("orders")
		h.create("sessions")
		h.operator("orders", PhaseCopying)
		h.walk("sessions", PhaseSwitched)
		if res := h.operator("sessions", PhaseDone); res.Err != nil {
			t.Fatalf("complete: %v", res.Err)
		}
		h.mustApply(Command{Op: OpTransition, Plan: "orders", To: PhaseReplicating})
		h.mustApply(Command{Op: OpTransition, Plan: "orders", To: PhaseReady})
		h.mustApply(Command{Op: OpTransition, Plan: "orders", To: PhaseFenced})
		if res := h.operator("orders", PhaseAborted); res.Err != nil {
			t.Fatalf("abort while fenced: %v", res.Err)
		}
	})

	t.Run("a manual plan is walked by an operator to switched and rolled back", func(t *testing.T) {
		h := newHarness(t)
		h.createManual("orders")
		for _, ph := range forward[1:9] {
			if res := h.operator("orders", ph); res.Err != nil {
				t.Fatalf("%s: %v", ph, res.Err)
			}
		}
		for _, ph := range []Phase{PhaseRollingBack, PhaseRolledBack} {
			if res := h.operator("orders", ph); res.Err != nil {
				t.Fatalf("%s: %v", ph, res.Err)
			}
		}
		if p, _ := h.fsm.Plan("orders"); !p.Manual || p.Phase != PhaseRolledBack {
			t.Fatalf("plan = %+v", p)
		}
	})

	t.Run("only the driver records steps, outcomes, finalization and its failures", func(t *testing.T) {
		h := newHarness(t)
		h.create("orders")
		for _, c := range []Command{
			{Op: OpIntent, Plan: "orders", Step: "replicate", Origin: OriginOperator},
			{Op: OpFinalize, Plan: "orders", Origin: OriginOperator},
			{Op: OpDriverError, Plan: "orders", Failures: 1, Retries: 1, Origin: OriginOperator},
		} {
			if res := h.apply(c); !errors.Is(res.Err, ErrInvalidCommand) || !strings.Contains(res.Err.Error(), "only the plan driver") {
				t.Errorf("%s by an operator: err = %v", c.Op, res.Err)
			}
		}
		in := h.mustApply(Command{Op: OpIntent, Plan: "orders", Step: "replicate"})
		if res := h.apply(Command{Op: OpOutcome, Plan: "orders", Epoch: in.Index, OK: true, To: PhaseCopying, Origin: OriginOperator}); !errors.Is(res.Err, ErrInvalidCommand) {
			t.Errorf("outcome by an operator: err = %v", res.Err)
		}
	})

	t.Run("version 1 commands from an older build's log are applied as that build applied them", func(t *testing.T) {
		h := newHarness(t)
		h.create("orders")
		for _, ph := range forward[1:5] {
			data, _ := json.Marshal(Command{Version: 1, Op: OpTransition, Plan: "orders", To: ph, At: h.at(), Node: "n1", Actor: "operator@10.0.0.9"})
			if res := h.applyRaw(data); res.Err != nil {
				t.Fatalf("%s: %v", ph, res.Err)
			}
		}
	})
}

func TestAbortOnceTheFlipHasBegun(t *testing.T) {
	authorized := func(t *testing.T) *harness {
		h := newHarness(t)
		h.create("orders")
		h.walk("orders", PhaseAuthorized)
		return h
	}

	t.Run("an operator may abort an authorized plan before the flip intent", func(t *testing.T) {
		h := authorized(t)
		if res := h.operator("orders", PhaseAborted); res.Err != nil {
			t.Fatal(res.Err)
		}
	})

	t.Run("once the flip intent is committed, an operator's abort is refused and told to roll back or wait", func(t *testing.T) {
		h := authorized(t)
		h.mustApply(Command{Op: OpIntent, Plan: "orders", Step: StepFlip})
		before, _ := h.fsm.Plan("orders")
		res := h.operator("orders", PhaseAborted)
		var te *TransitionError
		if !errors.As(res.Err, &te) || !strings.Contains(te.Reason, "the flip has begun") || !strings.Contains(te.Reason, "roll back") {
			t.Fatalf("err = %v", res.Err)
		}
		after, _ := h.fsm.Plan("orders")
		if after.Phase != PhaseAuthorized || after.Step == nil || after.Step.Name != StepFlip || after.Epoch != before.Epoch {
			t.Fatalf("the refused abort changed the plan: %+v", after)
		}
		if a := h.fsm.Audit("orders", 1)[0]; !strings.Contains(a.Refused, "the flip has begun") {
			t.Errorf("audit = %+v", a)
		}
	})

	t.Run("a failed flip leaves the abort refused: no transition may unfence blue then", func(t *testing.T) {
		h := authorized(t)
		in := h.mustApply(Command{Op: OpIntent, Plan: "orders", Step: StepFlip})
		h.mustApply(Command{Op: OpOutcome, Plan: "orders", Epoch: in.Index, OK: false, Detail: "webhook timed out"})
		for _, o := range []CommandOrigin{OriginOperator, OriginDriver} {
			res := h.apply(Command{Op: OpTransition, Plan: "orders", To: PhaseAborted, Origin: o})
			if !errors.Is(res.Err, ErrIllegalTransition) {
				t.Errorf("transition to aborted by %s: err = %v", o, res.Err)
			}
		}
	})

	t.Run("the driver's own abort step, which fences green first, ends the plan", func(t *testing.T) {
		h := authorized(t)
		flip := h.mustApply(Command{Op: OpIntent, Plan: "orders", Step: StepFlip})
		if res := h.apply(Command{Op: OpOutcome, Plan: "orders", Epoch: flip.Index, OK: false, To: PhaseAborted}); !errors.Is(res.Err, ErrIllegalTransition) {
			t.Fatalf("the flip step itself ending in aborted: err = %v", res.Err)
		}
		ab := h.mustApply(Command{Op: OpIntent, Plan: "orders", Step: StepAbort})
		res := h.mustApply(Command{Op: OpOutcome, Plan: "orders", Epoch: ab.Index, OK: true, To: PhaseAborted, Reason: "flip failed before any target switched"})
		if res.Plan.Phase != PhaseAborted {
			t.Fatalf("plan = %+v", res.Plan)
		}
	})

	t.Run("rollback from switched stays allowed to an operator", func(t *testing.T) {
		h := authorized(t)
		flip := h.mustApply(Command{Op: OpIntent, Plan: "orders", Step: StepFlip})
		h.mustApply(Command{Op: OpOutcome, Plan: "orders", Epoch: flip.Index, OK: true, To: PhaseSwitched})
		if res := h.operator("orders", PhaseRollingBack); res.Err != nil {
			t.Fatal(res.Err)
		}
	})
}

func TestDriverErrorsAreRecordedWithoutMovingThePlan(t *testing.T) {
	h := newHarness(t)
	h.create("orders")
	h.walk("orders", PhaseReplicating)
	before, _ := h.fsm.Plan("orders")
	h.mustApply(Command{Op: OpDriverError, Plan: "orders", Failures: 3, Retries: 7, Detail: "measure lag of db: connection refused"})
	p, _ := h.fsm.Plan("orders")
	if p.Driver == nil || p.Driver.Failures != 3 || p.Driver.Retries != 7 || p.Driver.LastError != "measure lag of db: connection refused" || p.Driver.Phase != PhaseReplicating {
		t.Fatalf("driver = %+v", p.Driver)
	}
	if p.Index != before.Index || p.Epoch != before.Epoch || p.Phase != before.Phase {
		t.Errorf("a driver_error moved the plan: index %d -> %d, epoch %d -> %d", before.Index, p.Index, before.Epoch, p.Epoch)
	}
	h.mustApply(Command{Op: OpDriverError, Plan: "orders", Failures: 0, Retries: 7})
	p, _ = h.fsm.Plan("orders")
	if p.Driver.Failures != 0 || p.Driver.Retries != 7 || p.Driver.LastError == "" {
		t.Fatalf("after a success: %+v", p.Driver)
	}
	// A snapshot keeps it.
	restored := NewFSM()
	snap, _ := h.fsm.Snapshot()
	sink := &memSink{}
	snap.Persist(sink)
	if err := restored.Restore(io.NopCloser(bytes.NewReader(sink.Bytes()))); err != nil {
		t.Fatal(err)
	}
	if q, _ := restored.Plan("orders"); q.Driver == nil || *q.Driver != *p.Driver {
		t.Errorf("restored driver status = %+v", q.Driver)
	}
}
