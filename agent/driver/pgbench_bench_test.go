package driver

import (
	"context"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/integration/load"
	"github.com/cutover/cutover/internal/config"
)

// pgbenchLoad runs pgbench against blue as the fenced role app.
type pgbenchLoad struct {
	bin, dir string
	scale    int
}

func newPgbenchLoad(b *testing.B) *pgbenchLoad {
	b.Helper()
	bin, err := integration.PostgresTool("pgbench")
	if err != nil {
		b.Fatal(err)
	}
	scale := 1
	if v, err := strconv.Atoi(os.Getenv("CUTOVER_BENCH_SCALE")); err == nil && v > 0 {
		scale = v
	}
	return &pgbenchLoad{bin: bin, dir: b.TempDir(), scale: scale}
}

func (p *pgbenchLoad) server(pg *integration.Postgres, db, user, password string) load.PgbenchServer {
	return load.PgbenchServer{Bin: p.bin, Host: pg.Host, Port: pg.Port, DB: db, User: user, Password: password, Dir: p.dir}
}

// setup initializes pgbench's tables in db, filled on blue, empty on green
// (the initial copy fills them), and adds them to the plan's scope.
func (p *pgbenchLoad) setup(b *testing.B, db string, blue, green *integration.Postgres, spec *config.Plan) {
	b.Helper()
	for _, side := range []*integration.Postgres{blue, green} {
		if err := load.PgbenchInit(p.server(side, db, "postgres", ""), p.scale, side == blue); err != nil {
			b.Fatal(err)
		}
		if err := execIn(context.Background(), side.DSNFor(db, "postgres", ""), load.PgbenchGrants); err != nil {
			b.Fatal(err)
		}
	}
	spec.Pairs[0].Scope.Tables = append(spec.Pairs[0].Scope.Tables, load.PgbenchTables...)
}

// pgbenchRun is one iteration's pgbench processes.
type pgbenchRun struct {
	procs []*load.Pgbench
}

// start runs TPC-B (and the 1-second mix) against blue as app; -T is only
// a bound: the fence fails every client, and pgbench ends when all have.
func (p *pgbenchLoad) start(b *testing.B, db string, blue *integration.Postgres, wl windowLoad) *pgbenchRun {
	b.Helper()
	run := &pgbenchRun{}
	s := p.server(blue, db, "app", "app-password")
	for _, k := range []struct {
		kind    string
		clients int
	}{{"tpcb", wl.tpcb}, {"long", wl.long}} {
		if k.clients == 0 {
			continue
		}
		pb, err := load.StartPgbench(s, k.kind, k.clients, 600)
		if err != nil {
			b.Fatal(err)
		}
		run.procs = append(run.procs, pb)
	}
	return run
}

type pgbenchResult struct {
	committed     int // transactions pgbench logged as committed
	fenced, other int // clients aborted by a permission error, by anything else
}

// finish waits for pgbench to end (every client failed on the fence), counts
// committed and failed transactions, and proves that no committed one is
// missing on green: each inserted one pgbench_history row, and green holds
// exactly blue's rows.
func (r *pgbenchRun) finish(b *testing.B, db string, blue, green *integration.Postgres) pgbenchResult {
	b.Helper()
	var res pgbenchResult
	committed := map[string]int{}
	for _, pb := range r.procs {
		got, err := pb.Wait(30 * time.Second)
		if err != nil {
			b.Fatalf("pgbench %s: %v (30 s after the flip: a client was never fenced?)\n%s", pb.Kind, err, got.Output)
		}
		for _, line := range got.OtherErrors {
			b.Logf("pgbench %s: %s", pb.Kind, line)
		}
		committed[pb.Kind] = got.Committed
		res.committed += got.Committed
		res.fenced += got.Fenced
		res.other += got.Other
	}
	if committed["tpcb"] == 0 {
		b.Fatalf("pgbench committed nothing before the fence")
	}
	ctx := context.Background()
	bt, bl, bs, err := load.PgbenchHistory(ctx, blue.DSNFor(db, "postgres", ""))
	if err != nil {
		b.Fatal(err)
	}
	gt, gl, gs, err := load.PgbenchHistory(ctx, green.DSNFor(db, "postgres", ""))
	if err != nil {
		b.Fatal(err)
	}
	if gt < committed["tpcb"] || gl < committed["long"] {
		b.Fatalf("plan %s: acknowledged writes lost: pgbench committed %d TPC-B and %d long transactions, green holds %d and %d", db, committed["tpcb"], committed["long"], gt, gl)
	}
	if bt != gt || bl != gl || bs != gs {
		b.Fatalf("plan %s: pgbench_history differs: blue %d/%d rows (sum %d), green %d/%d (sum %d)", db, bt, bl, bs, gt, gl, gs)
	}
	return res
}
