package integration

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// PgbenchOptions configure StartPgbench: the built-in TPC-B script.
type PgbenchOptions struct {
	// DSN is a connection URL without the password (pgbench's argv is
	// visible to every user of the machine); Password goes in PGPASSWORD.
	DSN      string
	Password string
	Clients  int
	Threads  int // default 2
	Seconds  int
	// LogDir receives pgbench's per-transaction logs (-l).
	LogDir string
}

// PgbenchRun is a pgbench run in progress.
type PgbenchRun struct {
	opts  PgbenchOptions
	cmd   *exec.Cmd
	out   lockedBuffer
	done  chan struct{}
	err   error
	began time.Time
}

// PgbenchResult is what a finished run reports.
type PgbenchResult struct {
	// Processed is pgbench's count of transactions actually processed
	// (committed).
	Processed int
	// Failed counts failed transactions; Aborted, clients that stopped on
	// an error. Errors are the first error lines pgbench printed.
	Failed, Aborted int
	Errors          []string
	// Logged counts the transactions in the per-transaction logs.
	Logged int
	// Stalls are each client's longest transaction (the longest wait a
	// client saw), sorted.
	Stalls []time.Duration
	// Latency is the median transaction latency.
	Latency time.Duration
	Output  string
}

// StallPercentile is the p-th percentile (0-100) of the clients' longest
// transactions.
func (r PgbenchResult) StallPercentile(p float64) time.Duration { return Percentile(r.Stalls, p) }

// Percentile is the p-th percentile (nearest rank, 0-100) of sorted.
func Percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted))*p/100+0.5) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// StartPgbench starts pgbench (the one beside the harness's postgres).
func StartPgbench(ctx context.Context, o PgbenchOptions) (*PgbenchRun, error) {
	bin, err := PostgresTool("pgbench")
	if err != nil {
		return nil, err
	}
	if o.Threads <= 0 {
		o.Threads = 2
	}
	if err := os.MkdirAll(o.LogDir, 0o700); err != nil {
		return nil, err
	}
	args := []string{"-n", "-c", strconv.Itoa(o.Clients), "-j", strconv.Itoa(min(o.Threads, o.Clients)), "-T", strconv.Itoa(o.Seconds),
		"-l", "--log-prefix", filepath.Join(o.LogDir, "pgbench_log"), o.DSN}
	r := &PgbenchRun{opts: o, done: make(chan struct{}), began: time.Now()}
	r.cmd = exec.CommandContext(ctx, bin, args...)
	r.cmd.Env = append(os.Environ(), "PGPASSWORD="+o.Password)
	r.cmd.Stdout, r.cmd.Stderr = &r.out, &r.out
	if err := r.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start pgbench: %w", err)
	}
	go func() { r.err = r.cmd.Wait(); close(r.done) }()
	return r, nil
}

// Done is closed when pgbench has exited.
func (r *PgbenchRun) Done() <-chan struct{} { return r.done }

// Kill ends pgbench at once.
func (r *PgbenchRun) Kill() {
	r.cmd.Process.Kill()
	<-r.done
}

var (
	pgbenchProcessedRE = regexp.MustCompile(`number of transactions actually processed: (\d+)`)
	pgbenchFailedRE    = regexp.MustCompile(`number of failed transactions: (\d+)`)
)

// Wait waits for pgbench to end and reads its summary and logs. A run
// with errors is not an error of Wait: see Failed, Aborted and Errors.
func (r *PgbenchRun) Wait(ctx context.Context) (PgbenchResult, error) {
	select {
	case <-r.done:
	case <-ctx.Done():
		r.Kill()
		return PgbenchResult{}, ctx.Err()
	}
	res := PgbenchResult{Output: r.out.String()}
	m := pgbenchProcessedRE.FindStringSubmatch(res.Output)
	if m == nil {
		return res, fmt.Errorf("pgbench printed no count of transactions (%v):\n%s", r.err, res.Output)
	}
	res.Processed, _ = strconv.Atoi(m[1])
	if m := pgbenchFailedRE.FindStringSubmatch(res.Output); m != nil {
		res.Failed, _ = strconv.Atoi(m[1])
	}
	for _, line := range strings.Split(res.Output, "\n") {
		if strings.Contains(line, "aborted in command") {
			res.Aborted++
		}
		if strings.Contains(line, "error") && len(res.Errors) < 5 {
			res.Errors = append(res.Errors, line)
		}
	}
	if err := r.readLogs(&res); err != nil {
		return res, err
	}
	return res, nil
}

// readLogs reads -l's lines: client_id transaction_no time(us) script_no
// epoch us.
func (r *PgbenchRun) readLogs(res *PgbenchResult) error {
	files, err := filepath.Glob(filepath.Join(r.opts.LogDir, "pgbench_log.*"))
	if err != nil {
		return err
	}
	longest := map[int]time.Duration{}
	var all []time.Duration
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		sc := bufio.NewScanner(bytes.NewReader(data))
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 3 {
				continue
			}
			client, err1 := strconv.Atoi(fields[0])
			us, err2 := strconv.ParseInt(fields[2], 10, 64)
			if err1 != nil || err2 != nil {
				continue // "failed" or "skipped" in place of a latency
			}
			d := time.Duration(us) * time.Microsecond
			res.Logged++
			all = append(all, d)
			longest[client] = max(longest[client], d)
		}
	}
	for _, d := range longest {
		res.Stalls = append(res.Stalls, d)
	}
	slices.Sort(res.Stalls)
	slices.Sort(all)
	res.Latency = Percentile(all, 50)
	return nil
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// PgbenchInit runs pgbench -i on dsn (as a superuser): scale s with data,
// or with s = 0 the tables and primary keys only (a green to copy into).
// pgbench_history, which has no key, gets REPLICA IDENTITY FULL.
func PgbenchInit(ctx context.Context, p *Postgres, scale int) error {
	bin, err := PostgresTool("pgbench")
	if err != nil {
		return err
	}
	args := []string{"-i", "-q", "-s", strconv.Itoa(max(scale, 1))}
	if scale == 0 {
		args = append(args, "-I", "dtp")
	}
	if out, err := exec.CommandContext(ctx, bin, append(args, p.DSN())...).CombinedOutput(); err != nil {
		return fmt.Errorf("pgbench -i: %v\n%s", err, out)
	}
	return p.Exec(ctx, `ALTER TABLE pgbench_history REPLICA IDENTITY FULL`)
}
