package driver

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/internal/config"
)

// idleApplication names the sessions left idle in a write transaction
// across the fence: the only ones the drain may terminate.
const idleApplication = "bench-idle-in-transaction"

// longScript is a write transaction that lasts a second: its UPDATE holds
// the table's lock while it sleeps, so the drain has to wait for it.
const longScript = `\set aid random(1, 100000)
\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT pg_sleep(1);
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime, filler) VALUES (0, 0, :aid, :delta, CURRENT_TIMESTAMP, 'long');
END;
`

const pgbenchGrants = `
ALTER TABLE pgbench_history REPLICA IDENTITY FULL;
GRANT SELECT, INSERT, UPDATE ON pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history TO app;`

// pgbenchLoad runs pgbench against blue as the fenced role app.
type pgbenchLoad struct {
	bin, dir, long string
	scale          int
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
	p := &pgbenchLoad{bin: bin, dir: b.TempDir(), scale: scale}
	p.long = filepath.Join(p.dir, "long.sql")
	if err := os.WriteFile(p.long, []byte(longScript), 0o644); err != nil {
		b.Fatal(err)
	}
	return p
}

func (p *pgbenchLoad) args(pg *integration.Postgres, db, user string, args ...string) []string {
	return append(append([]string{"-h", pg.Host, "-p", strconv.Itoa(pg.Port), "-U", user}, args...), db)
}

// setup initializes pgbench's tables in db, filled on blue, empty on green
// (the initial copy fills them), and adds them to the plan's scope.
// pgbench_history has no key: REPLICA IDENTITY FULL, as an operator would.
func (p *pgbenchLoad) setup(b *testing.B, db string, blue, green *integration.Postgres, spec *config.Plan) {
	b.Helper()
	for _, side := range []struct {
		pg    *integration.Postgres
		steps string
	}{{blue, "dtgvp"}, {green, "dtp"}} {
		cmd := exec.Command(p.bin, p.args(side.pg, db, "postgres", "-i", "-q", "-s", strconv.Itoa(p.scale), "-I", side.steps)...)
		if out, err := cmd.CombinedOutput(); err != nil {
			b.Fatalf("pgbench -i: %v\n%s", err, out)
		}
		if err := execIn(context.Background(), side.pg.DSNFor(db, "postgres", ""), pgbenchGrants); err != nil {
			b.Fatal(err)
		}
	}
	spec.Pairs[0].Scope.Tables = append(spec.Pairs[0].Scope.Tables,
		"public.pgbench_accounts", "public.pgbench_branches", "public.pgbench_tellers", "public.pgbench_history")
}

// pgbenchRun is one iteration's pgbench processes.
type pgbenchRun struct {
	procs []*pgbenchProc
}

type pgbenchProc struct {
	kind   string // "tpcb" or "long"
	prefix string
	cmd    *exec.Cmd
	out    bytes.Buffer
	done   chan error
}

// start runs TPC-B (and the 1-second mix) against blue as app, with the
// per-transaction log; -T is only a bound: the fence fails every client,
// and pgbench ends when all have.
func (p *pgbenchLoad) start(b *testing.B, db string, blue *integration.Postgres, wl windowLoad) *pgbenchRun {
	b.Helper()
	run := &pgbenchRun{}
	add := func(kind string, clients int, script ...string) {
		pr := &pgbenchProc{kind: kind, prefix: filepath.Join(p.dir, db+"-"+kind), done: make(chan error, 1)}
		args := append([]string{"-n", "-c", strconv.Itoa(clients), "-j", strconv.Itoa(clients), "-T", "600", "-l", "--log-prefix", pr.prefix}, script...)
		pr.cmd = exec.Command(p.bin, p.args(blue, db, "app", args...)...)
		pr.cmd.Env = append(os.Environ(), "PGPASSWORD=app-password", "PGAPPNAME=bench-"+kind)
		pr.cmd.Stdout, pr.cmd.Stderr = &pr.out, &pr.out
		if err := pr.cmd.Start(); err != nil {
			b.Fatal(err)
		}
		go func() { pr.done <- pr.cmd.Wait() }()
		run.procs = append(run.procs, pr)
	}
	add("tpcb", wl.tpcb, "-b", "tpcb-like")
	if wl.long > 0 {
		add("long", wl.long, "-f", p.long)
	}
	return run
}

