package nemesis

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/integration/load"
)

// GateRead is one gate read by the application, with its invocation and
// completion times. Err is set when the agent did not answer; Phase is
// empty when it answered closed without reading the plan (no leader, cut
// off).
type GateRead struct {
	Invoke, Complete time.Time
	Agent            string
	Open             bool
	Phase            string
	Reason           string
	Err              string
}

// Observation is the newest committed state of the plan the watcher saw:
// at At, some agent had applied the plan's entries up to Index.
type Observation struct {
	At    time.Time
	Index uint64
	Phase agent.Phase
	Epoch uint64
}

// history records a run: the timeline (faults, phases, heals), the gate
// reads and the observations; write adds the audit log, the receipts and
// the prober's samples.
type history struct {
	mu    sync.Mutex
	start time.Time
	log   io.Writer
	notes []string
	gates []GateRead
	obs   []Observation
}

func newHistory(log io.Writer) *history {
	if log == nil {
		log = io.Discard
	}
	return &history{start: time.Now(), log: log}
}

func (h *history) note(kind, text string) {
	now := time.Now()
	line := fmt.Sprintf("%8.3fs %s %-9s %s", now.Sub(h.start).Seconds(), now.Format("15:04:05.000"), kind, text)
	h.mu.Lock()
	defer h.mu.Unlock()
	h.notes = append(h.notes, line)
	fmt.Fprintln(h.log, line)
}

func (h *history) gate(g GateRead) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.gates = append(h.gates, g)
}

// observe keeps the observations at which the plan's index grew.
func (h *history) observe(o Observation) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if n := len(h.obs); n > 0 && h.obs[n-1].Index >= o.Index {
		return
	}
	h.obs = append(h.obs, o)
}

func (h *history) gateReads() []GateRead {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]GateRead(nil), h.gates...)
}

func (h *history) observations() []Observation {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]Observation(nil), h.obs...)
}

func (h *history) write(path string, audit []agent.AuditEntry, receipts []load.Receipt, samples []load.Sample) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("write history: %w", err)
	}
	defer f.Close()
	w := bufio.NewWriter(f)
	h.mu.Lock()
	defer h.mu.Unlock()
	ts := func(t time.Time) string { return fmt.Sprintf("%8.3fs", t.Sub(h.start).Seconds()) }
	fmt.Fprintln(w, "# timeline")
	for _, l := range h.notes {
		fmt.Fprintln(w, l)
	}
	fmt.Fprintln(w, "\n# audit log (the leader's)")
	for _, e := range audit {
		line := fmt.Sprintf("%s #%d %s %s", ts(e.At), e.Index, e.Node, e.Op)
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
		fmt.Fprintln(w, line)
	}
	fmt.Fprintln(w, "\n# observations (newest committed plan state seen)")
	for _, o := range h.obs {
		fmt.Fprintf(w, "%s index %d %s epoch %d\n", ts(o.At), o.Index, o.Phase, o.Epoch)
	}
	fmt.Fprintln(w, "\n# gate reads (invoke, complete, agent, answer)")
	for _, g := range h.gates {
		ans := fmt.Sprintf("open=%v phase=%s", g.Open, g.Phase)
		if g.Err != "" {
			ans = "error: " + g.Err
		} else if g.Phase == "" {
			ans += " (" + g.Reason + ")"
		}
		fmt.Fprintf(w, "%s %s %s %s\n", ts(g.Invoke), ts(g.Complete), g.Agent, ans)
	}
	fmt.Fprintln(w, "\n# acknowledged writes (writer, seq, acknowledged at, side)")
	for _, r := range receipts {
		fmt.Fprintf(w, "%d %d %s %s\n", r.Writer, r.Seq, ts(r.At), r.DSN)
	}
	fmt.Fprintf(w, "\n# prober: %d samples; those where a side took a write\n", len(samples))
	for _, s := range samples {
		if s.Blue || s.Green {
			fmt.Fprintf(w, "%s blue=%v green=%v\n", ts(s.At), s.Blue, s.Green)
		}
	}
	return w.Flush()
}
