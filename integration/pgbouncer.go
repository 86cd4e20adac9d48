package integration

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// PgBouncerOptions configures StartPgBouncer.
type PgBouncerOptions struct {
	// Databases are the [databases] entries, name -> connect string (e.g.
	// Postgres.PgBouncerEntry), written to DatabasesFile, which
	// pgbouncer.ini %includes: the file a pgbouncer flip target rewrites.
	Databases map[string]string
	// Users are the client users and their passwords (auth_file, in plain
	// text: a throwaway instance). The admin user is added to them.
	Users map[string]string
	// PoolMode is pool_mode; default "transaction" (PAUSE waits for
	// transactions, not sessions, to end).
	PoolMode string
	// Settings are more [pgbouncer] settings; they override the defaults.
	Settings map[string]string
}

// PgBouncer is a running throwaway PgBouncer. Clients authenticate with
// SCRAM against the plain-text auth_file; the admin console is the
// database "pgbouncer" for AdminUser.
type PgBouncer struct {
	Port            int
	Dir             string // removed by Stop
	LogFile         string
	ConfigFile      string // pgbouncer.ini
	DatabasesFile   string // its %include'd [databases] section
	AdminUser       string
	AdminPassword   string
	StartupDuration time.Duration

	srv server
}

// The admin user of every harness PgBouncer.
const (
	pgbouncerAdminUser     = "cutover_admin"
	pgbouncerAdminPassword = "cutover-admin-pw"
)

// StartPgBouncer starts pgbouncer on a free loopback port and returns
// once its admin console answers. It runs as the system user "postgres"
// when the caller is root (pgbouncer refuses root; the Debian package
// pgbouncer depends on postgresql-common, which creates that user). The
// caller must call Stop.
func StartPgBouncer(ctx context.Context, opts PgBouncerOptions) (*PgBouncer, error) {
	begin := time.Now()
	bin, err := findBinary("pgbouncer", "pgbouncer")
	if err != nil {
		return nil, fmt.Errorf("start pgbouncer: %w", err)
	}
	as, err := serverAccount("postgres", "pgbouncer", false)
	if err != nil {
		return nil, fmt.Errorf("start pgbouncer: %w", err)
	}
	dir, err := makeInstanceDir("pgbouncer", as)
	if err != nil {
		return nil, fmt.Errorf("start pgbouncer: %w", err)
	}
	b := &PgBouncer{
		Dir:           dir,
		LogFile:       filepath.Join(dir, "pgbouncer.log"),
		ConfigFile:    filepath.Join(dir, "pgbouncer.ini"),
		DatabasesFile: filepath.Join(dir, "databases.ini"),
		AdminUser:     pgbouncerAdminUser,
		AdminPassword: pgbouncerAdminPassword,
		srv:           server{dir: dir, logPath: filepath.Join(dir, "pgbouncer.log")},
	}
	if opts.PoolMode == "" {
		opts.PoolMode = "transaction"
	}
	err = withPortRetry(func(port int) error {
		b.Port = port
		if err := b.writeFiles(as, opts); err != nil {
			return err
		}
		return b.srv.launch(ctx, procSpec{
			path:     bin,
			args:     []string{b.ConfigFile},
			dir:      dir,
			as:       as,
			deathSig: syscall.SIGKILL, // no state worth a clean shutdown
		}, b.ping)
	})
	if err != nil {
		b.srv.stop(context.Background())
		return nil, fmt.Errorf("start pgbouncer: %w", err)
	}
	b.StartupDuration = time.Since(begin)
	return b, nil
}

