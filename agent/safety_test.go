package agent_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/agenttest"
	"github.com/cutover/cutover/agent/client"
)

// drivenSpec is a plan the driver runs (not manual).
func drivenSpec(name string) json.RawMessage {
	return json.RawMessage(strings.Replace(string(specFor(name)), `"manual":true,`, "", 1))
}

func createDriven(t *testing.T, c *client.Client, name string) {
	t.Helper()
	write(t, func(ctx context.Context) (agent.PlanInfo, error) {
		return c.CreatePlan(ctx, agent.CreatePlanRequest{Spec: drivenSpec(name), Reason: "test", AllowLiteralSecrets: true})
	}, func(err error) bool { return errors.Is(err, agent.ErrPlanExists) })
}

// driverMove commits a phase change as the leader's driver does.
func driverMove(t *testing.T, c *agenttest.Cluster, plan string, to agent.Phase) {
	t.Helper()
	l := c.Leader(10 * time.Second)
	if _, err := c.Node(l.Index).Propose(agenttest.Ctx(t, 5*time.Second), agent.Command{Op: agent.OpTransition, Plan: plan, To: to, Actor: "driver", Origin: agent.OriginDriver}); err != nil {
		t.Fatalf("driver to %s: %v", to, err)
	}
}

func TestAnOperatorCannotWalkADrivenPlanThroughTheAPI(t *testing.T) {
	c := agenttest.New(t, agenttest.Options{})
	leader := c.Leader(10 * time.Second)
	follower := (leader.Index + 1) % 3
	fc := c.Client(follower)
	createDriven(t, fc, "orders")
	if _, err := fc.Start(agenttest.Ctx(t, 5*time.Second), "orders", "go"); err != nil {
		t.Fatalf("an operator's start: %v", err)
	}
	driverMove(t, c, "orders", agent.PhaseReplicating)

	t.Run("a forwarded transition of a driven phase is refused with 409 and what to do", func(t *testing.T) {
		_, err := fc.Transition(agenttest.Ctx(t, 5*time.Second), "orders", agent.TransitionRequest{To: agent.PhaseReady, Reason: "by hand"})
		var apiErr *client.Error
		if !errors.As(err, &apiErr) || apiErr.Status != http.StatusConflict || !errors.Is(err, agent.ErrIllegalTransition) ||
			!strings.Contains(apiErr.Message, "plan driver owns this move") || !strings.Contains(apiErr.Message, "manual: true") {
			t.Fatalf("err = %v", err)
		}
	})

	t.Run("a caller posing as a forwarding agent cannot speak for the driver", func(t *testing.T) {
		req, _ := http.NewRequest(http.MethodPost, c.URL(leader.Index)+"/v1/plans/orders/transition", strings.NewReader(`{"to":"ready"}`))
		req.Header.Set("Authorization", "Bearer "+agenttest.OperatorToken)
		req.Header.Set("X-Cutover-Forwarded-By", c.Members()[follower].ID)
		req.Header.Set("X-Cutover-Actor", "driver")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusConflict {
			t.Fatalf("status %d", resp.StatusCode)
		}
		a := c.Node(leader.Index).FSM().Audit("orders", 1)[0]
		if a.Origin != agent.OriginOperator || a.Actor == "driver" || !strings.HasPrefix(a.Actor, "operator@") || a.Refused == "" {
			t.Errorf("audit = %+v", a)
		}
	})

	if p, _ := c.Node(leader.Index).FSM().Plan("orders"); p.Phase != agent.PhaseReplicating {
		t.Fatalf("the plan moved: %s", p.Phase)
	}

	t.Run("the audit log names the operator's refused move and the reason", func(t *testing.T) {
		audit, err := c.Client(leader.Index).Audit(agenttest.Ctx(t, 5*time.Second), "orders", 0)
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, e := range audit {
			found = found || (e.To == agent.PhaseReady && e.Origin == agent.OriginOperator && strings.Contains(e.Refused, "manual: true"))
		}
		if !found {
			t.Fatalf("audit %+v", audit)
		}
	})

	t.Run("an operator's abort of a driven plan goes through", func(t *testing.T) {
		p := write(t, func(ctx context.Context) (agent.PlanInfo, error) { return fc.Abort(ctx, "orders", "not today") },
			func(err error) bool { return strings.Contains(err.Error(), "already in that phase") })
		if p.Name != "" && p.Phase != agent.PhaseAborted {
			t.Fatalf("plan = %+v", p)
		}
	})
}

