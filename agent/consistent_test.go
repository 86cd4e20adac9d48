package agent_test

import (
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/agenttest"
)

func TestAClientReadsItsOwnWriteThroughALaggingFollower(t *testing.T) {
	c := agenttest.New(t, agenttest.Options{})
	leader := c.Leader(10 * time.Second)
	follower := (leader.Index + 1) % 3
	cl := c.Client(follower)
	mustCreate(t, cl, "orders")
	c.WaitReplicated(10 * time.Second)

	// The follower stops receiving the log but can still reach the
	// leader's API (registered under another name), so that it forwards the
	// write the leader commits with the third node.
	ms := c.Members()
	c.Net.Register(ms[leader.Index].ID+"-api", ms[leader.Index].APIAddr)
	c.Net.Cut(ms[leader.Index].ID, ms[follower].ID)
	defer c.Heal()

	ctx := agenttest.Ctx(t, 20*time.Second)
	p, err := cl.Start(ctx, "orders", "read your writes")
	if err != nil {
		t.Fatalf("start through the follower: %v", err)
	}
	if p.Phase != agent.PhaseCopying {
		t.Fatalf("the write answered phase %s", p.Phase)
	}
	if got, ok := c.Node(follower).FSM().Plan("orders"); !ok || got.Phase != agent.PhasePending {
		t.Fatalf("the follower already applied the write (%s): the test proves nothing", got.Phase)
	}
	if cl.Index() < p.Index {
		t.Fatalf("the client's index %d is below its write's %d", cl.Index(), p.Index)
	}

	healed := make(chan struct{})
	go func() {
		time.Sleep(time.Second)
		c.Heal()
		close(healed)
	}()
	got, err := cl.Plan(ctx, "orders")
	if err != nil {
		t.Fatalf("read after write: %v", err)
	}
	if got.Phase != agent.PhaseCopying {
		t.Errorf("the client read phase %s after its own write moved the plan to copying", got.Phase)
	}
	select {
	case <-healed:
	default:
		t.Error("the read answered before the follower could have caught up")
	}
}

func TestEveryAnswerCarriesItsIndexAndIndexAndConsistentReadsWait(t *testing.T) {
	c := agenttest.New(t, agenttest.Options{})
	leader := c.Leader(10 * time.Second)
	follower := (leader.Index + 1) % 3
	mustCreate(t, c.Client(leader.Index), "orders")
	c.WaitReplicated(10 * time.Second)
	applied := c.Node(follower).FSM().Index()

	get := func(i int, path string) (*http.Response, uint64) {
		t.Helper()
		req, _ := http.NewRequest("GET", c.URL(i)+path, nil)
		req.Header.Set("Authorization", "Bearer "+agenttest.ReadToken)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		idx, err := strconv.ParseUint(resp.Header.Get(agent.HeaderIndex), 10, 64)
		if err != nil {
			t.Fatalf("%s: no %s header: %v", path, agent.HeaderIndex, err)
		}
		return resp, idx
	}
	for _, path := range []string{"/v1/status", "/v1/plans", "/v1/plans/orders", "/v1/audit", "/v1/gate/orders", "/healthz"} {
		if _, idx := get(follower, path); idx < applied {
			t.Errorf("%s: index %d, below the %d the follower applied", path, idx, applied)
		}
	}
	t.Run("a consistent read through a follower is answered by the leader", func(t *testing.T) {
		resp, idx := get(follower, "/v1/plans/orders?consistent")
		if resp.StatusCode != 200 || idx < applied {
			t.Errorf("status %d, index %d", resp.StatusCode, idx)
		}
	})
	t.Run("an index not yet reached is waited for, then refused with 504", func(t *testing.T) {
		start := time.Now()
		resp, idx := get(follower, "/v1/plans/orders?index="+strconv.FormatUint(applied+1000, 10))
		if resp.StatusCode != http.StatusGatewayTimeout || idx >= applied+1000 {
			t.Errorf("status %d, index %d", resp.StatusCode, idx)
		}
		if took := time.Since(start); took < 9*time.Second || took > 30*time.Second {
			t.Errorf("answered after %s, want about 10s", took)
		}
	})
	t.Run("a bad index is a 400", func(t *testing.T) {
		if resp, _ := get(follower, "/v1/plans?index=soon"); resp.StatusCode != http.StatusBadRequest {
			t.Errorf("status %d", resp.StatusCode)
		}
	})
}
