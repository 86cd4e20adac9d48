package nemesis

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/integration/load"
)

var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "cutover-nemesis-bin-")
	if err != nil {
		panic(err)
	}
	binary = filepath.Join(dir, "cutover")
	// The tag nemesis_clock lets the suite shift the agents' wall clocks
	// (internal/clock); product builds cannot.
	out, err := exec.Command("go", "build", "-tags", "nemesis_clock", "-o", binary, "../../cmd/cutover").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build cutover: %v\n%s", err, out)
		os.Exit(2)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// envInt reads a whole number from the environment (make nemesis sets
// RUNS and SEED).
func envInt(t *testing.T, name string, def uint64) uint64 {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.ParseUint(v, 10, 64)
	if err != nil {
		t.Fatalf("%s=%q: want a whole number", name, v)
	}
	return n
}

// TestTheCutoverKeepsItsInvariantsUnderSeededFaults runs RUNS plans (default
// 1) under the fault schedules of seeds SEED, SEED+1... (default 1) and
// checks each history. A failure names the seed, the schedule and the
// history's file.
func TestTheCutoverKeepsItsInvariantsUnderSeededFaults(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end: starts PostgreSQL, Redis and three agent processes per run")
	}
	runs, seed := envInt(t, "RUNS", 1), envInt(t, "SEED", 1)
	// NEMESIS_SCHEDULE, a schedule in JSON (Schedule), runs that schedule
	// instead of the seeds' (make nemesis SCHEDULE='{...}'): a hand-made
	// experiment, checked like a seed.
	var custom *Schedule
	if js := os.Getenv("NEMESIS_SCHEDULE"); js != "" {
		custom = &Schedule{}
		if err := json.Unmarshal([]byte(js), custom); err != nil {
			t.Fatalf("NEMESIS_SCHEDULE: %v", err)
		}
	}
	// A failing run's history and agents' logs stay for the reader: under
	// NEMESIS_DIR (make nemesis) or the system's temporary directory.
	dir := os.Getenv("NEMESIS_DIR")
	var stats summary
	for s := seed; s < seed+runs; s++ {
		// Generous: the stuck rule (150 s without progress) decides
		// whether a plan is stuck; this only bounds a hung harness.
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
		opts := Options{Binary: binary, Seed: s, Dir: dir, Log: testLog{t, s}, Schedule: custom}
		if os.Getenv("NEMESIS_QUIET") != "" {
			opts.Log = nil // the timeline is in the history's file
		}
		res, err := Run(ctx, opts)
		cancel()
		if err != nil {
			// The harness failed (not a checker): say so and go on with
			// the next seed rather than lose the rest of the chunk.
			t.Errorf("seed %d: the run failed: %v\nschedule: %s", s, err, NewSchedule(s))
			continue
		}
		stats.add(res)
		t.Logf("seed %d: %s in %s, %d writes acknowledged, %d gate reads, outage %d ms (product's figure %d ms, clock jumped %v), longest write gap %d ms, %d violations",
			s, res.Final, res.Took.Round(time.Second), res.Acked, res.GateReads, res.OutageMS, res.ProductOutageMS, res.Jumped, res.GapMS, len(res.Violations))
		if len(res.Violations) == 0 && dir == "" {
			os.RemoveAll(res.Dir)
		}
		if len(res.Violations) > 0 {
			t.Errorf("seed %d broke an invariant:\n  %s\nschedule: %s\nhistory: %s\nagents' data and logs: %s\nrerun: make nemesis RUNS=1 SEED=%d",
				s, strings.Join(res.Violations, "\n  "), res.Schedule, res.History, res.Dir, s)
		}
	}
	t.Log(stats.String())
}

type testLog struct {
	t    *testing.T
	seed uint64
}

