package load

import (
	"context"
	"testing"
	"time"

	"github.com/cutover/cutover/integration"
)

func TestLoadReceiptsMatchTheDatabaseAndMissingFindsALostWrite(t *testing.T) {
	ctx := context.Background()
	pg := integration.NewPostgres(t, integration.PostgresOptions{})
	if err := Setup(ctx, pg.DSN(), 100); err != nil {
		t.Fatal(err)
	}
	l := Start(ctx, Options{Run: "t", Target: pg.DSN, Writers: 4, Accounts: 100, LongEvery: 10, Long: 5 * time.Millisecond})
	p := StartProber(ctx, pg.DSN(), pg.DSN(), 20*time.Millisecond)
	time.Sleep(300 * time.Millisecond)
	receipts, errs := l.Stop()
	samples := p.Stop()
	if len(receipts) < 10 {
		t.Fatalf("only %d writes acknowledged (errors %v)", len(receipts), errs)
	}
	missing, err := Missing(ctx, pg.DSN(), "t", receipts)
	if err != nil || len(missing) != 0 {
		t.Fatalf("missing = %v, %v", missing, err)
	}
	lost := receipts[len(receipts)/2]
	if err := pg.Exec(ctx, "DELETE FROM load_history WHERE run = 't' AND writer = $1 AND seq = $2", lost.Writer, lost.Seq); err != nil {
		t.Fatal(err)
	}
	missing, err = Missing(ctx, pg.DSN(), "t", receipts)
	if err != nil || len(missing) != 1 || missing[0] != lost {
		t.Errorf("after deleting one row: missing = %v, %v; want [%v]", missing, err, lost)
	}
	// The same database on both sides is writable on both: the prober must
	// say so, or it could never catch a violation.
	if len(samples) == 0 || len(BothWritable(samples)) == 0 {
		t.Errorf("prober saw no double-writable moment in %d samples", len(samples))
	}
}

func TestPercentileMSIsTheNearestRankRoundedUp(t *testing.T) {
	var ds []time.Duration
	for i := 100; i >= 1; i-- {
		ds = append(ds, time.Duration(i)*time.Millisecond)
	}
	if got := PercentileMS(ds, 0.50); got != 51 {
		t.Errorf("p50 of 1..100 ms = %v", got)
	}
	if got := PercentileMS(ds, 0.99); got != 100 {
		t.Errorf("p99 of 1..100 ms = %v, want the worst", got)
	}
	if got := PercentileMS(ds[:10], 0.90); got != 100 {
		t.Errorf("p90 of 10 samples = %v, want the worst", got)
	}
	if PercentileMS(nil, 0.5) != 0 || ds[0] != 100*time.Millisecond {
		t.Error("empty input, or the input was reordered")
	}
}