func TestAnAbortIsRefusedThroughTheAPIOnceTheFlipHasBegun(t *testing.T) {
	c := agenttest.New(t, agenttest.Options{})
	leader := c.Leader(10 * time.Second)
	lc := c.Client(leader.Index)
	createDriven(t, lc, "orders")
	for _, ph := range []agent.Phase{agent.PhaseCopying, agent.PhaseReplicating, agent.PhaseReady, agent.PhaseFenced, agent.PhaseCaughtUp, agent.PhaseVerified, agent.PhaseAuthorized} {
		driverMove(t, c, "orders", ph)
	}
	l := c.Leader(10 * time.Second)
	if _, err := c.Node(l.Index).Propose(agenttest.Ctx(t, 5*time.Second), agent.Command{Op: agent.OpIntent, Plan: "orders", Step: agent.StepFlip, Actor: "driver", Origin: agent.OriginDriver}); err != nil {
		t.Fatal(err)
	}
	_, err := c.Client((l.Index+1)%3).Abort(agenttest.Ctx(t, 5*time.Second), "orders", "the webhook is slow")
	var apiErr *client.Error
	if !errors.As(err, &apiErr) || apiErr.Status != http.StatusConflict || !strings.Contains(apiErr.Message, "the flip has begun") || !strings.Contains(apiErr.Message, "roll back") {
		t.Fatalf("err = %v", err)
	}
	if p, _ := c.Node(l.Index).FSM().Plan("orders"); p.Phase != agent.PhaseAuthorized || p.Step == nil || p.Step.Name != agent.StepFlip {
		t.Fatalf("plan = %+v", p)
	}
}

// failingDriver fails every Drive with err until healed.
type failingDriver struct {
	err    error
	healed *atomic.Bool
	calls  *atomic.Int64
}

func (d failingDriver) Drive(ctx context.Context, p agent.Plan, _ agent.Proposer) error {
	if p.Phase == agent.PhasePending {
		return nil
	}
	d.calls.Add(1)
	if d.healed.Load() {
		return nil
	}
	return d.err
}

const leakyPassword = "drv-secret-pw-77"

func TestADriverErrorThatCannotHealAbortsThePlanWithItsReason(t *testing.T) {
	var healed atomic.Bool
	var calls atomic.Int64
	cause := agent.Permanent(fmt.Errorf("replication pre-check failed: table public.events has no key (blue postgres://app:%s@127.0.0.1:5432/shop)", leakyPassword))
	c := agenttest.New(t, agenttest.Options{Driver: func(int) agent.Driver { return failingDriver{err: cause, healed: &healed, calls: &calls} }})
	leader := c.Leader(10 * time.Second)
	lc := c.Client(leader.Index)
	createDriven(t, lc, "orders")
	if _, err := lc.Start(agenttest.Ctx(t, 5*time.Second), "orders", "go"); err != nil {
		t.Fatal(err)
	}
	var p agent.PlanInfo
	agenttest.Eventually(t, 20*time.Second, func() error {
		var err error
		if p, err = lc.Plan(agenttest.Ctx(t, 5*time.Second), "orders"); err != nil {
			return err
		}
		if p.Phase != agent.PhaseAborted {
			return fmt.Errorf("plan is %s after %d calls", p.Phase, calls.Load())
		}
		return nil
	})
	if !strings.Contains(p.Reason, "table public.events has no key") || !strings.Contains(p.Reason, "retrying cannot heal") {
		t.Errorf("reason = %q", p.Reason)
	}
	if strings.Contains(p.Reason, leakyPassword) {
		t.Errorf("the reason leaks the password: %q", p.Reason)
	}
	if n := calls.Load(); n != 1 {
		t.Errorf("the driver was called %d times; a permanent error is not retried", n)
	}
	for _, e := range c.Node(leader.Index).FSM().Audit("orders", 0) {
		if e.To == agent.PhaseAborted && e.Origin != agent.OriginDriver {
			t.Errorf("abort not by the driver: %+v", e)
		}
	}
}

