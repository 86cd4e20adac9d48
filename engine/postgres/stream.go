package postgres

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/cutover/cutover/engine"
	"github.com/cutover/cutover/replication"
	rpg "github.com/cutover/cutover/replication/postgres"
)

// stream adapts a replicator to engine.Stream. Its positions are
// pglogrepl.LSN values.
type stream struct{ r *rpg.Replicator }

var (
	_ engine.Stream         = (*stream)(nil)
	_ engine.SequenceSyncer = (*stream)(nil)
	_ engine.SchemaComparer = (*stream)(nil)
)

func (s *stream) Start(ctx context.Context) error { return s.r.Start(ctx) }
func (s *stream) Stop(ctx context.Context) error  { return s.r.Stop(ctx) }
func (s *stream) Done() <-chan struct{}           { return s.r.Done() }
func (s *stream) Err() error                      { return s.r.Err() }
func (s *stream) Cleanup(ctx context.Context) error {
	return s.r.Cleanup(ctx)
}

func (s *stream) Status() engine.Status {
	st := s.r.Status()
	return engine.Status{Phase: string(st.Phase), Streaming: st.Phase == rpg.PhaseStreaming, CopiedRows: st.Copy.Rows, Lag: st.Lag}
}

func (s *stream) Lag(ctx context.Context) (replication.Lag, error) { return s.r.Lag(ctx) }

func (s *stream) WaitMarker(ctx context.Context, nonce string) (engine.Position, error) {
	lsn, err := s.r.WaitMarker(ctx, nonce)
	if err != nil {
		return nil, err
	}
	return lsn, nil
}

func (s *stream) ChangesAfter(pos engine.Position) ([]replication.Change, bool) {
	lsn, _ := pos.(pglogrepl.LSN) // nil (no marker seen): everything recorded
	return s.r.ChangesAfter(lsn)
}

func (s *stream) ResolveSequences(ctx context.Context) error { return s.r.ResolveSequences(ctx) }
func (s *stream) SyncSequences(ctx context.Context) error    { return s.r.SyncSequences(ctx) }
func (s *stream) CompareSchemas(ctx context.Context) ([]replication.Difference, error) {
	return s.r.CompareSchemas(ctx)
}

// waitApplied waits until r has applied on green past pos, a position of
// blue. The heartbeat commits on blue every few hundred ms, so the
// applied position passes any position blue had.
func waitApplied(ctx context.Context, r *rpg.Replicator, pos string) error {
	want, err := pglogrepl.ParseLSN(pos)
	if err != nil {
		return err
	}
	for r.Applied() < want {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-r.Done():
			return fmt.Errorf("replication stopped: %v", r.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
	return nil
}

// prepared is a reverse stream whose slot exists (PrepareReverse): Start
// is the only step left.
type prepared struct {
	pr *pair
	r  *rpg.Replicator
}

// Start streams from green's position now, with everything blue wrote
// applied (caught up) and nothing of the application yet (green is still
// fenced). ctx bounds the start; run is the stream's lifetime.
func (p *prepared) Start(ctx, run context.Context, epoch uint64) (engine.Stream, error) {
	r := p.r
	if err := r.SetEpoch(epoch); err != nil {
		r.Stop(ctx)
		return nil, err
	}
	var pos string
	if err := p.pr.greenPool.QueryRow(ctx, `SELECT pg_current_wal_lsn()::text`).Scan(&pos); err != nil {
		r.Stop(ctx)
		return nil, fmt.Errorf("green: read WAL position: %w", err)
	}
	lsn, err := pglogrepl.ParseLSN(pos)
	if err != nil {
		r.Stop(ctx)
		return nil, err
	}
	if err := r.StartAt(run, lsn); err != nil {
		return nil, fmt.Errorf("start reverse replication of %s: %w", p.pr.cfg.Name, err)
	}
	return &stream{r: r}, nil
}

func (p *prepared) Stop(ctx context.Context) error { return p.r.Stop(ctx) }