func (w testLog) Write(p []byte) (int, error) {
	w.t.Logf("[seed %d] %s", w.seed, strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// summary adds up runs for the closing figures.
type summary struct {
	runs, violating, acked int
	outcomes               map[agent.Phase]int
	faults                 map[string]int
	skipped                int
	longestOutage          int64
	longestGap             int64
	// The product's own outage figure (write_outage_ms, its leader's wall
	// clock) and how far it strayed from the audit log's (on the test's
	// clock), in runs with and without a clock jump.
	productOutage     [2]int64
	productOutageDiff [2]int64
	jumped            int
}

func (s *summary) add(r *Result) {
	if s.outcomes == nil {
		s.outcomes, s.faults = map[agent.Phase]int{}, map[string]int{}
	}
	s.runs++
	if len(r.Violations) > 0 {
		s.violating++
	}
	s.acked += r.Acked
	s.outcomes[r.Final]++
	for k, n := range r.Injected {
		s.faults[k] += n
	}
	s.skipped += r.Skipped
	s.longestOutage = max(s.longestOutage, r.OutageMS)
	s.longestGap = max(s.longestGap, r.GapMS)
	j := 0
	if r.Jumped {
		j = 1
		s.jumped++
	}
	if r.ProductOutageMS != 0 && r.OutageMS != 0 {
		abs := func(v int64) int64 { return max(v, -v) }
		if abs(r.ProductOutageMS) > abs(s.productOutage[j]) {
			s.productOutage[j] = r.ProductOutageMS
		}
		s.productOutageDiff[j] = max(s.productOutageDiff[j], abs(r.ProductOutageMS-r.OutageMS))
	}
}

func (s *summary) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d runs, %d with violations; outcomes %v; %d writes acknowledged; longest outage %d ms (audit: fence intent to authorized), longest write gap %d ms (the application's)",
		s.runs, s.violating, s.outcomes, s.acked, s.longestOutage, s.longestGap)
	fmt.Fprintf(&b, "\nthe product's outage figure: farthest from zero %d ms, at most %d ms off the audit's (runs without a clock jump); farthest %d ms, at most %d ms off (the %d runs with one)",
		s.productOutage[0], s.productOutageDiff[0], s.productOutage[1], s.productOutageDiff[1], s.jumped)
	fmt.Fprintf(&b, "\nfaults injected (%d skipped, no target):", s.skipped)
	keys := make([]string, 0, len(s.faults))
	for k := range s.faults {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(&b, "\n  %-40s %d", k, s.faults[k])
	}
	return b.String()
}

// The checkers must see what they are there for: here the test itself
// breaks the invariants behind the agents' back (the application's write
// privileges given back on blue after the flip, an acknowledged row deleted
// from green at the end), in a run without faults.
func TestTheCheckersCatchABlueWritableAfterTheFlipAndALostWrite(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end: starts PostgreSQL, Redis and three agent processes")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	res, err := Run(ctx, Options{Binary: binary, Schedule: &Schedule{}, Dir: t.TempDir(), Log: testLog{t, 0},
		OnPhase: func(ctx context.Context, p agent.Phase, blue, green *integration.Postgres) error {
			switch p {
			case agent.PhaseSwitched:
				return blue.Exec(ctx, "GRANT INSERT, UPDATE, DELETE ON load_accounts, load_history, load_events TO app")
			case agent.PhaseDone:
				return green.Exec(ctx, "DELETE FROM load_history WHERE id = (SELECT min(id) FROM load_history WHERE run = 'nemesis')")
			}
			return nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	if res.Final != agent.PhaseDone {
		t.Fatalf("the plan ended %s, want done (violations: %v)", res.Final, res.Violations)
	}
	for _, want := range []string{"split brain:", "lost writes:", "end: the application can write on both sides"} {
		found := false
		for _, v := range res.Violations {
			found = found || strings.HasPrefix(v, want)
		}
		if !found {
			t.Errorf("no violation %q among %q", want, res.Violations)
		}
	}
}

func TestASeedAlwaysDrawsTheSameSchedule(t *testing.T) {
	for seed := uint64(1); seed <= 50; seed++ {
		a, b := NewSchedule(seed), NewSchedule(seed)
		if a.String() != b.String() {
			t.Fatalf("seed %d drew two schedules:\n%s\n%s", seed, a, b)
		}
		if len(a.Faults) == 0 {
			t.Fatalf("seed %d drew no fault", seed)
		}
		for _, f := range a.Faults {
			if _, short := holdPoints[f.Phase]; short && a.Hold != f.Phase {
				t.Fatalf("seed %d ties a fault to %s without holding the agents there:\n%s", seed, f.Phase, a)
			}
		}
	}
	if NewSchedule(1).String() == NewSchedule(2).String() {
		t.Error("seeds 1 and 2 drew the same schedule")
	}
}

func TestTheGateCheckerAcceptsReadsThatFollowTheCommits(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	audit := []agent.AuditEntry{
		{Index: 10, At: at(100), From: agent.PhaseVerified, To: agent.PhaseAuthorized},
		{Index: 12, At: at(300), From: agent.PhaseAuthorized, To: agent.PhaseAborted},
	}
	obs := []Observation{{At: at(120), Index: 10}, {At: at(320), Index: 12}}
	reads := []GateRead{
		{Invoke: at(50), Complete: at(60), Phase: "verified", Open: false},
		// Concurrent with the commit: either answer is fine.
		{Invoke: at(90), Complete: at(110), Phase: "verified", Open: false},
		{Invoke: at(130), Complete: at(140), Phase: "authorized", Open: true},
		{Invoke: at(330), Complete: at(340), Phase: "aborted", Open: false},
		// A closed answer without a phase (no leader) says nothing.
		{Invoke: at(150), Complete: at(160), Reason: "no leader"},
	}
	if !porcupineOK(audit, obs, reads) {
		t.Fatal("a history whose reads follow the commits was found not linearizable")
	}
}

func TestTheGateCheckerCatchesAnOpenReadBeforeTheCommitAndAStaleOneAfterTheAbort(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	audit := []agent.AuditEntry{
		{Index: 10, At: at(100), From: agent.PhaseVerified, To: agent.PhaseAuthorized},
		{Index: 12, At: at(300), From: agent.PhaseAuthorized, To: agent.PhaseAborted},
	}
	obs := []Observation{{At: at(120), Index: 10}, {At: at(320), Index: 12}}
	early := []GateRead{{Invoke: at(50), Complete: at(60), Phase: "authorized", Open: true}}
	if porcupineOK(audit, obs, early) {
		t.Error("a gate read open before authorized was proposed passed the checker")
	}
	stale := []GateRead{{Invoke: at(400), Complete: at(410), Phase: "authorized", Open: true}}
	if porcupineOK(audit, obs, stale) {
		t.Error("a gate read open after the abort was seen applied passed the checker")
	}
}

func porcupineOK(audit []agent.AuditEntry, obs []Observation, reads []GateRead) bool {
	h := newHistory(nil)
	h.obs, h.gates = obs, reads
	c := &checker{h: h}
	v, _ := c.gate(audit)
	return len(v) == 0
}

func TestTheProxyPassesDelaysDropsAndBlackholesDatabaseConnections(t *testing.T) {
	pg := integration.NewPostgres(t, integration.PostgresOptions{})
	p, err := StartProxy(fmt.Sprintf("%s:%d", pg.Host, pg.Port))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	dsn := fmt.Sprintf("postgres://postgres@%s/%s?sslmode=disable", p.Addr(), pg.Database)
	ctx := context.Background()
	query := func(conn *pgx.Conn, d time.Duration) error {
		qctx, cancel := context.WithTimeout(ctx, d)
		defer cancel()
		var one int
		return conn.QueryRow(qctx, "SELECT 1").Scan(&one)
	}
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("connect through the proxy: %v", err)
	}
	defer conn.Close(ctx)
	if err := query(conn, 10*time.Second); err != nil {
		t.Fatalf("query through the proxy: %v", err)
	}

	p.SetLatency(200 * time.Millisecond)
	began := time.Now()
	if err := query(conn, 10*time.Second); err != nil {
		t.Fatalf("query with latency: %v", err)
	}
	if took := time.Since(began); took < 400*time.Millisecond {
		t.Errorf("a round trip with 200ms each way took %s", took)
	}
	p.SetLatency(0)

	p.Blackhole(true)
	if err := query(conn, 500*time.Millisecond); err == nil {
		t.Error("a query through the blackhole was answered")
	}
	p.Blackhole(false)

	conn2, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("connect after the blackhole: %v", err)
	}
	defer conn2.Close(ctx)
	if n := p.DropAll(); n < 1 {
		t.Errorf("dropped %d connections, want at least 1", n)
	}
	if err := query(conn2, 10*time.Second); err == nil {
		t.Error("a dropped connection still answered")
	}
	conn3, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("connect after the drop: %v", err)
	}
	defer conn3.Close(ctx)
	if err := query(conn3, 10*time.Second); err != nil {
		t.Errorf("query on a new connection after the drop: %v", err)
	}
}

