package fencing

import (
	"fmt"
	"time"
)

// LagSample is one measurement of how far the other side is behind.
type LagSample struct {
	Bytes int64
	Delay time.Duration
	At    time.Time
}

// LagGate decides whether lag has stayed under the plan's thresholds for the
// hold time, so that the outage never starts on a lagging replica. It is not
// safe for concurrent use.
type LagGate struct {
	MaxBytes int64
	MaxDelay time.Duration
	Hold     time.Duration
	// MaxAge is how old the latest sample may be when Ready is asked;
	// a stale sample means the probe stopped, which is not "no lag".
	MaxAge time.Duration
	// Dip, if set, also makes Ready wait, once the hold is met, for the
	// latest sample to be at or under Dip bytes. Under a steady load the
	// applier trails by up to a batch (measured with 32 writers on two
	// cores: 0-260 KB under a 256 KB threshold), and catch-up inside the
	// fence takes time in proportion to that backlog (roughly 4-6 MB/s
	// there while refused writers retry): fencing right after a dip starts
	// the outage with next to nothing to apply. The wait is before the
	// outage, and callers poll lag often (every few ms) to catch the dip.
	Dip int64

	under time.Time // when lag went under both thresholds; zero when over
	last  LagSample
}

// Observe records a sample.
func (g *LagGate) Observe(s LagSample) {
	g.last = s
	if s.Bytes <= g.MaxBytes && s.Delay <= g.MaxDelay {
		if g.under.IsZero() {
			g.under = s.At
		}
		return
	}
	g.under = time.Time{}
}

// Ready reports whether the fence may go up at now, and if not, why.
func (g *LagGate) Ready(now time.Time) (bool, string) {
	switch {
	case g.last.At.IsZero():
		return false, "no lag measured yet"
	case g.MaxAge > 0 && now.Sub(g.last.At) > g.MaxAge:
		return false, fmt.Sprintf("last lag sample is %s old (limit %s)", now.Sub(g.last.At).Round(time.Millisecond), g.MaxAge)
	case g.under.IsZero():
		return false, fmt.Sprintf("lag %d bytes / %s is over the threshold (%d bytes / %s)", g.last.Bytes, g.last.Delay.Round(time.Millisecond), g.MaxBytes, g.MaxDelay)
	case now.Sub(g.under) < g.Hold:
		return false, fmt.Sprintf("lag under threshold for %s, holding for %s", now.Sub(g.under).Round(time.Millisecond), g.Hold)
	case g.Dip > 0 && g.last.Bytes > g.Dip:
		return false, fmt.Sprintf("lag %d bytes: waiting for a dip to %d bytes", g.last.Bytes, g.Dip)
	}
	return true, ""
}
