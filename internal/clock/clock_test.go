package clock

import (
	"testing"
	"time"
)

// In a product build the clock is the system's: no file or environment
// shifts it.
func TestNowIsTheSystemClock(t *testing.T) {
	t.Setenv("CUTOVER_TEST_CLOCK_FILE", "/nonexistent")
	before := time.Now()
	now := Now()
	after := time.Now()
	if now.Before(before.Round(0)) || now.After(after.Round(0)) {
		t.Fatalf("Now %s not between %s and %s", now, before, after)
	}
	if d := Since(before); d < 0 || d > time.Minute {
		t.Fatalf("Since %s", d)
	}
}
