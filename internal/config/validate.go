package config

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	mysqldriver "github.com/go-sql-driver/mysql"

	"github.com/cutover/cutover/internal/redact"
)

func (c *Config) applyDefaults() {
	a := &c.Agent
	if a.Raft.Bind == "" {
		a.Raft.Bind = DefaultRaftBind
	}
	if a.Raft.Advertise == "" {
		a.Raft.Advertise = a.Raft.Bind
	}
	if a.Raft.SnapshotThreshold == 0 {
		a.Raft.SnapshotThreshold = DefaultSnapshotThreshold
	}
	if a.Raft.SnapshotRetain == 0 {
		a.Raft.SnapshotRetain = DefaultSnapshotRetain
	}
	if a.API.Listen == "" {
		a.API.Listen = DefaultAPIListen
	}
	if a.History.AuditMax == 0 {
		a.History.AuditMax = DefaultAuditMax
	}
	if a.History.StepsMax == 0 {
		a.History.StepsMax = DefaultStepsMax
	}
	if a.API.Advertise == "" && a.API.Listen != "" {
		scheme := "http"
		if a.TLS.Enabled() {
			scheme = "https"
		}
		a.API.Advertise = scheme + "://" + a.API.Listen
	}
	if c.Log.Level == "" {
		c.Log.Level = "info"
	}
	if c.Log.Format == "" {
		c.Log.Format = "console"
	}
	for i := range c.Plans {
		p := &c.Plans[i]
		if p.Lag.MaxBytes == 0 {
			p.Lag.MaxBytes = DefaultLagMaxBytes
		}
		if p.Lag.MaxDelay == 0 {
			p.Lag.MaxDelay = Duration(DefaultLagMaxDelay)
		}
		if p.Lag.Hold == 0 {
			p.Lag.Hold = Duration(DefaultLagHold)
		}
		if p.Fence.MaxFenceWindow == 0 {
			p.Fence.MaxFenceWindow = Duration(DefaultMaxFenceWindow)
		}
		if p.Fence.DrainGrace == 0 {
			p.Fence.DrainGrace = Duration(DefaultDrainGrace)
		}
		if p.Verify.Enabled == nil {
			on := true
			p.Verify.Enabled = &on
		}
		if p.Verify.ChunkTime == 0 {
			p.Verify.ChunkTime = Duration(DefaultChunkTime)
		}
		if p.Verify.Parallel == 0 {
			p.Verify.Parallel = DefaultVerifyParallel
		}
		rb := &p.Rollback
		if rb.Window == 0 {
			rb.Window = Duration(DefaultRollbackWindow)
		}
		if rb.Watch == 0 {
			rb.Watch = Duration(DefaultRollbackWatch)
		}
		if rb.Interval == 0 {
			rb.Interval = Duration(DefaultHealthInterval)
		}
		if rb.Failures == 0 {
			rb.Failures = DefaultHealthFailures
		}
		for j := range p.Switch.Targets {
			t := &p.Switch.Targets[j]
			if t.Timeout == 0 {
				t.Timeout = Duration(DefaultTargetTimeout)
			}
			if t.Retries == 0 && t.Type == TargetWebhook {
				t.Retries = DefaultTargetRetries
			}
			if t.Type == TargetCommand && t.EnvAllow == nil {
				t.EnvAllow = []string{"PATH"}
			}
			if t.Type == TargetRedis {
				if t.Key == "" {
					t.Key = "cutover:" + p.Name + ":route"
				}
				if t.Channel == "" {
					t.Channel = t.Key
				}
			}
		}
	}
}

// Names end up in replication slot and publication names, which PostgreSQL
// limits to lowercase letters, digits and underscores (hyphens are mapped to
// underscores), 63 bytes in all.
var nameRE = regexp.MustCompile(`^[a-z][a-z0-9_-]{0,31}$`)

// MinTokenLen keeps guessable tokens out of production.
const MinTokenLen = 16

type problems []Problem

func (ps *problems) add(key, format string, args ...any) {
	*ps = append(*ps, Problem{Key: key, Message: fmt.Sprintf(format, args...)})
}