func (b *PgBouncer) writeFiles(as account, opts PgBouncerOptions) error {
	settings := map[string]string{
		"listen_addr":       "127.0.0.1",
		"listen_port":       strconv.Itoa(b.Port),
		"unix_socket_dir":   "",
		"auth_type":         "scram-sha-256",
		"auth_file":         filepath.Join(b.Dir, "userlist.txt"),
		"admin_users":       b.AdminUser,
		"pool_mode":         opts.PoolMode,
		"max_client_conn":   "500",
		"default_pool_size": "40",
		// Clients held by a PAUSE wait at most this long (the default,
		// 120 s, would hide a pool left paused).
		"query_wait_timeout": "30",
		// A server login cut short by PAUSE counts as a failed login, after
		// which PgBouncer waits server_login_retry (default 15 s) before
		// it connects again: the held clients would stall that long.
		"server_login_retry": "0.1",
		"server_lifetime":    "3600",
		"logfile":            "",
		"pidfile":            "",
		"log_connections":    "0",
		"log_disconnections": "0",
	}
	for k, v := range opts.Settings {
		settings[k] = v
	}
	var ini strings.Builder
	ini.WriteString("; cutover integration harness\n[databases]\n%include " + b.DatabasesFile + "\n\n[pgbouncer]\n")
	for _, k := range sortedKeys(settings) {
		fmt.Fprintf(&ini, "%s = %s\n", k, settings[k])
	}
	var dbs strings.Builder
	for _, name := range sortedKeys(opts.Databases) {
		fmt.Fprintf(&dbs, "%s = %s\n", name, opts.Databases[name])
	}
	users := map[string]string{b.AdminUser: b.AdminPassword}
	for u, p := range opts.Users {
		users[u] = p
	}
	var ul strings.Builder
	for _, u := range sortedKeys(users) {
		fmt.Fprintf(&ul, "%q %q\n", u, users[u])
	}
	for path, content := range map[string]string{
		b.ConfigFile:                         ini.String(),
		b.DatabasesFile:                      dbs.String(),
		filepath.Join(b.Dir, "userlist.txt"): ul.String(),
	} {
		// 0644 for the databases file: a flip target running as another
		// user rewrites it and keeps its mode.
		mode := os.FileMode(0o600)
		if path == b.DatabasesFile {
			mode = 0o644
		}
		if err := os.WriteFile(path, []byte(content), mode); err != nil {
			return err
		}
		if err := as.chown(path); err != nil {
			return err
		}
	}
	return nil
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func (b *PgBouncer) ping(ctx context.Context) error {
	conn, err := pgconn.Connect(ctx, b.AdminDSN())
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	_, err = conn.Exec(ctx, "SHOW VERSION").ReadAll()
	return err
}

// Addr returns host:port.
func (b *PgBouncer) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(b.Port)) }

// AdminDSN is a URL for the admin console (database "pgbouncer"). The
// console speaks the simple query protocol only.
func (b *PgBouncer) AdminDSN() string { return b.DSNFor("pgbouncer", b.AdminUser, b.AdminPassword) }

// DSNFor returns a URL for user on the pooled database db.
func (b *PgBouncer) DSNFor(db, user, password string) string {
	u := url.URL{Scheme: "postgres", User: url.UserPassword(user, password), Host: b.Addr(), Path: "/" + db, RawQuery: "sslmode=disable"}
	return u.String()
}

// Admin runs one command on the admin console over a fresh connection.
func (b *PgBouncer) Admin(ctx context.Context, command string) ([]*pgconn.Result, error) {
	conn, err := pgconn.Connect(ctx, b.AdminDSN())
	if err != nil {
		return nil, err
	}
	defer conn.Close(context.Background())
	return conn.Exec(ctx, command).ReadAll()
}

// Stop kills pgbouncer, waits for it and removes b.Dir. Idempotent.
func (b *PgBouncer) Stop(ctx context.Context) error { return b.srv.stop(ctx) }

// PgBouncerEntry is the [databases] connect string that sends a
// PgBouncer's clients of db to p over its Unix socket (trust for every
// role: the client's own credentials are checked by PgBouncer).
func (p *Postgres) PgBouncerEntry(db string) string {
	return fmt.Sprintf("host=%s port=%d dbname=%s", p.SocketDir, p.Port, db)
}
