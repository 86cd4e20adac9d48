package main

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/cutover/cutover/internal/pgscope"
)

// fromConfig fills the DSNs and the tables of a verify that names a pair of
// a config (--config, --plan, --pair): what is not given on the command
// line comes from the pair, the tables from its scope resolved on blue by
// the rule the plan uses (internal/pgscope: each partitioned table as a
// whole), so that the check covers exactly what the plan moves.
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
	conn, err := pgx.Connect(ctx, f.blue)
	if err != nil {
		return withCode(exitError, fmt.Errorf("verify: blue: connect: %w", err))
	}
	defer conn.Close(context.WithoutCancel(ctx))
	set, err := pgscope.Resolve(ctx, conn, pair.Scope)
	if err != nil {
		return withCode(exitError, fmt.Errorf("verify: pair %s: blue: %w", pair.Name, err))
	}
	f.tables = pgscope.Names(set.Roots())
	return nil
}
