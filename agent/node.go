package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/prometheus/client_golang/prometheus"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
	wal "github.com/hashicorp/raft-wal"
	"github.com/hashicorp/raft-wal/metadb"
	"go.uber.org/zap"

	"github.com/cutover/cutover/internal/clock"
	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/internal/redact"
)

// Config configures one agent. The cmd layer builds it from the
// configuration file; tests build it directly.
type Config struct {
	// NodeID names the agent in the Raft cluster; unique and stable.
	NodeID string
	// DataDir holds the Raft log, stable store and snapshots. It is created
	// 0700: the log and snapshots hold the plans' DSNs with passwords.
	DataDir string

	// RaftBind is where the Raft transport listens, unless RaftListener is
	// given (tests pass an open listener to learn the port first).
	RaftBind     string
	RaftListener net.Listener
	// RaftAdvertise is the address peers dial; defaults to the listener's.
	RaftAdvertise string
	// Peers are the other initial voters.
	Peers []Peer
	// Bootstrap bootstraps a new cluster of this node and Peers when the
	// data directory holds no Raft state; ignored otherwise. Safe to set on
	// every initial voter as long as they all list the same voters.
	Bootstrap bool

	// Snapshots: after SnapshotThreshold new entries (checked every
	// SnapshotInterval) the state is snapshotted and the log truncated,
	// keeping TrailingLogs entries for slow followers. SnapshotRetain
	// snapshots stay on disk.
	SnapshotThreshold uint64
	SnapshotInterval  time.Duration
	TrailingLogs      uint64
	SnapshotRetain    int
	// WALSegmentSize is the size of raft-wal's segment files (default 64 MiB).
	WALSegmentSize int

	// Raft timing; zero keeps hashicorp/raft's defaults (1s, 1s, 500ms,
	// 50ms). Tests shorten them.
	HeartbeatTimeout   time.Duration
	ElectionTimeout    time.Duration
	LeaderLeaseTimeout time.Duration
	CommitTimeout      time.Duration

	// APIListen is where the HTTP API listens, unless APIListener is given.
	APIListen   string
	APIListener net.Listener
	// APIAdvertise is the base URL peers use to reach this API; defaults to
	// http(s)://<listener address>.
	APIAdvertise string
	// OperatorToken authorizes mutating calls; required.
	OperatorToken redact.Secret
	// ReadToken, when set, is required (or the operator token) for read
	// calls; when empty, read calls are open.
	ReadToken redact.Secret

	// TLS, when set, turns on mutual TLS for Raft and for the API.
	TLS *TLS
	// Insecure lets Raft and the API listen on a non-loopback address
	// without TLS; InsecureOpenReads lets the API listen on one without a
	// read token. Without them Start refuses such addresses.
	Insecure          bool
	InsecureOpenReads bool

	// Plans are the plans of the configuration file, which POST /v1/plans
	// can create by name.
	Plans []config.Plan

	// AuditMax and StepsMax cap the audit log and each plan's steps
	// (0: DefaultAuditMax, DefaultStepsMax); older entries are compacted.
	AuditMax int
	StepsMax int

	// GateTimeout bounds a gate answer (default 1.5s): a node that cannot
	// confirm the answer with a majority within it answers closed.
	GateTimeout time.Duration

	// Driver runs plan steps on the leader; nil means NopDriver.
	Driver Driver
	// Registry, when set, is the registry /metrics serves; the agent adds
	// its own metrics to it, so that the driver's (replication lag, outage)
	// are served alongside. Nil gives the agent a registry of its own.
	Registry *prometheus.Registry
	// Logger receives the agent's logs (and Raft's); nil discards them.
	Logger *zap.Logger
	// Dial opens connections to other agents; nil dials TCP directly.
	Dial DialFunc
	// Getenv resolves the ${NAME} and ${file:/path} references of plan
	// specs (asked "NAME" or "file:/path") when this agent acts on a plan;
	// nil means the process environment and the files
	// (config.WithSecretFiles). Tests give each in-process agent its own.
	Getenv func(string) (string, bool)
	// SecretDirs are the folders whose files a plan posted to the API may
	// reference (${file:/path}); none by default. Config-file plans may
	// reference any absolute path.
	SecretDirs []string
	// MaxCommandVersion is the newest command version this agent applies
	// and says it understands; 0 means CommandVersion. Tests lower it to
	// play an agent of an older build in a mixed cluster.
	MaxCommandVersion int
}

// Peer is another initial voter.
type Peer struct {
	ID      string
	Address string
	// API is the peer's API base URL; optional (members register their own
	// once they lead), but it lets followers reach a leader at once.
	API string
}

