package driver

import (
	"context"
	"fmt"
	"strings"

	"go.uber.org/zap"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/consistency"
	"github.com/cutover/cutover/engine"
	"github.com/cutover/cutover/internal/clock"
	"github.com/cutover/cutover/internal/config"
)

// online runs the online verification pass once per term.
func (rt *planRT) online(ctx context.Context, plan agent.Plan, p agent.Proposer) error {
	if rt.onlineClean || !verifyEnabled(rt.spec) {
		return nil
	}
	if err := rt.d.fault("before online verification"); err != nil {
		return err
	}
	for _, pr := range rt.pairs {
		rep, err := rt.verify(ctx, pr, consistency.PassOnline)
		if err != nil {
			return err
		}
		if rep.Verdict == consistency.Different {
			return rt.abort(ctx, plan.Name, p, plan.Epoch, fmt.Sprintf("online verification of %s found %s", pr.cfg.Name, describe(rep)))
		}
	}
	rt.onlineClean = true
	return nil
}

// refresh re-checks online what the dirty sets hold, up to three times
// while that keeps shrinking them, so that the pass inside the fence is
// small.
func (rt *planRT) refresh(ctx context.Context, plan agent.Plan, p agent.Proposer, log *zap.Logger) error {
	if !verifyEnabled(rt.spec) {
		return nil
	}
	for _, pr := range rt.pairs {
		v, err := rt.verifier(ctx, pr)
		if err != nil {
			return err
		}
		for i := 0; i < 3; i++ {
			before := pr.dirty.Stats()
			rep, err := v.Refresh(ctx, pr.dirty)
			if err != nil {
				return err
			}
			if rep.Verdict == consistency.Different {
				return rt.abort(ctx, plan.Name, p, plan.Epoch, fmt.Sprintf("online re-check of %s found %s", pr.cfg.Name, describe(rep)))
			}
			after := pr.dirty.Stats()
			log.Debug("online re-check", zap.String("pair", pr.cfg.Name), zap.Int("keys_before", before.Keys), zap.Int("keys_after", after.Keys), zap.Int("ranges_after", after.Ranges))
			if after.Ranges == 0 && after.WholeTables == 0 && after.Keys*2 >= before.Keys {
				break
			}
		}
	}
	return nil
}

func verifyEnabled(spec config.Plan) bool { return spec.Verify.Enabled == nil || *spec.Verify.Enabled }

// verifier returns the pair's verifier, opened by its engine on first use
// and kept for the term, so that the pass inside the fence neither
// connects nor reads the catalogs again.
func (rt *planRT) verifier(ctx context.Context, pr *pairRT) (engine.Verifier, error) {
	if pr.verifier != nil {
		return pr.verifier, nil
	}
	v, err := pr.pair.Verifier(ctx)
	if err != nil {
		return nil, err
	}
	pr.live.Lock()
	pr.verifier = v
	pr.live.Unlock()
	return v, nil
}

// verify runs one verification pass on a pair and writes its report.
func (rt *planRT) verify(ctx context.Context, pr *pairRT, pass consistency.Pass) (*consistency.Report, error) {
	v, err := rt.verifier(ctx, pr)
	if err != nil {
		return nil, err
	}
	var rep *consistency.Report
	switch pass {
	case consistency.PassOnline:
		rep, err = v.Online(ctx, pr.dirty)
	case consistency.PassDirty:
		rep, err = v.Dirty(ctx, pr.dirty)
	default:
		rep, err = v.Full(ctx)
	}
	if rep != nil {
		name := fmt.Sprintf("%s-%s-%s-%s", rt.spec.Name, pr.cfg.Name, pass, clock.Now().UTC().Format("20060102T150405.000"))
		write := func() {
			if _, werr := rt.d.writeReport(name, func(j, h string) error { return writeReportFiles(rep, j, h) }); werr != nil {
				rt.d.log.Warn("write consistency report", zap.Error(werr))
			}
		}
		if pass == consistency.PassDirty {
			// Inside the fence: the report is written off the outage's path.
			rt.bgWrite(write)
		} else {
			write()
		}
	}
	return rep, err
}

func describe(rep *consistency.Report) string {
	var parts []string
	for _, t := range rep.Tables {
		for _, d := range t.Differences {
			parts = append(parts, fmt.Sprintf("%s %s key %v", t.Name, d.Kind, d.Key))
			if len(parts) >= 5 {
				break
			}
		}
	}
	if len(parts) == 0 {
		return string(rep.Verdict)
	}
	return string(rep.Verdict) + ": " + strings.Join(parts, "; ")
}
