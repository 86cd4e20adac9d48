package consistency

import (
	"sort"
	"strings"
	"sync"
)

// DefaultMaxDirtyEntries bounds a DirtySet: keys plus ranges over all
// tables. A key of a few columns costs about 100 bytes, so the default
// stays under about 25 MB.
const DefaultMaxDirtyEntries = 250_000

// DirtySet records what the change stream touched, so that the pass inside
// the fence re-checks exactly those rows. It is safe for concurrent use.
//
// Memory is bounded: it keeps exact keys until it holds MaxEntries keys
// and ranges, then folds the keys of the table being marked into at most
// MaxEntries/8 narrow key ranges (consecutive changed keys, in key order),
// which cover the changed rows and a few neighbours. A table whose key
// order is unknown in Go (a key column of KindOther) is marked whole
// instead.
//
// A table without a usable key (compared as a multiset, see
// MultisetHasher) has no rows to name: any mark of it, with or without a
// key (a replica identity that is not the primary key, REPLICA IDENTITY
// FULL), marks it whole, and the pass inside the fence re-hashes all of
// it. Its cost there grows with the table, not with what changed.
//
// Every mark carries a generation (a counter over all marks), which lets
// an online pass drop keys that a later clean check of their chunk already
// covered, and tell a chunk still being written from a real difference.
type DirtySet struct {
	mu     sync.Mutex
	max    int
	gen    uint64
	total  int // keys plus ranges over all tables
	tables map[string]*dirtyTable
}

type dirtyTable struct {
	order  keyOrder
	kinds  []KeyKind
	keys   map[string]dirtyKey
	ranges []dirtyRange // sorted by Lo, not overlapping, when order is known
	// whole is the generation at which the whole table became dirty
	// (TRUNCATE, overflow without a key order, never walked); 0 if not.
	whole uint64
	// covered: an online pass walked every chunk, so what is not marked
	// since is known clean.
	covered bool
	// last is the generation of the latest mark.
	last uint64
	// keyLess: the table has no usable key; every mark is whole.
	keyLess bool
}

type dirtyKey struct {
	key []string
	gen uint64
}

type dirtyRange struct {
	span Span
	gen  uint64
}

// NewDirtySet returns an empty set holding at most maxEntries keys and
// ranges (DefaultMaxDirtyEntries when maxEntries <= 0).
func NewDirtySet(maxEntries int) *DirtySet {
	if maxEntries <= 0 {
		maxEntries = DefaultMaxDirtyEntries
	}
	return &DirtySet{max: maxEntries, tables: make(map[string]*dirtyTable)}
}

// MarkChanged records that the row with primary key key (text form, key
// order) of table (schema.table) changed; a nil key means the whole table
// changed (TRUNCATE). It has the shape of the replication engine's
// OnRowChange hook and is cheap enough to call for every applied change.
// It must be called before green's applied position passes the change
// (see PositionWaiter). The key is copied.
func (d *DirtySet) MarkChanged(table string, key []string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.gen++
	t := d.table(table)
	t.last = d.gen
	if key == nil || t.keyLess {
		d.markWholeLocked(t)
		return
	}
	if t.whole != 0 {
		return // already re-checked in full
	}
	if t.order != nil {
		if i := t.rangeContaining(key); i >= 0 {
			t.ranges[i].gen = d.gen
			return
		}
	}
	k := encodeKey(key)
	if _, ok := t.keys[k]; !ok {
		d.total++
	}
	t.keys[k] = dirtyKey{key: append([]string(nil), key...), gen: d.gen}
	if d.total > d.max {
		d.compactLocked(t)
	}
}

// Generation returns the generation of the latest mark.
func (d *DirtySet) Generation() uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.gen
}

// DirtyStats summarises a DirtySet.
type DirtyStats struct {
	Tables      int `json:"tables"`       // tables with something to re-check
	Keys        int `json:"keys"`         // exact keys
	Ranges      int `json:"ranges"`       // key ranges (overflow, unsettled chunks)
	WholeTables int `json:"whole_tables"` // tables to re-check in full
}

