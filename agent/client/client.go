// Package client calls an agent's HTTP API. The CLI uses it; so can tests
// and other tools.
package client

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/switch/gate"
)

// Client calls one agent. Writes sent to a follower are forwarded by it to
// the leader.
//
// A client never reads a state older than one it has seen: it remembers the
// highest Raft index of the agent's answers (X-Cutover-Index; a write's
// covers the write) and asks every read for that index (?index=N), so that
// an agent still behind waits until it has applied it, or says it cannot.
type Client struct {
	base  string
	token string
	user  string
	hc    *http.Client
	// index is the highest Raft index seen in an answer.
	index atomic.Uint64
	// leaderWait is how long a call keeps retrying while the cluster has
	// no leader or the agent does not accept connections yet.
	leaderWait time.Duration
}

// Option configures a Client.
type Option func(*Client)

// WithHTTPClient uses hc for every call.
func WithHTTPClient(hc *http.Client) Option { return func(c *Client) { c.hc = hc } }

// WithTLS uses a TLS client configuration (mutual TLS: it holds the client
// certificate).
func WithTLS(conf *tls.Config) Option {
	return func(c *Client) {
		c.hc = &http.Client{Timeout: c.hc.Timeout, Transport: &http.Transport{TLSClientConfig: conf}}
	}
}

// WithLeaderWait makes every call wait up to d for a leader: while the
// agent answers no_leader (an election is under way, the agents have just
// come up) or refuses the connection (it is still starting), the call is
// sent again. Both answers mean nothing was applied, so a write is never
// applied twice.
func WithLeaderWait(d time.Duration) Option { return func(c *Client) { c.leaderWait = d } }

// WithIndex starts the client at Raft index i, as if it had seen it: its
// reads wait until the agent has applied i. The CLI passes the index its
// previous run saw, so that a read never shows a state older than the
// write the run before made.
func WithIndex(i uint64) Option { return func(c *Client) { c.index.Store(i) } }

// WithUser says who runs the client (e.g. alice@laptop); the agent records
// it in the audit log next to the caller's address.
func WithUser(user string) Option { return func(c *Client) { c.user = user } }

// New returns a client for the agent at base (e.g. http://127.0.0.1:8420)
// sending token as a bearer token.
func New(base, token string, opts ...Option) *Client {
	c := &Client{base: strings.TrimRight(base, "/"), token: token, hc: &http.Client{Timeout: 30 * time.Second}}
	for _, o := range opts {
		o(c)
	}
	return c
}

// Error is an error answer from the agent. It matches the agent's sentinel
// errors with errors.Is (ErrIllegalTransition, ErrStaleEpoch, ...).
type Error struct {
	Status  int
	Code    string
	Message string
}

func (e *Error) Error() string {
	if e.Message == "" {
		return fmt.Sprintf("HTTP %d", e.Status)
	}
	return e.Message
}

var codeErrors = map[string]error{
	"illegal_transition": agent.ErrIllegalTransition,
	"stale_epoch":        agent.ErrStaleEpoch,
	"plan_exists":        agent.ErrPlanExists,
	"plan_not_found":     agent.ErrPlanNotFound,
	"bad_request":        agent.ErrInvalidCommand,
	"no_leader":          agent.ErrNoLeader,
	"outcome_unknown":    agent.ErrLeadershipLost,
}

// Unwrap maps the answer's code to the agent's sentinel.
func (e *Error) Unwrap() error { return codeErrors[e.Code] }

// Unauthorized reports whether the agent refused the token (401 or 403).
func Unauthorized(err error) bool {
	var e *Error
	return errors.As(err, &e) && (e.Status == http.StatusUnauthorized || e.Status == http.StatusForbidden)
}

// Index returns the highest Raft index the client has seen in an answer:
// every state it reads from now on is at least that new.
func (c *Client) Index() uint64 { return c.index.Load() }

// sawIndex raises the client's index to the answer's.
func (c *Client) sawIndex(h http.Header) {
	i, err := strconv.ParseUint(h.Get(agent.HeaderIndex), 10, 64)
	if err != nil {
		return
	}
	for {
		cur := c.index.Load()
		if i <= cur || c.index.CompareAndSwap(cur, i) {
			return
		}
	}
}

