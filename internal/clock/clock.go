// Package clock is the agent's wall clock: the one read for times that are
// recorded or compared across processes and restarts (the audit log's
// timestamps, the flip's time that the rollback window runs from, the
// fence's start that the write outage is measured from).
//
// Durations measured within one process (the fence window, leases,
// timeouts, step timings) use Go's monotonic clock (time.Now and
// time.Since on a value that carries a monotonic reading) and do not go
// through this package: a jump of the wall clock cannot touch them.
//
// In every product build Now is time.Now. The fault suite
// (integration/nemesis) builds the agent with the tag nemesis_clock, in
// which Now is the system's wall clock shifted by an offset that the suite
// changes while the agent runs, to jump the clock forward or backward; see
// shifted.go.
package clock

import "time"

// Since is the wall-clock time elapsed since t: Now().Sub(t). For t without
// a monotonic reading (parsed, or from time.Unix) it follows the wall
// clock, jumps included, as time.Since does.
func Since(t time.Time) time.Duration { return Now().Sub(t) }

// Until is the wall-clock time until t: t.Sub(Now()).
func Until(t time.Time) time.Duration { return t.Sub(Now()) }
