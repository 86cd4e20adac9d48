package demo

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/cutover/cutover/agent"
)

var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "cutover-demo-bin-")
	if err != nil {
		panic(err)
	}
	binary = filepath.Join(dir, "cutover")
	out, err := exec.Command("go", "build", "-o", binary, "../../cmd/cutover").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build cutover: %v\n%s", err, out)
		os.Exit(2)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func runDemo(t *testing.T, opts Options) (*Summary, string) {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end: starts PostgreSQL, Redis and three agent processes")
	}
	opts.Binary = binary
	opts.ReportDir = t.TempDir()
	opts.KeepDir = true
	if opts.Accounts == 0 {
		opts.Accounts = 5000
	}
	var out strings.Builder
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	sum, err := Run(ctx, opts, io.MultiWriter(&out, testWriter{t}))
	if err != nil {
		t.Fatalf("demo: %v\n%s", err, out.String())
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("agents' data and logs kept in %s", sum.Dir)
			return
		}
		os.RemoveAll(sum.Dir)
	})
	return sum, out.String()
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func TestDemoCutsOverUnderLoadWithThreeAgentProcesses(t *testing.T) {
	sum, out := runDemo(t, Options{})
	if sum.Phase != "done" || sum.Route != "green" || !sum.GateOpen {
		t.Errorf("phase %s route %s gate %v, want done, green, open", sum.Phase, sum.Route, sum.GateOpen)
	}
	if sum.WritesMissing != 0 || sum.EventsMissing != 0 || sum.WritesOnGreen == 0 || sum.WritesAcknowledged == 0 {
		t.Errorf("writes: %+v", sum)
	}
	if sum.BothWritable != 0 {
		t.Errorf("invariant 1: both sides took a write in %d samples", sum.BothWritable)
	}
	if sum.OutageMS <= 0 || sum.RowsVerified == 0 {
		t.Errorf("outage %d ms, rows verified %d: not measured", sum.OutageMS, sum.RowsVerified)
	}
	// The headline covers the whole window the application saw, of which
	// fence to gate open is a part.
	if sum.WriteOutageMS < sum.OutageMS {
		t.Errorf("write outage %d ms, fence to gate open %d ms: the write outage was not measured", sum.WriteOutageMS, sum.OutageMS)
	}
	checkDashboard(t, "../../deploy/grafana/cutover-dashboard.json", sum.Metrics)
	last := strings.TrimSpace(out[strings.LastIndex(strings.TrimSpace(out), "\n")+1:])
	for _, key := range []string{`"phase"`, `"write_outage_ms"`, `"outage_ms"`, `"rows_verified"`, `"writes_acknowledged"`, `"writes_missing"`, `"gate_open"`, `"route"`} {
		if !strings.Contains(last, key) {
			t.Errorf("last line %q lacks %s", last, key)
		}
	}
}

func TestRollbackAfterTheFlipLosesNothingWrittenOnGreen(t *testing.T) {
	sum, _ := runDemo(t, Options{Rollback: true})
	if sum.Phase != "rolled_back" || sum.Route != "blue" {
		t.Fatalf("phase %s route %s, want rolled_back, blue", sum.Phase, sum.Route)
	}
	if sum.WritesOnGreen == 0 {
		t.Errorf("nothing was written on green before the rollback")
	}
	if sum.MissingOnBlue != 0 || sum.BothWritable != 0 {
		t.Errorf("after rollback: %d writes missing on blue, %d double-writable samples", sum.MissingOnBlue, sum.BothWritable)
	}
}

// A leader killed at any phase: the cutover then completes or aborts, never
// stays half-done; blue is never left fenced with nobody in charge; the
// audit log tells the story.
func TestLeaderKilledAtEachPhaseCompletesOrAbortsCleanly(t *testing.T) {
	for _, phase := range []agent.Phase{agent.PhaseCopying, agent.PhaseReplicating, agent.PhaseReady, agent.PhaseFenced, agent.PhaseAuthorized, agent.PhaseSwitched} {
		t.Run(string(phase), func(t *testing.T) {
			sum, _ := runDemo(t, Options{KillLeaderAt: phase, Writers: 4})
			if sum.KilledLeader == "" {
				t.Fatalf("the leader was not killed in %s", phase)
			}
			switch sum.Phase {
			case "done":
				if sum.Route != "green" {
					t.Errorf("done but route = %q", sum.Route)
				}
			case "aborted":
				// Blue was unfenced: the application kept (or went back
				// to) writing there, and nothing flipped.
				if sum.Route == "green" {
					t.Errorf("aborted but route = green")
				}
			default:
				t.Errorf("ended %s: neither done nor aborted", sum.Phase)
			}
			if sum.WritesMissing != 0 || sum.BothWritable != 0 {
				t.Errorf("%d writes missing, %d double-writable samples", sum.WritesMissing, sum.BothWritable)
			}
			story := strings.Join(sum.Audit, "\n")
			if !strings.Contains(story, "->"+sum.Phase) {
				t.Errorf("the audit log does not show the end (%s):\n%s", sum.Phase, story)
			}
			t.Logf("killed %s at %s; ended %s\naudit:\n%s", sum.KilledLeader, sum.KilledAt, sum.Phase, story)
		})
	}
}

