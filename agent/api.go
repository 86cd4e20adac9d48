package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode"

	"github.com/hashicorp/raft"
	"go.uber.org/zap"

	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/internal/redact"
	"github.com/cutover/cutover/switch/gate"
)

// The HTTP API. Every agent serves it; followers forward writes to the
// leader. Authorization is a bearer token:
//
//   - mutating calls (POST /v1/plans..., /v1/members) need the operator
//     token: no or an unknown token is 401, the read token is 403;
//   - read calls (status, gate, plans, audit, members) accept the read or the
//     operator token when a read token is configured, and are open to
//     anyone when it is not;
//   - /healthz, /readyz and /metrics are always open (they reveal phases and
//     indexes, never specs or secrets).
//
// Nothing an unauthenticated client sends is read beyond the headers
// (except the gate's POST form, whose body may carry the read token, read
// under a short deadline): a refused call's connection is closed at once,
// so that a client trickling a body cannot hold it. See serverLimits.
//
// Tokens are compared in constant time (on their SHA-256, so that not even
// the length leaks) and never logged: request logs carry the method, route,
// status, duration and remote address only.

// PlanInfo is a plan as the API shows it: the replicated state, the spec
// with every DSN password and secret masked, and (for one plan) its audit
// log.
type PlanInfo struct {
	Plan
	Spec  json.RawMessage `json:"spec,omitempty"`
	Audit []AuditEntry    `json:"audit,omitempty"`
	// MissingEnv lists the variables the spec references that the
	// answering agent lacks: it cannot drive the plan.
	MissingEnv []string `json:"missing_env,omitempty"`
	// LiteralSecrets lists the spec's fields that hold a secret written out
	// (not a reference), which the Raft log and snapshots then hold: plans
	// created before references were kept, or with allow_literal_secrets.
	LiteralSecrets []string `json:"literal_secrets,omitempty"`
}

// Status is one node's view of the cluster. Plans and members are the
// replicated state, the same on every caught-up node; the rest is local.
type Status struct {
	Node              string `json:"node"`
	State             string `json:"state"`
	Leader            string `json:"leader"`
	LeaderAPI         string `json:"leader_api,omitempty"`
	Established       bool   `json:"established"`
	Term              uint64 `json:"term"`
	CommitIndex       uint64 `json:"commit_index"`
	AppliedIndex      uint64 `json:"applied_index"`
	FSMIndex          uint64 `json:"fsm_index"`
	LastSnapshotIndex uint64 `json:"last_snapshot_index"`
	LastContact       string `json:"last_contact,omitempty"`
	// CommandVersion is the newest Raft command version this agent
	// applies; a leader proposes a newer kind of command only once every
	// voter understands it. Absent (0) from agents of older builds.
	CommandVersion int            `json:"command_version"`
	Members        []MemberStatus `json:"members"`
	Plans          []PlanSummary  `json:"plans"`
}

// MemberStatus is a member of the Raft configuration.
type MemberStatus struct {
	ID       string `json:"id"`
	Address  string `json:"address"`
	API      string `json:"api,omitempty"`
	Suffrage string `json:"suffrage"`
	Leader   bool   `json:"leader"`
}

// PlanSummary is a plan in the status.
type PlanSummary struct {
	Name  string `json:"name"`
	Phase Phase  `json:"phase"`
	Epoch uint64 `json:"epoch"`
	// Step is the step in progress, if any.
	Step     string `json:"step,omitempty"`
	GateOpen bool   `json:"gate_open"`
	// Manual: operators drive the plan's phases; the driver leaves it alone.
	Manual bool `json:"manual,omitempty"`
	// Driver is how the driver fares: consecutive failures, retries, last
	// error (replicated: every node shows it).
	Driver *DriverStatus `json:"driver,omitempty"`
	// WriteOutageMS is the flip's write outage (Plan.WriteOutageMS), once
	// flipped.
	WriteOutageMS *int64 `json:"write_outage_ms,omitempty"`
	// Live is what the leader's driver knows now and the replicated state
	// does not hold: lag, the outage timer, verification progress. Only
	// the leader has it.
	Live *Live `json:"live,omitempty"`
	// MissingEnv lists the variables the plan references that the
	// answering agent lacks: it cannot drive the plan.
	MissingEnv []string `json:"missing_env,omitempty"`
	// LiteralSecrets lists the spec's fields holding secrets written out
	// (see PlanInfo.LiteralSecrets).
	LiteralSecrets []string `json:"literal_secrets,omitempty"`
}

