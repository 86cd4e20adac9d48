package postgres

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"

	"github.com/cutover/cutover/replication"
)

// copyAll makes green a copy of blue as of a new slot's consistent point:
//
//  1. green's row in cutover.applied is reset to "copy in progress", so a
//     crash from here on restarts the copy (and may truncate the tables);
//  2. any old slot is dropped and a new one created, exporting its
//     snapshot; the replication connection then stays idle, because the
//     snapshot lives only until it runs another command;
//  3. green's tables are emptied (a no-op on a first copy, which the
//     pre-checks made sure of), its indexes and keys deferred (recorded,
//     then dropped: deferIndexes), and every table is copied with COPY
//     inside that snapshot, several tables or block ranges at a time, in
//     binary where the types allow, FROZEN where it may (copyPlans);
//  4. the deferred indexes are built, several at a time;
//  5. the consistent point becomes green's applied position, and streaming
//     starts there: the slot sends exactly the transactions that committed
//     after the snapshot.
func (r *Replicator) copyAll(ctx context.Context, tables []*tableInfo) error {
	start := time.Now()
	if _, err := r.green.Exec(ctx, `INSERT INTO cutover.copies (slot) VALUES ($1)`, r.name); err != nil {
		return fmt.Errorf("green: record copy start: %w", err)
	}
	if _, err := r.green.Exec(ctx, beginCopySQL, r.name, int64(r.opts.Epoch)); err != nil {
		return fmt.Errorf("green: record copy start: %w", err)
	}
	// A restarted copy starts from empty tables. One statement for all of
	// them: TRUNCATE refuses a table referenced by a foreign key unless
	// the referencing table goes in the same statement.
	if _, err := r.green.Exec(ctx, "TRUNCATE ONLY "+strings.Join(quotedNames(tables), ", ")); err != nil {
		return fmt.Errorf("green: empty the tables before the copy: %w", err)
	}
	// Indexes and keys are built after the data (see deferIndexes).
	if !r.opts.copyNoDefer {
		n, err := r.deferIndexes(ctx, tables)
		if err != nil {
			return err
		}
		if n > 0 {
			r.log.Info("green's indexes and keys dropped for the copy; built again after it", zap.Int("indexes", n))
		}
	}
	plans, err := r.copyPlans(ctx, tables)
	if err != nil {
		return err
	}
	// The exported snapshot lives as long as the replication connection.
	rconn, slot, consistent, err := r.createSlot(ctx, "EXPORT_SNAPSHOT")
	if err != nil {
		return err
	}
	defer rconn.Close(context.WithoutCancel(ctx))
	r.log.Info("slot created; copying", zap.String("consistent_point", slot.ConsistentPoint), zap.String("snapshot", slot.SnapshotName), zap.Int("tables", len(tables)))

	var (
		rowsTotal, bytesTotal int64
		rows, byteCount       atomic.Int64
		tablesDone            atomic.Int32
	)
	for _, t := range tables {
		rowsTotal += t.RowsEst
		bytesTotal += t.BytesEst
	}
	report := func(final bool) {
		p := replication.Progress{
			TablesTotal: len(tables), TablesDone: int(tablesDone.Load()),
			Rows: rows.Load(), RowsTotal: rowsTotal, Bytes: byteCount.Load(), BytesTotal: bytesTotal,
			Elapsed: time.Since(start),
		}
		if p.Rows > 0 && p.RowsTotal > p.Rows && !final {
			p.ETA = time.Duration(float64(p.Elapsed) * float64(p.RowsTotal-p.Rows) / float64(p.Rows))
		}
		r.mu.Lock()
		r.progress = p
		r.mu.Unlock()
		r.metrics.copyRows.Set(float64(p.Rows))
		r.log.Info("copy progress", zap.Int("tables_done", p.TablesDone), zap.Int("tables", p.TablesTotal),
			zap.Int64("rows", p.Rows), zap.Int64("rows_estimated", p.RowsTotal), zap.Int64("bytes", p.Bytes),
			zap.Duration("elapsed", p.Elapsed.Round(time.Millisecond)), zap.Duration("eta", p.ETA.Round(time.Second)))
		if r.opts.OnCopyProgress != nil {
			r.opts.OnCopyProgress(p)
		}
	}

	pieces, err := r.copyPieces(ctx, tables)
	if err != nil {
		return err
	}
	for i := range pieces {
		p := plans[pieces[i].t]
		pieces[i].binary = p.binary
		// FREEZE needs the table truncated in the same transaction: one
		// transaction per table, so not for a table split across workers.
		pieces[i].freeze = p.freeze && !pieces[i].split
	}
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	work := make(chan copyPiece)
	errs := make(chan error, r.opts.CopyParallel)
	var wg sync.WaitGroup
	for i := 0; i < r.opts.CopyParallel && i < len(pieces); i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := r.copyWorker(cctx, slot.SnapshotName, i == 0, work, &rows, &byteCount, &tablesDone); err != nil {
				errs <- err
				cancel()
			}
		}()
	}
	ticker := time.NewTicker(r.opts.progressEvery)
	defer ticker.Stop()
	go func() {
		defer close(work)
		for _, p := range pieces {
			select {
			case work <- p:
			case <-cctx.Done():
				return
			}
		}
	}()
	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