func TestTheStoryCheckerCatchesAWriteOnGreenBeforeTheGateOpened(t *testing.T) {
	t0 := time.Unix(1000, 0)
	audit := []agent.AuditEntry{{Index: 10, At: t0, From: agent.PhaseVerified, To: agent.PhaseAuthorized}}
	c := &checker{}
	after := []load.Receipt{{DSN: "blue", At: t0.Add(-time.Second)}, {DSN: "green", At: t0.Add(time.Millisecond)}}
	if v := c.story(audit, after, "green"); len(v) != 0 {
		t.Errorf("writes on green after authorized were flagged: %v", v)
	}
	before := append(after, load.Receipt{DSN: "green", At: t0.Add(-time.Millisecond)})
	if v := c.story(audit, before, "green"); len(v) != 1 {
		t.Errorf("a write on green before authorized was not flagged: %v", v)
	}
	if v := c.story(nil, after, "green"); len(v) != 1 {
		t.Errorf("a write on green without authorized in the audit log was not flagged: %v", v)
	}
}

// buildMutant builds the cutover binary with a mutation's build tag.
func buildMutant(t *testing.T, tag string) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "cutover-"+tag)
	out, err := exec.Command("go", "build", "-tags", tag+",nemesis_clock", "-o", bin, "../../cmd/cutover").CombinedOutput()
	if err != nil {
		t.Fatalf("build the %s mutant: %v\n%s", tag, err, out)
	}
	return bin
}

