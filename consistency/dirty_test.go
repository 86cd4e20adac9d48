package consistency

import (
	"fmt"
	"math/rand/v2"
	"sort"
	"strconv"
	"sync"
	"testing"
)

func TestKeysCompareAsTheEngineOrdersThem(t *testing.T) {
	cases := []struct {
		kinds []KeyKind
		a, b  []string
		want  int
	}{
		{[]KeyKind{KindInt}, []string{"-5"}, []string{"3"}, -1},
		{[]KeyKind{KindInt}, []string{"10"}, []string{"9"}, 1},
		{[]KeyKind{KindInt}, []string{"-10"}, []string{"-9"}, -1},
		{[]KeyKind{KindInt}, []string{"0"}, []string{"-0"}, 0},
		{[]KeyKind{KindInt}, []string{"9223372036854775807"}, []string{"-9223372036854775808"}, 1},
		{[]KeyKind{KindNumeric}, []string{"1.10"}, []string{"1.1"}, 0},
		{[]KeyKind{KindNumeric}, []string{"-0.5"}, []string{"0.25"}, -1},
		{[]KeyKind{KindNumeric}, []string{"NaN"}, []string{"1e300"}, 1},
		{[]KeyKind{KindText}, []string{"B"}, []string{"a"}, -1},
		{[]KeyKind{KindText}, []string{"é"}, []string{"z"}, 1},
		{[]KeyKind{KindInt, KindText}, []string{"1", "b"}, []string{"1", "a"}, 1},
		{[]KeyKind{KindInt, KindText}, []string{"1", "z"}, []string{"2", "a"}, -1},
	}
	for _, c := range cases {
		t.Run(fmt.Sprintf("%v against %v", c.a, c.b), func(t *testing.T) {
			if got := newKeyOrder(c.kinds).compare(c.a, c.b); got != c.want {
				t.Errorf("compare = %d, want %d", got, c.want)
			}
		})
	}
	if newKeyOrder([]KeyKind{KindInt, KindOther}) != nil {
		t.Error("a key with a column of unknown order has an order")
	}
}

func intKey(i int) []string { return []string{strconv.Itoa(i)} }

func TestDirtySetKeepsExactKeysUntilItsLimit(t *testing.T) {
	d := NewDirtySet(100)
	d.setKinds("s.t", []KeyKind{KindInt})
	for _, k := range []int{5, 3, 5, 9} {
		d.MarkChanged("s.t", intKey(k))
	}
	d.endWalk("s.t", 0)
	snap := d.snapshot("s.t")
	if snap.whole || len(snap.ranges) != 0 || fmt.Sprint(snap.keys) != "[[3] [5] [9]]" {
		t.Fatalf("snapshot %+v, want keys 3, 5, 9 in key order", snap)
	}
	if s := d.Stats(); s.Keys != 3 || s.Tables != 1 {
		t.Errorf("stats %+v", s)
	}
}

func TestDirtySetFoldsKeysIntoFewRangesThatCoverThemAll(t *testing.T) {
	const max = 80
	d := NewDirtySet(max)
	d.setKinds("s.t", []KeyKind{KindInt})
	d.endWalk("s.t", 0)
	r := rand.New(rand.NewPCG(1, 2))
	marked := map[int]bool{}
	for i := 0; i < 5000; i++ {
		k := r.IntN(1_000_000)
		marked[k] = true
		d.MarkChanged("s.t", intKey(k))
		if d.total > max {
			t.Fatalf("after %d marks the set holds %d entries, limit %d", i+1, d.total, max)
		}
	}
	snap := d.snapshot("s.t")
	if snap.whole {
		t.Fatal("folded to the whole table; want ranges")
	}
	o := newKeyOrder([]KeyKind{KindInt})
	covered := func(k int) bool {
		for _, key := range snap.keys {
			if o.compare(key, intKey(k)) == 0 {
				return true
			}
		}
		for _, s := range snap.ranges {
			if o.contains(s, intKey(k)) {
				return true
			}
		}
		return false
	}
	for k := range marked {
		if !covered(k) {
			t.Fatalf("key %d was marked but is not covered", k)
		}
	}
	if len(snap.ranges) == 0 || len(snap.ranges)+len(snap.keys) > max {
		t.Errorf("%d ranges, %d keys", len(snap.ranges), len(snap.keys))
	}
	// Ranges are sorted and disjoint.
	for i := 1; i < len(snap.ranges); i++ {
		if o.compare(snap.ranges[i-1].Hi, snap.ranges[i].Lo) >= 0 {
			t.Fatalf("ranges %v and %v overlap", snap.ranges[i-1], snap.ranges[i])
		}
	}
}

