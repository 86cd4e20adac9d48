package agent_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/agenttest"
)

// releasingDriver drives nothing and finalizes at once.
type releasingDriver struct{ agent.NopDriver }

func (releasingDriver) Finalize(context.Context, agent.Plan) error { return nil }

func TestPlanDeleteThroughAFollowerOnlyForAFinishedPlan(t *testing.T) {
	c := agenttest.New(t, agenttest.Options{Driver: func(int) agent.Driver { return releasingDriver{} }})
	leader := c.Leader(10 * time.Second)
	follower := (leader.Index + 1) % 3
	cl := c.Client(follower)
	mustCreate(t, cl, "orders")
	ctx := agenttest.Ctx(t, 30*time.Second)

	if err := cl.DeletePlan(ctx, "orders", "too early"); !errors.Is(err, agent.ErrIllegalTransition) {
		t.Fatalf("deleting a pending plan: %v", err)
	}
	if _, err := cl.Abort(ctx, "orders", "test"); err != nil {
		t.Fatal(err)
	}
	// The leader's driver finalizes the aborted plan; until then it stays.
	deadline := time.Now().Add(20 * time.Second)
	for {
		p, err := cl.Plan(ctx, "orders")
		if err != nil {
			t.Fatal(err)
		}
		if !p.Finalized.IsZero() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the aborted plan was never finalized")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := cl.DeletePlan(ctx, "orders", "finished"); err != nil {
		t.Fatalf("deleting a finished plan: %v", err)
	}
	// Read-after-write: the follower answers at the deletion's index.
	if _, err := cl.Plan(ctx, "orders"); !errors.Is(err, agent.ErrPlanNotFound) {
		t.Errorf("the deleted plan is still served: %v", err)
	}
	audit, err := cl.Audit(ctx, "orders", 0)
	if err != nil || len(audit) == 0 || audit[len(audit)-1].Op != agent.OpDeletePlan || audit[len(audit)-1].Reason != "finished" {
		t.Errorf("the deletion is not in the audit log: %v %+v", err, audit)
	}
}
