// Package postgres is the PostgreSQL engine of the plan driver (package
// engine): it adapts fencing/postgres (the fence), replication/postgres
// (the streams), consistency/postgres (verification) and internal/pgscope
// (the scope) to the engine seam, and owns the connections they share.
//
// Everything the driver used to do with PostgreSQL itself lives here:
// reading green's WAL position for the reverse stream's start, waiting for
// green to apply past a position of blue (the online verification's
// PositionWaiter), resolving the scope and mapping a partition's changes
// to its root.
package postgres

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/cutover/cutover/engine"
	"github.com/cutover/cutover/fencing"
	fpg "github.com/cutover/cutover/fencing/postgres"
	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/internal/pgscope"
	"github.com/cutover/cutover/internal/redact"
	rpg "github.com/cutover/cutover/replication/postgres"
)

// Engine is the PostgreSQL engine.
type Engine struct{}

var (
	_ engine.Engine        = Engine{}
	_ engine.Cleaner       = Engine{}
	_ engine.TableResolver = Engine{}
)

// Open implements engine.Engine.
func (Engine) Open(ctx context.Context, o engine.PairOptions) (engine.Pair, error) {
	pc := o.Pair
	log := o.Logger
	if log == nil {
		log = zap.NewNop()
	}
	pr := &pair{opts: o, log: log, cfg: pc}
	pr.fwdSlot, pr.revSlot = rpg.PlanNames(o.Plan.Name, pc.Name, o.Facts)
	var err error
	if pr.bluePool, err = OpenPool(ctx, pc.Blue.DSN, "blue", 6); err != nil {
		pr.Close()
		return nil, err
	}
	if pr.greenPool, err = OpenPool(ctx, pc.Green.DSN, "green", 6); err != nil {
		pr.Close()
		return nil, err
	}
	set, err := pgscope.Resolve(ctx, pr.bluePool, pc.Scope)
	if err != nil {
		pr.Close()
		return nil, fmt.Errorf("blue: %w", scopeErr(err))
	}
	pr.setScope(set)
	flog := log.With(zap.String("plan", o.Plan.Name))
	// Blue's fenced writers wait on the drain's lock until the gate
	// opens instead of retrying against the fence, which on a busy
	// server takes the CPU the window's steps need; the hold never
	// outlives the window (the server ends it by itself if the agent
	// goes away). The fences' own pools: their sessions are warmed for
	// the fence (fpg.Fencer.Warm) and never busy with other work.
	if pr.blueFencePool, err = OpenPool(ctx, pc.Blue.DSN, "blue", 3); err != nil {
		pr.Close()
		return nil, err
	}
	if pr.greenFencePool, err = OpenPool(ctx, pc.Green.DSN, "green", 3); err != nil {
		pr.Close()
		return nil, err
	}
	hold := maxWindow(o.Plan)
	pr.blueFence = fpg.New(pr.blueFencePool, fpg.Options{Plan: o.Plan.Name, Pair: pc.Name, Tables: pr.fenceTables, Roles: pc.FenceRoles, Hold: hold, WriteProxy: o.Plan.Fence.BlueMode(), Logger: flog.With(zap.String("side", "blue"))})
	// Green's, the same for the way back (rollback).
	pr.greenFence = fpg.New(pr.greenFencePool, fpg.Options{Plan: o.Plan.Name, Pair: pc.Name, Tables: pr.fenceTables, Roles: pc.FenceRoles, Hold: hold, Logger: flog.With(zap.String("side", "green"))})
	// Everything that can happen before the fence happens here.
	if err := pr.blueFence.Prepare(ctx); err != nil {
		pr.Close()
		return nil, fmt.Errorf("blue: %w", err)
	}
	if err := pr.greenFence.Prepare(ctx); err != nil {
		pr.Close()
		return nil, fmt.Errorf("green: %w", err)
	}
	return pr, nil
}

