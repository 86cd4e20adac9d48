package postgres

import (
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/cutover/cutover/replication"
)

func testRel(compact, upsert bool) *relState {
	return &relState{
		rel: &relation{ID: 1, Namespace: "public", Name: "t", Identity: 'd', Columns: []relColumn{
			{Key: true, Name: "id"}, {Name: "a"}, {Name: "big"}}},
		name: TableName{"public", "t"}, keyCols: []int{0}, compact: compact, upsert: upsert, app: !upsert,
	}
}

func row(id, a, big string) tuple {
	t := tuple{txt(id), txt(a), txt(big)}
	if big == "<u>" {
		t[2] = unchanged
	}
	return t
}

func ins(id, a, big string) op { return op{kind: msgInsert, key: tuple{txt(id)}, row: row(id, a, big)} }
func upd(id, a, big string) op { return op{kind: msgUpdate, key: tuple{txt(id)}, row: row(id, a, big)} }
func del(id string) op         { return op{kind: msgDelete, key: tuple{txt(id)}} }

func describe(tb *tableBatch) string {
	var out []string
	for _, o := range tb.ops {
		if o.kind == opDead {
			continue
		}
		s := string(rune(o.kind)) + ":" + string(o.key[0].Data)
		if o.row != nil {
			s += "=" + string(o.row[1].Data) + "/"
			if o.row[2].Kind == valUnchanged {
				s += "<u>"
			} else {
				s += string(o.row[2].Data)
			}
		}
		if o.alone {
			s += "!"
		}
		out = append(out, s)
	}
	return strings.Join(out, " ")
}

func TestBatchMergesEachRowToItsNetChange(t *testing.T) {
	cases := []struct {
		name    string
		compact bool
		upsert  bool
		ops     []op
		want    string
	}{
		{"insert then updates is one insert of the last version", true, false,
			[]op{ins("1", "a", "B"), upd("1", "b", "<u>"), upd("1", "c", "<u>")}, "I:1=c/B"},
		{"updates keep the last value of each column, TOAST included", true, false,
			[]op{upd("1", "a", "<u>"), upd("1", "b", "X"), upd("1", "c", "<u>")}, "U:1=c/X"},
		{"insert then delete leaves nothing", true, false,
			[]op{ins("1", "a", "B"), del("1")}, ""},
		{"update then delete is a delete", true, false,
			[]op{upd("1", "a", "B"), del("1")}, "D:1"},
		{"delete then insert is a new version of the row", true, false,
			[]op{del("1"), ins("1", "a", "B")}, "U:1=a/B"},
		{"bookkeeping tables upsert", true, true,
			[]op{del("1"), ins("1", "a", "B"), upd("2", "x", "y")}, "I:1=a/B I:2=x/y"},
		{"different rows stay apart", true, false,
			[]op{upd("1", "a", "B"), upd("2", "b", "C"), upd("1", "c", "<u>")}, "U:1=c/B U:2=b/C"},
		{"a key change stands alone and is a barrier for both keys", true, false,
			[]op{upd("1", "a", "B"), {kind: opKeyUpdate, key: tuple{txt("1")}, row: row("2", "a", "<u>")}, upd("2", "z", "<u>"), upd("1", "n", "N")},
			"U:1=a/B K:1=a/<u>! U:2=z/<u> U:1=n/N"},
		{"without compaction everything stays in order", false, false,
			[]op{ins("1", "a", "B"), upd("1", "b", "<u>"), del("1")}, "I:1=a/B U:1=b/<u> D:1"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b := newBatch()
			tb := b.table(testRel(tc.compact, tc.upsert))
			for _, o := range tc.ops {
				tb.add(o)
			}
			if got := describe(tb); got != tc.want {
				t.Errorf("got  %q\nwant %q", got, tc.want)
			}
		})
	}
}

func TestArrayLiteralEscapes(t *testing.T) {
	got := string(appendArray(nil, []value{txt(`a"b`), txt(`c\d`), null, txt(""), txt("NULL"), txt("{x,y}")}))
	want := `{"a\"b","c\\d",NULL,"","NULL","{x,y}"}`
	if got != want {
		t.Errorf("got %s, want %s", got, want)
	}
}

func TestNameIsSafeShortAndDistinct(t *testing.T) {
	if got := Name("Orders", "orders-db", Forward); !strings.HasPrefix(got, "cutover_orders_orders_db_f_") || len(got) != len("cutover_orders_orders_db_f_")+hashLen {
		t.Errorf("Name = %q", got)
	}
	long1 := Name(strings.Repeat("p", 60), "pair-one", Forward)
	long2 := Name(strings.Repeat("p", 60), "pair-two", Forward)
	if len(long1) > 63 || long1 == long2 || !strings.HasPrefix(long1, NamePrefix) {
		t.Errorf("long names %q %q", long1, long2)
	}
	// Names that the old scheme made equal.
	seen := map[string]string{}
	for _, c := range []struct {
		plan, pair string
		dir        Direction
	}{
		{"shop", "db-1", Forward}, {"shop", "db_1", Forward}, {"shop", "DB_1", Forward},
		{"shop", "db-rev", Forward}, {"shop", "db", Reverse}, {"shop", "db", Forward},
		{"a-b", "c", Forward}, {"a", "b-c", Forward}, {"a_b", "c", Forward},
	} {
		n := Name(c.plan, c.pair, c.dir)
		if len(n) > 63 || !strings.HasPrefix(n, NamePrefix) {
			t.Errorf("Name(%v) = %q: too long or without the prefix", c, n)
		}
		for _, r := range n {
			if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '_') {
				t.Errorf("Name(%v) = %q holds %q, which a slot name may not", c, n, r)
			}
		}
		key := c.plan + "/" + c.pair + "/" + string(c.dir)
		if other, dup := seen[n]; dup {
			t.Errorf("%s and %s share the name %s", other, key, n)
		}
		seen[n] = key
	}
	if LegacyName("shop", "db-rev") != LegacyName("shop", "db_rev") {
		t.Error("the legacy scheme is expected to collide here")
	}
}

