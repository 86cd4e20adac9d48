package consistency

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"sort"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"
)

// Bucket sizes of key-less tables.
const (
	// maxTopBits caps the buckets of the first pass at 2^14 per table:
	// each is a group of the statement's hash aggregate, which then fits
	// in the default work_mem (4 MB), and a row of its result.
	maxTopBits = 14
	// maxStepBits caps how much longer a bisection level's prefixes are:
	// a differing bucket is split in at most 1,024 per pass over the
	// table (of the 100 buckets bisected at most per level by default).
	maxStepBits = 10
)

// walkMultiset compares a table without a usable key as a multiset of row
// hashes (see MultisetHasher): one pass per side reads the digest of every
// bucket (rows grouped by a prefix of their row hash, about
// InitialChunkRows per bucket); differing buckets are re-checked after
// green caught up (online), then bisected by longer prefixes, one pass per
// level for all buckets of the level, down to buckets of at most
// BisectRows rows, whose distinct rows are fetched with their copies.
//
// Unlike a key range, a bucket cannot be read without reading the whole
// table (there is no index on a row hash): every pass and every level
// costs a scan of the table on each side, whatever the bucket. Online, a
// table still being written is left whole to the pass inside the fence
// (the DirtySet cannot name its rows), which re-hashes it whole.
func (tr *tableRun) walkMultiset(ctx context.Context) {
	if err := tr.multiset(ctx); err != nil {
		tr.fail(err)
	}
	tr.pairChanged()
}

func (tr *tableRun) multiset(ctx context.Context) error {
	bitsTop := tr.topBits()
	if err := tr.limiter.wait(ctx, tr.t.EstimatedRows); err != nil {
		return err
	}
	gen := tr.generation()
	started := time.Now()
	b, g, err := tr.bucketsBoth(ctx, nil, 0, bitsTop)
	if err != nil {
		return err
	}
	var rb, rg int64
	for _, d := range b {
		rb += d.Rows
	}
	for _, d := range g {
		rg += d.Rows
	}
	diff := differing(b, g)
	tr.mu.Lock()
	tr.info.Chunks += int64(len(union(b, g)))
	tr.info.RowsBlue += rb
	tr.info.RowsGreen += rg
	tr.info.ChunksDiffering += int64(len(diff))
	tr.mu.Unlock()
	tr.prog.chunkDone(rb)
	tr.notify()
	tr.v.log.Debug("verify: key-less table hashed", zap.String("table", tr.t.Name), zap.Int("bucket_bits", bitsTop),
		zap.Int("buckets_differing", len(diff)), zap.Duration("took", time.Since(started)))
	if len(diff) == 0 {
		return nil
	}
	return tr.resolveBuckets(ctx, diff, bitsTop, b, g, gen)
}

// topBits chooses the buckets of the first pass: 2^bits buckets of about
// InitialChunkRows rows each, by the estimated row count.
func (tr *tableRun) topBits() int {
	per := max(tr.v.opts.InitialChunkRows, 1)
	n := 0
	for n < maxTopBits && tr.t.EstimatedRows>>n > per {
		n++
	}
	return n
}

// resolveBuckets handles buckets that differed at first sight, as resolve
// does chunks: online, they are re-read on blue, then on green once green
// applied past blue's position, until they agree, prove persistent (no
// change to the table recorded since before the re-read) or keep moving;
// moving, the table is left whole to the fence pass. Persistent and exact
// differences are bisected to rows.
func (tr *tableRun) resolveBuckets(ctx context.Context, diff []uint64, nbits int, b, g map[uint64]Digest, gen uint64) error {
	if tr.w == nil {
		return tr.descend(ctx, diff, nbits, b, g, gen)
	}
	whole := Span{}
	for attempt := 0; attempt < tr.v.opts.Rechecks; attempt++ {
		gen = tr.generation()
		var err error
		if b, g, err = tr.bucketsOrdered(ctx, diff, nbits, nbits); err != nil {
			return err
		}
		tr.mu.Lock()
		tr.info.Rechecked++
		tr.mu.Unlock()
		if diff = differing(b, g); len(diff) == 0 {
			return nil
		}
		if tr.d == nil || !tr.d.changedSince(tr.t.Name, whole, gen) {
			err := tr.descend(ctx, diff, nbits, b, g, gen)
			if tr.d != nil {
				tr.d.markSpan(tr.t.Name, whole)
			}
			return err
		}
	}
	tr.unsettled(whole)
	return nil
}

