package nemesis

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/redis/go-redis/v9"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/client"
	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/integration/load"
	"github.com/cutover/cutover/internal/demo"
)

// Options shape one run.
type Options struct {
	// Binary is the cutover executable that runs the agents.
	Binary string
	// Seed decides the fault schedule (NewSchedule).
	Seed uint64
	// Schedule, when set, is used instead of the seed's.
	Schedule *Schedule
	// Accounts sizes the application's tables (default 2000).
	Accounts int
	// Writers is the number of application sessions (default 3), each
	// pausing Think between transactions (default 5ms): enough to keep
	// the stream busy, not so much that green lags on a loaded machine.
	Writers int
	Think   time.Duration
	// Dir receives the run's directory: the history and, when a checker
	// fails, the agents' data and logs (default the system's temporary
	// directory).
	Dir string
	// Log receives the run's timeline (nil: discarded).
	Log io.Writer
	// OnPhase, when set, is called when the plan is first seen in a
	// phase, before that phase's faults: the checkers' own tests use it
	// to break an invariant behind the product's back.
	OnPhase func(ctx context.Context, p agent.Phase, blue, green *integration.Postgres) error
}

// Result is what a run did and what the checkers found.
type Result struct {
	Schedule Schedule
	// Final is the plan's last phase.
	Final agent.Phase
	// Violations are the checkers' findings; empty when every invariant
	// held.
	Violations []string
	// History is the file holding the run's history.
	History string
	// Dir holds the agents' data and logs (kept when a checker failed).
	Dir string
	// Injected counts the faults injected, by kind and phase ("kill in
	// fenced"); Skipped those that found no target.
	Injected map[string]int
	Skipped  int
	// Acked is the number of application writes acknowledged; GateReads
	// the gate reads that returned a phase.
	Acked, GateReads int
	// OutageMS is the write outage by the audit log (fence intent to
	// authorized), 0 when the plan never opened the gate.
	OutageMS int64
	// GapMS is the longest the application went without an acknowledged
	// write (any writer), by the test's clock: the outage it saw, the
	// flip and any database restart included.
	GapMS int64
	// ProductOutageMS is the write outage the product reported (the
	// plan's write_outage_ms fact, by its leader's wall clock), 0 when
	// none.
	ProductOutageMS int64
	// Jumped: a clock jump was injected.
	Jumped bool
	Took   time.Duration
}

const planName = "nemesis"