func TestARetriedPlanShowsItsRetriesAndLastErrorOnEveryAgent(t *testing.T) {
	var healed atomic.Bool
	var calls atomic.Int64
	cause := fmt.Errorf("measure lag of db: dial postgres://app:%s@127.0.0.1:1/shop: connection refused", leakyPassword)
	c := agenttest.New(t, agenttest.Options{Driver: func(int) agent.Driver { return failingDriver{err: cause, healed: &healed, calls: &calls} }})
	leader := c.Leader(10 * time.Second)
	lc := c.Client(leader.Index)
	createDriven(t, lc, "orders")
	if _, err := lc.Start(agenttest.Ctx(t, 5*time.Second), "orders", "go"); err != nil {
		t.Fatal(err)
	}
	// Every agent, followers included, shows it: status, the plan, metrics.
	agenttest.Eventually(t, 20*time.Second, func() error {
		for _, m := range c.Running() {
			cl := c.Client(m.Index)
			st, err := cl.Status(agenttest.Ctx(t, 5*time.Second))
			if err != nil {
				return err
			}
			if len(st.Plans) != 1 || st.Plans[0].Driver == nil || st.Plans[0].Driver.Failures < 1 || st.Plans[0].Driver.Retries < 1 ||
				!strings.Contains(st.Plans[0].Driver.LastError, "connection refused") {
				return fmt.Errorf("%s status plans %+v", m.ID, st.Plans)
			}
			if st.Plans[0].Phase != agent.PhaseCopying {
				return fmt.Errorf("%s: plan is %s, want it retried in copying", m.ID, st.Plans[0].Phase)
			}
			p, err := cl.Plan(agenttest.Ctx(t, 5*time.Second), "orders")
			if err != nil {
				return err
			}
			if p.Driver == nil || p.Driver.Phase != agent.PhaseCopying || !strings.Contains(p.Driver.LastError, "measure lag of db") {
				return fmt.Errorf("%s plan driver %+v", m.ID, p.Driver)
			}
			code, body := get(t, c.URL(m.Index)+"/metrics", "")
			if code != http.StatusOK || !strings.Contains(body, `cutover_plan_driver_retries_total{plan="orders"}`) ||
				strings.Contains(body, `cutover_plan_driver_retries_total{plan="orders"} 0`) ||
				strings.Contains(body, `cutover_plan_driver_consecutive_failures{plan="orders"} 0`) {
				return fmt.Errorf("%s metrics lack the retries", m.ID)
			}
			raw, _ := json.Marshal(struct {
				S agent.Status
				P agent.PlanInfo
			}{st, p})
			if strings.Contains(string(raw)+body, leakyPassword) {
				t.Fatalf("%s shows the password", m.ID)
			}
		}
		return nil
	})
	// Once the driver succeeds, the streak ends; the retries and the last
	// error stay for the record.
	healed.Store(true)
	agenttest.Eventually(t, 20*time.Second, func() error {
		p, err := lc.Plan(agenttest.Ctx(t, 5*time.Second), "orders")
		if err != nil {
			return err
		}
		if p.Driver == nil || p.Driver.Failures != 0 || p.Driver.Retries < 1 || p.Driver.LastError == "" {
			return fmt.Errorf("driver %+v", p.Driver)
		}
		return nil
	})
	if p, _ := lc.Plan(agenttest.Ctx(t, 5*time.Second), "orders"); p.Phase != agent.PhaseCopying {
		t.Errorf("a transient error moved the plan to %s", p.Phase)
	}
}
