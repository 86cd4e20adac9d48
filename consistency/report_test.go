package consistency

import (
	"bytes"
	"reflect"
	"strings"
	"testing"
	"time"
)

func sampleReport() *Report {
	long := strings.Repeat("x", 1000)
	t := &Table{Name: "public.users", Columns: []Column{{Name: "id"}, {Name: "email"}, {Name: "password_hash"}, {Name: "bio"}}, Key: []int{0}}
	s := func(v string) *string { return &v }
	blue := []Row{
		{Key: []string{"1"}, Values: []*string{s("1"), s("a@x"), s("h1"), s(long)}, Hashes: []string{"1", "2", "3", "4"}},
		{Key: []string{"2"}, Values: []*string{s("2"), s("b@x"), s("h2"), nil}, Hashes: []string{"5", "6", "7", "0"}},
		{Key: []string{"3"}, Values: []*string{s("3"), s("c@x"), s("h3"), nil}, Hashes: []string{"8", "9", "10", "0"}},
	}
	green := []Row{
		{Key: []string{"1"}, Values: []*string{s("1"), s("a@x"), s("h1-changed"), s(long + "y")}, Hashes: []string{"1", "2", "33", "44"}},
		{Key: []string{"4"}, Values: []*string{s("4"), s("c@x"), s("h3"), nil}, Hashes: []string{"11", "9", "10", "0"}},
		{Key: []string{"5"}, Values: []*string{s("5"), s(""), nil, nil}, Hashes: []string{"12", "13", "0", "0"}},
	}
	diffs := classify(t, blue, green, 64)
	start := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	r := &Report{
		Version: ReportVersion, Pass: PassFull, StartedAt: start, FinishedAt: start.Add(1500 * time.Millisecond),
		Blue:   Side{DSN: "postgres://app:[redacted]@blue:5432/db", PositionStart: "0/16B3748", PositionEnd: "0/16B3748"},
		Green:  Side{DSN: "postgres://app:[redacted]@green:5432/db", PositionStart: "0/1000000"},
		Tables: []*TableInfo{{Name: "public.users", Key: []string{"id"}, RowsBlue: 3, RowsGreen: 3, Chunks: 1, ChunksDiffering: 1, DifferenceCount: int64(len(diffs)), Differences: diffs}},
	}
	r.finish()
	return r
}

func TestRowsAreClassifiedByKind(t *testing.T) {
	r := sampleReport()
	var kinds []string
	for _, d := range r.Tables[0].Differences {
		kinds = append(kinds, string(d.Kind)+":"+d.Key[0].Value)
	}
	// Row 1 changed; row 2 missing; row 3 became row 4 (same other
	// columns); row 5 extra.
	if got, want := strings.Join(kinds, " "), "changed:1 missing_on_green:2 key_changed:3 extra_on_green:5"; got != want {
		t.Fatalf("kinds %q, want %q", got, want)
	}
	changed := r.Tables[0].Differences[0]
	if len(changed.Columns) != 2 || changed.Columns[0].Column != "password_hash" || !changed.Columns[0].Blue.Redacted || changed.Columns[0].Blue.Text != "[redacted]" {
		t.Errorf("secret column not masked: %+v", changed.Columns)
	}
	bio := changed.Columns[1]
	if !bio.Blue.Truncated || bio.Blue.Bytes != 1000 || bio.Green.Bytes != 1001 || len(bio.Blue.Text) > 64 {
		t.Errorf("long value not truncated: %+v / %+v", bio.Blue, bio.Green)
	}
	if bio.Green.Offset == 0 || !strings.Contains(bio.Green.Text, "y") {
		t.Errorf("excerpt does not show the difference at the end: %+v", bio.Green)
	}
	if r.Verdict != Different || r.Totals.Differences != 4 {
		t.Errorf("verdict %s, totals %+v", r.Verdict, r.Totals)
	}
}

