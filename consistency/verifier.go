package consistency

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/cutover/cutover/internal/redact"
)

// Defaults for Options.
const (
	DefaultChunkTime        = 500 * time.Millisecond
	DefaultInitialChunkRows = 10_000
	DefaultMinChunkRows     = 100
	DefaultMaxChunkRows     = 2_000_000
	DefaultParallel         = 2
	DefaultBisectRows       = 32
	DefaultMaxDifferences   = 100
	DefaultMaxValueBytes    = 256
	DefaultRechecks         = 3
	DefaultKeysPerQuery     = 5_000
	DefaultMaxExceptKeys    = 5_000
	DefaultMaxExceptShare   = 0.5
	DefaultProgressEvery    = 10 * time.Second
	DefaultBatchBytes       = 1 << 20
	// batchTables and batchBytes bound one batch of small tables hashed
	// in one statement: its SQL text, and the time of its round trip.
	batchTables = 100
	batchBytes  = 8 << 20
)

// Options tune a Verifier. The zero value is ready to use.
type Options struct {
	// Plan names the plan in reports.
	Plan string
	// BlueDSN and GreenDSN are shown in reports, password removed.
	BlueDSN, GreenDSN string
	// ChunkTime is the target time to hash one chunk on one side; the
	// chunk size adapts to it, within [MinChunkRows, MaxChunkRows],
	// starting at InitialChunkRows.
	ChunkTime                                    time.Duration
	InitialChunkRows, MinChunkRows, MaxChunkRows int64
	// Parallel is how many chunks are compared at once; each holds one
	// connection per side. On a small server, more than its cores does
	// not help: hashing is CPU-bound there.
	Parallel int
	// MaxRowsPerSecond caps the rows read on blue; 0 is unlimited.
	MaxRowsPerSecond int
	// BisectRows: a differing span is split until it holds at most this
	// many rows, which are then fetched and compared one by one.
	BisectRows int64
	// MaxDifferences caps the row differences listed per table; once
	// reached, further differing chunks are counted but not bisected.
	MaxDifferences int
	// MaxValueBytes truncates long values in reports.
	MaxValueBytes int
	// Rechecks is how often an online pass re-checks a differing chunk
	// that is still being written before leaving it to the fence pass.
	Rechecks int
	// KeysPerQuery caps the keys hashed by one query in a dirty pass.
	KeysPerQuery int
	// MaxExceptKeys and MaxExceptShare bound how many keys an online
	// re-check may leave out of a chunk that is still being written (the
	// keys the change stream marked while the chunk was read, when both
	// sides implement Snapshotter): at most MaxExceptKeys, and at most
	// MaxExceptShare of the chunk's rows. Beyond that, hashing the keys
	// one by one in the fence would cost about as much as the chunk, and
	// the chunk is left unsettled whole. MaxExceptKeys < 0 turns this
	// off.
	MaxExceptKeys  int
	MaxExceptShare float64
	// BatchBytes: tables with a key, at most this size on disk and
	// surely no more rows than InitialChunkRows (see Table.MaxRows: a
	// table its walk would read as one chunk) are hashed whole, up to a
	// hundred in one statement per side, when both engines implement
	// BatchHasher; a table whose digest differs is then compared as a
	// differing chunk. It removes the per-table round trips that dominate
	// a pass over thousands of small tables. Negative turns batching off.
	BatchBytes int64
	// Logger gets phase and progress lines; nil logs nothing. Tables
	// hashed in a batch, and tables a dirty pass has nothing to re-check
	// in, are logged at debug level only (one line per table of a schema
	// of thousands would cost more than comparing them).
	Logger *zap.Logger
	// OnProgress, when set, is called after every chunk (from several
	// goroutines; it must be quick and safe for concurrent use).
	OnProgress func(Progress)
	// ProgressEvery is the interval of progress log lines.
	ProgressEvery time.Duration
}

