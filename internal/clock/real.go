//go:build !nemesis_clock

package clock

import "time"

// Now is the current time: time.Now.
func Now() time.Time { return time.Now() }
