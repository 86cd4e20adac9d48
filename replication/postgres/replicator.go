package postgres

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/internal/pgsafe"
	"github.com/cutover/cutover/replication"
)

var _ replication.Replicator = (*Replicator)(nil)

// Options configures a Replicator. Plan and Pair are required; the rest
// has defaults.
type Options struct {
	Plan string
	Pair config.Pair
	// Slot names the slot and the publication. Default Name(Plan,
	// Pair.Name, Forward). A plan passes the names it recorded, so that a
	// plan created under an older naming scheme goes on with its own, and
	// the reverse direction its Name(..., Reverse).
	Slot string
	// Epoch is the fencing token of the leader running this replicator
	// (the plan's epoch). It is stored on green with every batch; an
	// applier with a lower epoch stops with ErrSuperseded. Replicators of
	// the same epoch (a restart) take turns safely, the newest winning.
	Epoch uint64
	// SkipCopy starts streaming without the initial copy: Start creates the
	// slot and records its consistent point as green's applied position
	// before it returns. The caller guarantees that green already equals
	// blue and that neither is written until Start has returned (both
	// fenced): reverse replication after the switch. Green's tables need
	// not be empty.
	SkipCopy bool
	// GreenFencedSince is when green's fence against application writes
	// went up, if it has stayed up since (zero: unknown, or not fenced).
	// A first copy needs green's tables empty, except when every row in
	// them was written by cutover while green was fenced: a plan aborted
	// after its copy, retried on the same pair. Green then holds nothing
	// an application wrote, and the copy empties it again.
	GreenFencedSince time.Time
	// Logger receives progress and problems; nil logs nothing.
	Logger *zap.Logger
	// Registerer receives the replicator's metrics (labelled by plan and
	// pair); nil registers nothing.
	Registerer prometheus.Registerer

	// OnRowChange is called on the applier goroutine after each green
	// commit, once for each application row change the commit applied:
	// table is schema.table; key holds the replica identity (primary key)
	// values in key order, in PostgreSQL text format. An update that
	// changes the key reports the old and then the new key. TRUNCATE, and
	// every change of a table replicated with REPLICA IDENTITY FULL or
	// USING INDEX (whose values are not the primary key), report a nil
	// key: the whole table. It must be quick and must not
	// call back into the Replicator; a change may be reported more than
	// once (after a restart), never not at all.
	OnRowChange func(table string, key []string)
	// OnChangeAfterMarker is called on the applier goroutine, after the
	// green commit, for every application row change applied from a
	// source transaction that ended after the newest marker seen so far
	// (see ChangesAfter). Once blue is fenced there must be none.
	OnChangeAfterMarker func(replication.Change)
	// OnCopyProgress is called every few seconds during the initial copy,
	// and once at its end.
	OnCopyProgress func(replication.Progress)

	// HeartbeatInterval is how often the heartbeat row on blue is bumped.
	// Default 250ms.
	HeartbeatInterval time.Duration
	// CopyParallel is how many tables are copied at once. Default 2.
	CopyParallel int
	// MaxBatchChanges ends a batch (one green commit) after this many row
	// changes, at a transaction boundary. Default 20000.
	MaxBatchChanges int
	// MaxBatchDelay ends a batch this long after it started, at a
	// transaction boundary. Default 500ms.
	MaxBatchDelay time.Duration
	// MaxPendingChanges sends buffered changes to green inside the open
	// transaction once this many are pending (bounds memory for huge
	// transactions). Default 50000.
	MaxPendingChanges int
	// StatusInterval is how often positions are confirmed to blue and lag
	// is measured. Default 1s.
	StatusInterval time.Duration
	// MaxBreachRecords is how many changes ChangesAfter keeps at least
	// (at most twice as many). Default 10000.
	MaxBreachRecords int

	// progressEvery is how often copy progress is reported (tests).
	progressEvery time.Duration
	// copySplitBytes: tables at least this large are copied in parallel
	// block ranges (tests lower it).
	copySplitBytes int64
	// Each step of the copy can be turned off, to measure what it buys
	// (BenchmarkInitialCopy) and to test the other path.
	copyNoDefer, copyNoBinary, copyNoFreeze bool
}

