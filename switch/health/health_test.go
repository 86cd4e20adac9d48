package health

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestHTTPCheckJudgesStatusAndLatency(t *testing.T) {
	var delay atomic.Int64
	var status atomic.Int32
	status.Store(200)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(time.Duration(delay.Load()))
		w.WriteHeader(int(status.Load()))
	}))
	defer srv.Close()
	c := HTTP{URL: srv.URL, MaxLatency: 100 * time.Millisecond}
	if err := c.Probe(context.Background()); err != nil {
		t.Errorf("healthy: %v", err)
	}
	status.Store(502)
	if err := c.Probe(context.Background()); err == nil || !strings.Contains(err.Error(), "status 502") {
		t.Errorf("502: %v", err)
	}
	status.Store(200)
	delay.Store(int64(120 * time.Millisecond))
	if err := c.Probe(context.Background()); err == nil || !strings.Contains(err.Error(), "limit 100ms") {
		t.Errorf("slow: %v", err)
	}
}

type scripted struct {
	results []error
	n       int
}

func (s *scripted) Name() string { return "scripted" }
func (s *scripted) Probe(context.Context) error {
	err := s.results[min(s.n, len(s.results)-1)]
	s.n++
	return err
}

func TestWatcherTriggersOnlyOnConsecutiveFailures(t *testing.T) {
	bad := errors.New("bad")
	tests := []struct {
		name    string
		results []error
		want    error
	}{
		{"healthy for the whole period", []error{nil}, nil},
		{"isolated failures are tolerated", []error{bad, nil, bad, nil, bad, nil, nil, nil, nil, nil, nil, nil, nil}, nil},
		{"three in a row roll back", []error{nil, bad, bad, bad}, ErrUnhealthy},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := Watcher{Checks: []Check{&scripted{results: tt.results}}, Interval: time.Millisecond, Period: 30 * time.Millisecond, Failures: 3}
			err := w.Watch(context.Background())
			if !errors.Is(err, tt.want) || (tt.want == nil && err != nil) {
				t.Errorf("Watch = %v, want %v", err, tt.want)
			}
		})
	}
}