// Finalize implements engine.Engine: it drops the slots and publications
// of both directions and, for an aborted plan, unfences blue.
func (Engine) Finalize(ctx context.Context, o engine.PairOptions, unfenceBlue bool, epoch uint64) error {
	log := o.Logger
	if log == nil {
		log = zap.NewNop()
	}
	var errs []error
	// Both directions are tried, whatever the first's outcome.
	if err := cleanup(ctx, o, log, func(rpg.Dropped, error) bool { return true }); err != nil {
		errs = append(errs, err)
	}
	if unfenceBlue {
		if err := unfenceSide(ctx, log, o.Plan, o.Pair, "blue", o.Pair.Blue.DSN, epoch); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Cleanup implements engine.Cleaner: it drops the pair's slots and
// publications of both directions (the names recorded in the plan's
// facts, else the current scheme), forward first, and stops at the first
// error.
func (Engine) Cleanup(ctx context.Context, o engine.PairOptions) ([]string, error) {
	log := o.Logger
	if log == nil {
		log = zap.NewNop()
	}
	var dropped []string
	err := cleanup(ctx, o, log, func(d rpg.Dropped, err error) bool {
		dropped = append(append(dropped, d.Slots...), d.Publications...)
		return err == nil
	})
	return dropped, err
}

// cleanup drops each direction's slot and publication, telling each
// outcome to next, which says whether to go on.
func cleanup(ctx context.Context, o engine.PairOptions, log *zap.Logger, next func(rpg.Dropped, error) bool) error {
	var errs []error
	fwd, rev := rpg.PlanNames(o.Plan.Name, o.Pair.Name, o.Facts)
	for _, c := range []struct {
		pair config.Pair
		name string
	}{{o.Pair, fwd}, {ReversePair(o.Pair), rev}} {
		d, err := rpg.Cleanup(ctx, o.Plan.Name, c.pair, c.name, log)
		if err != nil {
			errs = append(errs, err)
		}
		if !next(d, err) {
			break
		}
	}
	return errors.Join(errs...)
}

// VerifyTables implements engine.TableResolver: the pair's scope resolved
// on blue by the rule the plan uses (internal/pgscope: each partitioned
// table as a whole).
func (Engine) VerifyTables(ctx context.Context, p config.Pair) ([]string, error) {
	conn, err := pgx.Connect(ctx, p.Blue.DSN.Reveal())
	if err != nil {
		return nil, fmt.Errorf("blue: connect: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	set, err := pgscope.Resolve(ctx, conn, p.Scope)
	if err != nil {
		return nil, fmt.Errorf("pair %s: blue: %w", p.Name, scopeErr(err))
	}
	return pgscope.Names(set.Roots()), nil
}

// ReversePair is the pair the reverse stream runs on: green to blue.
func ReversePair(p config.Pair) config.Pair {
	return config.Pair{Name: p.Name + "-rev", Engine: p.Engine, Blue: p.Green, Green: p.Blue, Scope: p.Scope, FenceRoles: p.FenceRoles}
}

func unfenceSide(ctx context.Context, log *zap.Logger, spec config.Plan, pair config.Pair, side string, dsn config.DSN, epoch uint64) error {
	pool, err := OpenPool(ctx, dsn, side, 6)
	if err != nil {
		return err
	}
	defer pool.Close()
	tables, err := FenceTables(ctx, pool, pair.Scope)
	if err != nil {
		return fmt.Errorf("%s: %w", side, err)
	}
	f := fpg.New(pool, fpg.Options{Plan: spec.Name, Pair: pair.Name, Tables: tables, Roles: pair.FenceRoles, Logger: log.With(zap.String("side", side))})
	if err := f.Prepare(ctx); err != nil {
		return fmt.Errorf("%s: %w", side, err)
	}
	if err := f.Unfence(ctx, epoch); err != nil && !errors.Is(err, fencing.ErrStaleEpoch) {
		return fmt.Errorf("%s: %w", side, err)
	}
	return nil
}

// OpenPool is the engine's one pool opener: every error it returns is
// redacted (internal/redact) and names the side, never the DSN's secret.
func OpenPool(ctx context.Context, dsn config.DSN, side string, maxConns int32) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(dsn.Reveal())
	if err != nil {
		return nil, fmt.Errorf("%s: %s", side, redact.Text(err.Error()))
	}
	cfg.MaxConns = maxConns
	cfg.ConnConfig.RuntimeParams["application_name"] = "cutover-driver"
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("%s: %s", side, redact.Text(err.Error()))
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("%s: %s", side, redact.Text(err.Error()))
	}
	return pool, nil
}

// FenceTables lists every table of a pair's scope on the server behind
// pool, partitions included, as quoted identifiers: what a fence revokes
// and locks.
func FenceTables(ctx context.Context, pool *pgxpool.Pool, scope config.Scope) ([]string, error) {
	set, err := pgscope.Resolve(ctx, pool, scope)
	if err != nil {
		return nil, err
	}
	return pgscope.Idents(set.All()), nil
}

func maxWindow(spec config.Plan) time.Duration {
	if w := spec.Fence.MaxFenceWindow.D(); w > 0 {
		return w
	}
	return config.DefaultMaxFenceWindow
}

// tagged is err, matching sentinel too (errors.Is), with err's text.
type tagged struct{ err, sentinel error }

func (t tagged) Error() string   { return t.err.Error() }
func (t tagged) Unwrap() []error { return []error{t.err, t.sentinel} }

// scopeErr tags pgscope's scope errors with engine.ErrScope.
func scopeErr(err error) error {
	if errors.Is(err, pgscope.ErrScope) {
		return tagged{err, engine.ErrScope}
	}
	return err
}

// fenceErr tags the login fence's errors with the engine's.
func fenceErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, fpg.ErrLoginFenceUnavailable):
		return tagged{err, engine.ErrLoginFenceUnavailable}
	case errors.Is(err, fpg.ErrLoginFenceUnsafe):
		return tagged{err, engine.ErrLoginFenceUnsafe}
	case errors.Is(err, fpg.ErrLoginBreach):
		return tagged{err, engine.ErrLoginBreach}
	}
	return err
}
