package agent

import (
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/hashicorp/raft"
)

func TestAuditAndStepsAreCompactedTheSameWayOnEveryNode(t *testing.T) {
	h := newHarness(t)
	h.create("orders")
	h.mustApply(Command{Op: OpTransition, Plan: "orders", To: PhaseCopying, Origin: OriginOperator, AuditMax: 50, StepsMax: 20})
	// A plan retried again and again: an intent and a failed outcome each time.
	for i := 0; i < 60; i++ {
		res := h.mustApply(Command{Op: OpIntent, Plan: "orders", Step: "copy", AuditMax: 50, StepsMax: 20})
		h.mustApply(Command{Op: OpOutcome, Plan: "orders", Epoch: res.Index, Detail: "boom", AuditMax: 50, StepsMax: 20})
	}
	h.apply(Command{Op: OpTransition, Plan: "nope", To: PhaseCopying, AuditMax: 50, StepsMax: 20}) // refused

	audit := h.fsm.Audit("", 0)
	if len(audit) > 50 {
		t.Errorf("the audit log holds %d entries, cap 50", len(audit))
	}
	head := audit[0]
	if head.Op != OpCompacted || head.Summary == nil {
		t.Fatalf("the oldest entry is not a summary: %+v", head)
	}
	if got, want := head.Summary.Entries+len(audit)-1, int(h.index); got != want {
		t.Errorf("summary %d + kept %d entries = %d, want the %d commands applied", head.Summary.Entries, len(audit)-1, got, want)
	}
	if head.Summary.FirstIndex != 1 || head.Summary.LastIndex+1 != audit[1].Index {
		t.Errorf("summary covers %d to %d, the next entry is %d", head.Summary.FirstIndex, head.Summary.LastIndex, audit[1].Index)
	}
	if head.Summary.Ops["create_plan"] != 1 || head.Summary.Ops["intent"] == 0 || !strings.Contains(head.Detail, "entries compacted") {
		t.Errorf("summary counts: %+v, detail %q", head.Summary, head.Detail)
	}

	p, _ := h.fsm.Plan("orders")
	if len(p.Steps) > 20 {
		t.Errorf("the plan holds %d steps, cap 20", len(p.Steps))
	}
	first := p.Steps[0]
	if first.Name != StepCompacted || first.Compacted+len(p.Steps)-1 != 60 || !strings.Contains(first.Detail, "copy/failed") {
		t.Errorf("first step: %+v (of %d)", first, len(p.Steps))
	}

	// Another node replaying the same log, and one restored from a
	// snapshot and then fed the rest, hold the same state.
	replay := NewFSM()
	for i, data := range h.log {
		replay.Apply(&raft.Log{Index: uint64(i + 1), Type: raft.LogCommand, Data: data})
	}
	if !reflect.DeepEqual(h.fsm.st, replay.st) {
		t.Error("replaying the log gave a different compacted state")
	}
}

func TestAFinishedPlanCanBeDeletedAndNoOtherCan(t *testing.T) {
	h := newHarness(t)
	h.create("orders")
	h.mustApply(Command{Op: OpTransition, Plan: "orders", To: PhaseCopying, Origin: OriginOperator})

	if res := h.apply(Command{Op: OpDeletePlan, Plan: "orders", Origin: OriginOperator}); !errors.Is(res.Err, ErrIllegalTransition) {
		t.Fatalf("deleting a running plan: %v", res.Err)
	}
	h.mustApply(Command{Op: OpTransition, Plan: "orders", To: PhaseAborted, Origin: OriginOperator})
	if res := h.apply(Command{Op: OpDeletePlan, Plan: "orders", Origin: OriginOperator}); res.Err == nil || !strings.Contains(res.Err.Error(), "not finalized") {
		t.Fatalf("deleting an aborted plan not yet finalized: %v", res.Err)
	}
	h.mustApply(Command{Op: OpFinalize, Plan: "orders"})
	h.mustApply(Command{Op: OpDeletePlan, Plan: "orders", Origin: OriginOperator, Reason: "done with it"})
	if _, ok := h.fsm.Plan("orders"); ok {
		t.Fatal("the plan is still there")
	}
	if a := h.fsm.Audit("orders", 0); len(a) == 0 || a[len(a)-1].Op != OpDeletePlan {
		t.Errorf("the deletion is not in the plan's audit log: %+v", a)
	}
	if res := h.apply(Command{Op: OpDeletePlan, Plan: "orders", Origin: OriginOperator}); !errors.Is(res.Err, ErrPlanNotFound) {
		t.Errorf("deleting it again: %v", res.Err)
	}
	h.create("orders") // the name is free again
}

// finishedPlan leaves a finalized, aborted plan "orders" in h.
func finishedPlan(h *harness) {
	h.create("orders")
	h.mustApply(Command{Op: OpTransition, Plan: "orders", To: PhaseAborted, Origin: OriginOperator})
	h.mustApply(Command{Op: OpFinalize, Plan: "orders"})
}

func TestDeletePlanIsWrittenAsVersion3AndRefusedByAnOlderBuildOrUnderAnOlderVersion(t *testing.T) {
	if got := versionOf(OpDeletePlan); got != 3 {
		t.Fatalf("delete_plan is written as version %d", got)
	}
	if got := versionOf(OpTransition); got != 2 {
		t.Fatalf("transition is written as version %d: builds of version 2 would refuse every command", got)
	}

	t.Run("an agent of a version-2 build refuses it and keeps the plan", func(t *testing.T) {
		h := newHarness(t)
		h.fsm.maxVersion = 2
		finishedPlan(h)
		res := h.apply(Command{Version: versionOf(OpDeletePlan), Op: OpDeletePlan, Plan: "orders", Origin: OriginOperator})
		if !errors.Is(res.Err, ErrUnsupportedVersion) || !strings.Contains(res.Err.Error(), "upgrade this agent to apply delete_plan") {
			t.Fatalf("err = %v", res.Err)
		}
		if _, ok := h.fsm.Plan("orders"); !ok {
			t.Fatal("the old build deleted the plan")
		}
		if a := h.fsm.Audit("orders", 1); !strings.Contains(a[0].Refused, "unsupported command version: 3") {
			t.Errorf("audit = %+v", a)
		}
	})
	t.Run("a delete_plan stamped with version 2 is refused", func(t *testing.T) {
		h := newHarness(t)
		finishedPlan(h)
		res := h.apply(Command{Version: 2, Op: OpDeletePlan, Plan: "orders", Origin: OriginOperator})
		if !errors.Is(res.Err, ErrUnsupportedVersion) || !strings.Contains(res.Err.Error(), "delete_plan needs command version 3, not 2") {
			t.Fatalf("err = %v", res.Err)
		}
		if _, ok := h.fsm.Plan("orders"); !ok {
			t.Fatal("the plan was deleted")
		}
	})
}
