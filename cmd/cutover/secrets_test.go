package main

import (
	"bytes"
	"context"
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
	"github.com/cutover/cutover/switch/target"
	"github.com/cutover/cutover/switch/target/targets"
)

// flipDriver resolves the plan's spec and flips its targets the way the
// real driver does, then fails with an error naming the blue DSN: the
// worst a driver can do with the secrets it holds.
type flipDriver struct{}

func (flipDriver) Drive(ctx context.Context, plan agent.Plan, _ agent.Proposer) error {
	spec, err := plan.Spec()
	if err != nil {
		return err
	}
	var errs []string
	for _, tc := range spec.Switch.Targets {
		tg, err := targets.New(tc)
		if err != nil {
			return err
		}
		if err := tg.Flip(ctx, target.Flip{Plan: plan.Name, From: "blue", To: "green", Epoch: plan.Epoch}); err != nil {
			errs = append(errs, err.Error())
		}
	}
	return fmt.Errorf("dial %s: connection refused; targets: %s", spec.Pairs[0].Blue.DSN.Reveal(), strings.Join(errs, "; "))
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func TestNoSecretOfAPlanAppearsInAnswersOutputLogsOrTheDataDirectory(t *testing.T) {
	secrets := map[string]string{
		"CUTOVER_T_DB_PASSWORD": "dbpw-5f3a91c2e7",
		"CUTOVER_T_HOOK_PW":     "hookpw-7c2e44a1b9",
		"CUTOVER_T_HOOK_TOKEN":  "hooktoken-9b1d27f3a0",
		"CUTOVER_T_CMD_SECRET":  "cmdsecret-3e8f60d4c5",
	}
	for k, v := range secrets {
		t.Setenv(k, v)
	}
	// Secrets read from files (${file:/path}): a webhook header and a
	// command argument.
	secretDir := t.TempDir()
	fileSecrets := map[string]string{"hook_key": "filekey-4a7c19e2d8", "cmd_arg": "filearg-8e03b5c6f1"}
	for name, v := range fileSecrets {
		if err := os.WriteFile(filepath.Join(secretDir, name), []byte(v+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		secrets["file "+name] = v
	}
	// The webhook echoes what it got (URL, headers) in its error answer, as
	// a careless endpoint would.
	var hookHits atomic.Int32
	var hookFileKey atomic.Value
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hookHits.Add(1)
		hookFileKey.Store(r.Header.Get("X-File-Key"))
		u, p, _ := r.BasicAuth()
		w.WriteHeader(http.StatusInternalServerError)
		fmt.Fprintf(w, "refused %s user %s:%s auth %s key %s", r.URL.String(), u, p, r.Header.Get("X-Api-Key"), r.Header.Get("X-File-Key"))
	}))
	defer hook.Close()

	logs := &lockedBuffer{}
	c := agenttest.New(t, agenttest.Options{
		Driver: func(int) agent.Driver { return flipDriver{} },
		Tweak: func(i int, cfg *agent.Config) {
			// The agent's own logger, as `cutover agent` builds it.
			l, err := logging.New("json", "debug", redact.NewRedactor(), logs)
			if err != nil {
				t.Fatal(err)
			}
			cfg.Logger = l
			cfg.SecretDirs = []string{secretDir}
		},
	})
	leader := c.Leader(10 * time.Second)
	t.Setenv("CUTOVER_TOKEN", agenttest.OperatorToken)
	t.Setenv("CUTOVER_ADDR", c.URL((leader.Index+1)%3))

	hookURL := strings.Replace(hook.URL, "http://", "http://hookuser:${CUTOVER_T_HOOK_PW}@", 1) + "/flip?token=${CUTOVER_T_HOOK_TOKEN}"
	spec := filepath.Join(t.TempDir(), "orders.json")
	body := fmt.Sprintf(`{"name":"orders","pairs":[{"name":"db","engine":"postgres",
		"blue":{"dsn":"postgres://app:${CUTOVER_T_DB_PASSWORD}@127.0.0.1:1/shop"},
		"green":{"dsn":"postgres://app:${CUTOVER_T_DB_PASSWORD}@127.0.0.1:2/shop"}}],
		"switch":{"targets":[
			{"type":"webhook","url":%q,"headers":{"X-Api-Key":"${CUTOVER_T_HOOK_TOKEN}","X-File-Key":"${file:%s/hook_key}"},"retries":0,"timeout":"2s"},
			{"type":"command","command":["/bin/sh","-c","echo deploying with $0 and $1 >&2; exit 3","${CUTOVER_T_CMD_SECRET}","--key=${file:%s/cmd_arg}"],"timeout":"5s"}]}}`, hookURL, secretDir, secretDir)
	if err := os.WriteFile(spec, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}

	var outputs []string
	runCLI := func(args ...string) string {
		code, out, errOut := cli(t, args...)
		if code != 0 {
			t.Fatalf("%v: exit %d: %s %s", args, code, out, errOut)
		}
		outputs = append(outputs, out+errOut)
		return out
	}
	runCLI("plan", "create", "--file", spec, "--reason", "secrets test")
	runCLI("plan", "start", "orders")

	// Wait until the driver has resolved the secrets, flipped both targets
	// and failed with them in its error.
	agenttest.Eventually(t, 60*time.Second, func() error {
		p, ok := c.Node(leader.Index).FSM().Plan("orders")
		if !ok || p.Driver == nil || !strings.Contains(p.Driver.LastError, "deploying with") {
			return fmt.Errorf("the driver has not failed through its targets yet")
		}
		return nil
	})
	if hookHits.Load() == 0 {
		t.Fatal("the webhook was never called")
	}
	if got, _ := hookFileKey.Load().(string); got != fileSecrets["hook_key"] {
		t.Fatalf("the webhook got X-File-Key %q, not the file's secret", got)
	}
	if p, _ := c.Node(leader.Index).FSM().Plan("orders"); !strings.Contains(p.Driver.LastError, "deploying with "+redact.Mask+" and --key="+redact.Mask) {
		t.Fatalf("the command did not get both secrets (masked in its error): %s", p.Driver.LastError)
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
				if strings.Contains(text, form) {
					i := strings.Index(text, form)
					t.Errorf("%s shows the value of %s: ...%s...", where, name, text[max(0, i-80):min(len(text), i+80)])
				}
			}
		}
	}

	t.Run("no API answer of any agent shows a secret", func(t *testing.T) {
		for i := range c.Running() {
			for _, path := range []string{"/v1/plans", "/v1/plans/orders", "/v1/status", "/v1/audit", "/readyz"} {
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
	})

	t.Run("the spec shown names the references and masks URL credentials", func(t *testing.T) {
		out := runCLI("plan", "show", "orders", "--json")
		for _, want := range []string{"${CUTOVER_T_CMD_SECRET}", "token=" + redact.Mask, "hookuser:" + redact.Mask} {
			if !strings.Contains(out, want) && !strings.Contains(out, strings.ReplaceAll(want, "[redacted]", `[redacted]`)) {
				t.Errorf("plan show lacks %q:\n%s", want, out)
			}
		}
	})

	t.Run("no CLI output shows a secret", func(t *testing.T) {
		runCLI("plan", "show", "orders")
		runCLI("plan", "list")
		runCLI("status")
		runCLI("status", "--json")
		runCLI("audit", "export")
		for _, out := range outputs {
			check("CLI output", out)
		}
	})

	t.Run("no log line shows a secret", func(t *testing.T) {
		if !strings.Contains(logs.String(), "driver failed") {
			t.Fatal("the driver's failure was not logged")
		}
		check("the logs", logs.String())
	})

	t.Run("no file under any data directory holds a secret", func(t *testing.T) {
		snapshots := 0
		for _, m := range c.Members() {
			err := filepath.WalkDir(m.Dir, func(path string, d fs.DirEntry, err error) error {
				if err != nil || d.IsDir() {
					return err
				}
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
		}
		if snapshots == 0 {
			t.Fatal("no snapshot was written: the test proves nothing about them")
		}
	})
}
