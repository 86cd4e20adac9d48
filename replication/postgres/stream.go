package postgres

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/zap"
)

// Chunking of large source transactions between receiver and applier,
// and how much decoded data may wait for the applier: enough for deep
// batches when there is a backlog, bounded in memory.
const (
	chunkMaxMessages = 1024
	chunkMaxBytes    = 4 << 20
	queueChunks      = 8192
	queueBytes       = 64 << 20
)

// streamParams make the walsender render values the way green parses
// them, whatever the role's or server's defaults (native logical
// replication sets the same).
var streamParams = map[string]string{
	"DateStyle":          "ISO",
	"IntervalStyle":      "postgres",
	"extra_float_digits": "3",
	"TimeZone":           "UTC",
	"bytea_output":       "hex",
	"application_name":   "cutover",
}

// connectReplication opens a logical replication connection to blue.
func connectReplication(ctx context.Context, dsn string) (*pgconn.PgConn, error) {
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("blue: parse dsn: %w", err)
	}
	for k, v := range streamParams {
		cfg.RuntimeParams[k] = v
	}
	cfg.RuntimeParams["replication"] = "database"
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("blue: replication connection: %w", err)
	}
	return conn, nil
}

// receiver reads the replication stream on one goroutine and hands whole
// (or chunked) transactions to the applier. It alone uses its connection:
// it also sends the status updates that let blue recycle WAL.
type receiver struct {
	r    *Replicator
	conn *pgconn.PgConn
	log  *zap.Logger

	received  pglogrepl.LSN // highest position seen in the stream
	walEnd    pglogrepl.LSN // blue's position from the last keepalive
	inTxn     bool
	handedEnd pglogrepl.LSN // end of the last whole transaction handed over
	cur       *chunk
	nextStat  time.Time
	slab      []byte // see alloc
}

// run streams until ctx ends or the connection fails. It closes out when it
// returns.
func (rc *receiver) run(ctx context.Context, out chan<- *chunk) error {
	defer close(out)
	interval := rc.r.opts.StatusInterval
	rc.nextStat = time.Now().Add(interval)
	// Reads wait on a socket deadline (the next status update) and ctx
	// ends them by moving the deadline to now. A context per read instead
	// (a timer context, and a watcher goroutine inside pgconn) cost most
	// of the process's CPU while draining a backlog: one per message.
	nc := rc.conn.Conn()
	stop := context.AfterFunc(ctx, func() { _ = nc.SetDeadline(time.Now()) })
	defer func() {
		if stop() {
			// Let the session's Close say goodbye to the walsender.
			_ = nc.SetDeadline(time.Time{})
		}
	}()
	var deadline time.Time
	for {
		if rc.r.paused.Load() {
			// Paused: end the stream (the walsender exits, as for a
			// disabled subscription; the backlog stays in blue's WAL).
			// Confirm what is applied first, so that the resumed stream
			// does not decode it again.
			_ = rc.sendStatus(ctx, false)
			return errPaused
		}
		if !time.Now().Before(rc.nextStat) {
			if err := rc.sendStatus(ctx, false); err != nil {
				return err
			}
		}
		if !deadline.Equal(rc.nextStat) {
			deadline = rc.nextStat
			if err := nc.SetReadDeadline(deadline); err != nil {
				return fmt.Errorf("blue: receive: %w", err)
			}
		}
		// Checked after the deadline is set: a cancellation from here on
		// moves it to now, one before is seen here.
		if err := ctx.Err(); err != nil {
			return err
		}
		raw, err := rc.conn.ReceiveMessage(context.Background())
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if pgconn.Timeout(err) {
				continue
			}
			return fmt.Errorf("blue: receive: %w", err)
		}
		switch msg := raw.(type) {
		case *pgproto3.ErrorResponse:
			return fmt.Errorf("blue: replication stream: %w", pgconn.ErrorResponseToPgError(msg))
		case *pgproto3.CopyDone:
			return errors.New("blue: replication stream ended by the server")
		case *pgproto3.CopyData:
			if err := rc.copyData(ctx, msg.Data, out); err != nil {
				return err
			}
		}
	}
}

func (rc *receiver) copyData(ctx context.Context, data []byte, out chan<- *chunk) error {
	if len(data) == 0 {
		return nil
	}
	switch data[0] {
	case pglogrepl.PrimaryKeepaliveMessageByteID:
		k, err := pglogrepl.ParsePrimaryKeepaliveMessage(data[1:])
		if err != nil {
			return permanent(fmt.Errorf("blue: keepalive: %w", err))
		}
		if k.ServerWALEnd > rc.walEnd {
			rc.walEnd = k.ServerWALEnd
		}
		if k.ReplyRequested {
			return rc.sendStatus(ctx, false)
		}
	case pglogrepl.XLogDataByteID:
		x, err := pglogrepl.ParseXLogData(data[1:])
		if err != nil {
			return permanent(fmt.Errorf("blue: xlogdata: %w", err))
		}
		if x.WALStart > rc.received {
			rc.received = x.WALStart
		}
		// pgconn reuses its buffer on the next receive; the decoded
		// message aliases this copy for as long as the applier needs it.
		buf := rc.alloc(len(x.WALData))
		copy(buf, x.WALData)
		m, err := decode(buf)
		if err != nil {
			return permanent(err)
		}

		return rc.message(ctx, m, len(buf), out)
	}
	return nil
}

