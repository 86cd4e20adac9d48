// Package postgres fences a PostgreSQL database for a cutover.
//
// # Mechanism, and why
//
// Tried on PostgreSQL 15 (see the tests): ALTER ROLE/DATABASE ... SET
// default_transaction_read_only reaches only new sessions, so an open
// session keeps writing. REVOKE of the write privileges on the tables in
// scope is checked at the start of every statement's execution, so it fails
// the very next write statement of every session, new or open, inside a
// transaction or not (SQLSTATE 42501, insufficient_privilege), while reads go
// on. REVOKE does not wait for writers: it commits in about a millisecond.
//
// REVOKE alone does not drain: a transaction that wrote before it may still
// commit after it. So Drain then takes LOCK ... IN SHARE MODE on the tables,
// which conflicts with the ROW EXCLUSIVE lock every writer holds to the end of
// its transaction. Once granted, no write transaction that began before the
// fence is still open. Writers that arrive meanwhile queue behind the lock and
// fail the privilege check when it is released; sessions that hold no write
// lock (readers, idle sessions, idle-in-transaction readers) are not touched.
// If the lock is not granted within the grace period, the sessions holding
// conflicting locks are terminated (a few ms each) and the lock is retried.
// The catch-up marker is inserted in the same transaction, while the lock is
// held, and the position is read after that transaction commits: after the
// last lock and the last termination, never before.
//
// Cost: one catalog update per table and privilege holder to fence, the same
// to unfence; no table rewrite, no restart, no connection churn. The
// privileges taken away are saved in cutover.fence_state on the fenced
// database itself, so any agent can unfence after a crash, restoring the same
// grantor, grantee, privilege and grant option.
//
// Limits: superusers and roles outside the fence's scope are not fenced
// (breach detection in the change stream catches their writes); SECURITY
// DEFINER functions owned by an unfenced role keep writing.
package postgres

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/cutover/cutover/fencing"
)

var _ fencing.Fencer = (*Fencer)(nil)

// Options configure a Fencer.
type Options struct {
	// Plan and Pair name the fence; its state row is keyed by them.
	Plan, Pair string
	// Tables are the application tables in scope, as schema.table.
	Tables []string
	// Roles are the application roles to fence. Empty means every role that
	// holds a write privilege on a table in scope, except superusers and the
	// agent's own role.
	Roles []string
	// Logger receives one line per fence, drain and unfence.
	Logger *zap.Logger
}

// Fencer fences one PostgreSQL database. It is safe for concurrent use.
type Fencer struct {
	pool *pgxpool.Pool
	opts Options
	log  *zap.Logger

	tableOIDs []uint32
	tableSQL  string // quoted, comma-separated table list for LOCK
}

// New returns a Fencer over pool, which must connect as a role that may
// REVOKE and GRANT on the tables (a superuser or their owner) and is not one
// of the fenced roles.
func New(pool *pgxpool.Pool, opts Options) *Fencer {
	log := opts.Logger
	if log == nil {
		log = zap.NewNop()
	}
	return &Fencer{pool: pool, opts: opts, log: log.With(zap.String("plan", opts.Plan), zap.String("pair", opts.Pair))}
}

// SchemaSQL creates the fencer's bookkeeping on the fenced database.
const SchemaSQL = `
CREATE SCHEMA IF NOT EXISTS cutover;
CREATE TABLE IF NOT EXISTS cutover.fence_state (
	plan        text        NOT NULL,
	pair        text        NOT NULL,
	epoch       bigint      NOT NULL,
	fenced      boolean     NOT NULL,
	saved       jsonb       NOT NULL DEFAULT '[]',
	fenced_at   timestamptz,
	unfenced_at timestamptz,
	PRIMARY KEY (plan, pair)
);
CREATE TABLE IF NOT EXISTS cutover.markers (
	nonce      text        PRIMARY KEY,
	plan       text        NOT NULL,
	epoch      bigint      NOT NULL,
	written_at timestamptz NOT NULL DEFAULT now()
);`