// Status returns this node's view of the cluster.
func (n *Node) Status() Status {
	stats := n.raft.Stats()
	u := func(k string) uint64 { v, _ := strconv.ParseUint(stats[k], 10, 64); return v }
	st := Status{
		Node:              n.cfg.NodeID,
		State:             n.raft.State().String(),
		Established:       n.Established(),
		Term:              n.raft.CurrentTerm(),
		CommitIndex:       n.raft.CommitIndex(),
		AppliedIndex:      n.raft.AppliedIndex(),
		FSMIndex:          n.fsm.Index(),
		LastSnapshotIndex: u("last_snapshot_index"),
		LastContact:       stats["last_contact"],
		CommandVersion:    n.fsm.maxCommandVersion(),
		Members:           []MemberStatus{},
		Plans:             []PlanSummary{},
	}
	if id, api, err := n.leaderAPI(); err == nil {
		st.Leader, st.LeaderAPI = id, api
	} else {
		st.Leader = id
	}
	if f := n.raft.GetConfiguration(); f.Error() == nil {
		for _, s := range f.Configuration().Servers {
			m := MemberStatus{ID: string(s.ID), Address: string(s.Address), Suffrage: s.Suffrage.String(), Leader: string(s.ID) == st.Leader}
			switch rec, ok := n.fsm.Member(m.ID); {
			case ok && rec.API != "":
				m.API = rec.API
			case m.ID == n.cfg.NodeID:
				m.API = n.apiURL
			default:
				m.API = n.peerAPI[m.ID]
			}
			st.Members = append(st.Members, m)
		}
		sort.Slice(st.Members, func(i, j int) bool { return st.Members[i].ID < st.Members[j].ID })
	}
	for _, p := range n.fsm.Plans() {
		s := PlanSummary{Name: p.Name, Phase: p.Phase, Epoch: p.Epoch, GateOpen: p.GateOpen(), Manual: p.Manual, Driver: p.Driver,
			MissingEnv: p.MissingEnv(), LiteralSecrets: p.LiteralSecrets()}
		if p.Step != nil {
			s.Step = p.Step.Name
		}
		if ms, ok := p.WriteOutageMS(); ok {
			s.WriteOutageMS = &ms
		}
		if lr, ok := n.cfg.Driver.(LiveReporter); ok && n.IsLeader() {
			s.Live = lr.Live(p.Name)
		}
		st.Plans = append(st.Plans, s)
	}
	return st
}

func (n *Node) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", n.handleHealthz)
	mux.HandleFunc("GET /readyz", n.handleReadyz)
	mux.Handle("GET /metrics", n.metrics.handler())

	mux.HandleFunc("GET /v1/status", n.read(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, n.Status())
	}))
	for _, p := range []string{"GET /v1/gate", "POST /v1/gate", "GET /v1/gate/{plan}", "POST /v1/gate/{plan}"} {
		mux.HandleFunc(p, n.handleGate)
	}
	mux.HandleFunc("GET /v1/plans", n.read(n.handlePlans))
	mux.HandleFunc("GET /v1/plans/{name}", n.read(n.handlePlan))
	mux.HandleFunc("GET /v1/audit", n.read(n.handleAudit))
	mux.HandleFunc("GET /v1/members", n.read(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, n.Status().Members)
	}))

	mux.HandleFunc("POST /v1/plans", n.write(n.handleCreatePlan))
	mux.HandleFunc("POST /v1/plans/{name}/start", n.write(n.phaseHandler(PhaseCopying, "start")))
	mux.HandleFunc("POST /v1/plans/{name}/abort", n.write(n.phaseHandler(PhaseAborted, "abort")))
	mux.HandleFunc("POST /v1/plans/{name}/transition", n.write(n.phaseHandler("", "")))
	mux.HandleFunc("DELETE /v1/plans/{name}", n.write(n.handleDeletePlan))
	mux.HandleFunc("POST /v1/members", n.write(n.handleAddMember))
	mux.HandleFunc("DELETE /v1/members/{id}", n.write(n.handleRemoveMember))
	return n.instrument(mux)
}

