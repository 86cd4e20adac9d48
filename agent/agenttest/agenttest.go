// Package agenttest runs clusters of agents inside a test process, over
// real TCP on loopback, with helpers to find the leader, cut a node off,
// stop and restart nodes from their data directories: what raft's
// testing.go is for raft, for cutover's agent. Tests of plan drivers (the
// database steps) can use it to run their driver on a real cluster.
package agenttest

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/client"
	"github.com/cutover/cutover/agent/faultnet"
	"github.com/cutover/cutover/internal/redact"
	// Its agents validate posted plans as a binary's do (cmd/cutover).
	_ "github.com/cutover/cutover/internal/dsnsyntax/register"
)

// Tokens used by every cluster.
const (
	OperatorToken = "op-token-0123456789abcdef"
	ReadToken     = "read-token-0123456789abcdef"
)

// Options shape a cluster.
type Options struct {
	// Nodes is the number of voters (default 3).
	Nodes int
	// Tweak adjusts node i's configuration before it starts (each start).
	Tweak func(i int, c *agent.Config)
	// Driver returns node i's driver; nil keeps the NopDriver.
	Driver func(i int) agent.Driver
	// NoReadToken leaves read calls open.
	NoReadToken bool
	// LogLevel of the captured logs (default info).
	LogLevel zapcore.Level
}

// Cluster is a set of agents bootstrapped together.
type Cluster struct {
	t    testing.TB
	opts Options
	Net  *faultnet.Net
	logs *syncBuffer
	mu   sync.Mutex
	ms   []*Member
}

// Member is one agent of the cluster; Node is nil while it is stopped.
type Member struct {
	Index    int
	ID       string
	Dir      string
	RaftAddr string
	APIAddr  string
	Node     *agent.Node
}

// New starts a cluster and stops it when the test ends.
func New(t testing.TB, opts Options) *Cluster {
	t.Helper()
	if opts.Nodes == 0 {
		opts.Nodes = 3
	}
	c := &Cluster{t: t, opts: opts, Net: faultnet.New(), logs: &syncBuffer{}}
	var raftLns, apiLns []net.Listener
	for i := 0; i < opts.Nodes; i++ {
		rl, al := listen(t, "127.0.0.1:0"), listen(t, "127.0.0.1:0")
		raftLns, apiLns = append(raftLns, rl), append(apiLns, al)
		m := &Member{Index: i, ID: fmt.Sprintf("n%d", i+1), Dir: filepath.Join(t.TempDir(), "data"),
			RaftAddr: rl.Addr().String(), APIAddr: al.Addr().String()}
		c.Net.Register(m.ID, m.RaftAddr, m.APIAddr)
		c.ms = append(c.ms, m)
	}
	t.Cleanup(c.StopAll)
	t.Cleanup(func() {
		// On failure, show what the nodes logged last: elections, errors.
		if t.Failed() {
			lines := strings.Split(strings.TrimSpace(c.Logs()), "\n")
			t.Logf("last %d log lines of the cluster:\n%s", min(len(lines), 80), strings.Join(lines[max(0, len(lines)-80):], "\n"))
		}
	})
	for i := range c.ms {
		c.start(i, raftLns[i], apiLns[i])
	}
	return c
}

// AddNode starts a new agent that is not a voter yet (no bootstrap): add
// it with POST /v1/members.
func (c *Cluster) AddNode() *Member {
	c.t.Helper()
	rl, al := listen(c.t, "127.0.0.1:0"), listen(c.t, "127.0.0.1:0")
	c.mu.Lock()
	m := &Member{Index: len(c.ms), ID: fmt.Sprintf("n%d", len(c.ms)+1), Dir: filepath.Join(c.t.TempDir(), "data"),
		RaftAddr: rl.Addr().String(), APIAddr: al.Addr().String()}
	c.ms = append(c.ms, m)
	c.mu.Unlock()
	c.Net.Register(m.ID, m.RaftAddr, m.APIAddr)
	c.start(m.Index, rl, al)
	return m
}

func listen(t testing.TB, addr string) net.Listener {
	t.Helper()
	var (
		ln  net.Listener
		err error
	)
	// A restarted node listens on its old port; the kernel may take a
	// moment to release it.
	for i := 0; i < 50; i++ {
		if ln, err = net.Listen("tcp", addr); err == nil {
			return ln
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("listen %s: %v", addr, err)
	return nil
}

// Config returns the configuration node i starts with.
func (c *Cluster) Config(i int) agent.Config {
	m := c.ms[i]
	var peers []agent.Peer
	for j, o := range c.ms {
		if j != i && j < c.opts.Nodes {
			peers = append(peers, agent.Peer{ID: o.ID, Address: o.RaftAddr, API: "http://" + o.APIAddr})
		}
	}
	level := zap.NewAtomicLevelAt(c.opts.LogLevel)
	enc := zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())
	cfg := agent.Config{
		NodeID:        m.ID,
		DataDir:       m.Dir,
		RaftAdvertise: m.RaftAddr,
		Peers:         peers,
		Bootstrap:     i < c.opts.Nodes,
		// Short enough for quick elections, long enough that a leader
		// starved of CPU for a few hundred ms (race detector, a busy CI
		// machine) keeps its lease.
		HeartbeatTimeout:   500 * time.Millisecond,
		ElectionTimeout:    500 * time.Millisecond,
		LeaderLeaseTimeout: 500 * time.Millisecond,
		CommitTimeout:      5 * time.Millisecond,
		OperatorToken:      redact.Secret(OperatorToken),
		ReadToken:          redact.Secret(ReadToken),
		Logger:             zap.New(zapcore.NewCore(enc, zapcore.AddSync(c.logs), level)),
		Dial:               c.Net.Dialer(m.ID),
	}
	if c.opts.NoReadToken {
		cfg.ReadToken = ""
	}
	if c.opts.Driver != nil {
		cfg.Driver = c.opts.Driver(i)
	}
	if c.opts.Tweak != nil {
		c.opts.Tweak(i, &cfg)
	}
	return cfg
}

func (c *Cluster) start(i int, rl, al net.Listener) {
	c.t.Helper()
	cfg := c.Config(i)
	cfg.RaftListener, cfg.APIListener = rl, al
	n, err := agent.Start(cfg)
	if err != nil {
		rl.Close()
		al.Close()
		c.t.Fatalf("start %s: %v", c.ms[i].ID, err)
	}
	c.mu.Lock()
	c.ms[i].Node = n
	c.mu.Unlock()
}

// Members returns every member, running or not.
func (c *Cluster) Members() []*Member {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]*Member(nil), c.ms...)
}

