package consistency

import (
	"bytes"
	_ "embed"
	"encoding/json"
	"fmt"
	"html/template"
	"io"
	"strings"
	"time"
)

// ReportVersion is the version of the JSON report schema. It changes when
// a field changes meaning or goes away; new optional fields keep it.
const ReportVersion = 1

// Verdict is a report's answer.
type Verdict string

// Verdicts.
const (
	// Equal: every table in scope was compared in full and no difference
	// was found.
	Equal Verdict = "equal"
	// Different: at least one difference (row or schema) was found.
	Different Verdict = "different"
	// Incomplete: no difference found, but something could not be
	// compared (an error, a cancelled pass).
	Incomplete Verdict = "incomplete"
)

// Pass names the kind of pass a report describes.
type Pass string

// Passes.
const (
	PassFull   Pass = "full"   // every chunk, exact (quiet sides)
	PassOnline Pass = "online" // every chunk while replicating
	PassDirty  Pass = "dirty"  // only what changed since the online pass
)

// DiffKind classifies one row difference.
type DiffKind string

// Kinds of row differences.
const (
	MissingOnGreen DiffKind = "missing_on_green" // row on blue only
	ExtraOnGreen   DiffKind = "extra_on_green"   // row on green only
	Changed        DiffKind = "changed"          // same key, some columns differ
	// KeyChanged: a row on blue only and a row on green only whose other
	// columns are all equal: most likely the same row with a changed key.
	KeyChanged DiffKind = "key_changed"
)

// Report is the JSON report of one pass. Its schema is versioned by
// Version; times are RFC 3339, durations in seconds.
type Report struct {
	Version int `json:"version"`
	// Plan is the plan the pass ran for; empty for `cutover verify`.
	Plan string `json:"plan,omitempty"`
	Pass Pass   `json:"pass"`
	// Verdict: equal, different or incomplete.
	Verdict         Verdict   `json:"verdict"`
	StartedAt       time.Time `json:"started_at"`
	FinishedAt      time.Time `json:"finished_at"`
	DurationSeconds float64   `json:"duration_seconds"`
	// Blue and Green say where each side was read: DSN (password
	// removed) and change-stream positions at the start and end.
	Blue  Side `json:"blue"`
	Green Side `json:"green"`
	// Settings are the knobs the pass ran with.
	Settings Settings     `json:"settings"`
	Totals   Totals       `json:"totals"`
	Tables   []*TableInfo `json:"tables"`
	// Errors are failures outside any one table.
	Errors []string `json:"errors,omitempty"`

	// handedOff: chunks still changing in an online pass were recorded
	// in a DirtySet for the fence pass, so they do not make the pass
	// incomplete.
	handedOff bool
}

// Side describes where one side was read.
type Side struct {
	DSN           string `json:"dsn,omitempty"`
	PositionStart string `json:"position_start,omitempty"`
	PositionEnd   string `json:"position_end,omitempty"`
}

// Settings records the options of a pass.
type Settings struct {
	ChunkTimeSeconds float64 `json:"chunk_time_seconds"`
	Parallel         int     `json:"parallel"`
	MaxRowsPerSecond int     `json:"max_rows_per_second,omitempty"`
}

// Totals add up the tables.
type Totals struct {
	Tables          int   `json:"tables"`
	RowsBlue        int64 `json:"rows_blue"`
	RowsGreen       int64 `json:"rows_green"`
	Chunks          int64 `json:"chunks"`
	ChunksDiffering int64 `json:"chunks_differing"`
	Differences     int64 `json:"differences"`
}

// TableInfo is the outcome for one table.
type TableInfo struct {
	Name string   `json:"name"`
	Key  []string `json:"key,omitempty"` // primary key columns
	// KeyLess: the table has no usable key and was compared as a
	// multiset of row hashes; its chunks are buckets of row hashes.
	KeyLess bool `json:"key_less,omitempty"`
	// BisectLevels is how many levels of longer hash prefixes the
	// deepest bisection of a key-less table's buckets went down.
	BisectLevels int `json:"bisect_levels,omitempty"`
	// RowsBlue and RowsGreen count the rows compared on each side.
	RowsBlue  int64 `json:"rows_blue"`
	RowsGreen int64 `json:"rows_green"`
	// Chunks compared, and how many differed at first sight.
	Chunks          int64 `json:"chunks"`
	ChunksDiffering int64 `json:"chunks_differing"`
	// Rechecked counts online re-checks after waiting for green;
	// Unsettled counts chunks still changing after them, left to the pass
	// inside the fence.
	Rechecked int64 `json:"rechecked,omitempty"`
	Unsettled int64 `json:"unsettled,omitempty"`
	// SettledExcept counts chunks still being written that an online
	// re-check settled except for ExceptKeys keys changed while it ran:
	// only those keys are left to the pass inside the fence.
	SettledExcept int64 `json:"settled_except,omitempty"`
	ExceptKeys    int64 `json:"except_keys,omitempty"`
	// Differences found; DifferenceCount may exceed len(Differences) when
	// the list was capped.
	DifferenceCount int64        `json:"difference_count"`
	Differences     []Difference `json:"differences,omitempty"`
	// Schema lists schema differences (the table was not compared).
	Schema          []string `json:"schema,omitempty"`
	Warnings        []string `json:"warnings,omitempty"`
	Error           string   `json:"error,omitempty"`
	DurationSeconds float64  `json:"duration_seconds"`
}

