package client

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cutover/cutover/agent"
)

// noLeaderFor answers no_leader to the first n calls, then creates the plan.
func noLeaderFor(n int32, calls *atomic.Int32) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) <= n {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusServiceUnavailable)
			w.Write([]byte(`{"error":"no leader","code":"no_leader"}`))
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"name":"orders","phase":"pending"}`))
	})
}

func TestACallWaitsForALeaderWhenAskedTo(t *testing.T) {
	var calls atomic.Int32
	srv := httptest.NewServer(noLeaderFor(3, &calls))
	defer srv.Close()

	p, err := New(srv.URL, "", WithLeaderWait(10*time.Second)).CreatePlan(context.Background(), agent.CreatePlanRequest{})
	if err != nil || p.Name != "orders" {
		t.Fatalf("CreatePlan = %+v, %v; want the plan once a leader answers", p, err)
	}
	if got := calls.Load(); got != 4 {
		t.Fatalf("%d calls, want 3 refused and 1 answered", got)
	}

	calls.Store(0)
	_, err = New(srv.URL, "").CreatePlan(context.Background(), agent.CreatePlanRequest{})
	if !errors.Is(err, agent.ErrNoLeader) || calls.Load() != 1 {
		t.Fatalf("without a wait: err %v after %d calls, want no_leader after 1", err, calls.Load())
	}
}

func TestACallGivesUpWhenTheWaitIsOver(t *testing.T) {
	var calls atomic.Int32
	srv := httptest.NewServer(noLeaderFor(1<<30, &calls))
	defer srv.Close()
	start := time.Now()
	_, err := New(srv.URL, "", WithLeaderWait(time.Second)).Start(context.Background(), "orders", "")
	if !errors.Is(err, agent.ErrNoLeader) {
		t.Fatalf("err = %v, want no_leader", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("gave up after %s, want about 1 s", d)
	}
}

func TestACallWaitsForAnAgentThatIsStillStarting(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // nothing listens: connection refused until the agent starts

	var calls atomic.Int32
	started := make(chan *http.Server, 1)
	go func() {
		time.Sleep(700 * time.Millisecond)
		l, err := net.Listen("tcp", addr)
		if err != nil {
			started <- nil
			return
		}
		srv := &http.Server{Handler: noLeaderFor(0, &calls)}
		started <- srv
		srv.Serve(l)
	}()
	p, err := New("http://"+addr, "", WithLeaderWait(10*time.Second)).CreatePlan(context.Background(), agent.CreatePlanRequest{})
	if srv := <-started; srv != nil {
		defer srv.Close()
	} else {
		t.Skip("the port was taken in between")
	}
	if err != nil || p.Name != "orders" {
		t.Fatalf("CreatePlan = %+v, %v; want the plan once the agent listens", p, err)
	}
}
