package agent_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/agenttest"
	"github.com/cutover/cutover/agent/client"
	"github.com/cutover/cutover/switch/gate"
)

// planSpec is manual: these tests move the phases themselves, through the
// API, as an operator of a manual plan does.
const planSpec = `{"name":"orders","manual":true,"pairs":[{"name":"db","engine":"postgres",
 "blue":{"dsn":"postgres://app:blue-secret-pw-91@127.0.0.1:5432/shop"},
 "green":{"dsn":"postgres://app:green-secret-pw-91@127.0.0.1:5433/shop"}}],
 "fence":{"max_fence_window":"2s"}}`

func specFor(name string) json.RawMessage {
	return json.RawMessage(strings.Replace(planSpec, `"orders"`, `"`+name+`"`, 1))
}

// retryable reports whether a write may be retried: the leader moved.
func retryable(err error) bool {
	return errors.Is(err, agent.ErrNoLeader) || errors.Is(err, agent.ErrNotLeader) || errors.Is(err, agent.ErrLeadershipLost)
}

// write retries op while leadership moves (as an operator would): an
// election on a loaded test machine is not what these tests are about.
// A retried write that turns out to have committed before is recognized by
// done.
func write(t testing.TB, op func(ctx context.Context) (agent.PlanInfo, error), done func(err error) bool) agent.PlanInfo {
	t.Helper()
	ctx := agenttest.Ctx(t, 20*time.Second)
	var lastErr error
	for attempt := 0; ctx.Err() == nil; attempt++ {
		p, err := op(ctx)
		switch {
		case err == nil:
			return p
		case attempt > 0 && done != nil && done(err):
			return p
		case !retryable(err):
			t.Fatal(err)
		}
		lastErr = err
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("gave up: %v", lastErr)
	return agent.PlanInfo{}
}

func mustCreate(t testing.TB, c *client.Client, name string) agent.PlanInfo {
	t.Helper()
	p := write(t, func(ctx context.Context) (agent.PlanInfo, error) {
		return c.CreatePlan(ctx, agent.CreatePlanRequest{Spec: specFor(name), Reason: "test", AllowLiteralSecrets: true})
	}, func(err error) bool { return errors.Is(err, agent.ErrPlanExists) })
	if p.Name == "" {
		p, _ = c.Plan(agenttest.Ctx(t, 5*time.Second), name)
	}
	return p
}

// walkTo moves plan along the forward path through the API until phase.
func walkTo(t testing.TB, c *client.Client, plan string, phase agent.Phase) agent.PlanInfo {
	t.Helper()
	path := []agent.Phase{agent.PhasePending, agent.PhaseCopying, agent.PhaseReplicating, agent.PhaseReady, agent.PhaseFenced,
		agent.PhaseCaughtUp, agent.PhaseVerified, agent.PhaseAuthorized, agent.PhaseSwitched, agent.PhaseDone}
	// The phase to walk from is read from the leader (the gate is a
	// linearizable read that followers forward): a follower may trail, and
	// walking from a phase it has not applied yet repeats a move.
	var p agent.PlanInfo
	agenttest.Eventually(t, 10*time.Second, func() error {
		g, err := c.Gate(agenttest.Ctx(t, 5*time.Second), plan)
		switch {
		case err != nil:
			return err
		case g.Phase == "":
			return fmt.Errorf("the gate does not know the phase of %s: %s", plan, g.Reason)
		}
		p.Phase = agent.Phase(g.Phase)
		return nil
	})
	i := 0
	for path[i] != p.Phase {
		i++
	}
	for p.Phase != phase {
		i++
		to := path[i]
		p = write(t, func(ctx context.Context) (agent.PlanInfo, error) {
			return c.Transition(ctx, plan, agent.TransitionRequest{To: to, Reason: "walk"})
		}, func(err error) bool { return strings.Contains(err.Error(), "already in that phase") })
		p.Phase = to
	}
	// The node behind c may trail the leader's answer for a moment.
	agenttest.Eventually(t, 10*time.Second, func() error {
		q, err := c.Plan(agenttest.Ctx(t, 5*time.Second), plan)
		if err != nil {
			return err
		}
		if q.Phase != phase {
			return fmt.Errorf("%s is %s, want %s", plan, q.Phase, phase)
		}
		p = q
		return nil
	})
	return p
}

// rawGate asks node's gate over HTTP and returns the status and answer.
func rawGate(t *testing.T, url string, format string) (int, gate.Response) {
	t.Helper()
	u := url + "/v1/gate/orders"
	if format != "" {
		u += "?format=" + format
	}
	req, _ := http.NewRequest(http.MethodGet, u, nil)
	req.Header.Set("Authorization", "Bearer "+agenttest.ReadToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var r gate.Response
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, r
}

func get(t *testing.T, url, token string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

func post(t *testing.T, url, token, body string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// replicated is the part of a status every caught-up node agrees on.
type replicated struct {
	Leader  string
	Members []agent.MemberStatus
	Plans   []agent.PlanSummary
}

func sameStatusEverywhere(t *testing.T, c *agenttest.Cluster) replicated {
	t.Helper()
	var first replicated
	agenttest.Eventually(t, 10*time.Second, func() error {
		for i, m := range c.Running() {
			st, err := c.Client(m.Index).Status(agenttest.Ctx(t, 5*time.Second))
			if err != nil {
				return err
			}
			r := replicated{Leader: st.Leader, Members: st.Members, Plans: st.Plans}
			if i == 0 {
				first = r
				continue
			}
			if !reflect.DeepEqual(r, first) {
				return fmt.Errorf("%s reports %+v, %s reports %+v", m.ID, r, c.Running()[0].ID, first)
			}
		}
		return nil
	})
	return first
}

func TestThreeNodesElectReplicateAndReportTheSameStatus(t *testing.T) {
	c := agenttest.New(t, agenttest.Options{})
	leader := c.Leader(10 * time.Second)
	follower := (leader.Index + 1) % 3
	fc := c.Client(follower)

	// Writes sent to a follower are forwarded to the leader.
	created := mustCreate(t, fc, "orders")
	if created.Phase != agent.PhasePending || created.Epoch == 0 {
		t.Fatalf("created %+v", created)
	}
	if bytes.Contains(created.Spec, []byte("blue-secret-pw-91")) || !bytes.Contains(created.Spec, []byte("[redacted]")) {
		t.Fatalf("spec not redacted: %s", created.Spec)
	}
	already := func(err error) bool { return strings.Contains(err.Error(), "already in that phase") }
	write(t, func(ctx context.Context) (agent.PlanInfo, error) { return fc.Start(ctx, "orders", "change 1234") }, already)
	walkTo(t, c.Client(leader.Index), "orders", agent.PhaseReady)

	st := sameStatusEverywhere(t, c)
	if st.Leader != leader.ID || len(st.Members) != 3 || len(st.Plans) != 1 || st.Plans[0].Phase != agent.PhaseReady {
		t.Fatalf("status %+v", st)
	}
	for _, m := range st.Members {
		if m.API == "" {
			t.Errorf("member %s has no API address", m.ID)
		}
	}

	audit, err := c.Client(follower).Audit(agenttest.Ctx(t, 5*time.Second), "orders", 0)
	if err != nil {
		t.Fatal(err)
	}
	if a := audit[1]; a.Op != agent.OpTransition || a.To != agent.PhaseCopying || a.Node != leader.ID ||
		a.Via != c.Members()[follower].ID || !strings.Contains(a.Actor, "operator@127.0.0.1 (agenttest)") || a.Reason != "change 1234" {
		t.Errorf("audit of the forwarded start: %+v", a)
	}

	t.Run("the gate is closed before authorized on every node, with 503 or always200", func(t *testing.T) {
		for _, m := range c.Members() {
			code, r := rawGate(t, c.URL(m.Index), "")
			if code != http.StatusServiceUnavailable || r.Open || r.Phase != "ready" || r.Plan != "orders" {
				t.Errorf("%s: %d %+v", m.ID, code, r)
			}
			code, r = rawGate(t, c.URL(m.Index), gate.FormatAlways200)
			if code != http.StatusOK || r.Open {
				t.Errorf("%s always200: %d %+v", m.ID, code, r)
			}
		}
	})

	t.Run("an illegal transition is refused with its reason", func(t *testing.T) {
		_, err := fc.Transition(agenttest.Ctx(t, 5*time.Second), "orders", agent.TransitionRequest{To: agent.PhaseAuthorized})
		var apiErr *client.Error
		if !errors.As(err, &apiErr) || apiErr.Status != http.StatusConflict || !errors.Is(err, agent.ErrIllegalTransition) ||
			!strings.Contains(apiErr.Message, "skips fenced, caught_up, verified") {
			t.Fatalf("err = %v", err)
		}
	})

	authorized := walkTo(t, fc, "orders", agent.PhaseAuthorized)

	t.Run("the gate opens on every node once authorized", func(t *testing.T) {
		for _, m := range c.Members() {
			code, r := rawGate(t, c.URL(m.Index), "")
			if code != http.StatusOK || !r.Open || r.Phase != "authorized" || r.Epoch != authorized.Epoch {
				t.Errorf("%s: %d %+v", m.ID, code, r)
			}
		}
	})

	t.Run("metrics show raft state, phase, epoch and gate", func(t *testing.T) {
		code, body := get(t, c.URL(leader.Index)+"/metrics", "")
		if code != http.StatusOK {
			t.Fatalf("metrics: %d", code)
		}
		for _, want := range []string{
			`cutover_plan_phase{phase="authorized",plan="orders"} 1`,
			`cutover_plan_phase{phase="ready",plan="orders"} 0`,
			fmt.Sprintf(`cutover_plan_epoch{plan="orders"} %d`, authorized.Epoch),
			`cutover_gate_open{plan="orders"} 1`,
			`cutover_raft_is_leader 1`,
			`cutover_raft_state{state="leader"} 1`,
			fmt.Sprintf(`cutover_raft_leader{id=%q} 1`, leader.ID),
			`cutover_raft_commit_index`,
			`cutover_gate_duration_seconds_count`,
		} {
			if !strings.Contains(body, want) {
				t.Errorf("metrics lack %s", want)
			}
		}
	})

	t.Run("a switched plan cannot abort: traffic has flipped", func(t *testing.T) {
		walkTo(t, fc, "orders", agent.PhaseSwitched)
		_, err := fc.Abort(agenttest.Ctx(t, 5*time.Second), "orders", "too late")
		if !errors.Is(err, agent.ErrIllegalTransition) || !strings.Contains(err.Error(), "roll back instead") {
			t.Fatalf("err = %v", err)
		}
	})

	t.Run("every node is healthy and ready", func(t *testing.T) {
		// A follower is not ready for the moment it has not applied what
		// it knows to be committed: wait for it rather than catch it then.
		agenttest.Eventually(t, 10*time.Second, func() error {
			for _, m := range c.Members() {
				for _, p := range []string{"/healthz", "/readyz"} {
					if code, body := get(t, c.URL(m.Index)+p, ""); code != http.StatusOK {
						return fmt.Errorf("%s%s: %d %s", m.ID, p, code, body)
					}
				}
			}
			return nil
		})
	})
}

func TestMembersJoinAndLeaveThroughTheAPI(t *testing.T) {
	c := agenttest.New(t, agenttest.Options{})
	leader := c.Leader(10 * time.Second)
	follower := (leader.Index + 1) % 3
	mustCreate(t, c.Client(leader.Index), "orders")

	n4 := c.AddNode()
	ctx := agenttest.Ctx(t, 20*time.Second)
	members, err := c.Client(follower).AddMember(ctx, agent.AddMemberRequest{ID: n4.ID, Address: n4.RaftAddr, API: c.URL(n4.Index), Reason: "grow"})
	if err != nil {
		t.Fatal(err)
	}
	if len(members) != 4 {
		t.Fatalf("members = %+v", members)
	}
	agenttest.Eventually(t, 10*time.Second, func() error {
		if _, ok := n4.Node.FSM().Plan("orders"); !ok {
			return errors.New("the new member has not received the plan")
		}
		return nil
	})
	st := sameStatusEverywhere(t, c)
	if len(st.Members) != 4 {
		t.Fatalf("status %+v", st)
	}
	// The new member answers the gate through the leader.
	if code, r := rawGate(t, c.URL(n4.Index), ""); code != http.StatusServiceUnavailable || r.Phase != "pending" {
		t.Fatalf("gate on the new member: %d %+v", code, r)
	}

	if _, err := c.Client(follower).RemoveMember(ctx, n4.ID, "shrink"); err != nil {
		t.Fatal(err)
	}
	c.Stop(n4.Index)
	if st := sameStatusEverywhere(t, c); len(st.Members) != 3 {
		t.Fatalf("status after removal %+v", st)
	}
}

func TestAuthorization(t *testing.T) {
	const wrongToken = "wrong-token-0123456789abcdef"
	c := agenttest.New(t, agenttest.Options{LogLevel: zapcore.DebugLevel})
	leader := c.Leader(10 * time.Second)
	follower := (leader.Index + 1) % 3
	mustCreate(t, c.Client(leader.Index), "orders")
	c.WaitReplicated(5 * time.Second) // plan reads are local to the node asked

	tests := []struct {
		name     string
		node     int
		method   string
		path     string
		token    string
		body     string
		wantCode int
	}{
		{"a mutating call without a token is 401", follower, "POST", "/v1/plans/orders/start", "", "", 401},
		{"a mutating call with a wrong token is 401", leader.Index, "POST", "/v1/plans/orders/start", wrongToken, "", 401},
		{"a mutating call with the read token is 403", follower, "POST", "/v1/plans/orders/start", agenttest.ReadToken, "", 403},
		{"a member removal with the read token is 403", leader.Index, "DELETE", "/v1/members/n3", agenttest.ReadToken, "", 403},
		{"a read without a token is 401 when a read token is set", follower, "GET", "/v1/status", "", "", 401},
		{"a gate read with a wrong token is 401", follower, "GET", "/v1/gate/orders", wrongToken, "", 401},
		{"a read with the read token is allowed", follower, "GET", "/v1/plans/orders", agenttest.ReadToken, "", 200},
		{"a read with the operator token is allowed", leader.Index, "GET", "/v1/status", agenttest.OperatorToken, "", 200},
		{"a Flagger webhook may carry the read token in its metadata", follower, "POST", "/v1/gate/orders", "",
			`{"name":"podinfo","namespace":"test","phase":"Progressing","metadata":{"token":"` + agenttest.ReadToken + `"}}`, 503},
		{"a Flagger webhook without a token is 401", follower, "POST", "/v1/gate/orders", "", `{"name":"podinfo"}`, 401},
		{"metrics, health and readiness are open", follower, "GET", "/metrics", "", "", 200},
		{"the operator token starts a plan through a follower", follower, "POST", "/v1/plans/orders/start", agenttest.OperatorToken, `{"reason":"go"}`, 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, _ := http.NewRequest(tt.method, c.URL(tt.node)+tt.path, strings.NewReader(tt.body))
			if tt.token != "" {
				req.Header.Set("Authorization", "Bearer "+tt.token)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tt.wantCode {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tt.wantCode, body)
			}
		})
	}

	t.Run("tokens never appear in the logs", func(t *testing.T) {
		logs := c.Logs()
		if !strings.Contains(logs, `"api request"`) {
			t.Fatal("no request was logged: the scan would prove nothing")
		}
		for _, tok := range []string{agenttest.OperatorToken, agenttest.ReadToken, wrongToken} {
			if strings.Contains(logs, tok) {
				t.Errorf("logs contain token %q", tok)
			}
		}
		for _, pw := range []string{"blue-secret-pw-91", "green-secret-pw-91"} {
			if strings.Contains(logs, pw) {
				t.Errorf("logs contain DSN password %q", pw)
			}
		}
	})
}

func TestReadsAreOpenWithoutAReadToken(t *testing.T) {
	c := agenttest.New(t, agenttest.Options{NoReadToken: true})
	c.Leader(10 * time.Second)
	if code, _ := get(t, c.URL(0)+"/v1/status", ""); code != http.StatusOK {
		t.Errorf("status without a token: %d", code)
	}
	if code, _ := post(t, c.URL(0)+"/v1/plans", "", `{"spec":{}}`); code != http.StatusUnauthorized {
		t.Errorf("create without a token: %d", code)
	}
}

// epochWatch samples every running node's epoch of a plan and fails the
// test if any node ever sees it go down.
type epochWatch struct {
	cancel context.CancelFunc
	done   chan struct{}
	mu     sync.Mutex
	errs   []string
	max    uint64
}

func watchEpochs(t *testing.T, c *agenttest.Cluster, plan string) *epochWatch {
	ctx, cancel := context.WithCancel(context.Background())
	w := &epochWatch{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(w.done)
		// Per node incarnation: a restarted node rebuilds its state from
		// the snapshot and the log, so its view starts over (still only
		// growing as it replays).
		last := map[*agent.Node]uint64{}
		for ctx.Err() == nil {
			for _, m := range c.Members() {
				n := c.Node(m.Index)
				if n == nil {
					continue
				}
				if p, ok := n.FSM().Plan(plan); ok {
					w.mu.Lock()
					if p.Epoch < last[n] {
						w.errs = append(w.errs, fmt.Sprintf("%s: epoch went from %d to %d", m.ID, last[n], p.Epoch))
					}
					last[n] = p.Epoch
					w.max = max(w.max, p.Epoch)
					w.mu.Unlock()
				}
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	t.Cleanup(w.stop)
	return w
}

func (w *epochWatch) stop() { w.cancel(); <-w.done }

func (w *epochWatch) check(t *testing.T) {
	t.Helper()
	w.stop()
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, e := range w.errs {
		t.Error(e)
	}
}

func TestLeaderKilledMidPlan(t *testing.T) {
	c := agenttest.New(t, agenttest.Options{})
	leader := c.Leader(10 * time.Second)
	lc := c.Client(leader.Index)
	mustCreate(t, lc, "orders")
	watch := watchEpochs(t, c, "orders")
	walkTo(t, lc, "orders", agent.PhaseFenced)
	// A step is in flight when the leader dies: its intent is committed,
	// its outcome is not.
	intent, err := leader.Node.Propose(agenttest.Ctx(t, 5*time.Second), agent.Command{Op: agent.OpIntent, Plan: "orders", Step: "catch_up", Origin: agent.OriginDriver})
	if err != nil {
		t.Fatal(err)
	}
	before, _ := leader.Node.FSM().Plan("orders")
	agenttest.Eventually(t, 5*time.Second, func() error {
		for _, m := range c.Running() {
			if c.Node(m.Index).FSM().Index() < intent.Index {
				return fmt.Errorf("%s has not applied the intent", m.ID)
			}
		}
		return nil
	})

	killed := time.Now()
	c.Stop(leader.Index)
	next := c.Leader(5*time.Second, leader.Index)
	took := time.Since(killed)
	t.Logf("new leader %s after %s", next.ID, took)
	if next.ID == leader.ID {
		t.Fatal("the dead leader is still leading")
	}

	after, _ := next.Node.FSM().Plan("orders")
	if after.Phase != agent.PhaseFenced || after.Epoch != before.Epoch || after.Step == nil || after.Step.Epoch != intent.Index {
		t.Fatalf("after the kill: %+v, before: %+v", after, before)
	}
	// The new leader resumes the step under a new intent: a higher epoch.
	nc := c.Client(next.Index)
	resumed, err := next.Node.Propose(agenttest.Ctx(t, 5*time.Second), agent.Command{Op: agent.OpIntent, Plan: "orders", Step: "catch_up", Origin: agent.OriginDriver})
	if err != nil {
		t.Fatal(err)
	}
	if resumed.Plan.Epoch <= before.Epoch {
		t.Fatalf("epoch %d after resuming, %d before", resumed.Plan.Epoch, before.Epoch)
	}
	if resumed.Plan.Steps[len(resumed.Plan.Steps)-2].Outcome != agent.StepSuperseded {
		t.Errorf("the dead leader's step was not superseded: %+v", resumed.Plan.Steps)
	}
	// The old leader's outcome, were it to arrive now, is stale.
	if _, err := next.Node.Propose(agenttest.Ctx(t, 5*time.Second), agent.Command{Op: agent.OpOutcome, Plan: "orders", Epoch: intent.Index, OK: true, To: agent.PhaseCaughtUp, Origin: agent.OriginDriver}); !errors.Is(err, agent.ErrStaleEpoch) {
		t.Fatalf("stale outcome: %v", err)
	}
	walkTo(t, nc, "orders", agent.PhaseCaughtUp)

	// The dead node comes back and catches up.
	c.Restart(leader.Index)
	agenttest.Eventually(t, 10*time.Second, func() error {
		p, _ := c.Node(leader.Index).FSM().Plan("orders")
		if p.Phase != agent.PhaseCaughtUp {
			return fmt.Errorf("restarted node sees %s", p.Phase)
		}
		return nil
	})
	watch.check(t)
}

func TestIsolatedFollowerAnswersClosedAndCatchesUpOnHeal(t *testing.T) {
	c := agenttest.New(t, agenttest.Options{})
	leader := c.Leader(10 * time.Second)
	lc := c.Client(leader.Index)
	mustCreate(t, lc, "orders")
	walkTo(t, lc, "orders", agent.PhaseAuthorized)
	cut := (leader.Index + 1) % 3
	agenttest.Eventually(t, 5*time.Second, func() error {
		if p, _ := c.Node(cut).FSM().Plan("orders"); p.Phase != agent.PhaseAuthorized {
			return fmt.Errorf("node %d has applied %s", cut, p.Phase)
		}
		if _, r := rawGate(t, c.URL(cut), ""); !r.Open {
			return fmt.Errorf("gate on %d still %+v", cut, r)
		}
		return nil
	})

	c.Isolate(cut)
	// Every answer after the cut is closed, and comes within the bound.
	const bound = 2 * time.Second
	for deadline := time.Now().Add(1500 * time.Millisecond); time.Now().Before(deadline); {
		start := time.Now()
		code, r := rawGate(t, c.URL(cut), "")
		if took := time.Since(start); took > bound {
			t.Fatalf("the cut-off node took %s to answer", took)
		}
		if code != http.StatusServiceUnavailable || r.Open {
			t.Fatalf("the cut-off node answered %d %+v", code, r)
		}
		t.Logf("cut-off node: %q", r.Reason)
	}

	// The majority keeps committing.
	switched := walkTo(t, lc, "orders", agent.PhaseSwitched)
	if code, r := rawGate(t, c.URL(leader.Index), ""); code != http.StatusOK || r.Phase != "switched" {
		t.Fatalf("leader gate: %d %+v", code, r)
	}
	if p, _ := c.Node(cut).FSM().Plan("orders"); p.Phase != agent.PhaseAuthorized {
		t.Fatalf("the cut-off node applied %s while cut off", p.Phase)
	}

	c.Heal()
	agenttest.Eventually(t, 10*time.Second, func() error {
		p, _ := c.Node(cut).FSM().Plan("orders")
		if p.Phase != agent.PhaseSwitched || p.Epoch != switched.Epoch {
			return fmt.Errorf("healed node sees %s at %d", p.Phase, p.Epoch)
		}
		if _, r := rawGate(t, c.URL(cut), ""); !r.Open {
			return fmt.Errorf("healed node's gate: %+v", r)
		}
		return nil
	})
	if l := c.Leader(5 * time.Second); l.ID != leader.ID {
		t.Logf("leadership moved to %s on heal (pre-vote should prevent this)", l.ID)
	}
}

// stepDriver drives a plan forward by itself, one intent and outcome per
// phase, up to ready, then holds the step open until its context ends.
type stepDriver struct {
	node   string
	mu     *sync.Mutex
	events *[]string
}

func (d stepDriver) record(format string, args ...any) {
	d.mu.Lock()
	defer d.mu.Unlock()
	*d.events = append(*d.events, d.node+": "+fmt.Sprintf(format, args...))
}

func (d stepDriver) Drive(ctx context.Context, p agent.Plan, prop agent.Proposer) error {
	next := map[agent.Phase]agent.Phase{agent.PhasePending: agent.PhaseCopying, agent.PhaseCopying: agent.PhaseReplicating, agent.PhaseReplicating: agent.PhaseReady}
	if to, ok := next[p.Phase]; ok {
		epoch, err := prop.Intent(ctx, p.Name, "to_"+string(to), p.Epoch)
		if err != nil {
			return err
		}
		return prop.Outcome(ctx, p.Name, epoch, agent.Outcome{OK: true, To: to, Detail: "done by " + d.node})
	}
	if p.Phase != agent.PhaseReady {
		return nil
	}
	if p.Step != nil {
		d.record("resume %s at %d", p.Step.Name, p.Step.Epoch)
	}
	epoch, err := prop.Intent(ctx, p.Name, "hold", 0)
	if err != nil {
		return err
	}
	d.record("hold %d", epoch)
	<-ctx.Done()
	d.record("cancelled")
	return ctx.Err()
}

func TestDriverRunsOnTheLeaderAndStopsWithLeadership(t *testing.T) {
	var (
		mu     sync.Mutex
		events []string
	)
	c := agenttest.New(t, agenttest.Options{Driver: func(i int) agent.Driver {
		return stepDriver{node: fmt.Sprintf("n%d", i+1), mu: &mu, events: &events}
	}})
	leader := c.Leader(10 * time.Second)
	mustCreate(t, c.Client(leader.Index), "orders")
	watch := watchEpochs(t, c, "orders")
	eventsOf := func() []string { mu.Lock(); defer mu.Unlock(); return append([]string(nil), events...) }

	agenttest.Eventually(t, 10*time.Second, func() error {
		if ev := eventsOf(); len(ev) == 0 || !strings.HasPrefix(ev[len(ev)-1], leader.ID+": hold") {
			return fmt.Errorf("events %q", ev)
		}
		return nil
	})
	for _, e := range leader.Node.FSM().Audit("orders", 0) {
		if e.Actor == "driver" && e.Node != leader.ID {
			t.Errorf("driver command from %s, not the leader: %+v", e.Node, e)
		}
	}

	// Cut the leader off: it loses leadership and its driver is cancelled
	// within the leader lease; its gate answers closed.
	cut := time.Now()
	c.Isolate(leader.Index)
	agenttest.Eventually(t, 3*time.Second, func() error {
		if ev := eventsOf(); !contains(ev, leader.ID+": cancelled") {
			return fmt.Errorf("events %q", ev)
		}
		return nil
	})
	t.Logf("driver cancelled %s after the cut", time.Since(cut))
	start := time.Now()
	if code, r := rawGate(t, c.URL(leader.Index), ""); code != http.StatusServiceUnavailable || time.Since(start) > 2*time.Second {
		t.Errorf("deposed leader's gate: %d %+v after %s", code, r, time.Since(start))
	}

	// The new leader picks up from the committed state: it finds the held
	// step open and resumes it under a higher epoch.
	next := c.Leader(5*time.Second, leader.Index)
	agenttest.Eventually(t, 5*time.Second, func() error {
		ev := eventsOf()
		if !contains(ev, next.ID+": resume hold") {
			return fmt.Errorf("events %q", ev)
		}
		return nil
	})
	c.Heal()
	c.Stop(next.Index)
	watch.check(t)
	p, _ := c.Node(leader.Index).FSM().Plan("orders")
	if p.Phase != agent.PhaseReady {
		t.Fatalf("phase %s", p.Phase)
	}
}

func contains(events []string, prefix string) bool {
	for _, e := range events {
		if strings.HasPrefix(e, prefix) {
			return true
		}
	}
	return false
}

// finalizeDriver drives nothing and records Finalize calls; the first one
// fails, to exercise the retry.
type finalizeDriver struct {
	node  string
	mu    *sync.Mutex
	calls *[]string
}

func (finalizeDriver) Drive(context.Context, agent.Plan, agent.Proposer) error { return nil }

func (d finalizeDriver) Finalize(ctx context.Context, p agent.Plan) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	*d.calls = append(*d.calls, d.node+" "+p.Name+" "+string(p.Phase))
	if len(*d.calls) == 1 {
		return errors.New("blue is not reachable yet")
	}
	return nil
}

func TestFinalizeRunsOnTheLeaderUntilCommitted(t *testing.T) {
	var (
		mu    sync.Mutex
		calls []string
	)
	c := agenttest.New(t, agenttest.Options{Driver: func(i int) agent.Driver {
		return finalizeDriver{node: fmt.Sprintf("n%d", i+1), mu: &mu, calls: &calls}
	}})
	leader := c.Leader(10 * time.Second)
	lc := c.Client(leader.Index)
	mustCreate(t, lc, "orders")
	walkTo(t, lc, "orders", agent.PhaseFenced)
	write(t, func(ctx context.Context) (agent.PlanInfo, error) {
		return lc.Abort(ctx, "orders", "operator abort while fenced")
	},
		func(err error) bool { return strings.Contains(err.Error(), "already in that phase") })
	agenttest.Eventually(t, 10*time.Second, func() error {
		for _, m := range c.Members() {
			if p, _ := c.Node(m.Index).FSM().Plan("orders"); p.Finalized.IsZero() {
				return fmt.Errorf("%s: not finalized", m.ID)
			}
		}
		return nil
	})
	mu.Lock()
	got := append([]string(nil), calls...)
	mu.Unlock()
	want := leader.ID + " orders aborted"
	if len(got) != 2 || got[0] != want || got[1] != want {
		t.Fatalf("Finalize calls %q, want two (one failed, one retried) on the leader", got)
	}
	// A new leader does not finalize again.
	c.Stop(leader.Index)
	c.Leader(5*time.Second, leader.Index)
	time.Sleep(300 * time.Millisecond)
	mu.Lock()
	defer mu.Unlock()
	if len(calls) != 2 {
		t.Fatalf("Finalize called again after the leader changed: %q", calls)
	}
}