// Prepare checks that the tables exist and have keys the fence can lock,
// that the agent may change their privileges, and that the fenced roles are
// not superusers (a superuser cannot be fenced), and creates the bookkeeping
// tables. It changes no privilege.
func (f *Fencer) Prepare(ctx context.Context) error {
	if len(f.opts.Tables) == 0 {
		return errors.New("fence: no tables in scope")
	}
	if _, err := f.pool.Exec(ctx, SchemaSQL); err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42501" {
			return fmt.Errorf("fence: the agent's role may not create schema cutover (%s): connect as a superuser or the tables' owner with CREATE on the database", pgErr.Message)
		}
		return fmt.Errorf("fence: create cutover schema: %w", err)
	}
	rows, err := f.pool.Query(ctx, `
		SELECT t.name, c.oid, pg_has_role(current_user, c.relowner, 'USAGE') OR r.rolsuper
		FROM unnest($1::text[]) AS t(name)
		LEFT JOIN pg_class c ON c.oid = to_regclass(t.name)
		CROSS JOIN pg_roles r WHERE r.rolname = current_user`, f.opts.Tables)
	if err != nil {
		return fmt.Errorf("fence: resolve tables: %w", err)
	}
	var missing, notOwned []string
	var oids []uint32
	for rows.Next() {
		var name string
		var oid *uint32
		var canGrant *bool
		if err := rows.Scan(&name, &oid, &canGrant); err != nil {
			return err
		}
		switch {
		case oid == nil:
			missing = append(missing, name)
		case canGrant == nil || !*canGrant:
			notOwned = append(notOwned, name)
		default:
			oids = append(oids, *oid)
		}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("fence: resolve tables: %w", err)
	}
	if len(missing) > 0 {
		return fmt.Errorf("fence: tables not found: %s", strings.Join(missing, ", "))
	}
	if len(notOwned) > 0 {
		return fmt.Errorf("fence: the agent's role can neither revoke nor grant on %s: connect as a superuser or the tables' owner", strings.Join(notOwned, ", "))
	}
	if len(f.opts.Roles) > 0 {
		var supers, unknown []string
		err := f.pool.QueryRow(ctx, `
			SELECT coalesce(array_agg(n) FILTER (WHERE r.rolsuper), '{}'),
			       coalesce(array_agg(n) FILTER (WHERE r.oid IS NULL), '{}')
			FROM unnest($1::text[]) n LEFT JOIN pg_roles r ON r.rolname = n`, f.opts.Roles).Scan(&supers, &unknown)
		if err != nil {
			return fmt.Errorf("fence: check roles: %w", err)
		}
		if len(unknown) > 0 {
			return fmt.Errorf("fence: roles not found: %s", strings.Join(unknown, ", "))
		}
		if len(supers) > 0 {
			return fmt.Errorf("fence: roles %s are superusers, which no privilege can fence: give the application a non-superuser role", strings.Join(supers, ", "))
		}
	}
	f.tableOIDs = oids
	quoted := make([]string, len(oids))
	for i, oid := range oids {
		quoted[i] = fmt.Sprintf("%d", oid)
	}
	var list string
	if err := f.pool.QueryRow(ctx, `SELECT string_agg(oid::regclass::text, ', ' ORDER BY oid) FROM pg_class WHERE oid = ANY($1)`, oids).Scan(&list); err != nil {
		return fmt.Errorf("fence: quote tables: %w", err)
	}
	f.tableSQL = list
	return nil
}

// grant is one write privilege held on a table or column, as aclexplode
// shows it. It is what Fence takes away and Unfence gives back.
type grant struct {
	Table     string `json:"table"` // regclass text, quoted as needed
	Column    string `json:"column,omitempty"`
	Grantor   string `json:"grantor"`
	Grantee   string `json:"grantee"` // "PUBLIC" for the public pseudo-role
	Privilege string `json:"privilege"`
	Grantable bool   `json:"grantable"`
}

