package pgbouncer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/cutover/cutover/internal/redact"
	"github.com/cutover/cutover/switch/target"
)

// PgBouncer switches the application's pooled database between blue and
// green without errors: within the window it PAUSEs the database's pools
// (in-flight transactions finish, new ones wait in PgBouncer), and at the
// flip it rewrites the database's entry in a file that pgbouncer.ini
// %includes, RELOADs and RESUMEs. Clients see a stall, not an error.
//
// The file holds, above the entry, a comment line with the epoch and the
// colour it was last written with ("; cutover <db> epoch=N colour=C"): a
// lower epoch is refused (target.ErrStaleEpoch), so a deposed leader can neither
// pause nor repoint. The file is rewritten atomically (a temporary file
// renamed over it, with its owner and mode), under an flock of
// <file>.lock; the previous content is kept in <file>.prev. Other lines of
// the file are left as they are.
//
// PAUSE waits for server connections to be released, which in session
// pooling means the clients disconnecting: Warm refuses a pool in session
// mode.
type PgBouncer struct {
	dsn          string
	addr         string
	database     string
	file         string
	entries      map[string]string // colour -> connect string
	pauseTimeout time.Duration
	timeout      time.Duration

	mu   sync.Mutex
	conn *pgconn.PgConn
}

// PgBouncerOptions configure NewPgBouncer.
type PgBouncerOptions struct {
	// AdminDSN connects to the admin console: the database "pgbouncer" as
	// one of admin_users.
	AdminDSN string
	// Database is the [databases] entry the application connects to.
	Database string
	// File is the %include'd file holding that entry.
	File string
	// Blue and Green are the entry's connect strings for each side.
	Blue, Green string
	// PauseTimeout bounds how long PAUSE may wait for in-flight
	// transactions (default 2 s); past it the pool is resumed and the
	// attempt fails.
	PauseTimeout time.Duration
	// Timeout bounds every other admin command (default 10 s).
	Timeout time.Duration
}

// maxLoginRetry is the longest server_login_retry Warm accepts.
const maxLoginRetry = time.Second

// DefaultPauseTimeout bounds PAUSE when the configuration says nothing.
const DefaultPauseTimeout = 2 * time.Second

// NewPgBouncer returns a PgBouncer target; it connects on first use.
func NewPgBouncer(o PgBouncerOptions) (*PgBouncer, error) {
	cfg, err := pgconn.ParseConfig(o.AdminDSN)
	if err != nil {
		return nil, fmt.Errorf("pgbouncer target: admin dsn: %s", redact.Text(err.Error()))
	}
	if cfg.Database != "pgbouncer" {
		return nil, fmt.Errorf("pgbouncer target: the admin dsn must name the database \"pgbouncer\" (the admin console), not %q", cfg.Database)
	}
	if !dbNameRE.MatchString(o.Database) {
		return nil, fmt.Errorf("pgbouncer target: database %q must be a plain [databases] name (letters, digits, _ and -)", o.Database)
	}
	if o.File == "" || !filepath.IsAbs(o.File) {
		return nil, fmt.Errorf("pgbouncer target: databases_file %q must be the absolute path of the file pgbouncer.ini %%includes", o.File)
	}
	for colour, e := range map[string]string{"blue": o.Blue, "green": o.Green} {
		if strings.TrimSpace(e) == "" || strings.ContainsAny(e, "\n\r") {
			return nil, fmt.Errorf("pgbouncer target: the %s entry must be one line of key=value settings (host=... port=... dbname=...)", colour)
		}
		if strings.Contains(strings.ToLower(e), "password") {
			return nil, fmt.Errorf("pgbouncer target: the %s entry holds a password: keep passwords in pgbouncer's auth_file, not in the databases file", colour)
		}
	}
	if o.Blue == o.Green {
		return nil, errors.New("pgbouncer target: the blue and green entries are the same")
	}
	if o.PauseTimeout <= 0 {
		o.PauseTimeout = DefaultPauseTimeout
	}
	if o.Timeout <= 0 {
		o.Timeout = 10 * time.Second
	}
	return &PgBouncer{
		dsn: o.AdminDSN, addr: fmt.Sprintf("%s:%d", cfg.Host, cfg.Port), database: o.Database, file: o.File,
		entries:      map[string]string{"blue": strings.TrimSpace(o.Blue), "green": strings.TrimSpace(o.Green)},
		pauseTimeout: o.PauseTimeout, timeout: o.Timeout,
	}, nil
}