// descend bisects differing buckets of nbits bits by longer prefixes until
// each holds at most BisectRows rows, then lists their differing rows.
// gen is the generation before the buckets were last read (online pass).
func (tr *tableRun) descend(ctx context.Context, diff []uint64, nbits int, b, g map[uint64]Digest, gen uint64) error {
	var unsplit map[uint64]bool // buckets whose rows all share a longer prefix
	for level := 0; len(diff) > 0; level++ {
		if tr.isCapped() {
			return nil
		}
		tr.mu.Lock()
		room := max(tr.v.opts.MaxDifferences-len(tr.info.Differences), 1)
		tr.info.BisectLevels = max(tr.info.BisectLevels, level)
		tr.mu.Unlock()
		// Each differing bucket holds at least one difference: beyond
		// the room left in the report, buckets are counted, not listed.
		diff = diff[:min(len(diff), room)]
		var small, large []uint64
		var most int64
		for _, p := range diff {
			n := max(b[p].Rows, g[p].Rows)
			if n <= tr.v.opts.BisectRows || nbits >= 64 || unsplit[p] {
				small = append(small, p)
				continue
			}
			large = append(large, p)
			most = max(most, n)
		}
		if len(small) > 0 {
			if err := tr.diffBucketRows(ctx, small, nbits, gen); err != nil {
				return err
			}
		}
		if len(large) == 0 {
			return nil
		}
		// Sub-buckets of about BisectRows/2 rows on average, so that
		// nearly all of them hold at most BisectRows (every level is a
		// scan of the table).
		step := bits.Len64(uint64((most - 1) / max(tr.v.opts.BisectRows/2, 1)))
		step = min(max(step, 1), maxStepBits)
		next := min(nbits+step, 64)
		nb, ng, err := tr.bucketsOrdered(ctx, large, nbits, next)
		if err != nil {
			return err
		}
		if tr.moved(gen) {
			return nil
		}
		// A bucket whose rows on both sides all went to one sub-bucket
		// holds copies of one row (distinct rows would have spread):
		// its rows are fetched at once, not bisected to 64 bits.
		unsplit = make(map[uint64]bool)
		shift := uint(next - nbits)
		for p := range union(nb, ng) {
			parent := p >> shift
			if nb[p].Rows == b[parent].Rows && ng[p].Rows == g[parent].Rows {
				unsplit[p] = true
			}
		}
		diff, nbits, b, g = differing(nb, ng), next, nb, ng
	}
	return nil
}

// moved reports, online, whether the table changed since gen: then what
// was read cannot tell a real difference from a moving table, which is
// left whole to the fence pass.
func (tr *tableRun) moved(gen uint64) bool {
	if tr.w == nil || tr.d == nil || !tr.d.changedSince(tr.t.Name, Span{}, gen) {
		return false
	}
	tr.unsettled(Span{})
	return true
}

// diffBucketRows fetches the distinct rows of small differing buckets on
// both sides, with their copies, and records each row whose copies
// differ.
func (tr *tableRun) diffBucketRows(ctx context.Context, in []uint64, nbits int, gen uint64) error {
	limit := len(in)*int(tr.v.opts.BisectRows*4) + 64
	var br, gr []Row
	fetch := func(ctx context.Context, db Database, side string, out *[]Row) error {
		rows, err := db.(MultisetHasher).BucketRows(ctx, tr.t, in, nbits, limit)
		if err != nil {
			return fmt.Errorf("%s: rows of %d buckets: %w", side, len(in), err)
		}
		*out = rows
		return nil
	}
	if err := tr.bothSides(ctx, fetch, &br, &gr); err != nil {
		return err
	}
	if tr.moved(gen) {
		return nil
	}
	// A side cut at limit rows is compared up to the last hash both
	// sides returned in full.
	cut := ""
	for _, rows := range [][]Row{br, gr} {
		if len(rows) >= limit {
			if last := rows[len(rows)-1].Hash; cut == "" || last < cut {
				cut = last
			}
		}
	}
	diffs, rows := classifyCopies(tr.t, br, gr, cut, tr.v.opts.MaxValueBytes)
	if len(diffs) == 0 && cut == "" {
		// The digests differ and the rows do not: two different rows
		// with one 64-bit row hash, or a side changed behind the
		// verifier's back (online: a change marked late). Never a
		// silent pass.
		if tr.w != nil {
			tr.unsettled(Span{})
			return nil
		}
		return errors.New("buckets differ but their rows are the same: cannot name the difference; re-run the verification")
	}
	tr.mu.Lock()
	for i, d := range diffs {
		if n := len(tr.info.Differences) + i; n < tr.v.opts.MaxDifferences && d.Copies.Blue+d.Copies.Green == 1 {
			tr.loose = append(tr.loose, looseRow{diff: n, row: rows[i]})
		}
	}
	tr.mu.Unlock()
	tr.record(diffs)
	return nil
}

// looseRow is a key-less row one side holds once and the other not at
// all: diff indexes it in the table's Differences.
type looseRow struct {
	diff int
	row  Row
}

