package driver

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/agenttest"
	"github.com/cutover/cutover/internal/logging"
	"github.com/cutover/cutover/internal/redact"
	"github.com/cutover/cutover/switch/health/checks"
	"github.com/cutover/cutover/switch/target/targets"
)

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// The "done when", with the real driver and real databases: a
// plan holding a DSN password, a webhook URL with a password and a
// ?token=, and a command with a secret argument (from the environment and
// from a file) runs to the flip; none of the values appears in an API
// answer, a log line, a consistency report or any file under data_dir.
func TestARealCutoverLeavesNoSecretInAnswersLogsReportsOrDataDir(t *testing.T) {
	ctx := context.Background()
	s := newScenario(t, 200)
	secrets := map[string]string{
		"CUTOVER_T_PG_PW":      "pgpw-51c9e0a7d3",
		"CUTOVER_T_HOOK_PW":    "hookpw-0d8e3b6a21",
		"CUTOVER_T_HOOK_TOKEN": "hooktoken-c47f1e92b5",
	}
	for k, v := range secrets {
		t.Setenv(k, v)
	}
	secretDir := t.TempDir()
	secrets["file cmd_arg"] = "filearg-73b2d05e9c"
	if err := os.WriteFile(filepath.Join(secretDir, "cmd_arg"), []byte(secrets["file cmd_arg"]+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	role := fmt.Sprintf(`CREATE ROLE cutover_agent SUPERUSER LOGIN PASSWORD '%s'`, secrets["CUTOVER_T_PG_PW"])
	if err := s.blue.Exec(ctx, role); err != nil {
		t.Fatal(err)
	}
	if err := s.green.Exec(ctx, role); err != nil {
		t.Fatal(err)
	}

	var hookAuth atomic.Value
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, pw, _ := r.BasicAuth()
		hookAuth.Store(pw + " " + r.URL.Query().Get("token"))
	}))
	defer hook.Close()
	argOut := filepath.Join(t.TempDir(), "arg")

	logs := &syncBuffer{}
	reports := filepath.Join(t.TempDir(), "reports")
	l, err := logging.New("json", "debug", redact.NewRedactor(), logs)
	if err != nil {
		t.Fatal(err)
	}
	c := agenttest.New(t, agenttest.Options{Nodes: 3,
		Driver: func(int) agent.Driver {
			return New(Options{Engines: testEngines, NewTarget: targets.New, NewHealthCheck: checks.New, ReportDir: reports, LagPoll: 50 * time.Millisecond, Logger: l})
		},
		Tweak: func(_ int, cfg *agent.Config) {
			cfg.Logger = l
			cfg.SecretDirs = []string{secretDir}
		},
	})

	dsn := func(port int) string {
		return fmt.Sprintf("postgres://cutover_agent:${CUTOVER_T_PG_PW}@%s:%d/%s?sslmode=disable", s.blue.Host, port, s.blue.Database)
	}
	spec := specForAPI(s.spec)
	pair := spec["pairs"].([]map[string]any)[0]
	pair["blue"] = map[string]any{"dsn": dsn(s.blue.Port)}
	pair["green"] = map[string]any{"dsn": dsn(s.green.Port)}
	targets := spec["switch"].(map[string]any)["targets"].([]map[string]any)
	hookURL := strings.Replace(hook.URL, "http://", "http://hook:${CUTOVER_T_HOOK_PW}@", 1) + "/flip?token=${CUTOVER_T_HOOK_TOKEN}"
	targets = append(targets,
		map[string]any{"type": "webhook", "url": hookURL, "timeout": "5s"},
		map[string]any{"type": "command", "timeout": "5s",
			"command": []string{"/bin/sh", "-c", `printf %s "$0" > ` + argOut, "--key=${file:" + secretDir + "/cmd_arg}"}})
	spec["switch"].(map[string]any)["targets"] = targets
	raw, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	c.Leader(15 * time.Second)
	cl := c.Client(0)
	actx := agenttest.Ctx(t, 30*time.Second)
	if _, err := cl.CreatePlan(actx, agent.CreatePlanRequest{Spec: raw, Reason: "secrets e2e"}); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.Start(actx, "shop", "secrets e2e"); err != nil {
		t.Fatal(err)
	}
	p := waitPhase(t, c, "shop", 120*time.Second, agent.PhaseSwitched, agent.PhaseAborted)
	if p.Phase != agent.PhaseSwitched {
		t.Fatalf("plan ended %s: %s\n%s", p.Phase, p.Reason, tail(logs.String(), 40))
	}
	if got, _ := hookAuth.Load().(string); got != secrets["CUTOVER_T_HOOK_PW"]+" "+secrets["CUTOVER_T_HOOK_TOKEN"] {
		t.Errorf("the webhook got %q", got)
	}
	if got, _ := os.ReadFile(argOut); string(got) != "--key="+secrets["file cmd_arg"] {
		t.Errorf("the command got %q", got)
	}
	for _, m := range c.Running() {
		if err := m.Node.Snapshot(); err != nil {
			t.Fatalf("snapshot of %s: %v", m.ID, err)
		}
	}

	check := func(where, text string) {
		t.Helper()
		for name, v := range secrets {
			for _, form := range []string{v, url.QueryEscape(v)} {
				if i := strings.Index(text, form); i >= 0 {
					t.Errorf("%s shows the value of %s: ...%s...", where, name, text[max(0, i-80):min(len(text), i+80)])
				}
			}
		}
	}
	for i := range c.Running() {
		for _, path := range []string{"/v1/plans", "/v1/plans/shop", "/v1/status", "/v1/audit?all", "/readyz", "/metrics"} {
			req, _ := http.NewRequest(http.MethodGet, c.URL(i)+path, nil)
			req.Header.Set("Authorization", "Bearer "+agenttest.ReadToken)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			check(fmt.Sprintf("GET %s on node %d", path, i), string(b))
		}
	}
	check("the logs", logs.String()+c.Logs())
	walk := func(root string) (files, snapshots int) {
		err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return err
			}
			files++
			if strings.Contains(path, "snapshots") && d.Name() == "state.bin" {
				snapshots++
			}
			data, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			check(path, string(data))
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return files, snapshots
	}
	if n, _ := walk(reports); n == 0 {
		t.Error("no consistency report was written: the test proves nothing about reports")
	}
	snapshots := 0
	for _, m := range c.Members() {
		_, n := walk(m.Dir)
		snapshots += n
	}
	if snapshots == 0 {
		t.Error("no snapshot was written: the test proves nothing about them")
	}
}