// Run runs one plan under the schedule of opts.Seed and checks the history.
// An error means the run could not be set up or observed; the invariants'
// findings are in Result.Violations.
func Run(ctx context.Context, opts Options) (*Result, error) {
	if opts.Accounts <= 0 {
		opts.Accounts = 2000
	}
	if opts.Writers <= 0 {
		opts.Writers = 3
	}
	if opts.Think <= 0 {
		opts.Think = 5 * time.Millisecond
	}
	if opts.Log == nil {
		opts.Log = io.Discard
	}
	sched := NewSchedule(opts.Seed)
	if opts.Schedule != nil {
		sched = *opts.Schedule
	}
	if opts.Dir != "" {
		if err := os.MkdirAll(opts.Dir, 0o755); err != nil {
			return nil, err
		}
	}
	dir, err := os.MkdirTemp(opts.Dir, fmt.Sprintf("cutover-nemesis-%d-", sched.Seed))
	if err != nil {
		return nil, err
	}
	h := newHistory(opts.Log)
	res := &Result{Schedule: sched, Dir: dir, History: filepath.Join(dir, "history.txt"), Injected: map[string]int{}}
	begin := time.Now()
	defer func() { res.Took = time.Since(begin) }()
	h.note("schedule", sched.String())

	blue, err := integration.StartPostgres(ctx, integration.PostgresOptions{})
	if err != nil {
		return nil, fmt.Errorf("start blue: %w", err)
	}
	defer blue.Stop(context.Background())
	green, err := integration.StartPostgres(ctx, integration.PostgresOptions{})
	if err != nil {
		return nil, fmt.Errorf("start green: %w", err)
	}
	defer green.Stop(context.Background())
	rds, err := integration.StartRedis(ctx, integration.RedisOptions{})
	if err != nil {
		return nil, fmt.Errorf("start redis: %w", err)
	}
	defer rds.Stop(context.Background())
	if err := demo.SetupDatabases(ctx, blue, green, opts.Accounts); err != nil {
		return nil, err
	}
	// The agents reach the databases only through the proxies, one per
	// agent and database (each agent reads its own address from its
	// environment: the plan's DSNs are ${...} references), and each other
	// through one per Raft link.
	proxies := map[string]*Link{}
	for side, pg := range map[string]*integration.Postgres{"blue": blue, "green": green} {
		l, err := StartLink(pg.Host+":"+strconv.Itoa(pg.Port), 3)
		if err != nil {
			return nil, err
		}
		defer l.Close()
		proxies[side] = l
	}
	viaProxy := func(pg *integration.Postgres, p *Proxy) string {
		u, _ := url.Parse(pg.DSN())
		u.Host = p.Addr()
		return u.String()
	}
	raft := [3][3]*Proxy{}
	// Each agent's wall clock is shifted through a file of its own.
	clk := &clocks{dir: dir}
	token := randomToken()
	var env []string
	if hold := sched.hold(); hold != "" {
		env = append(env, "CUTOVER_TEST_HOLD="+hold)
	}
	plan := demo.PlanYAML(planName, "${NEMESIS_BLUE_DSN}", "${NEMESIS_GREEN_DSN}", rds.URL())
	if plan, err = sched.tune(plan); err != nil {
		return nil, err
	}
	wiring := demo.Wiring{
		Raft: func(from, to int, target string) (string, error) {
			p, err := StartProxy(target)
			if err != nil {
				return "", err
			}
			raft[from][to] = p
			return p.Addr(), nil
		},
		Env: func(i int) []string {
			return []string{"NEMESIS_BLUE_DSN=" + viaProxy(blue, proxies["blue"].Via[i]), "NEMESIS_GREEN_DSN=" + viaProxy(green, proxies["green"].Via[i]),
				clockEnv + "=" + clk.path(fmt.Sprintf("agent-%d", i+1))}
		},
	}
	defer func() {
		for _, row := range raft {
			for _, p := range row {
				if p != nil {
					p.Close()
				}
			}
		}
	}()
	// Each agent's data directory is a small file system of its own
	// (when the test may mount), for the disk faults (disk.go).
	disks := map[string]*disk{}
	for i := range 3 {
		data := filepath.Join(dir, fmt.Sprintf("agent-%d", i+1))
		d, err := mountDisk(data)
		if d == nil {
			h.note("disk", fmt.Sprintf("no file system of its own under %s (%v): disk faults are skipped", data, err))
			continue
		}
		if err != nil {
			h.note("disk", fmt.Sprintf("a tmpfs under %s (no loop device: %v): slow-disk faults are skipped", data, err))
		}
		disks[filepath.Base(data)] = d
		defer d.unmount()
	}
	agents, err := demo.StartAgentsWired(ctx, opts.Binary, dir, token, env, plan, wiring)
	if err != nil {
		return nil, err
	}
	c := &cluster{agents: agents, binary: opts.Binary, token: token, h: h, down: map[string]bool{}, paused: map[string]bool{}}
	for _, a := range agents {
		c.clients = append(c.clients, client.New(a.API, token))
	}
	defer c.killAll()
	if err := c.waitLeader(ctx, 30*time.Second); err != nil {
		return nil, fmt.Errorf("%w; logs in %s", err, dir)
	}

	// The application: writers following the routing key, directly on the
	// databases (the proxies carry only the agents' traffic).
	rdb := redis.NewClient(&redis.Options{Addr: rds.Addr()})
	defer rdb.Close()
	var route atomic.Value
	route.Store("blue")
	appCtx, stopApp := context.WithCancel(ctx)
	defer stopApp()
	var appWG sync.WaitGroup
	appWG.Add(1)
	go func() {
		defer appWG.Done()
		for appCtx.Err() == nil {
			if v, err := rdb.Get(appCtx, demo.RouteKey).Result(); err == nil && v != route.Load() {
				route.Store(v)
				h.note("route", "the application now writes on "+v)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()
	blueApp, greenApp := blue.DSNFor("cutover", demo.AppUser, demo.AppPassword), green.DSNFor("cutover", demo.AppUser, demo.AppPassword)
	l := load.Start(appCtx, load.Options{Run: planName, Target: func() string {
		if route.Load() == "green" {
			return greenApp
		}
		return blueApp
	}, Writers: opts.Writers, Accounts: opts.Accounts, Think: opts.Think, Events: true})
	loadStopped := false
	defer func() {
		if !loadStopped {
			l.Stop()
		}
	}()

	api := &anyAgent{clients: c.clients}
	// A retry after an attempt whose answer was lost (a timeout on a
	// loaded machine) may find the plan created, or started, already.
	tried := false
	if err := retry(ctx, func() error {
		_, err := api.CreatePlan(ctx, agent.CreatePlanRequest{ConfigPlan: planName, Reason: "nemesis"})
		if tried && errors.Is(err, agent.ErrPlanExists) {
			return nil
		}
		tried = true
		return err
	}); err != nil {
		return nil, fmt.Errorf("create plan: %w", err)
	}
	tried = false
	if err := retry(ctx, func() error {
		_, err := api.Start(ctx, planName, "nemesis")
		if tried && errors.Is(err, agent.ErrIllegalTransition) {
			return nil
		}
		tried = true
		return err
	}); err != nil {
		return nil, fmt.Errorf("start plan: %w", err)
	}
	h.note("plan", "started")
	planStart := time.Now()

	// Gate readers: what a deployment tool asks, on every agent in turn.
	appWG.Add(1)
	go func() {
		defer appWG.Done()
		for i := 0; appCtx.Err() == nil; i++ {
			cl := c.clients[i%len(c.clients)]
			cctx, cancel := context.WithTimeout(appCtx, 2*time.Second)
			invoke := time.Now()
			r, err := cl.Gate(cctx, planName)
			complete := time.Now()
			cancel()
			if appCtx.Err() != nil {
				return
			}
			g := GateRead{Invoke: invoke, Complete: complete, Agent: c.agents[i%len(c.agents)].ID}
			if err != nil {
				g.Err = err.Error()
			} else {
				g.Open, g.Phase, g.Reason = r.Open, r.Phase, r.Reason
			}
			h.gate(g)
			time.Sleep(15 * time.Millisecond)
		}
	}()

	// The nemesis: faults at moments, and faults at phases (fired by the
	// watcher below).
	nem := &nemesis{c: c, proxies: proxies, raft: raft, disks: disks, dir: dir, clocks: clk, dbs: map[string]*integration.Postgres{"blue": blue, "green": green}, h: h, res: res}
	nemCtx, stopNem := context.WithCancel(ctx)
	defer stopNem()
	for i, f := range sched.Faults {
		if f.Phase != "" {
			continue
		}
		nem.wg.Add(1)
		go func() {
			defer nem.wg.Done()
			select {
			case <-nemCtx.Done():
				return
			case <-time.After(time.Until(planStart.Add(f.After))):
			}
			nem.inject(nemCtx, i, f, "")
		}()
	}

	var prober *load.Prober
	fired := make([]bool, len(sched.Faults))
	var last agent.Phase
	var switchedAt time.Time
	requested := false
	var newestIndex uint64
	var lastInfo agent.PlanInfo
	var reqWG sync.WaitGroup
	// Stuck: no progress for 150 s once the last timed fault healed.
	// Progress is the driver's, not only a new phase: a new step, or a
	// change in the leader's live replication state or verification
	// progress (pass, rows). Retries, failures and lag moving up and down
	// are not progress. Measured from the last progress, not from the
	// start: on a loaded machine a long verification pass takes minutes
	// and still moves.
	const stuckAfter = 150 * time.Second
	deadline := planStart.Add(sched.end() + stuckAfter)
	var lastLive string
	nextLive := time.Now()
	// The watcher's status calls wait 700 ms; when no agent answers in
	// time (a loaded machine starves them) they wait longer, up to 5 s,
	// and a blind span of more than 5 s goes into the timeline.
	wait, lastSeen, blind := 700*time.Millisecond, time.Now(), false
	for {
		p, at, ok := c.newest(ctx, planName, wait)
		if !ok {
			wait = min(wait*2, 5*time.Second)
			if !blind && time.Since(lastSeen) > 5*time.Second {
				blind = true
				h.note("watcher", fmt.Sprintf("no agent answered a status call for %s (now waiting %s)", time.Since(lastSeen).Round(time.Millisecond), wait))
			}
		} else {
			if blind {
				h.note("watcher", fmt.Sprintf("the agents answer again, after %s blind", time.Since(lastSeen).Round(time.Millisecond)))
			}
			wait, lastSeen, blind = 700*time.Millisecond, at, false
		}
		// An agent behind the others (the leader that committed the
		// newest entry may be the one paused) shows an older state: keep
		// the newest seen.
		ok = ok && p.Index >= newestIndex
		if ok {
			newestIndex = p.Index
			lastInfo = p
			h.observe(Observation{At: at, Index: p.Index, Phase: p.Phase, Epoch: p.Epoch})
		}
		if time.Now().After(nextLive) {
			nextLive = time.Now().Add(2 * time.Second)
			if live, ok := c.live(ctx, planName); ok && live != lastLive {
				lastLive = live
				deadline = maxTime(deadline, time.Now().Add(stuckAfter))
			}
		}
		if ok && p.Phase != last {
			last = p.Phase
			deadline = maxTime(deadline, time.Now().Add(stuckAfter))
			h.note("phase", fmt.Sprintf("%s epoch %d %s", p.Phase, p.Epoch, p.Reason))
			if opts.OnPhase != nil {
				if err := opts.OnPhase(ctx, p.Phase, blue, green); err != nil {
					return nil, fmt.Errorf("on phase %s: %w", p.Phase, err)
				}
			}
			if prober == nil && p.Phase != agent.PhasePending && p.Phase != agent.PhaseCopying {
				// Green is fenced from the plan's first step: from here on
				// the application must never write to both sides.
				prober = load.StartProber(appCtx, blueApp, greenApp, 10*time.Millisecond)
			}
			for i, f := range sched.Faults {
				if f.Phase != "" && !fired[i] && !p.Phase.Terminal() && atOrAfter(p.Phase, f.Phase) {
					fired[i] = true
					nem.wg.Add(1)
					go func() {
						defer nem.wg.Done()
						if f.Delay > 0 {
							select {
							case <-nemCtx.Done():
								return
							case <-time.After(f.Delay):
							}
						}
						if f.WaitHeld != "" {
							for end := time.Now().Add(30 * time.Second); proxies[f.WaitHeld].StallHits() == 0 && time.Now().Before(end); {
								select {
								case <-nemCtx.Done():
									return
								case <-time.After(10 * time.Millisecond):
								}
							}
						}
						nem.inject(nemCtx, i, f, p.Phase)
					}()
				}
			}
			if p.Phase == agent.PhaseSwitched {
				switchedAt = time.Now()
			}
		}
		if ok && p.Phase == agent.PhaseSwitched && !requested && time.Since(switchedAt) > time.Second {
			// The application has written on green for a moment: finish,
			// or roll back.
			requested = true
			to, why := agent.PhaseDone, "nemesis: complete"
			if sched.Rollback {
				to, why = agent.PhaseRollingBack, "nemesis: roll back"
			}
			reqWG.Add(1)
			go func() {
				defer reqWG.Done()
				err := retry(ctx, func() error {
					_, err := api.Transition(ctx, planName, agent.TransitionRequest{To: to, Reason: why})
					return err
				})
				h.note("operator", fmt.Sprintf("asked for %s: %v", to, err))
			}()
		}
		if ok && p.Phase.Terminal() {
			res.Final = p.Phase
			break
		}
		if time.Now().After(deadline) {
			res.Final = last
			res.Violations = append(res.Violations, fmt.Sprintf("stuck: the plan is still %s %s after it started, with no progress for %s (faults healed long ago)", last, time.Since(planStart).Round(time.Second), stuckAfter))
			break
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	reqWG.Wait()
	// Heal everything before the final checks.
	stopNem()
	nem.wg.Wait()
	nem.healAll()
	h.note("nemesis", "every fault healed")
	time.Sleep(time.Second) // the application writes on the final side
	receipts, refused := l.Stop()
	loadStopped = true
	var samples []load.Sample
	if prober != nil {
		samples = prober.Stop()
	}
	stopApp()
	appWG.Wait()
	res.Acked = len(receipts)
	res.GapMS = longestGap(receipts).Milliseconds()
	h.note("load", fmt.Sprintf("%d writes acknowledged, refused by SQLSTATE %v", len(receipts), refused))

	audit := c.audit(ctx, planName)
	// The audit log's times are the proposing agent's clock: put those of
	// the agents whose clock was shifted back on the test's.
	audit, moved := dejump(audit, clk.shifts())
	for _, m := range moved {
		h.note("clock", m)
	}
	res.OutageMS = outage(audit)
	if v, ok := lastInfo.Facts["write_outage_ms"]; ok {
		res.ProductOutageMS, _ = strconv.ParseInt(v, 10, 64)
		h.note("outage", fmt.Sprintf("the product reported %s ms (its leader's clock), the audit log says %d ms (fence intent to authorized, on the test's clock)", v, res.OutageMS))
	}
	chk := &checker{ctx: ctx, blue: blue, green: green, rdb: rdb, final: res.Final, h: h, dir: dir}
	res.Violations = append(res.Violations, chk.writes(receipts)...)
	res.Violations = append(res.Violations, chk.bothWritable(samples)...)
	gv, reads := chk.gate(audit)
	res.GateReads = reads
	res.Violations = append(res.Violations, gv...)
	res.Violations = append(res.Violations, chk.endState(blueApp, greenApp)...)
	res.Violations = append(res.Violations, chk.story(audit, receipts, greenApp)...)
	res.Violations = append(res.Violations, chk.audited(audit, h.observations(), res.Final)...)
	res.Violations = append(res.Violations, chk.orphans()...)

	for _, v := range res.Violations {
		h.note("VIOLATION", v)
	}
	if err := h.write(res.History, audit, receipts, samples); err != nil {
		return res, err
	}
	if len(res.Violations) == 0 {
		c.killAll()
		// Keep the history, drop the agents' data.
		for _, a := range agents {
			os.RemoveAll(filepath.Join(dir, a.ID))
		}
	}
	return res, nil
}

// tune applies the schedule's plan settings to the plan's YAML.
func (s Schedule) tune(plan string) (string, error) {
	swap := func(old, new string) error {
		if !strings.Contains(plan, old) {
			return fmt.Errorf("nemesis: the demo's plan has no %q to change", old)
		}
		plan = strings.Replace(plan, old, new, 1)
		return nil
	}
	if s.NoVerify {
		if err := swap("verify: {enabled: true,", "verify: {enabled: false,"); err != nil {
			return "", err
		}
	}
	if s.MaxDelay > 0 {
		if err := swap("lag: {max_bytes: 1MiB, max_delay: 500ms,", fmt.Sprintf("lag: {max_bytes: 256MiB, max_delay: %s,", s.MaxDelay)); err != nil {
			return "", err
		}
	}
	if s.MaxWindow > 0 {
		if err := swap("fence: {max_fence_window: 5s,", fmt.Sprintf("fence: {max_fence_window: %s,", s.MaxWindow)); err != nil {
			return "", err
		}
	}
	return plan, nil
}

// end is when the schedule's last timed fault has healed, after the start.
func (s Schedule) end() time.Duration {
	var end time.Duration
	for _, f := range s.Faults {
		end = max(end, f.After+f.For)
	}
	return end
}

// cluster is the three agents and what the nemesis did to them.
type cluster struct {
	agents  []*demo.Agent
	clients []*client.Client
	binary  string
	token   string
	h       *history

	mu     sync.Mutex
	down   map[string]bool // killed, not yet restarted
	paused map[string]bool
	dead   bool
}

func (c *cluster) killAll() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.dead {
		return
	}
	c.dead = true
	for _, a := range c.agents {
		a.Signal(syscall.SIGCONT)
		a.Kill()
	}
}

// leader asks every agent at once and returns the one most of them name.
func (c *cluster) leader(ctx context.Context) *demo.Agent {
	names := make([]string, len(c.clients))
	var wg sync.WaitGroup
	for i, cl := range c.clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(ctx, 700*time.Millisecond)
			defer cancel()
			if st, err := cl.Status(cctx); err == nil {
				names[i] = st.Leader
			}
		}()
	}
	wg.Wait()
	for _, n := range names {
		for _, a := range c.agents {
			if n != "" && a.ID == n {
				return a
			}
		}
	}
	return nil
}

func (c *cluster) waitLeader(ctx context.Context, d time.Duration) error {
	for deadline := time.Now().Add(d); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if c.leader(ctx) != nil {
			return nil
		}
	}
	return fmt.Errorf("no agent leader after %s", d)
}

// newest asks every agent for the plan and keeps the newest view (a
// restarted agent may still be catching up); at is when the answer came.
func (c *cluster) newest(ctx context.Context, plan string, wait time.Duration) (agent.PlanInfo, time.Time, bool) {
	views := make([]*agent.PlanInfo, len(c.clients))
	var wg sync.WaitGroup
	for i, cl := range c.clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(ctx, wait)
			defer cancel()
			if p, err := cl.Plan(cctx, plan); err == nil {
				views[i] = &p
			}
		}()
	}
	wg.Wait()
	at := time.Now()
	var best *agent.PlanInfo
	for _, v := range views {
		if v != nil && (best == nil || v.Index > best.Index) {
			best = v
		}
	}
	if best == nil {
		return agent.PlanInfo{}, at, false
	}
	return *best, at, true
}