// writeGrantsSQL lists the write privileges on the tables in scope (and on
// their columns) held by the roles to fence: the fenced roles, every role
// they inherit privileges from, and PUBLIC. A NULL ACL means the owner's
// default privileges, which acldefault spells out.
const writeGrantsSQL = `
WITH fenced AS (
	SELECT r.oid FROM pg_roles r
	WHERE CASE WHEN cardinality($2::text[]) > 0
	           THEN r.rolname = ANY($2)
	           ELSE NOT r.rolsuper AND r.rolname <> current_user
	               AND NOT pg_has_role(current_user, r.oid, 'MEMBER') END
), inherited AS (
	SELECT r.oid FROM pg_roles r
	WHERE EXISTS (SELECT 1 FROM fenced f WHERE pg_has_role(f.oid, r.oid, 'USAGE'))
	  AND NOT r.rolsuper AND r.rolname <> current_user
	UNION SELECT 0
), acl AS (
	SELECT c.oid::regclass::text AS tbl, NULL::text AS col, a.*
	FROM pg_class c, aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
	WHERE c.oid = ANY($1)
	UNION ALL
	SELECT c.oid::regclass::text, quote_ident(att.attname), a.*
	FROM pg_class c JOIN pg_attribute att ON att.attrelid = c.oid AND att.attacl IS NOT NULL,
	     aclexplode(att.attacl) a
	WHERE c.oid = ANY($1)
)
SELECT tbl, coalesce(col, ''), pg_get_userbyid(grantor)::text,
       CASE WHEN grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(grantee)) END,
       privilege_type, is_grantable
FROM acl
WHERE privilege_type IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')
  AND grantee IN (SELECT oid FROM inherited)
ORDER BY 1, 2, 4, 5`

func (f *Fencer) writeGrants(ctx context.Context, q pgx.Tx) ([]grant, error) {
	rows, err := q.Query(ctx, writeGrantsSQL, f.tableOIDs, f.opts.Roles)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (grant, error) {
		var g grant
		err := r.Scan(&g.Table, &g.Column, &g.Grantor, &g.Grantee, &g.Privilege, &g.Grantable)
		return g, err
	})
}

// lockState reads and locks the fence's state row, creating it if needed,
// and refuses an epoch lower than the stored one.
func (f *Fencer) lockState(ctx context.Context, tx pgx.Tx, epoch uint64) (fenced bool, saved []grant, err error) {
	if _, err := tx.Exec(ctx, `INSERT INTO cutover.fence_state (plan, pair, epoch, fenced) VALUES ($1, $2, 0, false) ON CONFLICT DO NOTHING`, f.opts.Plan, f.opts.Pair); err != nil {
		return false, nil, fmt.Errorf("create fence state: %w", err)
	}
	var stored int64
	var raw []byte
	err = tx.QueryRow(ctx, `SELECT epoch, fenced, saved FROM cutover.fence_state WHERE plan = $1 AND pair = $2 FOR UPDATE`, f.opts.Plan, f.opts.Pair).Scan(&stored, &fenced, &raw)
	if err != nil {
		return false, nil, fmt.Errorf("read fence state: %w", err)
	}
	if uint64(stored) > epoch {
		return false, nil, fmt.Errorf("%w: presented %d, %s/%s has seen %d", fencing.ErrStaleEpoch, epoch, f.opts.Plan, f.opts.Pair, stored)
	}
	if err := json.Unmarshal(raw, &saved); err != nil {
		return false, nil, fmt.Errorf("decode saved privileges: %w", err)
	}
	return fenced, saved, nil
}

