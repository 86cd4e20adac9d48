package integration

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/user"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// account is the OS user a server runs as. cred is nil when it is the
// caller itself.
type account struct {
	name     string
	uid, gid int
	cred     *syscall.Credential
}

// serverAccount returns the account to run a server as: the caller when it
// is not root; otherwise the system user name. With optional set, a missing
// user falls back to root instead of failing.
func serverAccount(name, pkg string, optional bool) (account, error) {
	if os.Geteuid() != 0 {
		return account{name: "self", uid: os.Geteuid(), gid: os.Getegid()}, nil
	}
	u, err := user.Lookup(name)
	if err != nil {
		if optional {
			return account{name: "root"}, nil
		}
		return account{}, fmt.Errorf("running as root needs the system user %q (created by the Debian package %s): %w", name, pkg, err)
	}
	uid, err1 := strconv.Atoi(u.Uid)
	gid, err2 := strconv.Atoi(u.Gid)
	if err1 != nil || err2 != nil {
		return account{}, fmt.Errorf("user %q: bad uid/gid %q/%q", name, u.Uid, u.Gid)
	}
	return account{
		name: name, uid: uid, gid: gid,
		// Groups: an empty list drops root's supplementary groups.
		cred: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}},
	}, nil
}

// chown gives path to the account; a no-op when running as the caller.
func (a account) chown(path string) error {
	if a.cred == nil {
		return nil
	}
	return os.Chown(path, a.uid, a.gid)
}

// makeInstanceDir creates the temporary directory of one server, owned by a.
func makeInstanceDir(engine string, a account) (string, error) {
	dir, err := os.MkdirTemp("", "cutover-it-"+engine+"-")
	if err != nil {
		return "", err
	}
	if err := a.chown(dir); err != nil {
		os.RemoveAll(dir)
		return "", err
	}
	return dir, nil
}

// serverEnv is the environment of every child: predictable and small, so
// that the caller's PGPORT, MYSQL_HOST and the like cannot leak in.
func serverEnv(home string) []string {
	env := []string{
		"PATH=" + os.Getenv("PATH") + ":/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME=" + home,
		"LC_ALL=C",
		"LANG=C",
	}
	if tz, ok := os.LookupEnv("TZ"); ok {
		env = append(env, "TZ="+tz)
	}
	return env
}

// procSpec describes a child process.
type procSpec struct {
	path  string
	args  []string
	dir   string // working directory; also HOME
	stdin io.Reader
	out   *os.File // stdout and stderr
	as    account
	// deathSig is sent to the child when the thread that started it dies
	// (see the package doc) and is the signal Stop starts with.
	deathSig syscall.Signal
}

// process is a started child in its own process group. It owns one
// goroutine, which ends when the child has exited and been reaped.
type process struct {
	cmd  *exec.Cmd
	pid  int
	done chan struct{} // closed once the child is reaped
	err  error         // exit status; valid after done
}

func startProcess(s procSpec) (*process, error) {
	cmd := exec.Command(s.path, s.args...)
	cmd.Dir = s.dir
	cmd.Env = serverEnv(s.dir)
	cmd.Stdin = s.stdin
	cmd.Stdout = s.out
	cmd.Stderr = s.out
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid: true,
		// Go sets the death signal after switching credentials, so the
		// change of user does not clear it.
		Pdeathsig:  s.deathSig,
		Credential: s.as.cred,
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &process{cmd: cmd, pid: cmd.Process.Pid, done: make(chan struct{})}
	go p.wait()
	return p, nil
}

// wait waits until the group leader has exited without reaping it, kills
// whatever is left of its process group (the leader's pid still names the
// group, so it cannot have been reused), then reaps the leader. Children
// that left the group (PostgreSQL's call setsid) are the server's to end.
func (p *process) wait() {
	defer close(p.done)
	for {
		var info unix.Siginfo
		err := unix.Waitid(unix.P_PID, p.pid, &info, unix.WEXITED|unix.WNOWAIT, nil)
		if err != unix.EINTR {
			break
		}
	}
	_ = syscall.Kill(-p.pid, syscall.SIGKILL)
	p.err = p.cmd.Wait()
}

// exited reports whether the child has been reaped.
func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends sig to the group leader and waits for the group to end. When
// ctx ends first, or after a grace period of 10 s, it kills the whole group
// with SIGKILL and waits for that. It returns once the child is reaped.
func (p *process) stop(ctx context.Context, sig syscall.Signal) {
	if p.exited() {
		return
	}
	if sig != syscall.SIGKILL {
		_ = syscall.Kill(p.pid, sig)
		grace := time.NewTimer(10 * time.Second)
		defer grace.Stop()
		select {
		case <-p.done:
			return
		case <-ctx.Done():
		case <-grace.C:
		}
	}
	_ = syscall.Kill(-p.pid, syscall.SIGKILL)
	<-p.done
}

