package load

import (
	"context"
	"testing"
	"time"

	"github.com/cutover/cutover/integration"
)

// pgbench as the application: the per-transaction log and the history
// table agree, and a REVOKE (what the fence does) ends every client with a
// permission error, each counted once, and ends pgbench.
func TestPgbenchCountsCommittedAndFencedTransactions(t *testing.T) {
	ctx := context.Background()
	bin, err := integration.PostgresTool("pgbench")
	if err != nil {
		t.Fatal(err)
	}
	pg := integration.NewPostgres(t, integration.PostgresOptions{})
	admin := PgbenchServer{Bin: bin, Host: pg.Host, Port: pg.Port, DB: pg.Database, User: "postgres", Dir: t.TempDir()}
	if err := PgbenchInit(admin, 1, true); err != nil {
		t.Fatal(err)
	}
	if err := pg.Exec(ctx, `CREATE ROLE app LOGIN PASSWORD 'app-password'`); err != nil {
		t.Fatal(err)
	}
	if err := pg.Exec(ctx, PgbenchGrants); err != nil {
		t.Fatal(err)
	}
	app := admin
	app.User, app.Password = "app", "app-password"
	tpcb, err := StartPgbench(app, "tpcb", 4, 60)
	if err != nil {
		t.Fatal(err)
	}
	long, err := StartPgbench(app, "long", 2, 60)
	if err != nil {
		t.Fatal(err)
	}
	idle, err := IdleInTransaction(ctx, pg.DSNFor(pg.Database, "app", "app-password"), 1)
	if err != nil {
		t.Fatal(err)
	}
	// Until both scripts have committed some (connecting is slow on a
	// busy machine).
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		nt, nl, _, err := PgbenchHistory(ctx, pg.DSN())
		if err != nil {
			t.Fatal(err)
		}
		if nt >= 20 && nl >= 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pgbench committed %d TPC-B and %d long transactions in 30 s", nt, nl)
		}
	}
	if err := pg.Exec(ctx, `REVOKE INSERT, UPDATE ON pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history FROM app`); err != nil {
		t.Fatal(err)
	}
	res, err := tpcb.Wait(20 * time.Second)
	if err != nil {
		t.Fatalf("%v\n%s", err, res.Output)
	}
	lres, err := long.Wait(20 * time.Second)
	if err != nil {
		t.Fatalf("%v\n%s", err, lres.Output)
	}
	idle[0].Close(ctx) // its row never commits
	if res.Fenced != 4 || res.Other != 0 || lres.Fenced != 2 || lres.Other != 0 {
		t.Errorf("failed: tpcb %d fenced %d other, long %d fenced %d other; want 4 0 2 0\n%s\n%s", res.Fenced, res.Other, lres.Fenced, lres.Other, res.Output, lres.Output)
	}
	if res.Committed < 10 || lres.Committed < 2 {
		t.Errorf("committed %d TPC-B, %d long\n%s", res.Committed, lres.Committed, res.Output)
	}
	nt, nl, _, err := PgbenchHistory(ctx, pg.DSN())
	if err != nil || nt != res.Committed || nl != lres.Committed {
		t.Errorf("history holds %d TPC-B and %d long rows (%v); pgbench logged %d and %d", nt, nl, err, res.Committed, lres.Committed)
	}
}