// DefaultGateTimeout bounds gate answers.
const DefaultGateTimeout = 1500 * time.Millisecond

// Node is one running agent: Raft node, state machine, leader loop, HTTP API.
type Node struct {
	cfg      Config
	log      *zap.Logger
	fsm      *FSM
	raft     *raft.Raft
	trans    *raft.NetworkTransport
	store    *wal.WAL
	meta     *metadb.BoltMetaDB
	snaps    *raft.FileSnapshotStore
	notifyCh chan bool

	apiLn   net.Listener
	apiURL  string
	server  *http.Server
	client  *http.Client // forwards to the leader's API
	peerAPI map[string]string
	metrics *metrics

	// established is true while this node leads and its leader loop has
	// passed the Barrier: only then may it answer from its state.
	established atomic.Bool

	cancel   context.CancelFunc
	done     chan struct{} // monitorLeadership exited
	httpDone chan struct{}
	stopOnce sync.Once
	stopErr  error
}

// Start opens the node's stores, joins or bootstraps the cluster, and
// serves the API. Stop releases everything.
func Start(cfg Config) (n *Node, err error) {
	if cfg.NodeID == "" || cfg.DataDir == "" {
		return nil, errors.New("start agent: node id and data dir are required")
	}
	if cfg.OperatorToken == "" {
		return nil, errors.New("start agent: an operator token is required")
	}
	if err := checkExposure(cfg); err != nil {
		return nil, fmt.Errorf("start agent: %w", err)
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.Driver == nil {
		cfg.Driver = NopDriver{}
	}
	if cfg.GateTimeout <= 0 {
		cfg.GateTimeout = DefaultGateTimeout
	}
	if cfg.SnapshotRetain < 1 {
		cfg.SnapshotRetain = config.DefaultSnapshotRetain
	}
	if cfg.Dial == nil {
		var d net.Dialer
		cfg.Dial = d.DialContext
	}
	n = &Node{
		cfg:      cfg,
		log:      cfg.Logger.With(zap.String("node", cfg.NodeID)),
		fsm:      NewFSM(),
		notifyCh: make(chan bool, 16),
		peerAPI:  map[string]string{},
		done:     make(chan struct{}),
		httpDone: make(chan struct{}),
	}
	if cfg.Getenv != nil {
		n.fsm.env = &envSource{lookup: cfg.Getenv}
	}
	n.fsm.maxVersion = cfg.MaxCommandVersion
	for _, p := range cfg.Peers {
		if p.API != "" {
			n.peerAPI[p.ID] = p.API
		}
	}
	var cleanup []func()
	defer func() {
		if err != nil {
			for i := len(cleanup) - 1; i >= 0; i-- {
				cleanup[i]()
			}
		}
	}()

	if err := os.MkdirAll(filepath.Join(cfg.DataDir, "raft", "wal"), 0o700); err != nil {
		return nil, fmt.Errorf("start agent: %w", err)
	}
	// The log and stable store are raft-wal, not raft-boltdb/v2: v2.3.1
	// imports github.com/hashicorp/go-metrics/compat, which go-metrics
	// v0.7.0 (required by raft v1.8.0) no longer has, so it does not build
	// against the current raft. raft-wal is HashiCorp's newer store (Consul
	// uses it): segment files with constant-time appends and truncation that
	// deletes whole segments rather than rewriting a B-tree.
	segment := cfg.WALSegmentSize
	if segment <= 0 {
		segment = wal.DefaultSegmentSize
	}
	// WAL.Close (v0.4.0) does not close its meta store, a bolt file that
	// holds an flock: a node restarted in the same process would wait on it
	// forever. So the node owns the meta store and closes it itself.
	n.meta = &metadb.BoltMetaDB{}
	n.store, err = wal.Open(filepath.Join(cfg.DataDir, "raft", "wal"), wal.WithLogger(hclogger(n.log, "wal")),
		wal.WithSegmentSize(segment), wal.WithMetaStore(n.meta))
	if err != nil {
		n.meta.Close()
		return nil, fmt.Errorf("start agent: open raft log: %w", err)
	}
	cleanup = append(cleanup, func() { n.store.Close(); n.meta.Close() })
	n.snaps, err = raft.NewFileSnapshotStoreWithLogger(filepath.Join(cfg.DataDir, "raft"), cfg.SnapshotRetain, hclogger(n.log, "snapshot"))
	if err != nil {
		return nil, fmt.Errorf("start agent: open snapshots: %w", err)
	}

	raftLn := cfg.RaftListener
	if raftLn == nil {
		if raftLn, err = net.Listen("tcp", cfg.RaftBind); err != nil {
			return nil, fmt.Errorf("start agent: raft listen: %w", err)
		}
	}
	advertise := cfg.RaftAdvertise
	if advertise == "" {
		advertise = raftLn.Addr().String()
	}
	layer := &streamLayer{ln: raftLn, advertise: tcpAddr(advertise), dial: cfg.Dial}
	if cfg.TLS != nil {
		layer.serverTLS, layer.clientTLS = cfg.TLS.ServerConfig(), cfg.TLS.ClientConfig()
	}
	n.trans = raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream:  layer,
		MaxPool: 3,
		Timeout: 10 * time.Second,
		Logger:  hclogger(n.log, "transport"),
	})
	cleanup = append(cleanup, func() { n.trans.Close() })

	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.NodeID)
	rc.NotifyCh = n.notifyCh
	rc.Logger = hclogger(n.log, "raft")
	setDur(&rc.HeartbeatTimeout, cfg.HeartbeatTimeout)
	setDur(&rc.ElectionTimeout, cfg.ElectionTimeout)
	setDur(&rc.LeaderLeaseTimeout, cfg.LeaderLeaseTimeout)
	setDur(&rc.CommitTimeout, cfg.CommitTimeout)
	setDur(&rc.SnapshotInterval, cfg.SnapshotInterval)
	if cfg.SnapshotThreshold > 0 {
		rc.SnapshotThreshold = cfg.SnapshotThreshold
	}
	if cfg.TrailingLogs > 0 {
		rc.TrailingLogs = cfg.TrailingLogs
	}
	n.cfg.HeartbeatTimeout = rc.HeartbeatTimeout

	if cfg.Bootstrap {
		has, err := raft.HasExistingState(n.store, n.store, n.snaps)
		if err != nil {
			return nil, fmt.Errorf("start agent: %w", err)
		}
		if !has {
			servers := []raft.Server{{ID: rc.LocalID, Address: raft.ServerAddress(advertise), Suffrage: raft.Voter}}
			for _, p := range cfg.Peers {
				servers = append(servers, raft.Server{ID: raft.ServerID(p.ID), Address: raft.ServerAddress(p.Address), Suffrage: raft.Voter})
			}
			if err := raft.BootstrapCluster(rc, n.store, n.store, n.snaps, n.trans, raft.Configuration{Servers: servers}); err != nil {
				return nil, fmt.Errorf("start agent: bootstrap: %w", err)
			}
			n.log.Info("bootstrapped a new cluster", zap.Int("voters", len(servers)))
		}
	}
	n.raft, err = raft.NewRaft(rc, n.fsm, n.store, n.store, n.snaps, n.trans)
	if err != nil {
		return nil, fmt.Errorf("start agent: raft: %w", err)
	}
	cleanup = append(cleanup, func() { n.raft.Shutdown().Error() })

	n.apiLn = cfg.APIListener
	if n.apiLn == nil {
		if n.apiLn, err = net.Listen("tcp", cfg.APIListen); err != nil {
			return nil, fmt.Errorf("start agent: api listen: %w", err)
		}
	}
	n.apiURL = cfg.APIAdvertise
	if n.apiURL == "" {
		scheme := "http"
		if cfg.TLS != nil {
			scheme = "https"
		}
		n.apiURL = scheme + "://" + n.apiLn.Addr().String()
	}
	transport := &http.Transport{
		DialContext:         cfg.Dial,
		MaxIdleConnsPerHost: 4,
		IdleConnTimeout:     30 * time.Second,
	}
	if cfg.TLS != nil {
		transport.TLSClientConfig = cfg.TLS.ClientConfig()
	}
	n.client = &http.Client{Transport: transport}
	n.metrics = newMetrics(n)
	n.server = &http.Server{
		Handler:  n.routes(),
		ErrorLog: zap.NewStdLog(n.log.Named("http")),
	}
	serverLimits(n.server)
	if cfg.TLS != nil {
		n.server.TLSConfig = cfg.TLS.ServerConfig()
	}
	go func() {
		defer close(n.httpDone)
		var err error
		if cfg.TLS != nil {
			err = n.server.ServeTLS(n.apiLn, "", "")
		} else {
			err = n.server.Serve(n.apiLn)
		}
		if err != nil && !errors.Is(err, http.ErrServerClosed) {
			n.log.Error("api server stopped", zap.Error(err))
		}
	}()

	ctx, cancel := context.WithCancel(context.Background())
	n.cancel = cancel
	go n.monitorLeadership(ctx)
	n.log.Info("agent started", zap.String("raft", advertise), zap.String("api", n.apiURL))
	return n, nil
}