// runToEnd runs a setup command (initdb and the like) to completion. On
// failure the error carries the tail of its output. Cancelling ctx kills it.
func runToEnd(ctx context.Context, s procSpec, logPath string) error {
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	s.out = f
	p, err := startProcess(s)
	if err != nil {
		return err
	}
	select {
	case <-p.done:
	case <-ctx.Done():
		p.stop(ctx, syscall.SIGKILL)
		return fmt.Errorf("%s: %w", s.path, ctx.Err())
	}
	if p.err != nil {
		return fmt.Errorf("%s: %w\n%s", s.path, p.err, logTail(logPath))
	}
	return nil
}

// freePort returns a port on 127.0.0.1 that was free a moment ago. Another
// process may take it before the server binds it; callers retry on
// "address in use".
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// logTail returns the last lines of a log file, for error messages.
func logTail(path string) string {
	const max = 4096
	f, err := os.Open(path)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	off := fi.Size() - max
	if off < 0 {
		off = 0
	}
	b, _ := io.ReadAll(io.NewSectionReader(f, off, max))
	if off > 0 {
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			b = b[i+1:]
		}
	}
	b = bytes.TrimRight(b, "\n")
	if len(b) == 0 {
		return "(log " + path + " is empty)"
	}
	return "log tail (" + path + "):\n" + string(b)
}

// addrInUse reports whether a server log says its port was taken.
func addrInUse(log string) bool {
	l := strings.ToLower(log)
	return strings.Contains(l, "address already in use") || strings.Contains(l, "errno: 98")
}

// errAddrInUse marks a start that lost the race for its port.
var errAddrInUse = errors.New("port taken by another process")

const (
	readyTimeout = 60 * time.Second // cap on waiting for a server to accept connections
	portAttempts = 4                // starts tried when the port is taken
)

// server is what the engines share: one child process, its directory and
// its log, and an idempotent Stop.
type server struct {
	dir     string
	logPath string
	stopSig syscall.Signal

	proc *process

	stopOnce sync.Once
	stopErr  error
}

// launch starts the server process, its output appended to s.logPath, and
// waits with ready until it accepts connections. ready is polled until it
// returns nil, the process exits, ctx ends or readyTimeout passes. A process
// that exits because its port was taken yields an error wrapping
// errAddrInUse, so the caller can retry with another port.
func (s *server) launch(ctx context.Context, spec procSpec, ready func(ctx context.Context) error) error {
	// Truncate: a retry must not see the previous attempt's "address in use".
	f, err := os.OpenFile(s.logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	spec.out = f
	p, err := startProcess(spec)
	f.Close() // the child has its own copy
	if err != nil {
		return fmt.Errorf("start %s: %w", spec.path, err)
	}
	s.proc = p
	s.stopSig = spec.deathSig

	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	delay := 5 * time.Millisecond
	var last error
	for {
		attempt, cancelAttempt := context.WithTimeout(ctx, 2*time.Second)
		last = ready(attempt)
		cancelAttempt()
		if last == nil {
			return nil
		}
		t := time.NewTimer(delay)
		select {
		case <-p.done:
			t.Stop()
			tail := logTail(s.logPath)
			if addrInUse(tail) {
				return fmt.Errorf("%w: %s exited: %v\n%s", errAddrInUse, spec.path, p.err, tail)
			}
			return fmt.Errorf("%s exited before accepting connections: %v\n%s", spec.path, p.err, tail)
		case <-ctx.Done():
			t.Stop()
			p.stop(context.Background(), syscall.SIGKILL)
			return fmt.Errorf("%s not ready: %w (last attempt: %v)\n%s", spec.path, ctx.Err(), last, logTail(s.logPath))
		case <-t.C:
		}
		if delay < 50*time.Millisecond {
			delay += delay / 2
		}
	}
}

// stop is the idempotent Stop shared by the engines: it ends the process
// group (see process.stop) and removes the directory. Concurrent callers
// wait for the first one.
func (s *server) stop(ctx context.Context) error {
	s.stopOnce.Do(func() {
		if s.proc != nil {
			s.proc.stop(ctx, s.stopSig)
		}
		if s.dir != "" {
			if err := os.RemoveAll(s.dir); err != nil {
				s.stopErr = fmt.Errorf("remove %s: %w", s.dir, err)
			}
		}
	})
	return s.stopErr
}

// withPortRetry calls start with fresh ports until it does not fail with
// errAddrInUse.
func withPortRetry(start func(port int) error) error {
	var err error
	for i := 0; i < portAttempts; i++ {
		var port int
		if port, err = freePort(); err != nil {
			return fmt.Errorf("pick a free port: %w", err)
		}
		if err = start(port); !errors.Is(err, errAddrInUse) {
			return err
		}
	}
	return err
}
