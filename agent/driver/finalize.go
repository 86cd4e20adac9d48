package driver

import (
	"context"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/engine"
	"github.com/cutover/cutover/internal/config"
)

// finalizePair releases a finished plan's slots and publications in both
// directions, and unfences blue of an aborted plan (an operator may abort a
// fenced plan through the API). Green stays fenced after an abort.
func finalizePair(ctx context.Context, d *Driver, spec config.Plan, pair config.Pair, plan agent.Plan) error {
	eng, err := d.opts.Engines.Lookup(pair.Engine)
	if err != nil {
		return err
	}
	return eng.Finalize(ctx, engine.PairOptions{Plan: spec, Pair: pair, Facts: plan.Facts, Logger: d.log, Registerer: d.opts.Registerer}, plan.Phase == agent.PhaseAborted, plan.Epoch)
}