func (c *Config) validate() []Problem {
	var ps problems
	a := c.Agent
	if a.NodeID == "" {
		ps.add("agent.node_id", "required: a unique, stable name for this agent")
	}
	if a.DataDir == "" {
		ps.add("agent.data_dir", "required: where the Raft log and snapshots are kept")
	}
	checkHostPort(&ps, "agent.raft.bind", a.Raft.Bind, true)
	checkHostPort(&ps, "agent.raft.advertise", a.Raft.Advertise, false)
	if h, _, err := net.SplitHostPort(a.Raft.Advertise); err == nil {
		if ip := net.ParseIP(h); ip != nil && ip.IsUnspecified() {
			ps.add("agent.raft.advertise", "%s cannot be reached by peers: give this agent's routable address", a.Raft.Advertise)
		}
	}
	ids := map[string]bool{a.NodeID: true}
	addrs := map[string]string{a.Raft.Advertise: "agent.raft.advertise"}
	for i, p := range a.Raft.Peers {
		key := fmt.Sprintf("agent.raft.peers[%d]", i)
		switch {
		case p.ID == "":
			ps.add(key+".id", "required")
		case ids[p.ID]:
			ps.add(key+".id", "%q is used twice (peer ids and agent.node_id must be unique)", p.ID)
		}
		ids[p.ID] = true
		checkHostPort(&ps, key+".address", p.Address, false)
		if other, dup := addrs[p.Address]; dup && p.Address != "" {
			ps.add(key+".address", "%s is also %s", p.Address, other)
		}
		addrs[p.Address] = key + ".address"
		if p.API != "" {
			checkURL(&ps, key+".api", p.API)
		}
	}
	checkHostPort(&ps, "agent.api.listen", a.API.Listen, true)
	if a.API.Advertise != "" {
		checkURL(&ps, "agent.api.advertise", a.API.Advertise)
	}
	if a.API.Tokens.Operator == "" {
		ps.add("agent.api.tokens.operator", "required: mutating API calls need it (set it from the environment, e.g. ${CUTOVER_OPERATOR_TOKEN})")
	} else if len(a.API.Tokens.Operator) < MinTokenLen {
		ps.add("agent.api.tokens.operator", "too short: use at least %d characters", MinTokenLen)
	}
	if a.API.Tokens.Read != "" && len(a.API.Tokens.Read) < MinTokenLen {
		ps.add("agent.api.tokens.read", "too short: use at least %d characters", MinTokenLen)
	}
	if a.API.Tokens.Read != "" && a.API.Tokens.Read == a.API.Tokens.Operator {
		ps.add("agent.api.tokens.read", "must differ from the operator token")
	}
	t := a.TLS
	if t.CertFile != "" || t.KeyFile != "" || t.CAFile != "" {
		for _, f := range []struct{ key, path string }{
			{"agent.tls.cert_file", t.CertFile}, {"agent.tls.key_file", t.KeyFile}, {"agent.tls.ca_file", t.CAFile},
		} {
			if f.path == "" {
				ps.add(f.key, "required when TLS is configured (mutual TLS needs cert_file, key_file and ca_file)")
				continue
			}
			if _, err := os.Stat(f.path); err != nil {
				ps.add(f.key, "cannot read %s: %v", f.path, unwrapPathErr(err))
			}
		}
	}
	if a.Raft.Bind != "" && a.API.Listen != "" {
		ps = append(ps, ExposureProblems(a.Raft.Bind, a.API.Listen, t.Enabled(), a.API.Tokens.Read != "", a.Insecure, a.API.InsecureOpenReads)...)
	}
	for i, d := range a.SecretDirs {
		if !filepath.IsAbs(d) {
			ps.add(fmt.Sprintf("agent.secret_dirs[%d]", i), "%q must be an absolute path", d)
		}
	}
	if a.History.AuditMax < 100 {
		ps.add("agent.history.audit_max", "%d is too small: keep at least 100 audit entries", a.History.AuditMax)
	}
	if a.History.StepsMax < 10 {
		ps.add("agent.history.steps_max", "%d is too small: keep at least 10 steps per plan", a.History.StepsMax)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		ps.add("log.level", "%q is not a level (debug, info, warn, error)", c.Log.Level)
	}
	switch c.Log.Format {
	case "console", "json":
	default:
		ps.add("log.format", "%q is not a format (console, json)", c.Log.Format)
	}
	planNames := map[string]bool{}
	for i, p := range c.Plans {
		key := fmt.Sprintf("plans[%d]", i)
		if !nameRE.MatchString(p.Name) {
			ps.add(key+".name", "%q is not a valid name: use 1-32 lowercase letters, digits, '-' or '_', starting with a letter", p.Name)
		} else if planNames[p.Name] {
			ps.add(key+".name", "plan %q is defined twice", p.Name)
		}
		planNames[p.Name] = true
		p.validate(&ps, key)
	}
	return ps
}

