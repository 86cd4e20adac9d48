package postgres

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"

	"github.com/cutover/cutover/replication"
)

// errBehind: another applier applied past this batch's start.
var errBehind = errors.New("green is ahead of this applier")

// chunk is a piece of one source transaction handed from the receiver to
// the applier. Small transactions arrive whole (Begin and Commit set);
// large ones in several chunks so that neither side holds them in memory.
type chunk struct {
	begin      bool
	finalLSN   pglogrepl.LSN // commit position, from Begin
	beginTime  time.Time
	msgs       []message
	commit     bool
	endLSN     pglogrepl.LSN
	commitTime time.Time
	size       int
}

// applier applies chunks on green over one connection. It runs on one
// goroutine (applyLoop); nothing else touches its connection.
type applier struct {
	r       *Replicator
	conn    *pgx.Conn
	rels    map[uint32]*relState
	stmtSeq int
	log     *zap.Logger
	// stored is the last applied end position: transactions that commit
	// before it were applied by an earlier run and are skipped.
	stored pglogrepl.LSN
	// inTxn: a green transaction is open (a batch was partly sent).
	inTxn bool
	// skipping: the current source transaction is already applied.
	skipping bool
	// ahead and held: the next batch, gathered while the last one
	// committed, and the chunk to go on with (see gatherAhead).
	ahead *batch
	held  *chunk
}

// greenSessionSQL prepares the apply session: no triggers or foreign-key
// checks (as native apply), and the same text formats the stream uses.
const greenSessionSQL = `SET session_replication_role = replica; SET DateStyle = ISO; SET IntervalStyle = postgres;
SET extra_float_digits = 3; SET TimeZone = 'UTC'; SET bytea_output = hex; SET lock_timeout = 0; SET statement_timeout = 0`

func (a *applier) setup(ctx context.Context) error {
	if _, err := a.conn.Exec(ctx, greenSessionSQL); err != nil {
		return fmt.Errorf("green: set up apply session: %w", err)
	}
	return nil
}

// applyLoop takes chunks from in until ctx ends or in is closed, and
// applies them in batches.
func (a *applier) applyLoop(ctx context.Context, in <-chan *chunk) error {
	for {
		if err := a.r.waitUnpaused(ctx); err != nil {
			return err
		}
		// Start with what was gathered while the previous batch committed.
		b, c := a.ahead, a.held
		a.ahead, a.held = nil, nil
		if b == nil && c == nil {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case c = <-in:
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if c == nil {
				return nil
			}
		}
		if err := a.applyBatch(ctx, b, c, in); err != nil {
			return err
		}
	}
}

// full says whether b has reached a batch limit (checked at transaction
// boundaries).
func (a *applier) full(b *batch) bool {
	return b.changes >= a.r.opts.MaxBatchChanges || time.Since(b.started) >= a.r.opts.MaxBatchDelay || a.r.paused.Load()
}