loop:
	for {
		select {
		case <-finished:
			break loop
		case <-ticker.C:
			report(false)
		}
	}
	close(errs)
	if err := <-errs; err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	report(true)
	dataDone := time.Now()
	// Every deferred index, this copy's and any a dead copy left behind,
	// is built before the copy counts as done.
	connect := func(ctx context.Context) (*pgx.Conn, error) { return pgx.Connect(ctx, r.opts.Pair.Green.DSN.Reveal()) }
	built, err := rebuildIndexes(ctx, connect, "", max(r.opts.CopyParallel, 2), r.log)
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.copyStats = copyStats{Data: dataDone.Sub(start), Indexes: time.Since(dataDone), IndexesBuilt: built}
	r.mu.Unlock()
	tag, err := r.green.Exec(ctx, finishCopySQL, r.name, consistent.String())
	if err != nil {
		return fmt.Errorf("green: record copy end: %w", err)
	}
	if tag.RowsAffected() != 1 {
		return fmt.Errorf("green: copy of %s was restarted by someone else", r.name)
	}
	r.appliedEnd.Store(uint64(consistent))
	r.appliedByMe.Store(uint64(consistent))
	r.log.Info("copy done", zap.Duration("took", time.Since(start).Round(time.Millisecond)), zap.Duration("indexes_took", time.Since(dataDone).Round(time.Millisecond)), zap.Int("indexes_built", built), zap.Int64("rows", rows.Load()), zap.Int64("bytes", byteCount.Load()))
	return nil
}

// startWithoutCopy makes the slot's consistent point green's applied
// position without copying (Options.SkipCopy): green already equals blue.
func (r *Replicator) startWithoutCopy(ctx context.Context) error {
	if _, err := r.green.Exec(ctx, beginCopySQL, r.name, int64(r.opts.Epoch)); err != nil {
		return fmt.Errorf("green: record start: %w", err)
	}
	rconn, _, consistent, err := r.createSlot(ctx, "NOEXPORT_SNAPSHOT")
	if err != nil {
		return err
	}
	defer rconn.Close(context.WithoutCancel(ctx))
	if err := r.setApplied(ctx, consistent); err != nil {
		return err
	}
	r.log.Info("slot created; streaming without a copy", zap.Stringer("consistent_point", consistent))
	return nil
}

// setApplied records pos as green's applied position, the copy done.
func (r *Replicator) setApplied(ctx context.Context, pos pglogrepl.LSN) error {
	if _, err := r.green.Exec(ctx, finishCopySQL, r.name, pos.String()); err != nil {
		return fmt.Errorf("green: record start: %w", err)
	}
	r.appliedEnd.Store(uint64(pos))
	r.appliedByMe.Store(uint64(pos))
	return nil
}

// recordStart makes pos the applied position of a slot created ahead of
// its start (StartAt), after checking that the slot can stream from there.
func (r *Replicator) recordStart(ctx context.Context, pos pglogrepl.LSN) error {
	var confirmed *string
	if err := r.blue.QueryRow(ctx, `SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1`, r.name).Scan(&confirmed); err != nil {
		return fmt.Errorf("blue: read slot %s: %w", r.name, err)
	}
	if confirmed != nil {
		from, err := pglogrepl.ParseLSN(*confirmed)
		if err != nil {
			return fmt.Errorf("blue: slot %s position %q: %w", r.name, *confirmed, err)
		}
		if pos < from {
			return fmt.Errorf("blue: slot %s streams from %s, after the requested start %s", r.name, from, pos)
		}
	}
	if _, err := r.green.Exec(ctx, beginCopySQL, r.name, int64(r.opts.Epoch)); err != nil {
		return fmt.Errorf("green: record start: %w", err)
	}
	if err := r.setApplied(ctx, pos); err != nil {
		return err
	}
	r.log.Info("streaming from a position chosen after the slot was created", zap.Stringer("from", pos))
	return nil
}

