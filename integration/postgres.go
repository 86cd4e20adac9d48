package integration

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// PostgresOptions configures StartPostgres. The zero value is ready to use.
type PostgresOptions struct {
	// Database is created at start and named by DSN. Default "cutover".
	Database string
	// Locale is initdb's --locale: it sets lc_collate, lc_ctype and the
	// other lc_* of the cluster. Default "C".
	Locale string
	// Encoding is initdb's --encoding. Default "UTF8".
	Encoding string
	// Settings are server settings (GUCs) such as "TimeZone",
	// "extra_float_digits" or "DateStyle". They are written to a
	// configuration file included at the end of postgresql.conf, so they
	// override the defaults below and ALTER SYSTEM still overrides them.
	Settings map[string]string
}

// postgresDefaults are the settings every instance starts with, before
// PostgresOptions.Settings. fsync=off and full_page_writes=off trade crash
// safety, which a throwaway server does not need, for speed.
// synchronous_commit stays on: with fsync off a commit's flush is nearly
// free, and with it off walsenders would stream a commit only after the
// WAL writer's next round (up to 3 x wal_writer_delay), adding lag that
// the replication tests and benchmarks would wrongly blame on us.
var postgresDefaults = map[string]string{
	"wal_level":             "logical",
	"max_replication_slots": "32",
	"max_wal_senders":       "32",
	"fsync":                 "off",
	"full_page_writes":      "off",
}

// pgHBA is the pg_hba.conf of every instance; only loopback is reachable.
//   - Unix socket (Postgres.SocketDir): every role, no password.
//   - TCP as the superuser postgres: no password (DSN).
//   - Physical replication connections (the "replication" keyword): no
//     password for any role; the REPLICATION attribute is still checked.
//   - TCP as any other role, including logical replication connections
//     (replication=database matches the "all" database, not
//     "replication"): the role's password (scram-sha-256). Create
//     application roles WITH PASSWORD; a wrong or missing password fails
//     authentication, and a role without REPLICATION that authenticates is
//     refused by the walsender, not by this file.
const pgHBA = `# cutover integration harness: loopback only
local   all          all                     trust
host    all          postgres   127.0.0.1/32 trust
host    replication  all        127.0.0.1/32 trust
host    all          all        127.0.0.1/32 scram-sha-256
`

// postgresInclude is appended to the template's postgresql.conf; each
// instance writes its settings (port included) into postgresInstanceConf.
const (
	postgresInstanceConf = "cutover.conf"
	postgresInclude      = "\n# cutover integration harness\ninclude_if_exists = '" + postgresInstanceConf + "'\n"
)

// Postgres is a running throwaway PostgreSQL cluster. Its superuser is
// "postgres" (no password over loopback).
type Postgres struct {
	Host            string // always 127.0.0.1
	Port            int
	Database        string        // created at start, named by DSN
	DataDir         string        // PGDATA
	SocketDir       string        // unix socket directory (trust for every role)
	Dir             string        // temporary directory holding everything; removed by Stop
	LogFile         string        // server log (stderr)
	StartupDuration time.Duration // how long StartPostgres took

	srv  server
	spec procSpec // how the server was launched, for Restart
}

type postgresBins struct{ postgres, initdb string }

// sysidFallbacks counts instances built with initdb because the template
// copy could not get its own system identifier (tests expect none).
var sysidFallbacks atomic.Int64