// Stats returns what the set holds now.
func (d *DirtySet) Stats() DirtyStats {
	d.mu.Lock()
	defer d.mu.Unlock()
	var s DirtyStats
	for _, t := range d.tables {
		if t.whole != 0 || !t.covered {
			s.WholeTables++
			s.Tables++
			continue
		}
		s.Keys += len(t.keys)
		s.Ranges += len(t.ranges)
		if len(t.keys)+len(t.ranges) > 0 {
			s.Tables++
		}
	}
	return s
}

func (d *DirtySet) table(name string) *dirtyTable {
	t := d.tables[name]
	if t == nil {
		t = &dirtyTable{keys: make(map[string]dirtyKey)}
		d.tables[name] = t
	}
	return t
}

func (d *DirtySet) markWholeLocked(t *dirtyTable) {
	d.total -= len(t.keys) + len(t.ranges)
	t.keys = make(map[string]dirtyKey)
	t.ranges = nil
	t.whole = d.gen
}

// setKinds tells the set how keys of table order; the verifier calls it
// once it has described the table.
func (d *DirtySet) setKinds(table string, kinds []KeyKind) {
	d.mu.Lock()
	defer d.mu.Unlock()
	t := d.table(table)
	if len(kinds) == 0 {
		// No key: keys marked so far (the stream's replica identity)
		// name nothing the verifier can look up.
		t.keyLess = true
		if len(t.keys)+len(t.ranges) > 0 {
			d.markWholeLocked(t)
		}
		return
	}
	if t.order != nil || t.kinds != nil {
		return
	}
	t.kinds = kinds
	t.order = newKeyOrder(kinds)
	if t.order != nil && len(t.ranges) > 0 {
		rs := t.ranges
		t.ranges = nil
		for _, r := range rs {
			t.insertRange(r)
		}
		d.recount()
	}
}

func (d *DirtySet) recount() {
	d.total = 0
	for _, t := range d.tables {
		d.total += len(t.keys) + len(t.ranges)
	}
}

// compactLocked folds t's keys and ranges into few ranges, or marks t
// whole when its keys cannot be ordered.
func (d *DirtySet) compactLocked(t *dirtyTable) {
	if t.order == nil {
		d.markWholeLocked(t)
		return
	}
	target := d.max / 8
	if target < 1 {
		target = 1
	}
	items := make([]dirtyRange, 0, len(t.keys)+len(t.ranges))
	items = append(items, t.ranges...)
	for _, k := range t.keys {
		items = append(items, dirtyRange{span: Span{Lo: k.key, Hi: k.key, HiInclusive: true}, gen: k.gen})
	}
	sort.Slice(items, func(i, j int) bool { return t.order.loLess(items[i].span, items[j].span) })
	merged := items[:0]
	for _, r := range items {
		if n := len(merged); n > 0 && t.order.touches(merged[n-1].span, r.span) {
			merged[n-1] = t.order.union(merged[n-1], r)
			continue
		}
		merged = append(merged, r)
	}
	for len(merged) > target {
		half := merged[:0]
		for i := 0; i < len(merged); i += 2 {
			if i+1 < len(merged) {
				half = append(half, t.order.union(merged[i], merged[i+1]))
			} else {
				half = append(half, merged[i])
			}
		}
		merged = half
	}
	d.total -= len(t.keys) + len(t.ranges)
	t.keys = make(map[string]dirtyKey)
	t.ranges = append([]dirtyRange(nil), merged...)
	d.total += len(t.ranges)
	if d.total > d.max {
		// Other tables hold the room: give this one up to a full re-check.
		d.markWholeLocked(t)
	}
}

