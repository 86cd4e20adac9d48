package agent_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/agenttest"
)

// seenDriver resolves the plan's spec on every pass, as the real driver
// does, and keeps the blue password it resolved.
type seenDriver struct{ pw *atomic.Value }

func (d seenDriver) Drive(ctx context.Context, plan agent.Plan, _ agent.Proposer) error {
	spec, err := plan.Spec()
	if err != nil {
		return err
	}
	dsn := spec.Pairs[0].Blue.DSN.Reveal()
	pw := strings.TrimPrefix(dsn[:strings.LastIndex(dsn, "@")], "postgres://app:")
	d.pw.Store(pw)
	select {
	case <-ctx.Done():
	case <-time.After(50 * time.Millisecond):
	}
	return nil
}

func fileRefSpec(name, path string) json.RawMessage {
	return json.RawMessage(fmt.Sprintf(`{"name":%q,"pairs":[{"name":"db","engine":"postgres",
 "blue":{"dsn":"postgres://app:${file:%s}@127.0.0.1:5432/shop"},
 "green":{"dsn":"postgres://app:${file:%s}@127.0.0.1:5433/shop"}}]}`, name, path, path))
}

func TestASecretFileIsReadWhenTheAgentActsAndAnUnusableOneIsReportedLikeAMissingVariable(t *testing.T) {
	dir := t.TempDir()
	pwFile := filepath.Join(dir, "shop_pw")
	const pw = "file-pw-6d1e90b2c4"
	if err := os.WriteFile(pwFile, []byte(pw+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var seen atomic.Value
	c := agenttest.New(t, agenttest.Options{
		Driver: func(int) agent.Driver { return seenDriver{pw: &seen} },
		Tweak:  func(_ int, cfg *agent.Config) { cfg.SecretDirs = []string{dir} },
	})
	leader := c.Leader(10 * time.Second)
	cl := c.Client(leader.Index)

	t.Run("a posted plan may name files under secret_dirs only", func(t *testing.T) {
		other := filepath.Join(t.TempDir(), "pw")
		if err := os.WriteFile(other, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		for _, path := range []string{other, dir + "/../" + filepath.Base(other), "relative/pw"} {
			_, err := cl.CreatePlan(agenttest.Ctx(t, 10*time.Second), agent.CreatePlanRequest{Spec: fileRefSpec("outside", path)})
			if !errors.Is(err, agent.ErrInvalidCommand) || !strings.Contains(err.Error(), "secret_dirs ("+dir+")") {
				t.Errorf("a file reference to %s: %v", path, err)
			}
		}
	})

	p := write(t, func(ctx context.Context) (agent.PlanInfo, error) {
		return cl.CreatePlan(ctx, agent.CreatePlanRequest{Spec: fileRefSpec("orders", pwFile), Reason: "test"})
	}, func(err error) bool { return errors.Is(err, agent.ErrPlanExists) })
	if strings.Contains(string(p.Spec), pw) {
		t.Fatalf("the spec shown holds the password: %s", p.Spec)
	}
	// The file becomes readable by others before the plan starts: the
	// driver, called at the start, fails on it.
	if err := os.Chmod(pwFile, 0o644); err != nil {
		t.Fatal(err)
	}
	write(t, func(ctx context.Context) (agent.PlanInfo, error) { return cl.Start(ctx, "orders", "test") }, nil)

	// unusable checks that every agent reports the file, with why, in its
	// status and /readyz, and that the leader's driver fails naming it.
	unusable := func(t *testing.T, why string, driver bool) {
		t.Helper()
		want := "file " + pwFile + ": " + why
		agenttest.Eventually(t, 30*time.Second, func() error {
			for i := range c.Running() {
				st, err := c.Client(i).Status(agenttest.Ctx(t, 5*time.Second))
				if err != nil {
					return err
				}
				if len(st.Plans) != 1 || len(st.Plans[0].MissingEnv) != 1 || !strings.HasPrefix(st.Plans[0].MissingEnv[0], want) {
					return fmt.Errorf("node %d status plans = %+v", i, st.Plans)
				}
				resp, err := http.Get(c.URL(i) + "/readyz")
				if err != nil {
					return err
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				var ready struct {
					Plans map[string]string `json:"plans"`
				}
				if err := json.Unmarshal(body, &ready); err != nil || !strings.HasPrefix(ready.Plans["orders"], "missing "+want) {
					return fmt.Errorf("node %d readyz = %s", i, body)
				}
			}
			pl, err := c.Client(0).Plan(agenttest.Ctx(t, 5*time.Second), "orders")
			if err != nil {
				return err
			}
			if driver && (pl.Driver == nil || !strings.Contains(pl.Driver.LastError, "plan orders needs "+want)) {
				return fmt.Errorf("driver status = %+v", pl.Driver)
			}
			return nil
		})
	}

	t.Run("a file group or others may read is refused, saying so", func(t *testing.T) {
		unusable(t, "mode 0644 gives group or others access; chmod 600 it", true)
	})

	t.Run("a missing file is reported", func(t *testing.T) {
		if err := os.Remove(pwFile); err != nil {
			t.Fatal(err)
		}
		unusable(t, "no such file or directory", false)
	})

	t.Run("once the file is back the driver reads it and goes on", func(t *testing.T) {
		if err := os.WriteFile(pwFile, []byte(pw), 0o400); err != nil {
			t.Fatal(err)
		}
		agenttest.Eventually(t, 60*time.Second, func() error {
			st, err := c.Client(0).Status(agenttest.Ctx(t, 5*time.Second))
			if err != nil {
				return err
			}
			if p := st.Plans[0]; len(p.MissingEnv) > 0 || p.Driver == nil || p.Driver.Failures != 0 {
				return fmt.Errorf("plan = %+v driver %+v", p, p.Driver)
			}
			if got, _ := seen.Load().(string); got != pw {
				return fmt.Errorf("the driver resolved %q", got)
			}
			return nil
		})
	})
}