// Fence revokes the write privileges of the fenced roles on the tables in
// scope, after saving them. Calling it again (same or higher epoch) revokes
// whatever was granted since, and keeps the first saved state.
func (f *Fencer) Fence(ctx context.Context, epoch uint64) error {
	if f.tableSQL == "" {
		return errors.New("fence: Prepare has not run")
	}
	start := time.Now()
	var revoked int
	err := pgx.BeginFunc(ctx, f.pool, func(tx pgx.Tx) error {
		_, saved, err := f.lockState(ctx, tx, epoch)
		if err != nil {
			return err
		}
		current, err := f.writeGrants(ctx, tx)
		if err != nil {
			return fmt.Errorf("read privileges: %w", err)
		}
		saved = mergeGrants(saved, current)
		revoked = len(current)
		// One round trip for every REVOKE: the fence is on the outage's
		// path, and a busy server makes each round trip expensive.
		var batch strings.Builder
		for _, g := range current {
			batch.WriteString(asRole(g.Grantor, g.revokeSQL()))
		}
		if batch.Len() > 0 {
			if _, err := tx.Exec(ctx, batch.String(), pgx.QueryExecModeSimpleProtocol); err != nil {
				return fmt.Errorf("revoke write privileges: %w", err)
			}
		}
		raw, err := json.Marshal(saved)
		if err != nil {
			return err
		}
		_, err = tx.Exec(ctx, `UPDATE cutover.fence_state
			SET epoch = $3, fenced = true, saved = $4, fenced_at = coalesce(CASE WHEN fenced THEN fenced_at END, now()), unfenced_at = NULL
			WHERE plan = $1 AND pair = $2`, f.opts.Plan, f.opts.Pair, int64(epoch), raw)
		return err
	})
	if err != nil {
		return fmt.Errorf("fence %s/%s: %w", f.opts.Plan, f.opts.Pair, err)
	}
	f.log.Info("fenced", zap.Uint64("epoch", epoch), zap.Int("privileges_revoked", revoked), zap.Duration("took", time.Since(start)))
	return nil
}

// Unfence gives back every saved privilege that is missing, each granted by
// its original grantor.
func (f *Fencer) Unfence(ctx context.Context, epoch uint64) error {
	if f.tableSQL == "" {
		return errors.New("unfence: Prepare has not run")
	}
	var restored int
	err := pgx.BeginFunc(ctx, f.pool, func(tx pgx.Tx) error {
		fenced, saved, err := f.lockState(ctx, tx, epoch)
		if err != nil {
			return err
		}
		if fenced {
			if restored, err = restore(ctx, tx, saved); err != nil {
				return err
			}
		}
		_, err = tx.Exec(ctx, `UPDATE cutover.fence_state
			SET epoch = $3, fenced = false, saved = '[]', unfenced_at = CASE WHEN fenced THEN now() ELSE unfenced_at END
			WHERE plan = $1 AND pair = $2`, f.opts.Plan, f.opts.Pair, int64(epoch))
		return err
	})
	if err != nil {
		return fmt.Errorf("unfence %s/%s: %w", f.opts.Plan, f.opts.Pair, err)
	}
	f.log.Info("unfenced", zap.Uint64("epoch", epoch), zap.Int("privileges_restored", restored))
	return nil
}

// restore grants saved privileges back. A grant made by a role that itself
// received the privilege WITH GRANT OPTION can only be restored after that
// one, so it loops until no more progress is made.
func restore(ctx context.Context, tx pgx.Tx, saved []grant) (int, error) {
	pending := append([]grant(nil), saved...)
	restored := 0
	for len(pending) > 0 {
		var next []grant
		var lastErr error
		for i, g := range pending {
			sp := fmt.Sprintf("restore_%d", i)
			if _, err := tx.Exec(ctx, "SAVEPOINT "+sp); err != nil {
				return restored, err
			}
			if err := execAs(ctx, tx, g.Grantor, g.grantSQL()); err != nil {
				lastErr = fmt.Errorf("grant %s on %s to %s: %w", g.Privilege, g.Table, g.Grantee, err)
				if _, err := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT "+sp); err != nil {
					return restored, err
				}
				next = append(next, g)
				continue
			}
			restored++
		}
		if len(next) == len(pending) {
			return restored, lastErr
		}
		pending = next
	}
	return restored, nil
}

