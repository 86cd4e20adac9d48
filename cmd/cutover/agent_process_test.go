package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/agenttest"
	"github.com/cutover/cutover/agent/client"
)

const (
	procOpToken   = "proc-op-token-0123456789abcdef"
	procReadToken = "proc-read-token-0123456789abcdef"
	procDBPass    = "proc-db-pw-5a7e"
)

// buildBinary builds cmd/cutover once for the test (without the race
// detector: the agents are the system under test, not the test's code).
func buildBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "cutover")
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	out, err := exec.Command(goBin, "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("build cutover: %v\n%s", err, out)
	}
	return bin
}

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// proc is one `cutover agent` process.
type proc struct {
	id, config, api, logPath string
	cmd                      *exec.Cmd
	exited                   chan error
}

func (p *proc) start(t *testing.T, bin string) {
	t.Helper()
	logf, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	// --manual: this test drives the phases itself through the CLI; the
	// plan's databases do not exist.
	p.cmd = exec.Command(bin, "agent", "--manual", "--config", p.config)
	p.cmd.Env = append(os.Environ(), "TEST_CUTOVER_OP="+procOpToken, "TEST_CUTOVER_READ="+procReadToken, "TEST_DB_PW="+procDBPass)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p.exited = make(chan error, 1)
	go func(cmd *exec.Cmd) {
		p.exited <- cmd.Wait()
		logf.Close()
	}(p.cmd)
}

// stop sends sig and waits for the process; SIGKILL after 10s.
func (p *proc) stop(sig syscall.Signal) error {
	if p.cmd == nil {
		return nil
	}
	p.cmd.Process.Signal(sig)
	select {
	case err := <-p.exited:
		p.cmd = nil
		return err
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
		<-p.exited
		p.cmd = nil
		return errors.New("did not stop within 10s")
	}
}

func (p *proc) client() *client.Client { return client.New(p.api, procOpToken) }

func TestThreeAgentProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	bin := buildBinary(t)
	dir := t.TempDir()
	var procs []*proc
	raft, api := []string{freePort(t), freePort(t), freePort(t)}, []string{freePort(t), freePort(t), freePort(t)}
	for i := range 3 {
		id := fmt.Sprintf("n%d", i+1)
		var peers strings.Builder
		for j := range 3 {
			if j != i {
				fmt.Fprintf(&peers, "      - {id: n%d, address: %q, api: \"http://%s\"}\n", j+1, raft[j], api[j])
			}
		}
		cfg := fmt.Sprintf(`agent:
  node_id: %s
  data_dir: %s
  raft:
    bind: %q
    bootstrap: true
    peers:
%s  api:
    listen: %q
    tokens:
      operator: ${TEST_CUTOVER_OP}
      read: ${TEST_CUTOVER_READ}
log: {level: debug, format: json}
plans:
  - name: orders
    manual: true
    pairs:
      - name: db
        engine: postgres
        blue: {dsn: "postgres://app:${TEST_DB_PW}@127.0.0.1:5432/shop"}
        green: {dsn: "postgres://app:${TEST_DB_PW}@127.0.0.1:5433/shop"}
`, id, filepath.Join(dir, id), raft[i], peers.String(), api[i])
		path := filepath.Join(dir, id+".yaml")
		if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		p := &proc{id: id, config: path, api: "http://" + api[i], logPath: filepath.Join(dir, id+".log")}
		p.start(t, bin)
		procs = append(procs, p)
	}
	t.Cleanup(func() {
		for _, p := range procs {
			p.stop(syscall.SIGKILL)
		}
	})
	// cutover runs the binary with the cluster's token.
	cutover := func(args ...string) (int, string) {
		t.Helper()
		cmd := exec.Command(bin, args...)
		cmd.Env = append(os.Environ(), "CUTOVER_TOKEN="+procOpToken)
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		switch {
		case errors.As(err, &ee):
			return ee.ExitCode(), string(out)
		case err != nil:
			t.Fatal(err)
		}
		return 0, string(out)
	}

	// leaderOf waits until every running process reports the same
	// established leader and returns its index.
	leaderOf := func(running []*proc, timeout time.Duration) int {
		t.Helper()
		leader := -1
		agenttest.Eventually(t, timeout, func() error {
			ids := map[string]bool{}
			established := ""
			for _, p := range running {
				st, err := p.client().Status(agenttest.Ctx(t, 2*time.Second))
				if err != nil {
					return err
				}
				ids[st.Leader] = true
				if st.Leader == p.id && st.Established {
					established = p.id
				}
			}
			if len(ids) != 1 || established == "" || !ids[established] {
				return fmt.Errorf("leaders reported: %v, established: %q", ids, established)
			}
			for i, p := range procs {
				if p.id == established {
					leader = i
				}
			}
			return nil
		})
		return leader
	}

	// Right after the agents come up there is no leader yet (and an agent
	// may not listen yet): the CLI waits for one instead of failing.
	if code, out := cutover("plan", "create", "orders", "--reason", "release 42", "--addr", procs[2].api); code != 0 {
		t.Fatalf("plan create right after the start: exit %d: %s", code, out)
	}
	leader := leaderOf(procs, 20*time.Second)
	follower := procs[(leader+1)%3]
	t.Logf("leader %s", procs[leader].id)

	// Replicate a plan through the CLI, writing to a follower.
	for _, args := range [][]string{
		{"plan", "start", "orders"},
		{"plan", "transition", "orders", "--to", "replicating"},
		{"plan", "transition", "orders", "--to", "ready"},
		{"plan", "transition", "orders", "--to", "fenced"},
	} {
		if code, out := cutover(append(args, "--addr", follower.api)...); code != 0 {
			t.Fatalf("%v: exit %d: %s", args, code, out)
		}
	}
	// Every node reports the same status.
	sameStatus := func(running []*proc) agent.Status {
		t.Helper()
		var first agent.Status
		agenttest.Eventually(t, 10*time.Second, func() error {
			for i, p := range running {
				code, out := cutover("status", "--json", "--addr", p.api)
				if code != 0 {
					return fmt.Errorf("status %s: exit %d: %s", p.id, code, out)
				}
				var st agent.Status
				if err := json.Unmarshal([]byte(out), &st); err != nil {
					return err
				}
				if i == 0 {
					first = st
				} else if st.Leader != first.Leader || !reflect.DeepEqual(st.Plans, first.Plans) || !reflect.DeepEqual(st.Members, first.Members) {
					return fmt.Errorf("%s: %+v\n%s: %+v", p.id, st, running[0].id, first)
				}
			}
			return nil
		})
		return first
	}
	st := sameStatus(procs)
	if len(st.Plans) != 1 || st.Plans[0].Phase != agent.PhaseFenced || len(st.Members) != 3 {
		t.Fatalf("status: %+v", st)
	}
	fencedEpoch := st.Plans[0].Epoch
	if code, out := cutover("gate", "--plan", "orders", "--addr", follower.api); code != 1 || !strings.Contains(out, "closed: plan orders is fenced") {
		t.Fatalf("gate while fenced: exit %d: %s", code, out)
	}

	// Kill the leader mid-plan (SIGKILL: no goodbye).
	killed := procs[leader]
	start := time.Now()
	killed.stop(syscall.SIGKILL)
	var survivors []*proc
	for _, p := range procs {
		if p != killed {
			survivors = append(survivors, p)
		}
	}
	next := leaderOf(survivors, 10*time.Second)
	t.Logf("new leader %s %s after the kill", procs[next].id, time.Since(start).Round(time.Millisecond))
	if took := time.Since(start); took > 10*time.Second {
		t.Fatalf("new leader after %s", took)
	}
	st = sameStatus(survivors)
	if st.Plans[0].Phase != agent.PhaseFenced || st.Plans[0].Epoch != fencedEpoch {
		t.Fatalf("after the kill: %+v (epoch before %d)", st.Plans[0], fencedEpoch)
	}
	for _, to := range []string{"caught_up", "verified", "authorized"} {
		if code, out := cutover("plan", "transition", "orders", "--to", to, "--addr", survivors[0].api); code != 0 {
			t.Fatalf("to %s: exit %d: %s", to, code, out)
		}
	}
	if code, out := cutover("gate", "--wait", "--timeout", "10s", "--addr", survivors[1].api, "--json"); code != 0 || !strings.Contains(out, `"open":true`) {
		t.Fatalf("gate --wait: exit %d: %s", code, out)
	}

	// The killed agent comes back from its data directory and catches up.
	killed.start(t, bin)
	final := sameStatus(procs)
	if final.Plans[0].Phase != agent.PhaseAuthorized || final.Plans[0].Epoch <= fencedEpoch {
		t.Fatalf("after restart: %+v", final.Plans[0])
	}

	// SIGHUP reloads, as daemons do: it never stops the agent. The log
	// level applies at once, the rest is named for a restart, and a file
	// that does not load changes nothing.
	hupped := procs[0]
	cfg, err := os.ReadFile(hupped.config)
	if err != nil {
		t.Fatal(err)
	}
	logSays := func(want string) {
		t.Helper()
		agenttest.Eventually(t, 10*time.Second, func() error {
			logs, err := os.ReadFile(hupped.logPath)
			if err != nil {
				return err
			}
			if !strings.Contains(string(logs), want) {
				return fmt.Errorf("%s's log does not say %q yet", hupped.id, want)
			}
			return nil
		})
	}
	hup := func(content string) {
		t.Helper()
		if err := os.WriteFile(hupped.config, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := hupped.cmd.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
	}
	hup(string(cfg))
	logSays("SIGHUP: configuration reloaded")
	hup(strings.Replace(strings.Replace(string(cfg), "level: debug", "level: info", 1), "name: orders", "name: orders-2", 1))
	logSays(`"SIGHUP: log level changed","level":"info"`)
	logSays(`"changed":["plans"]`)
	hup("agent: {node_id: [broken\n")
	logSays("SIGHUP: the configuration file does not load")
	if _, err := hupped.client().Status(agenttest.Ctx(t, 5*time.Second)); err != nil {
		t.Fatalf("%s after three SIGHUPs: %v", hupped.id, err)
	}

	// A clean stop on SIGTERM exits 0.
	for _, p := range procs {
		if err := p.stop(syscall.SIGTERM); err != nil {
			t.Errorf("%s: %v", p.id, err)
		}
	}
	for _, p := range procs {
		logs, err := os.ReadFile(p.logPath)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(logs), "agent started") {
			t.Errorf("%s logged nothing useful", p.id)
		}
		for _, s := range []string{procOpToken, procReadToken, procDBPass} {
			if strings.Contains(string(logs), s) {
				t.Errorf("%s's log holds the secret %q", p.id, s)
			}
		}
	}
}
