package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/agenttest"
)

// stuckDriver fails every step of a started plan, as a driver facing a
// database that is down does.
type stuckDriver struct{}

func (stuckDriver) Drive(_ context.Context, p agent.Plan, _ agent.Proposer) error {
	if p.Phase == agent.PhasePending {
		return nil
	}
	return errors.New("measure lag of db: dial postgres://app:cli-stuck-pw@127.0.0.1:1/shop: connection refused")
}

func TestPlanTransitionOfADrivenPlanIsRefusedAndStatusShowsItsRetries(t *testing.T) {
	c := agenttest.New(t, agenttest.Options{Driver: func(int) agent.Driver { return stuckDriver{} }})
	leader := c.Leader(10 * time.Second)
	t.Setenv("CUTOVER_TOKEN", agenttest.OperatorToken)
	t.Setenv("CUTOVER_ADDR", c.URL((leader.Index+1)%3))
	// The spec names its password by reference: agents keep the reference
	// and resolve it from their environment.
	t.Setenv("CUTOVER_TEST_DB_PASSWORD", "cli-secret-pw")
	spec := filepath.Join(t.TempDir(), "orders.json")
	if err := os.WriteFile(spec, []byte(`{"name":"orders","pairs":[{"name":"db","engine":"postgres",
		"blue":{"dsn":"postgres://app:${CUTOVER_TEST_DB_PASSWORD}@127.0.0.1:5432/shop"},"green":{"dsn":"postgres://app:${CUTOVER_TEST_DB_PASSWORD}@127.0.0.1:5433/shop"}}]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"plan", "create", "--file", spec}, {"plan", "start", "orders"}} {
		if code, out, errOut := cli(t, args...); code != 0 {
			t.Fatalf("%v: exit %d %s %s", args, code, out, errOut)
		}
	}

	t.Run("plan transition of a phase the driver owns exits 1 and says what to do", func(t *testing.T) {
		code, out, errOut := cli(t, "plan", "transition", "orders", "--to", "replicating")
		if code != 1 || !strings.Contains(errOut, "plan driver owns this move") || !strings.Contains(errOut, "manual: true") {
			t.Fatalf("exit %d\nstdout %q\nstderr %q", code, out, errOut)
		}
	})

	t.Run("status on a follower shows the retries and the last error, redacted", func(t *testing.T) {
		var out, errOut string
		agenttest.Eventually(t, 20*time.Second, func() error {
			var code int
			code, out, errOut = cli(t, "status")
			if code != 0 || !strings.Contains(out, "orders: RETRYING: the driver failed") || !strings.Contains(out, "connection refused") {
				return errors.New("status does not show the retries yet")
			}
			return nil
		})
		if strings.Contains(out+errOut, "cli-stuck-pw") || strings.Contains(out+errOut, "cli-secret-pw") {
			t.Fatalf("status leaks a password: %s", out)
		}
	})
}

func TestStatusPrintsAManualPlanAndARetriedOne(t *testing.T) {
	at := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	var b bytes.Buffer
	printStatus(&b, agent.Status{Node: "n1", State: "Leader", Leader: "n1", Plans: []agent.PlanSummary{
		{Name: "drill", Phase: agent.PhaseReady, Epoch: 4, Manual: true},
		{Name: "orders", Phase: agent.PhaseReplicating, Epoch: 9, Driver: &agent.DriverStatus{Failures: 3, Retries: 7, LastError: "measure lag of db: connection refused", Phase: agent.PhaseReplicating, At: at}},
	}}, 0)
	for _, want := range []string{
		"drill: manual (operators move its phases",
		"orders: RETRYING: the driver failed 3 times in a row (7 retries in all); last error in replicating at 2026-12-03T12:00:00Z: measure lag of db: connection refused",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("status lacks %q:\n%s", want, b.String())
		}
	}
}