// live returns what of the leader's view of plan shows the driver's
// progress, as a string to compare: the step under way, each pair's
// replication state and verification pass and rows.
func (c *cluster) live(ctx context.Context, plan string) (string, bool) {
	for _, cl := range c.clients {
		cctx, cancel := context.WithTimeout(ctx, 700*time.Millisecond)
		st, err := cl.Status(cctx)
		cancel()
		if err != nil || st.State != "Leader" {
			continue
		}
		for _, ps := range st.Plans {
			if ps.Name != plan {
				continue
			}
			var b strings.Builder
			fmt.Fprintf(&b, "%s %s", ps.Phase, ps.Step)
			if ps.Live != nil {
				for _, lp := range ps.Live.Pairs {
					fmt.Fprintf(&b, " %s:%s:%s:%d", lp.Name, lp.Replication, lp.VerifyPass, lp.VerifyRows)
				}
			}
			return b.String(), true
		}
	}
	return "", false
}

// audit reads the plan's audit log from the leader, whose state holds every
// committed entry.
func (c *cluster) audit(ctx context.Context, plan string) []agent.AuditEntry {
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if l := c.leader(ctx); l != nil {
			if a, err := client.New(l.API, c.token).Audit(ctx, plan, 0); err == nil && len(a) > 0 {
				return a
			}
		}
	}
	return nil
}