// Running returns the members whose node runs.
func (c *Cluster) Running() []*Member {
	var out []*Member
	for _, m := range c.Members() {
		if c.node(m) != nil {
			out = append(out, m)
		}
	}
	return out
}

// Node returns node i, or nil while it is stopped. Use it rather than
// Member.Node from another goroutine than the test's.
func (c *Cluster) Node(i int) *agent.Node {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ms[i].Node
}

func (c *Cluster) node(m *Member) *agent.Node {
	c.mu.Lock()
	defer c.mu.Unlock()
	return m.Node
}

// Stop stops node i (without handing leadership over: to the others it is
// a crash).
func (c *Cluster) Stop(i int) {
	c.t.Helper()
	c.mu.Lock()
	n := c.ms[i].Node
	c.ms[i].Node = nil
	c.mu.Unlock()
	if n != nil {
		if err := n.Stop(); err != nil {
			c.t.Errorf("stop %s: %v", c.ms[i].ID, err)
		}
	}
}

// Restart starts a stopped node i again from its data directory, on the
// same addresses.
func (c *Cluster) Restart(i int) {
	c.t.Helper()
	m := c.ms[i]
	c.start(i, listen(c.t, m.RaftAddr), listen(c.t, m.APIAddr))
}

// StopAll stops every running node.
func (c *Cluster) StopAll() {
	for _, m := range c.Members() {
		c.Stop(m.Index)
	}
}

// Isolate cuts node i off from every other node.
func (c *Cluster) Isolate(i int) { c.Net.Isolate(c.ms[i].ID) }

// Heal restores every link.
func (c *Cluster) Heal() { c.Net.Heal() }

// Leader waits up to timeout for exactly one established leader among the
// running, connected nodes (skipping except) and returns it.
func (c *Cluster) Leader(timeout time.Duration, except ...int) *Member {
	c.t.Helper()
	var leader *Member
	Eventually(c.t, timeout, func() error {
		leader = nil
		for _, m := range c.Running() {
			if contains(except, m.Index) {
				continue
			}
			n := c.node(m)
			if n != nil && n.Established() {
				if leader != nil {
					return fmt.Errorf("two established leaders: %s and %s", leader.ID, m.ID)
				}
				leader = m
			}
		}
		if leader == nil {
			return fmt.Errorf("no established leader")
		}
		return nil
	})
	return leader
}

func contains(xs []int, x int) bool {
	for _, v := range xs {
		if v == x {
			return true
		}
	}
	return false
}

// WaitReplicated waits until every running node has applied every command
// the leader has applied.
func (c *Cluster) WaitReplicated(timeout time.Duration) {
	c.t.Helper()
	Eventually(c.t, timeout, func() error {
		var want uint64
		for _, m := range c.Running() {
			if n := c.node(m); n != nil && n.IsLeader() {
				want = n.FSM().Index()
			}
		}
		if want == 0 {
			return fmt.Errorf("no leader")
		}
		for _, m := range c.Running() {
			if n := c.node(m); n != nil && n.FSM().Index() < want {
				return fmt.Errorf("%s has applied %d of %d", m.ID, n.FSM().Index(), want)
			}
		}
		return nil
	})
}

// Client returns an API client for node i with the operator token.
func (c *Cluster) Client(i int) *client.Client { return c.ClientWithToken(i, OperatorToken) }

// ClientWithToken returns an API client for node i with token.
func (c *Cluster) ClientWithToken(i int, token string) *client.Client {
	return client.New("http://"+c.ms[i].APIAddr, token, client.WithUser("agenttest"))
}

// URL returns node i's API base URL.
func (c *Cluster) URL(i int) string { return "http://" + c.ms[i].APIAddr }

// Logs returns everything the nodes logged so far.
func (c *Cluster) Logs() string { return c.logs.String() }

// Eventually retries check until it returns nil or timeout passes.
func Eventually(t testing.TB, timeout time.Duration, check func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %v", timeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Ctx returns a context that ends with the test or after timeout.
func Ctx(t testing.TB, timeout time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	t.Cleanup(cancel)
	return ctx
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Contains reports whether the logs contain s.
func (c *Cluster) LogsContain(s string) bool { return strings.Contains(c.Logs(), s) }
