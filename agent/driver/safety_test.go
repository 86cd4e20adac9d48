package driver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/agenttest"
	"github.com/cutover/cutover/consistency"
	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/replication"
)

func TestPermanentErrorsAreTheListedOnes(t *testing.T) {
	errLocal := errors.New("a sentinel of another package (test)")
	saved := permanentErrors
	permanentErrors = append(append([]error(nil), saved...), errLocal)
	t.Cleanup(func() { permanentErrors = saved })
	tests := []struct {
		name string
		err  error
		want bool
	}{
		{"a pre-check failure, wrapped", fmt.Errorf("pair db: %w", replication.ErrPrecheck), true},
		{"an unsupported engine", fmt.Errorf("pair cache: %w", errUnsupported), true},
		{"an unreadable spec", fmt.Errorf("%w: bad", errSpec), true},
		{"a table the verifier cannot compare", fmt.Errorf("verify public.t: %w", consistency.ErrUnverifiable), true},
		{"a sentinel added to the list", fmt.Errorf("verify public.t: %w", errLocal), true},
		{"a lost connection heals", errors.New("measure lag of db: connection refused"), false},
		{"a cancelled context heals", context.Canceled, false},
		{"nil", nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := permanent(tt.err); got != tt.want {
				t.Fatalf("permanent(%v) = %v", tt.err, got)
			}
			if got := errors.Is(classify(tt.err), agent.ErrPermanent); got != tt.want {
				t.Fatalf("classify(%v) marked permanent: %v", tt.err, got)
			}
		})
	}
}

