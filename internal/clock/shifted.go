//go:build nemesis_clock

package clock

import (
	"os"
	"strings"
	"time"
)

// OffsetFileEnv names the environment variable holding the path of the
// file that shifts this process's wall clock (tag nemesis_clock only).
const OffsetFileEnv = "CUTOVER_TEST_CLOCK_FILE"

// Now is the system's wall clock shifted by the duration (time.ParseDuration:
// "90s", "-2m") in the file named by CUTOVER_TEST_CLOCK_FILE; no file, or
// one that does not parse, is no shift. The file is read on every call, so
// a jump takes effect the moment the suite replaces the file. The result
// carries no monotonic reading: like a real wall clock after a jump, a
// duration computed from it follows the jump.
func Now() time.Time {
	now := time.Now().Round(0)
	path := os.Getenv(OffsetFileEnv)
	if path == "" {
		return now
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return now
	}
	d, err := time.ParseDuration(strings.TrimSpace(string(b)))
	if err != nil {
		return now
	}
	return now.Add(d)
}
