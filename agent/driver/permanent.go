package driver

import (
	"errors"
	"fmt"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/consistency"
	"github.com/cutover/cutover/engine"
	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/replication"
)

// Errors that retrying cannot heal. The leader aborts a plan whose Drive
// returns one of them (wrapped with agent.Permanent by Drive) instead of
// retrying it forever.
var (
	// errUnsupported: the plan names an engine the driver does not carry.
	errUnsupported = engine.ErrUnsupported
	// errSpec: the plan's sealed specification cannot be read.
	errSpec = errors.New("plan spec")
)

// permanentErrors lists the errors that retrying cannot heal: the plan's
// specification will not change, and neither will a schema the pre-check
// refused while the plan runs. Extend it with the sentinels of other
// packages (such as a verifier's "cannot verify this table") rather than
// matching error text.
var permanentErrors = []error{
	replication.ErrPrecheck,
	// A table the verifier cannot compare stays so: its type or engine
	// does not change while the plan runs.
	consistency.ErrUnverifiable,
	errUnsupported,
	errSpec,
	// fence.green: logins, and the agent's role may not alter the roles.
	engine.ErrLoginFenceUnavailable,
}

// permanent reports whether retrying cannot heal err.
func permanent(err error) bool {
	if err == nil {
		return false
	}
	for _, target := range permanentErrors {
		if errors.Is(err, target) {
			return true
		}
	}
	return false
}

// classify marks an error that retrying cannot heal for the leader (see
// agent.ErrPermanent); other errors are returned as they are.
func classify(err error) error {
	if permanent(err) {
		return agent.Permanent(err)
	}
	return err
}

// checkSpec refuses, before anything is opened, a plan this driver can
// never run.
func checkSpec(plan agent.Plan, engines engine.Registry) error {
	spec, err := plan.Spec()
	var missing *config.MissingEnvError
	if errors.As(err, &missing) {
		// Not permanent: the variable can be set, or another agent that has
		// it can lead. The plan waits, its driver status naming the variable.
		return err
	}
	if err != nil {
		return fmt.Errorf("%w: %v", errSpec, err)
	}
	for _, pc := range spec.Pairs {
		if _, err := engines.Lookup(pc.Engine); err != nil {
			return fmt.Errorf("pair %s: %w", pc.Name, err)
		}
	}
	return nil
}