// rangeContaining returns the index of the range holding key, or -1.
func (t *dirtyTable) rangeContaining(key []string) int {
	// Ranges are sorted by Lo and do not overlap: the candidate is the
	// last range starting at or before key.
	i := sort.Search(len(t.ranges), func(i int) bool {
		lo := t.ranges[i].span.Lo
		return lo != nil && t.order.compare(lo, key) > 0
	}) - 1
	if i >= 0 && t.order.contains(t.ranges[i].span, key) {
		return i
	}
	return -1
}

// insertRange adds r, merging it with ranges it touches, keeping the
// slice sorted and free of overlaps.
func (t *dirtyTable) insertRange(r dirtyRange) {
	if t.order == nil {
		t.ranges = append(t.ranges, r)
		return
	}
	out := make([]dirtyRange, 0, len(t.ranges)+1)
	placed := false
	for _, x := range t.ranges {
		switch {
		case t.order.touches(x.span, r.span) || t.order.touches(r.span, x.span):
			r = t.order.union(x, r)
		case !placed && t.order.loLess(r.span, x.span):
			out = append(out, r)
			placed = true
			out = append(out, x)
		default:
			out = append(out, x)
		}
	}
	if !placed {
		out = append(out, r)
	}
	// A merge may have grown r over ranges placed before it: sort and
	// merge once more.
	sort.Slice(out, func(i, j int) bool { return t.order.loLess(out[i].span, out[j].span) })
	merged := out[:0]
	for _, x := range out {
		if n := len(merged); n > 0 && t.order.touches(merged[n-1].span, x.span) {
			merged[n-1] = t.order.union(merged[n-1], x)
			continue
		}
		merged = append(merged, x)
	}
	t.ranges = merged
}

// markSpan records that span s of table must be re-checked inside the
// fence (an online chunk that kept moving or differed).
//
// It is not a change: the generation does not move, so a check in
// progress elsewhere does not take it for one.
func (d *DirtySet) markSpan(table string, s Span) {
	d.mu.Lock()
	defer d.mu.Unlock()
	t := d.table(table)
	if t.whole != 0 {
		return
	}
	if t.keyLess {
		// The whole table is the span. The generation moves so that whole
		// is never 0 (not whole); t.last does not, so a check in progress
		// does not take it for a change.
		d.gen++
		d.markWholeLocked(t)
		return
	}
	if s.IsKeySet() {
		for _, k := range s.Keys {
			ek := encodeKey(k)
			if _, ok := t.keys[ek]; !ok {
				d.total++
			}
			t.keys[ek] = dirtyKey{key: k, gen: d.gen}
		}
	} else {
		t.insertRange(dirtyRange{span: s, gen: d.gen})
		d.recount()
	}
	if d.total > d.max {
		d.compactLocked(t)
	}
}

// changedSince reports whether anything in span s of table was marked
// after generation gen. Without a key order, any mark of the table counts.
func (d *DirtySet) changedSince(table string, s Span, gen uint64) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	t := d.tables[table]
	if t == nil || t.last <= gen {
		return false
	}
	if t.whole > gen || t.order == nil {
		return true
	}
	if s.IsKeySet() {
		for _, k := range s.Keys {
			if dk, ok := t.keys[encodeKey(k)]; ok && dk.gen > gen {
				return true
			}
			if i := t.rangeContaining(k); i >= 0 && t.ranges[i].gen > gen {
				return true
			}
		}
		return false
	}
	for _, k := range t.keys {
		if k.gen > gen && t.order.contains(s, k.key) {
			return true
		}
	}
	for _, r := range t.ranges {
		if r.gen > gen && t.order.overlapsSpan(s, r.span) {
			return true
		}
	}
	return false
}