// statusRecorder remembers the status code for logs and metrics.
type statusRecorder struct {
	http.ResponseWriter
	code int
}

func (s *statusRecorder) WriteHeader(code int) {
	s.code = code
	s.ResponseWriter.WriteHeader(code)
}

// Unwrap lets http.ResponseController reach the connection's deadlines.
func (s *statusRecorder) Unwrap() http.ResponseWriter { return s.ResponseWriter }

// Limits of the API server. The write timeout covers the longest answer:
// a write's 15 s commit plus forwarding, or a read waiting for an index.
const (
	apiReadHeaderTimeout = 5 * time.Second
	apiReadTimeout       = 30 * time.Second
	apiWriteTimeout      = 45 * time.Second
	apiIdleTimeout       = 2 * time.Minute
	apiMaxHeaderBytes    = 64 << 10
	// bodyTimeout bounds reading an authorized write's body (1 MiB at most).
	bodyTimeout = 10 * time.Second
	// gateBodyTimeout bounds reading the gate's POST form (64 KiB at most),
	// which anyone may send: its body may carry the read token.
	gateBodyTimeout = 2 * time.Second
)

// serverLimits sets the API server's timeouts and header limit.
func serverLimits(s *http.Server) {
	s.ReadHeaderTimeout = apiReadHeaderTimeout
	s.ReadTimeout = apiReadTimeout
	s.WriteTimeout = apiWriteTimeout
	s.IdleTimeout = apiIdleTimeout
	s.MaxHeaderBytes = apiMaxHeaderBytes
}

// dropBody makes sure a refused call's body is never read: no more reads on
// the connection, which closes after the answer.
func dropBody(w http.ResponseWriter, r *http.Request) {
	if r.ContentLength == 0 {
		return
	}
	w.Header().Set("Connection", "close")
	_ = http.NewResponseController(w).SetReadDeadline(time.Now())
}

func (n *Node) instrument(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rec := &statusRecorder{ResponseWriter: w, code: http.StatusOK}
		// Every answer says which state it reflects; reads and writes
		// stamp a fresher index when they answer.
		n.setIndex(rec)
		next.ServeHTTP(rec, r)
		route := r.Pattern
		if route == "" {
			route = "unmatched"
		}
		n.metrics.apiRequests.WithLabelValues(route, strconv.Itoa(rec.code)).Inc()
		// Never the headers or the body: they carry tokens and specs.
		n.log.Debug("api request", zap.String("method", r.Method), zap.String("route", route),
			zap.Int("status", rec.code), zap.Duration("took", time.Since(start)), zap.String("remote", r.RemoteAddr))
	})
}

type role int

const (
	roleNone role = iota
	roleRead
	roleOperator
)

func tokenEqual(a, b string) bool {
	ha, hb := sha256.Sum256([]byte(a)), sha256.Sum256([]byte(b))
	return subtle.ConstantTimeCompare(ha[:], hb[:]) == 1
}

func (n *Node) roleOf(token string) role {
	switch {
	case token == "":
		return roleNone
	case tokenEqual(token, n.cfg.OperatorToken.Reveal()):
		return roleOperator
	case n.cfg.ReadToken != "" && tokenEqual(token, n.cfg.ReadToken.Reveal()):
		return roleRead
	}
	return roleNone
}

func bearer(r *http.Request) string {
	scheme, tok, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return ""
	}
	return strings.TrimSpace(tok)
}