// Difference is one row that differs.
type Difference struct {
	Kind DiffKind `json:"kind"`
	// Key is the row's primary key (blue's for key_changed); for a table
	// without a key, every column of the row (a key-less row is named by
	// its values).
	Key []NamedValue `json:"key"`
	// Copies, for a table without a key, counts the copies of the row on
	// each side: missing_on_green when blue holds more, extra_on_green
	// when green does.
	Copies *Copies `json:"copies,omitempty"`
	// GreenKey is green's key, for key_changed only.
	GreenKey []NamedValue `json:"green_key,omitempty"`
	// Columns: for changed, the columns that differ; for a missing or
	// extra row, every column of the row that exists.
	Columns []ColumnDiff `json:"columns,omitempty"`
}

// Copies counts the copies of a row of a key-less table on each side.
type Copies struct {
	Blue  int64 `json:"blue"`
	Green int64 `json:"green"`
}

// String renders c for people.
func (c *Copies) String() string {
	if c == nil {
		return ""
	}
	return fmt.Sprintf("%d on blue, %d on green", c.Blue, c.Green)
}

// NamedValue is a column and its value in text form.
type NamedValue struct {
	Column string `json:"column"`
	Value  string `json:"value"`
}

// ColumnDiff shows one column on each side; a side without the row is
// absent.
type ColumnDiff struct {
	Column string `json:"column"`
	Blue   *Value `json:"blue,omitempty"`
	Green  *Value `json:"green,omitempty"`
}

// Value is a column value as the report shows it: NULL, or its text form,
// truncated when large and masked when the column looks secret.
type Value struct {
	Null      bool   `json:"null,omitempty"`
	Text      string `json:"text,omitempty"`
	Truncated bool   `json:"truncated,omitempty"`
	Bytes     int    `json:"bytes,omitempty"` // full length in bytes, when truncated
	// Offset is the byte offset of Text in the value, when the excerpt
	// starts inside it (near the first byte that differs).
	Offset   int  `json:"offset,omitempty"`
	Redacted bool `json:"redacted,omitempty"`
}

// String renders v for people.
func (v *Value) String() string {
	switch {
	case v == nil:
		return "(no row)"
	case v.Null:
		return "NULL"
	case v.Truncated && v.Offset > 0:
		return fmt.Sprintf("…%s… (%d bytes, from byte %d)", v.Text, v.Bytes, v.Offset)
	case v.Truncated:
		return fmt.Sprintf("%s… (%d bytes)", v.Text, v.Bytes)
	}
	return v.Text
}

// WriteJSON writes r as indented JSON.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(r); err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	return nil
}

// ReadReport reads a JSON report, refusing a newer schema version.
func ReadReport(rd io.Reader) (*Report, error) {
	var r Report
	dec := json.NewDecoder(rd)
	if err := dec.Decode(&r); err != nil {
		return nil, fmt.Errorf("read report: %w", err)
	}
	switch {
	case r.Version == 0:
		return nil, fmt.Errorf("read report: no version field: not a cutover report")
	case r.Version > ReportVersion:
		return nil, fmt.Errorf("read report: schema version %d is newer than this cutover understands (%d)", r.Version, ReportVersion)
	}
	return &r, nil
}

//go:embed report.html.tmpl
var reportHTML string

var reportTemplate = template.Must(template.New("report").Funcs(template.FuncMap{
	"seconds": func(s float64) string {
		return time.Duration(s * float64(time.Second)).Round(time.Millisecond).String()
	},
	"keytext": func(k []NamedValue) string {
		parts := make([]string, len(k))
		for i, v := range k {
			parts[i] = v.Column + "=" + v.Value
		}
		return strings.Join(parts, ", ")
	},
	"kindtext": func(k DiffKind) string {
		return strings.ReplaceAll(string(k), "_", " ")
	},
	"utc": func(t time.Time) string { return t.UTC().Format("2006-01-02 15:04:05 UTC") },
}).Parse(reportHTML))

// WriteHTML writes r as a self-contained HTML page (inline CSS, no
// scripts, no external assets) to archive with a cutover.
func (r *Report) WriteHTML(w io.Writer) error {
	var buf bytes.Buffer
	if err := reportTemplate.Execute(&buf, r); err != nil {
		return fmt.Errorf("render report: %w", err)
	}
	if _, err := w.Write(buf.Bytes()); err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	return nil
}

// finish computes totals and the verdict.
func (r *Report) finish() {
	r.Totals = Totals{Tables: len(r.Tables)}
	verdict := Equal
	if len(r.Errors) > 0 {
		verdict = Incomplete
	}
	different := false
	for _, t := range r.Tables {
		r.Totals.RowsBlue += t.RowsBlue
		r.Totals.RowsGreen += t.RowsGreen
		r.Totals.Chunks += t.Chunks
		r.Totals.ChunksDiffering += t.ChunksDiffering
		r.Totals.Differences += t.DifferenceCount
		if t.DifferenceCount > 0 || len(t.Schema) > 0 {
			different = true
		}
		if t.Error != "" || (t.Unsettled > 0 && !r.handedOff) {
			verdict = Incomplete
		}
	}
	if different {
		verdict = Different
	}
	r.Verdict = verdict
	r.DurationSeconds = r.FinishedAt.Sub(r.StartedAt).Seconds()
}