func TestReportsRoundTripThroughJSON(t *testing.T) {
	r := sampleReport()
	var buf bytes.Buffer
	if err := r.WriteJSON(&buf); err != nil {
		t.Fatal(err)
	}
	for _, field := range []string{`"version": 1`, `"verdict": "different"`, `"position_start": "0/16B3748"`, `"kind": "key_changed"`, `"null": true`} {
		if !strings.Contains(buf.String(), field) {
			t.Errorf("JSON lacks %s", field)
		}
	}
	back, err := ReadReport(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(back, r) {
		t.Errorf("round trip changed the report:\n%+v\n%+v", back, r)
	}
}

func TestReadReportRefusesWhatItCannotRead(t *testing.T) {
	for name, in := range map[string]string{
		"a newer schema":    `{"version": 99}`,
		"no version at all": `{"verdict": "equal"}`,
		"not JSON":          `<html>`,
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := ReadReport(strings.NewReader(in)); err == nil {
				t.Fatal("read without error")
			}
		})
	}
}

func TestHTMLReportIsSelfContained(t *testing.T) {
	r := sampleReport()
	var buf bytes.Buffer
	if err := r.WriteHTML(&buf); err != nil {
		t.Fatal(err)
	}
	page := buf.String()
	for _, want := range []string{"<!DOCTYPE html>", "<style>", ">different<", "public.users", "key changed", "missing on green", "(no row)", "NULL", "0/16B3748"} {
		if !strings.Contains(page, want) {
			t.Errorf("page lacks %q", want)
		}
	}
	for _, bad := range []string{"<script", "<link", " src=", "@import", "url("} {
		if strings.Contains(page, bad) {
			t.Errorf("page refers to something outside itself: %q", bad)
		}
	}
}

func TestTheVerdictIsIncompleteWhenSomethingWasNotCompared(t *testing.T) {
	r := &Report{Tables: []*TableInfo{{Name: "a"}, {Name: "b", Error: "connection reset"}}}
	r.finish()
	if r.Verdict != Incomplete {
		t.Fatalf("verdict %s", r.Verdict)
	}
	r.Tables[0].DifferenceCount = 1
	r.finish()
	if r.Verdict != Different {
		t.Fatalf("verdict %s: a difference found is an answer even if another table failed", r.Verdict)
	}
}

func TestKeyLessRowsAreNamedByTheirValuesWithTheirCopiesSecretsMasked(t *testing.T) {
	tab := &Table{Name: "public.logins", Columns: []Column{{Name: "who"}, {Name: "password"}, {Name: "note"}}}
	s := func(v string) *string { return &v }
	row := func(hash string, count int64, who string, note *string) Row {
		return Row{Hash: hash, Count: count, Values: []*string{s(who), s("hunter2"), note}, Hashes: []string{who, "p", "n"}}
	}
	blue := []Row{row("0a", 3, "ann", nil), row("0b", 1, "bob", s("x"))}
	green := []Row{row("0a", 2, "ann", nil), row("0c", 1, "cid", s("y"))}
	diffs, _ := classifyCopies(tab, blue, green, "", 64)
	var got []string
	for _, d := range diffs {
		var vals []string
		for _, k := range d.Key {
			vals = append(vals, k.Column+"="+k.Value)
		}
		got = append(got, string(d.Kind)+" "+strings.Join(vals, ",")+" "+d.Copies.String())
	}
	want := []string{
		"missing_on_green who=ann,password=[redacted],note=NULL 3 on blue, 2 on green",
		"missing_on_green who=bob,password=[redacted],note=x 1 on blue, 0 on green",
		"extra_on_green who=cid,password=[redacted],note=y 0 on blue, 1 on green",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("differences:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	// Past a cut (a side returned only rows up to 0b), nothing is listed.
	if cut, _ := classifyCopies(tab, blue, green, "0b", 64); len(cut) != 2 {
		t.Errorf("with a cut at 0b: %d differences, want 2", len(cut))
	}

	r := &Report{Version: ReportVersion, Pass: PassFull, Tables: []*TableInfo{{Name: tab.Name, KeyLess: true, DifferenceCount: 3, Differences: diffs}}}
	r.finish()
	var buf bytes.Buffer
	if err := r.WriteHTML(&buf); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"none: rows compared as a multiset", "copies: 3 on blue, 2 on green", "who=ann, password=[redacted], note=NULL"} {
		if !strings.Contains(buf.String(), want) {
			t.Errorf("page lacks %q", want)
		}
	}
	if strings.Contains(buf.String(), "hunter2") {
		t.Error("page shows a secret column's value")
	}
}