// A plan aborted through the CLI in any phase up to authorized, then a new
// plan on the same pair: the retry must flip to a green the application
// can write (the aborted plan left green fenced), with nothing
// acknowledged missing, the key-less table included.
func TestAbortedAtEachPhaseThenRetriedEndsWritingOnGreen(t *testing.T) {
	for _, phase := range []agent.Phase{agent.PhaseCopying, agent.PhaseReplicating, agent.PhaseReady, agent.PhaseFenced, agent.PhaseCaughtUp, agent.PhaseVerified, agent.PhaseAuthorized} {
		t.Run(string(phase), func(t *testing.T) {
			sum, _ := runDemo(t, Options{AbortFirstAt: phase, Writers: 4, Accounts: 2000})
			story := strings.Join(sum.Audit, "\n")
			if sum.AbortedFirst == "" || !atOrAfter(agent.Phase(sum.AbortedFirst), phase) || atOrAfter(agent.Phase(sum.AbortedFirst), agent.PhaseSwitched) {
				t.Errorf("the first plan was aborted in %q, want %s (or a later phase before switched)", sum.AbortedFirst, phase)
			}
			if sum.Plan != retryPlanName || sum.Phase != "done" || sum.Route != "green" {
				t.Fatalf("retry: plan %s ended %s with route %q, want %s done on green\n%s", sum.Plan, sum.Phase, sum.Route, retryPlanName, story)
			}
			if sum.WritesOnGreen == 0 {
				t.Errorf("the application wrote nothing on green after the flip: green is not writable")
			}
			if sum.WritesMissing != 0 || sum.EventsMissing != 0 || sum.BothWritable != 0 {
				t.Errorf("%d writes missing (%d in the key-less table), %d double-writable samples", sum.WritesMissing, sum.EventsMissing, sum.BothWritable)
			}
		})
	}
}

// A row of a key-less table changed on green behind the stream's back is
// found by the verification, named, and the plan aborts.
func TestAChangedRowOfAKeylessTableIsNamedAndThePlanAborts(t *testing.T) {
	sum, _ := runDemo(t, Options{TamperGreen: true, Writers: 4, Accounts: 2000})
	story := strings.Join(sum.Audit, "\n")
	if sum.Phase != "aborted" || sum.Route == "green" {
		t.Fatalf("ended %s with route %q, want aborted and not on green\n%s", sum.Phase, sum.Route, story)
	}
	if !strings.Contains(story, "public.load_events changed") || !strings.Contains(story, "{seq 7}") {
		t.Errorf("the audit log does not name the changed row of load_events:\n%s", story)
	}
	if sum.WritesMissing != 0 || sum.BothWritable != 0 {
		t.Errorf("%d writes missing, %d double-writable samples", sum.WritesMissing, sum.BothWritable)
	}
}

// checkDashboard fails unless every metric the Grafana dashboard queries,
// and every label it groups or filters by, is in an agent's /metrics after
// a real cutover (Prometheus' own labels aside).
func checkDashboard(t *testing.T, path, metrics string) {
	t.Helper()
	if metrics == "" {
		t.Fatal("the demo kept no /metrics of the leader")
	}
	labels := map[string]map[string]bool{} // family -> its labels
	sample := regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? `)
	for _, line := range strings.Split(metrics, "\n") {
		m := sample.FindStringSubmatch(line)
		if m == nil || strings.HasPrefix(line, "#") {
			continue
		}
		name := m[1]
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if base, ok := strings.CutSuffix(name, suffix); ok && strings.Contains(metrics, "# TYPE "+base+" histogram") {
				name = base
			}
		}
		if labels[name] == nil {
			labels[name] = map[string]bool{}
		}
		for _, kv := range regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="`).FindAllStringSubmatch(m[2], -1) {
			labels[name][kv[1]] = true
		}
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string
			Targets []struct{ Expr string }
		}
	}
	if err := json.Unmarshal(data, &dash); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	family := regexp.MustCompile(`\b(cutover_[a-z_]+)`)
	grouped := regexp.MustCompile(`\b(?:by|without) \(([^)]*)\)|([a-z_]+)=~?"`)
	exprs := 0
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			exprs++
			var used []string
			for _, m := range family.FindAllStringSubmatch(tg.Expr, -1) {
				name := strings.TrimSuffix(m[1], "_bucket")
				if labels[name] == nil {
					t.Errorf("dashboard panel %q queries %s, which the agent does not export", p.Title, name)
				}
				used = append(used, name)
			}
			for _, m := range grouped.FindAllStringSubmatch(tg.Expr, -1) {
				for _, l := range strings.Split(m[1]+","+m[2], ",") {
					l = strings.TrimSpace(l)
					if l == "" || l == "le" || l == "instance" || l == "job" {
						continue
					}
					found := false
					for _, name := range used {
						found = found || labels[name][l]
					}
					if !found {
						t.Errorf("dashboard panel %q uses label %q, which none of %v carries", p.Title, l, used)
					}
				}
			}
		}
	}
	if exprs < 10 {
		t.Errorf("the dashboard has %d queries", exprs)
	}
}