// asRole wraps sql so that it runs as role, so that REVOKE and GRANT act on
// the grant made by that role (a superuser's GRANT or REVOKE acts as the
// owner).
func asRole(role, sql string) string {
	return "SET LOCAL ROLE " + pgx.Identifier{role}.Sanitize() + "; " + sql + "; RESET ROLE;\n"
}

// execAs runs sql as role inside tx.
func execAs(ctx context.Context, tx pgx.Tx, role, sql string) error {
	_, err := tx.Exec(ctx, asRole(role, sql), pgx.QueryExecModeSimpleProtocol)
	return err
}

func (g grant) target() string {
	if g.Column != "" {
		return fmt.Sprintf("%s (%s) ON %s", g.Privilege, g.Column, g.Table)
	}
	return fmt.Sprintf("%s ON %s", g.Privilege, g.Table)
}

func (g grant) revokeSQL() string {
	// CASCADE: a grant made onwards with this grant option goes too; it is
	// in the saved list when it is itself a write privilege of a fenced
	// role, and restored from there.
	return fmt.Sprintf("REVOKE %s FROM %s CASCADE", g.target(), g.Grantee)
}

func (g grant) grantSQL() string {
	s := fmt.Sprintf("GRANT %s TO %s", g.target(), g.Grantee)
	if g.Grantable {
		s += " WITH GRANT OPTION"
	}
	return s
}

func mergeGrants(saved, current []grant) []grant {
	seen := map[grant]bool{}
	out := make([]grant, 0, len(saved)+len(current))
	for _, g := range append(append([]grant(nil), saved...), current...) {
		key := g
		key.Grantable = false
		if !seen[key] {
			seen[key] = true
			out = append(out, g)
		}
	}
	sort.SliceStable(out, func(i, j int) bool {
		// Grants by the owner-side grantors first helps restore order.
		return out[i].Table < out[j].Table
	})
	return out
}

// State reports the fence state stored on the database.
func (f *Fencer) State(ctx context.Context) (fencing.State, error) {
	var st fencing.State
	var epoch int64
	var since *time.Time
	err := f.pool.QueryRow(ctx, `SELECT epoch, fenced, fenced_at FROM cutover.fence_state WHERE plan = $1 AND pair = $2`, f.opts.Plan, f.opts.Pair).Scan(&epoch, &st.Fenced, &since)
	if errors.Is(err, pgx.ErrNoRows) {
		return st, nil
	}
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42P01" {
			return st, nil // never fenced: the table does not exist yet
		}
		return st, fmt.Errorf("fence state: %w", err)
	}
	st.Epoch = uint64(epoch)
	if st.Fenced && since != nil {
		st.Since = *since
	}
	return st, nil
}

