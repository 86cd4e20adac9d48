package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/agenttest"
	"github.com/cutover/cutover/switch/gate"
)

// cli runs the command line in process and returns its exit code and output.
func cli(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestGateAndPlanCommandsAgainstACluster(t *testing.T) {
	c := agenttest.New(t, agenttest.Options{})
	leader := c.Leader(10 * time.Second)
	addr := c.URL((leader.Index + 1) % 3) // a follower: writes are forwarded
	t.Setenv("CUTOVER_TOKEN", agenttest.OperatorToken)
	t.Setenv("CUTOVER_ADDR", addr)

	// The spec names its password by reference: agents keep the reference
	// and resolve it from their environment.
	t.Setenv("CUTOVER_TEST_DB_PASSWORD", "cli-secret-pw")
	spec := filepath.Join(t.TempDir(), "orders.json")
	if err := os.WriteFile(spec, []byte(`{"name":"orders","manual":true,"pairs":[{"name":"db","engine":"postgres",
		"blue":{"dsn":"postgres://app:${CUTOVER_TEST_DB_PASSWORD}@127.0.0.1:5432/shop"},"green":{"dsn":"postgres://app:${CUTOVER_TEST_DB_PASSWORD}@127.0.0.1:5433/shop"}}]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		name     string
		args     []string
		wantCode int
		wantOut  string
		wantErr  string
	}{
		{"the gate is closed while there is no plan", []string{"gate"}, 1, "closed: no active plan", "gate closed"},
		{"a plan is created from a posted spec", []string{"plan", "create", "--file", spec, "--reason", "ticket 7"}, 0, "pending", ""},
		{"a plan from the configuration that does not exist is refused", []string{"plan", "create", "nope"}, 1, "", "no plan \"nope\" in the configuration"},
		{"the plan starts", []string{"plan", "start", "orders"}, 0, "copying", ""},
		{"an illegal transition exits 1 with the reason", []string{"plan", "transition", "orders", "--to", "fenced"}, 1, "", "skips replicating, ready"},
		{"the gate is closed before authorized", []string{"gate", "--plan", "orders"}, 1, "closed: plan orders is copying", ""},
		{"waiting for a closed gate times out with 1", []string{"gate", "--plan", "orders", "--wait", "--timeout", "300ms", "--interval", "50ms"}, 1, "closed", "timed out"},
		{"an unreachable agent exits 2", []string{"gate", "--addr", "http://127.0.0.1:1", "--timeout", "2s"}, 2, "", "connection refused"},
		{"a wrong token exits 2", []string{"gate", "--token", "not-the-token-0123456789"}, 2, "", "HTTP 401"},
		{"status shows the plan", []string{"status"}, 0, "orders", ""},
		{"plan show prints the audit log", []string{"plan", "show", "orders"}, 0, "ticket 7", ""},
		{"members list shows three voters", []string{"members", "list"}, 0, "Voter", ""},
		{"a running plan cannot be deleted", []string{"plan", "delete", "orders"}, 1, "", "only a finished plan can be deleted"},
		{"audit export writes the whole log to a file", []string{"audit", "export", "--out", filepath.Join(t.TempDir(), "audit.json")}, 0, "", "audit entries written"},
		{"audit export writes the whole log to standard output", []string{"audit", "export"}, 0, `"op": "create_plan"`, ""},
	}
	for _, s := range steps {
		t.Run(s.name, func(t *testing.T) {
			code, out, errOut := cli(t, s.args...)
			if code != s.wantCode || !strings.Contains(out, s.wantOut) || !strings.Contains(errOut, s.wantErr) {
				t.Fatalf("exit %d (want %d)\nstdout %q (want %q)\nstderr %q (want %q)", code, s.wantCode, out, s.wantOut, errOut, s.wantErr)
			}
			if strings.Contains(out+errOut, "cli-secret-pw") || strings.Contains(out+errOut, agenttest.OperatorToken) {
				t.Fatalf("output leaks a secret: %s %s", out, errOut)
			}
		})
	}

	t.Run("gate --wait exits 0 once the plan is authorized meanwhile", func(t *testing.T) {
		done := make(chan struct{})
		go func() {
			defer close(done)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			cl := c.Client(leader.Index)
			for _, to := range []agent.Phase{agent.PhaseReplicating, agent.PhaseReady, agent.PhaseFenced, agent.PhaseCaughtUp, agent.PhaseVerified, agent.PhaseAuthorized} {
				time.Sleep(20 * time.Millisecond)
				if _, err := cl.Transition(ctx, "orders", agent.TransitionRequest{To: to}); err != nil {
					t.Errorf("to %s: %v", to, err)
					return
				}
			}
		}()
		code, out, errOut := cli(t, "gate", "--plan", "orders", "--wait", "--timeout", "10s", "--interval", "50ms", "--json")
		<-done
		var r gate.Response
		if code != 0 || json.Unmarshal([]byte(out), &r) != nil || !r.Open || r.Phase != "authorized" {
			t.Fatalf("exit %d, stdout %q, stderr %q", code, out, errOut)
		}
	})
}
