// Package config loads and validates cutover's YAML configuration.
//
// One file describes the agent (identity, Raft, API, TLS, tokens) and the
// cutover plans (blue/green pairs with their replication, fence,
// verification and switch settings). Secrets stay out of the file through
// ${ENV} expansion; Load reports every problem it finds, each naming its key
// and, where the parser knows it, its line.
package config

import (
	"encoding/json"
	"strings"
	"time"

	"github.com/cutover/cutover/internal/redact"
)

// Config is the whole configuration file.
type Config struct {
	Agent Agent  `yaml:"agent" json:"agent"`
	Log   Log    `yaml:"log" json:"log"`
	Plans []Plan `yaml:"plans" json:"plans"`
}

// Agent describes this node of the agent cluster.
type Agent struct {
	// NodeID names this agent in the Raft cluster; unique and stable.
	NodeID string `yaml:"node_id" json:"node_id"`
	// DataDir holds the Raft log, stable store and snapshots.
	DataDir string `yaml:"data_dir" json:"data_dir"`
	Raft    Raft   `yaml:"raft" json:"raft"`
	API     API    `yaml:"api" json:"api"`
	TLS     TLS    `yaml:"tls,omitempty" json:"tls,omitempty"`
	// Insecure lets Raft and the API listen on a non-loopback address
	// without TLS (a lab, a network already encrypted). Off, the agent
	// refuses, saying why.
	Insecure bool `yaml:"insecure,omitempty" json:"insecure,omitempty"`
	// History caps the replicated history.
	History History `yaml:"history,omitempty" json:"history,omitempty"`
	// SecretDirs are the folders whose files a plan posted to the API may
	// reference as ${file:/path}; none by default (config-file plans may
	// reference any absolute path).
	SecretDirs []string `yaml:"secret_dirs,omitempty" json:"secret_dirs,omitempty"`
}

// History caps the audit log and each plan's steps; past a cap the oldest
// entries are folded into one summary entry (export the log first to keep
// them: cutover audit export).
type History struct {
	AuditMax int `yaml:"audit_max,omitempty" json:"audit_max,omitempty"`
	StepsMax int `yaml:"steps_max,omitempty" json:"steps_max,omitempty"`
}

// Raft holds the consensus transport settings.
type Raft struct {
	// Bind is the local TCP address the Raft transport listens on.
	Bind string `yaml:"bind" json:"bind"`
	// Advertise is the address other agents use to reach this one; defaults
	// to Bind.
	Advertise string `yaml:"advertise" json:"advertise"`
	// Peers are the other voters used to bootstrap a new cluster.
	Peers []Peer `yaml:"peers" json:"peers"`
	// Bootstrap asks this node to bootstrap the cluster from Peers if it has
	// no state yet. Safe to set on every initial voter.
	Bootstrap bool `yaml:"bootstrap" json:"bootstrap"`
	// SnapshotThreshold is how many log entries trigger a snapshot.
	SnapshotThreshold uint64 `yaml:"snapshot_threshold" json:"snapshot_threshold"`
	// SnapshotRetain is how many snapshots are kept on disk.
	SnapshotRetain int `yaml:"snapshot_retain" json:"snapshot_retain"`
}

// Peer is one other Raft voter.
type Peer struct {
	ID      string `yaml:"id" json:"id"`
	Address string `yaml:"address" json:"address"`
	// API is the peer's HTTP API base URL, used to forward writes to the
	// leader.
	API string `yaml:"api" json:"api"`
}

// API is the agent's HTTP API.
type API struct {
	// Listen is the local address of the HTTP API.
	Listen string `yaml:"listen" json:"listen"`
	// Advertise is the base URL peers use to forward requests here.
	Advertise string `yaml:"advertise" json:"advertise"`
	Tokens    Tokens `yaml:"tokens" json:"tokens"`
	// InsecureOpenReads lets the API listen on a non-loopback address with
	// no read token, open to anyone who reaches it. Off, the agent refuses.
	InsecureOpenReads bool `yaml:"insecure_open_reads,omitempty" json:"insecure_open_reads,omitempty"`
}

// Tokens authorize API calls. Mutating calls need OperatorToken; read calls
// accept either.
type Tokens struct {
	Operator redact.Secret `yaml:"operator" json:"operator"`
	Read     redact.Secret `yaml:"read,omitempty" json:"read,omitempty"`
}

