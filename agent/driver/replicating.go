package driver

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strings"

	"go.uber.org/zap"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/engine"
	"github.com/cutover/cutover/replication"
)

// copying: fence green against application writes (it must never take one
// before the flip), then copy and start streaming.
func (rt *planRT) copying(ctx context.Context, plan agent.Plan, p agent.Proposer, log *zap.Logger) error {
	epoch, err := p.Intent(ctx, plan.Name, "replicate", plan.Epoch)
	if err != nil {
		return err
	}
	if err := rt.forEach(func(pr *pairRT) error {
		if err := pr.greenFence.Fence(ctx, epoch); err != nil {
			return err
		}
		// Since when green has been fenced (an earlier plan's fence is
		// adopted, with its time): a copy may empty what only cutover
		// wrote there meanwhile (a retried plan).
		st, err := pr.greenFence.State(ctx)
		pr.greenFencedSince = st.Since
		return err
	}); err != nil {
		return rt.abort(ctx, plan.Name, p, epoch, "fence green: "+err.Error())
	}
	for _, pr := range rt.pairs {
		if err := rt.ensureForward(ctx, pr, epoch); err != nil {
			if isPrecheck(err) {
				return rt.abort(ctx, plan.Name, p, epoch, err.Error())
			}
			return err
		}
	}
	log.Info("copying")
	if err := rt.waitStreaming(ctx); err != nil {
		return err
	}
	facts := map[string]string{}
	for _, pr := range rt.pairs {
		maps.Copy(facts, pr.nameFacts())
		facts["copied_rows."+pr.cfg.Name] = fmt.Sprint(pr.fwd.Status().CopiedRows)
	}
	return p.Outcome(ctx, plan.Name, epoch, agent.Outcome{OK: true, To: agent.PhaseReplicating, Detail: "initial copy done; streaming", Reason: "initial copy done", Facts: facts})
}

func isPrecheck(err error) bool { return errors.Is(err, replication.ErrPrecheck) }

// streamingAndVerified makes sure every pair streams (a new leader resumes
// from green's stored position) and this term's online verification ran.
func (rt *planRT) streamingAndVerified(ctx context.Context, plan agent.Plan, p agent.Proposer) error {
	for _, pr := range rt.pairs {
		if err := rt.ensureForward(ctx, pr, plan.Epoch); err != nil {
			return err
		}
	}
	if err := rt.waitStreaming(ctx); err != nil {
		return err
	}
	return rt.online(ctx, plan, p)
}

// replicating: stream, verify online, and wait until lag has stayed under
// the plan's thresholds for its hold time.
func (rt *planRT) replicating(ctx context.Context, plan agent.Plan, p agent.Proposer, log *zap.Logger) error {
	if err := rt.streamingAndVerified(ctx, plan, p); err != nil {
		return err
	}
	if err := rt.lagGate(ctx, rt.spec.Lag.Hold.D(), log); err != nil {
		return err
	}
	if err := rt.sidesStillMatch(ctx, plan, p); err != nil {
		return err
	}
	_, err := p.Transition(ctx, plan.Name, agent.PhaseReady, plan.Epoch, "lag under threshold for the hold time; online verification clean; schemas match")
	return err
}

// sidesStillMatch checks, before ready and again before a window, that
// the schemas have not drifted (drift aborts the plan), that the scope is
// what the streams and fences cover, and that green once unfenced gives
// the application what blue gives it (a difference keeps the plan where
// it is, with the reason: grants can be fixed).
func (rt *planRT) sidesStillMatch(ctx context.Context, plan agent.Plan, p agent.Proposer) error {
	if err := rt.checkDrift(ctx); err != nil {
		if errors.Is(err, errDrift) {
			return rt.abort(ctx, plan.Name, p, plan.Epoch, err.Error())
		}
		return err // the schemas could not be read (a lost connection): retried
	}
	if err := rt.checkScope(ctx); err != nil {
		return err
	}
	return rt.privilegeParity(ctx, plan.Epoch)
}

func (rt *planRT) checkDrift(ctx context.Context) error {
	var problems []string
	for _, pr := range rt.pairs {
		sc, ok := pr.fwd.(engine.SchemaComparer)
		if !ok {
			continue // the engine's sides have no schemas
		}
		diffs, err := sc.CompareSchemas(ctx)
		if err != nil {
			return fmt.Errorf("compare schemas of %s: %w", pr.cfg.Name, err)
		}
		for _, d := range diffs {
			problems = append(problems, pr.cfg.Name+": "+d.String())
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("%w: %s", errDrift, strings.Join(problems, "; "))
	}
	return nil
}

// errDrift means the schemas differ: the plan aborts. Failing to read them
// is retried.
var errDrift = errors.New("schema drift")

// privilegeParity fails, listing the differences, unless every fenced role
// will have on green once unfenced what it has on blue: else the flip
// sends the application to a green it cannot write. Green is fenced again
// first, so that what an operator granted there to fix a difference is
// saved for the unfence, not left for the application to write with.
func (rt *planRT) privilegeParity(ctx context.Context, epoch uint64) error {
	return rt.forEach(func(pr *pairRT) error {
		if err := pr.greenFence.Fence(ctx, epoch); err != nil {
			return err
		}
		pc, ok := pr.pair.(engine.PrivilegeChecker)
		if !ok {
			return nil // the engine's fence has no privileges to compare
		}
		diffs, err := pc.PrivilegeParity(ctx)
		if err != nil {
			return fmt.Errorf("privilege parity: %w", err)
		}
		if len(diffs) > 0 {
			return fmt.Errorf("the application's privileges on green once unfenced differ from blue's (grant them on green): %s", strings.Join(diffs, "; "))
		}
		return nil
	})
}
