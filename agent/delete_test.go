package agent_test

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"strings"
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

func TestEveryNodeCompactsTheAuditLogAlike(t *testing.T) {
	c := agenttest.New(t, agenttest.Options{Tweak: func(_ int, cfg *agent.Config) { cfg.AuditMax, cfg.StepsMax = 20, 10 }})
	leader := c.Leader(10 * time.Second)
	cl := c.Client(leader.Index)
	for i := 0; i < 30; i++ {
		mustCreate(t, cl, fmt.Sprintf("plan%d", i))
	}
	c.WaitReplicated(10 * time.Second)
	want := c.Node(leader.Index).FSM().Audit("", 0)
	if len(want) > 20 || want[0].Op != agent.OpCompacted || want[0].Summary == nil || want[0].Summary.Ops["create_plan"] == 0 {
		t.Fatalf("the leader's log is not compacted: %d entries, first %+v", len(want), want[0])
	}
	for _, m := range c.Members() {
		if got := c.Node(m.Index).FSM().Audit("", 0); !reflect.DeepEqual(got, want) {
			t.Errorf("%s holds a different audit log (%d entries, the leader %d)", m.ID, len(got), len(want))
		}
	}
}

func TestALeaderRefusesToDeleteAPlanWhileAVoterRunsAnOlderBuild(t *testing.T) {
	c := agenttest.New(t, agenttest.Options{
		Driver: func(int) agent.Driver { return releasingDriver{} },
		// Node 2 plays an agent of a build that applies commands up to
		// version 2: it would refuse delete_plan while the others apply it.
		Tweak: func(i int, cfg *agent.Config) {
			if i == 2 {
				cfg.MaxCommandVersion = 2
			}
		},
	})
	leader := c.Leader(10 * time.Second)
	cl := c.Client(leader.Index)
	mustCreate(t, cl, "orders")
	ctx := agenttest.Ctx(t, 30*time.Second)
	if _, err := cl.Abort(ctx, "orders", "test"); err != nil {
		t.Fatal(err)
	}
	agenttest.Eventually(t, 20*time.Second, func() error {
		p, err := cl.Plan(ctx, "orders")
		if err != nil || p.Finalized.IsZero() {
			return fmt.Errorf("not finalized yet (%v)", err)
		}
		return nil
	})
	old := c.Members()[2].ID
	want := old + " applies command versions up to 2; delete_plan needs version 3 on every voter: upgrade " + old
	if leader.Index == 2 {
		want = "this agent applies command versions up to 2; delete_plan needs version 3"
	}
	err := cl.DeletePlan(ctx, "orders", "finished")
	if !errors.Is(err, agent.ErrInvalidCommand) || !strings.Contains(err.Error(), want) {
		t.Fatalf("deleting with an old voter: %v", err)
	}
	c.WaitReplicated(10 * time.Second)
	for i := range c.Running() {
		if _, ok := c.Node(i).FSM().Plan("orders"); !ok {
			t.Errorf("node %d lost the plan", i)
		}
	}
}