func (p *Plan) validate(ps *problems, key string) {
	if len(p.Pairs) == 0 {
		ps.add(key+".pairs", "a plan needs at least one blue/green pair")
	}
	pairNames := map[string]bool{}
	dsns := map[string]string{}
	for i, pair := range p.Pairs {
		pk := fmt.Sprintf("%s.pairs[%d]", key, i)
		if !nameRE.MatchString(pair.Name) {
			ps.add(pk+".name", "%q is not a valid name: use 1-32 lowercase letters, digits, '-' or '_', starting with a letter", pair.Name)
		} else if pairNames[pair.Name] {
			ps.add(pk+".name", "pair %q is defined twice in this plan", pair.Name)
		}
		pairNames[pair.Name] = true
		switch pair.Engine {
		case Postgres, MySQL, Redis:
		case "":
			ps.add(pk+".engine", "required: postgres, mysql or redis")
		default:
			ps.add(pk+".engine", "%q is not supported (postgres, mysql or redis; use mysql for MariaDB)", string(pair.Engine))
		}
		for _, side := range []struct {
			name string
			dsn  DSN
		}{{"blue", pair.Blue.DSN}, {"green", pair.Green.DSN}} {
			dk := pk + "." + side.name + ".dsn"
			if side.dsn == "" {
				ps.add(dk, "required")
				continue
			}
			if err := CheckDSN(pair.Engine, side.dsn.Reveal()); err != nil {
				ps.add(dk, "%v", err)
			}
			if other, dup := dsns[side.dsn.Reveal()]; dup {
				ps.add(dk, "same database as %s: blue and green must be different databases", other)
			}
			dsns[side.dsn.Reveal()] = dk
		}
		if pair.Engine == Redis && (len(pair.Scope.Tables) > 0 || len(pair.Scope.Schemas) > 0) {
			ps.add(pk+".scope", "redis pairs have no tables or schemas: leave scope out")
		}
		if pair.Engine == Redis && len(pair.FenceRoles) > 0 {
			ps.add(pk+".fence_roles", "redis pairs are fenced with CLIENT PAUSE WRITE: leave fence_roles out")
		}
		for j, tbl := range pair.Scope.Tables {
			if !validTableName(tbl) {
				ps.add(fmt.Sprintf("%s.scope.tables[%d]", pk, j), "%q is not a table name (use table or schema.table; quote parts with other characters: public.\"Orders\")", tbl)
			}
		}
		for j, tbl := range pair.Scope.ExcludeTables {
			if !validTableName(tbl) {
				ps.add(fmt.Sprintf("%s.scope.exclude_tables[%d]", pk, j), "%q is not a table name (use table or schema.table; quote parts with other characters: public.\"Orders\")", tbl)
			}
		}
	}
	if p.Lag.MaxBytes < 0 {
		ps.add(key+".lag.max_bytes", "must not be negative")
	}
	if p.Lag.MaxDelay < 0 {
		ps.add(key+".lag.max_delay", "must be positive")
	}
	if p.Lag.Hold < 0 {
		ps.add(key+".lag.hold", "must not be negative")
	}
	w := p.Fence.MaxFenceWindow.D()
	switch {
	case w <= 0:
		ps.add(key+".fence.max_fence_window", "must be positive")
	case w < 100*time.Millisecond:
		ps.add(key+".fence.max_fence_window", "%s is too short to drain and prove catch-up: use at least 100ms", w)
	case w > 10*time.Minute:
		ps.add(key+".fence.max_fence_window", "%s is longer than 10m: a write outage that long is not a cutover", w)
	}
	if g := p.Fence.DrainGrace.D(); g < 0 {
		ps.add(key+".fence.drain_grace", "must not be negative")
	} else if w > 0 && g >= w {
		ps.add(key+".fence.drain_grace", "%s must be shorter than max_fence_window (%s), which also has to fit catch-up and verification", g, w)
	}
	switch p.Fence.Green {
	case "", GreenFenceAuto, GreenFenceLogins, GreenFenceGrants:
	default:
		ps.add(key+".fence.green", "%q is not one of auto, logins, grants", p.Fence.Green)
	}
	switch p.Fence.Blue {
	case "", BlueFenceAuto, BlueFenceProxy, BlueFenceGrants:
	default:
		ps.add(key+".fence.blue", "%q is not one of auto, proxy, grants", p.Fence.Blue)
	}
	if p.Verify.ChunkTime <= 0 {
		ps.add(key+".verify.chunk_time", "must be positive")
	}
	if p.Verify.Parallel < 1 || p.Verify.Parallel > 64 {
		ps.add(key+".verify.parallel", "%d is out of range (1-64)", p.Verify.Parallel)
	}
	if p.Verify.MaxRowsPerSecond < 0 {
		ps.add(key+".verify.max_rows_per_second", "must not be negative (0 means unlimited)")
	}
	for i, t := range p.Switch.Targets {
		t.validate(ps, fmt.Sprintf("%s.switch.targets[%d]", key, i))
	}
	rb := p.Rollback
	if rb.Window < 0 {
		ps.add(key+".rollback.window", "must not be negative")
	}
	if rb.Watch < 0 || (rb.Window > 0 && rb.Watch > rb.Window) {
		ps.add(key+".rollback.watch", "%s must be between 0 and rollback.window (%s): a rollback needs the reverse stream", rb.Watch.D(), rb.Window.D())
	}
	if rb.Interval <= 0 {
		ps.add(key+".rollback.interval", "must be positive")
	}
	if rb.Failures < 1 {
		ps.add(key+".rollback.failures", "must be at least 1")
	}
	for i, c := range rb.Checks {
		ck := fmt.Sprintf("%s.rollback.checks[%d]", key, i)
		switch c.Type {
		case "http":
			if c.URL == "" {
				ps.add(ck+".url", "required for an http check")
			} else {
				checkURL(ps, ck+".url", c.URL)
			}
			if c.Status != 0 && (c.Status < 100 || c.Status > 599) {
				ps.add(ck+".status", "%d is not an HTTP status", c.Status)
			}
		case "query":
			if c.DSN == "" {
				ps.add(ck+".dsn", "required for a query check")
			} else if err := CheckDSN(Postgres, c.DSN.Reveal()); err != nil {
				ps.add(ck+".dsn", "%v", err)
			}
			if strings.TrimSpace(c.Query) == "" {
				ps.add(ck+".query", "required for a query check: a SELECT returning one number")
			}
		case "":
			ps.add(ck+".type", "required: http or query")
		default:
			ps.add(ck+".type", "%q is not a check type (http or query)", c.Type)
		}
	}
}