func (o *Options) defaults() {
	if o.ChunkTime <= 0 {
		o.ChunkTime = DefaultChunkTime
	}
	if o.MinChunkRows <= 0 {
		o.MinChunkRows = DefaultMinChunkRows
	}
	if o.MaxChunkRows <= 0 {
		o.MaxChunkRows = DefaultMaxChunkRows
	}
	if o.MaxChunkRows < o.MinChunkRows {
		o.MaxChunkRows = o.MinChunkRows
	}
	if o.InitialChunkRows <= 0 {
		o.InitialChunkRows = DefaultInitialChunkRows
	}
	o.InitialChunkRows = min(max(o.InitialChunkRows, o.MinChunkRows), o.MaxChunkRows)
	if o.Parallel <= 0 {
		o.Parallel = DefaultParallel
	}
	if o.BisectRows <= 0 {
		o.BisectRows = DefaultBisectRows
	}
	if o.MaxDifferences <= 0 {
		o.MaxDifferences = DefaultMaxDifferences
	}
	if o.MaxValueBytes <= 0 {
		o.MaxValueBytes = DefaultMaxValueBytes
	}
	if o.Rechecks <= 0 {
		o.Rechecks = DefaultRechecks
	}
	if o.KeysPerQuery <= 0 {
		o.KeysPerQuery = DefaultKeysPerQuery
	}
	if o.ProgressEvery <= 0 {
		o.ProgressEvery = DefaultProgressEvery
	}
	if o.MaxExceptKeys == 0 {
		o.MaxExceptKeys = DefaultMaxExceptKeys
	}
	if o.MaxExceptShare <= 0 || o.MaxExceptShare > 1 {
		o.MaxExceptShare = DefaultMaxExceptShare
	}
	if o.BatchBytes == 0 {
		o.BatchBytes = DefaultBatchBytes
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
}

// Verifier compares blue with green. Its methods may be called one after
// another (Online, then Dirty); one pass at a time.
type Verifier struct {
	blue, green Database
	opts        Options
	log         *zap.Logger

	mu        sync.Mutex
	prog      *progress            // of the pass running, or the last one
	described map[string]described // by table names, for Dirty
}

// described is what start read from both sides.
type described struct {
	fb, fg string
	tb, tg []*Table
	// problems (by index into tb) and extra (tables on green only) are
	// the schema comparison, done once per description: the dirty pass
	// inside the fence reuses it.
	problems [][]string
	extra    []string
}

// NewVerifier returns a Verifier comparing blue with green.
func NewVerifier(blue, green Database, opts Options) *Verifier {
	opts.defaults()
	return &Verifier{blue: blue, green: green, opts: opts, log: opts.Logger}
}

// Full compares every chunk of the tables named (all user tables when
// names is empty) once. Both sides must be quiet: standalone verification,
// or inside the fence after catch-up. The result is exact.
//
// The report is returned even when err is not nil, unless the pass could
// not start (a side unreachable, no primary key, incompatible sides). Rows
// that could not be compared make the verdict Incomplete.
func (v *Verifier) Full(ctx context.Context, names []string) (*Report, error) {
	return v.walk(ctx, PassFull, names, nil, nil)
}

// Online compares every chunk while blue is written and replicated into
// green. Before calling it, the caller must have made d.MarkChanged the
// replication engine's change hook, so that every change applied from now
// on is recorded. A differing chunk is re-checked through w (see
// PositionWaiter); only a difference that persists is reported. Chunks
// found clean drop their recorded keys from d; chunks still changing are
// settled except for the keys changed while they were read (when both
// sides implement Snapshotter), which stay in d, or else left in d whole,
// for Dirty. w must not be nil; d may be nil (no dirty tracking).
func (v *Verifier) Online(ctx context.Context, names []string, w PositionWaiter, d *DirtySet) (*Report, error) {
	if w == nil {
		return nil, errors.New("online pass: no position waiter: use Full when nothing replicates")
	}
	return v.walk(ctx, PassOnline, names, w, d)
}

// Dirty re-checks, exactly, only what d holds for the tables named (all
// user tables when empty): the keys the change stream reported since
// Online checked their chunk, the ranges they were folded into, chunks
// Online could not settle, and in full any table Online did not walk or
// that was truncated. Call it inside the fence, after green has applied
// everything up to the fence: both sides are then quiet and the
// comparison is exact. Tables found clean are settled in d.
//
// A table without a usable key changed since Online is re-hashed whole
// (the stream cannot name its rows): its cost inside the fence grows with
// the table's size, not with what changed.
func (v *Verifier) Dirty(ctx context.Context, names []string, d *DirtySet) (*Report, error) {
	if d == nil {
		return nil, errors.New("dirty pass: no dirty set")
	}
	r, tables, err := v.start(ctx, PassDirty, names, d)
	if err != nil {
		return nil, err
	}
	defer r.stop()
	for _, t := range tables {
		if err := ctx.Err(); err != nil {
			return r.finish(ctx), err
		}
		snap := d.snapshot(t.Name)
		if snap.empty() {
			// Nothing changed since it was found equal: no query, and
			// no line at info level, so that the pass costs what changed,
			// not the number of tables in scope.
			r.newTable(t, nil, true).done()
			continue
		}
		tr := r.newTable(t, nil, false)
		if snap.whole || len(t.Key) == 0 && len(snap.keys)+len(snap.ranges) > 0 {
			why := "not walked online, or truncated since"
			if len(t.Key) == 0 {
				why = "no key to name its changed rows by: changed since the online pass, or not walked online"
			}
			v.log.Info("dirty pass: checking the whole table", zap.String("table", t.Name), zap.String("why", why))
			tr.info.Warnings = append(tr.info.Warnings, "checked whole: "+why)
			tr.walkAll(ctx)
		} else {
			spans := v.dirtySpans(snap)
			v.log.Debug("dirty pass: table", zap.String("table", t.Name), zap.Int("keys", len(snap.keys)), zap.Int("ranges", len(snap.ranges)))
			tr.checkSpans(ctx, spans)
		}
		tr.done()
		if tr.info.Error == "" && tr.info.DifferenceCount == 0 && tr.info.ChunksDiffering == 0 {
			d.settle(t.Name, snap)
		}
	}
	return r.finish(ctx), ctx.Err()
}

// Refresh re-checks, online, only what d holds for the tables named (all
// user tables when empty): the keys changed since Online (or the last
// Refresh) checked them, their ranges, and chunks left unsettled; a table
// d wants whole is walked as Online would. Like Online it needs the
// stream running with d.MarkChanged as its hook and w to wait for green;
// what it finds equal (except keys changed while it read) leaves d.
//
// Why: Dirty, inside the fence, costs what changed since the last online
// check, and a plan that waits after Online (a lag hold time) lets that
// grow with every write meanwhile. Refresh right before fencing (as often
// as it takes to get small) leaves Dirty only what changed during the
// last Refresh. Its report has the pass "online".
func (v *Verifier) Refresh(ctx context.Context, names []string, w PositionWaiter, d *DirtySet) (*Report, error) {
	if w == nil || d == nil {
		return nil, errors.New("refresh pass: needs a position waiter and a dirty set")
	}
	r, tables, err := v.start(ctx, PassOnline, names, d)
	if err != nil {
		return nil, err
	}
	defer r.stop()
	r.w = w
	r.rep.handedOff = true
	for _, t := range tables {
		if err := ctx.Err(); err != nil {
			return r.finish(ctx), err
		}
		snap := d.snapshot(t.Name)
		if snap.empty() {
			r.newTable(t, d, true).done()
			continue
		}
		tr := r.newTable(t, d, false)
		if snap.whole || len(t.Key) == 0 && len(snap.keys)+len(snap.ranges) > 0 {
			start := d.beginWalk(t.Name)
			tr.walkAll(ctx)
			tr.done()
			if tr.info.Error == "" {
				d.endWalk(t.Name, start)
			}
			continue
		}
		tr.checkSpans(ctx, v.dirtySpans(snap))
		tr.done()
	}
	return r.finish(ctx), ctx.Err()
}

// dirtySpans are the spans a dirty snapshot asks to re-check: its keys in
// batches of KeysPerQuery, then its ranges.
func (v *Verifier) dirtySpans(snap dirtySnapshot) []Span {
	spans := make([]Span, 0, len(snap.ranges)+len(snap.keys)/v.opts.KeysPerQuery+1)
	for i := 0; i < len(snap.keys); i += v.opts.KeysPerQuery {
		spans = append(spans, Span{Keys: snap.keys[i:min(i+v.opts.KeysPerQuery, len(snap.keys))]})
	}
	return append(spans, snap.ranges...)
}

// Progress returns the progress of the running pass (or the last one).
func (v *Verifier) Progress() Progress {
	v.mu.Lock()
	p := v.prog
	v.mu.Unlock()
	if p == nil {
		return Progress{}
	}
	return p.snapshot()
}

// walk runs a full or online pass.
//
// Small tables (see Options.BatchBytes) are hashed whole in batches, a
// few batches ahead of the table being compared; the report lists every
// table in the order described either way.
func (v *Verifier) walk(ctx context.Context, pass Pass, names []string, w PositionWaiter, d *DirtySet) (*Report, error) {
	r, tables, err := v.start(ctx, pass, names, d)
	if err != nil {
		return nil, err
	}
	defer r.stop()
	r.w = w
	r.rep.handedOff = d != nil
	items := v.batches(tables)
	bt := r.hashBatches(ctx, items, d)
	defer bt.stop()
	for i, it := range items {
		if err := ctx.Err(); err != nil {
			return r.finish(ctx), err
		}
		if it.batch != nil {
			r.compareBatch(ctx, it.batch, bt.take(i), d)
			continue
		}
		r.walkTable(ctx, it.table, d)
	}
	return r.finish(ctx), ctx.Err()
}

// walkTable compares one table chunk by chunk, recording the walk in d.
func (r *run) walkTable(ctx context.Context, t *Table, d *DirtySet) {
	var startGen uint64
	if d != nil {
		startGen = d.beginWalk(t.Name)
	}
	tr := r.newTable(t, d, false)
	tr.walkAll(ctx)
	tr.done()
	if d != nil && tr.info.Error == "" {
		d.endWalk(t.Name, startGen)
	}
}

// walkItem is a table to walk, or a batch of small tables to hash whole.
type walkItem struct {
	table *Table
	batch []*Table
}

// batches groups consecutive small tables into batches, when both sides
// can hash them so.
func (v *Verifier) batches(tables []*Table) []walkItem {
	_, okb := v.blue.(BatchHasher)
	_, okg := v.green.(BatchHasher)
	var items []walkItem
	var cur []*Table
	var curBytes int64
	flush := func() {
		if len(cur) > 0 {
			items = append(items, walkItem{batch: cur})
			cur, curBytes = nil, 0
		}
	}
	for _, t := range tables {
		// Only a table its walk would read as one chunk anyway: batching
		// saves round trips and changes nothing else.
		small := okb && okg && v.opts.BatchBytes > 0 && len(t.Key) > 0 && t.Bytes >= 0 && t.Bytes <= v.opts.BatchBytes &&
			t.MaxRows >= 0 && t.MaxRows <= v.opts.InitialChunkRows
		if !small {
			flush()
			items = append(items, walkItem{table: t})
			continue
		}
		if len(cur) >= batchTables || curBytes+t.Bytes > batchBytes {
			flush()
		}
		cur = append(cur, t)
		curBytes += t.Bytes
	}
	flush()
	return items
}

// batchResult is the digests of a batch of tables on both sides.
type batchResult struct {
	gen  uint64 // DirtySet generation before the tables were read
	b, g []Digest
	err  error
}

// batcher hashes the batches of a walk in order, on both sides at once,
// at most Parallel batches ahead of the table being compared.
type batcher struct {
	results []chan batchResult // by item; nil for a table walked alone
	ahead   chan struct{}      // a place per batch hashed and not yet taken
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup
}

func (r *run) hashBatches(ctx context.Context, items []walkItem, d *DirtySet) *batcher {
	bt := &batcher{results: make([]chan batchResult, len(items)), ahead: make(chan struct{}, r.v.opts.Parallel)}
	bt.ctx, bt.cancel = context.WithCancel(ctx)
	for i, it := range items {
		if it.batch != nil {
			bt.results[i] = make(chan batchResult, 1)
		}
	}
	bt.wg.Add(1)
	go func() {
		defer bt.wg.Done()
		for i, it := range items {
			if it.batch == nil {
				continue
			}
			select {
			case bt.ahead <- struct{}{}:
			case <-bt.ctx.Done():
				return
			}
			bt.wg.Add(1)
			go func() {
				defer bt.wg.Done()
				bt.results[i] <- r.hashBatch(bt.ctx, it.batch, d)
			}()
		}
	}()
	return bt
}

// take waits for the digests of batch item i.
func (bt *batcher) take(i int) batchResult {
	select {
	case res := <-bt.results[i]:
		<-bt.ahead
		return res
	case <-bt.ctx.Done():
		return batchResult{err: bt.ctx.Err()}
	}
}

// stop ends the work left and waits for it.
func (bt *batcher) stop() {
	bt.cancel()
	bt.wg.Wait()
}

// hashBatch hashes a batch of tables whole on both sides at once.
func (r *run) hashBatch(ctx context.Context, ts []*Table, d *DirtySet) (res batchResult) {
	var rows int64
	for _, t := range ts {
		if d != nil {
			d.beginWalk(t.Name)
		}
		rows += max(t.EstimatedRows, 1)
	}
	if d != nil {
		// Taken before the reads: a change marked later is not covered.
		res.gen = d.Generation()
	}
	if res.err = r.limiter.wait(ctx, rows); res.err != nil {
		return res
	}
	eg, ectx := errgroup.WithContext(ctx)
	eg.Go(func() (err error) {
		if res.b, err = r.v.blue.(BatchHasher).ChecksumTables(ectx, ts); err != nil {
			return fmt.Errorf("blue: %w", err)
		}
		return nil
	})
	eg.Go(func() (err error) {
		if res.g, err = r.v.green.(BatchHasher).ChecksumTables(ectx, ts); err != nil {
			return fmt.Errorf("green: %w", err)
		}
		return nil
	})
	res.err = eg.Wait()
	return res
}

// compareBatch records the tables of a batch: equal ones as one chunk
// each; one that differs is resolved as a chunk spanning the whole table
// (re-checked online, bisected to rows). If the batch could not be
// hashed, each table is walked on its own, so that an error names its
// table.
func (r *run) compareBatch(ctx context.Context, ts []*Table, res batchResult, d *DirtySet) {
	if res.err != nil {
		if ctx.Err() != nil {
			return
		}
		r.v.log.Info("verify: batch of small tables could not be hashed; walking them one by one",
			zap.Int("tables", len(ts)), zap.String("error", redact.Text(res.err.Error())))
		for _, t := range ts {
			if ctx.Err() != nil {
				return
			}
			r.walkTable(ctx, t, d)
		}
		return
	}
	for i, t := range ts {
		tr := r.newTable(t, d, true)
		c := chunk{span: Span{}, rows: res.b[i].Rows}
		if err := tr.compared(ctx, c, res.gen, res.b[i], res.g[i]); err != nil {
			tr.fail(err)
		}
		tr.done()
		if d != nil && tr.info.Error == "" {
			d.endWalk(t.Name, res.gen)
		}
	}
}

// run is one pass.
type run struct {
	v       *Verifier
	rep     *Report
	w       PositionWaiter
	prog    *progress
	limiter *limiter
	// schema holds tables that were not compared because their schema
	// differs; they go into the report as they are.
	stopLog func()
}

// start describes both sides, checks they can be compared, and opens the
// report.
func (v *Verifier) start(ctx context.Context, pass Pass, names []string, d *DirtySet) (*run, []*Table, error) {
	rep := &Report{
		Version:   ReportVersion,
		Plan:      v.opts.Plan,
		Pass:      pass,
		StartedAt: time.Now().UTC(),
		Blue:      Side{DSN: redact.DSN(v.opts.BlueDSN)},
		Green:     Side{DSN: redact.DSN(v.opts.GreenDSN)},
		Settings: Settings{
			ChunkTimeSeconds: v.opts.ChunkTime.Seconds(),
			Parallel:         v.opts.Parallel,
			MaxRowsPerSecond: v.opts.MaxRowsPerSecond,
		},
		Tables: []*TableInfo{},
	}
	cacheKey := strings.Join(names, ",")
	v.mu.Lock()
	cached, ok := v.described[cacheKey]
	v.mu.Unlock()
	var fb, fg string
	var tb, tg []*Table
	if ok && pass == PassDirty {
		// Inside the fence, every millisecond counts: the catalogs were
		// read by the online pass and the schema cannot have changed
		// under a running replication.
		fb, fg, tb, tg = cached.fb, cached.fg, cached.tb, cached.tg
	} else {
		if err := v.describe(ctx, pass, names, &fb, &fg, &tb, &tg); err != nil {
			return nil, nil, err
		}
		cached = described{fb: fb, fg: fg, tb: tb, tg: tg}
		cached.problems, cached.extra = compareSchemas(tb, tg)
		v.mu.Lock()
		if v.described == nil {
			v.described = make(map[string]described)
		}
		v.described[cacheKey] = cached
		v.mu.Unlock()
	}

	if fb != fg {
		return nil, nil, fmt.Errorf("%w: blue %s, green %s", ErrIncompatible, fb, fg)
	}
	var noKey []string
	for _, t := range tb {
		if len(t.Key) == 0 {
			noKey = append(noKey, t.Name)
		}
	}
	_, mb := v.blue.(MultisetHasher)
	_, mg := v.green.(MultisetHasher)
	if len(noKey) > 0 && (!mb || !mg) {
		return nil, nil, fmt.Errorf("%w: %s: this engine cannot compare a table without one; add a primary key or leave the table out (--tables)",
			ErrNoPrimaryKey, strings.Join(noKey, ", "))
	}
	var unknown []string
	if len(names) > 0 {
		// A name matches a table by its full name or by what follows a
		// dot in it (the table without its schema). A set, not a scan per
		// name: the driver names thousands of tables.
		known := make(map[string]bool, 2*len(tb))
		for _, t := range tb {
			known[t.Name] = true
			for i := range len(t.Name) {
				if t.Name[i] == '.' {
					known[t.Name[i+1:]] = true
				}
			}
		}
		for _, name := range names {
			if !known[name] {
				unknown = append(unknown, name)
			}
		}
	}
	if len(unknown) > 0 {
		return nil, nil, fmt.Errorf("%w: no table named %s on blue", ErrUnverifiable, strings.Join(unknown, ", "))
	}
	tables := make([]*Table, 0, len(tb))
	for i, t := range tb {
		if problems := cached.problems[i]; len(problems) > 0 {
			rep.Tables = append(rep.Tables, &TableInfo{Name: t.Name, Key: keyNames(t), Schema: problems})
			v.log.Warn("verify: schema differs, table not compared", zap.String("table", t.Name), zap.Strings("problems", problems))
			continue
		}
		tables = append(tables, t)
		if d != nil {
			d.setKinds(t.Name, t.KeyKinds())
		}
	}
	if len(names) == 0 {
		for _, name := range cached.extra {
			rep.Tables = append(rep.Tables, &TableInfo{Name: name, Schema: []string{"table exists on green only"}})
		}
	}
	r := &run{v: v, rep: rep, prog: newProgress(pass, tables)}
	if v.opts.MaxRowsPerSecond > 0 {
		r.limiter = &limiter{rate: float64(v.opts.MaxRowsPerSecond)}
	}
	v.mu.Lock()
	v.prog = r.prog
	v.mu.Unlock()
	rep.Blue.PositionStart, rep.Green.PositionStart = r.positions(ctx)
	r.stopLog = r.logProgress()
	v.log.Info("verify: comparing", zap.String("pass", string(pass)), zap.Int("tables", len(tables)),
		zap.Int64("estimated_rows", r.prog.rowsTotal))
	return r, tables, nil
}

// describe reads fingerprints and tables from both sides at once.
func (v *Verifier) describe(ctx context.Context, pass Pass, names []string, fb, fg *string, tb, tg *[]*Table) error {
	v.log.Info("verify: describing both sides", zap.String("pass", string(pass)))
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() (err error) {
		if *fb, err = v.blue.Fingerprint(gctx); err != nil {
			return fmt.Errorf("blue: %w", err)
		}
		if *tb, err = v.blue.Describe(gctx, names); err != nil {
			return fmt.Errorf("blue: %w", err)
		}
		return nil
	})
	g.Go(func() (err error) {
		if *fg, err = v.green.Fingerprint(gctx); err != nil {
			return fmt.Errorf("green: %w", err)
		}
		if *tg, err = v.green.Describe(gctx, names); err != nil {
			return fmt.Errorf("green: %w", err)
		}
		return nil
	})
	return g.Wait()
}