func unauthorized(w http.ResponseWriter, msg string) {
	w.Header().Set("WWW-Authenticate", `Bearer realm="cutover"`)
	writeJSON(w, http.StatusUnauthorized, errorBody{Error: msg, Code: "unauthorized"})
}

// readAllowed applies the read rule to a token.
func (n *Node) readAllowed(token string) bool {
	return n.cfg.ReadToken == "" || n.roleOf(token) != roleNone
}

func (n *Node) read(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if !n.readAllowed(bearer(r)) {
			dropBody(w, r)
			unauthorized(w, "a read or operator token is required")
			return
		}
		if !n.readAt(w, r) {
			return
		}
		h(w, r)
	}
}

// writeHandler runs a mutating call on the leader.
type writeHandler func(ctx context.Context, r *http.Request, body []byte, o Origin) (status int, v any, err error)

func (n *Node) write(h writeHandler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		switch n.roleOf(bearer(r)) {
		case roleNone:
			dropBody(w, r)
			unauthorized(w, "the operator token is required")
			return
		case roleRead:
			dropBody(w, r)
			writeJSON(w, http.StatusForbidden, errorBody{Error: "the read token cannot change anything: use the operator token", Code: "forbidden"})
			return
		}
		_ = http.NewResponseController(w).SetReadDeadline(time.Now().Add(bodyTimeout))
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 1<<20))
		if err != nil {
			writeJSON(w, http.StatusBadRequest, errorBody{Error: "read body: " + err.Error(), Code: "bad_request"})
			return
		}
		via := r.Header.Get(hdrForwardedBy)
		if !n.IsLeader() {
			if via != "" {
				// One hop only: the leader moved while the call was in flight.
				n.writeError(w, ErrNotLeader)
				return
			}
			n.forward(w, r, body)
			return
		}
		o := Origin{Actor: actorOf(r), Via: via}
		// A forwarded call names its original caller. The header is the
		// client's to set, so it is only believed when it names an
		// operator: it can never pass for the driver (and the command's
		// origin is OriginOperator whatever it says).
		if a := clean(r.Header.Get(hdrActor), 200); via != "" && strings.HasPrefix(a, "operator@") {
			o.Actor = a
		}
		ctx, cancel := context.WithTimeout(r.Context(), 15*time.Second)
		defer cancel()
		status, v, err := h(ctx, r, body, o)
		// The write is applied here (or refused, which the audit log
		// records): the index covers it, for the client's next read.
		n.setIndex(w)
		if err != nil {
			n.writeError(w, err)
			return
		}
		writeJSON(w, status, v)
	}
}

// actorOf says who made an (operator-token) call: the token's role, the
// caller's address and what the client says about its user.
func actorOf(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		host = r.RemoteAddr
	}
	a := "operator@" + host
	if u := clean(r.Header.Get(hdrUser), 100); u != "" {
		a += " (" + u + ")"
	}
	return a
}

// clean keeps printable characters of a client-supplied string, bounded.
func clean(s string, max int) string {
	s = strings.Map(func(r rune) rune {
		if unicode.IsPrint(r) {
			return r
		}
		return -1
	}, s)
	if len(s) > max {
		s = s[:max]
	}
	return strings.TrimSpace(s)
}

// forward relays a write to the leader's API and its answer back.
func (n *Node) forward(w http.ResponseWriter, r *http.Request, body []byte) {
	id, api, err := n.leaderAPI()
	if err != nil {
		n.writeError(w, err)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 15*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, r.Method, strings.TrimRight(api, "/")+r.URL.RequestURI(), bytes.NewReader(body))
	if err != nil {
		n.writeError(w, err)
		return
	}
	for _, h := range []string{"Authorization", "Content-Type"} {
		if v := r.Header.Get(h); v != "" {
			req.Header.Set(h, v)
		}
	}
	req.Header.Set(hdrForwardedBy, n.cfg.NodeID)
	req.Header.Set(hdrActor, actorOf(r))
	resp, err := n.client.Do(req)
	if err != nil {
		writeJSON(w, http.StatusBadGateway, errorBody{Error: fmt.Sprintf("forward to leader %s: %v", id, err), Code: "leader_unreachable"})
		return
	}
	defer resp.Body.Close()
	for _, h := range []string{"Content-Type", HeaderIndex} {
		if v := resp.Header.Get(h); v != "" {
			w.Header().Set(h, v)
		}
	}
	w.WriteHeader(resp.StatusCode)
	io.Copy(w, io.LimitReader(resp.Body, 16<<20))
}