func (t *Target) validate(ps *problems, key string) {
	switch t.Type {
	case TargetRedis:
		if t.DSN == "" {
			ps.add(key+".dsn", "required for a redis target (redis://host:port/db)")
		} else if err := CheckDSN(Redis, t.DSN.Reveal()); err != nil {
			ps.add(key+".dsn", "%v", err)
		}
	case TargetWebhook:
		if t.URL == "" {
			ps.add(key+".url", "required for a webhook target")
		} else {
			checkURL(ps, key+".url", t.URL)
		}
	case TargetCommand:
		if len(t.Command) == 0 || t.Command[0] == "" {
			ps.add(key+".command", "required for a command target: the program and its arguments as a list")
		}
		for i, name := range t.EnvAllow {
			if !envNameRE.MatchString(name) {
				ps.add(fmt.Sprintf("%s.env_allow[%d]", key, i), "%q is not an environment variable name", name)
			}
		}
	case TargetPgBouncer:
		if t.DSN == "" {
			ps.add(key+".dsn", "required for a pgbouncer target: the admin console, postgres://ADMIN_USER:PASSWORD@HOST:PORT/pgbouncer")
		} else if err := CheckDSN(Postgres, t.DSN.Reveal()); err != nil {
			ps.add(key+".dsn", "%v", err)
		}
		if t.Database == "" {
			ps.add(key+".database", "required for a pgbouncer target: the [databases] entry the application connects to")
		}
		if t.DatabasesFile == "" {
			ps.add(key+".databases_file", "required for a pgbouncer target: the absolute path of the file pgbouncer.ini %%includes that holds the entry")
		}
		if t.Blue == "" || t.Green == "" {
			ps.add(key+".blue", "blue and green are required for a pgbouncer target: the entry's connect string for each side (host=... port=... dbname=...)")
		}
		if t.PauseTimeout < 0 {
			ps.add(key+".pause_timeout", "must not be negative")
		}
	case "":
		ps.add(key+".type", "required: redis, webhook, command or pgbouncer")
	default:
		ps.add(key+".type", "%q is not a target type (redis, webhook, command or pgbouncer)", string(t.Type))
	}
	if t.Timeout <= 0 {
		ps.add(key+".timeout", "must be positive")
	}
	if t.Retries < 0 || t.Retries > 20 {
		ps.add(key+".retries", "%d is out of range (0-20)", t.Retries)
	}
}

var envNameRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// tableRE is table or schema.table; a part in double quotes may hold any
// character, with "" for a quote (internal/pgscope reads it).
var tableRE = regexp.MustCompile(`^` + tablePart + `(\.` + tablePart + `)?$`)

const tablePart = `(?:[A-Za-z_][A-Za-z0-9_$]*|"(?:[^"]|"")+")`

func validTableName(s string) bool { return tableRE.MatchString(s) }

func checkHostPort(ps *problems, key, addr string, listen bool) {
	if addr == "" {
		ps.add(key, "required (host:port)")
		return
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		ps.add(key, "%q is not host:port", addr)
		return
	}
	if host == "" && !listen {
		ps.add(key, "%q has no host", addr)
	}
	var n int
	if _, err := fmt.Sscanf(port, "%d", &n); err != nil || n < 1 || n > 65535 || fmt.Sprint(n) != port {
		ps.add(key, "port %q is not a number between 1 and 65535", port)
	}
}

func checkURL(ps *problems, key, raw string) {
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		ps.add(key, "%q is not an http(s) URL", redact.Text(raw))
	}
}

func unwrapPathErr(err error) error {
	if pe, ok := err.(*os.PathError); ok {
		return pe.Err
	}
	return err
}

// CheckDSN reports whether dsn is a well-formed connection string for the
// engine. The error never contains the password.
func CheckDSN(engine Engine, dsn string) error {
	switch engine {
	case MySQL:
		if _, err := ParseMySQLDSN(dsn); err != nil {
			return err
		}
	case Postgres, Redis:
		s, ok := dsnSyntaxOf(engine)
		if !ok {
			return fmt.Errorf("cannot read a %s DSN: %s", engine, noSyntax)
		}
		return s.Check(dsn)
	}
	return nil
}

// DSNSyntax reads one engine's connection strings with its client's own
// parser. Check's error never contains the password; Password is "" when
// there is none or dsn does not parse.
type DSNSyntax struct {
	Check    func(dsn string) error
	Password func(dsn string) string
}

// The readers of the engines whose clients this package does not link
// (PostgreSQL, Redis), installed by internal/dsnsyntax/register: so that
// what depends on config (the agent, the plan driver) links no client.
var (
	dsnSyntaxMu sync.RWMutex
	dsnSyntaxes = map[Engine]DSNSyntax{}
)

const noSyntax = "no reader installed for it (a binary or test that validates configurations imports internal/dsnsyntax/register)"

// RegisterDSNSyntax installs the reader of an engine's connection strings.
func RegisterDSNSyntax(e Engine, s DSNSyntax) {
	dsnSyntaxMu.Lock()
	defer dsnSyntaxMu.Unlock()
	dsnSyntaxes[e] = s
}

func dsnSyntaxOf(e Engine) (DSNSyntax, bool) {
	dsnSyntaxMu.RLock()
	defer dsnSyntaxMu.RUnlock()
	s, ok := dsnSyntaxes[e]
	return s, ok
}