// positions reads both sides' positions, for the report.
func (r *run) positions(ctx context.Context) (blue, green string) {
	var mu sync.Mutex
	var wg sync.WaitGroup
	read := func(db Database, side string, out *string) {
		defer wg.Done()
		pos, err := db.Position(ctx)
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			r.rep.Errors = append(r.rep.Errors, redact.Text(fmt.Sprintf("%s position: %v", side, err)))
			return
		}
		*out = pos
	}
	wg.Add(2)
	go read(r.v.blue, "blue", &blue)
	go read(r.v.green, "green", &green)
	wg.Wait()
	return blue, green
}

// logProgress logs progress every ProgressEvery until the returned stop
// is called; stop waits for the logging goroutine to end.
func (r *run) logProgress() (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(r.v.opts.ProgressEvery)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
				p := r.prog.snapshot()
				r.v.log.Info("verify: progress", zap.String("table", p.Table),
					zap.String("tables", fmt.Sprintf("%d/%d", p.TablesDone, p.TablesTotal)),
					zap.Int64("chunks", p.Chunks), zap.Int64("rows", p.Rows), zap.Int64("rows_estimated", p.RowsTotal),
					zap.Int64("differences", p.Differences), zap.Duration("eta", p.ETA.Round(time.Second)))
			}
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() {
			close(done)
			wg.Wait()
		})
	}
}