// pairChanged reports a row missing on green and a row extra on green
// (one copy each) that agree on most columns as one changed row, as
// classify pairs a changed key: without a key, an UPDATE shows as the old
// row gone and the new one there. It is a reading aid; the counts of
// differences still add up (a pair counts once).
func (tr *tableRun) pairChanged() {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if len(tr.loose) < 2 || len(tr.t.Columns) < 2 {
		return
	}
	ds := tr.info.Differences
	drop := make(map[int]bool)
	used := make(map[int]bool)
	for _, m := range tr.loose {
		if ds[m.diff].Kind != MissingOnGreen {
			continue
		}
		for j, e := range tr.loose {
			if used[j] || ds[e.diff].Kind != ExtraOnGreen {
				continue
			}
			var same []NamedValue
			var cols []ColumnDiff
			for i, c := range tr.t.Columns {
				if m.row.Hashes[i] == e.row.Hashes[i] {
					same = append(same, ds[m.diff].Key[i])
					continue
				}
				bv, gv := valuePair(c, m.row.Values[i], e.row.Values[i], tr.v.opts.MaxValueBytes)
				cols = append(cols, ColumnDiff{Column: c.Name, Blue: bv, Green: gv})
			}
			if len(cols) > len(tr.t.Columns)/2 {
				continue
			}
			used[j] = true
			ds[m.diff] = Difference{Kind: Changed, Key: same, Columns: cols}
			drop[e.diff] = true
			break
		}
	}
	kept := ds[:0]
	for i, d := range ds {
		if !drop[i] {
			kept = append(kept, d)
		}
	}
	tr.info.Differences = kept
	tr.info.DifferenceCount -= int64(len(drop))
	tr.prog.differences(-int64(len(drop)))
	tr.loose = nil
}

// classifyCopies lists the rows whose copies differ between the sides, in
// hash order, rows past cut (when set) left out; rows[i] is the row of
// diffs[i].
func classifyCopies(t *Table, blue, green []Row, cut string, maxBytes int) (diffs []Difference, rows []Row) {
	type entry struct {
		row         Row
		blue, green int64
	}
	byHash := make(map[string]*entry)
	var order []string
	add := func(rows []Row, isBlue bool) {
		for _, r := range rows {
			if cut != "" && r.Hash > cut {
				continue
			}
			e := byHash[r.Hash]
			if e == nil {
				e = &entry{row: r}
				byHash[r.Hash] = e
				order = append(order, r.Hash)
			}
			if isBlue {
				e.blue += max(r.Count, 1)
			} else {
				e.green += max(r.Count, 1)
			}
		}
	}
	add(blue, true)
	add(green, false)
	sort.Strings(order)
	for _, h := range order {
		e := byHash[h]
		if e.blue == e.green {
			continue
		}
		kind := MissingOnGreen
		if e.green > e.blue {
			kind = ExtraOnGreen
		}
		diffs = append(diffs, Difference{Kind: kind, Key: rowNamed(t, e.row, maxBytes), Copies: &Copies{Blue: e.blue, Green: e.green}})
		rows = append(rows, e.row)
	}
	return diffs, rows
}

// rowNamed names a key-less row by every column: masked when the column
// looks secret, truncated when long, NULL as NULL.
func rowNamed(t *Table, r Row, maxBytes int) []NamedValue {
	out := make([]NamedValue, len(t.Columns))
	for i, c := range t.Columns {
		out[i] = NamedValue{Column: c.Name}
		if i < len(r.Values) {
			out[i].Value = value(c, r.Values[i], maxBytes).String()
		}
	}
	return out
}

// bucketsBoth reads buckets on both sides at once.
func (tr *tableRun) bucketsBoth(ctx context.Context, under []uint64, from, nbits int) (b, g map[uint64]Digest, err error) {
	eg, ectx := errgroup.WithContext(ctx)
	eg.Go(func() (err error) {
		b, err = tr.buckets(ectx, tr.v.blue, "blue", under, from, nbits)
		return err
	})
	eg.Go(func() (err error) {
		g, err = tr.buckets(ectx, tr.v.green, "green", under, from, nbits)
		return err
	})
	err = eg.Wait()
	return b, g, err
}

// bucketsOrdered reads buckets on blue, waits until green applied past
// the position blue was read at, then reads green (online); both at once
// otherwise.
func (tr *tableRun) bucketsOrdered(ctx context.Context, under []uint64, from, nbits int) (b, g map[uint64]Digest, err error) {
	if tr.w == nil {
		return tr.bucketsBoth(ctx, under, from, nbits)
	}
	if b, err = tr.buckets(ctx, tr.v.blue, "blue", under, from, nbits); err != nil {
		return nil, nil, err
	}
	if err = tr.waitGreen(ctx); err != nil {
		return nil, nil, err
	}
	if g, err = tr.buckets(ctx, tr.v.green, "green", under, from, nbits); err != nil {
		return nil, nil, err
	}
	return b, g, nil
}

func (tr *tableRun) buckets(ctx context.Context, db Database, side string, under []uint64, from, nbits int) (map[uint64]Digest, error) {
	m, err := db.(MultisetHasher).Buckets(ctx, tr.t, under, from, nbits)
	if err != nil {
		return nil, fmt.Errorf("%s: buckets of %d bits: %w", side, nbits, err)
	}
	return m, nil
}

// union returns the prefixes of buckets on either side.
func union(b, g map[uint64]Digest) map[uint64]bool {
	out := make(map[uint64]bool, len(b))
	for p := range b {
		out[p] = true
	}
	for p := range g {
		out[p] = true
	}
	return out
}

// differing returns, in order, the prefixes whose digests differ (a bucket
// empty on one side has the zero digest there).
func differing(b, g map[uint64]Digest) []uint64 {
	var out []uint64
	for p := range union(b, g) {
		if b[p] != g[p] {
			out = append(out, p)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}