// atIndex adds ?index=N (the client's index) to a read's path.
func (c *Client) atIndex(path string) string {
	i := c.index.Load()
	if i == 0 {
		return path
	}
	sep := "?"
	if strings.Contains(path, "?") {
		sep = "&"
	}
	return path + sep + "index=" + strconv.FormatUint(i, 10)
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	if method == http.MethodGet {
		path = c.atIndex(path)
	}
	var data []byte
	if in != nil {
		var err error
		if data, err = json.Marshal(in); err != nil {
			return err
		}
	}
	until := time.Now().Add(c.leaderWait)
	for {
		err := c.once(ctx, method, path, data, out)
		if err == nil || !waitable(err) || time.Now().After(until) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// waitable reports an answer that says the call was not applied and may
// succeed shortly: no leader yet, or the agent not listening yet.
func waitable(err error) bool {
	return errors.Is(err, agent.ErrNoLeader) || errors.Is(err, syscall.ECONNREFUSED)
}

func (c *Client) once(ctx context.Context, method, path string, data []byte, out any) error {
	var body io.Reader
	if data != nil {
		body = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return err
	}
	if data != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	if c.user != "" {
		req.Header.Set("X-Cutover-User", c.user)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	c.sawIndex(resp.Header)
	answer, err := io.ReadAll(io.LimitReader(resp.Body, 32<<20))
	if err != nil {
		return fmt.Errorf("read answer: %w", err)
	}
	if resp.StatusCode >= 300 {
		e := &Error{Status: resp.StatusCode}
		var eb struct {
			Error string `json:"error"`
			Code  string `json:"code"`
		}
		if json.Unmarshal(answer, &eb) == nil {
			e.Message, e.Code = eb.Error, eb.Code
		}
		return e
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(answer, out); err != nil {
		return fmt.Errorf("decode answer: %w", err)
	}
	return nil
}

// Status returns the agent's view of the cluster.
func (c *Client) Status(ctx context.Context) (agent.Status, error) {
	var s agent.Status
	return s, c.do(ctx, http.MethodGet, "/v1/status", nil, &s)
}

// Gate asks the gate (plan "" is the single active plan).
func (c *Client) Gate(ctx context.Context, plan string) (gate.Response, error) {
	return c.gateClient().Check(ctx, plan)
}

// WaitGate waits until the gate opens or ctx ends (see gate.Client.Wait).
func (c *Client) WaitGate(ctx context.Context, plan string, interval time.Duration) (gate.Response, error) {
	return c.gateClient().Wait(ctx, plan, interval)
}

func (c *Client) gateClient() *gate.Client {
	return &gate.Client{BaseURL: c.base, Token: c.token, HTTP: c.hc}
}

// Plans lists the plans.
func (c *Client) Plans(ctx context.Context) ([]agent.PlanInfo, error) {
	var ps []agent.PlanInfo
	return ps, c.do(ctx, http.MethodGet, "/v1/plans", nil, &ps)
}

// Plan returns one plan with its audit log.
func (c *Client) Plan(ctx context.Context, name string) (agent.PlanInfo, error) {
	var p agent.PlanInfo
	return p, c.do(ctx, http.MethodGet, "/v1/plans/"+url.PathEscape(name), nil, &p)
}

// Audit returns the audit log (of one plan when plan is not empty).
func (c *Client) Audit(ctx context.Context, plan string, limit int) ([]agent.AuditEntry, error) {
	q := url.Values{}
	if plan != "" {
		q.Set("plan", plan)
	}
	if limit > 0 {
		q.Set("limit", strconv.Itoa(limit))
	} else {
		q.Set("all", "")
	}
	var a []agent.AuditEntry
	return a, c.do(ctx, http.MethodGet, "/v1/audit?"+q.Encode(), nil, &a)
}

// CreatePlan creates a plan from the configuration or from a spec.
func (c *Client) CreatePlan(ctx context.Context, req agent.CreatePlanRequest) (agent.PlanInfo, error) {
	var p agent.PlanInfo
	return p, c.do(ctx, http.MethodPost, "/v1/plans", req, &p)
}

// Start moves a pending plan to copying.
func (c *Client) Start(ctx context.Context, plan, reason string) (agent.PlanInfo, error) {
	var p agent.PlanInfo
	return p, c.do(ctx, http.MethodPost, "/v1/plans/"+url.PathEscape(plan)+"/start", agent.TransitionRequest{Reason: reason}, &p)
}

// Abort aborts a plan that has not switched (up to authorized).
func (c *Client) Abort(ctx context.Context, plan, reason string) (agent.PlanInfo, error) {
	var p agent.PlanInfo
	return p, c.do(ctx, http.MethodPost, "/v1/plans/"+url.PathEscape(plan)+"/abort", agent.TransitionRequest{Reason: reason}, &p)
}

// Transition moves a plan to req.To.
func (c *Client) Transition(ctx context.Context, plan string, req agent.TransitionRequest) (agent.PlanInfo, error) {
	var p agent.PlanInfo
	return p, c.do(ctx, http.MethodPost, "/v1/plans/"+url.PathEscape(plan)+"/transition", req, &p)
}

// DeletePlan forgets a finished (terminal, finalized) plan; its audit
// entries stay.
func (c *Client) DeletePlan(ctx context.Context, plan, reason string) error {
	return c.do(ctx, http.MethodDelete, "/v1/plans/"+url.PathEscape(plan)+"?reason="+url.QueryEscape(reason), nil, nil)
}

// Members lists the Raft configuration.
func (c *Client) Members(ctx context.Context) ([]agent.MemberStatus, error) {
	var m []agent.MemberStatus
	return m, c.do(ctx, http.MethodGet, "/v1/members", nil, &m)
}

// AddMember adds a voter.
func (c *Client) AddMember(ctx context.Context, req agent.AddMemberRequest) ([]agent.MemberStatus, error) {
	var m []agent.MemberStatus
	return m, c.do(ctx, http.MethodPost, "/v1/members", req, &m)
}

// RemoveMember removes a voter.
func (c *Client) RemoveMember(ctx context.Context, id, reason string) ([]agent.MemberStatus, error) {
	var m []agent.MemberStatus
	return m, c.do(ctx, http.MethodDelete, "/v1/members/"+url.PathEscape(id)+"?reason="+url.QueryEscape(reason), nil, &m)
}
