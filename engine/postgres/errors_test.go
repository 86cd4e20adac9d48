package postgres

import (
	"errors"
	"fmt"
	"testing"

	"github.com/cutover/cutover/engine"
	fpg "github.com/cutover/cutover/fencing/postgres"
	"github.com/cutover/cutover/internal/pgscope"
)

// The driver decides on the engine's sentinels; the fence's and the
// scope's errors must match them and keep their own identity and text.
func TestTheEnginesErrorsMatchTheSeamsSentinelsWithTheirTextUnchanged(t *testing.T) {
	for _, tt := range []struct {
		err, own, seam error
		tag            func(error) error
	}{
		{fmt.Errorf("%w: permission denied", fpg.ErrLoginFenceUnavailable), fpg.ErrLoginFenceUnavailable, engine.ErrLoginFenceUnavailable, fenceErr},
		{fmt.Errorf("%w: other databases", fpg.ErrLoginFenceUnsafe), fpg.ErrLoginFenceUnsafe, engine.ErrLoginFenceUnsafe, fenceErr},
		{fmt.Errorf("%w: pid 42", fpg.ErrLoginBreach), fpg.ErrLoginBreach, engine.ErrLoginBreach, fenceErr},
		{fmt.Errorf("%w: table public.x does not exist", pgscope.ErrScope), pgscope.ErrScope, engine.ErrScope, scopeErr},
	} {
		got := tt.tag(tt.err)
		if !errors.Is(got, tt.own) || !errors.Is(got, tt.seam) || got.Error() != tt.err.Error() {
			t.Errorf("%v: is own %v, is seam's %v, text %q", tt.err, errors.Is(got, tt.own), errors.Is(got, tt.seam), got)
		}
	}
	if err := fenceErr(errors.New("connection refused")); errors.Is(err, engine.ErrLoginBreach) || err.Error() != "connection refused" {
		t.Errorf("another error: %v", err)
	}
	if fenceErr(nil) != nil {
		t.Error("fenceErr(nil) is not nil")
	}
}
