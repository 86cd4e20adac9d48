package agent_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/agenttest"
)

// specDriver resolves the plan's spec on every pass, as the real driver
// does when it opens pools and targets.
type specDriver struct{}

func (specDriver) Drive(ctx context.Context, plan agent.Plan, _ agent.Proposer) error {
	if _, err := plan.Spec(); err != nil {
		return err
	}
	select {
	case <-ctx.Done():
	case <-time.After(50 * time.Millisecond):
	}
	return nil
}

const refSpec = `{"name":"orders","pairs":[{"name":"db","engine":"postgres",
 "blue":{"dsn":"postgres://app:${CUTOVER_T_REF_PW}@127.0.0.1:5432/shop"},
 "green":{"dsn":"postgres://app:${CUTOVER_T_REF_PW}@127.0.0.1:5433/shop"}}]}`

func TestAnAgentLackingAVariableSaysSoAndThePlanWaitsWithTheReason(t *testing.T) {
	// The in-process agents share the process environment: the variable
	// is there when the plan is posted, then gone from every agent.
	t.Setenv("CUTOVER_T_REF_PW", "ref-pw-0a9b8c7d")
	c := agenttest.New(t, agenttest.Options{Driver: func(int) agent.Driver { return specDriver{} }})
	leader := c.Leader(10 * time.Second)
	cl := c.Client(leader.Index)
	write(t, func(ctx context.Context) (agent.PlanInfo, error) {
		return cl.CreatePlan(ctx, agent.CreatePlanRequest{Spec: json.RawMessage(refSpec), Reason: "test"})
	}, func(err error) bool { return errors.Is(err, agent.ErrPlanExists) })
	os.Unsetenv("CUTOVER_T_REF_PW")
	write(t, func(ctx context.Context) (agent.PlanInfo, error) { return cl.Start(ctx, "orders", "test") }, nil)

	t.Run("the plan waits, its driver status naming the variable", func(t *testing.T) {
		agenttest.Eventually(t, 30*time.Second, func() error {
			p, err := c.Client(0).Plan(agenttest.Ctx(t, 5*time.Second), "orders")
			if err != nil {
				return err
			}
			if p.Driver == nil || !strings.Contains(p.Driver.LastError, "needs environment variable CUTOVER_T_REF_PW") {
				return fmt.Errorf("driver status = %+v", p.Driver)
			}
			if p.Phase != agent.PhaseCopying {
				return fmt.Errorf("phase = %s, want the plan waiting in copying", p.Phase)
			}
			return nil
		})
	})

	t.Run("every agent's status and readyz say which variable it lacks", func(t *testing.T) {
		for i := range c.Running() {
			st, err := c.Client(i).Status(agenttest.Ctx(t, 5*time.Second))
			if err != nil {
				t.Fatal(err)
			}
			if len(st.Plans) != 1 || !slices.Equal(st.Plans[0].MissingEnv, []string{"CUTOVER_T_REF_PW"}) {
				t.Errorf("node %d status plans = %+v", i, st.Plans)
			}
			resp, err := http.Get(c.URL(i) + "/readyz")
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			var ready struct {
				Plans map[string]string `json:"plans"`
			}
			if err := json.Unmarshal(body, &ready); err != nil || ready.Plans["orders"] != "missing CUTOVER_T_REF_PW" {
				t.Errorf("node %d readyz = %s", i, body)
			}
		}
	})

	t.Run("once the variable is there the driver resolves the spec again", func(t *testing.T) {
		os.Setenv("CUTOVER_T_REF_PW", "ref-pw-0a9b8c7d")
		agenttest.Eventually(t, 60*time.Second, func() error {
			st, err := c.Client(0).Status(agenttest.Ctx(t, 5*time.Second))
			if err != nil {
				return err
			}
			if p := st.Plans[0]; len(p.MissingEnv) > 0 || p.Driver == nil || p.Driver.Failures != 0 {
				return fmt.Errorf("plan = %+v driver %+v", p, p.Driver)
			}
			return nil
		})
	})
}

func TestAPlanPostedWithALiteralPasswordIsRefusedUnlessAllowed(t *testing.T) {
	c := agenttest.New(t, agenttest.Options{})
	leader := c.Leader(10 * time.Second)
	ctx := agenttest.Ctx(t, 20*time.Second)
	_, err := c.Client(leader.Index).CreatePlan(ctx, agent.CreatePlanRequest{Spec: specFor("orders")})
	if !errors.Is(err, agent.ErrInvalidCommand) || !strings.Contains(err.Error(), "pairs[0].blue.dsn, pairs[0].green.dsn") ||
		!strings.Contains(err.Error(), "${CUTOVER_NAME}") || strings.Contains(err.Error(), "secret-pw-91") {
		t.Fatalf("err = %v", err)
	}
	if plans, _ := c.Client(leader.Index).Plans(ctx); len(plans) != 0 {
		t.Fatalf("a refused plan was created: %+v", plans)
	}
	p, err := c.Client(leader.Index).CreatePlan(ctx, agent.CreatePlanRequest{Spec: specFor("orders"), AllowLiteralSecrets: true})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(p.LiteralSecrets, []string{"pairs[0].blue.dsn", "pairs[0].green.dsn"}) {
		t.Fatalf("the plan does not flag its literal secrets: %+v", p.LiteralSecrets)
	}
}