// TLS enables mutual TLS on the Raft transport and the API when CertFile is
// set.
type TLS struct {
	CertFile string `yaml:"cert_file,omitempty" json:"cert_file,omitempty"`
	KeyFile  string `yaml:"key_file,omitempty" json:"key_file,omitempty"`
	CAFile   string `yaml:"ca_file,omitempty" json:"ca_file,omitempty"`
}

// Enabled reports whether TLS is configured.
func (t TLS) Enabled() bool { return t.CertFile != "" }

// Log configures logging.
type Log struct {
	// Level is debug, info, warn or error.
	Level string `yaml:"level" json:"level"`
	// Format is console (for humans) or json.
	Format string `yaml:"format" json:"format"`
}

// Plan is one cutover: the pairs that move together, fenced together and
// gated together.
type Plan struct {
	Name string `yaml:"name" json:"name"`
	// Manual hands the plan's phases to operators: the agents' plan driver
	// leaves it alone and `cutover plan transition` may move it. By default
	// (false) the driver runs the plan and the state machine refuses an
	// operator's moves of the phases it owns (start, abort, rollback and
	// complete stay allowed).
	Manual bool   `yaml:"manual,omitempty" json:"manual,omitempty"`
	Pairs  []Pair `yaml:"pairs" json:"pairs"`
	Lag    Lag    `yaml:"lag" json:"lag"`
	Fence  Fence  `yaml:"fence" json:"fence"`
	Verify Verify `yaml:"verify" json:"verify"`
	Switch Switch `yaml:"switch" json:"switch"`
	// Rollback keeps the way back open after the flip.
	Rollback Rollback `yaml:"rollback" json:"rollback"`
	// Refs maps the key of every field written with a ${NAME} reference
	// (e.g. "pairs[0].blue.dsn", "switch.targets[1].command[2]") to its
	// text before expansion. The replicated state keeps these templates
	// instead of the values (see Sealed), and every agent resolves them from
	// its own environment when it acts (see Resolve). Not settable in YAML.
	Refs Refs `yaml:"-" json:"refs,omitempty"`
}

// Refs maps a plan's keys to the ${NAME} templates they were written with.
type Refs map[string]string

// MarshalJSON renders the templates with any password written out in them
// masked (a template may mix a literal password with a reference).
func (r Refs) MarshalJSON() ([]byte, error) {
	out := make(map[string]string, len(r))
	for k, v := range r {
		v = redact.Text(v)
		if strings.HasSuffix(k, ".url") {
			v = redact.URL(v)
		}
		out[k] = v
	}
	return json.Marshal(out)
}

// Rollback configures the rollback window and the automatic trigger.
type Rollback struct {
	// Window is how long after the flip reverse replication keeps blue ready
	// for a rollback; at its end the plan completes and cleans up.
	Window Duration `yaml:"window" json:"window"`
	// Watch is how long the health checks run after the flip; a check that
	// fails Failures times in a row rolls back automatically.
	Watch    Duration      `yaml:"watch" json:"watch"`
	Interval Duration      `yaml:"interval" json:"interval"`
	Failures int           `yaml:"failures" json:"failures"`
	Checks   []HealthCheck `yaml:"checks,omitempty" json:"checks,omitempty"`
}

// HealthCheck is one post-flip health probe: an HTTP URL (status and
// latency) or a SQL query returning one number (an error rate) with a limit.
type HealthCheck struct {
	Type       string   `yaml:"type" json:"type"`
	URL        string   `yaml:"url,omitempty" json:"url,omitempty"`
	Status     int      `yaml:"status,omitempty" json:"status,omitempty"`
	MaxLatency Duration `yaml:"max_latency,omitempty" json:"max_latency,omitempty"`
	DSN        DSN      `yaml:"dsn,omitempty" json:"dsn,omitempty"`
	Query      string   `yaml:"query,omitempty" json:"query,omitempty"`
	Max        float64  `yaml:"max,omitempty" json:"max,omitempty"`
}

// Engine names a database engine.
type Engine string

// Supported engines.
const (
	Postgres Engine = "postgres"
	MySQL    Engine = "mysql"
	Redis    Engine = "redis"
)