func TestBreachLogKeepsChangesAfterTheFirstMarker(t *testing.T) {
	var l breachLog
	c := replication.Change{Table: "public.t"}
	if l.add(10, c, 3) {
		t.Error("recorded before any marker")
	}
	l.marker(20)
	l.add(20, c, 3) // same transaction as the marker: before it
	for _, end := range []pglogrepl.LSN{30, 40} {
		if !l.add(end, c, 3) {
			t.Error("not recorded after the marker")
		}
	}
	if got, complete := l.after(20); len(got) != 2 || !complete {
		t.Errorf("after(20) = %d, %v", len(got), complete)
	}
	if _, complete := l.after(10); complete {
		t.Error("after(10) claims to be complete before the first marker")
	}
	for _, end := range []pglogrepl.LSN{50, 60, 70, 80} {
		l.add(end, c, 3)
	}
	if got, complete := l.after(20); len(got) != 6 || !complete {
		t.Errorf("up to twice the bound, nothing is dropped: %d, complete %v", len(got), complete)
	}
	l.add(90, c, 3) // over twice the bound: back to the newest 3 (70, 80, 90)
	if got, complete := l.after(20); len(got) != 3 || complete {
		t.Errorf("after overflow: %d, complete %v", len(got), complete)
	}
	if got, complete := l.after(60); len(got) != 3 || !complete {
		t.Errorf("after(60): %d, complete %v", len(got), complete)
	}
	if got, _ := l.after(75); len(got) != 2 {
		t.Errorf("after(75): %d changes, want 2", len(got))
	}
}

func TestHeartbeatDelayIsTimeSinceGreenWasCurrent(t *testing.T) {
	var h heartbeats
	t0 := time.Unix(1000, 0)
	if d := h.delay(t0); d != 0 {
		t.Errorf("nothing written: %s", d)
	}
	h.wrote(1, t0)
	h.wrote(2, t0.Add(250*time.Millisecond))
	h.wrote(3, t0.Add(500*time.Millisecond))
	if d := h.delay(t0.Add(time.Second)); d != time.Second {
		t.Errorf("nothing applied: %s", d)
	}
	h.applied(2)
	if d := h.delay(t0.Add(time.Second)); d != 500*time.Millisecond {
		t.Errorf("2 applied: %s", d)
	}
	h.applied(3)
	if d := h.delay(t0.Add(time.Second)); d != 0 {
		t.Errorf("caught up: %s", d)
	}
	h.wrote(3, t0) // the write's reply arrived after it was applied
	if d := h.delay(t0.Add(time.Second)); d != 0 {
		t.Errorf("late reply counted: %s", d)
	}
}

// BenchmarkBreachLogAdd is the cost of recording one applied change after
// a marker, with the log full at the default bound (afterCommit does it
// for every change, holding the mutex that Lag and Status take).
func BenchmarkBreachLogAdd(b *testing.B) {
	var l breachLog
	l.marker(1)
	c := replication.Change{Table: "public.t", Key: []string{"42"}, Position: "0/1"}
	for i := 0; i < 10000; i++ {
		l.add(pglogrepl.LSN(i+2), c, 10000)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		l.add(pglogrepl.LSN(i+20000), c, 10000)
	}
}

func TestPlanNamesPreferWhatThePlanRecorded(t *testing.T) {
	fwd, rev := PlanNames("shop", "db", nil)
	if fwd != Name("shop", "db", Forward) || rev != Name("shop", "db", Reverse) {
		t.Errorf("a plan that recorded nothing: %s %s", fwd, rev)
	}
	// A plan created before names carried a hash recorded its forward
	// name: it finishes with the old scheme in both directions.
	fwd, rev = PlanNames("shop", "db", map[string]string{FactSlot + "db": "cutover_shop_db"})
	if fwd != "cutover_shop_db" || rev != "cutover_shop_db_rev" {
		t.Errorf("a legacy plan: %s %s", fwd, rev)
	}
	facts := NameFacts("db", "cutover_a", "cutover_b")
	if fwd, rev = PlanNames("shop", "db", facts); fwd != "cutover_a" || rev != "cutover_b" {
		t.Errorf("recorded names: %s %s", fwd, rev)
	}
	if got := RecordedNames(facts); len(got) != 4 {
		t.Errorf("RecordedNames = %v", got)
	}
}