// keysSince returns the exact keys in s (a range or a key set) of table
// marked after
// generation gen, for an online re-check to leave out of its comparison.
// ok is false when the marks since gen are not all exact keys inside s
// (the table was marked whole, its key order is unknown in Go, a range
// overlapping s was marked) or when there are more than limit keys: the
// chunk cannot be settled except for a known set of keys then.
func (d *DirtySet) keysSince(table string, s Span, gen uint64, limit int) (keys [][]string, ok bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	t := d.tables[table]
	if t == nil || t.last <= gen {
		return nil, true
	}
	if t.whole > gen || t.order == nil {
		return nil, false
	}
	if s.IsKeySet() {
		for _, k := range s.Keys {
			if i := t.rangeContaining(k); i >= 0 && t.ranges[i].gen > gen {
				return nil, false
			}
			if dk, ok := t.keys[encodeKey(k)]; ok && dk.gen > gen {
				if len(keys) >= limit {
					return nil, false
				}
				keys = append(keys, dk.key)
			}
		}
		return keys, true
	}
	for _, r := range t.ranges {
		if r.gen > gen && t.order.overlapsSpan(s, r.span) {
			return nil, false
		}
	}
	for _, k := range t.keys {
		if k.gen > gen && t.order.contains(s, k.key) {
			if len(keys) >= limit {
				return nil, false
			}
			keys = append(keys, k.key)
		}
	}
	return keys, true
}

// markClean drops what a clean check of span s, started at generation gen,
// covered: keys in s and ranges inside s marked at or before gen.
func (d *DirtySet) markClean(table string, s Span, gen uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	t := d.tables[table]
	if t == nil {
		return
	}
	if s.IsKeySet() {
		for _, k := range s.Keys {
			ek := encodeKey(k)
			if dk, ok := t.keys[ek]; ok && dk.gen <= gen {
				delete(t.keys, ek)
				d.total--
			}
		}
		return
	}
	if t.order == nil {
		return
	}
	for ek, k := range t.keys {
		if k.gen <= gen && t.order.contains(s, k.key) {
			delete(t.keys, ek)
			d.total--
		}
	}
	kept := t.ranges[:0]
	for _, r := range t.ranges {
		if r.gen <= gen && t.order.spanWithin(r.span, s) {
			d.total--
			continue
		}
		kept = append(kept, r)
	}
	t.ranges = kept
}

// beginWalk is called when an online pass starts walking table, and
// returns the generation the walk starts from.
func (d *DirtySet) beginWalk(table string) uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.table(table)
	return d.gen
}

// endWalk records that an online pass, started at generation start, walked
// every chunk of table: from now on only marks need re-checking.
func (d *DirtySet) endWalk(table string, start uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	t := d.table(table)
	t.covered = true
	if t.whole != 0 && t.whole <= start {
		t.whole = 0
	}
}

// dirtySnapshot is what a dirty pass re-checks for one table.
type dirtySnapshot struct {
	gen    uint64
	whole  bool // re-check the whole table
	keys   [][]string
	ranges []Span
}

// empty reports whether the snapshot asks to re-check nothing.
func (s dirtySnapshot) empty() bool { return !s.whole && len(s.keys) == 0 && len(s.ranges) == 0 }

func (d *DirtySet) snapshot(table string) dirtySnapshot {
	d.mu.Lock()
	defer d.mu.Unlock()
	snap := dirtySnapshot{gen: d.gen}
	t := d.tables[table]
	if t == nil || !t.covered || t.whole != 0 {
		snap.whole = true
		return snap
	}
	snap.keys = make([][]string, 0, len(t.keys))
	for _, k := range t.keys {
		snap.keys = append(snap.keys, k.key)
	}
	if t.order != nil {
		o := t.order
		sort.Slice(snap.keys, func(i, j int) bool { return o.compare(snap.keys[i], snap.keys[j]) < 0 })
	}
	for _, r := range t.ranges {
		snap.ranges = append(snap.ranges, r.span)
	}
	return snap
}

