package postgres

import (
	"context"
	"errors"

	"github.com/cutover/cutover/consistency"
	"github.com/cutover/cutover/engine"
)

// verifier runs the passes of consistency.Verifier on the pair's tables.
type verifier struct {
	pr *pair
	v  *consistency.Verifier
}

var _ engine.Verifier = (*verifier)(nil)

func (v *verifier) Online(ctx context.Context, d *consistency.DirtySet) (*consistency.Report, error) {
	return v.v.Online(ctx, v.pr.Tables(), waiter{v.pr}, d)
}

func (v *verifier) Refresh(ctx context.Context, d *consistency.DirtySet) (*consistency.Report, error) {
	return v.v.Refresh(ctx, v.pr.Tables(), waiter{v.pr}, d)
}

func (v *verifier) Dirty(ctx context.Context, d *consistency.DirtySet) (*consistency.Report, error) {
	return v.v.Dirty(ctx, v.pr.Tables(), d)
}

func (v *verifier) Full(ctx context.Context) (*consistency.Report, error) {
	return v.v.Full(ctx, v.pr.Tables())
}

func (v *verifier) Progress() consistency.Progress { return v.v.Progress() }

// waiter lets an online pass compare a chunk after green has applied past
// the position at which blue was read (consistency.PositionWaiter).
type waiter struct{ pr *pair }

func (w waiter) BluePosition(ctx context.Context) (string, error) {
	var lsn string
	err := w.pr.bluePool.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text").Scan(&lsn)
	return lsn, err
}

func (w waiter) WaitGreenApplied(ctx context.Context, pos string) error {
	w.pr.fwdMu.Lock()
	r := w.pr.fwd
	w.pr.fwdMu.Unlock()
	if r == nil {
		return errors.New("replication is not running")
	}
	return waitApplied(ctx, r, pos)
}
