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
