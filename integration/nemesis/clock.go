package nemesis

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/cutover/cutover/agent"
)

// clockEnv names the file through which the agent's wall clock is shifted
// (internal/clock, build tag nemesis_clock).
const clockEnv = "CUTOVER_TEST_CLOCK_FILE"

// clockShift is a change of one agent's clock offset: the file holding it
// was replaced between Before and After (the test's clock), so the agent
// stamped with Off from some moment in that span on.
type clockShift struct {
	Before, After time.Time
	Off           time.Duration
}

// clocks shifts the agents' wall clocks and keeps every shift, to map the
// times the agents stamped (the audit log's) back onto the test's clock.
type clocks struct {
	dir string
	mu  sync.Mutex
	log map[string][]clockShift // by agent (node) id
}

func (c *clocks) path(id string) string { return filepath.Join(c.dir, "clock-"+id) }

// set makes agent id's wall clock run off by off from now on.
func (c *clocks) set(id string, off time.Duration) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	tmp := c.path(id) + ".tmp"
	before := time.Now()
	if err := os.WriteFile(tmp, []byte(off.String()+"\n"), 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, c.path(id)); err != nil {
		return err
	}
	if c.log == nil {
		c.log = map[string][]clockShift{}
	}
	c.log[id] = append(c.log[id], clockShift{Before: before, After: time.Now(), Off: off})
	return nil
}

func (c *clocks) shifts() map[string][]clockShift {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string][]clockShift{}
	for id, s := range c.log {
		out[id] = append([]clockShift(nil), s...)
	}
	return out
}

// orderSlack is how far back a proposal's time may be from the one
// before it in the log: two proposals in flight at once may be stamped in
// one order and committed in the other (by a descheduled goroutine on a
// loaded machine).
const orderSlack = 2 * time.Second

// trueTime maps a time stamped by an agent whose clock went through
// shifts back onto the test's clock. Each offset in force for a span of
// the test's clock gives a candidate (the stamp minus the offset) when
// that falls in the span. A backward jump makes the same stamps twice, so
// two spans may fit: then the earliest candidate not before notBefore
// (the previous entry's time, less orderSlack: the log is in the order
// of its proposals) is taken, else the earliest of all, so that a
// commit's interval (which starts at its proposal's stamp) can only get
// wider. ok is false when the stamp fits no span (the agent's clock was
// not what the log says).
func trueTime(at time.Time, shifts []clockShift, notBefore time.Time) (time.Time, bool) {
	if len(shifts) == 0 {
		return at, true
	}
	var fits []time.Time
	try := func(off time.Duration, from, to time.Time) {
		t := at.Add(-off)
		if (from.IsZero() || !t.Before(from)) && (to.IsZero() || !t.After(to)) {
			fits = append(fits, t)
		}
	}
	// Before the first shift the clock was right; offset i holds from
	// shift i's Before to shift i+1's After.
	try(0, time.Time{}, shifts[0].After)
	for i, s := range shifts {
		var to time.Time
		if i+1 < len(shifts) {
			to = shifts[i+1].After
		}
		try(s.Off, s.Before, to)
	}
	if len(fits) == 0 {
		return time.Time{}, false
	}
	slices.SortFunc(fits, func(a, b time.Time) int { return a.Compare(b) })
	for _, t := range fits {
		if !t.Before(notBefore) {
			return t, true
		}
	}
	return fits[0], true
}

// dejump returns the audit log with each entry's time on the test's clock
// (the proposing agent's shifts undone), and a note for each entry moved.
func dejump(audit []agent.AuditEntry, shifts map[string][]clockShift) ([]agent.AuditEntry, []string) {
	out := make([]agent.AuditEntry, len(audit))
	var notes []string
	var prev time.Time
	for i, e := range audit {
		out[i] = e
		if s := shifts[e.Node]; len(s) > 0 {
			var notBefore time.Time
			if !prev.IsZero() {
				notBefore = prev.Add(-orderSlack)
			}
			t, ok := trueTime(e.At, s, notBefore)
			switch {
			case !ok:
				notes = append(notes, fmt.Sprintf("audit #%d by %s stamped %s fits none of its clock's offsets: left as stamped", e.Index, e.Node, e.At.Format("15:04:05.000")))
			case !t.Equal(e.At):
				out[i].At = t
				notes = append(notes, fmt.Sprintf("audit #%d by %s stamped %s by its shifted clock: %s on the test's clock", e.Index, e.Node, e.At.Format("15:04:05.000"), t.Format("15:04:05.000")))
			}
		}
		prev = out[i].At
	}
	return out, notes
}