type errorBody struct {
	Error string `json:"error"`
	Code  string `json:"code"`
}

// httpStatus maps the agent's errors to HTTP statuses.
func httpStatus(err error) (int, string) {
	switch {
	case errors.Is(err, ErrIllegalTransition):
		return http.StatusConflict, "illegal_transition"
	case errors.Is(err, ErrStaleEpoch):
		return http.StatusConflict, "stale_epoch"
	case errors.Is(err, ErrPlanExists):
		return http.StatusConflict, "plan_exists"
	case errors.Is(err, ErrPlanNotFound):
		return http.StatusNotFound, "plan_not_found"
	case errors.Is(err, ErrInvalidCommand), errors.Is(err, ErrUnsupportedVersion):
		return http.StatusBadRequest, "bad_request"
	case errors.Is(err, ErrNotLeader), errors.Is(err, ErrNoLeader), errors.Is(err, ErrStopped):
		return http.StatusServiceUnavailable, "no_leader"
	case errors.Is(err, ErrLeadershipLost):
		return http.StatusServiceUnavailable, "outcome_unknown"
	case errors.Is(err, context.DeadlineExceeded):
		return http.StatusGatewayTimeout, "timeout"
	}
	return http.StatusInternalServerError, "internal"
}

func (n *Node) writeError(w http.ResponseWriter, err error) {
	status, code := httpStatus(err)
	if status == http.StatusInternalServerError {
		n.log.Error("api call failed", zap.Error(err))
	}
	writeJSON(w, status, errorBody{Error: redact.Text(err.Error()), Code: code})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func (n *Node) handleHealthz(w http.ResponseWriter, r *http.Request) {
	if n.raft.State() == raft.Shutdown {
		writeJSON(w, http.StatusServiceUnavailable, map[string]any{"ok": false})
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"ok": true})
}

// handleReadyz: ready when a leader is known and this node has applied
// everything it knows to be committed (a leader: once established).
func (n *Node) handleReadyz(w http.ResponseWriter, r *http.Request) {
	ready, reason := true, "ready"
	switch {
	case n.Leader() == "":
		ready, reason = false, "no leader known"
	case n.IsLeader() && !n.Established():
		ready, reason = false, "leader still catching up"
	case n.raft.AppliedIndex() < n.raft.CommitIndex():
		ready, reason = false, fmt.Sprintf("applied %d of %d committed entries", n.raft.AppliedIndex(), n.raft.CommitIndex())
	}
	status := http.StatusOK
	if !ready {
		status = http.StatusServiceUnavailable
	}
	body := map[string]any{"ready": ready, "reason": reason}
	// The variables this agent lacks for the plans still to run: it cannot
	// drive them (and says so), though it still serves gates and votes.
	missing := map[string]string{}
	for _, p := range n.fsm.Plans() {
		if m := p.MissingEnv(); len(m) > 0 && !p.Phase.Terminal() {
			missing[p.Name] = "missing " + strings.Join(m, ", ")
		}
	}
	if len(missing) > 0 {
		body["plans"] = missing
	}
	writeJSON(w, status, body)
}

