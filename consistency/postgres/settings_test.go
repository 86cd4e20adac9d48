package postgres

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/cutover/cutover/consistency"
	"github.com/cutover/cutover/integration"
)

// wordsSetup makes a table with a text key whose values order differently
// under a linguistic collation than in byte order (case, accents,
// symbols), so that chunk boundaries taken in one server's collation
// would cut the other's rows differently.
func wordsSetup(collation string) string {
	return fmt.Sprintf(`
CREATE TABLE words (w text %s PRIMARY KEY, n int);
`, collation)
}

const wordsLoad = `
INSERT INTO words
SELECT v || '-' || g, g FROM generate_series(1, 300) g,
	unnest(ARRAY['apple', 'Apple', 'banana', 'Banana', 'éclair', 'Eclair', 'zebra', 'Zebra', '_under', '1st', 'ß', 'ss', 'Ärger', 'arg', '東京', '✓mark']) v;
`

func TestNoFalsePositiveBetweenDifferentlyConfiguredServers(t *testing.T) {
	green := integration.PostgresOptions{
		Locale: "C.UTF-8",
		Settings: map[string]string{
			"TimeZone":           "Pacific/Chatham",
			"DateStyle":          "SQL, DMY",
			"IntervalStyle":      "sql_standard",
			"extra_float_digits": "-3",
			"bytea_output":       "escape",
		},
	}
	p := newPair(t, integration.PostgresOptions{}, green)
	p.both(t, zooSetup)
	// Green orders its text key by a linguistic (ICU) collation, blue by
	// bytes.
	exec(t, p.blue, wordsSetup(""))
	exec(t, p.green, wordsSetup(`COLLATE "und-x-icu"`))
	exec(t, p.blue, wordsLoad)
	// The same rows on both: green gets blue's rows by binary COPY, as an
	// initial copy would.
	exec(t, p.green, "TRUNCATE zoo")
	p.copyTable(t, "zoo")
	p.copyTable(t, "words")

	t.Run("the servers really print values differently", func(t *testing.T) {
		ctx := context.Background()
		var b, g string
		q := `SELECT string_agg(concat_ws('|', f8, tstz, d, iv, by), ';' ORDER BY id) FROM zoo WHERE id IN (2, 8, 3000)`
		for _, x := range []struct {
			pg  *integration.Postgres
			out *string
		}{{p.blue, &b}, {p.green, &g}} {
			conn := connect(t, x.pg.DSN())
			if err := conn.QueryRow(ctx, q).Scan(x.out); err != nil {
				t.Fatal(err)
			}
		}
		if b == g {
			t.Fatalf("both servers print %q: the test would prove nothing", b)
		}
		var order string
		conn := connect(t, p.green.DSN())
		if err := conn.QueryRow(ctx, `SELECT string_agg(w, ',' ORDER BY w) FROM (SELECT w FROM words WHERE n = 1) s`).Scan(&order); err != nil {
			t.Fatal(err)
		}
		if strings.HasPrefix(order, "1st-1,Apple-1") {
			t.Fatalf("green orders its keys in byte order (%s): the collation test would prove nothing", order)
		}
	})

	for _, o := range []struct {
		name string
		opts consistency.Options
	}{
		{"small chunks", smallChunks(97)},
		{"adaptive chunks", consistency.Options{InitialChunkRows: 200, MinChunkRows: 100}},
	} {
		t.Run("identical rows are equal with "+o.name, func(t *testing.T) {
			rep := p.verify(t, o.opts, "zoo", "words")
			if rep.Verdict != consistency.Equal {
				t.Fatalf("verdict %s: %+v %v", rep.Verdict, diffs(rep), tableErrors(rep))
			}
			if rep.Totals.RowsBlue != 3000+4800 || rep.Totals.RowsGreen != rep.Totals.RowsBlue {
				t.Errorf("rows %d/%d", rep.Totals.RowsBlue, rep.Totals.RowsGreen)
			}
			for _, tab := range rep.Tables {
				if tab.Name == "public.words" && len(tab.Warnings) != 0 {
					t.Errorf("blue's words table uses byte order; warnings %v", tab.Warnings)
				}
			}
		})
	}

	t.Run("a changed row is still found across the settings", func(t *testing.T) {
		exec(t, p.green, "UPDATE words SET n = n + 1 WHERE w = 'Zebra-150'")
		t.Cleanup(func() { exec(t, p.green, "UPDATE words SET n = n - 1 WHERE w = 'Zebra-150'") })
		rep := p.verify(t, smallChunks(97), "words")
		ds := diffs(rep)
		if len(ds) != 1 || ds[0].Kind != consistency.Changed || ds[0].Key[0].Value != "Zebra-150" {
			t.Fatalf("differences %+v, errors %v", ds, tableErrors(rep))
		}
	})

	t.Run("a text key in a linguistic collation gets a warning on that side", func(t *testing.T) {
		tables, err := p.greenDB.Describe(context.Background(), []string{"words"})
		if err != nil {
			t.Fatal(err)
		}
		if len(tables) != 1 || len(tables[0].Warnings) != 1 || !strings.Contains(tables[0].Warnings[0], "und-x-icu") {
			t.Fatalf("tables %+v", tables)
		}
	})
}

func TestSidesThatCannotBeComparedAreRefused(t *testing.T) {
	p := newPair(t, integration.PostgresOptions{}, integration.PostgresOptions{Encoding: "LATIN1", Locale: "C"})
	v := consistency.NewVerifier(p.blueDB, p.greenDB, consistency.Options{})
	_, err := v.Full(context.Background(), nil)
	if !errors.Is(err, consistency.ErrIncompatible) || !errors.Is(err, consistency.ErrUnverifiable) || !strings.Contains(err.Error(), "LATIN1") {
		t.Fatalf("err = %v, want ErrIncompatible naming the encodings", err)
	}
}