func (o *Options) defaults() {
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.HeartbeatInterval <= 0 {
		o.HeartbeatInterval = 250 * time.Millisecond
	}
	if o.CopyParallel <= 0 {
		o.CopyParallel = 2
	}
	if o.MaxBatchChanges <= 0 {
		o.MaxBatchChanges = 20000
	}
	if o.MaxBatchDelay <= 0 {
		o.MaxBatchDelay = 500 * time.Millisecond
	}
	if o.MaxPendingChanges <= 0 {
		o.MaxPendingChanges = 50000
	}
	if o.StatusInterval <= 0 {
		o.StatusInterval = time.Second
	}
	if o.MaxBreachRecords <= 0 {
		o.MaxBreachRecords = 10000
	}
	if o.copySplitBytes <= 0 {
		o.copySplitBytes = 32 << 20
	}
	if o.progressEvery <= 0 {
		o.progressEvery = 2 * time.Second
	}
}

// Phase is where a Replicator is.
type Phase string

// Phases.
const (
	PhaseIdle      Phase = "idle"
	PhaseCopying   Phase = "copying"
	PhaseStreaming Phase = "streaming"
	PhaseStopped   Phase = "stopped"
	PhaseFailed    Phase = "failed"
)

// Status is a snapshot of a Replicator for `cutover status` and the API.
type Status struct {
	Phase    Phase
	Slot     string
	Copy     replication.Progress
	Applied  pglogrepl.LSN
	Lag      replication.Lag // the latest measurement
	Paused   bool
	Restarts int
	Err      string `json:",omitempty"`
}

// Replicator replicates one PostgreSQL pair: blue into green, through a
// publication and a pgoutput slot both named Options.Slot.
//
// It is run by the leader. Every write it makes on green carries the
// applied position and only moves it forward, so a deposed leader's
// Replicator that is still running stops with ErrSuperseded instead of
// applying anything twice; a new leader's takes the slot over, ending the
// old walsender if it lingers.
type Replicator struct {
	opts Options
	name string
	log  *zap.Logger

	blue, green *pgxpool.Pool

	metrics *metrics

	paused   atomic.Bool
	resumeMu sync.Mutex
	// seqs are the sequences in scope, once ResolveSequences has run.
	seqMu    sync.Mutex
	seqs     []sequence
	resumeCh chan struct{}

	appliedEnd    atomic.Uint64 // pglogrepl.LSN of the last applied transaction end
	appliedByMe   atomic.Uint64 // the same, counting only what this Replicator applied or copied
	appliedCommit atomic.Int64  // its source commit time, unix ns
	confirmedEnd  atomic.Uint64 // highest position confirmed to blue
	restarts      atomic.Int32
	queued        atomic.Int64 // bytes handed to the applier and not yet taken
	phase         atomic.Value // Phase

	watchingBreaches atomic.Bool

	mu        sync.Mutex
	markers   map[string]pglogrepl.LSN
	waiters   map[string][]chan pglogrepl.LSN
	breach    breachLog
	hb        heartbeats
	progress  replication.Progress
	copyStats copyStats
	lastLag   replication.Lag
	started   bool
	prepared  *checked // what Prepare found, for Start
	cancel    context.CancelFunc
	done      chan struct{}
	err       error
	stopOnce  sync.Once
	closeOnce sync.Once
}

// New returns a Replicator for one pair of a plan. It does no I/O.
func New(opts Options) (*Replicator, error) {
	if opts.Plan == "" || opts.Pair.Name == "" {
		return nil, errors.New("postgres replicator: plan and pair names are required")
	}
	if opts.Pair.Engine != "" && opts.Pair.Engine != config.Postgres {
		return nil, fmt.Errorf("postgres replicator: pair %s is engine %s", opts.Pair.Name, opts.Pair.Engine)
	}
	opts.defaults()
	if opts.Slot == "" {
		opts.Slot = Name(opts.Plan, opts.Pair.Name, Forward)
	}
	if !validSlotName(opts.Slot) {
		return nil, fmt.Errorf("postgres replicator: %q is not a slot name (1 to 63 of a-z, 0-9 and _)", opts.Slot)
	}
	r := &Replicator{
		opts:     opts,
		name:     opts.Slot,
		resumeCh: make(chan struct{}),
		markers:  map[string]pglogrepl.LSN{},
		waiters:  map[string][]chan pglogrepl.LSN{},
		done:     make(chan struct{}),
	}
	r.log = opts.Logger.With(zap.String("plan", opts.Plan), zap.String("pair", opts.Pair.Name), zap.String("slot", r.name))
	r.phase.Store(PhaseIdle)
	r.metrics = newMetrics(opts.Registerer, opts.Plan, opts.Pair.Name)
	return r, nil
}

