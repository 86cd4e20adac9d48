// Package health watches the application after a traffic flip and says when
// it is unhealthy enough to roll back automatically. The SQL check lives in
// package pgquery, so that this package links no database client.
package health

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/cutover/cutover/internal/redact"
)

// Check is one health probe. Probe returns nil when healthy; it may block
// and honours ctx.
type Check interface {
	Name() string
	Probe(ctx context.Context) error
}

// HTTP is healthy when GET URL answers with the expected status within
// MaxLatency.
type HTTP struct {
	URL        string
	Status     int // 0 means any 2xx
	MaxLatency time.Duration
	Client     *http.Client
}

// Name implements Check.
func (h HTTP) Name() string { return "http " + redact.Text(h.URL) }

// Probe implements Check.
func (h HTTP) Probe(ctx context.Context) error {
	client := h.Client
	if client == nil {
		client = http.DefaultClient
	}
	limit := h.MaxLatency
	if limit <= 0 {
		limit = 5 * time.Second
	}
	// The request gets a little longer than the limit so that a slow answer
	// is reported as slow, not as a transport error.
	ctx, cancel := context.WithTimeout(ctx, limit+limit/2)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, h.URL, nil)
	if err != nil {
		return fmt.Errorf("request: %s", redact.Text(err.Error()))
	}
	start := time.Now()
	resp, err := client.Do(req)
	took := time.Since(start)
	if err != nil {
		return fmt.Errorf("GET: %s", redact.Text(err.Error()))
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if h.Status != 0 && resp.StatusCode != h.Status {
		return fmt.Errorf("status %d, want %d", resp.StatusCode, h.Status)
	}
	if h.Status == 0 && (resp.StatusCode < 200 || resp.StatusCode > 299) {
		return fmt.Errorf("status %d, want 2xx", resp.StatusCode)
	}
	if took > limit {
		return fmt.Errorf("answered in %s, limit %s", took.Round(time.Millisecond), limit)
	}
	return nil
}

// ErrUnhealthy is returned by Watch when a check failed too often.
var ErrUnhealthy = errors.New("unhealthy after the flip")

// Watcher runs checks every Interval for Period and reports a failure when a
// check fails Failures times in a row (one bad sample is not a reason to move
// traffic again).
type Watcher struct {
	Checks   []Check
	Interval time.Duration
	Period   time.Duration
	Failures int
	// OnProbe, if set, sees every probe's result.
	OnProbe func(check string, err error)
}

// Watch blocks until Period has passed with every check healthy (nil), a
// check failed Failures times in a row (an error wrapping ErrUnhealthy and
// naming the check), or ctx ended (ctx.Err()).
func (w Watcher) Watch(ctx context.Context) error {
	if len(w.Checks) == 0 {
		return nil
	}
	interval, failures := w.Interval, w.Failures
	if interval <= 0 {
		interval = time.Second
	}
	if failures <= 0 {
		failures = 3
	}
	deadline := time.Now().Add(w.Period)
	streak := make([]int, len(w.Checks))
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		for i, c := range w.Checks {
			err := c.Probe(ctx)
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if w.OnProbe != nil {
				w.OnProbe(c.Name(), err)
			}
			if err == nil {
				streak[i] = 0
				continue
			}
			streak[i]++
			if streak[i] >= failures {
				return fmt.Errorf("%w: %s failed %d times in a row, last: %v", ErrUnhealthy, c.Name(), streak[i], err)
			}
		}
		if !time.Now().Before(deadline) {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
}
