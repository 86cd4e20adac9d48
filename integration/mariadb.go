package integration

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/go-mysql-org/go-mysql/client"
)

// MariaDBOptions configures StartMariaDB. The zero value is ready to use.
type MariaDBOptions struct {
	// Database is created at start and named by DSN. Default "cutover".
	Database string
	// ServerID is the server_id. Default: one unique in this process
	// (counting up from a random base, so different processes rarely
	// collide).
	ServerID uint32
	// Settings are server options, passed as --name=value after the
	// defaults, so they override them. Options fixed when the data
	// directory is made (innodb_page_size, lower_case_table_names, ...)
	// cannot be changed here.
	Settings map[string]string
}

// mariadbLogFileSize is innodb_log_file_size, both at install and at run
// time (a mismatch would make every start resize the redo log).
const mariadbLogFileSize = "16M"

// mariadbDefaults are the options every instance runs with, before
// MariaDBOptions.Settings. The binlog is what replication reads: row
// format, full images, GTIDs in strict mode. innodb_flush_log_at_trx_commit=2
// and no doublewrite buffer trade crash safety, which a throwaway server
// does not need, for speed; the binlog is written at commit as usual.
var mariadbDefaults = map[string]string{
	"log-bin":                        "mysql-bin",
	"binlog-format":                  "ROW",
	"binlog-row-image":               "FULL",
	"gtid-strict-mode":               "ON",
	"log-slave-updates":              "ON",
	"character-set-server":           "utf8mb4",
	"skip-name-resolve":              "ON",
	"innodb-log-file-size":           mariadbLogFileSize,
	"innodb-flush-log-at-trx-commit": "2",
	"innodb-doublewrite":             "0",
	"innodb-temp-data-file-path":     "ibtmp1:1M:autoextend", // default 12M, written in full at every start
}

// MariaDB is a running throwaway MariaDB server. Its user root has no
// password over loopback TCP and all privileges.
type MariaDB struct {
	Port            int
	Database        string // created at start, named by DSN
	ServerID        uint32
	DataDir         string
	SocketPath      string
	Dir             string        // temporary directory holding everything; removed by Stop
	LogFile         string        // server error log (stderr)
	StartupDuration time.Duration // how long StartMariaDB took

	srv server
}

type mariadbBins struct{ server, install string }

var serverIDs struct {
	once sync.Once
	next atomic.Uint32
}

func nextServerID() uint32 {
	serverIDs.once.Do(func() { serverIDs.next.Store(1000 + rand.Uint32N(1<<30)) })
	return serverIDs.next.Add(1)
}

// StartMariaDB starts a MariaDB server on a free loopback port with the
// binary log on (ROW, full row images, GTID strict mode) and returns once
// it accepts connections, or with an error that includes the tail of the
// server log. Cancelling ctx aborts the start and removes everything it
// made. The caller must call Stop.
func StartMariaDB(ctx context.Context, opts MariaDBOptions) (*MariaDB, error) {
	begin := time.Now()
	if opts.Database == "" {
		opts.Database = "cutover"
	}
	if opts.ServerID == 0 {
		opts.ServerID = nextServerID()
	}
	var bins mariadbBins
	var err error
	if bins.server, err = findBinary("mariadb-server", "mariadbd", "mysqld"); err != nil {
		return nil, fmt.Errorf("start mariadb: %w", err)
	}
	if bins.install, err = findBinary("mariadb-server", "mariadb-install-db", "mysql_install_db"); err != nil {
		return nil, fmt.Errorf("start mariadb: %w", err)
	}
	as, err := serverAccount("mysql", "mariadb-server", false)
	if err != nil {
		return nil, fmt.Errorf("start mariadb: %w", err)
	}
	dir, err := makeInstanceDir("mariadb", as)
	if err != nil {
		return nil, fmt.Errorf("start mariadb: %w", err)
	}
	m := &MariaDB{
		Database:   opts.Database,
		ServerID:   opts.ServerID,
		DataDir:    filepath.Join(dir, "data"),
		SocketPath: filepath.Join(dir, "mysqld.sock"),
		Dir:        dir,
		LogFile:    filepath.Join(dir, "mariadbd.log"),
		srv:        server{dir: dir, logPath: filepath.Join(dir, "mariadbd.log")},
	}
	if err := m.start(ctx, bins, as, opts); err != nil {
		m.srv.stop(context.Background())
		return nil, fmt.Errorf("start mariadb: %w", err)
	}
	m.StartupDuration = time.Since(begin)
	return m, nil
}

func (m *MariaDB) start(ctx context.Context, bins mariadbBins, as account, opts MariaDBOptions) error {
	key := []string{binaryKey(bins.server), binaryKey(bins.install), as.name, opts.Database, mariadbLogFileSize}
	tpl, err := cachedTemplate(ctx, "mariadb", key, as, func(ctx context.Context, dir string) error {
		return installMariaDB(ctx, bins, as, opts.Database, dir)
	})
	if err != nil {
		return err
	}
	if err := copyTree(filepath.Join(tpl, "data"), m.DataDir, as); err != nil {
		return fmt.Errorf("copy template: %w", err)
	}
	return withPortRetry(func(port int) error {
		m.Port = port
		return m.srv.launch(ctx, procSpec{
			path:     bins.server,
			args:     m.args(opts.Settings),
			dir:      m.Dir,
			as:       as,
			deathSig: syscall.SIGKILL, // nothing outlives the process but files in Dir
		}, m.ping)
	})
}