// A plan created before references were kept holds its values in its
// sealed spec: it stays usable and is flagged.
func TestAnOldPlanWithLiteralSecretsStillWorksAndIsFlagged(t *testing.T) {
	fsm := agent.NewFSM()
	spec := json.RawMessage(`{"name":"orders","pairs":[{"name":"db","engine":"postgres","blue":{"dsn":"postgres://app:old-pw-1234@h1/db"},"green":{"dsn":"postgres://app:old-pw-1234@h2/db"}}]}`)
	data, _ := json.Marshal(agent.Command{Version: agent.CommandVersion, Op: agent.OpCreatePlan, Plan: "orders", Spec: spec, At: time.Now()})
	fsm.Apply(&raft.Log{Index: 1, Type: raft.LogCommand, Data: data})
	p, ok := fsm.Plan("orders")
	if !ok {
		t.Fatal("the plan was not created")
	}
	got, err := p.Spec()
	if err != nil || got.Pairs[0].Blue.DSN.Reveal() != "postgres://app:old-pw-1234@h1/db" {
		t.Fatalf("spec = %+v, %v", got, err)
	}
	if !slices.Equal(p.LiteralSecrets(), []string{"pairs[0].blue.dsn", "pairs[0].green.dsn"}) {
		t.Fatalf("literal secrets = %v", p.LiteralSecrets())
	}
	shown, _ := p.RedactedSpec()
	if strings.Contains(string(shown), "old-pw-1234") {
		t.Fatalf("the redacted spec shows the password: %s", shown)
	}
}

func TestALeaderLackingAVariableHandsLeadershipToAPeerThatHasIt(t *testing.T) {
	// A secret file an agent cannot use counts as a missing variable.
	for _, tc := range []struct{ ref, spec string }{
		{"CUTOVER_T_REF_PW", refSpec},
		{"file:/run/secrets/shop_pw", string(fileRefSpec("orders", "/run/secrets/shop_pw"))},
	} {
		t.Run(tc.ref, func(t *testing.T) { leaderHandsOver(t, tc.ref, tc.spec) })
	}
}

// leaderHandsOver checks that a leader lacking ref (a variable or
// "file:PATH"), which the plan posted as spec references, hands
// leadership to the one follower that has it.
func leaderHandsOver(t *testing.T, ref, spec string) {
	var lacks [3]atomic.Bool
	c := agenttest.New(t, agenttest.Options{
		Driver: func(int) agent.Driver { return specDriver{} },
		Tweak: func(i int, cfg *agent.Config) {
			cfg.SecretDirs = []string{"/run/secrets"}
			cfg.Getenv = func(name string) (string, bool) {
				if name == ref && !lacks[i].Load() {
					return "ref-pw-0a9b8c7d", true
				}
				return "", false
			}
		},
	})
	leader := c.Leader(10 * time.Second)
	write(t, func(ctx context.Context) (agent.PlanInfo, error) {
		return c.Client(leader.Index).CreatePlan(ctx, agent.CreatePlanRequest{Spec: json.RawMessage(spec), Reason: "test"})
	}, func(err error) bool { return errors.Is(err, agent.ErrPlanExists) })
	// Only a follower keeps the variable.
	target := (leader.Index + 1) % 3
	for i := range lacks {
		lacks[i].Store(i != target)
	}
	write(t, func(ctx context.Context) (agent.PlanInfo, error) {
		return c.Client(target).Start(ctx, "orders", "test")
	}, nil)

	agenttest.Eventually(t, 60*time.Second, func() error {
		l := c.Leader(10 * time.Second)
		if l.Index != target {
			return fmt.Errorf("the leader is %s, not the agent that has the variable", l.ID)
		}
		p, ok := c.Node(target).FSM().Plan("orders")
		if !ok || p.Driver == nil || p.Driver.Failures != 0 {
			return fmt.Errorf("driver status = %+v", p.Driver)
		}
		return nil
	})
	p, _ := c.Node(target).FSM().Plan("orders")
	if leader.Index != target && !strings.Contains(p.Driver.LastError, strings.TrimPrefix(ref, "file:")) {
		t.Errorf("the first leader's failure is not recorded: %+v", p.Driver)
	}
	if !c.LogsContain("handing leadership to a peer that has them") {
		t.Error("no leadership hand-over was logged")
	}
}