// checkExposure refuses to listen beyond loopback without TLS or with open
// reads, unless the configuration says it accepts that.
func checkExposure(cfg Config) error {
	raftAddr, apiAddr := cfg.RaftBind, cfg.APIListen
	if cfg.RaftListener != nil {
		raftAddr = cfg.RaftListener.Addr().String()
	}
	if cfg.APIListener != nil {
		apiAddr = cfg.APIListener.Addr().String()
	}
	return config.ExposureError(config.ExposureProblems(raftAddr, apiAddr, cfg.TLS != nil, cfg.ReadToken != "", cfg.Insecure, cfg.InsecureOpenReads))
}

func setDur(dst *time.Duration, v time.Duration) {
	if v > 0 {
		*dst = v
	}
}

// Stop stops the leader loop and its drivers, the API, Raft and the stores,
// and waits for all of them. It does not hand leadership over first: the
// cluster elects a new leader within an election timeout, as after a crash.
func (n *Node) Stop() error {
	n.stopOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		n.server.Shutdown(ctx)
		<-n.httpDone
		n.cancel()
		<-n.done
		errs := []error{n.raft.Shutdown().Error(), n.trans.Close(), n.store.Close(), n.meta.Close()}
		n.client.CloseIdleConnections()
		n.stopErr = errors.Join(errs...)
		n.log.Info("agent stopped")
	})
	return n.stopErr
}