// Before, the runtime refused the pair on every call and the leader
// retried the plan every 30 s forever, the status saying copying.
func TestAPlanTheDriverCannotRunIsAbortedWithTheReason(t *testing.T) {
	c := newCluster(t, Options{})
	spec := map[string]any{
		"name": "cache",
		"pairs": []map[string]any{{
			"name": "sessions", "engine": "redis",
			"blue": map[string]any{"dsn": "redis://:redis-pw-41@127.0.0.1:1/0"}, "green": map[string]any{"dsn": "redis://:redis-pw-41@127.0.0.1:2/0"},
		}},
	}
	raw, _ := json.Marshal(spec)
	c.Leader(15 * time.Second)
	ctx := agenttest.Ctx(t, 30*time.Second)
	if _, err := c.Client(0).CreatePlan(ctx, agent.CreatePlanRequest{Spec: raw, Reason: "test", AllowLiteralSecrets: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Client(0).Start(ctx, "cache", "test"); err != nil {
		t.Fatal(err)
	}
	p := waitPhase(t, c, "cache", 20*time.Second, agent.PhaseAborted)
	if !strings.Contains(p.Reason, "engine redis") || !strings.Contains(p.Reason, "not supported") {
		t.Errorf("reason = %q", p.Reason)
	}
	if strings.Contains(p.Reason, "redis-pw-41") {
		t.Errorf("reason leaks the password: %q", p.Reason)
	}
}

// isInsufficientPrivilege reports whether err is SQLSTATE 42501.
func isInsufficientPrivilege(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "42501"
}

// appWrite writes as the application on dsn, bounded in time.
func appWrite(dsn string) error {
	conn, err := pgxConnect(dsn)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = conn.Exec(ctx, "UPDATE load_accounts SET balance = balance + 1 WHERE id = 3")
	return err
}

// A flip whose only target fails switches nothing. Before, the driver then
// ignored whether green was fenced again and unfenced blue by aborting:
// with green's fence not back, both sides took writes.
func TestAFailedFlipNeverUnfencesBlueUntilGreenIsFencedAgain(t *testing.T) {
	s := newScenario(t, 100)
	s.spec.Switch.Targets = []config.Target{{Type: config.TargetCommand, Command: []string{"sh", "-c", "exit 3"}, Timeout: config.Duration(5 * time.Second)}}
	var refenceBroken atomic.Bool
	refenceBroken.Store(true)
	var refenceTries atomic.Int64
	core, observed := observer.New(zap.ErrorLevel)
	c := newCluster(t, Options{Logger: zap.New(core), Fault: func(point string) error {
		if point == "before refence green" {
			refenceTries.Add(1)
			if refenceBroken.Load() {
				return errors.New("green unreachable (injected)")
			}
		}
		return nil
	}})
	m := specForAPI(s.spec)
	m["switch"] = map[string]any{"targets": []map[string]any{{"type": "command", "command": []string{"sh", "-c", "exit 3"}, "timeout": "5s"}}}
	raw, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	c.Leader(15 * time.Second)
	ctx := agenttest.Ctx(t, 30*time.Second)
	if _, err := c.Client(0).CreatePlan(ctx, agent.CreatePlanRequest{Spec: raw, Reason: "test", AllowLiteralSecrets: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Client(0).Start(ctx, "shop", "test"); err != nil {
		t.Fatal(err)
	}
	waitPhase(t, c, "shop", 90*time.Second, agent.PhaseAuthorized, agent.PhaseAborted, agent.PhaseSwitched)

	// Green cannot be fenced again: the plan stays authorized, the flip is
	// retried, and blue stays fenced all along.
	agenttest.Eventually(t, 60*time.Second, func() error {
		if n := refenceTries.Load(); n < 2*refenceAttempts {
			return fmt.Errorf("%d tries to fence green again, want two flip attempts' worth", n)
		}
		return nil
	})
	p := waitPhase(t, c, "shop", 5*time.Second, agent.PhaseAuthorized, agent.PhaseAborted)
	if p.Phase != agent.PhaseAuthorized {
		t.Fatalf("plan %s (%s) while green could not be fenced again", p.Phase, p.Reason)
	}
	if err := appWrite(s.blue.DSNFor("cutover", "app", "app-password")); !isInsufficientPrivilege(err) {
		t.Fatalf("an application write on blue while green is not fenced again: %v, want 42501", err)
	}
	if observed.FilterMessageSnippet("GREEN MAY TAKE WRITES").Len() == 0 {
		t.Error("the failure to fence green again is not logged loudly")
	}

	// Once green's fence is back, the failed flip aborts cleanly: blue
	// takes writes again, green refuses them.
	refenceBroken.Store(false)
	p = waitPhase(t, c, "shop", 90*time.Second, agent.PhaseAborted)
	if !strings.Contains(p.Reason, "flip failed before any target switched") {
		t.Errorf("reason = %q", p.Reason)
	}
	agenttest.Eventually(t, 30*time.Second, func() error {
		return appWrite(s.blue.DSNFor("cutover", "app", "app-password"))
	})
	if err := appWrite(s.green.DSNFor("cutover", "app", "app-password")); !isInsufficientPrivilege(err) {
		t.Errorf("an application write on green after the abort: %v, want 42501", err)
	}
}

// Green's fence moves to logins before the window; a session that gets
// onto green past the lock (here the lock lifted by hand and a login
// made) has the grants back and may write. The flip finds it: green's
// grants are fenced again and the plan aborts, blue unfenced; it never
// flips to a green that took a write of its own.
func TestABreachOfGreensLoginFenceAbortsTheFlip(t *testing.T) {
	s := newScenario(t, 100)
	var breached atomic.Bool
	intruder := make(chan *pgconn.PgConn, 1)
	c := newCluster(t, Options{Fault: func(point string) error {
		if point != "before flip" || breached.Swap(true) {
			return nil
		}
		ctx := context.Background()
		if err := s.green.Exec(ctx, "ALTER ROLE app LOGIN"); err != nil {
			return err
		}
		conn, err := pgconn.Connect(ctx, s.green.DSNFor("cutover", "app", "app-password"))
		if err != nil {
			return err
		}
		intruder <- conn
		return nil
	}})
	createAndStart(t, c, s.spec)
	p := waitPhase(t, c, "shop", 3*time.Minute, agent.PhaseAborted, agent.PhaseSwitched)
	if p.Phase != agent.PhaseAborted || !strings.Contains(p.Reason, "breached") {
		t.Fatalf("plan %s (%s), want aborted for a breach of green's fence", p.Phase, p.Reason)
	}
	conn := <-intruder
	defer conn.Close(context.Background())
	if _, err := conn.Exec(context.Background(), "UPDATE load_accounts SET balance = balance + 1 WHERE id = 3").ReadAll(); !isInsufficientPrivilege(err) {
		t.Errorf("the intruder's write on green after the abort: %v, want 42501", err)
	}
	agenttest.Eventually(t, 30*time.Second, func() error {
		return appWrite(s.blue.DSNFor("cutover", "app", "app-password"))
	})
}
