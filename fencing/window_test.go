package fencing

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

type recorder struct {
	fenced, lifted atomic.Int32
}

func (r *recorder) fence(context.Context) error { r.fenced.Add(1); return nil }
func (r *recorder) lift(context.Context) error  { r.lifted.Add(1); return nil }

func TestWindowLeavesFenceUpWhenEveryStepSucceeds(t *testing.T) {
	r := &recorder{}
	var order []string
	w := Window{Max: time.Second, Fence: r.fence, Lift: r.lift, Steps: []Step{
		{"drain", func(context.Context) error { order = append(order, "drain"); return nil }},
		{"catch_up", func(context.Context) error { order = append(order, "catch_up"); return nil }},
	}}
	out, err := w.Run(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if got, want := strings.Join(order, ","), "drain,catch_up"; got != want {
		t.Errorf("order = %s, want %s", got, want)
	}
	if r.lifted.Load() != 0 || out.Lifted {
		t.Error("fence lifted after success")
	}
	if len(out.Steps) != 3 || out.Steps[0].Name != "fence" {
		t.Errorf("timings = %+v", out.Steps)
	}
}

func TestWindowLiftsFenceWhenAStepFails(t *testing.T) {
	r := &recorder{}
	boom := errors.New("checksum mismatch")
	ran := false
	w := Window{Max: time.Second, Fence: r.fence, Lift: r.lift, Steps: []Step{
		{"verify", func(context.Context) error { return boom }},
		{"never", func(context.Context) error { ran = true; return nil }},
	}}
	out, err := w.Run(context.Background())
	if !errors.Is(err, boom) || errors.Is(err, ErrWindowExceeded) {
		t.Fatalf("err = %v", err)
	}
	if ran {
		t.Error("a step ran after a failed one")
	}
	if r.lifted.Load() != 1 || !out.Lifted {
		t.Error("fence not lifted after a failed step")
	}
}

func TestWindowLiftsAtTheDeadlineEvenIfAStepIgnoresItsContext(t *testing.T) {
	r := &recorder{}
	release := make(chan struct{})
	defer close(release)
	w := Window{Max: 80 * time.Millisecond, Fence: r.fence, Lift: r.lift, Steps: []Step{
		{"catch_up", func(context.Context) error { <-release; return nil }},
	}}
	start := time.Now()
	out, err := w.Run(context.Background())
	took := time.Since(start)
	if !errors.Is(err, ErrWindowExceeded) {
		t.Fatalf("err = %v, want ErrWindowExceeded", err)
	}
	if !strings.Contains(err.Error(), "in step catch_up") {
		t.Errorf("error does not name the step: %v", err)
	}
	if r.lifted.Load() != 1 || !out.Lifted {
		t.Error("fence not lifted")
	}
	if took > 80*time.Millisecond+200*time.Millisecond {
		t.Errorf("lifted after %s, window was 80ms", took)
	}
}

func TestWindowLiftsWhenTheCallerIsCancelled(t *testing.T) {
	r := &recorder{}
	ctx, cancel := context.WithCancel(context.Background())
	w := Window{Max: time.Minute, Fence: r.fence, Lift: r.lift, Steps: []Step{
		{"catch_up", func(ctx context.Context) error { cancel(); <-ctx.Done(); return ctx.Err() }},
	}}
	_, err := w.Run(ctx)
	if err == nil || errors.Is(err, ErrWindowExceeded) {
		t.Fatalf("err = %v", err)
	}
	if r.lifted.Load() != 1 {
		t.Error("a cancelled window left the fence up")
	}
}

func TestWindowReportsAFailedLift(t *testing.T) {
	w := Window{Max: time.Second,
		Fence: func(context.Context) error { return errors.New("no privilege") },
		Lift:  func(context.Context) error { return errors.New("connection refused") },
	}
	out, err := w.Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), "lifting the fence also failed") || out.LiftErr == nil {
		t.Fatalf("err = %v, out = %+v", err, out)
	}
}

func TestLagGateOpensOnlyAfterHoldUnderThreshold(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	g := &LagGate{MaxBytes: 1000, MaxDelay: time.Second, Hold: 2 * time.Second, MaxAge: time.Second}
	steps := []struct {
		at    time.Duration
		bytes int64
		delay time.Duration
		ready bool
		why   string
	}{
		{0, 500, 100 * time.Millisecond, false, "holding"},
		{time.Second, 500, 100 * time.Millisecond, false, "holding"},
		{1500 * time.Millisecond, 5000, 100 * time.Millisecond, false, "over the threshold"},
		{2 * time.Second, 10, 10 * time.Millisecond, false, "holding"},
		{3 * time.Second, 10, 2 * time.Second, false, "over the threshold"},
		{4 * time.Second, 10, 10 * time.Millisecond, false, "holding"},
		{6 * time.Second, 10, 10 * time.Millisecond, true, ""},
	}
	if ok, why := g.Ready(t0); ok || why != "no lag measured yet" {
		t.Fatalf("empty gate: %v %q", ok, why)
	}
	for _, s := range steps {
		now := t0.Add(s.at)
		g.Observe(LagSample{Bytes: s.bytes, Delay: s.delay, At: now})
		ok, why := g.Ready(now)
		if ok != s.ready || !strings.Contains(why, s.why) {
			t.Errorf("at %s: ready=%v %q, want %v %q", s.at, ok, why, s.ready, s.why)
		}
	}
	if ok, why := g.Ready(t0.Add(8 * time.Second)); ok || !strings.Contains(why, "old") {
		t.Errorf("stale sample: ready=%v %q", ok, why)
	}
}

func TestLagGateWithDipWaitsForASmallSampleAfterTheHold(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	g := &LagGate{MaxBytes: 1000, MaxDelay: time.Second, Hold: time.Second, Dip: 100}
	steps := []struct {
		at    time.Duration
		bytes int64
		ready bool
		why   string
	}{
		{0, 50, false, "holding"}, // a dip before the hold is met is not enough
		{time.Second, 500, false, "waiting for a dip"},
		{1100 * time.Millisecond, 900, false, "waiting for a dip"},
		{1200 * time.Millisecond, 100, true, ""},
		{1300 * time.Millisecond, 101, false, "waiting for a dip"},
		{1400 * time.Millisecond, 2000, false, "over the threshold"},
		{1500 * time.Millisecond, 10, false, "holding"}, // the hold starts again
	}
	for _, s := range steps {
		now := t0.Add(s.at)
		g.Observe(LagSample{Bytes: s.bytes, At: now})
		ok, why := g.Ready(now)
		if ok != s.ready || !strings.Contains(why, s.why) {
			t.Errorf("at %s: ready=%v %q, want %v %q", s.at, ok, why, s.ready, s.why)
		}
	}
}
