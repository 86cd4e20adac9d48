package driver

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/internal/pgscope"
	rpg "github.com/cutover/cutover/replication/postgres"
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
		set, err := pgscope.Resolve(ctx, pr.bluePool, pr.cfg.Scope)
		if err != nil {
			return fmt.Errorf("pair %s: blue: %w", pr.cfg.Name, err)
		}
		fwd := pr.fwdRunning()
		if fwd == nil {
			return fmt.Errorf("pair %s: replication is not running", pr.cfg.Name)
		}
		published, err := fwd.PublishedTables(ctx)
		if err != nil {
			return fmt.Errorf("pair %s: %w", pr.cfg.Name, err)
		}
		pr.scopeMu.Lock()
		fenced := slices.Clone(pr.fenceTables)
		pr.scopeMu.Unlock()
		if d := setDiff("published", pgscope.Idents(set.Leaves()), published); d != "" {
			problems = append(problems, fmt.Sprintf("pair %s: %s", pr.cfg.Name, d))
		}
		if d := setDiff("fenced", pgscope.Idents(set.All()), fenced); d != "" {
			problems = append(problems, fmt.Sprintf("pair %s: %s", pr.cfg.Name, d))
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("%w: %s; drop or exclude (scope.exclude_tables) what was added, or abort and start a new plan that covers it", errScopeChanged, strings.Join(problems, "; "))
	}
	return nil
}

// setDiff says how got differs from want, the tables in scope now.
func setDiff(what string, want, got []string) string {
	var missing, extra []string
	for _, t := range want {
		if !slices.Contains(got, t) {
			missing = append(missing, t)
		}
	}
	for _, t := range got {
		if !slices.Contains(want, t) {
			extra = append(extra, t)
		}
	}
	var parts []string
	if len(missing) > 0 {
		parts = append(parts, fmt.Sprintf("in scope but not %s: %s", what, strings.Join(missing, ", ")))
	}
	if len(extra) > 0 {
		parts = append(parts, fmt.Sprintf("%s but no longer in scope: %s", what, strings.Join(extra, ", ")))
	}
	return strings.Join(parts, "; ")
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
	return rpg.NameFacts(pr.cfg.Name, pr.fwdSlot, pr.revSlot)
}