type pgbenchResult struct {
	committed     int // transactions pgbench logged as committed
	fenced, other int // clients aborted by a permission error, by anything else
}

var abortedRe = regexp.MustCompile(`client \d+ .*aborted`)

// finish waits for pgbench to end (every client failed on the fence), counts
// committed and failed transactions, and proves that no committed one is
// missing on green: each inserted one pgbench_history row, and green holds
// exactly blue's rows.
func (r *pgbenchRun) finish(b *testing.B, db string, blue, green *integration.Postgres) pgbenchResult {
	b.Helper()
	var res pgbenchResult
	committed := map[string]int{}
	for _, pr := range r.procs {
		select {
		case <-pr.done: // exit status 2: clients aborted, as expected
		case <-time.After(30 * time.Second):
			pr.cmd.Process.Kill()
			<-pr.done
			b.Fatalf("pgbench %s still running 30 s after the flip: a client was never fenced\n%s", pr.kind, pr.out.String())
		}
		for _, line := range strings.Split(pr.out.String(), "\n") {
			if !abortedRe.MatchString(line) {
				continue
			}
			if strings.Contains(line, "permission denied") {
				res.fenced++
			} else {
				res.other++
				b.Logf("pgbench %s: %s", pr.kind, line)
			}
		}
		n, err := countCommitted(pr.prefix)
		if err != nil {
			b.Fatal(err)
		}
		committed[pr.kind] = n
		res.committed += n
	}
	if committed["tpcb"] == 0 {
		b.Fatalf("pgbench committed nothing before the fence:\n%s", r.procs[0].out.String())
	}
	count := func(pg *integration.Postgres) (tpcb, long int, sum int64) {
		conn, err := pgxConnect(pg.DSNFor(db, "postgres", ""))
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close(context.Background())
		err = conn.QueryRow(context.Background(), `SELECT count(*) FILTER (WHERE filler IS NULL), count(*) FILTER (WHERE trim(filler) = 'long'), coalesce(sum(delta), 0) FROM pgbench_history`).Scan(&tpcb, &long, &sum)
		if err != nil {
			b.Fatal(err)
		}
		return
	}
	bt, bl, bs := count(blue)
	gt, gl, gs := count(green)
	if gt < committed["tpcb"] || gl < committed["long"] {
		b.Fatalf("plan %s: acknowledged writes lost: pgbench committed %d TPC-B and %d long transactions, green holds %d and %d", db, committed["tpcb"], committed["long"], gt, gl)
	}
	if bt != gt || bl != gl || bs != gs {
		b.Fatalf("plan %s: pgbench_history differs: blue %d/%d rows (sum %d), green %d/%d (sum %d)", db, bt, bl, bs, gt, gl, gs)
	}
	return res
}

// countCommitted counts the transactions in pgbench's per-transaction logs
// (prefix.PID[.thread]) that completed: the third field is the latency in
// microseconds ("failed" or "skipped" otherwise).
func countCommitted(prefix string) (int, error) {
	files, err := filepath.Glob(prefix + ".*")
	if err != nil || len(files) == 0 {
		return 0, fmt.Errorf("pgbench logs %s.*: none (%v)", prefix, err)
	}
	n := 0
	for _, name := range files {
		f, err := os.Open(name)
		if err != nil {
			return 0, err
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 3 {
				continue
			}
			if _, err := strconv.ParseInt(fields[2], 10, 64); err == nil {
				n++
			}
		}
		f.Close()
		if err := sc.Err(); err != nil {
			return 0, err
		}
	}
	return n, nil
}

// idleInTransaction opens n sessions as app that write in a transaction
// and then say nothing more: idle in transaction, holding their lock.
func idleInTransaction(b *testing.B, dsn string, n int) []*pgx.Conn {
	b.Helper()
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		b.Fatal(err)
	}
	cfg.RuntimeParams["application_name"] = idleApplication
	var conns []*pgx.Conn
	for i := 0; i < n; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		conn, err := pgx.ConnectConfig(ctx, cfg)
		if err == nil {
			_, err = conn.Exec(ctx, `BEGIN; INSERT INTO pgbench_history (tid, bid, aid, delta, mtime, filler) VALUES (0, 0, 0, 0, now(), 'idle')`)
		}
		cancel()
		if err != nil {
			b.Fatal(err)
		}
		conns = append(conns, conn)
	}
	return conns
}