// settle records that a dirty pass that took snap found table clean:
// what it covered and was not marked again since is dropped.
func (d *DirtySet) settle(table string, snap dirtySnapshot) {
	d.mu.Lock()
	defer d.mu.Unlock()
	t := d.tables[table]
	if t == nil {
		return
	}
	if snap.whole {
		if t.whole <= snap.gen {
			d.total -= len(t.keys) + len(t.ranges)
			t.whole = 0
			t.covered = true
			keep := make(map[string]dirtyKey)
			for ek, k := range t.keys {
				if k.gen > snap.gen {
					keep[ek] = k
				}
			}
			t.keys = keep
			var rs []dirtyRange
			for _, r := range t.ranges {
				if r.gen > snap.gen {
					rs = append(rs, r)
				}
			}
			t.ranges = rs
			d.total += len(t.keys) + len(t.ranges)
		}
		return
	}
	for _, k := range snap.keys {
		ek := encodeKey(k)
		if dk, ok := t.keys[ek]; ok && dk.gen <= snap.gen {
			delete(t.keys, ek)
			d.total--
		}
	}
	kept := t.ranges[:0]
	for _, r := range t.ranges {
		if r.gen <= snap.gen {
			d.total--
			continue
		}
		kept = append(kept, r)
	}
	t.ranges = kept
}

// encodeKey makes a map key; the engines' text forms never hold NUL.
func encodeKey(k []string) string { return strings.Join(k, "\x00") }

// Span helpers over a key order; nil bounds are infinite.

// loLess orders spans by lower bound.
func (o keyOrder) loLess(a, b Span) bool {
	switch {
	case a.Lo == nil:
		return b.Lo != nil
	case b.Lo == nil:
		return false
	}
	return o.compare(a.Lo, b.Lo) < 0
}

// touches reports whether b, starting at or after a, starts inside a or
// right at its end, so that their union is one contiguous range.
func (o keyOrder) touches(a, b Span) bool {
	if a.Hi == nil {
		return true
	}
	if b.Lo == nil {
		return true
	}
	return o.compare(b.Lo, a.Hi) <= 0
}

// union returns the smallest range covering both.
func (o keyOrder) union(a, b dirtyRange) dirtyRange {
	out := dirtyRange{gen: max(a.gen, b.gen)}
	switch {
	case a.span.Lo == nil || b.span.Lo == nil:
	case o.compare(a.span.Lo, b.span.Lo) <= 0:
		out.span.Lo = a.span.Lo
	default:
		out.span.Lo = b.span.Lo
	}
	switch {
	case a.span.Hi == nil || b.span.Hi == nil:
	default:
		c := o.compare(a.span.Hi, b.span.Hi)
		switch {
		case c > 0:
			out.span.Hi, out.span.HiInclusive = a.span.Hi, a.span.HiInclusive
		case c < 0:
			out.span.Hi, out.span.HiInclusive = b.span.Hi, b.span.HiInclusive
		default:
			out.span.Hi, out.span.HiInclusive = a.span.Hi, a.span.HiInclusive || b.span.HiInclusive
		}
	}
	return out
}

// overlapsSpan reports whether two ranges share a key.
func (o keyOrder) overlapsSpan(a, b Span) bool {
	// a ends before b starts?
	if a.Hi != nil && b.Lo != nil {
		c := o.compare(a.Hi, b.Lo)
		if c < 0 || (c == 0 && !a.HiInclusive) {
			return false
		}
	}
	if b.Hi != nil && a.Lo != nil {
		c := o.compare(b.Hi, a.Lo)
		if c < 0 || (c == 0 && !b.HiInclusive) {
			return false
		}
	}
	return true
}

// spanWithin reports whether range a lies inside range s.
func (o keyOrder) spanWithin(a, s Span) bool {
	if s.Lo != nil && (a.Lo == nil || o.compare(a.Lo, s.Lo) < 0) {
		return false
	}
	if s.Hi != nil {
		if a.Hi == nil {
			return false
		}
		c := o.compare(a.Hi, s.Hi)
		if c > 0 || (c == 0 && a.HiInclusive && !s.HiInclusive) {
			return false
		}
	}
	return true
}