// nemesis injects the faults of a schedule.
type nemesis struct {
	c       *cluster
	proxies map[string]*Link
	raft    [3][3]*Proxy     // raft[i][j]: agent i's link to agent j
	disks   map[string]*disk // agents whose data directory is a file system of its own
	clocks  *clocks
	dir     string
	dbs     map[string]*integration.Postgres
	h       *history
	wg      sync.WaitGroup

	mu  sync.Mutex
	res *Result
}

func (n *nemesis) count(key string, skipped bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if skipped {
		n.res.Skipped++
		return
	}
	n.res.Injected[key]++
}

// inject applies fault i and heals it after its duration (or when ctx
// ends). phase is the phase it was fired in ("" for a timed fault).
func (n *nemesis) inject(ctx context.Context, i int, f Fault, phase agent.Phase) {
	key := string(f.Kind) + " " + f.Target
	if f.DB != "" {
		key += "-" + f.DB
	}
	if phase != "" {
		key += " in " + string(phase)
	} else {
		key += " at a moment"
	}
	heal := func() {}
	switch f.Kind {
	case KindKill, KindPause:
		a := n.pick(ctx, f.Target)
		if a == nil {
			n.h.note("fault", fmt.Sprintf("#%d %s: no %s to hit (skipped)", i, f.Kind, f.Target))
			n.count(key, true)
			return
		}
		c := n.c
		c.mu.Lock()
		if c.dead {
			c.mu.Unlock()
			return
		}
		if f.Kind == KindKill {
			a.Kill()
			c.down[a.ID] = true
		} else {
			a.Signal(syscall.SIGSTOP)
			c.paused[a.ID] = true
		}
		c.mu.Unlock()
		n.h.note("fault", fmt.Sprintf("#%d %s the %s %s for %s", i, f.Kind, f.Target, a.ID, f.For))
		heal = func() { n.healAgent(a) }
	case KindLatency:
		n.proxies[f.Target].SetLatency(f.Latency)
		n.h.note("fault", fmt.Sprintf("#%d latency +%s on the agents' link to %s for %s", i, f.Latency, f.Target, f.For))
		heal = func() {
			n.proxies[f.Target].SetLatency(0)
			n.h.note("heal", fmt.Sprintf("#%d latency to %s removed", i, f.Target))
		}
	case KindDrop:
		dropped := n.proxies[f.Target].DropAll()
		n.h.note("fault", fmt.Sprintf("#%d dropped %d connections of the agents to %s", i, dropped, f.Target))
	case KindTerminate:
		ended, err := terminateAgents(ctx, n.dbs[f.Target])
		if err != nil {
			n.h.note("fault", fmt.Sprintf("#%d terminate the agents' sessions on %s: %v (skipped)", i, f.Target, err))
			n.count(key, true)
			return
		}
		n.h.note("fault", fmt.Sprintf("#%d terminated %d sessions of the agents on %s (%s)", i, len(ended), f.Target, strings.Join(ended, ", ")))
	case KindStall:
		what := "the agents' open connections"
		if f.Match != "" {
			n.proxies[f.Target].StallMatching(f.Match)
			what = fmt.Sprintf("the first %q on each of the agents' open connections", f.Match)
		} else {
			n.proxies[f.Target].Stall(true)
		}
		n.h.note("fault", fmt.Sprintf("#%d stalled %s to %s for %s", i, what, f.Target, f.For))
		heal = func() {
			n.proxies[f.Target].Stall(false)
			n.h.note("heal", fmt.Sprintf("#%d stall to %s ended: what it held is delivered (%d matching requests)", i, f.Target, n.proxies[f.Target].StallHits()))
		}
	case KindStreamDelay:
		n.proxies[f.Target].SetStreamDelay(f.Latency)
		n.h.note("fault", fmt.Sprintf("#%d replication streams through %s's link run %s behind for %s", i, f.Target, f.Latency, f.For))
		heal = func() {
			n.proxies[f.Target].SetStreamDelay(0)
			n.h.note("heal", fmt.Sprintf("#%d stream delay on %s removed", i, f.Target))
		}
	case KindIsolate, KindOneWay, KindCutDB:
		a := n.pick(ctx, f.Target)
		if a == nil {
			n.h.note("fault", fmt.Sprintf("#%d %s: no %s to hit (skipped)", i, f.Kind, f.Target))
			n.count(key, true)
			return
		}
		links := n.cut(f, a)
		for _, p := range links {
			p.Blackhole(true)
		}
		what := map[Kind]string{KindIsolate: "cut off from the other agents", KindOneWay: "unreachable by the other agents (it still reaches them)",
			KindCutDB: "cut off from " + f.DB}[f.Kind]
		n.h.note("fault", fmt.Sprintf("#%d the %s %s %s for %s", i, f.Target, a.ID, what, f.For))
		heal = func() {
			for _, p := range links {
				p.Blackhole(false)
			}
			n.h.note("heal", fmt.Sprintf("#%d partition of %s ended", i, a.ID))
		}
	case KindRestart:
		n.h.note("fault", fmt.Sprintf("#%d restart %s: down for %s", i, f.Target, f.For))
		// Started again even when the plan ended meanwhile: the checks
		// read it.
		if err := n.dbs[f.Target].Restart(context.WithoutCancel(ctx), f.For); err != nil {
			n.h.note("heal", fmt.Sprintf("#%d restart %s: %v", i, f.Target, err))
			n.count(key, true)
			return
		}
		n.h.note("heal", fmt.Sprintf("#%d %s is up again", i, f.Target))
		n.count(key, false)
		return
	case KindDiskFull:
		a := n.pick(ctx, f.Target)
		if a == nil || n.disks[a.ID] == nil {
			n.h.note("fault", fmt.Sprintf("#%d %s: no %s to hit, or no tmpfs (skipped)", i, f.Kind, f.Target))
			n.count(key, true)
			return
		}
		filler := filepath.Join(n.dir, a.ID, "nemesis-filler")
		written, err := fill(filler)
		n.h.note("fault", fmt.Sprintf("#%d filled the data directory of the %s %s (%d MiB, %v) for %s", i, f.Target, a.ID, written>>20, err, f.For))
		heal = func() {
			os.Remove(filler)
			n.h.note("heal", fmt.Sprintf("#%d %s's disk has room again", i, a.ID))
		}
	case KindClockJump:
		var hit []*demo.Agent
		if f.Target == "all" {
			hit = n.c.agents
		} else if a := n.pick(ctx, f.Target); a != nil {
			hit = []*demo.Agent{a}
		}
		if len(hit) == 0 {
			n.h.note("fault", fmt.Sprintf("#%d %s: no %s to hit (skipped)", i, f.Kind, f.Target))
			n.count(key, true)
			return
		}
		var ids []string
		for _, a := range hit {
			if err := n.clocks.set(a.ID, f.Jump); err != nil {
				n.h.note("fault", fmt.Sprintf("#%d %s: %v (skipped)", i, f.Kind, err))
				n.count(key, true)
				return
			}
			ids = append(ids, a.ID)
		}
		n.mu.Lock()
		n.res.Jumped = true
		n.mu.Unlock()
		n.h.note("fault", fmt.Sprintf("#%d the wall clock of %s (%s) jumped by %s for %s", i, f.Target, strings.Join(ids, ", "), f.Jump, f.For))
		heal = func() {
			for _, a := range hit {
				if err := n.clocks.set(a.ID, 0); err != nil {
					n.h.note("heal", fmt.Sprintf("#%d %s's clock: %v", i, a.ID, err))
				}
			}
			n.h.note("heal", fmt.Sprintf("#%d the wall clock of %s jumped back", i, strings.Join(ids, ", ")))
		}
	case KindSlowDisk:
		a := n.pick(ctx, f.Target)
		var t *throttle
		err := errors.New("no " + f.Target + " to hit")
		if a != nil && n.disks[a.ID] != nil {
			t, err = slowDown(n.disks[a.ID], a.PID(), f.IOPS, f.IOPS*64<<10)
		}
		if err != nil {
			n.h.note("fault", fmt.Sprintf("#%d %s: %v (skipped)", i, f.Kind, err))
			n.count(key, true)
			return
		}
		n.h.note("fault", fmt.Sprintf("#%d the disk of the %s %s slowed to %d IOPS, %d KiB/s for %s", i, f.Target, a.ID, f.IOPS, f.IOPS*64, f.For))
		heal = func() {
			if err := t.restore(); err != nil {
				n.h.note("heal", fmt.Sprintf("#%d %s's disk: %v", i, a.ID, err))
			}
			n.h.note("heal", fmt.Sprintf("#%d %s's disk is fast again", i, a.ID))
		}
	case KindBlackhole:
		n.proxies[f.Target].Blackhole(true)
		n.h.note("fault", fmt.Sprintf("#%d blackhole between the agents and %s for %s", i, f.Target, f.For))
		heal = func() {
			n.proxies[f.Target].Blackhole(false)
			n.h.note("heal", fmt.Sprintf("#%d blackhole to %s ended", i, f.Target))
		}
	}
	n.count(key, false)
	select {
	case <-ctx.Done():
	case <-time.After(f.For):
	}
	heal()
}