func (r *run) stop() { r.stopLog() }

// finish closes the report.
func (r *run) finish(ctx context.Context) *Report {
	r.stop()
	if err := ctx.Err(); err != nil {
		r.rep.Errors = append(r.rep.Errors, "pass cancelled: "+err.Error())
		// Positions cannot be read on a cancelled context.
	} else {
		r.rep.Blue.PositionEnd, r.rep.Green.PositionEnd = r.positions(ctx)
	}
	r.rep.FinishedAt = time.Now().UTC()
	r.rep.finish()
	r.v.log.Info("verify: done", zap.String("pass", string(r.rep.Pass)), zap.String("verdict", string(r.rep.Verdict)),
		zap.Int64("rows", r.rep.Totals.RowsBlue), zap.Int64("chunks", r.rep.Totals.Chunks),
		zap.Int64("differences", r.rep.Totals.Differences), zap.Duration("took", r.rep.FinishedAt.Sub(r.rep.StartedAt).Round(time.Millisecond)))
	return r.rep
}

func keyNames(t *Table) []string {
	out := make([]string, len(t.Key))
	for i, k := range t.Key {
		out[i] = t.Columns[k].Name
	}
	return out
}

// compareSchemas compares every table of blue with green's: the problems
// of each (by index into blue), and the tables on green only, sorted.
func compareSchemas(blue, green []*Table) (problems [][]string, extra []string) {
	greenByName := make(map[string]*Table, len(green))
	for _, t := range green {
		greenByName[t.Name] = t
	}
	problems = make([][]string, len(blue))
	for i, t := range blue {
		if problems[i] = compareSchema(t, greenByName[t.Name]); len(problems[i]) == 0 {
			delete(greenByName, t.Name)
		}
	}
	for name := range greenByName {
		extra = append(extra, name)
	}
	sort.Strings(extra)
	return problems, extra
}