// SlotName is the name of the slot and of the publication.
func (r *Replicator) SlotName() string { return r.name }

// Start connects to both sides, runs the pre-checks (a
// *replication.PrecheckError means nothing was created on either side),
// creates the cutover schema, the publication and, unless green already
// holds a completed copy for it, the slot, and then copies and streams in
// the background until Stop or until ctx ends. Cancelling ctx (loss of
// leadership) stops everything like Stop.
func (r *Replicator) Start(ctx context.Context) (err error) {
	return r.start(ctx, nil)
}

// StartAt starts a replicator whose slot PrepareSlot created earlier,
// streaming from pos: source transactions that committed before it are
// skipped. The reverse replication uses it at the flip, with pos green's
// position once everything blue wrote is applied there and before the
// application may write to it; the slot itself was created before the
// write outage, so the flip only records pos and starts the stream.
func (r *Replicator) StartAt(ctx context.Context, pos pglogrepl.LSN) error {
	return r.start(ctx, &pos)
}

// PrepareSlot creates the slot of a prepared replicator (Prepare) without
// recording where streaming starts (StartAt does). An existing slot is
// kept: nothing read from it was applied, since no start was recorded.
// Only for a replicator without a copy (Options.SkipCopy).
func (r *Replicator) PrepareSlot(ctx context.Context) error {
	r.mu.Lock()
	chk, started := r.prepared, r.started
	r.mu.Unlock()
	switch {
	case chk == nil || started:
		return errors.New("postgres replicator: PrepareSlot needs a prepared replicator, not started")
	case !r.opts.SkipCopy:
		return errors.New("postgres replicator: PrepareSlot is for a replicator without a copy")
	case chk.slotExists:
		return nil
	}
	rconn, _, consistent, err := r.createSlot(ctx, "NOEXPORT_SNAPSHOT")
	if err != nil {
		return err
	}
	rconn.Close(context.WithoutCancel(ctx))
	r.mu.Lock()
	chk.slotExists = true
	r.mu.Unlock()
	r.log.Info("slot created ahead of its start", zap.Stringer("consistent_point", consistent))
	return nil
}

func (r *Replicator) start(ctx context.Context, at *pglogrepl.LSN) (err error) {
	r.mu.Lock()
	if r.started {
		r.mu.Unlock()
		return errors.New("postgres replicator: already started")
	}
	r.started = true
	chk := r.prepared
	r.mu.Unlock()
	defer func() {
		if err != nil {
			r.closePools()
			r.finish(err)
		}
	}()
	if chk == nil {
		if chk, err = r.connectAndPrepare(ctx); err != nil {
			return err
		}
	}
	needCopy := chk.applied == nil || !chk.applied.Copied || !chk.slotExists
	if at != nil {
		if !chk.slotExists || !r.opts.SkipCopy {
			return errors.New("postgres replicator: StartAt needs the slot of PrepareSlot")
		}
		if err := r.recordStart(ctx, *at); err != nil {
			return err
		}
		needCopy = false
	}
	if needCopy && r.opts.SkipCopy {
		if err := r.startWithoutCopy(ctx); err != nil {
			return err
		}
		needCopy = false
	}

	runCtx, cancel := context.WithCancel(ctx)
	r.cancel = cancel
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); r.heartbeatLoop(runCtx) }()
	go func() { defer wg.Done(); r.lagLoop(runCtx) }()
	go func() {
		err := r.run(runCtx, chk.tables, needCopy)
		cancel()
		wg.Wait()
		r.closePools()
		r.finish(err)
	}()
	return nil
}

// Prepare does what Start does before the slot: it connects to both
// sides, runs the pre-checks, and creates the cutover schema and the
// publication. Start then only creates the slot (or copies) and streams.
// The reverse replication uses it: everything but the slot happens before
// the write outage, and the slot, which must begin where blue and green
// are equal, at the flip (about 150 ms less outage on a busy server). Stop
// (or Start) must follow.
func (r *Replicator) Prepare(ctx context.Context) error {
	r.mu.Lock()
	if r.started || r.prepared != nil {
		r.mu.Unlock()
		return errors.New("postgres replicator: already prepared or started")
	}
	r.mu.Unlock()
	chk, err := r.connectAndPrepare(ctx)
	if err != nil {
		r.closePools()
		return err
	}
	r.mu.Lock()
	r.prepared = chk
	r.mu.Unlock()
	return nil
}

