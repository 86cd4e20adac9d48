package driver

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/engine"
)

// errScopeChanged: the tables in scope are no longer the ones the plan
// publishes and fences (a table created or dropped during replication).
var errScopeChanged = errors.New("scope changed during replication")

// checkScope re-resolves each pair's scope on blue and compares it with
// what the forward publication carries and what the fences revoke: the
// three must be one set before the fence, or writes to a table outside
// one of them would be lost at the flip (never replicated) or land on
// blue after the fence (never fenced). A difference is an error naming
// the tables; the plan stays where it is until the operator resolves it
// (drop the table, or exclude it, or restart the plan).
func (rt *planRT) checkScope(ctx context.Context) error {
	var problems []string
	for _, pr := range rt.pairs {
		sc, ok := pr.pair.(engine.ScopeChecker)
		if !ok {
			continue // the engine's scope cannot change under it
		}
		fwd := pr.fwdRunning()
		if fwd == nil {
			return fmt.Errorf("pair %s: replication is not running", pr.cfg.Name)
		}
		ps, err := sc.CheckScope(ctx, fwd)
		if err != nil {
			return fmt.Errorf("pair %s: %w", pr.cfg.Name, err)
		}
		for _, d := range ps {
			problems = append(problems, fmt.Sprintf("pair %s: %s", pr.cfg.Name, d))
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("%w: %s; drop or exclude (scope.exclude_tables) what was added, or abort and start a new plan that covers it", errScopeChanged, strings.Join(problems, "; "))
	}
	return nil
}

// abortBadScope aborts a plan whose scope cannot be resolved before it
// changed anything (a table named in scope.tables that does not exist, or
// nothing in scope): retrying cannot heal that.
func abortBadScope(ctx context.Context, plan agent.Plan, p agent.Proposer, cause error) error {
	e, err := p.Intent(ctx, plan.Name, "abort", 0)
	if err != nil {
		return err
	}
	return p.Outcome(ctx, plan.Name, e, agent.Outcome{OK: true, To: agent.PhaseAborted, Detail: "the scope cannot be resolved on blue", Reason: cause.Error()})
}

// nameFacts records the pair's names in the plan.
func (pr *pairRT) nameFacts() map[string]string {
	return pr.pair.NameFacts()
}