// The mutation check: each deliberately broken build (Mutations) must be
// caught by a checker within MUTATION_RUNS runs (default 3) of the schedule
// designed for it, and the real build must pass the same schedule (else the
// schedule, not the mutation, broke the invariant). A surviving mutant
// fails the test. NEMESIS_MUTATIONS names the mutations to run (comma
// separated tags, or "all"; make mutations): four whole cutovers at least,
// too slow for make test, which leaves it out.
func TestEveryMutantIsCaught(t *testing.T) {
	which := os.Getenv("NEMESIS_MUTATIONS")
	if testing.Short() || which == "" {
		t.Skip("the mutation check runs with NEMESIS_MUTATIONS=all (make mutations): two builds and four whole cutovers at least")
	}
	runs := int(envInt(t, "MUTATION_RUNS", 3))
	dir := os.Getenv("NEMESIS_DIR")
	for _, m := range Mutations {
		if which != "all" && !slices.Contains(strings.Split(which, ","), m.Tag) {
			continue
		}
		t.Run(m.Tag, func(t *testing.T) {
			run := func(bin string) *Result {
				// Generous: the stuck rule (150 s without progress) decides
				// whether a plan is stuck; this only bounds a hung harness.
				ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
				defer cancel()
				s := m.Schedule
				opts := Options{Binary: bin, Schedule: &s, Dir: dir, Log: testLog{t, 0}}
				if os.Getenv("NEMESIS_QUIET") != "" {
					opts.Log = nil
				}
				res, err := Run(ctx, opts)
				if err != nil {
					t.Fatalf("the run failed: %v\nschedule: %s", err, s)
				}
				if dir == "" && len(res.Violations) == 0 {
					os.RemoveAll(res.Dir)
				}
				return res
			}
			res := run(binary)
			if len(res.Violations) > 0 {
				t.Fatalf("the real build broke an invariant under the %s schedule (fix the schedule or the product):\n  %s\nhistory: %s",
					m.Tag, strings.Join(res.Violations, "\n  "), res.History)
			}
			t.Logf("the real build under the %s schedule: %s, no violation", m.Tag, res.Final)
			mutant := buildMutant(t, m.Tag)
			for i := 1; i <= runs; i++ {
				res := run(mutant)
				if len(res.Violations) > 0 {
					t.Logf("the %s mutant was caught in run %d of %d (plan %s):\n  %s\nhistory: %s",
						m.Tag, i, runs, res.Final, strings.Join(res.Violations, "\n  "), res.History)
					return
				}
				t.Logf("run %d: the %s mutant survived (plan %s)", i, m.Tag, res.Final)
			}
			t.Errorf("the %s mutant survived %d runs of its schedule: the checkers (or the schedule) miss the defect it plants", m.Tag, runs)
		})
	}
}

