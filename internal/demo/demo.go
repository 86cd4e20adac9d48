// Package demo runs a whole cutover on this machine: a blue and a green
// PostgreSQL and a Redis for the routing key (throwaway instances from the
// integration harness), three `cutover agent` processes, and an application
// load that follows the routing key. It prints a timeline and ends with a
// one-line JSON summary. `cutover demo` runs it; so does the end-to-end test.
package demo

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/client"
	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/integration/load"
	"github.com/cutover/cutover/switch/gate"
)

// Options shape a demo run.
type Options struct {
	// Binary is the cutover executable that runs the agents.
	Binary string
	// Rollback also rolls back after the flip.
	Rollback bool
	// Writers is the number of application sessions (default 8).
	Writers int
	// Accounts sizes the application's tables (default 20000).
	Accounts int
	// ReportDir receives the consistency reports (default ./cutover-demo-report).
	ReportDir string
	// KeepDir keeps the agents' directories and logs for inspection.
	KeepDir bool
	// KillLeaderAt kills the leader agent (SIGKILL) when the plan is first
	// seen in that phase, and starts it again from its data directory a few
	// seconds later: the cutover must then complete or abort cleanly.
	KillLeaderAt agent.Phase
	// AbortFirstAt aborts the first plan through the CLI (`cutover abort`)
	// as soon as it is seen in that phase or a later one, then runs a new
	// plan on the same pair (`cutover start`): the retry must end with the
	// application writing on green and nothing lost. The agents hold the
	// phases that last milliseconds (fenced, caught_up, verified,
	// authorized) for a moment so that the abort lands in them.
	AbortFirstAt agent.Phase
	// TamperGreen changes a row of the key-less table on green behind the
	// replication's back once the plan replicates: the verification must
	// name it and the plan abort.
	TamperGreen bool
	// Via "pgbouncer" runs the application (pgbench's TPC-B, Clients
	// clients for Seconds) through PgBouncer, flipped by a pgbouncer
	// target that pauses the pool through the window.
	Via     string
	Clients int
	Seconds int
}

// Summary is the demo's last line.
type Summary struct {
	Phase string `json:"phase"`
	// WriteOutageMS is the headline: the write outage the application
	// saw, from the fence on blue to a writable green with the route
	// flipped (the driver's fact write_outage_ms; -1 when the plan never
	// flipped). OutageMS, fence to gate open, is one component of it.
	WriteOutageMS      int64  `json:"write_outage_ms"`
	OutageMS           int64  `json:"outage_ms"`
	RowsVerified       int64  `json:"rows_verified"`
	WritesAcknowledged int    `json:"writes_acknowledged"`
	WritesMissing      int    `json:"writes_missing"`
	WritesOnGreen      int    `json:"writes_on_green"`
	BothWritable       int    `json:"both_writable_samples"`
	GateOpen           bool   `json:"gate_open"`
	Route              string `json:"route"`
	RolledBack         bool   `json:"rolled_back,omitempty"`
	MissingOnBlue      int    `json:"writes_missing_on_blue_after_rollback,omitempty"`
	Report             string `json:"report,omitempty"`
	// KilledLeader names the agent killed (KillLeaderAt) and the phase the
	// plan was in when it was.
	KilledLeader string `json:"killed_leader,omitempty"`
	KilledAt     string `json:"killed_at,omitempty"`
	// Plan is the plan that ran to the end; AbortedFirst is the phase in
	// which the first plan was aborted (AbortFirstAt).
	Plan         string `json:"plan"`
	AbortedFirst string `json:"aborted_first_in,omitempty"`
	// EventsMissing counts acknowledged writes whose row in the key-less
	// table load_events is not on the final side.
	EventsMissing int `json:"events_missing"`
	// Audit is the plan's audit log, one line per entry.
	Audit []string `json:"-"`
	// Metrics is every agent's /metrics (Prometheus text, one after the
	// other) once the plan ended: the leader's replication and driver
	// series, the followers' Raft contact.
	Metrics string `json:"-"`
	// Dir holds the agents' data and logs (removed unless KeepDir).
	Dir string `json:"-"`
	// Via and PgBouncer: the run through PgBouncer (Options.Via).
	Via       string            `json:"via,omitempty"`
	PgBouncer *PgBouncerSummary `json:"pgbouncer,omitempty"`
}

// Agent is one agent process.
type Agent struct {
	ID     string
	API    string
	Config string
	Log    string
	env    []string // added to the agent's environment
	cmd    *exec.Cmd
	exited chan struct{}
}