// StartPostgres starts a PostgreSQL cluster on a free loopback port and
// returns once it accepts connections, or with an error that includes the
// tail of the server log. The cluster has wal_level=logical and room for 32
// replication slots and walsenders; see PostgresOptions for the rest.
// Cancelling ctx aborts the start and removes everything it made. The
// caller must call Stop.
func StartPostgres(ctx context.Context, opts PostgresOptions) (*Postgres, error) {
	begin := time.Now()
	if opts.Database == "" {
		opts.Database = "cutover"
	}
	if opts.Locale == "" {
		opts.Locale = "C"
	}
	if opts.Encoding == "" {
		opts.Encoding = "UTF8"
	}
	var bins postgresBins
	var err error
	if bins.postgres, err = findBinary("postgresql", "postgres"); err != nil {
		return nil, fmt.Errorf("start postgres: %w", err)
	}
	if bins.initdb, err = siblingBinary(bins.postgres, "postgresql", "initdb"); err != nil {
		return nil, fmt.Errorf("start postgres: %w", err)
	}
	as, err := serverAccount("postgres", "postgresql", false)
	if err != nil {
		return nil, fmt.Errorf("start postgres: %w", err)
	}
	dir, err := makeInstanceDir("pg", as)
	if err != nil {
		return nil, fmt.Errorf("start postgres: %w", err)
	}
	p := &Postgres{
		Host:      "127.0.0.1",
		Database:  opts.Database,
		DataDir:   filepath.Join(dir, "data"),
		SocketDir: dir,
		Dir:       dir,
		LogFile:   filepath.Join(dir, "postgres.log"),
		srv:       server{dir: dir, logPath: filepath.Join(dir, "postgres.log")},
	}
	if err := p.start(ctx, bins, as, opts); err != nil {
		p.srv.stop(context.Background())
		return nil, fmt.Errorf("start postgres: %w", err)
	}
	p.StartupDuration = time.Since(begin)
	return p, nil
}

func (p *Postgres) start(ctx context.Context, bins postgresBins, as account, opts PostgresOptions) error {
	key := []string{binaryKey(bins.postgres), binaryKey(bins.initdb), as.name, opts.Database, opts.Locale, opts.Encoding}
	tpl, err := cachedTemplate(ctx, "pg", key, as, func(ctx context.Context, dir string) error {
		return initPostgres(ctx, bins, as, opts, dir)
	})
	if err != nil {
		return err
	}
	if err := copyTree(filepath.Join(tpl, "data"), p.DataDir, as); err != nil {
		return fmt.Errorf("copy template: %w", err)
	}
	if err := setSystemIdentifier(p.DataDir, newSystemIdentifier()); err != nil {
		// Unknown layout: build this one from scratch instead.
		sysidFallbacks.Add(1)
		if err := os.RemoveAll(p.DataDir); err != nil {
			return err
		}
		if err := initPostgres(ctx, bins, as, opts, p.Dir); err != nil {
			return err
		}
	}
	return withPortRetry(func(port int) error {
		p.Port = port
		if err := p.writeConf(as, opts.Settings); err != nil {
			return err
		}
		p.spec = procSpec{
			path:     bins.postgres,
			args:     []string{"-D", p.DataDir},
			dir:      p.Dir,
			as:       as,
			deathSig: syscall.SIGQUIT, // immediate shutdown; unlike SIGKILL it releases shared memory
		}
		return p.srv.launch(ctx, p.spec, p.ping)
	})
}

// Restart stops the server at once (an immediate shutdown, as after a
// crash: the next start runs crash recovery), waits down, and starts it
// again on the same port and data directory: every session is cut, what
// was committed (replication slots included) survives. The fault suite
// uses it; not to be called concurrently with Stop.
func (p *Postgres) Restart(ctx context.Context, down time.Duration) error {
	if p.srv.proc == nil {
		return errors.New("restart postgres: not running")
	}
	p.srv.proc.stop(ctx, syscall.SIGQUIT)
	select {
	case <-time.After(down):
	case <-ctx.Done():
		return ctx.Err()
	}
	if err := p.srv.launch(ctx, p.spec, p.ping); err != nil {
		return fmt.Errorf("restart postgres: %w", err)
	}
	return nil
}

