package postgres

import (
	"fmt"
	"strconv"
	"strings"
	"testing"

	"github.com/cutover/cutover/consistency"
	"github.com/cutover/cutover/integration"
)

// The type zoo: a column of every type the replication engine carries,
// 3000 rows with keys 2, 4, ..., 6000 (gaps, so that extra rows fit
// between), chunks of 500 rows.
const zooSetup = `
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TABLE zoo (
	id bigint PRIMARY KEY,
	i2 smallint, i4 integer, i8 bigint,
	num numeric, numfix numeric(12,4),
	f4 real, f8 double precision,
	txt text, note text, vc varchar(40), bp char(8),
	by bytea, js json, jb jsonb,
	arr integer[], tarr text[],
	ts timestamp, tstz timestamptz, ts3 timestamp(3), d date, tm time, ttz timetz, iv interval,
	u uuid, b boolean, mood mood, dom posint, m money, ip inet,
	big text
);
ALTER TABLE zoo ALTER big SET STORAGE EXTERNAL;
CREATE FUNCTION reset_zoo() RETURNS void LANGUAGE sql AS $$
TRUNCATE zoo;
INSERT INTO zoo SELECT 2 * g,
	(g % 30000)::smallint, g * 7, g::bigint * 1000000007,
	(g / 7.0)::numeric(20,4), g / 8.0,
	(g / 3.0)::real,
	CASE g % 100 WHEN 1 THEN 'NaN'::float8 WHEN 2 THEN 'Infinity' WHEN 3 THEN '-Infinity' WHEN 4 THEN '-0' ELSE g / 3.0 END,
	'row ' || g || ' ü✓ 東京', CASE g % 3 WHEN 0 THEN '' WHEN 1 THEN NULL ELSE 'n' || g END, 'vc' || g, 'bp' || (g % 1000),
	decode(md5(g::text), 'hex'), ('{"b": ' || g || ', "a": "x"}')::json, ('{"b": ' || g || ', "a": [1.10, "x"]}')::jsonb,
	ARRAY[g, g + 1], ARRAY['a', g::text, NULL],
	'2024-01-01 00:00:00'::timestamp + g * interval '61.5 seconds',
	'2024-01-01 00:00:00+00'::timestamptz + g * interval '61.123456 seconds',
	'2024-01-01 00:00:00'::timestamp(3) + g * interval '1.5 seconds',
	'2024-01-01'::date + g, '00:00'::time + g * interval '1.25 second', '12:00:00+02'::timetz + g * interval '1 second',
	g * interval '1 day 3 hours',
	md5('u' || g)::uuid, g % 2 = 0, (ARRAY['sad', 'ok', 'happy']::mood[])[g % 3 + 1], g, (g * 1.25)::numeric::money,
	('10.0.' || (g / 256) % 256 || '.' || g % 256)::inet,
	CASE WHEN g IN (1, 1500, 3000) OR g % 500 = 0 THEN repeat(md5(g::text), 2000) END
FROM generate_series(1, 3000) g;
$$;
SELECT reset_zoo();
-- fold_twin(us) is the shift from int64 microseconds us to another value
-- whose 32-bit halves xor alike (us # 0x100000001, for us >= 0): the
-- types hashed through such microseconds hash both alike.
CREATE FUNCTION fold_twin(us int8) RETURNS interval LANGUAGE sql AS
$$ SELECT ((us # 4294967297) - us) * interval '1 microsecond' $$;
`

// zooPositions are rows in the first, a middle and the last chunk.
var zooPositions = []struct {
	name string
	id   int
}{{"first chunk", 2}, {"middle chunk", 3000}, {"last chunk", 6000}}