// MySQLDSN is a parsed MySQL/MariaDB connection string.
type MySQLDSN struct {
	Addr     string
	User     string
	Password redact.Secret
	DB       string
	Params   map[string]string
}

// ParseMySQLDSN accepts the go-sql-driver form user:pass@tcp(host:port)/db
// and the URL form mysql://user:pass@host:port/db.
func ParseMySQLDSN(dsn string) (*MySQLDSN, error) {
	if rest, ok := strings.CutPrefix(dsn, "mysql://"); ok {
		u, err := url.Parse("mysql://" + rest)
		if err != nil {
			return nil, fmt.Errorf("not a valid MySQL URL: %s", scrubDSNError(err, dsn))
		}
		pw, _ := u.User.Password()
		out := &MySQLDSN{Addr: u.Host, User: u.User.Username(), Password: redact.Secret(pw), DB: strings.TrimPrefix(u.Path, "/"), Params: map[string]string{}}
		for k, v := range u.Query() {
			out.Params[k] = v[0]
		}
		if u.Port() == "" && out.Addr != "" {
			out.Addr = net.JoinHostPort(u.Hostname(), "3306")
		}
		return out, out.check()
	}
	if at := strings.LastIndex(dsn, "@"); at >= 0 {
		if rest := dsn[at+1:]; !strings.HasPrefix(rest, "/") && !strings.Contains(rest, "(") {
			return nil, fmt.Errorf("not a valid MySQL DSN: write the address as tcp(host:port), e.g. user:password@tcp(127.0.0.1:3306)/db")
		}
	}
	cfg, err := mysqldriver.ParseDSN(dsn)
	if err != nil {
		return nil, fmt.Errorf("not a valid MySQL DSN (user:password@tcp(host:port)/db or mysql://user:password@host:port/db): %s", scrubDSNError(err, dsn))
	}
	out := &MySQLDSN{Addr: cfg.Addr, User: cfg.User, Password: redact.Secret(cfg.Passwd), DB: cfg.DBName, Params: cfg.Params}
	if cfg.Net != "tcp" {
		return nil, fmt.Errorf("MySQL DSN uses %q: only tcp(host:port) is supported", cfg.Net)
	}
	return out, out.check()
}

func (d *MySQLDSN) check() error {
	if d.Addr == "" {
		return fmt.Errorf("MySQL DSN names no host")
	}
	if d.User == "" {
		return fmt.Errorf("MySQL DSN names no user")
	}
	return nil
}

func scrubDSNError(err error, dsn string) string {
	msg := err.Error()
	msg = strings.ReplaceAll(msg, dsn, "<dsn>")
	return redact.Text(msg)
}

// secrets lists every secret value in the configuration, for log redaction.
func (c *Config) secrets(getenv func(string) (string, bool)) []string {
	var out []string
	for _, s := range []string{c.Agent.API.Tokens.Operator.Reveal(), c.Agent.API.Tokens.Read.Reveal()} {
		if s != "" {
			out = append(out, s)
		}
	}
	for _, p := range c.Plans {
		out = append(out, p.Secrets(getenv)...)
	}
	return out
}

func dsnPassword(engine Engine, dsn string) string {
	if dsn == "" {
		return ""
	}
	switch engine {
	case MySQL:
		if d, err := ParseMySQLDSN(dsn); err == nil {
			return d.Password.Reveal()
		}
	case Postgres, Redis:
		s, ok := dsnSyntaxOf(engine)
		if !ok {
			// A programming error: a secret would go unredacted.
			panic(fmt.Sprintf("config: cannot read the password of a %s DSN: %s", engine, noSyntax))
		}
		return s.Password(dsn)
	}
	return ""
}

// Plan returns the plan with the given name.
func (c *Config) Plan(name string) (*Plan, bool) {
	for i := range c.Plans {
		if c.Plans[i].Name == name {
			return &c.Plans[i], true
		}
	}
	return nil, false
}

// Pair returns the pair with the given name.
func (p *Plan) Pair(name string) (*Pair, bool) {
	for i := range p.Pairs {
		if p.Pairs[i].Name == name {
			return &p.Pairs[i], true
		}
	}
	return nil, false
}