// initPostgres runs initdb into dir/data, installs pg_hba.conf and the
// include of the per-instance settings, and creates the database.
func initPostgres(ctx context.Context, bins postgresBins, as account, opts PostgresOptions, dir string) error {
	data := filepath.Join(dir, "data")
	logPath := filepath.Join(dir, "initdb.log")
	err := runToEnd(ctx, procSpec{
		path: bins.initdb,
		args: []string{"-D", data, "-U", "postgres", "-A", "trust", "--no-sync", "--no-instructions",
			"--locale=" + opts.Locale, "--encoding=" + opts.Encoding},
		dir:      dir,
		as:       as,
		deathSig: syscall.SIGKILL,
	}, logPath)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(data, "pg_hba.conf"), []byte(pgHBA), 0o600); err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(data, "postgresql.conf"), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString(postgresInclude)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if opts.Database == "postgres" {
		return nil
	}
	// Single-user mode: no port, no readiness wait. exit_on_error turns a
	// failed statement into a non-zero exit.
	return runToEnd(ctx, procSpec{
		path:     bins.postgres,
		args:     []string{"--single", "-F", "-D", data, "-c", "exit_on_error=on", "postgres"},
		dir:      dir,
		stdin:    strings.NewReader("CREATE DATABASE " + pgx.Identifier{opts.Database}.Sanitize() + "\n"),
		as:       as,
		deathSig: syscall.SIGTERM, // lets the backend release shared memory
	}, logPath)
}

// writeConf writes the instance's settings: defaults, then opts.Settings.
func (p *Postgres) writeConf(as account, extra map[string]string) error {
	settings := map[string]string{
		"listen_addresses":        "127.0.0.1",
		"port":                    strconv.Itoa(p.Port),
		"unix_socket_directories": p.SocketDir,
	}
	for k, v := range postgresDefaults {
		settings[k] = v
	}
	for k, v := range extra {
		settings[k] = v
	}
	keys := make([]string, 0, len(settings))
	for k := range settings {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%s = '%s'\n", k, strings.ReplaceAll(settings[k], "'", "''"))
	}
	path := filepath.Join(p.DataDir, postgresInstanceConf)
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		return err
	}
	return as.chown(path)
}

func (p *Postgres) ping(ctx context.Context) error {
	conn, err := pgx.Connect(ctx, p.DSN())
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	var one int
	return conn.QueryRow(ctx, "SELECT 1").Scan(&one)
}

// DSN returns a URL for the superuser postgres on the database
// p.Database, e.g. postgres://postgres@127.0.0.1:41234/cutover?sslmode=disable.
func (p *Postgres) DSN() string { return p.DSNFor(p.Database, "postgres", "") }

// DSNFor returns a URL for user (with password, if not empty) on db. Roles
// other than postgres need a password over TCP (see StartPostgres).
func (p *Postgres) DSNFor(db, user, password string) string {
	u := url.URL{
		Scheme:   "postgres",
		User:     url.User(user),
		Host:     p.Host + ":" + strconv.Itoa(p.Port),
		Path:     "/" + db,
		RawQuery: "sslmode=disable",
	}
	if password != "" {
		u.User = url.UserPassword(user, password)
	}
	return u.String()
}

// Exec runs sql (several statements are fine when there are no args) as
// the superuser on p.Database over a fresh connection. It is meant for test
// setup.
func (p *Postgres) Exec(ctx context.Context, sql string, args ...any) error {
	conn, err := pgx.Connect(ctx, p.DSN())
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	_, err = conn.Exec(ctx, sql, args...)
	return err
}

// Stop shuts the cluster down (SIGQUIT to the postmaster: immediate
// shutdown, which ends every backend and releases shared memory; SIGKILL
// to its process group after 10 s or when ctx ends), waits for it and
// removes p.Dir. Backends run in process groups of their own (PostgreSQL
// calls setsid in each): the postmaster ends them before it exits, and if
// it was killed they exit on noticing its death. It is idempotent
// and safe to call concurrently; later calls return the first call's
// result.
func (p *Postgres) Stop(ctx context.Context) error { return p.srv.stop(ctx) }
