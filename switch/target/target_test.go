package target

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cutover/cutover/internal/redact"
)

func flip(epoch uint64, to string) Flip {
	return Flip{Plan: "orders", From: "blue", To: to, Epoch: epoch, Positions: map[string]string{"db": "0/16B3748"}, At: time.Unix(0, 0).UTC()}
}

func TestWebhookRetriesServerErrorsAndStopsOnClientErrors(t *testing.T) {
	var calls atomic.Int32
	var lastBody []byte
	var lastAuth, lastKey string
	status := []int{503, 500, 200}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := calls.Add(1)
		lastBody, _ = io.ReadAll(r.Body)
		lastAuth = r.Header.Get("Authorization")
		lastKey = r.Header.Get("Idempotency-Key")
		code := 200
		if int(n) <= len(status) {
			code = status[n-1]
		}
		w.WriteHeader(code)
	}))
	defer srv.Close()

	w := NewWebhook(srv.URL+"/hook", map[string]redact.Secret{"Authorization": "Bearer s3cret-hook-token"}, time.Second, 3)
	w.backoff = time.Millisecond
	if err := w.Flip(context.Background(), flip(5, "green")); err != nil {
		t.Fatal(err)
	}
	if calls.Load() != 3 {
		t.Errorf("calls = %d, want 3", calls.Load())
	}
	var got Flip
	if err := json.Unmarshal(lastBody, &got); err != nil || got.Plan != "orders" || got.To != "green" || got.Epoch != 5 || got.Positions["db"] != "0/16B3748" {
		t.Errorf("body = %s (%v)", lastBody, err)
	}
	if lastAuth != "Bearer s3cret-hook-token" || lastKey != "orders-5-green" {
		t.Errorf("headers: auth=%q key=%q", lastAuth, lastKey)
	}

	status = []int{400}
	calls.Store(0)
	err := w.Flip(context.Background(), flip(5, "green"))
	if err == nil || calls.Load() != 1 || !strings.Contains(err.Error(), "400") {
		t.Errorf("400: err = %v after %d calls", err, calls.Load())
	}
	if strings.Contains(err.Error(), "s3cret") {
		t.Errorf("error leaks the header: %v", err)
	}

	status = []int{500, 500, 500, 500, 500}
	calls.Store(0)
	if err := w.Flip(context.Background(), flip(5, "green")); err == nil || calls.Load() != 4 {
		t.Errorf("persistent 500: err = %v after %d calls, want 4 calls", err, calls.Load())
	}
}

func TestCommandTargetGetsTheFlipInItsEnvironment(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "env")
	ok := NewCommand([]string{"/bin/sh", "-c", `echo "$CUTOVER_PLAN $CUTOVER_FROM $CUTOVER_TO $CUTOVER_EPOCH $CUTOVER_POSITIONS" > "$0"`, out}, 5*time.Second, nil)
	if err := ok.Flip(context.Background(), flip(42, "green")); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(out)
	if got, want := strings.TrimSpace(string(b)), `orders blue green 42 {"db":"0/16B3748"}`; got != want {
		t.Errorf("env = %q, want %q", got, want)
	}
	fail := NewCommand([]string{"/bin/sh", "-c", "echo haproxy said no >&2; exit 3"}, 5*time.Second, nil)
	if err := fail.Flip(context.Background(), flip(42, "green")); err == nil || !strings.Contains(err.Error(), "exit status 3") || !strings.Contains(err.Error(), "haproxy said no") {
		t.Errorf("failing command: err = %v", err)
	}
	slow := NewCommand([]string{"/bin/sh", "-c", "sleep 10"}, 100*time.Millisecond, nil)
	start := time.Now()
	if err := slow.Flip(context.Background(), flip(42, "green")); err == nil || !strings.Contains(err.Error(), "timed out") || time.Since(start) > 3*time.Second {
		t.Errorf("slow command: err = %v after %s", err, time.Since(start))
	}
}