// installMariaDB runs mariadb-install-db into dir/data and creates the
// database. root@localhost and root@127.0.0.1 get no password.
func installMariaDB(ctx context.Context, bins mariadbBins, as account, db, dir string) error {
	initSQL := filepath.Join(dir, "init.sql")
	sql := "CREATE DATABASE " + quoteMySQLIdent(db) + " CHARACTER SET utf8mb4;\n"
	if err := os.WriteFile(initSQL, []byte(sql), 0o644); err != nil {
		return err
	}
	return runToEnd(ctx, procSpec{
		path: bins.install,
		args: []string{
			"--no-defaults", // must come first; keeps /etc/mysql (the machine's server) out
			"--datadir=" + filepath.Join(dir, "data"),
			"--auth-root-authentication-method=normal",
			"--skip-test-db",
			"--skip-name-resolve",
			"--extra-file=" + initSQL,
			"--innodb-log-file-size=" + mariadbLogFileSize,
		},
		dir:      dir,
		as:       as,
		deathSig: syscall.SIGKILL,
	}, filepath.Join(dir, "install.log"))
}

func (m *MariaDB) args(extra map[string]string) []string {
	args := []string{
		"--no-defaults",
		"--datadir=" + m.DataDir,
		"--port=" + strconv.Itoa(m.Port),
		"--bind-address=127.0.0.1",
		"--socket=" + m.SocketPath,
		"--pid-file=" + filepath.Join(m.Dir, "mariadbd.pid"),
		"--tmpdir=" + m.Dir,
		"--server-id=" + strconv.FormatUint(uint64(m.ServerID), 10),
	}
	keys := make([]string, 0, len(mariadbDefaults))
	for k := range mariadbDefaults {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		args = append(args, "--"+k+"="+mariadbDefaults[k])
	}
	keys = keys[:0]
	for k := range extra {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		args = append(args, "--"+k+"="+extra[k])
	}
	return args
}

// connect opens a go-mysql connection as root to m.Database. ctx bounds the
// dial and, until the connection is returned, the handshake.
func (m *MariaDB) connect(ctx context.Context) (*client.Conn, error) {
	var (
		d  net.Dialer
		mu sync.Mutex
		nc net.Conn // closed when ctx ends during the handshake
	)
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := d.DialContext(ctx, network, addr)
		mu.Lock()
		nc = c
		mu.Unlock()
		return c, err
	}
	stop := context.AfterFunc(ctx, func() {
		mu.Lock()
		defer mu.Unlock()
		if nc != nil {
			nc.Close()
		}
	})
	defer stop()
	return client.ConnectWithDialer(ctx, "tcp", m.Addr(), m.User(), m.Password(), m.Database, dial)
}

func (m *MariaDB) ping(ctx context.Context) error {
	c, err := m.connect(ctx)
	if err != nil {
		return err
	}
	defer quit(c)
	_, err = c.Execute("SELECT 1")
	return err
}

// Exec runs one statement as root on m.Database over a fresh connection;
// args make it a prepared statement. Cancelling ctx closes the connection.
// It is meant for test setup.
func (m *MariaDB) Exec(ctx context.Context, query string, args ...any) error {
	c, err := m.connect(ctx)
	if err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer func() {
		if stop() {
			quit(c)
		}
	}()
	_, err = c.Execute(query, args...)
	return err
}

// quit ends a connection with COM_QUIT, which keeps "Aborted connection"
// warnings out of the server log.
func quit(c *client.Conn) {
	if err := c.Quit(); err != nil {
		c.Close()
	}
}

// Host returns "127.0.0.1".
func (m *MariaDB) Host() string { return "127.0.0.1" }

// Addr returns host:port, the form go-mysql's client and canal take.
func (m *MariaDB) Addr() string { return net.JoinHostPort(m.Host(), strconv.Itoa(m.Port)) }

// User returns "root".
func (m *MariaDB) User() string { return "root" }

// Password returns "" (root has none).
func (m *MariaDB) Password() string { return "" }

// DSN returns a go-sql-driver/mysql DSN for root on m.Database, e.g.
// root@tcp(127.0.0.1:41234)/cutover.
func (m *MariaDB) DSN() string { return m.DSNFor(m.Database, m.User(), m.Password()) }

// DSNFor returns a go-sql-driver/mysql DSN for user (with password, if not
// empty) on db.
func (m *MariaDB) DSNFor(db, user, password string) string {
	cred := user
	if password != "" {
		cred += ":" + password
	}
	return fmt.Sprintf("%s@tcp(%s)/%s", cred, m.Addr(), db)
}

// Stop kills the server (SIGKILL to its process group: a throwaway server
// needs no clean shutdown), waits for it and removes m.Dir. It is
// idempotent and safe to call concurrently; later calls return the first
// call's result.
func (m *MariaDB) Stop(ctx context.Context) error { return m.srv.stop(ctx) }

func quoteMySQLIdent(s string) string {
	return "`" + strings.ReplaceAll(s, "`", "``") + "`"
}