var dbNameRE = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]*$`)

// Name implements Target.
func (b *PgBouncer) Name() string { return fmt.Sprintf("pgbouncer %s database %s", b.addr, b.database) }

// admin runs one command on the admin console, connecting when needed. A
// connection that failed is dropped: the next command reconnects.
func (b *PgBouncer) admin(ctx context.Context, timeout time.Duration, sql string) ([]*pgconn.Result, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if b.conn == nil || b.conn.IsClosed() {
		c, err := pgconn.Connect(ctx, b.dsn)
		if err != nil {
			return nil, fmt.Errorf("%s: connect to the admin console: %s", b.Name(), redact.Text(err.Error()))
		}
		b.conn = c
	}
	res, err := b.conn.Exec(ctx, sql).ReadAll()
	if err != nil {
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) {
			b.conn.Close(context.Background())
			b.conn = nil
		}
		return res, fmt.Errorf("%s: %s: %w", b.Name(), strings.Fields(sql)[0], err)
	}
	return res, nil
}

// Warm implements Warmer: the admin console answers, the database is
// pooled in transaction or statement mode, the file is writable and holds
// the blue or the green entry.
func (b *PgBouncer) Warm(ctx context.Context) error {
	db, err := b.showDatabase(ctx)
	if err != nil {
		return err
	}
	cfg, err := b.admin(ctx, b.timeout, "SHOW CONFIG")
	if err != nil {
		return err
	}
	mode := db["pool_mode"]
	if mode == "" {
		mode = configValue(cfg, "pool_mode")
	}
	if mode == "session" {
		return fmt.Errorf("%s: pool_mode is session: PAUSE would wait for every client to disconnect; use pool_mode = transaction for this database", b.Name())
	}
	// PAUSE closes a server connection still logging in, which PgBouncer
	// counts as a failed login: it then waits server_login_retry before it
	// connects again, and the held clients stall that long after RESUME.
	if v := configValue(cfg, "server_login_retry"); v != "" {
		if secs, err := strconv.ParseFloat(v, 64); err == nil && secs > maxLoginRetry.Seconds() {
			return fmt.Errorf("%s: server_login_retry is %ss: a server login cut short by PAUSE would hold the clients that long after RESUME; set server_login_retry = 0.1 in pgbouncer.ini", b.Name(), v)
		}
	}
	return b.withFile(func(st fileState) (fileState, bool, error) {
		if st.colour() == "" {
			return st, false, fmt.Errorf("%s: the entry for %s in %s is %q, which is neither the configured blue nor green entry", b.Name(), b.database, b.file, st.entry)
		}
		return st, false, nil
	})
}

// Pause implements Pauser: PAUSE the database, bounded by the pause
// timeout. On failure the pool is resumed.
func (b *PgBouncer) Pause(ctx context.Context, epoch uint64) error {
	err := b.withFile(func(st fileState) (fileState, bool, error) {
		if st.epoch > epoch {
			return st, false, fmt.Errorf("%w: %s holds epoch %d for %s, the pause carries %d", target.ErrStaleEpoch, b.file, st.epoch, b.database, epoch)
		}
		if st.epoch == epoch {
			return st, false, nil
		}
		st.epoch = epoch
		return st, true, nil
	})
	if err != nil {
		return err
	}
	if _, err := b.admin(ctx, b.pauseTimeout, "PAUSE "+b.database); err != nil {
		// The pool stays paused when PAUSE is cut short: resume it.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), b.timeout)
		defer cancel()
		if rerr := b.resume(rctx); rerr != nil {
			return fmt.Errorf("pause failed (%v) and RESUME failed: %w: the pool may stay paused", err, rerr)
		}
		if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
			return fmt.Errorf("%s: PAUSE did not return within the pause timeout %s (a transaction still running?); resumed", b.Name(), b.pauseTimeout)
		}
		return fmt.Errorf("%w; resumed", err)
	}
	return nil
}

// Resume implements Pauser: point the entry at colour (when not "" and
// not already there), RELOAD, check, and RESUME.
func (b *PgBouncer) Resume(ctx context.Context, epoch uint64, colour string) error {
	if colour != "" {
		if err := b.repoint(ctx, epoch, colour); err != nil {
			return err
		}
	} else {
		err := b.withFile(func(st fileState) (fileState, bool, error) {
			if st.epoch > epoch {
				return st, false, fmt.Errorf("%w: %s holds epoch %d for %s, the resume carries %d", target.ErrStaleEpoch, b.file, st.epoch, b.database, epoch)
			}
			return st, false, nil
		})
		if err != nil {
			return err
		}
	}
	return b.resume(ctx)
}

// Flip implements Target: repoint and resume (a pool paused by a leader
// that died before its flip is resumed too).
func (b *PgBouncer) Flip(ctx context.Context, f target.Flip) error {
	return b.Resume(ctx, f.Epoch, f.To)
}

func (b *PgBouncer) resume(ctx context.Context) error {
	_, err := b.admin(ctx, b.timeout, "RESUME "+b.database)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && strings.Contains(pgErr.Message, "is not paused") {
		return nil
	}
	return err
}

func (b *PgBouncer) repoint(ctx context.Context, epoch uint64, colour string) error {
	want, ok := b.entries[colour]
	if !ok {
		return fmt.Errorf("%s: no entry for colour %q (blue or green)", b.Name(), colour)
	}
	err := b.withFile(func(st fileState) (fileState, bool, error) {
		if st.epoch > epoch {
			return st, false, fmt.Errorf("%w: %s holds epoch %d for %s, the flip carries %d", target.ErrStaleEpoch, b.file, st.epoch, b.database, epoch)
		}
		if st.entry == want && st.epoch == epoch && st.col == colour {
			return st, false, nil
		}
		st.epoch, st.col, st.entry = epoch, colour, want
		return st, true, nil
	})
	if err != nil {
		return err
	}
	// RELOAD even when the file already said so: a retry after a failed
	// RELOAD must apply it.
	if _, err := b.admin(ctx, b.timeout, "RELOAD"); err != nil {
		return err
	}
	db, err := b.showDatabase(ctx)
	if err != nil {
		return err
	}
	// The pool must now point where the entry says: a file pgbouncer could
	// not parse leaves the old target in place.
	for k, col := range map[string]string{"host": "host", "port": "port", "dbname": "database"} {
		if v, ok := entryValue(want, k); ok && db[col] != v {
			return fmt.Errorf("%s: after RELOAD the database %s has %s %q, the %s entry says %q (see pgbouncer's log)", b.Name(), b.database, col, db[col], colour, v)
		}
	}
	return nil
}

// showDatabase returns the database's row of SHOW DATABASES.
func (b *PgBouncer) showDatabase(ctx context.Context) (map[string]string, error) {
	res, err := b.admin(ctx, b.timeout, "SHOW DATABASES")
	if err != nil {
		return nil, err
	}
	for _, r := range res {
		for _, row := range r.Rows {
			if len(row) == 0 || string(row[0]) != b.database {
				continue
			}
			out := map[string]string{}
			for i, fd := range r.FieldDescriptions {
				if i < len(row) {
					out[fd.Name] = string(row[i])
				}
			}
			return out, nil
		}
	}
	return nil, fmt.Errorf("%s: pgbouncer has no database %q (SHOW DATABASES)", b.Name(), b.database)
}

func configValue(res []*pgconn.Result, key string) string {
	for _, r := range res {
		for _, row := range r.Rows {
			if len(row) > 1 && string(row[0]) == key {
				return string(row[1])
			}
		}
	}
	return ""
}

// entryValue reads key from a connect string of key=value pairs.
func entryValue(entry, key string) (string, bool) {
	for _, f := range strings.Fields(entry) {
		if k, v, ok := strings.Cut(f, "="); ok && k == key {
			return strings.Trim(v, "'"), true
		}
	}
	return "", false
}

// Route reads the colour and epoch the file holds for the database.
func (b *PgBouncer) Route() (colour string, epoch uint64, err error) {
	data, err := os.ReadFile(b.file)
	if err != nil {
		return "", 0, err
	}
	st := b.parse(data)
	return st.colour(), st.epoch, nil
}

// Close drops the admin connection.
func (b *PgBouncer) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.conn != nil {
		b.conn.Close(context.Background())
		b.conn = nil
	}
	return nil
}

// fileState is what the file says about the database.
type fileState struct {
	epoch uint64
	col   string // the colour written with the epoch
	entry string // the connect string of the entry
	b     *PgBouncer
}

// colour is the side the entry points to, by content ("" if neither).
func (s fileState) colour() string {
	for c, e := range s.b.entries {
		if e == s.entry {
			return c
		}
	}
	return ""
}

var headerRE = regexp.MustCompile(`^;\s*cutover\s+(\S+)\s+epoch=(\d+)\s+colour=(\S*)`)

func (b *PgBouncer) entryRE() *regexp.Regexp {
	return regexp.MustCompile(`^\s*` + regexp.QuoteMeta(b.database) + `\s*=(.*)$`)
}

func (b *PgBouncer) parse(data []byte) fileState {
	st := fileState{b: b}
	re := b.entryRE()
	for _, line := range strings.Split(string(data), "\n") {
		if m := headerRE.FindStringSubmatch(line); m != nil && m[1] == b.database {
			st.epoch, _ = strconv.ParseUint(m[2], 10, 64)
			st.col = m[3]
		} else if m := re.FindStringSubmatch(line); m != nil {
			st.entry = strings.TrimSpace(m[1])
		}
	}
	return st
}

// render writes st into data: the header right above the entry, every
// other line as it was.
func (b *PgBouncer) render(data []byte, st fileState) []byte {
	re := b.entryRE()
	var out []string
	done := false
	for _, line := range strings.Split(strings.TrimRight(string(data), "\n"), "\n") {
		if m := headerRE.FindStringSubmatch(line); m != nil && m[1] == b.database {
			continue
		}
		if re.MatchString(line) {
			if done {
				continue
			}
			out = append(out, b.header(st), b.database+" = "+st.entry)
			done = true
			continue
		}
		out = append(out, line)
	}
	if !done {
		out = append(out, b.header(st), b.database+" = "+st.entry)
	}
	for len(out) > 0 && out[0] == "" {
		out = out[1:]
	}
	return []byte(strings.Join(out, "\n") + "\n")
}

func (b *PgBouncer) header(st fileState) string {
	return fmt.Sprintf("; cutover %s epoch=%d colour=%s (written by the cutover agent; a lower epoch is refused)", b.database, st.epoch, st.col)
}

// withFile reads the file under its lock and, when fn says so, writes
// fn's state back atomically.
func (b *PgBouncer) withFile(fn func(fileState) (fileState, bool, error)) error {
	lock, err := os.OpenFile(b.file+".lock", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("%s: lock %s: %w", b.Name(), b.file, err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("%s: lock %s: %w", b.Name(), b.file, err)
	}
	data, err := os.ReadFile(b.file)
	if err != nil {
		return fmt.Errorf("%s: read the databases file: %w", b.Name(), err)
	}
	st, write, err := fn(b.parse(data))
	if err != nil || !write {
		return err
	}
	next := b.render(data, st)
	if b.parse(data).entry != st.entry {
		// For the operator: what the file said before the route changed.
		os.WriteFile(b.file+".prev", data, 0o600)
	}
	if bytes.Equal(next, data) {
		return nil
	}
	if err := writeAtomic(b.file, next); err != nil {
		return fmt.Errorf("%s: %w", b.Name(), err)
	}
	return nil
}

// writeAtomic replaces path with data: a temporary file in its directory,
// with its mode and (when allowed) owner, synced and renamed over it.
func writeAtomic(path string, data []byte) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Chmod(fi.Mode().Perm()); err != nil {
		tmp.Close()
		return err
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && (int(st.Uid) != os.Geteuid() || int(st.Gid) != os.Getegid()) {
		// pgbouncer must still read it; a non-root agent keeps the file
		// readable through its mode instead.
		_ = tmp.Chown(int(st.Uid), int(st.Gid))
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}