// cut returns the proxies a partition of agent a blackholes.
func (n *nemesis) cut(f Fault, a *demo.Agent) []*Proxy {
	i := slices.Index(n.c.agents, a)
	var out []*Proxy
	switch f.Kind {
	case KindCutDB:
		out = append(out, n.proxies[f.DB].Via[i])
	case KindIsolate, KindOneWay:
		for j := range n.raft {
			if j == i {
				continue
			}
			out = append(out, n.raft[j][i]) // j's requests to a, and a's answers
			if f.Kind == KindIsolate {
				out = append(out, n.raft[i][j])
			}
		}
	}
	return out
}

// pick returns the leader or a running follower.
func (n *nemesis) pick(ctx context.Context, target string) *demo.Agent {
	leader := n.c.leader(ctx)
	if target == "leader" {
		return leader
	}
	n.c.mu.Lock()
	defer n.c.mu.Unlock()
	for _, a := range n.c.agents {
		if a != leader && !n.c.down[a.ID] && !n.c.paused[a.ID] {
			return a
		}
	}
	return nil
}

func (n *nemesis) healAgent(a *demo.Agent) {
	c := n.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.dead {
		return
	}
	if c.paused[a.ID] {
		a.Signal(syscall.SIGCONT)
		delete(c.paused, a.ID)
		n.h.note("heal", "continued "+a.ID)
	}
	if c.down[a.ID] {
		if err := a.Restart(c.binary, c.token); err != nil {
			n.h.note("heal", fmt.Sprintf("restart %s: %v", a.ID, err))
			return
		}
		delete(c.down, a.ID)
		n.h.note("heal", "restarted "+a.ID+" from its data directory")
	}
}

