// Package gate is the pre-switch gate: the answer to "may traffic flip
// now?", its HTTP shape, and a client that asks it.
//
// The gate is open only when the committed phase of the plan is authorized
// or switched (docs/design.md, invariant 2). The agent answers it linearizably:
// the leader confirms its leadership with a majority before answering, a
// follower asks the leader, and a node that cannot reach a majority answers
// closed within a bounded time. This package holds no Raft: the agent
// decides, this package says how the decision looks on the wire.
//
// On the wire (GET or POST /v1/gate and /v1/gate/{plan}):
//
//   - body: JSON {"open", "plan", "phase", "epoch", "reason"};
//   - status: 200 when open, 503 when closed, so that a caller that only
//     looks at the status (Flagger webhooks) is gated as is;
//   - ?format=always200: status 200 either way, for callers that read the
//     body and treat a non-2xx status as an error (Argo Rollouts' web
//     metric provider, with successCondition: result.open == true).
package gate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Response is the gate's answer.
type Response struct {
	// Open is true only when the plan's committed phase is authorized or
	// switched, confirmed by the leader with a majority.
	Open bool `json:"open"`
	// Plan is the plan asked about (resolved when the caller named none).
	Plan string `json:"plan"`
	// Phase is the plan's committed phase; empty when unknown.
	Phase string `json:"phase"`
	// Epoch is the plan's epoch (fencing token); flip targets receive it.
	Epoch uint64 `json:"epoch"`
	// Reason says why the gate is open or closed.
	Reason string `json:"reason"`
}

// OpenPhases are the phases in which the gate is open.
var OpenPhases = []string{"authorized", "switched"}

// IsOpenPhase reports whether phase opens the gate.
func IsOpenPhase(phase string) bool {
	for _, p := range OpenPhases {
		if p == phase {
			return true
		}
	}
	return false
}

// Decide answers for a plan whose committed phase and epoch have been read
// linearizably.
func Decide(plan, phase string, epoch uint64) Response {
	r := Response{Open: IsOpenPhase(phase), Plan: plan, Phase: phase, Epoch: epoch}
	if r.Open {
		r.Reason = fmt.Sprintf("plan %s is %s at epoch %d", plan, phase, epoch)
	} else {
		r.Reason = fmt.Sprintf("plan %s is %s; the gate opens at authorized", plan, phase)
	}
	return r
}

// Closed is a closed answer that could not read the plan's phase.
func Closed(plan, reason string) Response {
	return Response{Plan: plan, Reason: reason}
}

// ClosedStatus is the HTTP status of a closed gate: 503 Service
// Unavailable, which Flagger (any non-2xx) and load balancers read as "not
// yet", and which says the answer may change.
const ClosedStatus = http.StatusServiceUnavailable

// FormatAlways200 is the ?format= value that makes a closed answer 200 too.
const FormatAlways200 = "always200"

// Status returns the HTTP status for r under format (the ?format= value).
func Status(r Response, format string) int {
	if r.Open || format == FormatAlways200 {
		return http.StatusOK
	}
	return ClosedStatus
}

// Write writes r as the HTTP response. Gate answers are never cached.
func Write(w http.ResponseWriter, r Response, format string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(Status(r, format))
	_ = json.NewEncoder(w).Encode(r)
}

// Client asks an agent's gate over HTTP.
type Client struct {
	// BaseURL is the agent's API, e.g. http://127.0.0.1:8420.
	BaseURL string
	// Token is sent as a bearer token when not empty.
	Token string
	// HTTP is the client to use; nil means a client with a 5s timeout.
	HTTP *http.Client
}

// StatusError is an answer that is not a gate response: 401, 403, 500...
type StatusError struct {
	Code int
	Body string
}

func (e *StatusError) Error() string {
	if e.Body == "" {
		return fmt.Sprintf("gate: HTTP %d", e.Code)
	}
	return fmt.Sprintf("gate: HTTP %d: %s", e.Code, e.Body)
}

// Permanent reports whether asking again cannot help (bad token, wrong
// URL): a waiting caller should stop.
func Permanent(err error) bool {
	var se *StatusError
	if errors.As(err, &se) {
		return se.Code == http.StatusUnauthorized || se.Code == http.StatusForbidden ||
			se.Code == http.StatusNotFound || se.Code == http.StatusBadRequest
	}
	return false
}

// Check asks the gate once. plan may be empty (the agent's single active
// plan). It returns an error only when it got no gate answer at all.
func (c *Client) Check(ctx context.Context, plan string) (Response, error) {
	u := strings.TrimRight(c.BaseURL, "/") + "/v1/gate"
	if plan != "" {
		u += "/" + url.PathEscape(plan)
	}
	u += "?format=" + FormatAlways200
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return Response{}, fmt.Errorf("gate: %w", err)
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	hc := c.HTTP
	if hc == nil {
		hc = &http.Client{Timeout: 5 * time.Second}
	}
	resp, err := hc.Do(req)
	if err != nil {
		return Response{}, fmt.Errorf("gate: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return Response{}, fmt.Errorf("gate: read answer: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return Response{}, &StatusError{Code: resp.StatusCode, Body: strings.TrimSpace(string(body))}
	}
	var r Response
	if err := json.Unmarshal(body, &r); err != nil {
		return Response{}, fmt.Errorf("gate: decode answer: %w", err)
	}
	return r, nil
}

// ErrTimeout: Wait ran out of time with the gate still closed.
var ErrTimeout = errors.New("timed out waiting for the gate to open")

// Wait asks the gate every interval until it is open, ctx ends, or an error
// that asking again cannot fix. Transient errors (an agent restarting, an
// election) are retried. When ctx ends it returns the last answer with
// ErrTimeout if the last attempt was answered (closed), or with the last
// attempt's error if it was not.
func (c *Client) Wait(ctx context.Context, plan string, interval time.Duration) (Response, error) {
	if interval <= 0 {
		interval = time.Second
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	var (
		last    Response
		lastErr error = ErrTimeout
	)
	for {
		r, err := c.Check(ctx, plan)
		switch {
		case err != nil && ctx.Err() != nil:
			// The deadline cut this attempt short: the previous one stands.
		case err == nil && r.Open:
			return r, nil
		case err != nil && Permanent(err):
			return r, err
		case err != nil:
			last, lastErr = r, err
		default:
			last, lastErr = r, ErrTimeout
		}
		select {
		case <-ctx.Done():
			if lastErr == ErrTimeout {
				return last, fmt.Errorf("%w: %s", ErrTimeout, last.Reason)
			}
			return last, fmt.Errorf("no gate answer before the deadline: %w", lastErr)
		case <-t.C:
		}
	}
}

// Exit codes of `cutover gate`: a pipeline blocks on them.
const (
	ExitOpen   = 0
	ExitClosed = 1 // closed, or timed out waiting
	ExitError  = 2 // could not get an answer
)

// ExitCode maps a Check or Wait result to the exit code.
func ExitCode(r Response, err error) int {
	switch {
	case err == nil && r.Open:
		return ExitOpen
	case err == nil, errors.Is(err, ErrTimeout):
		return ExitClosed
	default:
		return ExitError
	}
}