// Pair is one blue/green database pair.
type Pair struct {
	Name   string   `yaml:"name" json:"name"`
	Engine Engine   `yaml:"engine" json:"engine"`
	Blue   Endpoint `yaml:"blue" json:"blue"`
	Green  Endpoint `yaml:"green" json:"green"`
	Scope  Scope    `yaml:"scope,omitempty" json:"scope,omitempty"`
	// FenceRoles are the application roles (PostgreSQL) or users (MySQL)
	// whose writes the fence stops.
	FenceRoles []string `yaml:"fence_roles,omitempty" json:"fence_roles,omitempty"`
}

// Endpoint is one side of a pair.
type Endpoint struct {
	// DSN is a connection string: a postgres:// URL or libpq key/value
	// string, a MySQL DSN (user:pass@tcp(host:port)/db) or a redis:// URL.
	DSN DSN `yaml:"dsn" json:"dsn"`
}

// Scope limits a pair to some schemas or tables. Empty means every table of
// the database (PostgreSQL: every schema but the system ones).
type Scope struct {
	Schemas       []string `yaml:"schemas,omitempty" json:"schemas,omitempty"`
	Tables        []string `yaml:"tables,omitempty" json:"tables,omitempty"`
	ExcludeTables []string `yaml:"exclude_tables,omitempty" json:"exclude_tables,omitempty"`
}

// Lag is how close green must be before fencing.
type Lag struct {
	// MaxBytes is the replication lag in bytes (PostgreSQL WAL, MySQL
	// binlog, Redis offset) under which green counts as caught up.
	MaxBytes ByteSize `yaml:"max_bytes" json:"max_bytes"`
	// MaxDelay is the lag in time under which green counts as caught up.
	MaxDelay Duration `yaml:"max_delay" json:"max_delay"`
	// Hold is how long lag must stay under both thresholds before the fence.
	Hold Duration `yaml:"hold" json:"hold"`
}

// Fence bounds the write outage.
type Fence struct {
	// MaxFenceWindow is the longest the application may be fenced; past it
	// the leader unfences blue and aborts the plan.
	MaxFenceWindow Duration `yaml:"max_fence_window" json:"max_fence_window"`
	// DrainGrace is how long in-flight write transactions may run after the
	// fence before they are terminated.
	DrainGrace Duration `yaml:"drain_grace" json:"drain_grace"`
	// Green is how green is kept from the application until the flip
	// (PostgreSQL): "logins" locks the logins of the roles that could
	// write, with their grants given back before the window, so that the
	// flip unlocks a few roles whatever the number of tables (NOLOGIN holds
	// for green's whole cluster until then); "grants" keeps their write
	// grants revoked, and the flip gives them back inside the window (one
	// GRANT per privilege set, a catalog update per table). Empty or
	// "auto": logins when the agent's role may alter the roles
	// (CREATEROLE or superuser) and they may connect to no other database
	// of green's cluster (postgres aside), else grants.
	Green string `yaml:"green,omitempty" json:"green,omitempty"`
	// Blue is how blue's fence takes the application's write privileges
	// away (PostgreSQL): "proxy" moves the fenced roles' write grants on
	// the tables in scope to a NOLOGIN write proxy per role when the plan
	// starts (the role, a member, keeps its privileges), so that the
	// fence revokes one membership per role whatever the number of
	// tables, and the plan's end moves them back; "grants" revokes the
	// grants inside the window (one REVOKE per privilege set, a catalog
	// update per table). Empty or "auto": proxy when the agent's role may
	// create roles (CREATEROLE or superuser), else grants.
	Blue string `yaml:"blue,omitempty" json:"blue,omitempty"`
}

// BlueMode is Blue with its default (auto) filled in.
func (f Fence) BlueMode() string {
	if f.Blue == "" {
		return BlueFenceAuto
	}
	return f.Blue
}

// The ways blue's fence takes write privileges away (Fence.Blue).
const (
	BlueFenceAuto   = "auto"
	BlueFenceProxy  = "proxy"
	BlueFenceGrants = "grants"
)

// The ways green is kept from the application until the flip (Fence.Green).
const (
	GreenFenceAuto   = "auto"
	GreenFenceLogins = "logins"
	GreenFenceGrants = "grants"
)

