package main

import (
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/agenttest"
)

func TestMain(m *testing.M) {
	// The CLI keeps the indexes it saw per address (indexstate.go): keep
	// the tests' out of the user's state folder.
	dir, err := os.MkdirTemp("", "cutover-cli-state-")
	if err != nil {
		panic(err)
	}
	os.Setenv("CUTOVER_STATE_DIR", dir)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func TestACLIReadAfterACLIWriteThroughALaggingFollowerShowsTheWrite(t *testing.T) {
	t.Setenv("CUTOVER_STATE_DIR", t.TempDir())
	c := agenttest.New(t, agenttest.Options{})
	leader := c.Leader(10 * time.Second)
	follower := (leader.Index + 1) % 3
	t.Setenv("CUTOVER_TOKEN", agenttest.OperatorToken)
	t.Setenv("CUTOVER_ADDR", c.URL(follower))
	t.Setenv("CUTOVER_T_IDX_PW", "idx-pw-1c2b3a")
	spec := t.TempDir() + "/orders.json"
	if err := os.WriteFile(spec, []byte(`{"name":"orders","manual":true,"pairs":[{"name":"db","engine":"postgres",
		"blue":{"dsn":"postgres://app:${CUTOVER_T_IDX_PW}@127.0.0.1:5432/shop"},"green":{"dsn":"postgres://app:${CUTOVER_T_IDX_PW}@127.0.0.1:5433/shop"}}]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if code, out, errOut := cli(t, "plan", "create", "--file", spec); code != 0 {
		t.Fatalf("create: %d %s %s", code, out, errOut)
	}
	c.WaitReplicated(10 * time.Second)

	// The follower stops receiving the log but can still reach the
	// leader's API, so that it forwards the write the leader commits with
	// the third node.
	ms := c.Members()
	c.Net.Register(ms[leader.Index].ID+"-api", ms[leader.Index].APIAddr)
	c.Net.Cut(ms[leader.Index].ID, ms[follower].ID)
	defer c.Heal()
	if code, out, errOut := cli(t, "plan", "start", "orders"); code != 0 || !strings.Contains(out, "copying") {
		t.Fatalf("start: %d %s %s", code, out, errOut)
	}
	if p, _ := c.Node(follower).FSM().Plan("orders"); p.Phase != agent.PhasePending {
		t.Fatalf("the follower already applied the start (%s): the test proves nothing", p.Phase)
	}

	healed := make(chan struct{})
	go func() {
		time.Sleep(time.Second)
		c.Heal()
		close(healed)
	}()
	// A new run of the CLI: only the index kept by the last one tells it
	// to wait for the write.
	code, out, errOut := cli(t, "plan", "show", "orders")
	if code != 0 || !regexp.MustCompile(`(?m)^phase\s+copying$`).MatchString(out) {
		t.Fatalf("plan show after the start: %d\n%s%s", code, out, errOut)
	}
	select {
	case <-healed:
	default:
		t.Error("the read answered before the follower could have caught up")
	}

	code, out, errOut = cli(t, "status")
	if code != 0 || !strings.Contains(out, "this answer reflects the state at Raft index ") {
		t.Fatalf("status: %d\n%s%s", code, out, errOut)
	}
	var shown uint64
	for _, line := range strings.Split(out, "\n") {
		if rest, ok := strings.CutPrefix(line, "this answer reflects the state at Raft index "); ok {
			for _, ch := range rest {
				shown = shown*10 + uint64(ch-'0')
			}
		}
	}
	if applied := c.Node(follower).FSM().Index(); shown == 0 || shown > applied {
		t.Errorf("status shows index %d; the follower has applied %d", shown, applied)
	}
}
