package postgres

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/cutover/cutover/consistency"
	"github.com/cutover/cutover/integration"
)

const keysSetup = `
CREATE TABLE composite (a int, b text, v int, PRIMARY KEY (a, b));
INSERT INTO composite SELECT a, b || g, a * g FROM generate_series(-3, 3) a, unnest(ARRAY['x', 'X', 'é', '']) b, generate_series(1, 60) g;
CREATE TABLE uuids (u uuid PRIMARY KEY, v int);
INSERT INTO uuids SELECT md5('k' || g)::uuid, g FROM generate_series(1, 1500) g;
CREATE TABLE gaps (id bigint PRIMARY KEY, v text);
INSERT INTO gaps SELECT g, 'v' || g FROM generate_series(-600, 600) g;
INSERT INTO gaps VALUES (-9223372036854775808, 'min'), (9223372036854775807, 'max'), (-1000000000000000, 'far below'), (1000000000000000, 'far above');
CREATE TABLE numbers (n numeric PRIMARY KEY, v int);
INSERT INTO numbers SELECT (g / 7.0)::numeric(20,5), g FROM generate_series(-700, 700) g;
CREATE TABLE stamps (at timestamptz PRIMARY KEY, v int);
INSERT INTO stamps SELECT '2024-03-31 00:00:00+00'::timestamptz + g * interval '17 minutes 0.000001 seconds', g FROM generate_series(1, 1200) g;
CREATE TABLE texts (k varchar(30) PRIMARY KEY, v int);
INSERT INTO texts SELECT chr(32 + g % 90) || g, g FROM generate_series(1, 1200) g;
`