// copyWorker copies tables from work on its own pair of connections. Its
// blue transaction imports the slot's snapshot once and reads every table
// it is given inside it.
func (r *Replicator) copyWorker(ctx context.Context, snapshot string, markers bool, work <-chan copyPiece, rows, nbytes *atomic.Int64, done *atomic.Int32) error {
	bconn, err := r.blue.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("blue: connect for copy: %w", err)
	}
	defer bconn.Release()
	gconn, err := r.green.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("green: connect for copy: %w", err)
	}
	defer gconn.Release()
	bpg, gpg := bconn.Conn().PgConn(), gconn.Conn().PgConn()
	if _, err := bpg.Exec(ctx, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT "+quoteLiteral(snapshot)).ReadAll(); err != nil {
		return fmt.Errorf("blue: import snapshot %s: %w", snapshot, err)
	}
	defer func() {
		_, _ = bpg.Exec(context.WithoutCancel(ctx), "ROLLBACK").ReadAll()
	}()
	if _, err := gpg.Exec(ctx, "SET session_replication_role = replica").ReadAll(); err != nil {
		return fmt.Errorf("green: set up copy session: %w", err)
	}
	defer func() {
		_, _ = gpg.Exec(context.WithoutCancel(ctx), "RESET session_replication_role").ReadAll()
	}()
	if markers {
		// Markers written before the slot existed are in the snapshot, not
		// in the stream: bring this plan's over so WaitMarker finds them.
		if err := copyMarkers(ctx, bconn.Conn(), gconn.Conn(), r.opts.Plan); err != nil {
			return err
		}
	}
	for p := range work {
		if err := copyTable(ctx, bpg, gpg, p, rows, nbytes); err != nil {
			return err
		}
		if p.left == nil || p.left.Add(-1) == 0 {
			done.Add(1)
		}
	}
	return nil
}

// copyPiece is a table, or a range of its blocks, to copy.
type copyPiece struct {
	t *tableInfo
	// from and to are the block range [from, to) of a split table; to < 0
	// is the table's end. split false: the whole table.
	split    bool
	from, to int64
	// binary: COPY in binary format (copyPlans); freeze: TRUNCATE and
	// COPY FREEZE in one transaction on green.
	binary, freeze bool
	bytes          int64
	left           *atomic.Int32 // pieces of the table not yet copied
}

// copyPieces lists what to copy, largest first. One COPY FROM on green is
// CPU-bound on one core, so a table large enough to dominate the copy is
// split into block ranges (TID range scans, PostgreSQL 14 and up) that
// the workers copy at once, each inside the same exported snapshot. The
// last range is open-ended, so rows in blocks added since the size was
// read are copied too; the ranges are disjoint and cover the table.
func (r *Replicator) copyPieces(ctx context.Context, tables []*tableInfo) ([]copyPiece, error) {
	var pieces []copyPiece
	n := int64(r.opts.CopyParallel)
	var version int
	if n > 1 {
		if err := r.blue.QueryRow(ctx, `SELECT current_setting('server_version_num')::int`).Scan(&version); err != nil {
			return nil, fmt.Errorf("blue: server version: %w", err)
		}
	}
	for _, t := range tables {
		if n < 2 || version < 140000 || t.BytesEst < r.opts.copySplitBytes {
			pieces = append(pieces, copyPiece{t: t, bytes: t.BytesEst})
			continue
		}
		var blocks int64
		if err := r.blue.QueryRow(ctx, `SELECT pg_relation_size($1::oid::regclass) / current_setting('block_size')::int8`, int64(t.OID)).Scan(&blocks); err != nil {
			return nil, fmt.Errorf("blue: size of %s: %w", t.Name, err)
		}
		left := &atomic.Int32{}
		left.Store(int32(n))
		step := blocks / n
		for i := range n {
			p := copyPiece{t: t, split: true, from: i * step, to: (i + 1) * step, bytes: t.BytesEst / n, left: left}
			if i == n-1 {
				p.to = -1
			}
			pieces = append(pieces, p)
		}
	}
	slices.SortStableFunc(pieces, func(a, b copyPiece) int { return cmp.Compare(b.bytes, a.bytes) })
	return pieces, nil
}

