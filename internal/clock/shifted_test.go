//go:build nemesis_clock

package clock

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// The suite's build: the file's offset shifts the wall clock at once, both
// ways, and Since follows the jump.
func TestTheOffsetFileJumpsTheClock(t *testing.T) {
	path := filepath.Join(t.TempDir(), "offset")
	t.Setenv(OffsetFileEnv, path)
	start := Now()
	for _, off := range []time.Duration{90 * time.Second, -2 * time.Minute} {
		if err := os.WriteFile(path, []byte(off.String()+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		got := Since(start)
		if got < off || got > off+10*time.Second {
			t.Fatalf("offset %s: Since(start) = %s", off, got)
		}
	}
	os.WriteFile(path, []byte("nonsense"), 0o644)
	if d := Since(start); d < 0 || d > 10*time.Second {
		t.Fatalf("an unreadable offset shifted the clock: %s", d)
	}
}
