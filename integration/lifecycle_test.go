package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// running describes a started server the way these tests observe it from
// the outside.
type running struct {
	Engine   string
	PID      int   // group leader; also the process group id
	Children []int // the leader's children when it was started (PostgreSQL's leave its group)
	Port     int
	Dir      string
}

var engines = []struct {
	name  string
	start func(t testing.TB) (running, func(context.Context) error)
}{
	{"postgres", func(t testing.TB) (running, func(context.Context) error) {
		p := NewPostgres(t, PostgresOptions{})
		// A session adds a backend, which must end with the server too.
		conn, err := pgx.Connect(context.Background(), p.DSN())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close(context.Background()) })
		return newRunning("postgres", p.srv.proc.pid, p.Port, p.Dir), p.Stop
	}},
	{"mariadb", func(t testing.TB) (running, func(context.Context) error) {
		m := NewMariaDB(t, MariaDBOptions{})
		return newRunning("mariadb", m.srv.proc.pid, m.Port, m.Dir), m.Stop
	}},
	{"redis", func(t testing.TB) (running, func(context.Context) error) {
		r := NewRedis(t, RedisOptions{})
		return newRunning("redis", r.srv.proc.pid, r.Port, r.Dir), r.Stop
	}},
}

func newRunning(engine string, pid, port int, dir string) running {
	s := running{Engine: engine, PID: pid, Port: port, Dir: dir}
	for _, p := range liveProcs() {
		if p.ppid == pid {
			s.Children = append(s.Children, p.pid)
		}
	}
	return s
}

type procInfo struct{ pid, ppid, pgrp int }

// liveProcs lists the processes that are not zombies (a zombie is dead;
// who reaps an orphan is up to the machine's init).
func liveProcs() []procInfo {
	entries, _ := os.ReadDir("/proc")
	var live []procInfo
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid pgrp ...; comm may hold spaces.
		i := bytes.LastIndexByte(stat, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(stat[i+1:]))
		if len(f) < 3 || f[0] == "Z" {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		pgrp, _ := strconv.Atoi(f[2])
		live = append(live, procInfo{pid, ppid, pgrp})
	}
	return live
}

// leftovers lists the live processes of the server: its group and the
// children it had at start.
func leftovers(s running) []int {
	var left []int
	for _, p := range liveProcs() {
		if p.pgrp == s.PID || slices.Contains(s.Children, p.pid) {
			left = append(left, p.pid)
		}
	}
	return left
}

func portOpen(port int) bool {
	c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// gone waits up to timeout for every process of the server's group to end
// and its port to close, and says what is left.
func gone(s running, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		live, open := leftovers(s), portOpen(s.Port)
		if len(live) == 0 && !open {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s after %v: processes %v alive, port %d open: %v", s.Engine, timeout, live, s.Port, open)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestStopEndsTheProcessGroupClosesThePortAndRemovesTheDirectory(t *testing.T) {
	for _, e := range engines {
		t.Run(e.name, func(t *testing.T) {
			t.Parallel()
			s, stop := e.start(t)
			if len(leftovers(s)) == 0 || !portOpen(s.Port) {
				t.Fatalf("server not running before Stop: %+v", s)
			}
			if _, err := os.Stat(s.Dir); err != nil {
				t.Fatalf("directory: %v", err)
			}
			if !strings.HasPrefix(filepath.Base(s.Dir), "cutover-it-") {
				t.Errorf("directory %s lacks the cutover-it- prefix", s.Dir)
			}
			if err := stop(context.Background()); err != nil {
				t.Fatalf("Stop: %v", err)
			}
			// Stop has reaped the leader and killed the group: nothing may
			// be left at once, not after a grace period.
			if err := gone(s, 0); err != nil {
				t.Error(err)
			}
			if err := syscall.Kill(s.PID, 0); !errors.Is(err, syscall.ESRCH) {
				t.Errorf("signal 0 to pid %d: %v, want ESRCH (not reaped?)", s.PID, err)
			}
			if _, err := os.Stat(s.Dir); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("directory %s after Stop: %v, want it removed", s.Dir, err)
			}
			if err := stop(context.Background()); err != nil {
				t.Errorf("second Stop: %v, want nil", err)
			}
		})
	}
}

const helperEnv = "CUTOVER_IT_HELPER"

// TestHelperProcess is not a test on its own: TestServersEndWithTheirTest
// runs the test binary again with only it selected and helperEnv set to
// "fail", "panic" or "kill", to watch what happens to servers started by a
// test that fails, panics, or whose process is killed.
func TestHelperProcess(t *testing.T) {
	mode := os.Getenv(helperEnv)
	if mode == "" {
		return
	}
	var list []running
	for _, e := range engines {
		s, _ := e.start(t)
		list = append(list, s)
	}
	b, err := json.Marshal(list)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(os.Getenv(helperEnv+"_OUT"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	switch mode {
	case "fail":
		t.Fatal("deliberate failure")
	case "panic":
		panic("deliberate panic")
	case "kill":
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {}
	}
}

func TestServersEndWithTheirTest(t *testing.T) {
	skipIfShort(t)
	for _, tc := range []struct {
		mode       string
		name       string
		dirRemoved bool
	}{
		{"fail", "a failing test stops its servers and removes their directories", true},
		{"panic", "a panicking test stops its servers and removes their directories", true},
		// Nothing runs in a killed process: the parent-death signal ends
		// the servers; their directories stay behind (see the package doc).
		{"kill", "a killed test binary takes its servers with it", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			out := filepath.Join(t.TempDir(), "servers.json")
			cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$", "-test.count=1", "-test.v")
			cmd.Env = append(os.Environ(), helperEnv+"="+tc.mode, helperEnv+"_OUT="+out)
			output, err := cmd.CombinedOutput()
			if err == nil {
				t.Fatalf("helper passed, want it to %s:\n%s", tc.mode, output)
			}
			b, err := os.ReadFile(out)
			if err != nil {
				t.Fatalf("helper wrote no server list (%v):\n%s", err, output)
			}
			var list []running
			if err := json.Unmarshal(b, &list); err != nil || len(list) != len(engines) {
				t.Fatalf("server list %s: %v", b, err)
			}
			for _, s := range list {
				if err := gone(s, 10*time.Second); err != nil {
					t.Error(err)
					for _, pid := range append([]int{-s.PID}, s.Children...) {
						syscall.Kill(pid, syscall.SIGKILL) // do not leak them into later tests
					}
				}
				_, err := os.Stat(s.Dir)
				switch {
				case tc.dirRemoved && !errors.Is(err, fs.ErrNotExist):
					t.Errorf("%s: directory %s: %v, want it removed", s.Engine, s.Dir, err)
				case !tc.dirRemoved:
					os.RemoveAll(s.Dir)
				}
			}
			if t.Failed() {
				t.Logf("helper output:\n%s", output)
			}
		})
	}
}