func TestTheAuditCheckerCatchesAPhaseTheLogNeverCommitted(t *testing.T) {
	t0 := time.Unix(1000, 0)
	audit := []agent.AuditEntry{
		{Index: 5, Op: agent.OpCreatePlan, To: agent.PhasePending},
		{Index: 6, From: agent.PhasePending, To: agent.PhaseCopying},
		{Index: 9, Op: agent.OpIntent, Step: "fence"},
		{Index: 10, From: agent.PhaseReady, To: agent.PhaseFenced},
		{Index: 11, From: agent.PhaseFenced, To: agent.PhaseAuthorized, Refused: "stale epoch"},
		{Index: 12, From: agent.PhaseFenced, To: agent.PhaseAborted},
	}
	obs := []Observation{{Index: 6, Phase: agent.PhaseCopying}, {Index: 9, Phase: agent.PhaseCopying}, {Index: 10, Phase: agent.PhaseFenced}, {Index: 12, Phase: agent.PhaseAborted}}
	c := &checker{}
	if v := c.audited(audit, obs, agent.PhaseAborted); len(v) != 0 {
		t.Errorf("a history that follows the audit log was flagged: %v", v)
	}
	seen := append(slices.Clone(obs), Observation{At: t0, Index: 11, Phase: agent.PhaseAuthorized})
	if v := c.audited(audit, seen, agent.PhaseAborted); len(v) != 1 {
		t.Errorf("a phase seen that the log refused was not flagged: %v", v)
	}
	if v := c.audited(audit, obs, agent.PhaseDone); len(v) != 1 {
		t.Errorf("a final phase the log does not end with was not flagged: %v", v)
	}
}

// A stall narrowed to a request holds that request, lets new connections
// pass, and delivers the held request when it ends, even though its client
// is gone by then: the late message the mutation check relies on.
func TestTheProxyStallDeliversARequestLateAfterItsClientDied(t *testing.T) {
	pg := integration.NewPostgres(t, integration.PostgresOptions{})
	p, err := StartProxy(fmt.Sprintf("%s:%d", pg.Host, pg.Port))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	dsn := fmt.Sprintf("postgres://postgres@%s/%s?sslmode=disable", p.Addr(), pg.Database)
	ctx := context.Background()
	old, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	p.StallMatching("late_table")
	if _, err := old.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatalf("a request not matching the stall was held: %v", err)
	}
	sent := make(chan error, 1)
	go func() {
		_, err := old.Exec(ctx, "CREATE TABLE late_table (id int)", pgx.QueryExecModeSimpleProtocol)
		sent <- err
	}()
	for deadline := time.Now().Add(10 * time.Second); p.StallHits() == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the stall never held the request")
		}
	}
	// The client dies with its request held.
	old.PgConn().Conn().Close()
	<-sent
	fresh, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("a new connection during the stall: %v", err)
	}
	defer fresh.Close(ctx)
	exists := func() bool {
		var ok bool
		if err := fresh.QueryRow(ctx, "SELECT to_regclass('late_table') IS NOT NULL").Scan(&ok); err != nil {
			t.Fatal(err)
		}
		return ok
	}
	if exists() {
		t.Fatal("the held request reached the server during the stall")
	}
	p.Stall(false)
	for deadline := time.Now().Add(10 * time.Second); !exists(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the held request was not delivered when the stall ended")
		}
	}
}