func (n *nemesis) healAll() {
	for _, p := range n.proxies {
		p.Heal()
	}
	for _, row := range n.raft {
		for _, p := range row {
			if p != nil {
				p.Heal()
			}
		}
	}
	for _, a := range n.c.agents {
		n.healAgent(a)
	}
}

// terminateAgents ends the agents' sessions on pg from the server's side:
// while a plan runs they are the only sessions of the superuser postgres
// (the application and the prober log in as the application's role, the
// checkers run after the plan), walsenders included.
func terminateAgents(ctx context.Context, pg *integration.Postgres) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, pg.DSN())
	if err != nil {
		return nil, err
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, `
		SELECT pid, backend_type FROM pg_stat_activity
		WHERE usename = 'postgres' AND pid <> pg_backend_pid()
		  AND backend_type IN ('client backend', 'walsender')`)
	if err != nil {
		return nil, err
	}
	type session struct {
		PID  int32
		Type string
	}
	sessions, err := pgx.CollectRows(rows, pgx.RowToStructByPos[session])
	if err != nil {
		return nil, err
	}
	// One by one: in a single statement the planner may end this session
	// before it filters it out.
	var ended []string
	for _, s := range sessions {
		var ok bool
		if err := conn.QueryRow(ctx, `SELECT pg_terminate_backend($1)`, s.PID).Scan(&ok); err != nil {
			return ended, err
		}
		if ok {
			ended = append(ended, fmt.Sprintf("%s %d", s.Type, s.PID))
		}
	}
	return ended, nil
}