// compareSchema lists what keeps green's table from being compared with
// blue's: missing table, missing or extra columns, different types or
// keys. Column order may differ: columns are matched by name.
func compareSchema(blue, green *Table) []string {
	if green == nil {
		return []string{"table missing on green"}
	}
	var problems []string
	gcols := make(map[string]Column, len(green.Columns))
	for _, c := range green.Columns {
		gcols[c.Name] = c
	}
	for _, c := range blue.Columns {
		gc, ok := gcols[c.Name]
		switch {
		case !ok:
			problems = append(problems, fmt.Sprintf("column %s missing on green", c.Name))
		case gc.Type != c.Type:
			problems = append(problems, fmt.Sprintf("column %s is %s on blue, %s on green", c.Name, c.Type, gc.Type))
		case gc.Hash != c.Hash:
			problems = append(problems, fmt.Sprintf("column %s hashes as %s on blue, %s on green", c.Name, c.Hash, gc.Hash))
		}
		delete(gcols, c.Name)
	}
	var extra []string
	for name := range gcols {
		extra = append(extra, name)
	}
	sort.Strings(extra)
	for _, name := range extra {
		problems = append(problems, fmt.Sprintf("column %s exists on green only", name))
	}
	if bk, gk := strings.Join(keyNames(blue), ", "), strings.Join(keyNames(green), ", "); bk != gk {
		problems = append(problems, fmt.Sprintf("primary key is (%s) on blue, (%s) on green", bk, gk))
	}
	return problems
}

// tableRun compares one table.
type tableRun struct {
	*run
	t     *Table
	d     *DirtySet // nil: no dirty tracking (full and dirty passes)
	start time.Time
	quiet bool // log at debug level unless it differs

	mu     sync.Mutex // guards info and rate
	info   *TableInfo
	rate   float64 // rows per second per chunk, smoothed; 0 until measured
	capped bool    // MaxDifferences reached
	// loose are key-less rows listed as one copy missing or extra, to
	// pair as changed once the table is done (see pairChanged).
	loose []looseRow
}

// newTable opens a table's report entry. quiet logs it at debug level
// only (unless it differs): tables hashed in a batch, and tables a dirty
// pass has nothing to re-check in.
func (r *run) newTable(t *Table, d *DirtySet, quiet bool) *tableRun {
	info := &TableInfo{Name: t.Name, Key: keyNames(t), KeyLess: len(t.Key) == 0, Warnings: t.Warnings}
	r.rep.Tables = append(r.rep.Tables, info)
	r.prog.beginTable(t.Name)
	if !quiet {
		r.v.log.Info("verify: table", zap.String("table", t.Name), zap.Int64("estimated_rows", t.EstimatedRows))
	}
	return &tableRun{run: r, t: t, d: d, info: info, start: time.Now(), quiet: quiet}
}

func (tr *tableRun) done() {
	tr.mu.Lock()
	tr.info.DurationSeconds = time.Since(tr.start).Seconds()
	tr.mu.Unlock()
	tr.prog.endTable(tr.t.EstimatedRows)
	lvl := tr.v.log.Info
	if tr.quiet {
		lvl = tr.v.log.Debug
	}
	if tr.info.DifferenceCount > 0 || tr.info.Error != "" {
		lvl = tr.v.log.Warn
	}
	lvl("verify: table done", zap.String("table", tr.t.Name), zap.Int64("rows_blue", tr.info.RowsBlue),
		zap.Int64("rows_green", tr.info.RowsGreen), zap.Int64("chunks", tr.info.Chunks),
		zap.Int64("differences", tr.info.DifferenceCount), zap.String("error", tr.info.Error))
}

func (tr *tableRun) fail(err error) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if tr.info.Error == "" {
		tr.info.Error = redact.Text(err.Error())
	}
}

// chunk is a span with the row count expected on blue, for throttling.
type chunk struct {
	span Span
	rows int64
}

// walkAll compares the whole table, chunk by chunk. Boundaries are walked
// on blue only, one chunk ahead of the workers, and used on both sides:
// each chunk is [previous boundary, key at offset n), the first open
// below and the last open above, so rows that exist on green only are
// covered wherever their keys fall.
//
// A table without a key is compared as a multiset instead (see
// walkMultiset).
func (tr *tableRun) walkAll(ctx context.Context) {
	if len(tr.t.Key) == 0 {
		tr.walkMultiset(ctx)
		return
	}
	chunks := make(chan chunk, tr.v.opts.Parallel)
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		defer close(chunks)
		var lo []string
		for {
			n := tr.chunkRows()
			hi, err := tr.v.blue.KeyAt(gctx, tr.t, Span{Lo: lo}, n)
			if err != nil {
				return fmt.Errorf("chunk boundary on blue: %w", err)
			}
			select {
			case chunks <- chunk{span: Span{Lo: lo, Hi: hi}, rows: n}:
			case <-gctx.Done():
				return gctx.Err()
			}
			if hi == nil {
				return nil
			}
			lo = hi
		}
	})
	tr.workers(gctx, g, chunks)
	if err := g.Wait(); err != nil {
		tr.fail(err)
	}
}

// checkSpans compares the given spans.
func (tr *tableRun) checkSpans(ctx context.Context, spans []Span) {
	chunks := make(chan chunk)
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		defer close(chunks)
		for _, s := range spans {
			rows := int64(len(s.Keys))
			if !s.IsKeySet() {
				rows = tr.v.opts.InitialChunkRows
			}
			select {
			case chunks <- chunk{span: s, rows: rows}:
			case <-gctx.Done():
				return gctx.Err()
			}
		}
		return nil
	})
	tr.workers(gctx, g, chunks)
	if err := g.Wait(); err != nil {
		tr.fail(err)
	}
}

func (tr *tableRun) workers(ctx context.Context, g *errgroup.Group, chunks <-chan chunk) {
	for i := 0; i < tr.v.opts.Parallel; i++ {
		g.Go(func() error {
			for c := range chunks {
				if err := tr.checkChunk(ctx, c); err != nil {
					return err
				}
			}
			return nil
		})
	}
}

// chunkRows is the size of the next chunk: the measured rate times the
// target chunk time.
func (tr *tableRun) chunkRows() int64 {
	tr.mu.Lock()
	rate := tr.rate
	tr.mu.Unlock()
	o := tr.v.opts
	if rate <= 0 {
		return o.InitialChunkRows
	}
	n := int64(rate * o.ChunkTime.Seconds())
	return min(max(n, o.MinChunkRows), o.MaxChunkRows)
}

