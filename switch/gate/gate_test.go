package gate

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestDecide(t *testing.T) {
	tests := []struct {
		name  string
		phase string
		open  bool
	}{
		{"authorized opens the gate", "authorized", true},
		{"switched keeps it open", "switched", true},
		{"verified is not enough", "verified", false},
		{"fenced is closed", "fenced", false},
		{"done closes it again", "done", false},
		{"rolling back closes it", "rolling_back", false},
		{"aborted is closed", "aborted", false},
		{"an unknown phase is closed", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := Decide("orders", tt.phase, 7)
			if r.Open != tt.open || r.Plan != "orders" || r.Phase != tt.phase || r.Epoch != 7 || r.Reason == "" {
				t.Fatalf("Decide = %+v", r)
			}
		})
	}
}

func TestStatusAndBody(t *testing.T) {
	tests := []struct {
		name     string
		r        Response
		format   string
		wantCode int
	}{
		{"open is 200", Decide("p", "authorized", 3), "", 200},
		{"closed is 503 so that status-only callers are gated", Decide("p", "ready", 3), "", 503},
		{"closed is 200 with always200 for body readers", Decide("p", "ready", 3), FormatAlways200, 200},
		{"an unknown format changes nothing", Closed("p", "no leader"), "xml", 503},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			Write(rec, tt.r, tt.format)
			if rec.Code != tt.wantCode {
				t.Fatalf("status %d, want %d", rec.Code, tt.wantCode)
			}
			var body map[string]any
			if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
				t.Fatal(err)
			}
			for _, k := range []string{"open", "plan", "phase", "epoch", "reason"} {
				if _, ok := body[k]; !ok {
					t.Errorf("body lacks %q: %s", k, rec.Body)
				}
			}
			if rec.Header().Get("Cache-Control") != "no-store" {
				t.Error("gate answers must not be cached")
			}
		})
	}
}

// fakeAgent answers the gate from a script of answers.
func fakeAgent(t *testing.T, answers ...func(w http.ResponseWriter)) (*httptest.Server, *atomic.Int32) {
	t.Helper()
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("format") != FormatAlways200 || r.Header.Get("Authorization") != "Bearer tok" {
			t.Errorf("request %s %v", r.URL, r.Header)
		}
		i := int(calls.Add(1)) - 1
		answers[min(i, len(answers)-1)](w)
	}))
	t.Cleanup(srv.Close)
	return srv, &calls
}

func answer(r Response) func(w http.ResponseWriter) {
	return func(w http.ResponseWriter) { Write(w, r, FormatAlways200) }
}

func status(code int) func(w http.ResponseWriter) {
	return func(w http.ResponseWriter) { http.Error(w, "nope", code) }
}

func TestClientAndExitCodes(t *testing.T) {
	open, closed := answer(Decide("p", "authorized", 9)), answer(Decide("p", "verified", 8))
	tests := []struct {
		name     string
		answers  []func(http.ResponseWriter)
		wait     bool
		timeout  time.Duration
		wantCode int
		wantErr  string
	}{
		{"an open gate exits 0", []func(http.ResponseWriter){open}, false, time.Second, ExitOpen, ""},
		{"a closed gate exits 1", []func(http.ResponseWriter){closed}, false, time.Second, ExitClosed, ""},
		{"a 401 exits 2", []func(http.ResponseWriter){status(401)}, false, time.Second, ExitError, "HTTP 401"},
		{"waiting ends when the gate opens", []func(http.ResponseWriter){closed, closed, open}, true, 5 * time.Second, ExitOpen, ""},
		{"waiting retries through transient errors", []func(http.ResponseWriter){status(502), closed, open}, true, 5 * time.Second, ExitOpen, ""},
		{"waiting on a closed gate times out with 1", []func(http.ResponseWriter){closed}, true, 100 * time.Millisecond, ExitClosed, "timed out"},
		{"waiting that never got an answer exits 2", []func(http.ResponseWriter){status(500)}, true, 100 * time.Millisecond, ExitError, "HTTP 500"},
		{"waiting stops at once on a permanent error", []func(http.ResponseWriter){status(403)}, true, time.Hour, ExitError, "HTTP 403"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv, _ := fakeAgent(t, tt.answers...)
			c := &Client{BaseURL: srv.URL, Token: "tok"}
			ctx, cancel := context.WithTimeout(context.Background(), tt.timeout)
			defer cancel()
			var (
				r   Response
				err error
			)
			if tt.wait {
				r, err = c.Wait(ctx, "p", 10*time.Millisecond)
			} else {
				r, err = c.Check(ctx, "p")
			}
			if got := ExitCode(r, err); got != tt.wantCode {
				t.Fatalf("exit %d, want %d (answer %+v, err %v)", got, tt.wantCode, r, err)
			}
			if tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Fatalf("err = %v, want %q", err, tt.wantErr)
			}
		})
	}
}

func TestPermanent(t *testing.T) {
	if !Permanent(&StatusError{Code: 401}) || Permanent(&StatusError{Code: 503}) || Permanent(errors.New("dial")) {
		t.Fatal("Permanent misclassifies")
	}
}