// handleGate serves GET and POST (Flagger webhooks POST a JSON payload;
// its metadata.token may carry the read token, since Flagger cannot set
// headers).
func (n *Node) handleGate(w http.ResponseWriter, r *http.Request) {
	token := bearer(r)
	if token == "" && r.Method == http.MethodPost {
		var hook struct {
			Metadata map[string]string `json:"metadata"`
		}
		_ = http.NewResponseController(w).SetReadDeadline(time.Now().Add(gateBodyTimeout))
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 64<<10))
		if err == nil && json.Unmarshal(body, &hook) == nil {
			token = hook.Metadata["token"]
		}
	}
	if !n.readAllowed(token) {
		dropBody(w, r)
		unauthorized(w, "a read or operator token is required")
		return
	}
	forwarded := r.Header.Get(hdrForwardedBy) != "" && n.roleOf(token) == roleOperator
	resp := n.gate(r.Context(), r.PathValue("plan"), forwarded)
	n.setIndex(w)
	gate.Write(w, resp, r.URL.Query().Get("format"))
}

func (n *Node) planInfo(p Plan, withAudit bool) PlanInfo {
	info := PlanInfo{Plan: p, MissingEnv: p.MissingEnv(), LiteralSecrets: p.LiteralSecrets()}
	if spec, err := p.RedactedSpec(); err == nil {
		info.Spec = spec
	}
	if withAudit {
		info.Audit = n.fsm.Audit(p.Name, 0)
	}
	return info
}

func (n *Node) handlePlans(w http.ResponseWriter, r *http.Request) {
	plans := n.fsm.Plans()
	out := make([]PlanInfo, 0, len(plans))
	for _, p := range plans {
		out = append(out, n.planInfo(p, false))
	}
	writeJSON(w, http.StatusOK, out)
}

func (n *Node) handlePlan(w http.ResponseWriter, r *http.Request) {
	p, ok := n.fsm.Plan(r.PathValue("name"))
	if !ok {
		n.writeError(w, fmt.Errorf("%w: %q", ErrPlanNotFound, r.PathValue("name")))
		return
	}
	writeJSON(w, http.StatusOK, n.planInfo(p, true))
}

func (n *Node) handleAudit(w http.ResponseWriter, r *http.Request) {
	limit, _ := strconv.Atoi(r.URL.Query().Get("limit"))
	if r.URL.Query().Has("all") {
		limit = 0 // the whole log, for export
	}
	writeJSON(w, http.StatusOK, n.fsm.Audit(r.URL.Query().Get("plan"), limit))
}

// CreatePlanRequest is the body of POST /v1/plans: either the name of a
// plan in the leader's configuration file, or a plan spec written as in the
// configuration file (JSON).
type CreatePlanRequest struct {
	ConfigPlan string          `json:"config_plan,omitempty"`
	Spec       json.RawMessage `json:"spec,omitempty"`
	Reason     string          `json:"reason,omitempty"`
	// AllowLiteralSecrets accepts a spec that writes secrets out (a DSN
	// password, a header value, a URL password or token) instead of
	// ${CUTOVER_NAME} references. They are then stored in the Raft log and
	// snapshots of every agent; without it such a spec is refused.
	AllowLiteralSecrets bool `json:"allow_literal_secrets,omitempty"`
}

func (n *Node) handleCreatePlan(ctx context.Context, r *http.Request, body []byte, o Origin) (int, any, error) {
	var req CreatePlanRequest
	if err := json.Unmarshal(body, &req); err != nil {
		return 0, nil, fmt.Errorf("%w: body: %v", ErrInvalidCommand, err)
	}
	o.Reason = req.Reason
	var (
		spec   config.Plan
		source string
	)
	switch {
	case req.ConfigPlan != "" && len(req.Spec) > 0:
		return 0, nil, fmt.Errorf("%w: give config_plan or spec, not both", ErrInvalidCommand)
	case req.ConfigPlan != "":
		found := false
		for _, p := range n.cfg.Plans {
			if p.Name == req.ConfigPlan {
				spec, found = p, true
			}
		}
		if !found {
			return 0, nil, fmt.Errorf("%w: no plan %q in the configuration of %s", ErrPlanNotFound, req.ConfigPlan, n.cfg.NodeID)
		}
		source = "config"
	case len(req.Spec) > 0:
		var err error
		if spec, err = ParsePlanSpec(req.Spec, n.fsm.env.getenv(), n.cfg.SecretDirs...); err != nil {
			return 0, nil, err
		}
		if lit := spec.LiteralSecrets(); len(lit) > 0 && !req.AllowLiteralSecrets {
			return 0, nil, fmt.Errorf("%w: the spec writes secrets out (%s): they would be stored in every agent's Raft log and snapshots; write them as ${CUTOVER_NAME} references to variables set on every agent (or ${file:/path} references to files under agent.secret_dirs), or set allow_literal_secrets", ErrInvalidCommand, strings.Join(lit, ", "))
		}
		source = "api"
	default:
		return 0, nil, fmt.Errorf("%w: give config_plan (a plan of the configuration file) or spec", ErrInvalidCommand)
	}
	if lit := spec.LiteralSecrets(); len(lit) > 0 {
		n.log.Warn("the plan writes secrets out; the Raft log and snapshots will hold them (use ${NAME} references)", zap.String("plan", spec.Name), zap.Strings("fields", lit))
	}
	p, err := n.CreatePlan(ctx, spec, source, o)
	if err != nil {
		return 0, nil, err
	}
	return http.StatusCreated, n.planInfo(p, false), nil
}

