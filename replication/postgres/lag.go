package postgres

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
	"go.uber.org/zap"

	"github.com/cutover/cutover/replication"
)

// heartbeats remembers the heartbeats this replicator wrote on blue that
// green has not applied yet, so that lag in seconds is "how long since
// green stopped being current" rather than the age of a row, which would
// never read below the heartbeat interval. Guarded by Replicator.mu.
type heartbeats struct {
	pending    []heartbeat // written, not yet applied, oldest first
	appliedSeq int64
	appliedAt  time.Time // when the newest applied heartbeat was written
	wroteAny   bool
}

type heartbeat struct {
	seq int64
	at  time.Time // local clock, taken before the write was sent
}

// maxPendingHeartbeats bounds memory while replication is stuck: at 4 a
// second that is over 6 hours, and the oldest entry (the one that matters)
// is kept.
const maxPendingHeartbeats = 100000

func (h *heartbeats) wrote(seq int64, at time.Time) {
	h.wroteAny = true
	if seq <= h.appliedSeq {
		return
	}
	if len(h.pending) >= maxPendingHeartbeats {
		h.pending = append(h.pending[:1], h.pending[2:]...)
	}
	h.pending = append(h.pending, heartbeat{seq, at})
}

func (h *heartbeats) applied(seq int64) {
	if seq <= h.appliedSeq {
		return
	}
	h.appliedSeq = seq
	i := 0
	for i < len(h.pending) && h.pending[i].seq <= seq {
		h.appliedAt = h.pending[i].at
		i++
	}
	h.pending = append(h.pending[:0], h.pending[i:]...)
}

// delay is how long green has been behind at now: zero when every
// heartbeat written has been applied, else the age of the oldest one not
// applied.
func (h *heartbeats) delay(now time.Time) time.Duration {
	if len(h.pending) == 0 {
		return 0
	}
	return now.Sub(h.pending[0].at)
}

// heartbeatLoop bumps this pair's heartbeat row on blue until ctx ends.
func (r *Replicator) heartbeatLoop(ctx context.Context) {
	t := time.NewTicker(r.opts.HeartbeatInterval)
	defer t.Stop()
	var lastErr time.Time
	for {
		at := time.Now()
		var seq int64
		var written time.Time
		err := r.blue.QueryRow(ctx, heartbeatSQL, r.opts.Plan, r.opts.Pair.Name).Scan(&seq, &written)
		if err == nil {
			r.mu.Lock()
			r.hb.wrote(seq, at)
			r.mu.Unlock()
		} else if ctx.Err() == nil && time.Since(lastErr) > 10*time.Second {
			lastErr = time.Now()
			r.log.Warn("heartbeat write on blue failed; lag in seconds will grow", zap.Error(err))
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// lagLoop measures lag every StatusInterval and exports it.
func (r *Replicator) lagLoop(ctx context.Context) {
	t := time.NewTicker(r.opts.StatusInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if r.phase.Load().(Phase) != PhaseStreaming {
			continue
		}
		if _, err := r.Lag(ctx); err != nil && ctx.Err() == nil {
			r.log.Debug("measure lag", zap.Error(err))
		}
	}
}

// Lag measures how far green is behind blue now: it reads blue's current
// WAL position, and updates the gauges and Status.
func (r *Replicator) Lag(ctx context.Context) (replication.Lag, error) {
	if r.blue == nil {
		return replication.Lag{}, replication.ErrStopped
	}
	var cur pglogrepl.LSN
	var text string
	if err := r.blue.QueryRow(ctx, `SELECT pg_current_wal_lsn()::text`).Scan(&text); err != nil {
		return replication.Lag{}, fmt.Errorf("blue: read current WAL position: %w", err)
	}
	cur, err := pglogrepl.ParseLSN(text)
	if err != nil {
		return replication.Lag{}, err
	}
	now := time.Now()
	applied := pglogrepl.LSN(r.appliedEnd.Load())
	if c := pglogrepl.LSN(r.confirmedEnd.Load()); c > applied {
		applied = c
	}
	l := replication.Lag{Source: cur.String(), Applied: applied.String(), At: now}
	if cur > applied {
		l.Bytes = int64(cur - applied)
	}
	if ns := r.appliedCommit.Load(); ns > 0 {
		l.CommitAge = max(now.Sub(time.Unix(0, ns)), 0)
	}
	r.mu.Lock()
	l.Delay = r.hb.delay(now)
	if l.At.After(r.lastLag.At) { // concurrent callers: the newest wins
		r.lastLag = l
	}
	r.mu.Unlock()
	r.metrics.lagBytes.Set(float64(l.Bytes))
	r.metrics.lagSeconds.Set(l.Delay.Seconds())
	r.metrics.commitAge.Set(l.CommitAge.Seconds())
	return l, nil
}

// LastLag is the latest measurement (taken every StatusInterval while
// streaming) without querying blue.
func (r *Replicator) LastLag() replication.Lag {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.lastLag
}