// Drain waits for in-flight write transactions, terminating those still
// running after grace, and writes the catch-up marker. See the package
// documentation for why a SHARE lock proves the drain.
func (f *Fencer) Drain(ctx context.Context, epoch uint64, grace time.Duration) (fencing.Drained, error) {
	var out fencing.Drained
	if f.tableSQL == "" {
		return out, errors.New("drain: Prepare has not run")
	}
	nonce, err := newNonce()
	if err != nil {
		return out, err
	}
	start := time.Now()
	conn, err := f.pool.Acquire(ctx)
	if err != nil {
		return out, fmt.Errorf("drain: %w", err)
	}
	defer conn.Release()
	err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		fenced, _, err := f.lockState(ctx, tx, epoch)
		if err != nil {
			return err
		}
		if !fenced {
			return fmt.Errorf("%w: %s/%s", fencing.ErrNotFenced, f.opts.Plan, f.opts.Pair)
		}
		for attempt := 0; ; attempt++ {
			wait := grace - time.Since(start)
			if attempt > 0 || wait < time.Millisecond {
				wait = 50 * time.Millisecond // after terminations: just long enough for them to exit
			}
			if _, err := tx.Exec(ctx, fmt.Sprintf("SET LOCAL lock_timeout = %d", wait.Milliseconds())); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, "SAVEPOINT drain"); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, "LOCK TABLE "+f.tableSQL+" IN SHARE MODE")
			if err == nil {
				break
			}
			var pgErr *pgconn.PgError
			if !errors.As(err, &pgErr) || pgErr.Code != "55P03" || attempt >= 20 {
				return fmt.Errorf("lock tables: %w", err)
			}
			if _, err := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT drain"); err != nil {
				return err
			}
			killed, err := f.terminateWriters(ctx)
			if err != nil {
				return err
			}
			out.Terminated = append(out.Terminated, killed...)
		}
		out.Waited = time.Since(start)
		_, err = tx.Exec(ctx, `INSERT INTO cutover.markers (nonce, plan, epoch) VALUES ($1, $2, $3)`, nonce, f.opts.Plan, int64(epoch))
		return err
	})
	if err != nil {
		return out, fmt.Errorf("drain %s/%s: %w", f.opts.Plan, f.opts.Pair, err)
	}
	// The position is read after the marker's transaction committed, which
	// was after the last lock and the last termination.
	var lsn string
	if err := conn.QueryRow(ctx, `SELECT pg_current_wal_lsn()::text`).Scan(&lsn); err != nil {
		return out, fmt.Errorf("drain: read position: %w", err)
	}
	out.Marker = fencing.Marker{Nonce: nonce, Epoch: epoch, Position: lsn}
	fields := []zap.Field{zap.Uint64("epoch", epoch), zap.String("marker", nonce), zap.String("lsn", lsn), zap.Duration("waited", out.Waited), zap.Int("terminated", len(out.Terminated))}
	for _, s := range out.Terminated {
		fields = append(fields, zap.String("terminated_session", fmt.Sprintf("pid=%d user=%s app=%q state=%s xact_age=%s", s.PID, s.User, s.Application, s.State, s.XactAge.Round(time.Millisecond))))
	}
	f.log.Info("drained", fields...)
	return out, nil
}

// terminateWriters ends every other session holding a lock that conflicts
// with SHARE on a table in scope (writers, DDL, vacuum), and waits for
// them to be gone.
func (f *Fencer) terminateWriters(ctx context.Context) ([]fencing.Session, error) {
	rows, err := f.pool.Query(ctx, `
		SELECT a.pid, coalesce(a.usename::text, ''), coalesce(a.application_name, ''), coalesce(a.state, ''),
		       coalesce(extract(epoch FROM now() - a.xact_start), 0)::float8,
		       pg_terminate_backend(a.pid)
		FROM pg_stat_activity a
		WHERE a.pid IN (
			SELECT l.pid FROM pg_locks l
			WHERE l.granted AND l.relation = ANY($1) AND l.pid <> pg_backend_pid()
			  AND l.mode IN ('RowExclusiveLock', 'ShareUpdateExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock'))`, f.tableOIDs)
	if err != nil {
		return nil, fmt.Errorf("terminate writers: %w", err)
	}
	var out []fencing.Session
	for rows.Next() {
		var s fencing.Session
		var age float64
		var ok bool
		if err := rows.Scan(&s.PID, &s.User, &s.Application, &s.State, &age, &ok); err != nil {
			return nil, err
		}
		s.XactAge = time.Duration(age * float64(time.Second))
		out = append(out, s)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("terminate writers: %w", err)
	}
	return out, nil
}

func newNonce() (string, error) {
	b := make([]byte, 12)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("marker nonce: %w", err)
	}
	return hex.EncodeToString(b), nil
}