// TransitionRequest is the body of POST /v1/plans/{name}/transition (and,
// without To, of start and abort).
type TransitionRequest struct {
	To     Phase  `json:"to,omitempty"`
	Reason string `json:"reason,omitempty"`
	// IfEpoch makes the call conditional on the plan's current epoch.
	IfEpoch uint64 `json:"if_epoch,omitempty"`
}

func (n *Node) phaseHandler(to Phase, what string) writeHandler {
	return func(ctx context.Context, r *http.Request, body []byte, o Origin) (int, any, error) {
		var req TransitionRequest
		if len(bytes.TrimSpace(body)) > 0 {
			if err := json.Unmarshal(body, &req); err != nil {
				return 0, nil, fmt.Errorf("%w: body: %v", ErrInvalidCommand, err)
			}
		}
		target := to
		if target == "" {
			if req.To == "" {
				return 0, nil, fmt.Errorf("%w: say which phase to move to (\"to\")", ErrInvalidCommand)
			}
			target = req.To
		}
		o.Reason = req.Reason
		if o.Reason == "" && what != "" {
			o.Reason = what + " requested"
		}
		p, err := n.Transition(ctx, r.PathValue("name"), target, req.IfEpoch, o)
		if err != nil {
			return 0, nil, err
		}
		return http.StatusOK, n.planInfo(p, false), nil
	}
}

// AddMemberRequest is the body of POST /v1/members.
type AddMemberRequest struct {
	ID string `json:"id"`
	// Address is the new member's Raft address.
	Address string `json:"address"`
	// API is the new member's API base URL.
	API    string `json:"api,omitempty"`
	Reason string `json:"reason,omitempty"`
}

func (n *Node) handleAddMember(ctx context.Context, r *http.Request, body []byte, o Origin) (int, any, error) {
	var req AddMemberRequest
	if err := json.Unmarshal(body, &req); err != nil {
		return 0, nil, fmt.Errorf("%w: body: %v", ErrInvalidCommand, err)
	}
	o.Reason = req.Reason
	if err := n.AddVoter(ctx, Member{ID: req.ID, Address: req.Address, API: req.API}, o); err != nil {
		return 0, nil, err
	}
	return http.StatusOK, n.Status().Members, nil
}

func (n *Node) handleDeletePlan(ctx context.Context, r *http.Request, body []byte, o Origin) (int, any, error) {
	o.Reason = r.URL.Query().Get("reason")
	if err := n.DeletePlan(ctx, r.PathValue("name"), o); err != nil {
		return 0, nil, err
	}
	return http.StatusOK, map[string]string{"deleted": r.PathValue("name")}, nil
}

func (n *Node) handleRemoveMember(ctx context.Context, r *http.Request, body []byte, o Origin) (int, any, error) {
	o.Reason = r.URL.Query().Get("reason")
	if err := n.RemoveMember(ctx, r.PathValue("id"), o); err != nil {
		return 0, nil, err
	}
	return http.StatusOK, n.Status().Members, nil
}
