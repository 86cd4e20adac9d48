package main

import (
	"context"
	"fmt"

	"github.com/cutover/cutover/engine"
	"github.com/cutover/cutover/internal/config"
)

// fromConfig fills the DSNs and the tables of a verify that names a pair of
// a config (--config, --plan, --pair): what is not given on the command
// line comes from the pair, the tables from its scope resolved on blue by
// the rule the plan uses (its engine's engine.TableResolver: each
// partitioned table as a whole), so that the check covers exactly what the plan moves.
func (f *verifyFlags) fromConfig(ctx context.Context, g *globals) error {
	if f.config == "" {
		return nil
	}
	if ctx == nil {
		ctx = context.Background()
	}
	loaded, err := loadConfig(g, f.config)
	if err != nil {
		return err
	}
	_, pair, err := findPair(loaded.Config, f.plan, f.pair)
	if err != nil {
		return err
	}
	if f.blue == "" {
		f.blue = pair.Blue.DSN.Reveal()
	}
	if f.green == "" {
		f.green = pair.Green.DSN.Reveal()
	}
	if len(f.tables) > 0 {
		return nil
	}
	eng, err := engines.Lookup(pair.Engine)
	if err != nil {
		return withCode(exitError, fmt.Errorf("verify: pair %s: %w", pair.Name, err))
	}
	tr, ok := eng.(engine.TableResolver)
	if !ok {
		return withCode(exitError, fmt.Errorf("verify: pair %s: engine %s has no tables to resolve: give --tables", pair.Name, pair.Engine))
	}
	// Resolved on the DSN verify compares (--blue, else the pair's).
	p := pair
	p.Blue.DSN = config.DSN(f.blue)
	tables, err := tr.VerifyTables(ctx, p)
	if err != nil {
		return withCode(exitError, fmt.Errorf("verify: %w", err))
	}
	f.tables = tables
	return nil
}