func TestDirtySetFallsBackToTheWholeTableWithoutAKeyOrder(t *testing.T) {
	d := NewDirtySet(10)
	d.setKinds("s.t", []KeyKind{KindOther})
	d.endWalk("s.t", 0)
	for i := 0; i < 11; i++ {
		d.MarkChanged("s.t", intKey(i))
	}
	if snap := d.snapshot("s.t"); !snap.whole {
		t.Fatalf("snapshot %+v, want whole", snap)
	}
	if d.total != 0 {
		t.Errorf("total %d after folding to whole", d.total)
	}
}

func TestDirtySetTruncateMarksTheWholeTableUntilAWalkCoversIt(t *testing.T) {
	d := NewDirtySet(0)
	d.setKinds("s.t", []KeyKind{KindInt})
	d.MarkChanged("s.t", intKey(1))
	d.MarkChanged("s.t", nil)
	start := d.beginWalk("s.t")
	d.endWalk("s.t", start)
	if snap := d.snapshot("s.t"); snap.whole {
		t.Fatal("a walk started after the truncate did not clear it")
	}
	start = d.beginWalk("s.t")
	d.MarkChanged("s.t", nil) // during the walk
	d.endWalk("s.t", start)
	if snap := d.snapshot("s.t"); !snap.whole {
		t.Fatal("a truncate during the walk was forgotten")
	}
}

func TestDirtySetTablesNotWalkedAreCheckedWhole(t *testing.T) {
	d := NewDirtySet(0)
	if snap := d.snapshot("s.never"); !snap.whole {
		t.Fatal("a table never walked online is not checked whole")
	}
}

func TestCleanChunksDropOnlyKeysMarkedBeforeTheirCheck(t *testing.T) {
	d := NewDirtySet(0)
	d.setKinds("s.t", []KeyKind{KindInt})
	d.MarkChanged("s.t", intKey(10))
	d.MarkChanged("s.t", intKey(50))
	gen := d.Generation()
	d.MarkChanged("s.t", intKey(20)) // after the chunk was read
	d.markClean("s.t", Span{Lo: intKey(0), Hi: intKey(40)}, gen)
	d.endWalk("s.t", 0)
	if got := fmt.Sprint(d.snapshot("s.t").keys); got != "[[20] [50]]" {
		t.Fatalf("keys %s, want 20 (marked after the check) and 50 (outside the chunk)", got)
	}
	if !d.changedSince("s.t", Span{Lo: intKey(0), Hi: intKey(40)}, gen) {
		t.Error("a change after gen inside the chunk is not seen")
	}
	if d.changedSince("s.t", Span{Lo: intKey(40), Hi: intKey(45)}, gen) {
		t.Error("a chunk without changes since gen is seen as changed")
	}
}

func TestSettleDropsWhatADirtyPassVerified(t *testing.T) {
	d := NewDirtySet(0)
	d.setKinds("s.t", []KeyKind{KindInt})
	d.endWalk("s.t", 0)
	d.MarkChanged("s.t", intKey(1))
	d.markSpan("s.t", Span{Lo: intKey(100), Hi: intKey(200)})
	snap := d.snapshot("s.t")
	d.MarkChanged("s.t", intKey(2)) // during the pass
	d.settle("s.t", snap)
	after := d.snapshot("s.t")
	if fmt.Sprint(after.keys) != "[[2]]" || len(after.ranges) != 0 {
		t.Fatalf("after settle: %+v", after)
	}
}

func TestDirtySetIsSafeForConcurrentMarks(t *testing.T) {
	d := NewDirtySet(500)
	d.setKinds("s.t", []KeyKind{KindInt})
	d.endWalk("s.t", 0)
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 2000; i++ {
				d.MarkChanged("s.t", intKey(w*100000+i))
				if i%100 == 0 {
					d.changedSince("s.t", Span{Lo: intKey(0), Hi: intKey(1000)}, 5)
					d.markClean("s.t", Span{Lo: intKey(w * 100000), Hi: intKey(w*100000 + 50)}, d.Generation())
				}
			}
		}()
	}
	wg.Wait()
	if d.total > 500 {
		t.Fatalf("total %d over the limit", d.total)
	}
	keys := d.snapshot("s.t").keys
	if !sort.SliceIsSorted(keys, func(i, j int) bool { return newKeyOrder([]KeyKind{KindInt}).compare(keys[i], keys[j]) < 0 }) {
		t.Error("snapshot keys not in key order")
	}
}