func (tr *tableRun) observe(rows int64, took time.Duration) {
	if rows < tr.v.opts.MinChunkRows/2 || took <= 0 {
		return // too small to say anything about the rate
	}
	rate := float64(rows) / took.Seconds()
	tr.mu.Lock()
	if tr.rate == 0 {
		tr.rate = rate
	} else {
		tr.rate = 0.7*tr.rate + 0.3*rate
	}
	tr.mu.Unlock()
}

func (tr *tableRun) generation() uint64 {
	if tr.d == nil {
		return 0
	}
	return tr.d.Generation()
}

// checkChunk compares one chunk and resolves a difference.
func (tr *tableRun) checkChunk(ctx context.Context, c chunk) error {
	if err := tr.limiter.wait(ctx, c.rows); err != nil {
		return err
	}
	gen := tr.generation()
	started := time.Now()
	b, g, err := tr.hashBoth(ctx, c.span)
	if err != nil {
		return err
	}
	tr.observe(max(b.Rows, g.Rows), time.Since(started))
	return tr.compared(ctx, c, gen, b, g)
}

// compared records chunk c, read on both sides from generation gen on,
// and resolves a difference.
func (tr *tableRun) compared(ctx context.Context, c chunk, gen uint64, b, g Digest) error {
	tr.mu.Lock()
	tr.info.Chunks++
	tr.info.RowsBlue += b.Rows
	tr.info.RowsGreen += g.Rows
	if b != g {
		tr.info.ChunksDiffering++
	}
	tr.mu.Unlock()
	tr.prog.chunkDone(b.Rows)
	tr.notify()
	if b == g {
		if tr.d != nil {
			tr.d.markClean(tr.t.Name, c.span, gen)
		}
		return nil
	}
	tr.v.log.Debug("verify: chunk differs", zap.String("table", tr.t.Name), zap.Stringer("span", c.span),
		zap.Int64("rows_blue", b.Rows), zap.Int64("rows_green", g.Rows))
	return tr.resolve(ctx, c.span, b, g)
}

func (tr *tableRun) notify() {
	if f := tr.v.opts.OnProgress; f != nil {
		f(tr.prog.snapshot())
	}
}

// resolve handles a chunk that differed at first sight. With a position
// waiter (online pass) it is re-checked until the difference either goes
// away, proves persistent (no change recorded while it was re-checked), or
// keeps moving. A chunk that keeps moving is settled except for the keys
// the stream marked while it was read, when the engine can (see
// settleExcept); otherwise it is left whole for the fence pass.
// Persistent and exact differences are bisected to rows.
func (tr *tableRun) resolve(ctx context.Context, s Span, b, g Digest) error {
	if tr.w == nil {
		return tr.bisect(ctx, s, b, g, 0, 0)
	}
	for attempt := 0; attempt < tr.v.opts.Rechecks; attempt++ {
		gen := tr.generation()
		var settled bool
		var err error
		if tr.canSettleExcept() {
			settled, b, g, err = tr.settleExcept(ctx, s, gen)
		} else {
			b, g, err = tr.hashOrdered(ctx, s)
			settled = b == g
		}
		if err != nil {
			return err
		}
		tr.mu.Lock()
		tr.info.Rechecked++
		tr.mu.Unlock()
		if settled {
			if tr.d != nil {
				// Keys marked after gen stay: what settleExcept left
				// out, and changes after the reads.
				tr.d.markClean(tr.t.Name, s, gen)
			}
			return nil
		}
		if tr.d == nil || !tr.d.changedSince(tr.t.Name, s, gen) {
			// Green applied everything blue had when it was read, and
			// nothing in the chunk changed since: the difference is real.
			// The fence pass re-checks the chunk too.
			err := tr.bisect(ctx, s, b, g, gen, 0)
			if tr.d != nil {
				tr.d.markSpan(tr.t.Name, s)
			}
			return err
		}
	}
	tr.unsettled(s)
	return nil
}

// canSettleExcept reports whether both sides can read at a snapshot, so
// that a moving chunk can be settled except for its marked keys.
func (tr *tableRun) canSettleExcept() bool {
	if tr.d == nil || tr.v.opts.MaxExceptKeys < 0 {
		return false
	}
	_, okb := tr.v.blue.(Snapshotter)
	_, okg := tr.v.green.(Snapshotter)
	return okb && okg
}

// settleExcept re-checks chunk s of a table still being written, and
// settles it except for the keys marked in the DirtySet after gen (taken
// before the reads). It reads s on blue at one snapshot, waits until green
// has applied past blue's position, reads s on green at one snapshot;
// then, keeping both snapshots, takes the keys of s marked since gen and
// hashes exactly those rows in each snapshot. Subtracted from the chunk
// digests, what remains is every row of s except those keys, at
// consistent reads: blue's as of its snapshot, green's with at least
// everything blue had then applied.
//
// Why leaving those keys out hides nothing: they stay in the DirtySet
// (marked after gen, so markClean keeps them) and the fence pass hashes
// each of them on both sides. Every other row was equal at consistent
// reads; a later change to it goes through the stream and is marked. A
// row green changed behind the stream's back is never marked, so it is
// never left out and still shows as a difference. A key whose change
// green applied before its read, but that was marked too late to be left
// out (the engine's hook racing the read), makes the remainders differ:
// the chunk is re-checked, or left whole to the fence, never passed.
//
// settled is true when the remainders are equal; b and g are then the
// digests of the remainders, otherwise of the whole chunk.
func (tr *tableRun) settleExcept(ctx context.Context, s Span, gen uint64) (settled bool, b, g Digest, err error) {
	sb, err := tr.v.blue.(Snapshotter).Snapshot(ctx)
	if err != nil {
		return false, b, g, fmt.Errorf("blue: snapshot: %w", err)
	}
	defer sb.Close()
	if b, err = sb.Checksum(ctx, tr.t, s); err != nil {
		return false, b, g, fmt.Errorf("blue: checksum %s: %w", s, err)
	}
	if err = tr.waitGreen(ctx); err != nil {
		return false, b, g, err
	}
	sg, err := tr.v.green.(Snapshotter).Snapshot(ctx)
	if err != nil {
		return false, b, g, fmt.Errorf("green: snapshot: %w", err)
	}
	defer sg.Close()
	if g, err = sg.Checksum(ctx, tr.t, s); err != nil {
		return false, b, g, fmt.Errorf("green: checksum %s: %w", s, err)
	}
	if b == g {
		return true, b, g, nil
	}
	// The keys are taken after green's read, so that they include every
	// change green's snapshot saw whose hook has run by now.
	limit := tr.v.opts.MaxExceptKeys
	if !s.IsKeySet() {
		limit = min(limit, int(tr.v.opts.MaxExceptShare*float64(max(b.Rows, g.Rows))))
	}
	keys, ok := tr.d.keysSince(tr.t.Name, s, gen, limit)
	if !ok || len(keys) == 0 {
		return false, b, g, nil
	}
	sort.Slice(keys, func(i, j int) bool { return encodeKey(keys[i]) < encodeKey(keys[j]) })
	var bk, gk Digest
	ks := Span{Keys: keys}
	if bk, err = sb.Checksum(ctx, tr.t, ks); err != nil {
		return false, b, g, fmt.Errorf("blue: checksum %s: %w", ks, err)
	}
	if gk, err = sg.Checksum(ctx, tr.t, ks); err != nil {
		return false, b, g, fmt.Errorf("green: checksum %s: %w", ks, err)
	}
	bx, err := tr.v.blue.(Snapshotter).Minus(b, bk)
	if err != nil {
		return false, b, g, fmt.Errorf("blue: %w", err)
	}
	gx, err := tr.v.green.(Snapshotter).Minus(g, gk)
	if err != nil {
		return false, b, g, fmt.Errorf("green: %w", err)
	}
	if bx != gx {
		return false, b, g, nil
	}
	tr.mu.Lock()
	tr.info.SettledExcept++
	tr.info.ExceptKeys += int64(len(keys))
	tr.mu.Unlock()
	tr.v.log.Debug("verify: chunk settled except keys changed while it was read", zap.String("table", tr.t.Name),
		zap.Stringer("span", s), zap.Int("keys", len(keys)))
	return true, bx, gx, nil
}