// changedValues change one value of each column, the smallest change the
// type allows where that matters.
var changedValues = []struct {
	column, set string
}{
	{"i2", "i2 + 1"},
	{"i4", "i4 + 1"},
	{"i8", "i8 + 1"},
	{"num", "num + 0.0001"},
	{"numfix", "numfix + 0.0001"},
	{"f4", "f4 + 1"},
	{"f8", "CASE WHEN f8 = 'NaN' THEN 'Infinity' ELSE f8 + 1 END"},
	{"txt", "overlay(txt placing 'Ü' from 2 for 1)"},
	{"note", "coalesce(note, '') || 'x'"},
	{"vc", "vc || 'x'"},
	{"bp", "'zz'"},
	{"by", "set_bit(by, 3, 1 - get_bit(by, 3))"},
	{"js", `('{"b": ' || id / 2 + 1 || ', "a": "x"}')::json`},
	{"jb", "jsonb_set(jb, '{b}', to_jsonb((jb->>'b')::int + 1))"},
	{"arr", "ARRAY[arr[1], arr[2] + 1]"},
	{"tarr", "ARRAY['a', tarr[2], '']"},
	{"ts", "ts + interval '1 microsecond'"},
	{"tstz", "tstz + interval '1 microsecond'"},
	{"ts3", "ts3 + interval '1 millisecond'"},
	{"d", "d + 1"},
	{"tm", "tm + interval '1 microsecond'"},
	{"ttz", "ttz + interval '1 microsecond'"},
	{"iv", "iv + interval '1 microsecond'"},
	{"u", "overlay(u::text placing CASE WHEN left(u::text, 1) = '0' THEN '1' ELSE '0' END from 1 for 1)::uuid"},
	{"b", "NOT b"},
	{"mood", "CASE mood WHEN 'sad' THEN 'ok' ELSE 'sad' END::mood"},
	{"dom", "dom + 1"},
	{"m", "m + 0.01::money"},
	{"ip", "ip + 1"},
	{"big", "overlay(big placing 'X' from 30000 for 1)"},
}

func newZoo(t *testing.T) *pair {
	t.Helper()
	p := newPair(t, integration.PostgresOptions{}, integration.PostgresOptions{})
	p.both(t, zooSetup)
	return p
}

// mutate resets green's zoo to blue's rows, then runs sql on green.
func (p *pair) mutate(t *testing.T, sql string) {
	t.Helper()
	exec(t, p.green, "SELECT reset_zoo(); "+sql)
}

func zooOptions() consistency.Options {
	o := smallChunks(500)
	o.BisectRows = 8
	return o
}

// wantOne checks that the report holds exactly one difference, of kind,
// at key id, touching exactly the columns given.
func wantOne(t *testing.T, rep *consistency.Report, kind consistency.DiffKind, id int, columns ...string) consistency.Difference {
	t.Helper()
	if errs := tableErrors(rep); len(errs) > 0 {
		t.Fatalf("errors: %v", errs)
	}
	ds := diffs(rep)
	if rep.Verdict != consistency.Different || len(ds) != 1 || rep.Totals.Differences != 1 {
		t.Fatalf("verdict %s, %d differences listed, %d counted; want exactly one: %+v", rep.Verdict, len(ds), rep.Totals.Differences, ds)
	}
	if rep.Totals.ChunksDiffering != 1 {
		t.Errorf("%d chunks differ, want 1", rep.Totals.ChunksDiffering)
	}
	d := ds[0]
	if d.Kind != kind {
		t.Errorf("kind %s, want %s", d.Kind, kind)
	}
	if len(d.Key) != 1 || d.Key[0].Column != "id" || d.Key[0].Value != strconv.Itoa(id) {
		t.Errorf("key %+v, want id=%d", d.Key, id)
	}
	if columns != nil {
		var got []string
		for _, c := range d.Columns {
			got = append(got, c.Column)
		}
		if strings.Join(got, ",") != strings.Join(columns, ",") {
			t.Errorf("columns %v, want %v", got, columns)
		}
	}
	return d
}