// applyBatch applies b (nil: a new batch), then c and as many further
// transactions as are waiting, up to the batch limits, in one green
// transaction. It keeps latency low when the stream is thin (a lone
// transaction commits at once) and batches deeply when there is a backlog.
func (a *applier) applyBatch(ctx context.Context, b *batch, c *chunk, in <-chan *chunk) error {
	if b == nil {
		b = newBatch()
	}
	if c == nil && !a.full(b) {
		select {
		case c = <-in:
		default:
		}
	}
	for c != nil {
		if err := a.addChunk(ctx, b, c); err != nil {
			return a.abort(ctx, err)
		}
		if b.pending >= a.r.opts.MaxPendingChanges {
			// A large transaction (or a deep backlog): send what we have
			// inside the open green transaction and keep going.
			if err := a.flush(ctx, b, false); err != nil {
				return a.abort(ctx, err)
			}
		}
		if c.commit {
			c = nil
			if !a.full(b) {
				select {
				case c = <-in:
				default:
				}
			}
			continue
		}
		// Mid-transaction: the rest must come.
		select {
		case <-ctx.Done():
			return a.abort(ctx, ctx.Err())
		case c = <-in:
			if c == nil {
				return a.abort(ctx, errors.New("stream ended inside a transaction"))
			}
		}
	}
	if b.txns == 0 {
		return a.abort(ctx, nil)
	}
	if err := ctx.Err(); err != nil {
		// The session ended (its stream died: the slot may be another
		// applier's now). Apply nothing more.
		return a.abort(ctx, err)
	}
	flushStart := time.Now()
	st, err := a.build(ctx, b, true)
	if err != nil {
		return a.abort(ctx, err)
	}
	// While green applies and commits the batch, gather the next one
	// here: on a backlog green and this process then work at the same
	// time instead of taking turns. Only the goroutine uses the
	// connection until it is done; gathering needs none (gatherAhead
	// stops before anything that would).
	type sent struct {
		results []*pgconn.Result
		err     error
	}
	done := make(chan sent, 1)
	go func() {
		results, err := a.conn.PgConn().ExecBatch(ctx, &st.b).ReadAll()
		done <- sent{results, err}
	}()
	ahead, held, gerr := a.gatherAhead(ctx, in)
	res := <-done
	if err := a.finish(b, st, true, res.results, res.err); err != nil {
		return a.abort(ctx, err)
	}
	if ce := a.log.Check(zap.DebugLevel, "batch applied"); ce != nil {
		ce.Write(zap.Int("txns", b.txns), zap.Int("changes", b.changes), zap.Duration("gathered", flushStart.Sub(b.started)),
			zap.Duration("flush", time.Since(flushStart)), zap.Duration("behind_commit", time.Since(b.lastCommitTime)))
	}
	a.r.afterCommit(b)
	if gerr != nil {
		return gerr
	}
	a.ahead, a.held = ahead, held
	return nil
}

// gatherAhead takes whole transactions that are already waiting into a
// new batch while the previous one is being committed. It stops at a
// limit, when nothing waits, and before a chunk that is not a whole
// transaction or that would need green (a changed relation), which it
// returns for the next batch to start with.
func (a *applier) gatherAhead(ctx context.Context, in <-chan *chunk) (*batch, *chunk, error) {
	var b *batch
	for b == nil || (!a.full(b) && b.pending < a.r.opts.MaxPendingChanges) {
		var c *chunk
		select {
		case c = <-in:
		default:
		}
		if c == nil {
			// Nothing waits, or the stream ended (the next read sees
			// that again).
			break
		}
		if !c.begin || !c.commit || a.needsGreen(c) {
			return b, c, nil
		}
		if b == nil {
			b = newBatch()
		}
		if err := a.addChunk(ctx, b, c); err != nil {
			return nil, nil, err
		}
	}
	return b, nil, nil
}

// needsGreen says whether adding c would query green: a relation that
// is new or changed.
func (a *applier) needsGreen(c *chunk) bool {
	for i := range c.msgs {
		if m := &c.msgs[i]; m.Kind == msgRelation && !a.rels[m.Relation.ID].sameShape(m.Relation) {
			return true
		}
	}
	return false
}

// abort rolls back an open green transaction (nothing of the batch is
// applied) and returns err.
func (a *applier) abort(ctx context.Context, err error) error {
	if a.inTxn {
		a.inTxn = false
		if _, rbErr := a.conn.Exec(context.WithoutCancel(ctx), "ROLLBACK"); rbErr != nil && err == nil {
			err = rbErr
		}
	}
	return err
}

func (a *applier) addChunk(ctx context.Context, b *batch, c *chunk) error {
	a.r.queued.Add(-int64(c.size))
	if c.begin {
		// Transactions that commit before the stored position were
		// applied by an earlier run (or another applier).
		a.skipping = c.finalLSN < a.stored
		if !a.skipping && b.firstCommit == 0 {
			b.firstCommit = c.finalLSN
		}
	}
	for i := range c.msgs {
		m := &c.msgs[i]
		if a.skipping && m.Kind != msgRelation {
			// Relation messages still count: later transactions use them.
			continue
		}
		switch m.Kind {
		case msgRelation:
			if err := a.relation(ctx, b, m.Relation); err != nil {
				return err
			}
		case msgInsert, msgUpdate, msgDelete:
			if err := a.change(b, m, c); err != nil {
				return err
			}
		case msgTruncate:
			a.truncate(b, m)
		}
	}
	if c.commit && !a.skipping {
		b.txns++
		b.lastEnd = c.endLSN
		b.lastCommitTime = c.commitTime
		for _, n := range b.txnMarkers {
			b.markers = append(b.markers, markerSeen{nonce: n, end: c.endLSN})
		}
		b.txnMarkers = b.txnMarkers[:0]
		for i := b.txnAppStart; i < len(b.appChanges); i++ {
			b.appChanges[i].end = c.endLSN
			b.appChanges[i].commitTime = c.commitTime
		}
		b.txnAppStart = len(b.appChanges)
	}
	return nil
}