func TestKeysOfEveryShapeAreChunkedAndMatched(t *testing.T) {
	// Green in another time zone: timestamptz keys print and parse in
	// the session's UTC on both sides.
	p := newPair(t, integration.PostgresOptions{}, integration.PostgresOptions{Settings: map[string]string{"TimeZone": "Asia/Kolkata"}})
	p.both(t, keysSetup)
	opts := smallChunks(100)
	opts.BisectRows = 4

	t.Run("identical tables are equal", func(t *testing.T) {
		rep := p.verify(t, opts)
		if rep.Verdict != consistency.Equal {
			t.Fatalf("verdict %s: %+v %v", rep.Verdict, diffs(rep), tableErrors(rep))
		}
		if rep.Totals.Tables != 6 || rep.Totals.RowsBlue != 1680+1500+1205+1401+1200+1200 {
			t.Errorf("tables %d rows %d", rep.Totals.Tables, rep.Totals.RowsBlue)
		}
	})

	cases := []struct {
		name, table, sql string
		kind             consistency.DiffKind
		key              string
	}{
		{"a changed row under a composite key", "composite", "UPDATE composite SET v = v + 1 WHERE a = 0 AND b = 'é30'", consistency.Changed, "0,é30"},
		{"a missing row with the lowest composite key", "composite", "DELETE FROM composite WHERE a = -3 AND b = 'X1'", consistency.MissingOnGreen, "-3,X1"},
		{"an extra row above every composite key", "composite", "INSERT INTO composite VALUES (4, 'a', 1)", consistency.ExtraOnGreen, "4,a"},
		{"a changed row under a uuid key", "uuids", "UPDATE uuids SET v = 0 WHERE v = 750", consistency.Changed, ""},
		{"an extra row under a uuid key", "uuids", "INSERT INTO uuids VALUES ('00000000-0000-0000-0000-000000000000', 1)", consistency.ExtraOnGreen, "00000000-0000-0000-0000-000000000000"},
		{"a missing row at the lowest bigint", "gaps", "DELETE FROM gaps WHERE id = -9223372036854775808", consistency.MissingOnGreen, "-9223372036854775808"},
		{"a changed row at zero", "gaps", "UPDATE gaps SET v = 'zero' WHERE id = 0", consistency.Changed, "0"},
		{"an extra row in a big gap", "gaps", "INSERT INTO gaps VALUES (5000000000, 'gap')", consistency.ExtraOnGreen, "5000000000"},
		{"a changed row at the highest bigint", "gaps", "UPDATE gaps SET v = 'MAX' WHERE id = 9223372036854775807", consistency.Changed, "9223372036854775807"},
		{"a changed row under a negative numeric key", "numbers", "UPDATE numbers SET v = 0 WHERE n = -50", consistency.Changed, "-50.00000"},
		{"a missing row under a timestamptz key", "stamps", "DELETE FROM stamps WHERE v = 600", consistency.MissingOnGreen, ""},
		{"a changed row under a text key with symbols", "texts", "UPDATE texts SET v = 0 WHERE v = 33", consistency.Changed, ""},
	}
	for _, c := range cases {
		t.Run(c.name+" is found", func(t *testing.T) {
			exec(t, p.green, "CREATE TABLE saved AS SELECT * FROM "+c.table+"; "+c.sql)
			t.Cleanup(func() {
				exec(t, p.green, "TRUNCATE "+c.table+"; INSERT INTO "+c.table+" SELECT * FROM saved; DROP TABLE saved")
			})
			rep := p.verify(t, opts, c.table)
			ds := diffs(rep)
			if len(ds) != 1 || ds[0].Kind != c.kind {
				t.Fatalf("differences %+v, errors %v; want one %s", ds, tableErrors(rep), c.kind)
			}
			if c.key != "" {
				var got []string
				for _, k := range ds[0].Key {
					got = append(got, k.Value)
				}
				if strings.Join(got, ",") != c.key {
					t.Errorf("key %v, want %s", got, c.key)
				}
			}
		})
	}

	t.Run("a table without a primary key is compared with the others, not refused", func(t *testing.T) {
		p.both(t, "CREATE TABLE heap (a int, b text); INSERT INTO heap VALUES (1, 'x'), (1, 'x'), (NULL, NULL)")
		t.Cleanup(func() { p.both(t, "DROP TABLE heap") })
		v := consistency.NewVerifier(p.blueDB, p.greenDB, opts)
		rep, err := v.Full(context.Background(), nil)
		if err != nil {
			t.Fatal(err)
		}
		if rep.Verdict != consistency.Equal {
			t.Fatalf("verdict %v, errors %v", rep.Verdict, tableErrors(rep))
		}
	})

	t.Run("a table name that does not exist on blue is refused", func(t *testing.T) {
		v := consistency.NewVerifier(p.blueDB, p.greenDB, opts)
		_, err := v.Full(context.Background(), []string{"gaps", "nosuch"})
		if !errors.Is(err, consistency.ErrUnverifiable) || !strings.Contains(err.Error(), "nosuch") || strings.Contains(err.Error(), "gaps") {
			t.Fatalf("err = %v, want one naming nosuch only", err)
		}
	})

	t.Run("a table missing on green is a difference", func(t *testing.T) {
		exec(t, p.blue, "CREATE TABLE only_blue (id int PRIMARY KEY)")
		t.Cleanup(func() { exec(t, p.blue, "DROP TABLE only_blue") })
		rep := p.verify(t, opts, "only_blue", "gaps")
		if rep.Verdict != consistency.Different || len(rep.Tables) != 2 || rep.Tables[0].Schema[0] != "table missing on green" {
			t.Fatalf("verdict %s, tables %+v", rep.Verdict, rep.Tables[0])
		}
	})

	t.Run("schema differences are reported, not compared", func(t *testing.T) {
		exec(t, p.green, "ALTER TABLE gaps ALTER v TYPE varchar(40); ALTER TABLE gaps ADD extra int")
		t.Cleanup(func() { exec(t, p.green, "ALTER TABLE gaps DROP extra; ALTER TABLE gaps ALTER v TYPE text") })
		rep := p.verify(t, opts, "gaps")
		if rep.Verdict != consistency.Different || len(rep.Tables) != 1 || len(rep.Tables[0].Schema) != 2 {
			t.Fatalf("verdict %s, tables %+v", rep.Verdict, rep.Tables)
		}
	})
}