// The agents' stamps map back onto the test's clock through the offsets
// in force: before any jump, after a forward one, after the jump back, and
// at a backward jump's ambiguous stamps (the log's order decides; failing
// that the earliest reading wins, so a commit's interval only widens).
func TestAClockJumpIsUndoneOnTheAuditLogsTimes(t *testing.T) {
	t0 := time.Date(2026, 12, 3, 18, 0, 0, 0, time.UTC)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	shifts := []clockShift{
		{Before: at(10), After: at(10.001), Off: 2 * time.Minute},
		{Before: at(20), After: at(20.001), Off: 0},
		{Before: at(30), After: at(30.001), Off: -5 * time.Second},
	}
	for _, c := range []struct {
		stamp, notBefore, want float64
	}{
		{5, 0, 5},    // before the jump
		{135, 0, 15}, // +2m in force: 15 s on the test's clock
		{25, 0, 25},  // back to 0
		{27, 0, 27},  // after the backward jump 27 s on its clock is 32 s, or 27 s before it: earliest wins
		{27, 31, 32}, // ... unless the entry before it was at 31 s
		{32, 0, 37},  // only the -5 s reading fits
	} {
		got, ok := trueTime(at(c.stamp), shifts, at(c.notBefore))
		if !ok || !got.Equal(at(c.want)) {
			t.Errorf("stamp %gs after %gs: got %s (fits %v), want %gs", c.stamp, c.notBefore, got.Sub(t0), ok, c.want)
		}
	}
	if _, ok := trueTime(at(400), shifts[:1], time.Time{}); !ok {
		t.Error("a stamp after a forward jump that never ended did not fit")
	}
	// A backward jump of the leader inside the fence window: the fence's
	// intent stamped before it, authorized after it, by the jumped clock.
	back := []clockShift{{Before: at(10), After: at(10.001), Off: -3 * time.Minute}}
	audit := []agent.AuditEntry{{Index: 1, Node: "agent-1", At: at(9)}, {Index: 2, Node: "agent-1", At: at(12).Add(-3 * time.Minute)}, {Index: 3, Node: "agent-2", At: at(13)}}
	got, notes := dejump(audit, map[string][]clockShift{"agent-1": back})
	if !got[0].At.Equal(at(9)) || !got[1].At.Equal(at(12)) || !got[2].At.Equal(at(13)) || len(notes) != 1 {
		t.Errorf("dejump: %v %v %v, notes %v", got[0].At.Sub(t0), got[1].At.Sub(t0), got[2].At.Sub(t0), notes)
	}
}

// The slow-disk fault really slows the forced writes of the process it
// hits: 40 synchronous 4 KiB writes on an agent's disk, before and while
// the device is throttled to 10 operations a second (root only: a loop
// device and a cgroup).
func TestASlowDiskSlowsSynchronousWrites(t *testing.T) {
	if testing.Short() {
		t.Skip("makes a loop device and a cgroup")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: loop devices and cgroups")
	}
	d, err := mountDisk(filepath.Join(t.TempDir(), "agent"))
	if d == nil || err != nil {
		t.Fatalf("no loop device disk: %v", err)
	}
	defer d.unmount()
	writes := func(slow bool) time.Duration {
		// The process waits a moment so that it is throttled before it
		// writes.
		cmd := exec.Command("sh", "-c", "sleep 0.3; exec dd if=/dev/zero of="+filepath.Join(d.dir, "f")+" bs=4k count=40 oflag=dsync")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		began := time.Now()
		if slow {
			th, err := slowDown(d, cmd.Process.Pid, 10, 10*64<<10)
			if err != nil {
				cmd.Process.Kill()
				t.Fatalf("throttle: %v", err)
			}
			defer th.restore()
		}
		if err := cmd.Wait(); err != nil {
			t.Fatalf("dd: %v", err)
		}
		return time.Since(began)
	}
	fast, slow := writes(false), writes(true)
	t.Logf("40 synchronous writes: %s unthrottled, %s at 10 IOPS", fast, slow)
	if slow < 3*time.Second || slow < 2*fast {
		t.Errorf("the throttle did not slow the writes: %s unthrottled, %s at 10 IOPS", fast, slow)
	}
}