// SetEpoch sets the epoch the applier presents (Options.Epoch) of a
// replicator prepared before the step that starts it had its epoch. It
// must be called before Start.
func (r *Replicator) SetEpoch(epoch uint64) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.started {
		return errors.New("postgres replicator: epoch set after Start")
	}
	r.opts.Epoch = epoch
	return nil
}

// connectAndPrepare opens the pools, runs the pre-checks and creates what
// the slot needs beside it.
func (r *Replicator) connectAndPrepare(ctx context.Context) (*checked, error) {
	var err error
	if r.blue, err = newPool(ctx, r.opts.Pair.Blue.DSN, "blue"); err != nil {
		return nil, err
	}
	if r.green, err = newPool(ctx, r.opts.Pair.Green.DSN, "green"); err != nil {
		return nil, err
	}
	if err := r.rebuildBeforePrecheck(ctx); err != nil {
		return nil, err
	}
	chk, err := r.precheck(ctx)
	if err != nil {
		return nil, err
	}
	if err := r.prepare(ctx, chk); err != nil {
		return nil, err
	}
	return chk, nil
}

func newPool(ctx context.Context, dsn config.DSN, side string) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(dsn.Reveal())
	if err != nil {
		return nil, fmt.Errorf("%s: parse dsn %s: %w", side, dsn, redactErr(err))
	}
	cfg.MaxConns = 4
	for k, v := range streamParams {
		cfg.ConnConfig.RuntimeParams[k] = v
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("%s: connect: %w", side, err)
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("%s: connect: %w", side, err)
	}
	return pool, nil
}

// redactErr drops the text of DSN parse errors, which can quote the DSN.
func redactErr(err error) error {
	var pe *pgconn.ParseConfigError
	if errors.As(err, &pe) {
		return errors.New("invalid connection string")
	}
	return err
}

