package engine

import (
	"errors"
	"testing"

	"github.com/cutover/cutover/internal/config"
)

func TestARegistryRefusesAnEngineItDoesNotCarryNamingThoseItDoes(t *testing.T) {
	r := Registry{config.Postgres: nil}
	if _, err := r.Lookup(config.Postgres); err != nil {
		t.Fatalf("postgres: %v", err)
	}
	_, err := r.Lookup(config.Redis)
	if !errors.Is(err, ErrUnsupported) {
		t.Fatalf("redis: err = %v, want ErrUnsupported", err)
	}
	// The text the driver's abort reason carried before the registry.
	if want := "engine redis: not supported by the plan driver (it carries postgres pairs only)"; err.Error() != want {
		t.Errorf("redis: %q, want %q", err, want)
	}
}
