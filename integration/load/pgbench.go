package load

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// PgbenchTables are pgbench's tables, schema-qualified, for a scope.
var PgbenchTables = []string{"public.pgbench_accounts", "public.pgbench_branches", "public.pgbench_tellers", "public.pgbench_history"}

// PgbenchGrants lets the application role app run pgbench's scripts.
// pgbench_history has no key: REPLICA IDENTITY FULL, as an operator would
// set for a key-less table in scope.
const PgbenchGrants = `
ALTER TABLE pgbench_history REPLICA IDENTITY FULL;
GRANT SELECT, INSERT, UPDATE ON pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history TO app;`

// LongScript is a pgbench script whose write transactions last a second:
// its UPDATE holds the table's lock while it sleeps, so a drain has to wait
// for it (or end it). Its history rows carry filler 'long'.
const LongScript = `\set aid random(1, 100000)
\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT pg_sleep(1);
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime, filler) VALUES (0, 0, :aid, :delta, CURRENT_TIMESTAMP, 'long');
END;
`

// IdleApplication is the application_name of IdleInTransaction's sessions.
const IdleApplication = "bench-idle-in-transaction"

// PgbenchServer says where pgbench connects.
type PgbenchServer struct {
	Bin      string // the pgbench binary (integration.PostgresTool)
	Host     string
	Port     int
	DB       string
	User     string
	Password string
	Dir      string // for scripts and per-transaction logs
}

func (s PgbenchServer) args(args ...string) []string {
	return append(append([]string{"-h", s.Host, "-p", strconv.Itoa(s.Port), "-U", s.User}, args...), s.DB)
}

func (s PgbenchServer) env(app string) []string {
	env := append(os.Environ(), "PGAPPNAME="+app)
	if s.Password != "" {
		env = append(env, "PGPASSWORD="+s.Password)
	}
	return env
}

// PgbenchInit initializes pgbench's tables: filled (pgbench -i's data) or
// empty, for a side that a copy fills.
func PgbenchInit(s PgbenchServer, scale int, fill bool) error {
	steps := "dtp"
	if fill {
		steps = "dtgvp"
	}
	cmd := exec.Command(s.Bin, s.args("-i", "-q", "-s", strconv.Itoa(scale), "-I", steps)...)
	cmd.Env = s.env("pgbench-init")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("pgbench -i: %v\n%s", err, out)
	}
	return nil
}

// Pgbench is a running pgbench.
type Pgbench struct {
	Kind   string
	prefix string
	cmd    *exec.Cmd
	out    bytes.Buffer
	done   chan error
}

// StartPgbench runs pgbench without vacuum (-n), one thread per client,
// with the per-transaction log, for at most seconds: the kind "tpcb" runs
// the built-in TPC-B script, "long" LongScript. Its sessions are named
// bench-<kind>. A client ends at its first error (pgbench retries only
// serialization failures and deadlocks, and only with --max-tries): so
// every failed transaction is an aborted client, and a fence ends pgbench.
func StartPgbench(s PgbenchServer, kind string, clients, seconds int) (*Pgbench, error) {
	var script []string
	switch kind {
	case "tpcb":
		script = []string{"-b", "tpcb-like"}
	case "long":
		path := filepath.Join(s.Dir, "long.sql")
		if err := os.WriteFile(path, []byte(LongScript), 0o644); err != nil {
			return nil, err
		}
		script = []string{"-f", path}
	default:
		return nil, fmt.Errorf("pgbench kind %q: want tpcb or long", kind)
	}
	p := &Pgbench{Kind: kind, prefix: filepath.Join(s.Dir, fmt.Sprintf("%s-%s-%d", s.DB, kind, time.Now().UnixNano())), done: make(chan error, 1)}
	args := append([]string{"-n", "-c", strconv.Itoa(clients), "-j", strconv.Itoa(clients), "-T", strconv.Itoa(seconds), "-l", "--log-prefix", p.prefix}, script...)
	p.cmd = exec.Command(s.Bin, s.args(args...)...)
	p.cmd.Env = s.env("bench-" + kind)
	p.cmd.Stdout, p.cmd.Stderr = &p.out, &p.out
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { p.done <- p.cmd.Wait() }()
	return p, nil
}

// PgbenchResult counts a pgbench run's transactions.
type PgbenchResult struct {
	// Committed: transactions the per-transaction log shows completed.
	Committed int
	// Fenced: clients ended by a permission error (the fence at work);
	// Other: by anything else (a terminated session, a conflict).
	Fenced, Other int
	// OtherErrors are those other errors' lines.
	OtherErrors []string
	Output      string
}

var abortedRe = regexp.MustCompile(`client \d+ .*aborted`)

// ErrPgbenchRunning: pgbench did not end within Wait's timeout.
var ErrPgbenchRunning = errors.New("pgbench still running")

// Wait waits for pgbench to end (killing it after timeout, with
// ErrPgbenchRunning) and counts its transactions.
func (p *Pgbench) Wait(timeout time.Duration) (PgbenchResult, error) {
	var killed error
	select {
	case <-p.done: // exit status 2 when clients aborted, as they do on a fence
	case <-time.After(timeout):
		p.cmd.Process.Kill()
		<-p.done
		killed = ErrPgbenchRunning
	}
	res := PgbenchResult{Output: p.out.String()}
	for _, line := range strings.Split(res.Output, "\n") {
		if !abortedRe.MatchString(line) {
			continue
		}
		if strings.Contains(line, "permission denied") {
			res.Fenced++
		} else {
			res.Other++
			res.OtherErrors = append(res.OtherErrors, line)
		}
	}
	n, err := countCommitted(p.prefix)
	res.Committed = n
	if killed != nil {
		return res, killed
	}
	return res, err
}

// countCommitted counts the transactions in pgbench's per-transaction logs
// (prefix.PID[.thread]) that completed: the third field is the latency in
// microseconds ("failed" or "skipped" otherwise).
func countCommitted(prefix string) (int, error) {
	files, err := filepath.Glob(prefix + ".*")
	if err != nil {
		return 0, err
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

// PgbenchHistory counts pgbench_history's rows on dsn: those of TPC-B
// transactions, those of LongScript's, and the sum of every delta. Every
// committed transaction of either inserted exactly one row.
func PgbenchHistory(ctx context.Context, dsn string) (tpcb, long int, sum int64, err error) {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return 0, 0, 0, err
	}
	defer conn.Close(ctx)
	err = conn.QueryRow(ctx, `SELECT count(*) FILTER (WHERE filler IS NULL), count(*) FILTER (WHERE trim(filler) = 'long'), coalesce(sum(delta), 0) FROM pgbench_history`).Scan(&tpcb, &long, &sum)
	return tpcb, long, sum, err
}

// IdleInTransaction opens n sessions on dsn (as IdleApplication) that
// insert a pgbench_history row in a transaction and then say nothing
// more: idle in transaction, holding their table lock until closed.
func IdleInTransaction(ctx context.Context, dsn string, n int) ([]*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, err
	}
	cfg.RuntimeParams["application_name"] = IdleApplication
	var conns []*pgx.Conn
	for i := 0; i < n; i++ {
		conn, err := pgx.ConnectConfig(ctx, cfg)
		if err == nil {
			if _, err = conn.Exec(ctx, `BEGIN; INSERT INTO pgbench_history (tid, bid, aid, delta, mtime, filler) VALUES (0, 0, 0, 0, now(), 'idle')`); err != nil {
				conn.Close(ctx)
			}
		}
		if err != nil {
			for _, c := range conns {
				c.Close(ctx)
			}
			return nil, err
		}
		conns = append(conns, conn)
	}
	return conns, nil
}
