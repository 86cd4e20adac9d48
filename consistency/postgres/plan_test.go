package postgres

import (
	"context"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/cutover/cutover/consistency"
	"github.com/cutover/cutover/integration"
)

// A chunk holding most of a table must not be hashed by a seq scan of the
// whole table: a pass of several such chunks would read the table once per
// chunk. The planner picks that seq scan from about 40% of the rows up.
func TestLargeChunksAreHashedWithoutScanningTheWholeTable(t *testing.T) {
	p := newPair(t, integration.PostgresOptions{}, integration.PostgresOptions{})
	exec(t, p.blue, `CREATE TABLE big (id bigint PRIMARY KEY, v text);
		INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 100000) g`)
	exec(t, p.blue, `VACUUM ANALYZE big`)
	ctx := context.Background()
	tables, err := p.blueDB.Describe(ctx, []string{"big"})
	if err != nil || len(tables) != 1 {
		t.Fatalf("describe: %v %v", tables, err)
	}
	tb := tables[0]
	for _, s := range []consistency.Span{
		{Lo: []string{"10001"}, Hi: []string{"90001"}}, // 80% of the rows
		{Lo: []string{"5001"}},                         // the last chunk, open above
	} {
		sql, args := p.blueDB.checksumSQL(tb, s)
		rows, err := p.blueDB.hashPool.Query(ctx, "EXPLAIN "+sql, args...)
		if err != nil {
			t.Fatal(err)
		}
		lines, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			t.Fatal(err)
		}
		plan := strings.Join(lines, "\n")
		if strings.Contains(plan, "Seq Scan") || !strings.Contains(plan, "Bitmap Index Scan") {
			t.Errorf("span %s hashed with\n%s", s, plan)
		}
	}
	// And the digests are right: the two chunks above are compared.
	exec(t, p.green, `CREATE TABLE big (id bigint PRIMARY KEY, v text)`)
	p.copyTable(t, "big")
	exec(t, p.green, `UPDATE big SET v = 'x' WHERE id = 50000`)
	rep := p.verify(t, consistency.Options{InitialChunkRows: 80000, MinChunkRows: 80000, MaxChunkRows: 80000}, "big")
	if ds := diffs(rep); rep.Verdict != consistency.Different || len(ds) != 1 || ds[0].Key[0].Value != "50000" {
		t.Fatalf("verdict %s, differences %+v, errors %v", rep.Verdict, ds, tableErrors(rep))
	}
}