// ID returns the node's id.
func (n *Node) ID() string { return n.cfg.NodeID }

// APIURL returns the base URL of the node's API.
func (n *Node) APIURL() string { return n.apiURL }

// RaftAddress returns the address peers dial for Raft.
func (n *Node) RaftAddress() string { return string(n.trans.LocalAddr()) }

// FSM returns the node's state machine, for reads.
func (n *Node) FSM() *FSM { return n.fsm }

// IsLeader reports whether this node is the Raft leader.
func (n *Node) IsLeader() bool { return n.raft.State() == raft.Leader }

// Established reports whether this node leads and its leader loop has
// caught up with everything earlier leaders committed.
func (n *Node) Established() bool { return n.established.Load() && n.IsLeader() }

// Leader returns the leader's id, or "" when none is known.
func (n *Node) Leader() string {
	_, id := n.raft.LeaderWithID()
	return string(id)
}

// Origin says who asked for an API command, for the audit log.
type Origin struct {
	// Actor is who asked: "driver", or the API caller.
	Actor string
	// Via is the node that received the API call, when it was forwarded.
	Via    string
	Reason string
}

// Propose commits a command through Raft on the leader and returns what the
// state machine made of it. It stamps the version, the time and this node's
// id. A refused command returns its *Result and the refusal as the error.
//
// ctx bounds the wait to hand the command to Raft; once handed over, Propose
// waits for the commit, which Raft resolves within the leader lease if
// leadership is lost (ErrLeadershipLost: the command may or may not commit).
func (n *Node) Propose(ctx context.Context, c Command) (*Result, error) {
	if !n.IsLeader() {
		return nil, ErrNotLeader
	}
	if c.Version == 0 {
		c.Version = versionOf(c.Op)
	}
	c.At = clock.Now().UTC()
	c.Node = n.cfg.NodeID
	c.AuditMax, c.StepsMax = n.cfg.AuditMax, n.cfg.StepsMax
	data, err := json.Marshal(c)
	if err != nil {
		return nil, fmt.Errorf("encode command: %w", err)
	}
	timeout := 10 * time.Second
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl)
		if timeout <= 0 {
			return nil, ctx.Err()
		}
	}
	f := n.raft.Apply(data, timeout)
	if err := f.Error(); err != nil {
		return nil, raftErr(err)
	}
	res, ok := f.Response().(*Result)
	if !ok {
		return nil, fmt.Errorf("%w: no result from the state machine", ErrInvalidCommand)
	}
	return res, res.Err
}

// raftErr maps hashicorp/raft's errors to the agent's sentinels.
func raftErr(err error) error {
	switch {
	case errors.Is(err, raft.ErrNotLeader):
		return ErrNotLeader
	case errors.Is(err, raft.ErrLeadershipLost), errors.Is(err, raft.ErrLeadershipTransferInProgress):
		return ErrLeadershipLost
	case errors.Is(err, raft.ErrRaftShutdown):
		return ErrStopped
	case errors.Is(err, raft.ErrEnqueueTimeout):
		return fmt.Errorf("raft enqueue: %w", context.DeadlineExceeded)
	}
	return err
}