// Verify configures row checksum verification.
type Verify struct {
	// Enabled runs verification before the gate opens. Turning it off
	// requires saying so explicitly.
	Enabled *bool `yaml:"enabled" json:"enabled"`
	// ChunkTime is the target time to hash one chunk; chunk size adapts.
	ChunkTime Duration `yaml:"chunk_time" json:"chunk_time"`
	// Parallel is how many chunks are hashed at once per side.
	Parallel int `yaml:"parallel" json:"parallel"`
	// MaxRowsPerSecond throttles the online pass on blue; 0 is unlimited.
	MaxRowsPerSecond int `yaml:"max_rows_per_second" json:"max_rows_per_second"`
}

// Switch lists the flip targets run when the gate opens.
type Switch struct {
	Targets []Target `yaml:"targets" json:"targets"`
}

// TargetType names a kind of flip target.
type TargetType string

// Supported flip targets.
const (
	TargetRedis   TargetType = "redis"
	TargetWebhook TargetType = "webhook"
	TargetCommand TargetType = "command"
	// TargetPgBouncer pauses a PgBouncer database through the window and
	// repoints its entry at the flip (switch/target.PgBouncer).
	TargetPgBouncer TargetType = "pgbouncer"
)

// Target is one flip target. Which fields apply depends on Type.
type Target struct {
	Type TargetType `yaml:"type" json:"type"`
	// Redis: the server holding the routing key, the key and the channel the
	// change is published on.
	DSN     DSN    `yaml:"dsn,omitempty" json:"dsn,omitempty"`
	Key     string `yaml:"key,omitempty" json:"key,omitempty"`
	Channel string `yaml:"channel,omitempty" json:"channel,omitempty"`
	// Webhook: URL, extra headers (often secret), timeout and retries.
	URL     string                   `yaml:"url,omitempty" json:"url,omitempty"`
	Headers map[string]redact.Secret `yaml:"headers,omitempty" json:"headers,omitempty"`
	// Command: argv, run without a shell. EnvAllow names the variables of
	// the agent's environment the command inherits (default PATH); it gets
	// the CUTOVER_* variables of the flip and nothing else, so that the
	// agent's secrets do not leak into it.
	Command  []string `yaml:"command,omitempty" json:"command,omitempty"`
	EnvAllow []string `yaml:"env_allow,omitempty" json:"env_allow,omitempty"`
	Timeout  Duration `yaml:"timeout" json:"timeout,omitempty"`
	Retries  int      `yaml:"retries,omitempty" json:"retries,omitempty"`
	// PgBouncer: DSN is the admin console (database "pgbouncer"),
	// Database the [databases] entry the application uses, DatabasesFile
	// the file pgbouncer.ini %includes that holds it, Blue and Green the
	// entry's connect string for each side (no password: auth_file), and
	// PauseTimeout bounds PAUSE waiting for in-flight transactions.
	Database      string   `yaml:"database,omitempty" json:"database,omitempty"`
	DatabasesFile string   `yaml:"databases_file,omitempty" json:"databases_file,omitempty"`
	Blue          string   `yaml:"blue,omitempty" json:"blue,omitempty"`
	Green         string   `yaml:"green,omitempty" json:"green,omitempty"`
	PauseTimeout  Duration `yaml:"pause_timeout,omitempty" json:"pause_timeout,omitempty"`
}

// Defaults used where the file is silent.
const (
	DefaultAPIListen         = "127.0.0.1:8420"
	DefaultRaftBind          = "127.0.0.1:8421"
	DefaultMaxFenceWindow    = 5 * time.Second
	DefaultDrainGrace        = 500 * time.Millisecond
	DefaultLagMaxBytes       = 1 << 20 // 1 MiB
	DefaultLagMaxDelay       = time.Second
	DefaultLagHold           = 5 * time.Second
	DefaultChunkTime         = 250 * time.Millisecond
	DefaultVerifyParallel    = 2
	DefaultTargetTimeout     = 10 * time.Second
	DefaultTargetRetries     = 3
	DefaultSnapshotThreshold = 1024
	DefaultSnapshotRetain    = 2
	DefaultRollbackWindow    = time.Hour
	DefaultRollbackWatch     = 5 * time.Minute
	DefaultHealthInterval    = 5 * time.Second
	DefaultHealthFailures    = 3
	DefaultAuditMax          = 10000
	DefaultStepsMax          = 1000
)