func TestEverySingleRowDifferenceIsFoundForEveryType(t *testing.T) {
	p := newZoo(t)
	opts := zooOptions()

	t.Run("identical tables are equal", func(t *testing.T) {
		p.mutate(t, "")
		rep := p.verify(t, opts, "zoo")
		if rep.Verdict != consistency.Equal || rep.Totals.RowsBlue != 3000 || rep.Totals.RowsGreen != 3000 {
			t.Fatalf("verdict %s, rows %d/%d, errors %v", rep.Verdict, rep.Totals.RowsBlue, rep.Totals.RowsGreen, tableErrors(rep))
		}
		if rep.Totals.Chunks != 6 {
			t.Errorf("%d chunks, want 6", rep.Totals.Chunks)
		}
	})

	for _, pos := range zooPositions {
		for _, cv := range changedValues {
			t.Run(fmt.Sprintf("one changed %s value in the %s is reported with both values", cv.column, pos.name), func(t *testing.T) {
				p.mutate(t, fmt.Sprintf("UPDATE zoo SET %s = %s WHERE id = %d", cv.column, cv.set, pos.id))
				d := wantOne(t, p.verify(t, opts, "zoo"), consistency.Changed, pos.id, cv.column)
				if len(d.Columns) == 1 {
					c := d.Columns[0]
					if c.Blue == nil || c.Green == nil || c.Blue.String() == c.Green.String() {
						t.Errorf("values not shown apart: blue %v, green %v", c.Blue, c.Green)
					}
				}
			})
		}
		t.Run("a missing row in the "+pos.name+" is reported with its values", func(t *testing.T) {
			p.mutate(t, fmt.Sprintf("DELETE FROM zoo WHERE id = %d", pos.id))
			d := wantOne(t, p.verify(t, opts, "zoo"), consistency.MissingOnGreen, pos.id)
			if len(d.Columns) != 31 || d.Columns[0].Blue == nil || d.Columns[0].Green != nil {
				t.Errorf("row values: %+v", d.Columns)
			}
		})
		t.Run("an extra row in the "+pos.name+" is reported", func(t *testing.T) {
			extra := pos.id + 1
			if pos.id == 2 {
				extra = 1 // below every key on blue
			}
			p.mutate(t, fmt.Sprintf("INSERT INTO zoo (id, txt) VALUES (%d, 'extra')", extra))
			d := wantOne(t, p.verify(t, opts, "zoo"), consistency.ExtraOnGreen, extra)
			if len(d.Columns) != 31 || d.Columns[0].Green == nil || d.Columns[0].Blue != nil {
				t.Errorf("row values: %+v", d.Columns)
			}
		})
		t.Run("a changed key in the "+pos.name+" is reported as one key change", func(t *testing.T) {
			p.mutate(t, fmt.Sprintf("UPDATE zoo SET id = id + 1 WHERE id = %d", pos.id))
			d := wantOne(t, p.verify(t, opts, "zoo"), consistency.KeyChanged, pos.id, "id")
			if len(d.GreenKey) != 1 || d.GreenKey[0].Value != strconv.Itoa(pos.id+1) {
				t.Errorf("green key %+v, want %d", d.GreenKey, pos.id+1)
			}
		})
	}

	for _, cv := range changedValues {
		if cv.column == "note" {
			continue // NULL in the middle row already; see NULL versus empty string
		}
		t.Run("NULL instead of a "+cv.column+" value is reported", func(t *testing.T) {
			p.mutate(t, fmt.Sprintf("UPDATE zoo SET %s = NULL WHERE id = 3000", cv.column))
			d := wantOne(t, p.verify(t, opts, "zoo"), consistency.Changed, 3000, cv.column)
			if c := d.Columns[0]; c.Green == nil || !c.Green.Null || c.Blue == nil || c.Blue.Null {
				t.Errorf("blue %+v, green %+v; want a value and NULL", c.Blue, c.Green)
			}
		})
	}

	special := []struct {
		name    string
		sql     string
		id      int
		columns []string // nil: no difference expected
	}{
		{"NULL versus empty string differ", "UPDATE zoo SET note = NULL WHERE id = 3000", 3000, []string{"note"}},
		{"empty string versus NULL differ", "UPDATE zoo SET note = '' WHERE id = 2", 2, []string{"note"}},
		{"an empty string versus NULL inside an array differ", "UPDATE zoo SET tarr = ARRAY['a', tarr[2], ''] WHERE id = 6000", 6000, []string{"tarr"}},
		{"numeric scale is significant: 1.1 and 1.10 differ", "UPDATE zoo SET num = num::numeric(30,8) WHERE id = 3000", 3000, []string{"num"}},
		{"json keeps its text: reordered keys differ", `UPDATE zoo SET js = ('{"a": "x", "b": ' || id / 2 || '}')::json WHERE id = 3000`, 3000, []string{"js"}},
		{"jsonb numbers keep their scale", `UPDATE zoo SET jb = ('{"b": ' || id / 2 || ', "a": [1.1, "x"]}')::jsonb WHERE id = 3000`, 3000, []string{"jb"}},
		{"interval fields are significant: 1 day and 24 hours differ", "UPDATE zoo SET iv = iv - interval '1 day' + interval '24 hours' WHERE id = 3000", 3000, []string{"iv"}},
		{"bigints whose halves xor alike differ (hashint8 folds them to 32 bits)", "UPDATE zoo SET i8 = i8 # 4294967297 WHERE id = 3000", 3000, []string{"i8"}},
		{"timestamps whose microseconds' halves xor alike differ", "UPDATE zoo SET ts = ts + fold_twin((extract(epoch FROM ts) * 1000000)::int8 - 946684800000000) WHERE id = 3000", 3000, []string{"ts"}},
		{"timestamptzs whose microseconds' halves xor alike differ", "UPDATE zoo SET tstz = tstz + fold_twin((extract(epoch FROM tstz) * 1000000)::int8 - 946684800000000) WHERE id = 3000", 3000, []string{"tstz"}},
		{"times whose microseconds' halves xor alike differ", "UPDATE zoo SET tm = tm + fold_twin((extract(epoch FROM tm) * 1000000)::int8) WHERE id = 3000", 3000, []string{"tm"}},
		{"timetzs whose local microseconds' halves xor alike differ", "UPDATE zoo SET ttz = ttz + fold_twin((extract(epoch FROM ttz::time) * 1000000)::int8) WHERE id = 3000", 3000, []string{"ttz"}},
		{"a timetz in another zone at the same local time differs", "UPDATE zoo SET ttz = (ttz::time::text || '+03')::timetz WHERE id = 3000", 3000, []string{"ttz"}},
		{"a value swapped between two rows is seen", "UPDATE zoo SET i4 = CASE id WHEN 3000 THEN 10507 ELSE 10500 END WHERE id IN (3000, 3002)", 0, []string{"i4"}},
		{"jsonb with keys written in another order is the same value", `UPDATE zoo SET jb = ('{"a": [1.10, "x"], "b": ' || id / 2 || '}')::jsonb WHERE id = 3000`, 3000, nil},
		{"float -0 and 0 are the same value", "UPDATE zoo SET f8 = 0 WHERE id = 8", 8, nil},
		{"NaN is NaN", "UPDATE zoo SET f8 = 'NaN' WHERE id = 2", 2, nil},
	}
	for _, s := range special {
		t.Run(s.name, func(t *testing.T) {
			p.mutate(t, s.sql)
			rep := p.verify(t, opts, "zoo")
			switch {
			case s.columns == nil:
				if rep.Verdict != consistency.Equal {
					t.Fatalf("verdict %s, want equal: %+v %v", rep.Verdict, diffs(rep), tableErrors(rep))
				}
			case s.id == 0:
				// The swap: both rows changed.
				ds := diffs(rep)
				if len(ds) != 2 || ds[0].Kind != consistency.Changed || ds[1].Kind != consistency.Changed {
					t.Fatalf("differences %+v, want two changed rows", ds)
				}
			default:
				wantOne(t, rep, consistency.Changed, s.id, s.columns...)
			}
		})
	}

	t.Run("large values are truncated in the report", func(t *testing.T) {
		p.mutate(t, "UPDATE zoo SET big = overlay(big placing 'X' from 30000 for 1) WHERE id = 3000")
		d := wantOne(t, p.verify(t, opts, "zoo"), consistency.Changed, 3000, "big")
		c := d.Columns[0]
		if !c.Blue.Truncated || c.Blue.Bytes != 64000 || len(c.Blue.Text) > consistency.DefaultMaxValueBytes {
			t.Errorf("blue value not truncated: truncated=%v bytes=%d len=%d", c.Blue.Truncated, c.Blue.Bytes, len(c.Blue.Text))
		}
	})
}