// prepare creates the schema on both sides and the publication. It runs
// only after every pre-check passed.
func (r *Replicator) prepare(ctx context.Context, chk *checked) error {
	// The schema's functions run as the agent: checked before and after,
	// so that none of them is owned by a role that could replace it.
	for _, side := range []struct {
		name string
		pool *pgxpool.Pool
		sql  string
	}{{"blue", r.blue, sourceSchemaSQL}, {"green", r.green, targetSchemaSQL}} {
		if err := pgsafe.CheckSchema(ctx, side.pool, "cutover"); err != nil {
			return fmt.Errorf("%s: %w", side.name, err)
		}
		if _, err := side.pool.Exec(ctx, side.sql); err != nil {
			return fmt.Errorf("%s: create cutover schema: %w", side.name, err)
		}
		if err := pgsafe.CheckSchema(ctx, side.pool, "cutover"); err != nil {
			return fmt.Errorf("%s: %w", side.name, err)
		}
	}
	list := strings.Join(append(quotedNames(chk.tables), heartbeatTable.Quoted(), markersTable.Quoted()), ", ")
	var exists bool
	if err := r.blue.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)`, r.name).Scan(&exists); err != nil {
		return fmt.Errorf("blue: look up publication: %w", err)
	}
	sql := "CREATE PUBLICATION " + quoteIdent(r.name) + " FOR TABLE " + list
	if exists {
		// The scope may have changed since: make the publication match.
		sql = "ALTER PUBLICATION " + quoteIdent(r.name) + " SET TABLE " + list
	}
	if _, err := r.blue.Exec(ctx, sql); err != nil {
		return fmt.Errorf("blue: publication %s: %w", r.name, err)
	}
	return nil
}

// run is the background work: copy if needed, then stream, restarting the
// stream after errors that a retry can fix.
func (r *Replicator) run(ctx context.Context, tables []*tableInfo, needCopy bool) error {
	if needCopy {
		r.phase.Store(PhaseCopying)
		if err := r.copyAll(ctx, tables); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
	}
	r.phase.Store(PhaseStreaming)
	backoff := 100 * time.Millisecond
	for {
		start := time.Now()
		err := r.session(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, errPaused) {
			if err := r.waitUnpaused(ctx); err != nil {
				return nil
			}
			continue
		}
		if !retryable(err) {
			return err
		}
		if time.Since(start) > time.Minute {
			backoff = 100 * time.Millisecond
		}
		r.restarts.Add(1)
		wait := backoff
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "57P01" {
			// Our walsender was terminated: most likely a new leader took
			// the slot. Give it time to apply, so that the next session
			// sees it and stops as superseded instead of taking the slot
			// back.
			wait = max(wait, 2*time.Second)
		}
		r.log.Warn("replication interrupted; resuming from green's applied position", zap.Error(err), zap.Duration("backoff", wait))
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
		backoff = min(backoff*2, 10*time.Second)
	}
}

// retryable says whether a new streaming session may fix err.
func retryable(err error) bool {
	if err == nil {
		return true
	}
	if errors.Is(err, errBehind) {
		return true
	}
	var perm *permanentError
	if errors.As(err, &perm) || errors.Is(err, replication.ErrSuperseded) || errors.Is(err, replication.ErrSlotLost) {
		return false
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch {
		case strings.HasPrefix(pgErr.Code, "08"), // connection exception
			strings.HasPrefix(pgErr.Code, "57"), // operator intervention (terminated, shutdown)
			strings.HasPrefix(pgErr.Code, "53"), // insufficient resources
			strings.HasPrefix(pgErr.Code, "40"), // serialization failure, deadlock
			pgErr.Code == "55006",               // slot in use
			pgErr.Code == "55P03":               // lock not available
			return true
		}
		return false
	}
	var netErr net.Error
	if errors.As(err, &netErr) || pgconn.SafeToRetry(err) || pgconn.Timeout(err) || errors.Is(err, net.ErrClosed) {
		return true
	}
	// Connection-level failures from pgconn (EOF, reset) are not PgErrors:
	// retry them; everything else is a bug or bad data.
	return strings.Contains(err.Error(), "conn closed") || strings.Contains(err.Error(), "EOF") || strings.Contains(err.Error(), "connection reset")
}

// session is one streaming connection: green's applied position is read,
// the stream started there, and receiver and applier run until one fails
// or ctx ends.
func (r *Replicator) session(ctx context.Context) error {
	gconn, err := connectGreen(ctx, r.opts.Pair.Green.DSN)
	if err != nil {
		return err
	}
	defer gconn.Close(context.WithoutCancel(ctx))
	var lsnText string
	var commit *time.Time
	var copied bool
	var epoch int64
	err = gconn.QueryRow(ctx, readAppliedSQL, r.name).Scan(&lsnText, &commit, &copied, &epoch)
	if errors.Is(err, pgx.ErrNoRows) || (err == nil && !copied) {
		return permanent(fmt.Errorf("green: no completed copy recorded for slot %s", r.name))
	}
	if err != nil {
		return fmt.Errorf("green: read applied position: %w", err)
	}
	stored, err := pglogrepl.ParseLSN(lsnText)
	if err != nil {
		return permanent(fmt.Errorf("green: applied position %q: %w", lsnText, err))
	}
	if uint64(epoch) > r.opts.Epoch {
		return fmt.Errorf("%w: green is applied by epoch %d, this replicator has epoch %d", replication.ErrSuperseded, epoch, r.opts.Epoch)
	}
	if mine := pglogrepl.LSN(r.appliedByMe.Load()); uint64(epoch) == r.opts.Epoch && mine != 0 && stored > mine {
		// Someone else of our epoch has applied past what we did (a
		// replicator started after this one): the newest one wins.
		return fmt.Errorf("%w: green's applied position %s is past this replicator's %s", replication.ErrSuperseded, stored, mine)
	}
	if pglogrepl.LSN(r.appliedEnd.Load()) < stored {
		r.appliedEnd.Store(uint64(stored))
		if commit != nil {
			r.appliedCommit.Store(commit.UnixNano())
		}
	}
	a := &applier{r: r, conn: gconn, rels: map[uint32]*relState{}, log: r.log, stored: stored}
	if err := a.setup(ctx); err != nil {
		return err
	}

	rconn, err := r.startStream(ctx, stored)
	if err != nil {
		return err
	}
	defer rconn.Close(context.WithoutCancel(ctx))
	r.log.Debug("stream started", zap.Stringer("from", stored))

	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ch := make(chan *chunk, queueChunks)
	r.queued.Store(0)
	rc := &receiver{r: r, conn: rconn, log: r.log}
	recvErr := make(chan error, 1)
	go func() {
		err := rc.run(sctx, ch)
		// A dead stream ends the session at once: the applier must not
		// go on with what is buffered when the slot may be someone
		// else's now.
		cancel()
		recvErr <- err
	}()
	applyErr := a.applyLoop(sctx, ch)
	cancel()
	rerr := <-recvErr
	if applyErr != nil && !errors.Is(applyErr, context.Canceled) {
		return applyErr
	}
	if rerr != nil && !errors.Is(rerr, context.Canceled) {
		return rerr
	}
	if applyErr != nil && errors.Is(applyErr, context.Canceled) && ctx.Err() == nil {
		return rerr
	}
	return applyErr
}

// connectGreen opens the applier's connection.
func connectGreen(ctx context.Context, dsn config.DSN) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(dsn.Reveal())
	if err != nil {
		return nil, permanent(fmt.Errorf("green: parse dsn %s: %w", dsn, redactErr(err)))
	}
	for k, v := range streamParams {
		cfg.RuntimeParams[k] = v
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("green: connect: %w", err)
	}
	return conn, nil
}

// startStream opens the replication connection and starts streaming at
// from. If the slot is held by another walsender (a deposed leader's, or
// our own previous session that blue has not noticed is gone), that
// backend is terminated and the start retried: the applied-position guard
// on green keeps the old one from applying anything after this.
func (r *Replicator) startStream(ctx context.Context, from pglogrepl.LSN) (*pgconn.PgConn, error) {
	for attempt := 0; ; attempt++ {
		conn, err := connectReplication(ctx, r.opts.Pair.Blue.DSN.Reveal())
		if err != nil {
			return nil, err
		}
		err = pglogrepl.StartReplication(ctx, conn, r.name, from, pglogrepl.StartReplicationOptions{
			Mode: pglogrepl.LogicalReplication,
			PluginArgs: []string{
				"proto_version '1'",
				"publication_names " + quoteLiteral(r.name),
			},
		})
		if err == nil {
			return conn, nil
		}
		conn.Close(context.WithoutCancel(ctx))
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42704" {
			return nil, fmt.Errorf("%w: %s", replication.ErrSlotLost, pgErr.Message)
		}
		if !errors.As(err, &pgErr) || pgErr.Code != "55006" || attempt >= 5 {
			return nil, fmt.Errorf("blue: start replication: %w", err)
		}
		if terr := r.takeOverSlot(ctx); terr != nil {
			return nil, terr
		}
	}
}

// takeOverSlot ends the walsender holding the slot and waits until the
// slot is free.
func (r *Replicator) takeOverSlot(ctx context.Context) error {
	var pid *int32
	if err := r.blue.QueryRow(ctx, `SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1`, r.name).Scan(&pid); err != nil {
		return fmt.Errorf("blue: look up slot holder: %w", err)
	}
	if pid != nil {
		r.log.Warn("slot held by another walsender; terminating it", zap.Int32("pid", *pid))
		if _, err := r.blue.Exec(ctx, `SELECT pg_terminate_backend($1)`, *pid); err != nil {
			return fmt.Errorf("blue: terminate walsender %d holding slot %s: %w", *pid, r.name, err)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		var active bool
		if err := r.blue.QueryRow(ctx, `SELECT active FROM pg_replication_slots WHERE slot_name = $1`, r.name).Scan(&active); err != nil {
			return fmt.Errorf("blue: look up slot: %w", err)
		}
		if !active {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return fmt.Errorf("blue: slot %s still active 10s after its walsender was terminated", r.name)
}

// Stop ends the background work and waits for it (or for ctx). Applied
// changes stay applied; a new Replicator resumes after them.
func (r *Replicator) Stop(ctx context.Context) error {
	r.mu.Lock()
	started, cancel, prepared := r.started, r.cancel, r.prepared != nil
	r.mu.Unlock()
	if !started {
		if prepared {
			r.closePools() // prepared, never started
		}
		return nil
	}
	if cancel != nil {
		cancel()
	}
	select {
	case <-r.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Done is closed when the background work has ended.
func (r *Replicator) Done() <-chan struct{} { return r.done }

// Err is why the background work ended: nil after Stop or cancellation.
func (r *Replicator) Err() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}

func (r *Replicator) finish(err error) {
	r.stopOnce.Do(func() {
		r.mu.Lock()
		r.err = err
		for nonce, ws := range r.waiters {
			for _, w := range ws {
				close(w)
			}
			delete(r.waiters, nonce)
		}
		r.mu.Unlock()
		if err != nil {
			r.phase.Store(PhaseFailed)
			r.log.Error("replication stopped", zap.Error(err))
		} else {
			r.phase.Store(PhaseStopped)
		}
		close(r.done)
	})
}

func (r *Replicator) closePools() {
	r.closeOnce.Do(func() {
		if r.blue != nil {
			r.blue.Close()
		}
		if r.green != nil {
			r.green.Close()
		}
	})
}

// Pause holds the stream back like a disabled subscription: the stream
// is closed (blue's walsender exits and the backlog stays in its WAL) and
// a batch not yet committed is rolled back. Resume starts a new stream
// from green's applied position.
func (r *Replicator) Pause() { r.paused.Store(true) }

// Resume lets a paused stream go on.
func (r *Replicator) Resume() {
	r.resumeMu.Lock()
	defer r.resumeMu.Unlock()
	if r.paused.Swap(false) {
		close(r.resumeCh)
		r.resumeCh = make(chan struct{})
	}
}

func (r *Replicator) resumed() <-chan struct{} {
	r.resumeMu.Lock()
	defer r.resumeMu.Unlock()
	return r.resumeCh
}

func (r *Replicator) waitUnpaused(ctx context.Context) error {
	for r.paused.Load() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-r.resumed():
		}
	}
	return nil
}

// Applied is the end of the last source transaction applied on green.
func (r *Replicator) Applied() pglogrepl.LSN { return pglogrepl.LSN(r.appliedEnd.Load()) }

// Status is a snapshot for `cutover status` and the agent's API.
func (r *Replicator) Status() Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := Status{
		Phase:    r.phase.Load().(Phase),
		Slot:     r.name,
		Copy:     r.progress,
		Applied:  pglogrepl.LSN(r.appliedEnd.Load()),
		Lag:      r.lastLag,
		Paused:   r.paused.Load(),
		Restarts: int(r.restarts.Load()),
	}
	if r.err != nil {
		st.Err = r.err.Error()
	}
	return st
}

// afterCommit publishes what a committed batch did. It runs on the
// applier goroutine.
func (r *Replicator) afterCommit(b *batch) {
	r.appliedEnd.Store(uint64(b.lastEnd))
	r.appliedByMe.Store(uint64(b.lastEnd))
	r.appliedCommit.Store(b.lastCommitTime.UnixNano())
	r.metrics.txns.Add(float64(b.txns))
	r.metrics.changes.Add(float64(b.changes))
	r.metrics.batches.Inc()
	if r.opts.OnRowChange != nil {
		for _, k := range b.rowKeys {
			r.opts.OnRowChange(k.table, k.key)
		}
	}
	if len(b.markers) == 0 && b.heartbeatSeq == 0 && len(b.appChanges) == 0 {
		return
	}
	r.mu.Lock()
	if b.heartbeatSeq > 0 {
		r.hb.applied(b.heartbeatSeq)
	}
	// Markers first: breach recording starts at the first one, and the
	// batch's changes are compared by position against it.
	for _, m := range b.markers {
		r.markers[m.nonce] = m.end
		r.breach.marker(m.end)
	}
	var after []replication.Change
	// Until the first marker nothing is recorded: skip building records
	// while holding the mutex that Lag and Status also take.
	for i := 0; r.breach.started && i < len(b.appChanges); i++ {
		c := b.appChanges[i]
		ch := replication.Change{Table: c.table, Kind: replication.ChangeKind(c.kind), Key: c.key, Position: c.end.String(), CommitTime: c.commitTime}
		if r.breach.add(c.end, ch, r.opts.MaxBreachRecords) && r.opts.OnChangeAfterMarker != nil {
			after = append(after, ch)
		}
	}
	for _, m := range b.markers {
		for _, w := range r.waiters[m.nonce] {
			w <- m.end
			close(w)
		}
		delete(r.waiters, m.nonce)
	}
	r.mu.Unlock()
	for _, ch := range after {
		r.opts.OnChangeAfterMarker(ch)
	}
}

// WaitMarker blocks until the row with this nonce in cutover.markers,
// written on blue, has been applied and committed on green, and returns
// the end position of the source transaction that wrote it (the position
// right after its commit record; every transaction that committed on blue
// before the marker is at or below it and applied). If a previous run
// applied the marker, it returns green's stored position, which is at or
// after it. It returns ErrStopped if the replicator stops first.
func (r *Replicator) WaitMarker(ctx context.Context, nonce string) (pglogrepl.LSN, error) {
	r.mu.Lock()
	if lsn, ok := r.markers[nonce]; ok {
		r.mu.Unlock()
		return lsn, nil
	}
	select {
	case <-r.done:
		r.mu.Unlock()
		return 0, replication.ErrStopped
	default:
	}
	w := make(chan pglogrepl.LSN, 1)
	r.waiters[nonce] = append(r.waiters[nonce], w)
	green := r.green
	r.mu.Unlock()

	// Applied by an earlier run, or copied with the initial copy? The
	// marker row and the applied position commit together on green; look
	// now and then, in case the marker predates this run's stream.
	poll := time.NewTicker(time.Second)
	defer poll.Stop()
	for {
		if green != nil {
			var lsnText string
			err := green.QueryRow(ctx, `SELECT a.lsn::text FROM cutover.markers m, cutover.applied a
				WHERE m.nonce = $1 AND a.slot = $2 AND a.copied_at IS NOT NULL`, nonce, r.name).Scan(&lsnText)
			if err == nil {
				// Found on green. If this run's applier committed it a
				// moment ago, it is about to record it (after the commit):
				// wait for that, so that the exact position is returned and
				// breach recording has started when the caller asks
				// ChangesAfter. Only a marker applied by an earlier run
				// waits the whole delay.
				select {
				case lsn, ok := <-w:
					if ok {
						return lsn, nil
					}
				case <-time.After(500 * time.Millisecond):
				case <-ctx.Done():
					return 0, ctx.Err()
				}
				lsn, err := pglogrepl.ParseLSN(lsnText)
				if err != nil {
					return 0, err
				}
				// The marker predates this run's stream (an earlier run, the
				// initial copy): breach recording starts here at the latest.
				// Every transaction applied from now on ends after lsn,
				// green's applied position, so none is missed.
				r.mu.Lock()
				r.breach.marker(lsn)
				r.mu.Unlock()
				return lsn, nil
			}
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case lsn, ok := <-w:
			if !ok {
				return 0, replication.ErrStopped
			}
			return lsn, nil
		case <-poll.C:
		}
	}
}

// ChangesAfter returns the application row changes (tables outside schema
// cutover) applied from source transactions that ended after pos, in
// apply order. Recording starts when the stream first carries a marker;
// at least the newest MaxBreachRecords changes are kept. complete is false when
// changes after pos may be missing (pos is before the first marker, or
// older changes were dropped). Fencing calls it with the position
// WaitMarker returned: any change is a write that got past the fence.
func (r *Replicator) ChangesAfter(pos pglogrepl.LSN) (changes []replication.Change, complete bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.breach.after(pos)
}

// breachLog keeps the application changes applied after the first marker.
type breachLog struct {
	started bool
	// since: changes of transactions ending at or before it may be
	// missing (before the first marker, or dropped for room).
	since   pglogrepl.LSN
	records []breachRecord
}

type breachRecord struct {
	end    pglogrepl.LSN
	change replication.Change
}

// marker notes an applied marker; recording starts at the first.
func (l *breachLog) marker(end pglogrepl.LSN) {
	if !l.started {
		l.started = true
		l.since = end
	}
}

// add records a change; it reports whether it follows a marker.
func (l *breachLog) add(end pglogrepl.LSN, c replication.Change, max int) bool {
	if !l.started || end <= l.since {
		return false
	}
	l.records = append(l.records, breachRecord{end, c})
	// Trimmed in bulk, back to max, when it holds twice that: each change
	// then costs O(1) amortized. Trimming one at a time moved the whole
	// log for every change once it was full (94 µs a change at the
	// default bound, under the mutex that Lag and Status take: under the
	// race detector, enough to stall apply under load).
	if len(l.records) > 2*max {
		drop := len(l.records) - max
		l.since = l.records[drop-1].end
		n := copy(l.records, l.records[drop:])
		clear(l.records[n:]) // let the dropped changes' strings go
		l.records = l.records[:n]
	}
	return true
}

func (l *breachLog) after(pos pglogrepl.LSN) ([]replication.Change, bool) {
	var out []replication.Change
	for _, rec := range l.records {
		if rec.end > pos {
			out = append(out, rec.change)
		}
	}
	return out, l.started && pos >= l.since
}