func TestKeysSinceListsOnlyExactKeysMarkedInTheChunkAfterGen(t *testing.T) {
	d := NewDirtySet(0)
	d.setKinds("s.t", []KeyKind{KindInt})
	chunk := Span{Lo: intKey(0), Hi: intKey(40)}
	d.MarkChanged("s.t", intKey(10)) // before the reads: covered by them
	gen := d.Generation()
	d.MarkChanged("s.t", intKey(20))
	d.MarkChanged("s.t", intKey(30))
	d.MarkChanged("s.t", intKey(50)) // outside the chunk
	keys, ok := d.keysSince("s.t", chunk, gen, 10)
	sort.Slice(keys, func(i, j int) bool { return keys[i][0] < keys[j][0] })
	if !ok || fmt.Sprint(keys) != "[[20] [30]]" {
		t.Fatalf("keys %v ok %v, want 20 and 30", keys, ok)
	}
	if _, ok := d.keysSince("s.t", chunk, gen, 1); ok {
		t.Error("more keys than the limit were accepted")
	}
	// Settled except those keys: they stay, key 10 (checked) goes.
	d.markClean("s.t", chunk, gen)
	d.endWalk("s.t", 0)
	if got := fmt.Sprint(d.snapshot("s.t").keys); got != "[[20] [30] [50]]" {
		t.Fatalf("keys left %s, want 20, 30 (left out of the check) and 50", got)
	}
	// A range marked in the chunk after gen: its keys are unknown.
	d.markSpan("s.t", Span{Lo: intKey(35), Hi: intKey(38), HiInclusive: true})
	d.MarkChanged("s.t", intKey(36))
	if _, ok := d.keysSince("s.t", chunk, gen, 10); ok {
		t.Error("a range marked in the chunk after gen was not refused")
	}
	// A truncate after gen.
	d2 := NewDirtySet(0)
	d2.setKinds("s.t", []KeyKind{KindInt})
	g2 := d2.Generation()
	d2.MarkChanged("s.t", nil)
	if _, ok := d2.keysSince("s.t", chunk, g2, 10); ok {
		t.Error("a truncate after gen was not refused")
	}
}

func TestAKeyLessTableIsMarkedWholeWhateverKeyTheStreamGives(t *testing.T) {
	t.Run("keys marked before the table was described make it whole", func(t *testing.T) {
		d := NewDirtySet(100)
		// The stream started first; its replica identity is not a key
		// the verifier can look up.
		d.MarkChanged("s.heap", []string{"a", "b"})
		d.setKinds("s.heap", nil)
		d.endWalk("s.heap", 0)
		if snap := d.snapshot("s.heap"); !snap.whole || len(snap.keys) != 0 {
			t.Fatalf("snapshot %+v, want the whole table", snap)
		}
	})

	t.Run("keys marked after a clean walk make it whole, and a clean dirty pass settles it", func(t *testing.T) {
		d := NewDirtySet(100)
		d.setKinds("s.heap", nil)
		d.endWalk("s.heap", d.beginWalk("s.heap"))
		if snap := d.snapshot("s.heap"); snap.whole || len(snap.keys)+len(snap.ranges) != 0 {
			t.Fatalf("snapshot %+v of a clean walk, want nothing", snap)
		}
		d.MarkChanged("s.heap", []string{"7"})
		snap := d.snapshot("s.heap")
		if !snap.whole || len(snap.keys) != 0 {
			t.Fatalf("snapshot %+v, want the whole table and no key", snap)
		}
		if s := d.Stats(); s.WholeTables != 1 || s.Keys != 0 {
			t.Errorf("stats %+v", s)
		}
		d.settle("s.heap", snap)
		if s := d.Stats(); s.WholeTables != 0 {
			t.Errorf("stats after settling %+v", s)
		}
	})

	t.Run("a difference left to the fence before any change makes it whole", func(t *testing.T) {
		d := NewDirtySet(100)
		d.setKinds("s.heap", nil)
		start := d.beginWalk("s.heap")
		d.markSpan("s.heap", Span{})
		d.endWalk("s.heap", start)
		if snap := d.snapshot("s.heap"); !snap.whole {
			t.Fatalf("snapshot %+v, want the whole table", snap)
		}
		if d.changedSince("s.heap", Span{}, start) {
			t.Error("leaving the table to the fence counts as a change")
		}
	})
}