// source is the COPY TO statement of the piece.
func (p copyPiece) source() string {
	cols := strings.Join(p.t.copyColumns(), ", ")
	with := ""
	if p.binary {
		with = " WITH (FORMAT binary)"
	}
	if !p.split {
		return "COPY " + p.t.Name.Quoted() + " (" + cols + ") TO STDOUT" + with
	}
	where := fmt.Sprintf("ctid >= '(%d,0)'::tid", p.from)
	if p.to >= 0 {
		where += fmt.Sprintf(" AND ctid < '(%d,0)'::tid", p.to)
	}
	return "COPY (SELECT " + cols + " FROM ONLY " + p.t.Name.Quoted() + " WHERE " + where + ") TO STDOUT" + with
}

// target is the COPY FROM statement of the piece.
func (p copyPiece) target() string {
	var opts []string
	if p.binary {
		opts = append(opts, "FORMAT binary")
	}
	if p.freeze {
		opts = append(opts, "FREEZE")
	}
	s := "COPY " + p.t.Name.Quoted() + " (" + strings.Join(p.t.copyColumns(), ", ") + ") FROM STDIN"
	if len(opts) > 0 {
		s += " WITH (" + strings.Join(opts, ", ") + ")"
	}
	return s
}

// copyTable streams one piece from blue's COPY TO into green's COPY FROM,
// in binary or text (portable between servers whose type OIDs differ)
// format. A FREEZE piece empties its table in the same transaction on
// green (it is empty already: the copy truncated every table at its start,
// and no other piece writes this one), which is what lets COPY write the
// rows frozen and all-visible, so nothing rewrites their pages later to
// set hint bits or freeze them.
func copyTable(ctx context.Context, blue, green *pgconn.PgConn, p copyPiece, rows, nbytes *atomic.Int64) (err error) {
	t := p.t
	if p.freeze {
		if _, err := green.Exec(ctx, "BEGIN; TRUNCATE ONLY "+t.Name.Quoted()).ReadAll(); err != nil {
			_, _ = green.Exec(context.WithoutCancel(ctx), "ROLLBACK").ReadAll()
			return fmt.Errorf("green: empty %s for COPY FREEZE: %w", t.Name, err)
		}
		defer func() {
			end := "COMMIT"
			if err != nil {
				end = "ROLLBACK"
			}
			if _, cerr := green.Exec(context.WithoutCancel(ctx), end).ReadAll(); cerr != nil && err == nil {
				err = fmt.Errorf("green: commit copy of %s: %w", t.Name, cerr)
			}
		}()
	}
	pr, pw := io.Pipe()
	readErr := make(chan error, 1)
	go func() {
		// COPY TO sends a message per row; hand green 256 KiB at a time
		// instead, or each row becomes a message (and a syscall) of its own.
		bw := bufio.NewWriterSize(pw, 256<<10)
		w := &countingWriter{w: bw, rows: rows, bytes: nbytes, text: !p.binary}
		_, err := blue.CopyTo(ctx, w, p.source())
		if err == nil {
			err = bw.Flush()
		}
		pw.CloseWithError(err)
		if err != nil {
			err = fmt.Errorf("blue: copy %s out: %w", t.Name, err)
		}
		readErr <- err
	}()
	_, werr := green.CopyFrom(ctx, pr, p.target())
	pr.CloseWithError(errors.New("copy into green ended"))
	if rerr := <-readErr; rerr != nil {
		return rerr
	}
	if werr != nil {
		return fmt.Errorf("green: copy %s in: %w", t.Name, werr)
	}
	return nil
}

func copyMarkers(ctx context.Context, blue, green *pgx.Conn, plan string) error {
	rows, err := blue.Query(ctx, `SELECT nonce, epoch, written_at FROM cutover.markers WHERE plan = $1`, plan)
	if err != nil {
		return fmt.Errorf("blue: read markers: %w", err)
	}
	var nonces []string
	var epochs []int64
	var at []time.Time
	for rows.Next() {
		var n string
		var e int64
		var w time.Time
		if err := rows.Scan(&n, &e, &w); err != nil {
			rows.Close()
			return fmt.Errorf("blue: read markers: %w", err)
		}
		nonces, epochs, at = append(nonces, n), append(epochs, e), append(at, w)
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("blue: read markers: %w", err)
	}
	if len(nonces) == 0 {
		return nil
	}
	_, err = green.Exec(ctx, `INSERT INTO cutover.markers (nonce, plan, epoch, written_at)
		SELECT n, $4, e, w FROM unnest($1::text[], $2::int8[], $3::timestamptz[]) AS v(n, e, w) ON CONFLICT (nonce) DO NOTHING`, nonces, epochs, at, plan)
	if err != nil {
		return fmt.Errorf("green: copy markers: %w", err)
	}
	return nil
}

