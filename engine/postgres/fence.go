package postgres

import (
	"context"
	"time"

	"github.com/cutover/cutover/engine"
	"github.com/cutover/cutover/fencing"
	fpg "github.com/cutover/cutover/fencing/postgres"
)

// fencer adapts fpg.Fencer to engine.Fencer; its login fence's errors
// match the engine's sentinels too.
type fencer struct{ f *fpg.Fencer }

var (
	_ engine.Fencer        = fencer{}
	_ engine.HoldingFencer = fencer{}
	_ engine.LoginFencer   = fencer{}
)

func (f fencer) Fence(ctx context.Context, epoch uint64) error {
	return fenceErr(f.f.Fence(ctx, epoch))
}
func (f fencer) FenceDrain(ctx context.Context, epoch uint64, grace time.Duration) (fencing.Drained, error) {
	d, err := f.f.FenceDrain(ctx, epoch, grace)
	return d, fenceErr(err)
}
func (f fencer) Unfence(ctx context.Context, epoch uint64) error {
	return fenceErr(f.f.Unfence(ctx, epoch))
}
func (f fencer) State(ctx context.Context) (fencing.State, error) { return f.f.State(ctx) }
func (f fencer) Warm(ctx context.Context) error                   { return f.f.Warm(ctx) }
func (f fencer) WarmUnfence(ctx context.Context) error            { return f.f.WarmUnfence(ctx) }
func (f fencer) HeldBreaches(ctx context.Context) ([]fencing.Session, error) {
	return f.f.HeldBreaches(ctx)
}
func (f fencer) Release(ctx context.Context)         { f.f.Release(ctx) }
func (f fencer) CheckHold(ctx context.Context) error { return f.f.CheckHold(ctx) }
func (f fencer) ReleaseRefusingAll(ctx context.Context) ([]fencing.Session, error) {
	return f.f.ReleaseRefusingAll(ctx)
}
func (f fencer) ShiftToLogins(ctx context.Context, epoch uint64, settle time.Duration, otherDatabases bool) error {
	_, err := f.f.ShiftToLogins(ctx, epoch, settle, otherDatabases)
	return fenceErr(err)
}