func (a *applier) relation(ctx context.Context, b *batch, rel *relation) error {
	old := a.rels[rel.ID]
	if old.sameShape(rel) {
		return nil
	}
	if tb := b.tables[rel.ID]; tb != nil && tb.live > 0 {
		// The table changed shape with changes pending: send them first,
		// with the statements of the old shape.
		if err := a.flush(ctx, b, false); err != nil {
			return err
		}
	}
	rs, err := newRelState(ctx, a.conn, rel)
	if err != nil {
		return err
	}
	if old != nil {
		for _, sd := range old.stmts {
			_ = a.conn.PgConn().Deallocate(ctx, sd.Name)
		}
	}
	a.rels[rel.ID] = rs
	return nil
}

func (a *applier) change(b *batch, m *message, c *chunk) error {
	rs := a.rels[m.RelID]
	if rs == nil {
		return fmt.Errorf("pgoutput: change for relation %d before its Relation message", m.RelID)
	}
	if (m.New != nil && len(m.New) != len(rs.rel.Columns)) || (m.OldKind == 'O' && len(m.Old) != len(rs.rel.Columns)) {
		return fmt.Errorf("pgoutput: %s: tuple has a different number of columns than its relation", rs.name)
	}
	o := op{kind: m.Kind, row: m.New}
	keyed := len(rs.keyCols) > 0
	switch {
	case m.OldKind == 'O':
		o.old = m.Old
		if keyed {
			o.key = rs.keyOf(m.Old)
		}
	case m.OldKind == 'K':
		o.key = rs.keyOf(m.Old)
		if m.Kind == msgUpdate {
			o.kind = opKeyUpdate
		}
	case keyed:
		o.key = rs.keyOf(m.New)
	}
	if keyed {
		for _, v := range o.key {
			if v.Kind == valUnchanged {
				return fmt.Errorf("%s: a key column arrived as an unchanged TOAST value; cannot locate the row", rs.name)
			}
		}
	}
	tb := b.table(rs)
	before := tb.live
	tb.add(o)
	b.pending += tb.live - before
	b.changes++

	// Facts for after the commit.
	switch {
	case rs.markers && m.Kind == msgInsert:
		if v := m.New[0]; v.Kind == valText {
			b.txnMarkers = append(b.txnMarkers, string(v.Data))
			// From the first marker on, application changes are kept
			// for breach detection.
			a.r.watchingBreaches.Store(true)
		}
	case rs.heartbeat && m.New != nil:
		a.heartbeat(b, rs, m.New)
	case rs.app:
		if a.r.opts.OnRowChange != nil {
			if rs.rel.Identity != 'd' {
				// FULL, or USING INDEX: no primary key values to name
				// the row by (an index's values are not the key the
				// verifier looks rows up by): the whole table.
				b.rowKeys = append(b.rowKeys, rowKey{table: rs.name.String()})
			} else {
				b.rowKeys = append(b.rowKeys, rowKey{table: rs.name.String(), key: rs.keyStrings(o.key)})
				if o.kind == opKeyUpdate {
					b.rowKeys = append(b.rowKeys, rowKey{table: rs.name.String(), key: rs.keyStrings(rs.keyOf(m.New))})
				}
			}
		}
		if a.r.watchingBreaches.Load() {
			b.appChanges = append(b.appChanges, appChange{table: rs.name.String(), kind: m.Kind, key: rs.keyStrings(o.key)})
		}
	}
	return nil
}