// countingWriter counts the bytes and, in text format, the rows
// (newlines: COPY's text format escapes newlines inside values) going
// through it, and in binary format the tuples.
type countingWriter struct {
	w     io.Writer
	rows  *atomic.Int64
	bytes *atomic.Int64
	text  bool
	bin   binaryRows
}

// binaryRows counts the tuples in a stream of COPY's binary format: a
// header (11-byte signature, flags, extension length and extension), then
// per tuple a 16-bit field count and per field a 32-bit length (-1: NULL)
// and the data; a field count of -1 ends it.
type binaryRows struct {
	started bool
	skip    int64  // bytes to pass over
	need    int    // bytes of the next integer (2: field count, 4: length)
	partial []byte // of that integer
	fields  int    // fields of the current tuple still to read
	header  bool   // reading the header's extension length
}

func (b *binaryRows) feed(p []byte) int64 {
	var n int64
	if !b.started {
		b.started, b.skip, b.need, b.header = true, 11+4, 4, true
	}
	for len(p) > 0 {
		if b.skip > 0 {
			k := min(b.skip, int64(len(p)))
			p, b.skip = p[k:], b.skip-k
			continue
		}
		k := min(b.need-len(b.partial), len(p))
		b.partial, p = append(b.partial, p[:k]...), p[k:]
		if len(b.partial) < b.need {
			break
		}
		var v int64
		if b.need == 2 {
			v = int64(int16(uint16(b.partial[0])<<8 | uint16(b.partial[1])))
		} else {
			v = int64(int32(uint32(b.partial[0])<<24 | uint32(b.partial[1])<<16 | uint32(b.partial[2])<<8 | uint32(b.partial[3])))
		}
		b.partial = b.partial[:0]
		switch {
		case b.header:
			b.header, b.skip, b.need = false, max(v, 0), 2
		case b.need == 2:
			if v < 0 { // the trailer
				b.skip = 1 << 62
				continue
			}
			n++
			b.fields = int(v)
			if b.fields > 0 {
				b.need = 4
			}
		default:
			b.skip = max(v, 0)
			b.fields--
			if b.fields == 0 {
				b.need = 2
			}
		}
	}
	return n
}

func (c *countingWriter) Write(p []byte) (int, error) {
	if c.text {
		c.rows.Add(int64(bytes.Count(p, []byte{'\n'})))
	} else {
		c.rows.Add(c.bin.feed(p))
	}
	c.bytes.Add(int64(len(p)))
	return c.w.Write(p)
}

// dropSlot drops the slot if it exists, ending its walsender if active.
func (r *Replicator) dropSlot(ctx context.Context) error {
	return dropSlot(ctx, r.blue, r.name, r.log)
}

// createSlot drops any slot of this pair and creates it afresh on blue,
// returning the replication connection (the caller closes it), the slot and
// its consistent point.
func (r *Replicator) createSlot(ctx context.Context, snapshotAction string) (*pgconn.PgConn, pglogrepl.CreateReplicationSlotResult, pglogrepl.LSN, error) {
	var none pglogrepl.CreateReplicationSlotResult
	if err := r.dropSlot(ctx); err != nil {
		return nil, none, 0, err
	}
	rconn, err := connectReplication(ctx, r.opts.Pair.Blue.DSN.Reveal())
	if err != nil {
		return nil, none, 0, err
	}
	slot, err := pglogrepl.CreateReplicationSlot(ctx, rconn, r.name, "pgoutput", pglogrepl.CreateReplicationSlotOptions{
		Mode:           pglogrepl.LogicalReplication,
		SnapshotAction: snapshotAction,
	})
	if err != nil {
		rconn.Close(context.WithoutCancel(ctx))
		return nil, none, 0, fmt.Errorf("blue: create slot %s: %w", r.name, err)
	}
	consistent, err := pglogrepl.ParseLSN(slot.ConsistentPoint)
	if err != nil {
		rconn.Close(context.WithoutCancel(ctx))
		return nil, none, 0, fmt.Errorf("blue: slot consistent point %q: %w", slot.ConsistentPoint, err)
	}
	return rconn, slot, consistent, nil
}