// phaseOrder is the forward path of a plan.
var phaseOrder = []agent.Phase{agent.PhasePending, agent.PhaseCopying, agent.PhaseReplicating, agent.PhaseReady, agent.PhaseFenced,
	agent.PhaseCaughtUp, agent.PhaseVerified, agent.PhaseAuthorized, agent.PhaseSwitched, agent.PhaseDone}

func atOrAfter(p, q agent.Phase) bool {
	pi, qi := slices.Index(phaseOrder, p), slices.Index(phaseOrder, q)
	return pi >= 0 && qi >= 0 && pi >= qi
}

// outage is the write outage by the leader's clock: from the fence's
// intent to the gate opening.
func outage(audit []agent.AuditEntry) int64 {
	var fenceAt, openAt time.Time
	for _, e := range audit {
		if e.Op == agent.OpIntent && e.Step == "fence" && e.Refused == "" {
			fenceAt = e.At
		}
		if e.To == agent.PhaseAuthorized && e.Refused == "" && openAt.IsZero() {
			openAt = e.At
		}
	}
	if fenceAt.IsZero() || openAt.IsZero() {
		return 0
	}
	return openAt.Sub(fenceAt).Milliseconds()
}

func randomToken() string {
	b := make([]byte, 16)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// anyAgent sends each call to the first agent that answers.
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
		if errors.As(err, &apiErr) && apiErr.Status < 500 && apiErr.Status != 421 {
			return zero, err // the cluster answered
		}
		lastErr = err
	}
	return zero, lastErr
}