func (tr *tableRun) unsettled(s Span) {
	tr.mu.Lock()
	tr.info.Unsettled++
	tr.mu.Unlock()
	if tr.d != nil {
		tr.d.markSpan(tr.t.Name, s)
	}
	tr.v.log.Debug("verify: chunk still changing, left to the fence pass", zap.String("table", tr.t.Name), zap.Stringer("span", s))
}

// hashBoth hashes s on both sides at once.
func (tr *tableRun) hashBoth(ctx context.Context, s Span) (b, g Digest, err error) {
	eg, ectx := errgroup.WithContext(ctx)
	eg.Go(func() (err error) {
		if b, err = tr.v.blue.Checksum(ectx, tr.t, s); err != nil {
			return fmt.Errorf("blue: checksum %s: %w", s, err)
		}
		return nil
	})
	eg.Go(func() (err error) {
		if g, err = tr.v.green.Checksum(ectx, tr.t, s); err != nil {
			return fmt.Errorf("green: checksum %s: %w", s, err)
		}
		return nil
	})
	err = eg.Wait()
	return b, g, err
}

// hashOrdered hashes s on blue, waits until green applied past the
// position blue was read at, then hashes green.
func (tr *tableRun) hashOrdered(ctx context.Context, s Span) (b, g Digest, err error) {
	if tr.w == nil {
		return tr.hashBoth(ctx, s)
	}
	if b, err = tr.v.blue.Checksum(ctx, tr.t, s); err != nil {
		return b, g, fmt.Errorf("blue: checksum %s: %w", s, err)
	}
	if err = tr.waitGreen(ctx); err != nil {
		return b, g, err
	}
	if g, err = tr.v.green.Checksum(ctx, tr.t, s); err != nil {
		return b, g, fmt.Errorf("green: checksum %s: %w", s, err)
	}
	return b, g, nil
}

func (tr *tableRun) waitGreen(ctx context.Context) error {
	pos, err := tr.w.BluePosition(ctx)
	if err != nil {
		return fmt.Errorf("blue position: %w", err)
	}
	if err := tr.w.WaitGreenApplied(ctx, pos); err != nil {
		return fmt.Errorf("wait for green to apply %s: %w", pos, err)
	}
	return nil
}

func (tr *tableRun) isCapped() bool {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return tr.capped
}

// bisect splits a differing span until it holds at most BisectRows rows,
// then compares those rows. gen is the generation before the span was
// last read (online pass).
func (tr *tableRun) bisect(ctx context.Context, s Span, b, g Digest, gen uint64, depth int) error {
	if tr.isCapped() {
		return nil
	}
	n := max(b.Rows, g.Rows)
	if n <= tr.v.opts.BisectRows || depth > 96 {
		return tr.diffRows(ctx, s, gen)
	}
	var halves [2]Span
	if s.IsKeySet() {
		if len(s.Keys) <= 1 {
			return tr.diffRows(ctx, s, gen)
		}
		m := len(s.Keys) / 2
		halves = [2]Span{{Keys: s.Keys[:m]}, {Keys: s.Keys[m:]}}
	} else {
		side, rows := tr.v.blue, b.Rows
		if g.Rows > b.Rows {
			side, rows = tr.v.green, g.Rows
		}
		mid, err := side.KeyAt(ctx, tr.t, s, rows/2)
		if err != nil {
			return fmt.Errorf("bisect %s: %w", s, err)
		}
		if mid == nil {
			return tr.diffRows(ctx, s, gen)
		}
		halves = [2]Span{{Lo: s.Lo, Hi: mid}, {Lo: mid, Hi: s.Hi, HiInclusive: s.HiInclusive}}
	}
	for _, h := range halves {
		hb, hg, err := tr.hashOrdered(ctx, h)
		if err != nil {
			return err
		}
		if hb != hg {
			if err := tr.bisect(ctx, h, hb, hg, gen, depth+1); err != nil {
				return err
			}
		}
	}
	return nil
}

// bothSides runs fetch on blue into br and on green into gr: at once when
// the pass reads both at one point (fenced), or blue first and green once
// it has applied past blue's position (online).
func (tr *tableRun) bothSides(ctx context.Context, fetch func(ctx context.Context, db Database, side string, out *[]Row) error, br, gr *[]Row) error {
	if tr.w == nil {
		eg, ectx := errgroup.WithContext(ctx)
		eg.Go(func() error { return fetch(ectx, tr.v.blue, "blue", br) })
		eg.Go(func() error { return fetch(ectx, tr.v.green, "green", gr) })
		return eg.Wait()
	}
	if err := fetch(ctx, tr.v.blue, "blue", br); err != nil {
		return err
	}
	if err := tr.waitGreen(ctx); err != nil {
		return err
	}
	return fetch(ctx, tr.v.green, "green", gr)
}

// diffRows fetches the rows of a small span from both sides and records
// each difference.
func (tr *tableRun) diffRows(ctx context.Context, s Span, gen uint64) error {
	limit := int(tr.v.opts.BisectRows)*4 + 64
	var br, gr []Row
	fetch := func(ctx context.Context, db Database, side string, out *[]Row) error {
		rows, err := db.Rows(ctx, tr.t, s, limit)
		if err != nil {
			return fmt.Errorf("%s: rows %s: %w", side, s, err)
		}
		*out = rows
		return nil
	}
	if err := tr.bothSides(ctx, fetch, &br, &gr); err != nil {
		return err
	}
	if tr.w != nil && tr.d != nil && tr.d.changedSince(tr.t.Name, s, gen) {
		tr.unsettled(s)
		return nil
	}
	tr.record(classify(tr.t, br, gr, tr.v.opts.MaxValueBytes))
	return nil
}