func TestWebhookTargetDoesNotFollowARedirect(t *testing.T) {
	var elsewhere atomic.Int32
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		elsewhere.Add(1)
	}))
	defer other.Close()
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		http.Redirect(w, r, other.URL+"/took-over?sig=s3cret-query", http.StatusTemporaryRedirect)
	}))
	defer srv.Close()
	w := NewWebhook(srv.URL+"/hook", map[string]redact.Secret{"Authorization": "Bearer s3cret-hook-token"}, time.Second, 3)
	w.backoff = time.Millisecond
	err := w.Flip(context.Background(), flip(5, "green"))
	if err == nil {
		t.Fatal("a redirected flip succeeded")
	}
	if elsewhere.Load() != 0 {
		t.Errorf("the redirect was followed: the other server got %d calls", elsewhere.Load())
	}
	if calls.Load() != 1 {
		t.Errorf("the receiver got %d calls, want 1 (a redirect is final)", calls.Load())
	}
	if !strings.Contains(err.Error(), "307") || !strings.Contains(err.Error(), other.URL+"/took-over") {
		t.Errorf("error does not name the status and the location: %v", err)
	}
	if strings.Contains(err.Error(), "s3cret") {
		t.Errorf("error leaks a secret: %v", err)
	}
}

func TestCommandTargetDoesNotInheritTheAgentsEnvironment(t *testing.T) {
	t.Setenv("CUTOVER_OPERATOR_TOKEN", "agent-secret-token-value")
	t.Setenv("SOME_DB_PASSWORD", "agent-secret-password")
	t.Setenv("ALLOWED_VAR", "allowed-value")
	out := filepath.Join(t.TempDir(), "env")
	script := []string{"/bin/sh", "-c", `env > "$0"`, out}

	if err := NewCommand(script, 5*time.Second, nil).Flip(context.Background(), flip(7, "green")); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(out)
	env := string(b)
	for _, leak := range []string{"agent-secret-token-value", "agent-secret-password", "allowed-value"} {
		if strings.Contains(env, leak) {
			t.Errorf("the command's environment holds %q:\n%s", leak, env)
		}
	}
	if !strings.Contains(env, "PATH="+os.Getenv("PATH")) || !strings.Contains(env, "CUTOVER_EPOCH=7") {
		t.Errorf("the command lacks PATH or the flip's variables:\n%s", env)
	}

	if err := NewCommand(script, 5*time.Second, []string{"ALLOWED_VAR"}).Flip(context.Background(), flip(7, "green")); err != nil {
		t.Fatal(err)
	}
	b, _ = os.ReadFile(out)
	env = string(b)
	if !strings.Contains(env, "ALLOWED_VAR=allowed-value") || strings.Contains(env, "agent-secret") {
		t.Errorf("allowlist [ALLOWED_VAR]: environment is\n%s", env)
	}
}

type fakeTarget struct {
	name string
	err  error
	n    int
}

func (f *fakeTarget) Name() string                     { return f.name }
func (f *fakeTarget) Flip(context.Context, Flip) error { f.n++; return f.err }

func TestFlipAllTellsACleanFailureFromAPartialFlip(t *testing.T) {
	boom := errors.New("boom")
	tests := []struct {
		name        string
		targets     []*fakeTarget
		wantPartial bool
		wantErr     bool
		wantCalls   []int
	}{
		{"all succeed", []*fakeTarget{{name: "a"}, {name: "b"}}, false, false, []int{1, 1}},
		{"first fails: nothing flipped, clean abort", []*fakeTarget{{name: "a", err: boom}, {name: "b"}}, false, true, []int{1, 0}},
		{"second fails: partial, reported loudly", []*fakeTarget{{name: "a"}, {name: "b", err: boom}, {name: "c"}}, true, true, []int{1, 1, 0}},
		{"stale epoch stops at once", []*fakeTarget{{name: "a"}, {name: "b", err: ErrStaleEpoch}}, false, true, []int{1, 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var ts []Target
			for _, f := range tt.targets {
				ts = append(ts, f)
			}
			_, err := FlipAll(context.Background(), ts, flip(1, "green"))
			var partial *PartialFlipError
			if got := errors.As(err, &partial); got != tt.wantPartial {
				t.Errorf("partial = %v (err %v)", got, err)
			}
			if (err != nil) != tt.wantErr {
				t.Errorf("err = %v", err)
			}
			for i, f := range tt.targets {
				if f.n != tt.wantCalls[i] {
					t.Errorf("%s called %d times, want %d", f.name, f.n, tt.wantCalls[i])
				}
			}
			if partial != nil && (len(partial.Failed()) != 2 || !strings.Contains(partial.Error(), "done on a")) {
				t.Errorf("partial = %v, failed = %v", partial, partial.Failed())
			}
		})
	}
}
