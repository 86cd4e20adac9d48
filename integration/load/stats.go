package load

import (
	"slices"
	"time"
)

// MS is d in milliseconds, to the microsecond, for benchmark metrics.
func MS(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// PercentileMS is the p-th percentile of ds in milliseconds, by nearest
// rank rounded up: with fewer than 100 samples p99 is the worst. 0 when ds
// is empty.
func PercentileMS(ds []time.Duration, p float64) float64 {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return MS(s[min(len(s)-1, int(p*float64(len(s))))])
}