func (a *anyAgent) CreatePlan(ctx context.Context, req agent.CreatePlanRequest) (agent.PlanInfo, error) {
	return try(a, func(c *client.Client) (agent.PlanInfo, error) { return timeout(ctx, c.CreatePlan, req) })
}

func (a *anyAgent) Start(ctx context.Context, plan, reason string) (agent.PlanInfo, error) {
	return try(a, func(c *client.Client) (agent.PlanInfo, error) {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		return c.Start(cctx, plan, reason)
	})
}

func (a *anyAgent) Transition(ctx context.Context, plan string, req agent.TransitionRequest) (agent.PlanInfo, error) {
	return try(a, func(c *client.Client) (agent.PlanInfo, error) {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		return c.Transition(cctx, plan, req)
	})
}

func timeout[R, T any](ctx context.Context, f func(context.Context, R) (T, error), r R) (T, error) {
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return f(cctx, r)
}

// retry calls fn until it succeeds, the cluster refuses, or 60s passed: a
// cluster that lost its leader needs seconds to elect the next.
func retry(ctx context.Context, fn func() error) error {
	deadline := time.Now().Add(60 * time.Second)
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

// fill writes path until the file system is full (ENOSPC) and returns how
// much it wrote.
func fill(path string) (int64, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	var n int64
	for {
		w, err := f.Write(buf)
		n += int64(w)
		if err != nil {
			if errors.Is(err, syscall.ENOSPC) {
				return n, nil
			}
			return n, err
		}
	}
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// longestGap is the longest time between two acknowledged writes in a row.
func longestGap(receipts []load.Receipt) time.Duration {
	at := make([]time.Time, len(receipts))
	for i, r := range receipts {
		at[i] = r.At
	}
	slices.SortFunc(at, func(a, b time.Time) int { return a.Compare(b) })
	var gap time.Duration
	for i := 1; i < len(at); i++ {
		gap = max(gap, at[i].Sub(at[i-1]))
	}
	return gap
}