// CreatePlan creates a plan in phase pending from a specification.
func (n *Node) CreatePlan(ctx context.Context, spec config.Plan, source string, o Origin) (Plan, error) {
	sealed, err := SealPlan(spec)
	if err != nil {
		return Plan{}, err
	}
	res, err := n.Propose(ctx, Command{Op: OpCreatePlan, Plan: spec.Name, Spec: sealed, Source: source, Actor: o.Actor, Origin: OriginOperator, Via: o.Via, Reason: o.Reason})
	return resultPlan(res, err)
}

// Transition moves a plan to another phase as an operator (the API's
// start, abort and transition); ifEpoch, when not zero, makes it
// conditional on the plan's current epoch. Its origin is always
// OriginOperator: no caller of the API can speak for the driver.
func (n *Node) Transition(ctx context.Context, plan string, to Phase, ifEpoch uint64, o Origin) (Plan, error) {
	res, err := n.Propose(ctx, Command{Op: OpTransition, Plan: plan, To: to, IfEpoch: ifEpoch, Actor: o.Actor, Origin: OriginOperator, Via: o.Via, Reason: o.Reason})
	return resultPlan(res, err)
}

// DeletePlan forgets a finished (terminal, finalized) plan; its audit
// entries and reports stay.
func (n *Node) DeletePlan(ctx context.Context, plan string, o Origin) error {
	if !n.IsLeader() {
		return ErrNotLeader
	}
	if err := n.votersUnderstand(ctx, versionOf(OpDeletePlan), OpDeletePlan); err != nil {
		return err
	}
	_, err := n.Propose(ctx, Command{Op: OpDeletePlan, Plan: plan, Actor: o.Actor, Origin: OriginOperator, Via: o.Via, Reason: o.Reason})
	return err
}

func resultPlan(res *Result, err error) (Plan, error) {
	if err != nil {
		return Plan{}, err
	}
	if res.Plan == nil {
		return Plan{}, fmt.Errorf("%w: no plan in the result", ErrInvalidCommand)
	}
	return *res.Plan, nil
}

// AddVoter adds a voter to the cluster and records its API address.
func (n *Node) AddVoter(ctx context.Context, m Member, o Origin) error {
	if !n.IsLeader() {
		return ErrNotLeader
	}
	if m.ID == "" || m.Address == "" {
		return fmt.Errorf("%w: a member needs an id and a raft address", ErrInvalidCommand)
	}
	if err := n.raft.AddVoter(raft.ServerID(m.ID), raft.ServerAddress(m.Address), 0, 10*time.Second).Error(); err != nil {
		return fmt.Errorf("add voter %s: %w", m.ID, raftErr(err))
	}
	_, err := n.Propose(ctx, Command{Op: OpSetMember, Member: &m, Actor: o.Actor, Origin: OriginOperator, Via: o.Via, Reason: o.Reason})
	return err
}

// RemoveMember forgets a member, then removes it from the Raft
// configuration (in that order, so that a leader removing itself can still
// commit the first).
func (n *Node) RemoveMember(ctx context.Context, id string, o Origin) error {
	if _, err := n.Propose(ctx, Command{Op: OpRemoveMember, Member: &Member{ID: id}, Actor: o.Actor, Origin: OriginOperator, Via: o.Via, Reason: o.Reason}); err != nil {
		return err
	}
	if err := n.raft.RemoveServer(raft.ServerID(id), 0, 10*time.Second).Error(); err != nil {
		return fmt.Errorf("remove server %s: %w", id, raftErr(err))
	}
	return nil
}

// leaderAPI returns the leader's API base URL.
func (n *Node) leaderAPI() (id, url string, err error) {
	_, lid := n.raft.LeaderWithID()
	if lid == "" {
		return "", "", ErrNoLeader
	}
	id = string(lid)
	if id == n.cfg.NodeID {
		return id, n.apiURL, nil
	}
	if m, ok := n.fsm.Member(id); ok && m.API != "" {
		return id, m.API, nil
	}
	if api := n.peerAPI[id]; api != "" {
		return id, api, nil
	}
	return id, "", fmt.Errorf("%w: the API address of leader %s is unknown", ErrNoLeader, id)
}

// Snapshot asks Raft for a snapshot now (tests, operators).
func (n *Node) Snapshot() error { return n.raft.Snapshot().Error() }

// LogBounds returns the first and last index held by the Raft log store; the
// first grows when snapshots truncate the log.
func (n *Node) LogBounds() (first, last uint64, err error) {
	if first, err = n.store.FirstIndex(); err != nil {
		return 0, 0, err
	}
	last, err = n.store.LastIndex()
	return first, last, err
}

// RaftStats returns hashicorp/raft's statistics.
func (n *Node) RaftStats() map[string]string { return n.raft.Stats() }