// record adds row differences to the table's report, up to
// MaxDifferences listed.
func (tr *tableRun) record(diffs []Difference) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	for _, d := range diffs {
		tr.info.DifferenceCount++
		if len(tr.info.Differences) < tr.v.opts.MaxDifferences {
			tr.info.Differences = append(tr.info.Differences, d)
		} else {
			tr.capped = true
		}
	}
	if len(tr.info.Differences) >= tr.v.opts.MaxDifferences {
		tr.capped = true
	}
	tr.prog.differences(int64(len(diffs)))
}

// classify pairs rows by key and lists the differences in key order of
// blue, then green's extra rows.
func classify(t *Table, blue, green []Row, maxBytes int) []Difference {
	greenByKey := make(map[string]int, len(green))
	for i, r := range green {
		greenByKey[encodeKey(r.Key)] = i
	}
	isKey := make(map[int]bool, len(t.Key))
	for _, k := range t.Key {
		isKey[k] = true
	}
	var diffs []Difference
	var missing []Row
	seen := make(map[int]bool, len(green))
	for _, br := range blue {
		gi, ok := greenByKey[encodeKey(br.Key)]
		if !ok {
			missing = append(missing, br)
			continue
		}
		seen[gi] = true
		gr := green[gi]
		var cols []ColumnDiff
		for i, c := range t.Columns {
			if br.Hashes[i] != gr.Hashes[i] {
				bv, gv := valuePair(c, br.Values[i], gr.Values[i], maxBytes)
				cols = append(cols, ColumnDiff{Column: c.Name, Blue: bv, Green: gv})
			}
		}
		if len(cols) > 0 {
			diffs = append(diffs, Difference{Kind: Changed, Key: namedKey(t, br.Key), Columns: cols})
		}
	}
	var extra []Row
	for i, gr := range green {
		if !seen[i] {
			extra = append(extra, gr)
		}
	}
	// A row missing on green and a row extra on green that agree on every
	// other column are most likely one row whose key changed.
	usedExtra := make(map[int]bool)
	for _, m := range missing {
		match := -1
		for ei, e := range extra {
			if !usedExtra[ei] && sameNonKey(t, isKey, m, e) {
				match = ei
				break
			}
		}
		if match < 0 {
			diffs = append(diffs, Difference{Kind: MissingOnGreen, Key: namedKey(t, m.Key), Columns: rowColumns(t, m, true, maxBytes)})
			continue
		}
		usedExtra[match] = true
		e := extra[match]
		var cols []ColumnDiff
		for _, k := range t.Key {
			c := t.Columns[k]
			if m.Hashes[k] != e.Hashes[k] {
				cols = append(cols, ColumnDiff{Column: c.Name, Blue: value(c, m.Values[k], maxBytes), Green: value(c, e.Values[k], maxBytes)})
			}
		}
		diffs = append(diffs, Difference{Kind: KeyChanged, Key: namedKey(t, m.Key), GreenKey: namedKey(t, e.Key), Columns: cols})
	}
	for ei, e := range extra {
		if !usedExtra[ei] {
			diffs = append(diffs, Difference{Kind: ExtraOnGreen, Key: namedKey(t, e.Key), Columns: rowColumns(t, e, false, maxBytes)})
		}
	}
	return diffs
}

func sameNonKey(t *Table, isKey map[int]bool, a, b Row) bool {
	if len(t.Key) == len(t.Columns) {
		return false // nothing but the key to match on
	}
	for i := range t.Columns {
		if !isKey[i] && a.Hashes[i] != b.Hashes[i] {
			return false
		}
	}
	return true
}

func namedKey(t *Table, key []string) []NamedValue {
	out := make([]NamedValue, len(t.Key))
	for i, k := range t.Key {
		out[i] = NamedValue{Column: t.Columns[k].Name}
		if i < len(key) {
			out[i].Value = redact.Text(truncate(key[i], DefaultMaxValueBytes))
		}
	}
	return out
}

func rowColumns(t *Table, r Row, blue bool, maxBytes int) []ColumnDiff {
	out := make([]ColumnDiff, len(t.Columns))
	for i, c := range t.Columns {
		out[i] = ColumnDiff{Column: c.Name}
		if blue {
			out[i].Blue = value(c, r.Values[i], maxBytes)
		} else {
			out[i].Green = value(c, r.Values[i], maxBytes)
		}
	}
	return out
}

// secretColumn matches column names whose values a report must not show.
var secretColumn = regexp.MustCompile(`(?i)(passw(or)?d|passwd|secret|token|api_?key|private_?key|credential)`)

// value renders a column value for a report: masked when the column looks
// secret, DSN passwords scrubbed, truncated when long.
func value(c Column, s *string, maxBytes int) *Value {
	if s == nil {
		return &Value{Null: true}
	}
	if secretColumn.MatchString(c.Name) {
		return &Value{Text: redact.Mask, Redacted: true}
	}
	text := redact.Text(*s)
	if len(text) <= maxBytes {
		return &Value{Text: text}
	}
	return &Value{Text: truncate(text, maxBytes), Truncated: true, Bytes: len(*s)}
}

// valuePair renders two values of a column that differ. When both are
// long, the excerpts start shortly before the first byte that differs, so
// that a change deep inside a large value shows.
func valuePair(c Column, a, b *string, maxBytes int) (*Value, *Value) {
	va, vb := value(c, a, maxBytes), value(c, b, maxBytes)
	if !va.Truncated || !vb.Truncated || va.Redacted {
		return va, vb
	}
	sa, sb := redact.Text(*a), redact.Text(*b)
	i := 0
	for i < len(sa) && i < len(sb) && sa[i] == sb[i] {
		i++
	}
	from := i - maxBytes/4
	if from <= 0 {
		return va, vb
	}
	for from > 0 && (sa[from]&0xC0 == 0x80) {
		from--
	}
	excerpt := func(s string, full int) *Value {
		if from >= len(s) {
			return &Value{Text: "", Truncated: true, Bytes: full, Offset: from}
		}
		return &Value{Text: truncate(s[from:], maxBytes), Truncated: true, Bytes: full, Offset: from}
	}
	return excerpt(sa, len(*a)), excerpt(sb, len(*b))
}

// truncate cuts s to at most n bytes on a UTF-8 boundary.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && n < len(s) && s[n]&0xC0 == 0x80 {
		n--
	}
	return s[:n]
}

// limiter spaces out chunks so that blue is read at most rate rows per
// second on average.
type limiter struct {
	rate  float64
	mu    sync.Mutex
	start time.Time
	rows  float64
}

// wait blocks until n more rows may be read.
func (l *limiter) wait(ctx context.Context, n int64) error {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	now := time.Now()
	if l.start.IsZero() {
		l.start = now
	}
	due := l.start.Add(time.Duration(l.rows / l.rate * float64(time.Second)))
	l.rows += float64(n)
	l.mu.Unlock()
	if d := due.Sub(now); d > 0 {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}