// Signal sends sig to the agent process (SIGSTOP, SIGCONT...).
func (a *Agent) Signal(sig os.Signal) error {
	if a.cmd == nil || a.cmd.Process == nil {
		return errors.New("agent not started")
	}
	return a.cmd.Process.Signal(sig)
}

// PID is the agent process's id (0 when not started).
func (a *Agent) PID() int {
	if a.cmd == nil || a.cmd.Process == nil {
		return 0
	}
	return a.cmd.Process.Pid
}

// Kill ends the agent at once (SIGKILL).
func (a *Agent) Kill() {
	if a.cmd != nil && a.cmd.Process != nil {
		a.cmd.Process.Kill()
		<-a.exited
	}
}

const (
	planName      = "demo"
	retryPlanName = "demo-retry"
	routeKey      = "cutover:demo:route"
	appUser       = "app"
	appPass       = "app-demo-password"
)

// The application's role (fenced by the plans of PlanYAML) and the Redis
// routing key the plans flip, for drivers built on this package.
const (
	AppUser     = appUser
	AppPassword = appPass
	RouteKey    = routeKey
	// TokenEnv is the agents' environment variable holding the operator
	// token given to StartAgents.
	TokenEnv = "CUTOVER_DEMO_TOKEN"
)

// Run runs the demo, writing the timeline to w.
func Run(ctx context.Context, opts Options, w io.Writer) (*Summary, error) {
	switch opts.Via {
	case "":
	case ViaPgBouncer:
		return runViaPgBouncer(ctx, opts, w)
	default:
		return nil, fmt.Errorf("--via %q: the demo runs directly (no --via) or through pgbouncer", opts.Via)
	}
	if opts.Writers <= 0 {
		opts.Writers = 8
	}
	if opts.Accounts <= 0 {
		opts.Accounts = 20000
	}
	if opts.ReportDir == "" {
		opts.ReportDir = "cutover-demo-report"
	}
	start := time.Now()
	// A restarted agent is announced from its own goroutine.
	w = &lockedWriter{w: w}
	say := func(format string, args ...any) {
		fmt.Fprintf(w, "%6.2fs  %s\n", time.Since(start).Seconds(), fmt.Sprintf(format, args...))
	}
	// Background work of the run (restarting a killed agent) ends before
	// Run returns, and before the agents are killed.
	var bg sync.WaitGroup
	dir, err := os.MkdirTemp("", "cutover-demo-")
	if err != nil {
		return nil, err
	}
	if !opts.KeepDir {
		defer os.RemoveAll(dir)
	}

	// Databases.
	blue, err := integration.StartPostgres(ctx, integration.PostgresOptions{})
	if err != nil {
		return nil, fmt.Errorf("start blue: %w", err)
	}
	defer blue.Stop(context.Background())
	say("blue  PostgreSQL on 127.0.0.1:%d (started in %s)", blue.Port, blue.StartupDuration.Round(time.Millisecond))
	green, err := integration.StartPostgres(ctx, integration.PostgresOptions{})
	if err != nil {
		return nil, fmt.Errorf("start green: %w", err)
	}
	defer green.Stop(context.Background())
	say("green PostgreSQL on 127.0.0.1:%d (started in %s)", green.Port, green.StartupDuration.Round(time.Millisecond))
	rds, err := integration.StartRedis(ctx, integration.RedisOptions{})
	if err != nil {
		return nil, fmt.Errorf("start redis: %w", err)
	}
	defer rds.Stop(context.Background())
	say("Redis (routing key %s) on %s", routeKey, rds.Addr())
	if err := SetupDatabases(ctx, blue, green, opts.Accounts); err != nil {
		return nil, err
	}
	say("schema on both sides; %d accounts on blue; application role %q", opts.Accounts, appUser)

	// Agents.
	token := randomToken()
	var env []string
	if opts.KillLeaderAt == agent.PhaseFenced {
		// Fenced lasts a few milliseconds: too short to be seen by
		// polling and killed in. The agents hold there for a while.
		env = append(env, holdEnv+"=before catch-up=1500ms")
	}
	if point, ok := holdPoints[opts.AbortFirstAt]; ok {
		env = append(env, holdEnv+"="+point+"=1500ms")
	}
	agents, err := startAgents(ctx, opts.Binary, dir, token, env, blue, green, rds)
	if err != nil {
		return nil, err
	}
	defer func() {
		for _, a := range agents {
			a.Kill()
		}
	}()
	bgCtx, stopBg := context.WithCancel(ctx)
	defer bg.Wait()
	defer stopBg()
	clients := make([]*client.Client, len(agents))
	for i, a := range agents {
		clients[i] = client.New(a.API, token)
	}
	leaderOf := func() *Agent {
		for i, c := range clients {
			cctx, cancel := context.WithTimeout(ctx, time.Second)
			st, err := c.Status(cctx)
			cancel()
			if err == nil && st.Leader != "" {
				for _, a := range agents {
					if a.ID == st.Leader {
						return a
					}
				}
			}
			_ = i
		}
		return nil
	}
	var leader *Agent
	for deadline := time.Now().Add(30 * time.Second); leader == nil; {
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("no agent leader after 30s; logs in %s", dir)
		}
		time.Sleep(100 * time.Millisecond)
		leader = leaderOf()
	}
	say("3 agents up; leader %s", leader.ID)

	// The application: writers that follow the routing key.
	rdb := redis.NewClient(&redis.Options{Addr: rds.Addr()})
	defer rdb.Close()
	var route atomic.Value
	route.Store("blue")
	appCtx, stopApp := context.WithCancel(ctx)
	defer stopApp()
	go func() {
		for appCtx.Err() == nil {
			if v, err := rdb.Get(appCtx, routeKey).Result(); err == nil {
				route.Store(v)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()
	blueApp, greenApp := blue.DSNFor("cutover", appUser, appPass), green.DSNFor("cutover", appUser, appPass)
	target := func() string {
		if route.Load() == "green" {
			return greenApp
		}
		return blueApp
	}
	l := load.Start(appCtx, load.Options{Run: "demo", Target: target, Writers: opts.Writers, Accounts: opts.Accounts, Think: 2 * time.Millisecond, Events: true})
	say("application: %d writers on blue, following the routing key", opts.Writers)

	api := &anyAgent{clients: clients}
	if _, err := api.CreatePlan(ctx, agent.CreatePlanRequest{ConfigPlan: planName, Reason: "demo"}); err != nil {
		return nil, fmt.Errorf("create plan: %w", err)
	}
	if _, err := api.Start(ctx, planName, "demo"); err != nil {
		return nil, fmt.Errorf("start plan: %w", err)
	}
	say("plan %q started", planName)
	plan := planName

	var prober *load.Prober
	var killed *Agent
	var killedAt agent.Phase
	seen := map[agent.Phase]time.Time{}
	var last agent.Phase
	watch := func(until ...agent.Phase) (agent.PlanInfo, error) {
		deadline := time.Now().Add(3 * time.Minute)
		for {
			p, err := newestPlan(ctx, clients, plan)
			if err == nil && p.Phase != last {
				last = p.Phase
				seen[p.Phase] = time.Now()
				say("phase %-12s epoch %-5d %s", p.Phase, p.Epoch, p.Reason)
				if opts.TamperGreen && p.Phase == agent.PhaseReplicating {
					// A seed row: the load never updates it, so the
					// stream never touches it again.
					if err := green.Exec(ctx, `UPDATE load_events SET note = 'changed on green' WHERE run = 'seed' AND seq = 7`); err != nil {
						return p, fmt.Errorf("tamper with green: %w", err)
					}
					say("changed a row of the key-less table load_events on green")
				}
				if prober == nil && atOrAfter(p.Phase, agent.PhaseReplicating) {
					// Green is fenced in the plan's first step (copying):
					// from here on, the application must never write to
					// both sides. A plan aborted before that step ran
					// (an abort in copying) may never have fenced green:
					// green is then as the operator left it, so the
					// probe starts with the plan that replicates.
					prober = load.StartProber(appCtx, blueApp, greenApp, 10*time.Millisecond)
				}
				if opts.KillLeaderAt != "" && p.Phase == opts.KillLeaderAt && killed == nil {
					if killed = leaderOf(); killed != nil {
						killedAt = p.Phase
						killed.Kill()
						say("killed the leader %s (SIGKILL) in phase %s", killed.ID, p.Phase)
						bg.Add(1)
						go func(a *Agent) {
							defer bg.Done()
							select {
							case <-bgCtx.Done():
								return
							case <-time.After(3 * time.Second):
							}
							if err := a.Restart(opts.Binary, token); err == nil {
								say("restarted %s from its data directory", a.ID)
							}
						}(killed)
					}
				}
				for _, u := range until {
					if p.Phase == u {
						return p, nil
					}
				}
				if opts.AbortFirstAt != "" && plan == planName && p.Phase != agent.PhaseAborted && atOrAfter(p.Phase, opts.AbortFirstAt) {
					return p, nil
				}
			}
			if time.Now().After(deadline) {
				return p, fmt.Errorf("plan stuck in %s; logs in %s", last, dir)
			}
			select {
			case <-ctx.Done():
				return p, ctx.Err()
			case <-time.After(10 * time.Millisecond):
			}
		}
	}
	abortedFirst := ""
	if opts.AbortFirstAt != "" {
		p, err := watch(agent.PhaseAborted)
		if err != nil {
			return nil, err
		}
		if p.Phase != agent.PhaseAborted {
			say("aborting %q in %s through the CLI", plan, p.Phase)
			if out, err := cli(ctx, opts.Binary, agents, token, "abort", plan, "--reason", "demo: abort in "+string(p.Phase)); err != nil {
				return nil, fmt.Errorf("cutover abort %s: %v\n%s", plan, err, out)
			}
			if p, err = watch(agent.PhaseAborted, agent.PhaseSwitched); err != nil {
				return nil, err
			}
			if p.Phase != agent.PhaseAborted {
				return nil, fmt.Errorf("plan %s ended %s after the abort", plan, p.Phase)
			}
		}
		abortedFirst = abortedIn(ctx, clients, plan)
		say("plan %q aborted in %s (%s); retrying on the same pair as %q", plan, abortedFirst, p.Reason, retryPlanName)
		plan = retryPlanName
		last = ""
		if out, err := cli(ctx, opts.Binary, agents, token, "start", plan, "--reason", "demo: retry after an abort"); err != nil {
			return nil, fmt.Errorf("cutover start %s: %v\n%s", plan, err, out)
		}
	}
	p, err := watch(agent.PhaseSwitched, agent.PhaseAborted)
	if err != nil {
		return nil, err
	}
	sum := &Summary{Phase: string(p.Phase), Dir: dir, Plan: plan, AbortedFirst: abortedFirst}
	if killed != nil {
		sum.KilledLeader, sum.KilledAt = killed.ID, string(killedAt)
	}
	if p.Phase == agent.PhaseSwitched {
		// The gate as a deployment tool sees it after the flip.
		if g, err := api.Gate(ctx, plan); err == nil {
			sum.GateOpen = g.Open
		}
		time.Sleep(time.Second) // the application now writes on green
	}
	if opts.Rollback && p.Phase == agent.PhaseSwitched {
		if err := retry(ctx, func() error {
			_, err := api.Transition(ctx, plan, agent.TransitionRequest{To: agent.PhaseRollingBack, Reason: "demo --rollback"})
			return err
		}); err != nil {
			return nil, fmt.Errorf("rollback: %w", err)
		}
		if p, err = watch(agent.PhaseRolledBack); err != nil {
			return nil, err
		}
		sum.Phase, sum.RolledBack = string(p.Phase), true
		time.Sleep(500 * time.Millisecond) // the application writes on blue again
	}
	receipts, refused := l.Stop()
	var samples []load.Sample
	if prober != nil {
		samples = prober.Stop()
	}
	stopApp()

	if p.Phase == agent.PhaseSwitched {
		if err := retry(ctx, func() error {
			_, err := api.Transition(ctx, plan, agent.TransitionRequest{To: agent.PhaseDone, Reason: "demo complete"})
			return err
		}); err == nil {
			p, _ = watch(agent.PhaseDone)
			sum.Phase = string(p.Phase)
		}
	}

	// The outage: from the fence's intent to the gate opening, by the
	// leader's clock, from the audit log.
	// Reads are served from each agent's own state: ask the leader, whose
	// state holds every committed entry (a restarted agent may still be
	// catching up).
	var audit []agent.AuditEntry
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if l := leaderOf(); l != nil {
			if a, err := client.New(l.API, token).Audit(ctx, plan, 0); err == nil && len(a) > 0 {
				audit = a
				break
			}
		}
	}
	var fenceAt, openAt time.Time
	for _, e := range audit {
		line := fmt.Sprintf("%s #%d %s %s", e.At.Format("15:04:05.000"), e.Index, e.Node, e.Op)
		if e.Step != "" {
			line += " step=" + e.Step
		}
		if e.To != "" {
			line += fmt.Sprintf(" %s->%s", e.From, e.To)
		}
		if e.Refused != "" {
			line += " REFUSED: " + e.Refused
		}
		if e.Reason != "" {
			line += " (" + e.Reason + ")"
		}
		if e.Detail != "" {
			line += " [" + e.Detail + "]"
		}
		sum.Audit = append(sum.Audit, line)
		if e.Op == agent.OpIntent && e.Step == "fence" && e.Refused == "" {
			fenceAt = e.At
		}
		if e.To == agent.PhaseAuthorized && e.Refused == "" && openAt.IsZero() {
			openAt = e.At
		}
	}
	if !fenceAt.IsZero() && !openAt.IsZero() {
		sum.OutageMS = openAt.Sub(fenceAt).Milliseconds()
	}
	sum.WriteOutageMS = -1
	if ms, ok := p.WriteOutageMS(); ok {
		sum.WriteOutageMS = ms
	}
	if v, err := rdb.Get(ctx, routeKey).Result(); err == nil {
		sum.Route = v
	}
	sum.WritesAcknowledged = len(receipts)
	for _, r := range receipts {
		if r.DSN == greenApp {
			sum.WritesOnGreen++
		}
	}
	sum.BothWritable = len(load.BothWritable(samples))
	// Every write acknowledged anywhere must be on the side that serves at
	// the end, and, after a rollback, on both.
	final := green
	if sum.RolledBack || p.Phase == agent.PhaseAborted {
		final = blue
	}
	missing, err := load.Missing(ctx, final.DSN(), "demo", receipts)
	if err != nil {
		return nil, err
	}
	sum.WritesMissing = len(missing)
	missingEvents, err := load.MissingEvents(ctx, final.DSN(), "demo", receipts)
	if err != nil {
		return nil, err
	}
	sum.EventsMissing = len(missingEvents)
	if sum.RolledBack {
		sum.MissingOnBlue = len(missing)
	}
	sum.RowsVerified, sum.Report = collectReports(agents, opts.ReportDir)
	sum.Metrics = agentsMetrics(ctx, agents, token)
	stopBg()
	bg.Wait()

	fmt.Fprintln(w)
	fmt.Fprintln(w, "timeline:")
	order := []agent.Phase{agent.PhaseCopying, agent.PhaseReplicating, agent.PhaseReady, agent.PhaseFenced, agent.PhaseCaughtUp, agent.PhaseVerified, agent.PhaseAuthorized, agent.PhaseSwitched, agent.PhaseRollingBack, agent.PhaseRolledBack, agent.PhaseDone, agent.PhaseAborted}
	for i, ph := range order {
		at, ok := seen[ph]
		if !ok {
			continue
		}
		next := ""
		for _, later := range order[i+1:] {
			if t, ok := seen[later]; ok {
				next = t.Sub(at).Round(time.Millisecond).String()
				break
			}
		}
		fmt.Fprintf(w, "  %-12s at %6.2fs  lasted %s\n", ph, at.Sub(start).Seconds(), next)
	}
	fmt.Fprintf(w, "  write outage (fence on blue to a writable green, route flipped): %d ms\n", sum.WriteOutageMS)
	fmt.Fprintf(w, "    of which fence to gate open (leader's clock): %d ms\n", sum.OutageMS)
	fmt.Fprintf(w, "  writes acknowledged %d (on green %d), refused while fenced %d, missing %d (in the key-less table: %d)\n", sum.WritesAcknowledged, sum.WritesOnGreen, refused["42501"], sum.WritesMissing, sum.EventsMissing)
	fmt.Fprintf(w, "  samples where both sides took a write: %d of %d\n", sum.BothWritable, len(samples))
	if both := load.BothWritable(samples); len(both) > 0 {
		phase := agent.Phase("?")
		for ph, at := range seen {
			if !at.After(both[0].At) && (phase == "?" || at.After(seen[phase])) {
				phase = ph
			}
		}
		fmt.Fprintf(w, "  INVARIANT 1 BROKEN: first at %.2fs, in phase %s (and %d more)\n", both[0].At.Sub(start).Seconds(), phase, len(both)-1)
	}
	if sum.Report != "" {
		fmt.Fprintf(w, "  consistency report: %s (rows verified %d)\n", sum.Report, sum.RowsVerified)
	}
	if opts.KeepDir {
		fmt.Fprintf(w, "  agents' data and logs kept in %s\n", dir)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "audit log (replicated, the same on every agent):")
	for _, line := range sum.Audit {
		fmt.Fprintln(w, "  "+line)
	}
	out, _ := json.Marshal(sum)
	fmt.Fprintln(w, string(out))
	return sum, nil
}

// SetupDatabases creates the load's schema and the application role on
// both sides, fills blue with accounts (and seed rows of the key-less
// table), and leaves green empty for the initial copy.
func SetupDatabases(ctx context.Context, blue, green *integration.Postgres, accounts int) error {
	role := fmt.Sprintf(`
CREATE ROLE %s LOGIN PASSWORD '%s';
GRANT SELECT, INSERT, UPDATE, DELETE ON load_accounts, load_history, load_events TO %s;
GRANT USAGE ON SEQUENCE load_history_id_seq TO %s;`, appUser, appPass, appUser, appUser)
	for _, side := range []*integration.Postgres{blue, green} {
		if err := load.Setup(ctx, side.DSN(), accounts); err != nil {
			return err
		}
		if err := side.Exec(ctx, role); err != nil {
			return err
		}
	}
	// Rows of the key-less table that the load never changes.
	if err := blue.Exec(ctx, `INSERT INTO load_events (run, writer, seq, note) SELECT 'seed', 0, g, 'seed row ' || g FROM generate_series(1, 100) g`); err != nil {
		return err
	}
	// Green starts empty: the initial copy fills it.
	return green.Exec(ctx, "TRUNCATE load_accounts, load_events")
}

func randomToken() string {
	b := make([]byte, 16)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// holdEnv names the agent's test hook (cmd/cutover): "point=duration"
// makes the plan driver wait that long at the named point.
const holdEnv = "CUTOVER_TEST_HOLD"

func startAgents(ctx context.Context, binary, dir, token string, env []string, blue, green *integration.Postgres, rds *integration.Redis) ([]*Agent, error) {
	return StartAgents(ctx, binary, dir, token, env, planYAML(planName, blue, green, rds)+planYAML(retryPlanName, blue, green, rds))
}

// StartAgents starts three `cutover agent` processes (agent-1..3, one Raft
// cluster) with their data and logs under dir, plans (YAML list items, see
// PlanYAML) in their configuration, and env added to their environment.
func StartAgents(ctx context.Context, binary, dir, token string, env []string, plans string) ([]*Agent, error) {
	return StartAgentsWired(ctx, binary, dir, token, env, plans, Wiring{})
}

// Wiring lets a test stand between the agents (the fault suite's proxies).
type Wiring struct {
	// Raft, when set, returns the address agent from (0-based) dials to
	// reach agent to's Raft port at target. Each agent keeps the
	// addresses of its own bootstrap configuration (the cluster never
	// changes its membership), so each link can have a proxy of its own.
	Raft func(from, to int, target string) (string, error)
	// Env, when set, adds variables to agent i's environment alone.
	Env func(i int) []string
}

// StartAgentsWired is StartAgents with the links between the agents, and
// each agent's environment, given by w.
func StartAgentsWired(ctx context.Context, binary, dir, token string, env []string, plans string, w Wiring) ([]*Agent, error) {
	type ports struct{ raft, api int }
	ps := make([]ports, 3)
	for i := range ps {
		var err error
		if ps[i].raft, err = freePort(); err != nil {
			return nil, err
		}
		if ps[i].api, err = freePort(); err != nil {
			return nil, err
		}
	}
	var agents []*Agent
	for i := range ps {
		id := fmt.Sprintf("agent-%d", i+1)
		var peers strings.Builder
		for j, p := range ps {
			if j != i {
				addr := fmt.Sprintf("127.0.0.1:%d", p.raft)
				if w.Raft != nil {
					var err error
					if addr, err = w.Raft(i, j, addr); err != nil {
						return nil, err
					}
				}
				fmt.Fprintf(&peers, "      - {id: agent-%d, address: \"%s\", api: \"http://127.0.0.1:%d\"}\n", j+1, addr, p.api)
			}
		}
		cfg := fmt.Sprintf(`agent:
  node_id: %s
  data_dir: %s
  raft:
    bind: "127.0.0.1:%d"
    bootstrap: true
    peers:
%s  api:
    listen: "127.0.0.1:%d"
    tokens:
      operator: ${CUTOVER_DEMO_TOKEN}
log:
  format: json
plans:
%s`, id, filepath.Join(dir, id), ps[i].raft, peers.String(), ps[i].api, plans)
		path := filepath.Join(dir, id+".yaml")
		if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
			return nil, err
		}
		agentEnv := env
		if w.Env != nil {
			agentEnv = append(slices.Clone(env), w.Env(i)...)
		}
		a := &Agent{ID: id, API: fmt.Sprintf("http://127.0.0.1:%d", ps[i].api), Config: path, Log: filepath.Join(dir, id+".log"), env: agentEnv}
		if err := a.start(binary, token); err != nil {
			for _, b := range agents {
				b.Kill()
			}
			return nil, err
		}
		agents = append(agents, a)
	}
	return agents, nil
}

// planYAML is one plan of the agents' configuration: the demo's plan and
// its retry (AbortFirstAt) are the same cutover of the same pair.
func planYAML(name string, blue, green *integration.Postgres, rds *integration.Redis) string {
	return PlanYAML(name, blue.DSN(), green.DSN(), rds.URL())
}

// PlanYAML is one plan of the agents' configuration: the demo's cutover of
// the load's tables from blueDSN to greenDSN, flipping the routing key
// RouteKey on the Redis at redisURL.
func PlanYAML(name, blueDSN, greenDSN, redisURL string) string {
	return fmt.Sprintf(`  - name: %s
    pairs:
      - name: shop
        engine: postgres
        blue: {dsn: "%s"}
        green: {dsn: "%s"}
        scope: {tables: [public.load_accounts, public.load_history, public.load_events]}
        fence_roles: [%s]
    lag: {max_bytes: 1MiB, max_delay: 500ms, hold: 2s}
    fence: {max_fence_window: 5s, drain_grace: 300ms}
    verify: {enabled: true, chunk_time: 100ms, parallel: 2}
    switch:
      targets:
        - {type: redis, dsn: "%s", key: %s}
    rollback: {window: 1h, watch: 30s}
`, name, blueDSN, greenDSN, appUser, redisURL, routeKey)
}

// holdPoints are the driver's fault points where the agents wait (the
// test hook) so that a phase lasting milliseconds can be seen and aborted.
var holdPoints = map[agent.Phase]string{
	agent.PhaseFenced:     "before catch-up",
	agent.PhaseCaughtUp:   "before verify",
	agent.PhaseVerified:   "before authorize",
	agent.PhaseAuthorized: "before flip intent",
}

// phaseOrder is the forward path of a plan.
var phaseOrder = []agent.Phase{agent.PhasePending, agent.PhaseCopying, agent.PhaseReplicating, agent.PhaseReady, agent.PhaseFenced,
	agent.PhaseCaughtUp, agent.PhaseVerified, agent.PhaseAuthorized, agent.PhaseSwitched, agent.PhaseDone}

// atOrAfter reports whether p is phase q or a later one on the forward path.
func atOrAfter(p, q agent.Phase) bool {
	pi, qi := slices.Index(phaseOrder, p), slices.Index(phaseOrder, q)
	return pi >= 0 && qi >= 0 && pi >= qi
}

// abortedIn reads, from the audit log, the phase a plan was aborted in.
func abortedIn(ctx context.Context, clients []*client.Client, plan string) string {
	for _, c := range clients {
		entries, err := c.Audit(ctx, plan, 0)
		if err != nil {
			continue
		}
		for _, e := range entries {
			if e.To == agent.PhaseAborted && e.Refused == "" {
				return string(e.From)
			}
		}
	}
	return ""
}

// cli runs the cutover binary against the first agent that answers, the
// way an operator would.
func cli(ctx context.Context, binary string, agents []*Agent, token string, args ...string) (string, error) {
	var out []byte
	var err error
	for _, a := range agents {
		cmd := exec.CommandContext(ctx, binary, append(args, "--addr", a.API)...)
		cmd.Env = append(os.Environ(), "CUTOVER_TOKEN="+token)
		out, err = cmd.CombinedOutput()
		var ee *exec.ExitError
		if err == nil || (errors.As(err, &ee) && ee.ExitCode() == 1) {
			return string(out), err // done, or refused by the cluster
		}
	}
	return string(out), err
}

func (a *Agent) start(binary, token string) error {
	logf, err := os.OpenFile(a.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	cmd := exec.Command(binary, "agent", "--config", a.Config)
	cmd.Env = append(append(os.Environ(), TokenEnv+"="+token), a.env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// The agents die with the demo, even if it is killed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start %s: %w", a.ID, err)
	}
	a.cmd = cmd
	a.exited = make(chan struct{})
	go func() { cmd.Wait(); logf.Close(); close(a.exited) }()
	return nil
}

// Restart starts a killed agent again from its data directory.
func (a *Agent) Restart(binary, token string) error { return a.start(binary, token) }

// collectReports copies the leader's consistency reports into dir and
// returns the rows the passes compared and the last report's path.
func collectReports(agents []*Agent, dir string) (int64, string) {
	var rows int64
	var last string
	for _, a := range agents {
		matches, _ := filepath.Glob(filepath.Join(filepath.Dir(a.Config), a.ID, "reports", "*"))
		for _, m := range matches {
			if err := os.MkdirAll(dir, 0o755); err != nil {
				continue
			}
			data, err := os.ReadFile(m)
			if err != nil {
				continue
			}
			dst := filepath.Join(dir, filepath.Base(m))
			if os.WriteFile(dst, data, 0o644) != nil {
				continue
			}
			if strings.HasSuffix(m, ".json") {
				var rep struct {
					Totals struct {
						RowsBlue int64 `json:"rows_blue"`
					} `json:"totals"`
				}
				if json.Unmarshal(data, &rep) == nil {
					rows += rep.Totals.RowsBlue
				}
			}
			// The report of the pass inside the fence is the one that
			// authorized the flip; show it rather than the online one.
			if strings.HasSuffix(m, ".html") && (last == "" || strings.Contains(m, "-dirty-") || !strings.Contains(last, "-dirty-")) {
				last = dst
			}
		}
	}
	return rows, last
}

// anyAgent sends each call to the first agent that answers: agents forward
// to the leader, and one of them may be down.
type anyAgent struct{ clients []*client.Client }

func try[T any](a *anyAgent, call func(c *client.Client) (T, error)) (T, error) {
	var zero T
	var lastErr error
	for _, c := range a.clients {
		v, err := call(c)
		if err == nil {
			return v, nil
		}
		var apiErr *client.Error
		if errors.As(err, &apiErr) && apiErr.Status < 500 {
			return zero, err // the cluster answered: no point asking another agent
		}
		lastErr = err
	}
	return zero, lastErr
}

func (a *anyAgent) CreatePlan(ctx context.Context, req agent.CreatePlanRequest) (agent.PlanInfo, error) {
	return try(a, func(c *client.Client) (agent.PlanInfo, error) { return c.CreatePlan(ctx, req) })
}

func (a *anyAgent) Start(ctx context.Context, plan, reason string) (agent.PlanInfo, error) {
	return try(a, func(c *client.Client) (agent.PlanInfo, error) { return c.Start(ctx, plan, reason) })
}

func (a *anyAgent) Transition(ctx context.Context, plan string, req agent.TransitionRequest) (agent.PlanInfo, error) {
	return try(a, func(c *client.Client) (agent.PlanInfo, error) { return c.Transition(ctx, plan, req) })
}

func (a *anyAgent) Gate(ctx context.Context, plan string) (gate.Response, error) {
	return try(a, func(c *client.Client) (gate.Response, error) { return c.Gate(ctx, plan) })
}

// retry calls fn until it succeeds or 30s have passed: after a leader dies,
// the cluster needs a few seconds to elect the next one.
func retry(ctx context.Context, fn func() error) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := fn()
		var apiErr *client.Error
		if err == nil || (errors.As(err, &apiErr) && apiErr.Status < 500 && apiErr.Status != 421) || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// lockedWriter serializes writes from several goroutines.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// newestPlan asks every agent for the plan and keeps the newest view: each
// answers from its own state, and a restarted one may still be catching up.
func newestPlan(ctx context.Context, clients []*client.Client, name string) (agent.PlanInfo, error) {
	var p agent.PlanInfo
	err := errors.New("no agent answered")
	for _, c := range clients {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		q, qerr := c.Plan(cctx, name)
		cancel()
		if qerr == nil && (err != nil || q.Index > p.Index) {
			p, err = q, nil
		}
	}
	return p, err
}

// agentsMetrics returns every answering agent's /metrics text, one after
// the other: the series a dashboard can chart after a cutover.
func agentsMetrics(ctx context.Context, agents []*Agent, token string) string {
	var all strings.Builder
	for _, a := range agents {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, a.API+"/metrics", nil)
		if err != nil {
			continue
		}
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			continue
		}
		body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
		resp.Body.Close()
		if err == nil && resp.StatusCode == http.StatusOK {
			all.Write(body)
		}
	}
	return all.String()
}