func (rc *receiver) message(ctx context.Context, m message, size int, out chan<- *chunk) error {
	switch m.Kind {
	case msgBegin:
		rc.inTxn = true
		rc.cur = &chunk{begin: true, finalLSN: m.FinalLSN, beginTime: m.CommitTime, msgs: make([]message, 0, 8)}
		return nil
	case msgCommit:
		if rc.cur == nil {
			return permanent(errors.New("pgoutput: commit without begin"))
		}
		rc.cur.commit = true
		rc.cur.endLSN = m.EndLSN
		rc.cur.commitTime = m.CommitTime
		if err := rc.hand(ctx, out); err != nil {
			return err
		}
		rc.inTxn = false
		rc.handedEnd = m.EndLSN
		return nil
	case msgType, msgOrigin:
		return nil
	case msgMessage:
		return nil
	}
	if rc.cur == nil {
		return permanent(fmt.Errorf("pgoutput: %c message outside a transaction", m.Kind))
	}
	rc.cur.msgs = append(rc.cur.msgs, m)
	rc.cur.size += size
	if len(rc.cur.msgs) >= chunkMaxMessages || rc.cur.size >= chunkMaxBytes {
		if err := rc.hand(ctx, out); err != nil {
			return err
		}
		rc.cur = &chunk{}
	}
	return nil
}

// slabSize is how much stream data one allocation holds: messages are
// copied into shared slabs instead of one allocation each (fewer
// allocations and less for the GC to track; a slab is freed when the last
// message in it has been applied).
const slabSize = 256 << 10

// alloc returns n bytes for a message that the applier will hold on to.
func (rc *receiver) alloc(n int) []byte {
	if n > slabSize/8 {
		return make([]byte, n)
	}
	if cap(rc.slab)-len(rc.slab) < n {
		rc.slab = make([]byte, 0, slabSize)
	}
	l := len(rc.slab)
	rc.slab = rc.slab[:l+n]
	return rc.slab[l : l+n : l+n]
}

// hand gives the current chunk to the applier, sending status updates
// while the applier is busy so that the walsender does not time out.
func (rc *receiver) hand(ctx context.Context, out chan<- *chunk) error {
	c := rc.cur
	rc.cur = nil
	for rc.r.queued.Load() > queueBytes {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Millisecond):
		}
		if !time.Now().Before(rc.nextStat) {
			if err := rc.sendStatus(ctx, false); err != nil {
				return err
			}
		}
	}
	rc.r.queued.Add(int64(c.size))
	for {
		t := time.NewTimer(time.Until(rc.nextStat))
		select {
		case out <- c:
			t.Stop()
			return nil
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
			if err := rc.sendStatus(ctx, false); err != nil {
				return err
			}
		}
	}
}

// sendStatus reports positions to blue. Flushed is what green has
// committed; when everything handed over is applied and no transaction is
// open, it is also safe to confirm blue's keepalive position (what lies
// between is outside the publication), which lets blue recycle WAL on an
// idle stream, as native apply does.
func (rc *receiver) sendStatus(ctx context.Context, reply bool) error {
	applied := pglogrepl.LSN(rc.r.appliedEnd.Load())
	flush := applied
	if !rc.inTxn && rc.handedEnd <= applied && rc.walEnd > flush {
		flush = rc.walEnd
	}
	write := rc.received
	if flush > write {
		write = flush
	}
	if flush > pglogrepl.LSN(rc.r.confirmedEnd.Load()) {
		rc.r.confirmedEnd.Store(uint64(flush))
	}
	err := pglogrepl.SendStandbyStatusUpdate(ctx, rc.conn, pglogrepl.StandbyStatusUpdate{
		WALWritePosition: write,
		WALFlushPosition: flush,
		WALApplyPosition: flush,
		ReplyRequested:   reply,
	})
	rc.nextStat = time.Now().Add(rc.r.opts.StatusInterval)
	if err != nil {
		return fmt.Errorf("blue: send status: %w", err)
	}
	return nil
}

// errPaused ends a session when the replicator is paused.
var errPaused = errors.New("paused")

// permanentError marks errors that a retry cannot fix.
type permanentError struct{ err error }

func (e *permanentError) Error() string { return e.err.Error() }
func (e *permanentError) Unwrap() error { return e.err }

func permanent(err error) error { return &permanentError{err} }
