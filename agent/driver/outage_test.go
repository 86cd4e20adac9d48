package driver

import (
	"testing"
	"time"
)

// The leader that fenced measures the outage on the monotonic clock: a wall
// clock that jumped since (here: the fence's wall time three minutes off)
// does not enter the figure. Another leader's figure comes from the fact.
func TestTheWriteOutageOfTheLeaderThatFencedIgnoresTheWallClock(t *testing.T) {
	m := &fenceMark{mono: time.Now().Add(-50 * time.Millisecond), wall: time.Now().Add(-3 * time.Minute)}
	got, ok := writeOutage(m, m.wall.Format(time.RFC3339Nano))
	if !ok || got < 50*time.Millisecond || got > 5*time.Second {
		t.Fatalf("outage %v (ok %v), want about 50ms", got, ok)
	}
	fact := time.Now().Add(-2 * time.Second).UTC().Format(time.RFC3339Nano)
	got, ok = writeOutage(nil, fact)
	if !ok || got < 2*time.Second || got > 10*time.Second {
		t.Fatalf("outage from the fact %v (ok %v), want about 2s", got, ok)
	}
	if _, ok := writeOutage(nil, ""); ok {
		t.Fatal("an outage without a fence start or a fact")
	}
}