// heartbeat notes this pair's heartbeat sequence number.
func (a *applier) heartbeat(b *batch, rs *relState, row tuple) {
	var plan, pair string
	var seqV int64
	for i, c := range rs.rel.Columns {
		switch c.Name {
		case "plan":
			plan = string(row[i].Data)
		case "pair":
			pair = string(row[i].Data)
		case "seq":
			seqV, _ = strconv.ParseInt(string(row[i].Data), 10, 64)
		}
	}
	if plan == a.r.opts.Plan && pair == a.r.opts.Pair.Name && seqV > b.heartbeatSeq {
		b.heartbeatSeq = seqV
	}
}

func (a *applier) truncate(b *batch, m *message) {
	var group []uint32
	for _, id := range m.RelIDs {
		rs := a.rels[id]
		if rs == nil {
			continue
		}
		if tb := b.tables[id]; tb != nil {
			b.pending -= tb.live
			tb.reset()
		}
		group = append(group, id)
		if rs.app {
			if a.r.opts.OnRowChange != nil {
				b.rowKeys = append(b.rowKeys, rowKey{table: rs.name.String()})
			}
			if a.r.watchingBreaches.Load() {
				b.appChanges = append(b.appChanges, appChange{table: rs.name.String(), kind: msgTruncate})
			}
		}
	}
	if len(group) > 0 {
		b.truncates = append(b.truncates, group)
	}
	b.changes++
}

// flush sends the batch's pending changes to green in one round trip,
// opening the green transaction (and claiming the batch) first if needed;
// with final it also stores the applied position and commits.
func (a *applier) flush(ctx context.Context, b *batch, final bool) error {
	st, err := a.build(ctx, b, final)
	if err != nil || st.n == 0 {
		return err
	}
	results, err := a.conn.PgConn().ExecBatch(ctx, &st.b).ReadAll()
	return a.finish(b, st, final, results, err)
}

// build renders the statements of a flush (see flush). Preparing a new
// statement shape is its only use of the connection.
func (a *applier) build(ctx context.Context, b *batch, final bool) (*statements, error) {
	st := &statements{conn: a.conn.PgConn(), seq: &a.stmtSeq}
	if !a.inTxn {
		st.exec("BEGIN")
		st.execParams(claimSQL, [][]byte{[]byte(a.r.name), []byte(b.firstCommit.String()), []byte(strconv.FormatUint(a.r.opts.Epoch, 10))})
		a.inTxn = true
	}
	for _, group := range b.truncates {
		sql := "TRUNCATE ONLY "
		for i, id := range group {
			if i > 0 {
				sql += ", "
			}
			sql += a.rels[id].name.Quoted()
		}
		st.exec(sql)
	}
	b.truncates = b.truncates[:0]
	for _, tb := range b.order {
		if tb.live == 0 {
			continue
		}
		if err := st.table(ctx, tb); err != nil {
			return nil, err
		}
		tb.reset()
	}
	b.pending = 0
	if final {
		st.execParams(advanceSQL, [][]byte{[]byte(a.r.name), []byte(b.lastEnd.String()), []byte(b.lastCommitTime.Format(time.RFC3339Nano))})
		st.exec("COMMIT")
	}
	return st, nil
}

// finish interprets the results of a flush's round trip.
func (a *applier) finish(b *batch, st *statements, final bool, results []*pgconn.Result, err error) error {
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == supersededCode {
			return fmt.Errorf("%w: %s", replication.ErrSuperseded, pgErr.Message)
		}
		if errors.As(err, &pgErr) && pgErr.Code == aheadCode {
			// Nothing of the batch is applied; the next session starts
			// from green's position (and decides there whether this
			// replicator was superseded).
			return fmt.Errorf("%w: %s", errBehind, pgErr.Message)
		}
		return fmt.Errorf("green: apply: %w", err)
	}
	if final {
		a.inTxn = false
		a.stored = b.lastEnd
	}
	for _, ck := range st.checks {
		if ck.stmt < len(results) {
			if got := results[ck.stmt].CommandTag.RowsAffected(); got < ck.want {
				a.r.metrics.missingRows.Add(float64(ck.want - got))
				a.log.Warn("rows changed on blue are missing on green", zap.Stringer("table", ck.table), zap.String("change", ck.what), zap.Int64("missing", ck.want-got))
			}
		}
	}
	return nil
}
