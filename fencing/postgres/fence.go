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
// Write proxies (Options.WriteProxy, fence.blue, for blue): that REVOKE
// costs a catalog update per table. So, at Prepare, outside the outage,
// the fenced roles' write grants move in one transaction to a NOLOGIN
// role per database and grantee (cutover_w_<hash>), which the grantee is
// made a member of: it keeps its privileges by inheritance. The fence
// then revokes the memberships, one statement per grantee whatever the
// number of tables; a membership change reaches open sessions at their
// next statement as a REVOKE does. What is still granted directly is
// revoked as before; the unfence grants the memberships back, then the
// grants move back and the proxies are dropped (see proxyFuncSQL).
//
// Fence, drain and marker run inside the database, in a procedure created at
// Prepare (cutover.fence_v5): FenceDrain puts the fence up, drains and
// writes the marker in one network round trip, which is what the outage
// pays for on a busy server (see fenceProcSQL).
//
// Hold (Options.Hold, what the driver uses): the drain's lock is taken by a
// session of its own, in a transaction kept open after the marker until
// the caller releases it (the driver: when the gate opens), so that fenced
// writers queue on the lock and use no CPU instead of failing and
// retrying. Measured with 32 writers retrying every millisecond on two
// cores: catch-up p99 208 ms refused, 26 ms held (BenchmarkOutage); the
// whole window, fence to gate open, about 125 ms released at catch-up and
// 50 ms held to the end (agent/driver BenchmarkCutoverWindow). The REVOKE
// and the lock request go out at once, and the marker follows in a second
// round trip. While the Fencer holds, a keepalive every Hold/3 keeps the
// session from going idle; if the agent goes away, the server ends the
// holding session by itself after Options.Hold idle. CheckHold tells
// whether the lock is still held. The lock also holds back writers
// outside the fence: HeldBreaches finds them while they wait.
//
// Cost: one catalog update per table and privilege holder to fence, the same
// to unfence, in one REVOKE (GRANT) per grantor, grantee and set of
// privileges over every table given that set, not one per table; no table
// rewrite, no restart, no connection churn. Measured at 5,000 small tables
// (BenchmarkFenceUnfenceTables): fence about 0.6 s, unfence 0.8 s, of which
// the bare REVOKE, GRANT and LOCK take 0.5, 0.3 and 0.2 s: still linear in
// the tables, in the catalog. The
// privileges taken away are saved in cutover.fence_state_v3 on the fenced
// database itself, so any agent can unfence after a crash, restoring the same
// grantor, grantee, privilege and grant option. That state is the
// database's, whichever plan fenced it: a later plan's fence adopts it, its
// unfence restores the original, and the epoch guard is the database's
// (epochs are the Raft indices of one cluster: a later plan's are higher).
// An operator can lift it without the cluster (BreakGlassUnfence, cutover
// unfence). PrivilegeParity proves, before the gate opens, that green once
// unfenced gives the application what blue gave it.
//
// Trust: the agent runs the functions in schema cutover as itself, often a
// superuser. Prepare refuses a schema (or an object in it) owned by a role
// that is neither the agent's nor a superuser (internal/pgsafe), revokes
// CREATE on it from PUBLIC, and every function pins search_path to
// pg_catalog, pg_temp.
//
// Tables: Options.Tables are quoted, schema-qualified identifiers; inside
// the database they are OIDs, printed back from the catalogs. A REVOKE on
// a partitioned table does not reach its partitions: they must be in
// Options.Tables too.
//
// Limits: superusers and roles outside the fence's scope are not fenced
// (breach detection in the change stream catches their writes); SECURITY
// DEFINER functions owned by an unfenced role keep writing. A session
// that did SET ROLE to a write proxy before the fence keeps the proxy's
// grants (PostgreSQL 15 cannot grant a membership without SET): its write
// waits on the hold, and ReleaseRefusingAll cancels the waiting writes of
// every role fenced by a proxy.
package postgres

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/cutover/cutover/fencing"
	"github.com/cutover/cutover/internal/pgsafe"
)

var _ fencing.Fencer = (*Fencer)(nil)

// Options configure a Fencer.
type Options struct {
	// Plan and Pair name who fences: the fence state records them as its
	// owner, and the marker its plan.
	Plan, Pair string
	// Tables are the application tables in scope, as quoted qualified
	// identifiers (pgx.Identifier{schema, table}.Sanitize(), e.g.
	// "public"."Orders"), partitions included: a REVOKE on a partitioned
	// table does not stop writes made to its partitions directly.
	Tables []string
	// Roles are the application roles to fence, with every role they are
	// members of. Empty means every role except superusers, the agent's own
	// role and the roles it is a member of (in pg_auth_members). Prepare
	// refuses a fence that would take write privileges from no role but
	// PUBLIC.
	Roles []string
	// Logger receives one line per fence, drain and unfence.
	Logger *zap.Logger
	// Hold, when positive, keeps the drain's lock on a session of its own
	// from the marker until Release or Unfence. A keepalive every Hold/3
	// keeps it while the Fencer lives; the server ends the holding session
	// by itself after Hold idle (idle_in_transaction_session_timeout), so a
	// vanished agent cannot keep the tables locked. While held, fenced
	// writers wait for the lock instead of failing, and fail (or, after
	// Unfence, succeed) once it is released; readers are not affected. On a busy server this is what
	// keeps the window short: refused writers retrying in a loop take the
	// CPU that decoding, apply, verification and Raft need. It also holds
	// back writes by roles outside the fence: HeldBreaches lists them while
	// they wait, so that the cutover can abort before they land. Zero: the
	// lock ends with the marker's transaction.
	Hold time.Duration
	// WriteProxy is how the fence takes the write privileges away:
	// ProxyGrants (or empty) revokes the grants, a catalog update per
	// table and holder inside the outage; ProxyOn moves them to write
	// proxies at Prepare (proxy_v1), so that the fence revokes one
	// membership per grantee whatever the number of tables, and fails
	// Prepare when it cannot; ProxyAuto does the same, or, when the
	// agent's role may not create roles, logs why and keeps to grants.
	// For the side that takes the application's writes (blue); Unfence
	// moves the grants back and drops the proxies.
	WriteProxy string
}

// The ways the fence takes write privileges away (Options.WriteProxy,
// fence.blue).
const (
	ProxyAuto   = "auto"
	ProxyOn     = "proxy"
	ProxyGrants = "grants"
)

// proxying says whether this Fencer moves grants to write proxies.
func (f *Fencer) proxying() bool {
	return f.opts.WriteProxy == ProxyAuto || f.opts.WriteProxy == ProxyOn
}

// Fencer fences one PostgreSQL database. It is safe for concurrent use.
type Fencer struct {
	pool *pgxpool.Pool
	opts Options
	log  *zap.Logger

	tableOIDs []uint32 // set by Prepare

	mu     sync.Mutex
	held   *holdSession    // the session holding the drain's lock (Options.Hold)
	warmed map[uint32]bool // backend PIDs that ran warmSession
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
//
// The fence state belongs to the database, not to a plan: one row
// (cutover.fence_state_v3) holds the original grants saved by whichever
// fence came first, the highest epoch seen, and the plan and pair that own
// the fence now. A fence over an existing fence adopts what is saved, and an
// unfence restores the original, whichever plan asks: a retried plan never
// flips to a green that its predecessor left fenced with nothing saved.
// Nobody but the schema's owner may create objects in it (see
// internal/pgsafe).
const SchemaSQL = `
CREATE SCHEMA IF NOT EXISTS cutover;
REVOKE CREATE ON SCHEMA cutover FROM PUBLIC;
CREATE TABLE IF NOT EXISTS cutover.fence_state_v3 (
	id          boolean     PRIMARY KEY DEFAULT true CHECK (id),
	epoch       bigint      NOT NULL,
	fenced      boolean     NOT NULL,
	saved       jsonb       NOT NULL DEFAULT '[]',
	plan        text,
	pair        text,
	fenced_at   timestamptz,
	unfenced_at timestamptz,
	unfenced_by text
);
ALTER TABLE cutover.fence_state_v3 ADD COLUMN IF NOT EXISTS logins_locked_at timestamptz;
ALTER TABLE cutover.fence_state_v3 ADD COLUMN IF NOT EXISTS proxied jsonb NOT NULL DEFAULT '[]';
CREATE TABLE IF NOT EXISTS cutover.markers (
	nonce      text        PRIMARY KEY,
	plan       text        NOT NULL,
	epoch      bigint      NOT NULL,
	written_at timestamptz NOT NULL DEFAULT now()
);`

// The server-side fence. Their version is in their names so that agents of
// different versions never replace each other's. v3: state per database,
// membership (not inheritance) closure, dependent grants saved, search_path
// pinned. v4 (drain, fence, unfence): a drain that never sits in the lock
// queue; grants revoked and restored in one statement per set of tables.
// unfence v5: logins locked by a login fence (lock_logins_v1) are saved as
// LOGIN entries beside the grants; v4 refuses such a state (an entry
// naming no table), so an older agent fails loudly rather than lifting
// the grants and leaving the application unable to log in. fence v5,
// unfence v6: write proxies (proxy_v1, unproxy_v1): memberships revoked
// are saved as MEMBER entries, which unfence v5 refuses the same way (an
// unknown privilege naming no table). An older agent's fence (v4) on a
// database with proxies but not fenced revokes the proxies' grants table
// by table (they are in its membership closure) and restores them.
// refuse_held_v1: ReleaseRefusingAll's cancels, on the holding session.
const (
	fenceProcName   = "cutover.fence_v5"
	proxyFuncName   = "cutover.proxy_v1"
	unproxyFuncName = "cutover.unproxy_v1"
	refuseFuncName  = "cutover.refuse_held_v1"
	drainFuncName   = "cutover.drain_v4"
	writeACLName    = "cutover.write_acl_v3"
	unfenceFuncName = "cutover.unfence_v6"
	loginsFuncName  = "cutover.lock_logins_v1"
	holdersFuncName = "cutover.login_holders_v1"
	stateTable      = "cutover.fence_state_v3"
	// legacyStateTable is v2's state, one row per plan and pair: a fence
	// left in it is folded into the database's state at Prepare.
	legacyStateTable = "cutover.fence_state"
)

// pinPath is every function's search path: the agent runs them as itself
// (often a superuser), so nothing they call may resolve to an object that
// another role created in a schema of its own, or to a temporary one.
const pinPath = "pg_catalog, pg_temp"

// drainFuncSQL waits for in-flight write transactions on the tables in
// scope to end, and returns holding the tables IN SHARE MODE until the
// calling transaction ends. Run inside the fence procedure it proves the
// drain for the marker that follows; run by a session of its own
// (Options.Hold) it keeps fenced writers waiting until Release, with
// idle_in_transaction_session_timeout as the server's own bound on the hold.
//
// The lock request never sits in the lock queue for long: a request waiting
// there blocks every later request that conflicts with it, and a statement
// takes its table locks while parsed, before the privilege check. Queued,
// it kept a multi-statement transaction begun before the fence (pgbench's
// TPC-B: five statements) from reaching its next statement, the one that
// fails on the REVOKE and aborts it; the drain then waited its whole grace
// and terminated transactions a few milliseconds old. So the lock is tried
// with NOWAIT, every millisecond, and every eighth try queued for at most
// 2 ms (so that a stream of statements, each holding its lock for the
// microseconds between parse and privilege check, cannot starve it). In
// between, every transaction begun before the fence reaches its next
// statement, fails and releases its locks (or commits).
//
// Terminated, once the grace has passed, are only the sessions holding a
// conflicting lock on a table in scope that are idle in a transaction
// (they would hold it until they next speak) or still running a statement
// begun before the drain (a long statement, which the REVOKE does not
// stop); a session running a statement begun after the fence is on its way
// to the privilege check and is left alone, until twice the grace, when
// every holder is terminated. After twice the grace and a second the drain
// gives up (lock_not_available).
//
// The lock loop runs in a function rather than in the procedure so that
// both can share it: locks taken in a subtransaction that succeeds belong
// to the calling transaction.
const drainFuncSQL = `
CREATE OR REPLACE FUNCTION ` + drainFuncName + `(p_tables oid[], p_grace_ms int, p_hold_ms int)
RETURNS jsonb LANGUAGE plpgsql SET search_path = ` + pinPath + ` AS $drain$
DECLARE
	v_killed jsonb := '[]';
	v_killed_pids int[] := '{}';
	v_attempts int := 0;
	v_deadlocks int := 0;
	v_elapsed int;
	v_start timestamptz := clock_timestamp();
	v_locks text;
	v_autovacuum int := 0;
	v_lock_timeout text := current_setting('lock_timeout');
BEGIN
	IF p_hold_ms > 0 THEN
		-- The hold ends with its session if the agent goes away: a
		-- vanished agent never leaves the tables locked past the bound.
		PERFORM set_config('idle_in_transaction_session_timeout', p_hold_ms || 'ms', true);
	END IF;
	-- Names printed from OIDs with only pg_catalog in the path: schema
	-- qualified and quoted, exact whatever their case.
	SELECT 'LOCK TABLE ' || string_agg(c.oid::regclass::text, ', ' ORDER BY c.oid) || ' IN SHARE MODE'
	INTO v_locks FROM pg_class c WHERE c.oid = ANY(p_tables);
	-- An autovacuum or autoanalyze of a table in scope holds SHARE UPDATE
	-- EXCLUSIVE, which conflicts with SHARE, for as long as it runs (tens
	-- to hundreds of ms on a table taking thousands of inserts a second);
	-- PostgreSQL itself cancels it only after deadlock_timeout (1 s). Cancel
	-- it now, as PostgreSQL would: it retries later, and a worker started
	-- after this skips tables it cannot lock. Not one that prevents
	-- wraparound, which PostgreSQL never cancels either.
	SELECT count(pg_cancel_backend(a.pid)) INTO v_autovacuum
	FROM pg_stat_activity a
	WHERE a.backend_type = 'autovacuum worker' AND a.query NOT LIKE '%to prevent wraparound%'
	  AND a.pid IN (SELECT l.pid FROM pg_locks l WHERE l.granted AND l.relation = ANY(p_tables));
	IF cardinality(p_tables) = 0 THEN
		RETURN '{}'; -- a warm-up (see warmSession)
	END IF;
	LOOP
		v_attempts := v_attempts + 1;
		BEGIN
			-- SHARE conflicts with the ROW EXCLUSIVE lock every writer holds
			-- to the end of its transaction: once granted, no write
			-- transaction begun before the fence is open.
			IF v_attempts % 8 = 0 THEN
				PERFORM set_config('lock_timeout', '2ms', true);
				EXECUTE v_locks;
			ELSE
				EXECUTE v_locks || ' NOWAIT';
			END IF;
			EXIT;
		EXCEPTION
			WHEN lock_not_available THEN
				NULL;
			WHEN deadlock_detected THEN
				-- A queued try held one table while waiting for another
				-- (a deadlock_timeout under 2 ms): its rollback let go.
				v_deadlocks := v_deadlocks + 1;
		END;
		v_elapsed := (extract(epoch FROM clock_timestamp() - v_start) * 1000)::int;
		IF v_elapsed >= 2 * p_grace_ms + 1000 THEN
			RAISE EXCEPTION 'could not lock the tables in scope IN SHARE MODE within % ms', v_elapsed USING ERRCODE = 'lock_not_available';
		END IF;
		IF v_elapsed >= p_grace_ms THEN
			-- Terminate the sessions still holding a lock that conflicts
			-- with SHARE on a table in scope (writers, DDL, vacuum) that
			-- will not let go by themselves soon; nobody else.
			WITH k AS (
				SELECT a.pid, a.usename, a.application_name, a.state, a.xact_start, pg_terminate_backend(a.pid) AS ok
				FROM pg_stat_activity a
				WHERE a.pid IN (
					SELECT l.pid FROM pg_locks l
					WHERE l.granted AND l.relation = ANY(p_tables) AND l.pid <> pg_backend_pid()
					  AND l.mode IN ('RowExclusiveLock', 'ShareUpdateExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock'))
				  AND a.pid <> ALL(v_killed_pids)
				  AND (a.state LIKE 'idle in transaction%' OR a.query_start < v_start OR a.backend_type <> 'client backend'
				       OR v_elapsed >= 2 * p_grace_ms)
			)
			SELECT v_killed || coalesce(jsonb_agg(jsonb_build_object(
				'pid', k.pid, 'user', coalesce(k.usename::text, ''), 'application', coalesce(k.application_name, ''),
				'state', coalesce(k.state, ''), 'xact_age_us', coalesce((extract(epoch FROM now() - k.xact_start) * 1e6)::bigint, 0),
				'ok', k.ok)), '[]'),
			       v_killed_pids || coalesce(array_agg(k.pid), '{}')
			INTO v_killed, v_killed_pids
			FROM k;
		END IF;
		PERFORM pg_sleep(0.001);
	END LOOP;
	PERFORM set_config('lock_timeout', v_lock_timeout, true);
	RETURN jsonb_build_object('waited_us', (extract(epoch FROM clock_timestamp() - v_start) * 1e6)::bigint,
		'terminated', v_killed, 'autovacuum_cancelled', v_autovacuum, 'deadlocks', v_deadlocks, 'lock_attempts', v_attempts);
END
$drain$`

// writeACLSQL lists the write privileges on the tables (and their columns)
// held by the roles p_roles (0 is PUBLIC), or, p_in false, by every other
// role, in the form the fence saves: table and column as quoted names
// (schema qualified), grantor as a role name, grantee quoted or PUBLIC. A
// NULL ACL is the owner's default.
const writeACLSQL = `
CREATE OR REPLACE FUNCTION ` + writeACLName + `(p_tables oid[], p_roles oid[], p_in boolean)
RETURNS jsonb LANGUAGE sql SET search_path = ` + pinPath + ` AS $acl$
	SELECT coalesce(jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
		'table', a.tbl, 'column', a.col, 'grantor', pg_get_userbyid(a.grantor)::text,
		'grantee', CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END,
		'privilege', a.privilege_type, 'grantable', a.is_grantable)) ORDER BY a.tbl, a.col, a.grantee, a.privilege_type), '[]')
	FROM (
		SELECT format('%I.%I', n.nspname, c.relname) AS tbl, NULL::text AS col, x.grantor, x.grantee, x.privilege_type, x.is_grantable
		FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
		     aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) x
		WHERE c.oid = ANY(p_tables)
		UNION ALL
		SELECT format('%I.%I', n.nspname, c.relname), quote_ident(att.attname), x.grantor, x.grantee, x.privilege_type, x.is_grantable
		FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		     JOIN pg_attribute att ON att.attrelid = c.oid AND att.attacl IS NOT NULL AND NOT att.attisdropped,
		     aclexplode(att.attacl) x
		WHERE c.oid = ANY(p_tables)) a
	WHERE a.privilege_type IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')
	  AND (a.grantee = ANY(p_roles)) = p_in
$acl$`

// fenceProcSQL is the fence, drain and marker as one procedure, created at
// Prepare (before the outage), so that putting up the fence costs one
// network round trip instead of about fifteen. On a loaded two-core server
// each round trip waits for a CPU, and writers keep writing (and green
// keeps falling behind) for as long as the fence takes to commit: measured
// with 32 writers, the client-driven fence took 10-120 ms before its REVOKE
// was visible, the procedure about one round trip.
//
// The procedure commits twice (transaction control in a procedure, PG 11+):
// the REVOKE must be committed, hence visible to every session, before the
// drain waits, or pre-fence writers would go on writing until terminated.
// A procedure that commits cannot carry a SET clause, so it pins its
// search path itself, first thing and after each commit. p_fence, p_lock
// and p_marker select the parts, so Fence, Drain and FenceDrain share this
// one implementation: the marker is written with the drain's lock held,
// taken here (p_lock) or by a holding session (p_lock false: the caller
// holds it, see Options.Hold). Errors: CU001 stale epoch, CU002 not fenced.
//
// The roles fenced are those named (none named: every role that is neither
// a superuser, nor the agent's, nor one the agent really is a member of in
// pg_auth_members, which pg_has_role cannot tell for a superuser), every
// role they are members of (membership, not inheritance: a NOINHERIT
// member can still SET ROLE and write), and PUBLIC.
//
// The write privileges revoked are grouped per grantor, grantee, table and
// column, so each table's ACL is rewritten once per holder, not once per
// privilege. REVOKE ... CASCADE also takes away what a fenced role granted
// with its grant option to roles outside the fence: those grants are seen
// gone after the REVOKE and saved with the rest, so that the unfence gives
// them back.
const fenceProcSQL = `
CREATE OR REPLACE PROCEDURE ` + fenceProcName + `(
	p_plan text, p_pair text, p_epoch bigint, p_tables oid[], p_roles text[],
	p_fence boolean, p_lock boolean, p_marker boolean, p_grace_ms int, p_nonce text,
	INOUT result jsonb DEFAULT NULL)
LANGUAGE plpgsql AS $proc$
DECLARE
	v_epoch bigint;
	v_fenced boolean;
	v_saved jsonb;
	v_roles oid[];
	v_current jsonb;
	v_others jsonb;
	v_lost jsonb := '[]';
	v_stmt record;
	v_revoked int := 0;
	v_proxied jsonb;
	v_proxies text[];
	v_members jsonb := '[]';
	v_m record;
	v_called timestamptz := pg_catalog.clock_timestamp();
BEGIN
	PERFORM pg_catalog.set_config('search_path', '` + pinPath + `', true);
	IF p_fence THEN
		INSERT INTO ` + stateTable + ` (id, epoch, fenced) VALUES (true, 0, false) ON CONFLICT DO NOTHING;
		SELECT epoch, CASE WHEN fenced THEN saved ELSE '[]' END, proxied INTO v_epoch, v_saved, v_proxied FROM ` + stateTable + ` WHERE id FOR UPDATE;
		IF v_epoch > p_epoch THEN
			RAISE EXCEPTION 'presented %, the database has seen %', p_epoch, v_epoch USING ERRCODE = 'CU001';
		END IF;
	ELSE
		SELECT proxied INTO v_proxied FROM ` + stateTable + ` WHERE id;
	END IF;
	v_proxied := coalesce(v_proxied, '[]');
	SELECT coalesce(array_agg(DISTINCT e->>'proxy'), '{}') INTO v_proxies FROM jsonb_array_elements(v_proxied) e;
	IF p_fence AND cardinality(v_proxies) > 0 THEN
		-- The write proxies (proxy_v1): one REVOKE per proxy and member,
		-- whatever the number of tables. Every member is revoked, not
		-- only the grantee it was made for.
		FOR v_m IN
			SELECT p.rolname AS proxy, m.rolname AS member
			FROM pg_roles p JOIN pg_auth_members am ON am.roleid = p.oid JOIN pg_roles m ON m.oid = am.member
			WHERE p.rolname = ANY(v_proxies)
			ORDER BY 1, 2
		LOOP
			EXECUTE format('REVOKE %I FROM %I', v_m.proxy, v_m.member);
			v_members := v_members || jsonb_build_object('privilege', 'MEMBER', 'role', v_m.proxy::text, 'grantee', quote_ident(v_m.member));
		END LOOP;
	END IF;
	IF p_fence OR NOT p_marker THEN
		WITH RECURSIVE agent_roles AS (
			SELECT r.oid FROM pg_roles r WHERE r.rolname = current_user
			UNION SELECT m.roleid FROM pg_auth_members m JOIN agent_roles a ON m.member = a.oid
		), closure AS (
			SELECT r.oid FROM pg_roles r
			WHERE CASE WHEN cardinality(p_roles) > 0
			           THEN r.rolname = ANY(p_roles)
			           ELSE NOT r.rolsuper AND r.oid NOT IN (SELECT oid FROM agent_roles) AND r.rolname NOT LIKE 'pg\_%' END
			UNION SELECT m.roleid FROM pg_auth_members m JOIN closure c ON m.member = c.oid
		)
		-- The write proxies are not fenced by their grants: their
		-- members are fenced by their membership.
		SELECT coalesce(array_agg(c.oid), '{}') || 0::oid INTO v_roles
		FROM closure c JOIN pg_roles r ON r.oid = c.oid
		WHERE NOT r.rolsuper AND r.rolname <> current_user AND r.rolname <> ALL(v_proxies);
		-- What is still granted directly (grants the proxy could not take,
		-- grants made since it took them): revoked the old way, a catalog
		-- update per table.
		v_current := ` + writeACLName + `(p_tables, v_roles, true);
		IF NOT p_fence THEN
			-- A dry run (no part selected): what the fence would revoke,
			-- and who holds write privileges the fence takes (or took)
			-- away. Run on every session that may fence, it also leaves
			-- this procedure compiled and its queries planned there.
			result := jsonb_build_object('would_revoke', v_current, 'holders', (
				SELECT coalesce(jsonb_agg(DISTINCT g->>'grantee'), '[]') FROM (
					SELECT g FROM jsonb_array_elements(v_current) g
					UNION ALL
					SELECT g FROM jsonb_array_elements(v_proxied) g
					UNION ALL
					SELECT g FROM ` + stateTable + ` s, jsonb_array_elements(s.saved) g
					WHERE s.fenced AND g->>'table' IN (SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = ANY(p_tables))
					  AND (g->>'grantee' = 'PUBLIC' OR g->>'grantee' IN (SELECT quote_ident(r.rolname) FROM pg_roles r WHERE r.oid = ANY(v_roles)))) h));
			RETURN;
		END IF;

		IF EXISTS (SELECT 1 FROM jsonb_array_elements(v_current) g WHERE (g->>'grantable')::boolean) THEN
			v_others := ` + writeACLName + `(p_tables, v_roles, false);
		END IF;
		-- One REVOKE per grantor, grantee and set of privileges, over
		-- every table granted exactly that set (column privileges: per
		-- table and column): the statements do not grow with the tables.
		FOR v_stmt IN
			SELECT t.grantor, format('REVOKE %s ON %s FROM %s CASCADE', t.privs, string_agg(t.tbl, ', ' ORDER BY t.tbl), t.grantee) AS sql
			FROM (SELECT g->>'grantor' AS grantor, g->>'table' AS tbl, g->>'column' AS col, g->>'grantee' AS grantee,
			             string_agg((g->>'privilege') || coalesce(' (' || (g->>'column') || ')', ''), ', ' ORDER BY g->>'privilege') AS privs
			      FROM jsonb_array_elements(v_current) g
			      GROUP BY 1, 2, 3, 4) t
			GROUP BY t.grantor, t.grantee, t.privs, CASE WHEN t.col IS NULL THEN NULL ELSE t.tbl END, t.col
		LOOP
			-- As the grantor, so that the REVOKE takes away that grant.
			EXECUTE format('SET LOCAL ROLE %I', v_stmt.grantor);
			EXECUTE v_stmt.sql;
			RESET ROLE;
			v_revoked := v_revoked + 1;
		END LOOP;
		IF v_others IS NOT NULL THEN
			-- Grants of roles outside the fence that the CASCADE took.
			SELECT coalesce(jsonb_agg(o), '[]') INTO v_lost
			FROM jsonb_array_elements(v_others) o
			WHERE o::text NOT IN (SELECT a::text FROM jsonb_array_elements(` + writeACLName + `(p_tables, v_roles, false)) a);
		END IF;

		-- Saved: what an earlier fence of this database saved, whichever
		-- plan put it up, then what was granted since; one entry per grant,
		-- whatever its grant option.
		SELECT coalesce(jsonb_agg(g ORDER BY g->>'table', ord), '[]') INTO v_saved FROM (
			SELECT DISTINCT ON (g->>'table', g->>'column', g->>'grantor', g->>'grantee', g->>'privilege', g->>'role') g, ord
			FROM (SELECT g, 0 AS src, ord FROM jsonb_array_elements(v_saved) WITH ORDINALITY s(g, ord)
			      UNION ALL
			      SELECT g, 1, ord FROM jsonb_array_elements(v_members || v_current || v_lost) WITH ORDINALITY c(g, ord)) u
			ORDER BY g->>'table', g->>'column', g->>'grantor', g->>'grantee', g->>'privilege', g->>'role', src, ord) d;
		UPDATE ` + stateTable + `
		SET epoch = p_epoch, fenced = true, saved = v_saved, plan = p_plan, pair = p_pair,
		    fenced_at = CASE WHEN fenced THEN fenced_at ELSE now() END, unfenced_at = NULL, unfenced_by = NULL
		WHERE id;
		-- From this commit on, every session's next write statement fails.
		COMMIT;
		PERFORM pg_catalog.set_config('search_path', '` + pinPath + `', true);
	END IF;
	result := jsonb_build_object('revoked', v_revoked, 'dependent_saved', jsonb_array_length(v_lost), 'memberships_revoked', jsonb_array_length(v_members),
		'fence_us', (extract(epoch FROM clock_timestamp() - v_called) * 1e6)::bigint);
	IF NOT p_marker THEN
		RETURN;
	END IF;

	SELECT epoch, fenced INTO v_epoch, v_fenced FROM ` + stateTable + ` WHERE id FOR UPDATE;
	IF v_epoch > p_epoch THEN
		RAISE EXCEPTION 'presented %, the database has seen %', p_epoch, v_epoch USING ERRCODE = 'CU001';
	END IF;
	IF v_fenced IS NOT TRUE THEN
		RAISE EXCEPTION 'the database is not fenced' USING ERRCODE = 'CU002';
	END IF;
	IF p_lock THEN
		result := result || ` + drainFuncName + `(p_tables, p_grace_ms, 0);
	END IF;
	-- The marker commits while the drain's lock is held: after every write
	-- transaction begun before the fence.
	INSERT INTO cutover.markers (nonce, plan, epoch) VALUES (p_nonce, p_plan, p_epoch);
	COMMIT;
	PERFORM pg_catalog.set_config('search_path', '` + pinPath + `', true);
	-- Read after the marker's commit, so after the last lock and the last
	-- termination.
	result := result || jsonb_build_object('lsn', pg_current_wal_lsn()::text,
		'total_us', (extract(epoch FROM clock_timestamp() - v_called) * 1e6)::bigint);
END
$proc$`

// unfenceFuncSQL gives back every saved privilege, each granted by its
// original grantor, and every login a login fence locked, and records the
// unfence, in one round trip: on green it stands between the flip and the
// application's first write, and client-driven it took two round trips per
// privilege (40-400 ms under load). Privileges are granted per grantor,
// table, column, grantee and grant option in one statement. A grant made by
// a role that itself holds the privilege WITH GRANT OPTION from another can
// only be restored after that one, so it loops until no more progress is
// made. The saved state is checked against the catalogs before anything
// runs (tables, columns, roles, privileges), and what runs is built from
// catalog names only, so that a tampered state row cannot run other SQL.
// p_break_glass (cutover unfence) skips the epoch guard and clears the
// epoch: the cluster whose epochs it guarded may be gone, and a new one
// counts from the start.
//
// p_keep_logins gives back, before the window, the grants of every role
// whose logins are locked (lock_logins_v1) and keeps the fence up by the
// locks alone: it first ends those roles' sessions on this database, and
// refuses while any role that could log in would get a write privilege
// back. PUBLIC's grants stay saved (any role could use them). The lift at
// the flip then only unlocks logins: O(roles), not O(tables).
//
// Called with a NULL plan it returns at once; with a NULL epoch it is a
// dry run that resolves and plans everything on this session and changes
// nothing (WarmUnfence). Errors: CU001 stale epoch, CU002 not fenced (keep
// logins), CU003 a session of a locked role is connected (it logged in
// past the lock: the fence may have been breached), CU004 a role that
// could log in would get a write privilege back.
const unfenceFuncSQL = `
CREATE OR REPLACE FUNCTION ` + unfenceFuncName + `(p_plan text, p_pair text, p_epoch bigint, p_break_glass boolean, p_keep_logins boolean)
RETURNS jsonb LANGUAGE plpgsql SET search_path = ` + pinPath + ` AS $unfence$
DECLARE
	v_epoch bigint;
	v_fenced boolean;
	v_saved jsonb;
	v_logins jsonb;
	v_members jsonb;
	v_proxied jsonb;
	v_member int := 0;
	v_public jsonb := '[]';
	v_bad jsonb;
	v_pending jsonb;
	v_next jsonb;
	v_g record;
	v_restored int := 0;
	v_statements int := 0;
	v_unlocked int := 0;
	v_terminated int := 0;
	v_sessions int := 0;
	v_err text;
	v_who text;
	-- A dry run (no epoch) resolves and plans everything below on this
	-- session and changes nothing (WarmUnfence): on green the unfence
	-- runs inside the write outage, and a session's first call took
	-- 70-100 ms of catalog lookups and planning.
	v_dry boolean := p_epoch IS NULL;
BEGIN
	IF p_plan IS NULL THEN
		RETURN '{}';
	END IF;
	IF v_dry THEN
		SELECT epoch, fenced, saved INTO v_epoch, v_fenced, v_saved FROM ` + stateTable + ` WHERE id;
	ELSE
		INSERT INTO ` + stateTable + ` (id, epoch, fenced) VALUES (true, 0, false) ON CONFLICT DO NOTHING;
		SELECT epoch, fenced, saved INTO v_epoch, v_fenced, v_saved FROM ` + stateTable + ` WHERE id FOR UPDATE;
		IF NOT p_break_glass AND v_epoch > p_epoch THEN
			RAISE EXCEPTION 'presented %, the database has seen %', p_epoch, v_epoch USING ERRCODE = 'CU001';
		END IF;
	END IF;
	IF p_keep_logins AND v_fenced IS NOT TRUE AND NOT v_dry THEN
		RAISE EXCEPTION 'the database is not fenced' USING ERRCODE = 'CU002';
	END IF;
	IF v_fenced THEN
		SELECT coalesce(jsonb_agg(g) FILTER (WHERE g->>'privilege' = 'LOGIN'), '[]'),
		       coalesce(jsonb_agg(g) FILTER (WHERE g->>'privilege' = 'MEMBER'), '[]'),
		       coalesce(jsonb_agg(g) FILTER (WHERE g->>'privilege' IS DISTINCT FROM 'LOGIN' AND g->>'privilege' IS DISTINCT FROM 'MEMBER'), '[]')
		INTO v_logins, v_members, v_saved FROM jsonb_array_elements(v_saved) g;
		SELECT proxied INTO v_proxied FROM ` + stateTable + ` WHERE id;
		-- Memberships in the write proxies (fence_v5): a few roles, each
		-- resolved against the catalog, the proxy only if the state
		-- records it as one.
		FOR v_g IN
			SELECT g, p.rolname AS proxy, m.rolname AS member FROM jsonb_array_elements(v_members) g
			LEFT JOIN pg_roles p ON p.rolname = g->>'role'
			     AND p.rolname IN (SELECT e->>'proxy' FROM jsonb_array_elements(coalesce(v_proxied, '[]')) e)
			LEFT JOIN pg_roles m ON quote_ident(m.rolname) = g->>'grantee'
		LOOP
			IF v_g.proxy IS NULL OR v_g.member IS NULL THEN
				RAISE EXCEPTION 'saved memberships name a role that no longer exists or no write proxy: %', v_g.g;
			END IF;
			IF NOT v_dry THEN
				EXECUTE format('GRANT %I TO %I', v_g.proxy, v_g.member);
				v_member := v_member + 1;
			END IF;
		END LOOP;
		IF p_keep_logins THEN
			SELECT coalesce(jsonb_agg(g) FILTER (WHERE g->>'grantee' = 'PUBLIC'), '[]'),
			       coalesce(jsonb_agg(g) FILTER (WHERE g->>'grantee' IS DISTINCT FROM 'PUBLIC'), '[]')
			INTO v_public, v_saved FROM jsonb_array_elements(v_saved) g;
			SELECT string_agg(quote_ident(h), ', ') INTO v_who FROM ` + holdersFuncName + `(v_saved) h;
			IF v_who IS NOT NULL AND NOT v_dry THEN
				RAISE EXCEPTION 'roles % can log in and would get write privileges back: lock their logins first', v_who USING ERRCODE = 'CU004';
			END IF;
			IF NOT v_dry THEN
				-- Sessions that logged in before the lock: none may be
				-- there when the grants come back.
				SELECT count(*) FILTER (WHERE pg_terminate_backend(a.pid, 5000)), count(*) INTO v_terminated, v_sessions
				FROM pg_stat_activity a
				WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
				  AND a.usesysid IN (SELECT r.oid FROM pg_roles r WHERE quote_ident(r.rolname) IN (SELECT g->>'grantee' FROM jsonb_array_elements(v_logins) g));
				IF v_terminated < v_sessions THEN
					RAISE EXCEPTION '% session(s) of locked roles did not end within 5 s', v_sessions - v_terminated;
				END IF;
			END IF;
		ELSIF jsonb_array_length(v_logins) > 0 AND NOT p_break_glass AND NOT v_dry THEN
			-- Nobody logs in as a locked role: a session of one is a login
			-- that raced the lock, or a lock lifted by hand, and may have
			-- written.
			SELECT string_agg(format('pid %s user %s', a.pid, a.usename), ', ') INTO v_who
			FROM pg_stat_activity a
			WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
			  AND a.usesysid IN (SELECT r.oid FROM pg_roles r WHERE quote_ident(r.rolname) IN (SELECT g->>'grantee' FROM jsonb_array_elements(v_logins) g));
			IF v_who IS NOT NULL THEN
				RAISE EXCEPTION 'sessions of roles whose logins were locked are connected (%): the fence may have been breached', v_who USING ERRCODE = 'CU003';
			END IF;
		END IF;
		-- Logins first: a few roles, resolved against the catalog.
		IF NOT p_keep_logins THEN
			FOR v_g IN
				SELECT g, r.rolname FROM jsonb_array_elements(v_logins) g
				LEFT JOIN pg_roles r ON quote_ident(r.rolname) = g->>'grantee'
			LOOP
				IF v_g.rolname IS NULL THEN
					RAISE EXCEPTION 'saved logins name a role that no longer exists: %', v_g.g;
				END IF;
				IF NOT v_dry THEN
					EXECUTE format('ALTER ROLE %I LOGIN', v_g.rolname);
					v_unlocked := v_unlocked + 1;
				END IF;
			END LOOP;
		END IF;
	END IF;
	IF v_fenced AND jsonb_array_length(v_saved) > 0 THEN
		-- Every saved grant resolved against the catalogs: the statements
		-- below are built from catalog names only.
		-- Each table found by an index lookup of its name (names are
		-- schema qualified and quoted) and kept only if printed back the
		-- same: a join with every table of the catalog, planned for the
		-- default 100 saved grants, took seconds at 5,000 tables.
		WITH resolved AS (
			SELECT g, t.name AS tbl, t.oid AS reloid,
			       (SELECT r.rolname::text FROM pg_roles r WHERE r.rolname = g->>'grantor') AS grantor,
			       CASE WHEN g->>'grantee' = 'PUBLIC' THEN 'PUBLIC'
			            ELSE (SELECT quote_ident(r.rolname) FROM pg_roles r WHERE quote_ident(r.rolname) = g->>'grantee') END AS grantee,
			       (SELECT quote_ident(a.attname) FROM pg_attribute a
			        WHERE a.attrelid = t.oid AND quote_ident(a.attname) = g->>'column' AND NOT a.attisdropped) AS col
			FROM jsonb_array_elements(v_saved) g
			LEFT JOIN LATERAL (
				SELECT c.oid, format('%I.%I', n.nspname, c.relname) AS name
				FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
				-- to_regclass only on a well-formed name (it raises on others).
				WHERE c.oid = CASE WHEN g->>'table' ~ '^("([^"]|"")+"|[a-z_][a-z0-9_]*)\.("([^"]|"")+"|[a-z_][a-z0-9_]*)$'
				                   THEN to_regclass(g->>'table') END
				  AND c.relkind IN ('r', 'p')
				  AND format('%I.%I', n.nspname, c.relname) = g->>'table') t ON true
		)
		SELECT coalesce(jsonb_agg(g) FILTER (WHERE reloid IS NULL OR grantor IS NULL OR grantee IS NULL
		                                      OR g->>'privilege' NOT IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')
		                                      OR (g ? 'column' AND col IS NULL)), '[]'),
		       coalesce(jsonb_agg(jsonb_strip_nulls(jsonb_build_object('grantor', grantor, 'table', tbl, 'column', col, 'grantee', grantee,
		                'privilege', g->>'privilege', 'grantable', coalesce((g->>'grantable')::boolean, false)))), '[]')
		INTO v_bad, v_pending FROM resolved;
		IF jsonb_array_length(v_bad) > 0 AND v_dry THEN
			RETURN jsonb_build_object('dry', true);
		END IF;
		IF jsonb_array_length(v_bad) > 0 THEN
			RAISE EXCEPTION 'saved privileges name tables, columns or roles that no longer exist, or unknown privileges: %', v_bad;
		END IF;
		LOOP
			v_next := '[]';
			-- One GRANT per grantor, grantee, grant option and set of
			-- privileges, over every table given exactly that set (column
			-- privileges: per table and column): a statement per table
			-- cost 2.2 ms a grant (4.4 s at 509 tables).
			FOR v_g IN
				WITH per_table AS (
					SELECT g->>'grantor' AS grantor, g->>'table' AS tbl, g->>'column' AS col, g->>'grantee' AS grantee,
					       (g->>'grantable')::boolean AS grantable, string_agg(g->>'privilege', ', ' ORDER BY g->>'privilege') AS privs,
					       jsonb_agg(g) AS grants
					FROM jsonb_array_elements(v_pending) g
					GROUP BY 1, 2, 3, 4, 5
				), checked AS (
					-- A grantor without the grant option "grants" nothing,
					-- with only a warning: wait for the grant that gives it
					-- back.
					SELECT t.*, (SELECT bool_and(CASE WHEN t.col IS NULL
					                 THEN has_table_privilege(t.grantor, t.tbl, p || ' WITH GRANT OPTION')
					                 ELSE has_column_privilege(t.grantor, t.tbl::regclass,
					                          (SELECT a.attnum FROM pg_attribute a WHERE a.attrelid = t.tbl::regclass AND quote_ident(a.attname) = t.col),
					                          p || ' WITH GRANT OPTION') END)
					        FROM unnest(string_to_array(t.privs, ', ')) p) AS can
					FROM per_table t
				)
				SELECT c.grantor, c.col, c.grantee, c.grantable, c.privs, c.can,
				       string_agg(DISTINCT c.tbl, ', ' ORDER BY c.tbl) AS tbls, min(c.tbl) AS tbl,
				       jsonb_agg(e ORDER BY c.tbl) AS grants
				FROM checked c, jsonb_array_elements(c.grants) e
				GROUP BY c.grantor, c.grantee, c.grantable, c.privs, c.can, CASE WHEN c.col IS NULL THEN NULL ELSE c.tbl END, c.col
			LOOP
				IF v_dry THEN
					CONTINUE; -- resolved and planned; nothing granted
				END IF;
				IF NOT v_g.can THEN
					v_next := v_next || v_g.grants;
					v_err := format('%s holds no grant option to give %s on %s', v_g.grantor, v_g.privs, v_g.tbl);
					CONTINUE;
				END IF;
				BEGIN
					EXECUTE format('SET LOCAL ROLE %I', v_g.grantor);
					EXECUTE format('GRANT %s%s ON %s TO %s%s', v_g.privs, coalesce(' (' || v_g.col || ')', ''), v_g.tbls, v_g.grantee,
						CASE WHEN v_g.grantable THEN ' WITH GRANT OPTION' ELSE '' END);
					RESET ROLE;
					v_restored := v_restored + jsonb_array_length(v_g.grants);
					v_statements := v_statements + 1;
				EXCEPTION WHEN OTHERS THEN
					GET STACKED DIAGNOSTICS v_err = MESSAGE_TEXT;
					v_next := v_next || v_g.grants;
				END;
			END LOOP;
			EXIT WHEN v_dry OR jsonb_array_length(v_next) = 0;
			IF jsonb_array_length(v_next) = jsonb_array_length(v_pending) THEN
				RAISE EXCEPTION 'cannot restore % privilege(s): %', jsonb_array_length(v_next), v_err;
			END IF;
			v_pending := v_next;
		END LOOP;
	END IF;
	IF v_dry THEN
		RETURN jsonb_build_object('dry', true);
	END IF;
	IF p_keep_logins THEN
		-- Still fenced, by the locks (and PUBLIC's grants, kept saved).
		UPDATE ` + stateTable + ` SET epoch = p_epoch, saved = v_logins || v_public WHERE id;
		RETURN jsonb_build_object('restored', v_restored, 'statements', v_statements, 'was_fenced', true,
			'terminated', v_terminated, 'kept', jsonb_array_length(v_public), 'memberships', v_member);
	END IF;
	UPDATE ` + stateTable + `
	SET epoch = CASE WHEN p_break_glass THEN 0 ELSE p_epoch END, fenced = false, saved = '[]', logins_locked_at = NULL,
	    unfenced_at = CASE WHEN fenced THEN now() ELSE unfenced_at END,
	    unfenced_by = CASE WHEN fenced THEN p_plan || '/' || p_pair || CASE WHEN p_break_glass THEN ' (break-glass)' ELSE '' END ELSE unfenced_by END
	WHERE id;
	RETURN jsonb_build_object('restored', v_restored, 'statements', v_statements, 'was_fenced', v_fenced, 'unlocked', v_unlocked, 'memberships', v_member);
END
$unfence$`

// holdersFuncSQL lists the roles that could log in and write with the
// grants in p_saved once given back: the grantees (PUBLIC aside) and every
// role that is a member of one, directly or not (membership, not
// inheritance: a NOINHERIT member can SET ROLE), that may log in, is not
// a superuser (no fence stops one) and is not the agent.
const holdersFuncSQL = `
CREATE OR REPLACE FUNCTION ` + holdersFuncName + `(p_saved jsonb)
RETURNS SETOF text LANGUAGE sql STABLE SET search_path = ` + pinPath + ` AS $holders$
	WITH RECURSIVE holders AS (
		SELECT r.oid FROM pg_roles r
		WHERE quote_ident(r.rolname) IN (SELECT g->>'grantee' FROM jsonb_array_elements(p_saved) g
		                                 WHERE g->>'privilege' IS DISTINCT FROM 'LOGIN' AND g->>'grantee' <> 'PUBLIC')
		UNION SELECT m.member FROM pg_auth_members m JOIN holders h ON m.roleid = h.oid
	)
	SELECT r.rolname::text FROM holders h JOIN pg_roles r ON r.oid = h.oid
	WHERE r.rolcanlogin AND NOT r.rolsuper AND r.rolname <> current_user
	ORDER BY 1
$holders$`

// loginsFuncSQL is the login fence (LockLogins): every role that could log
// in and write with the saved grants is made NOLOGIN, and saved as a LOGIN
// entry for the unfence to unlock. Run on a database fenced by its grants;
// the grants can then come back before the window (unfence_v5 with
// p_keep_logins), so that the flip only unlocks logins. NOLOGIN holds for
// the whole cluster: the roles cannot log in to its other databases
// either until the unfence, so unless p_other_databases it refuses (CU005)
// while they may connect to another database of the cluster (but
// postgres and templates). Errors: CU001 stale epoch, CU002 not fenced,
// 42501 the agent may not alter the roles (it needs CREATEROLE, or to be a
// superuser for roles with REPLICATION or BYPASSRLS).
const loginsFuncSQL = `
CREATE OR REPLACE FUNCTION ` + loginsFuncName + `(p_plan text, p_pair text, p_epoch bigint, p_other_databases boolean)
RETURNS jsonb LANGUAGE plpgsql SET search_path = ` + pinPath + ` AS $logins$
DECLARE
	v_epoch bigint;
	v_fenced boolean;
	v_saved jsonb;
	v_role text;
	v_locked jsonb := '[]';
	v_dbs text;
BEGIN
	SELECT epoch, fenced, saved INTO v_epoch, v_fenced, v_saved FROM ` + stateTable + ` WHERE id FOR UPDATE;
	IF v_fenced IS NOT TRUE THEN
		RAISE EXCEPTION 'the database is not fenced' USING ERRCODE = 'CU002';
	END IF;
	IF v_epoch > p_epoch THEN
		RAISE EXCEPTION 'presented %, the database has seen %', p_epoch, v_epoch USING ERRCODE = 'CU001';
	END IF;
	IF NOT p_other_databases THEN
		-- NOLOGIN holds for the whole cluster: not while those roles may
		-- connect to another database of it (one already switched, say).
		SELECT string_agg(DISTINCT quote_ident(d.datname), ', ') INTO v_dbs
		FROM pg_database d, ` + holdersFuncName + `(v_saved) h
		WHERE d.datname <> current_database() AND d.datallowconn AND NOT d.datistemplate AND d.datname <> 'postgres'
		  AND has_database_privilege(h, d.oid, 'CONNECT');
		IF v_dbs IS NOT NULL THEN
			RAISE EXCEPTION 'the roles to lock may connect to other databases of this cluster (%), and a login lock would keep them out of those too', v_dbs USING ERRCODE = 'CU005';
		END IF;
	END IF;
	FOR v_role IN SELECT h FROM ` + holdersFuncName + `(v_saved) h LOOP
		EXECUTE format('ALTER ROLE %I NOLOGIN', v_role);
		v_locked := v_locked || jsonb_build_object('privilege', 'LOGIN', 'grantee', quote_ident(v_role));
	END LOOP;
	UPDATE ` + stateTable + `
	SET saved = saved || v_locked, epoch = p_epoch, plan = p_plan, pair = p_pair,
	    logins_locked_at = CASE WHEN jsonb_array_length(v_locked) > 0 OR logins_locked_at IS NULL THEN clock_timestamp() ELSE logins_locked_at END
	WHERE id;
	RETURN jsonb_build_object('locked', jsonb_array_length(v_locked),
		'logins', (SELECT coalesce(jsonb_agg(g->>'grantee'), '[]') FROM jsonb_array_elements(v_saved || v_locked) g WHERE g->>'privilege' = 'LOGIN'),
		'locked_at', (SELECT logins_locked_at FROM ` + stateTable + ` WHERE id));
END
$logins$`

// proxyFuncSQL moves the fenced roles' write grants on the tables in
// scope to write proxies, before the window (Prepare), in one
// transaction: each grantee's grants go to a NOLOGIN role of its own,
// cutover_w_<hash of the database's and the grantee's names> (roles are
// the cluster's, and a membership revoked for one database must not fence
// another), given by the same grantor, and
// the grantee is made a member of it. The grantee's privileges do not
// change (it inherits them), so the application never notices; the fence
// then takes them away with one REVOKE of the membership per grantee,
// whatever the number of tables (fence_v5), and the unfence gives the
// membership back. What was moved is recorded in the fence state
// (proxied), so that unproxy_v1 moves it back exactly, and so that a
// fence by any agent finds the proxies.
//
// Left granted directly, to be revoked table by table by the fence as
// before: grants WITH GRANT OPTION (and so what was granted with them),
// PUBLIC's, grants to a NOINHERIT role (it would lose them: PostgreSQL 15
// has no per-grant INHERIT) and an owner's own privileges on its table.
// The result counts them. Nothing is done on a fenced database (its
// fence already holds). Errors: 42501 the agent may not create roles
// (CREATEROLE), CU006 a role named like a proxy exists that cutover did
// not create.
const proxyFuncSQL = `
CREATE OR REPLACE FUNCTION ` + proxyFuncName + `(p_tables oid[], p_roles text[])
RETURNS jsonb LANGUAGE plpgsql SET search_path = ` + pinPath + ` AS $proxy$
DECLARE
	v_fenced boolean;
	v_proxied jsonb;
	v_roles oid[];
	v_current jsonb;
	v_move jsonb;
	v_direct jsonb;
	v_p record;
	v_stmt record;
	v_created int := 0;
	v_statements int := 0;
BEGIN
	INSERT INTO ` + stateTable + ` (id, epoch, fenced) VALUES (true, 0, false) ON CONFLICT DO NOTHING;
	SELECT fenced, proxied INTO v_fenced, v_proxied FROM ` + stateTable + ` WHERE id FOR UPDATE;
	IF v_fenced THEN
		RETURN jsonb_build_object('skipped', 'fenced', 'proxies',
			(SELECT coalesce(jsonb_agg(DISTINCT e->>'proxy'), '[]') FROM jsonb_array_elements(v_proxied) e));
	END IF;
	IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = current_user AND (rolsuper OR rolcreaterole)) THEN
		RAISE EXCEPTION 'the agent''s role % may not create the write proxies (it needs CREATEROLE)', current_user USING ERRCODE = '42501';
	END IF;
	-- The fenced roles, as fence_v5 resolves them.
	WITH RECURSIVE agent_roles AS (
		SELECT r.oid FROM pg_roles r WHERE r.rolname = current_user
		UNION SELECT m.roleid FROM pg_auth_members m JOIN agent_roles a ON m.member = a.oid
	), closure AS (
		SELECT r.oid FROM pg_roles r
		WHERE CASE WHEN cardinality(p_roles) > 0
		           THEN r.rolname = ANY(p_roles)
		           ELSE NOT r.rolsuper AND r.oid NOT IN (SELECT oid FROM agent_roles) AND r.rolname NOT LIKE 'pg\_%' END
		UNION SELECT m.roleid FROM pg_auth_members m JOIN closure c ON m.member = c.oid
	)
	SELECT coalesce(array_agg(c.oid), '{}') INTO v_roles
	FROM closure c JOIN pg_roles r ON r.oid = c.oid
	WHERE NOT r.rolsuper AND r.rolname <> current_user
	  AND r.rolname NOT IN (SELECT e->>'proxy' FROM jsonb_array_elements(v_proxied) e);
	v_current := ` + writeACLName + `(p_tables, v_roles, true);
	SELECT coalesce(jsonb_agg(g || jsonb_build_object('proxy', 'cutover_w_' || left(md5(current_database() || '/' || r.rolname), 16)))
	                FILTER (WHERE NOT (g->>'grantable')::boolean AND r.rolinherit AND c.relowner <> r.oid), '[]'),
	       coalesce(jsonb_agg(g || jsonb_build_object('why', CASE WHEN (g->>'grantable')::boolean THEN 'grant option'
	                WHEN NOT r.rolinherit THEN 'noinherit' ELSE 'owner' END))
	                FILTER (WHERE (g->>'grantable')::boolean OR NOT r.rolinherit OR c.relowner = r.oid), '[]')
	INTO v_move, v_direct
	FROM jsonb_array_elements(v_current) g
	JOIN pg_roles r ON quote_ident(r.rolname) = g->>'grantee'
	JOIN pg_class c ON c.oid = to_regclass(g->>'table');
	-- One proxy per grantee, created here unless cutover created it
	-- before (its comment says so).
	FOR v_p IN
		SELECT DISTINCT g->>'proxy' AS proxy, r.rolname AS grantee, x.oid AS existing, x.rolcanlogin, x.rolsuper,
		       shobj_description(x.oid, 'pg_authid') AS note
		FROM jsonb_array_elements(v_move) g
		JOIN pg_roles r ON quote_ident(r.rolname) = g->>'grantee'
		LEFT JOIN pg_roles x ON x.rolname = g->>'proxy'
	LOOP
		IF v_p.existing IS NULL THEN
			EXECUTE format('CREATE ROLE %I NOLOGIN', v_p.proxy);
			EXECUTE format('COMMENT ON ROLE %I IS %L', v_p.proxy, 'cutover write proxy of ' || v_p.grantee || ' on ' || current_database());
			v_created := v_created + 1;
		ELSIF v_p.rolcanlogin OR v_p.rolsuper OR v_p.note IS DISTINCT FROM 'cutover write proxy of ' || v_p.grantee || ' on ' || current_database() THEN
			RAISE EXCEPTION 'role % exists and is not a write proxy cutover created for %', v_p.proxy, v_p.grantee USING ERRCODE = 'CU006';
		END IF;
		IF NOT pg_has_role(v_p.grantee, v_p.proxy, 'MEMBER') THEN
			EXECUTE format('GRANT %I TO %I', v_p.proxy, v_p.grantee);
		END IF;
	END LOOP;
	-- Grouped as the fence groups its REVOKEs: per grantor, grantee and
	-- set of privileges over every table given that set.
	FOR v_stmt IN
		SELECT t.grantor, t.proxy, t.privs, t.grantee, string_agg(t.tbl, ', ' ORDER BY t.tbl) AS tbls
		FROM (SELECT g->>'grantor' AS grantor, g->>'table' AS tbl, g->>'column' AS col, g->>'grantee' AS grantee, g->>'proxy' AS proxy,
		             string_agg((g->>'privilege') || coalesce(' (' || (g->>'column') || ')', ''), ', ' ORDER BY g->>'privilege') AS privs
		      FROM jsonb_array_elements(v_move) g
		      GROUP BY 1, 2, 3, 4, 5) t
		GROUP BY t.grantor, t.grantee, t.proxy, t.privs, CASE WHEN t.col IS NULL THEN NULL ELSE t.tbl END, t.col
	LOOP
		EXECUTE format('SET LOCAL ROLE %I', v_stmt.grantor);
		EXECUTE format('GRANT %s ON %s TO %I', v_stmt.privs, v_stmt.tbls, v_stmt.proxy);
		EXECUTE format('REVOKE %s ON %s FROM %s', v_stmt.privs, v_stmt.tbls, v_stmt.grantee);
		RESET ROLE;
		v_statements := v_statements + 1;
	END LOOP;
	UPDATE ` + stateTable + ` SET proxied = (
		SELECT coalesce(jsonb_agg(DISTINCT g), '[]') FROM jsonb_array_elements(v_proxied || v_move) g) WHERE id;
	RETURN jsonb_build_object('moved', jsonb_array_length(v_move), 'statements', v_statements, 'created', v_created,
		'proxies', (SELECT coalesce(jsonb_agg(DISTINCT e->>'proxy'), '[]') FROM jsonb_array_elements(v_proxied || v_move) e),
		'direct', (SELECT coalesce(jsonb_object_agg(w, n), '{}') FROM (
			SELECT g->>'why' AS w, count(*) AS n FROM jsonb_array_elements(v_direct) g GROUP BY 1) d));
END
$proxy$`

// unproxyFuncSQL moves every grant proxy_v1 moved back to its grantee,
// each given by its grantor, and drops the proxies: when the database is
// no longer fenced (after the unfence; the fence state's memberships are
// back by then). A table dropped since takes its grants with it; a proxy
// that someone granted something else is left (and reported) rather than
// dropped with it. Nothing is done while fenced: the fence is the
// proxies' membership. Names are resolved against the catalogs before
// anything runs, as unfence_v6 does.
const unproxyFuncSQL = `
CREATE OR REPLACE FUNCTION ` + unproxyFuncName + `()
RETURNS jsonb LANGUAGE plpgsql SET search_path = ` + pinPath + ` AS $unproxy$
DECLARE
	v_fenced boolean;
	v_proxied jsonb;
	v_back jsonb;
	v_stmt record;
	v_p record;
	v_statements int := 0;
	v_dropped int := 0;
	v_kept jsonb := '[]';
BEGIN
	SELECT fenced, proxied INTO v_fenced, v_proxied FROM ` + stateTable + ` WHERE id FOR UPDATE;
	IF v_fenced IS NULL OR jsonb_array_length(v_proxied) = 0 THEN
		RETURN '{}';
	END IF;
	IF v_fenced THEN
		RETURN jsonb_build_object('skipped', 'fenced');
	END IF;
	SELECT coalesce(jsonb_agg(jsonb_strip_nulls(jsonb_build_object('grantor', gr.rolname, 'grantee', quote_ident(ge.rolname), 'proxy', px.rolname,
	               'table', t.name, 'column', (SELECT quote_ident(a.attname) FROM pg_attribute a
	                   WHERE a.attrelid = t.oid AND quote_ident(a.attname) = g->>'column' AND NOT a.attisdropped),
	               'privilege', g->>'privilege'))), '[]')
	INTO v_back
	FROM jsonb_array_elements(v_proxied) g
	JOIN LATERAL (
		SELECT c.oid, format('%I.%I', n.nspname, c.relname) AS name
		FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE c.oid = CASE WHEN g->>'table' ~ '^("([^"]|"")+"|[a-z_][a-z0-9_]*)\.("([^"]|"")+"|[a-z_][a-z0-9_]*)$'
		                   THEN to_regclass(g->>'table') END
		  AND c.relkind IN ('r', 'p') AND format('%I.%I', n.nspname, c.relname) = g->>'table') t ON true
	JOIN pg_roles gr ON gr.rolname = g->>'grantor'
	JOIN pg_roles ge ON quote_ident(ge.rolname) = g->>'grantee'
	JOIN pg_roles px ON px.rolname = g->>'proxy' AND px.rolname LIKE 'cutover\_w\_%'
	WHERE g->>'privilege' IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')
	  AND (NOT g ? 'column' OR EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = t.oid AND quote_ident(a.attname) = g->>'column' AND NOT a.attisdropped));
	FOR v_stmt IN
		SELECT t.grantor, t.proxy, t.privs, t.grantee, string_agg(t.tbl, ', ' ORDER BY t.tbl) AS tbls
		FROM (SELECT g->>'grantor' AS grantor, g->>'table' AS tbl, g->>'column' AS col, g->>'grantee' AS grantee, g->>'proxy' AS proxy,
		             string_agg((g->>'privilege') || coalesce(' (' || (g->>'column') || ')', ''), ', ' ORDER BY g->>'privilege') AS privs
		      FROM jsonb_array_elements(v_back) g
		      GROUP BY 1, 2, 3, 4, 5) t
		GROUP BY t.grantor, t.grantee, t.proxy, t.privs, CASE WHEN t.col IS NULL THEN NULL ELSE t.tbl END, t.col
	LOOP
		EXECUTE format('SET LOCAL ROLE %I', v_stmt.grantor);
		EXECUTE format('GRANT %s ON %s TO %s', v_stmt.privs, v_stmt.tbls, v_stmt.grantee);
		EXECUTE format('REVOKE %s ON %s FROM %I', v_stmt.privs, v_stmt.tbls, v_stmt.proxy);
		RESET ROLE;
		v_statements := v_statements + 1;
	END LOOP;
	FOR v_p IN
		SELECT DISTINCT p.rolname AS proxy FROM jsonb_array_elements(v_proxied) g
		JOIN pg_roles p ON p.rolname = g->>'proxy' AND p.rolname LIKE 'cutover\_w\_%'
	LOOP
		BEGIN
			EXECUTE format('DROP ROLE %I', v_p.proxy);
			v_dropped := v_dropped + 1;
		EXCEPTION WHEN dependent_objects_still_exist THEN
			v_kept := v_kept || to_jsonb(v_p.proxy::text);
		END;
	END LOOP;
	UPDATE ` + stateTable + ` SET proxied = '[]' WHERE id;
	RETURN jsonb_build_object('moved_back', jsonb_array_length(v_back), 'statements', v_statements, 'dropped', v_dropped, 'kept', v_kept);
END
$unproxy$`

// refuseFuncSQL cancels, on the holding session right before it lets go,
// the writes waiting on the hold that would land once released: those of
// roles the fence does not stop (a superuser, a role still holding a
// write privilege: see HeldBreaches), and those of roles fenced by a
// write proxy, any of which may have done SET ROLE to the proxy before
// the fence (it keeps the proxy's grants: PostgreSQL 15 cannot grant a
// membership without SET); the rest of them would fail on the fence
// anyway. It then waits, at most p_wait_ms, for the cancelled statements
// to leave the lock queue (a cancel is a signal: it takes effect a moment
// later); a statement is told by its session and start, so that a writer
// retrying at once is not waited for. It returns the outsiders cancelled.
// Run on the holding session, in its transaction, with the ROLLBACK that
// ends the hold in the same round trip; pg_stat_activity is read afresh
// each time (a transaction otherwise keeps its first view).
const refuseFuncSQL = `
CREATE OR REPLACE FUNCTION ` + refuseFuncName + `(p_tables oid[], p_wait_ms int)
RETURNS jsonb LANGUAGE plpgsql SET search_path = ` + pinPath + ` AS $refuse$
DECLARE
	v_pids int[];
	v_starts timestamptz[];
	v_outsiders jsonb;
	v_members int;
	v_deadline timestamptz := clock_timestamp() + p_wait_ms * interval '1 millisecond';
BEGIN
	PERFORM pg_stat_clear_snapshot();
	WITH waiting AS (
		SELECT DISTINCT a.pid, a.usesysid, a.usename, a.application_name, a.state, a.xact_start, a.query_start
		FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid
		WHERE a.backend_type = 'client backend' AND NOT l.granted AND l.relation = ANY(p_tables)
		  AND l.mode IN ('RowExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')
	), outsiders AS (
		SELECT w.* FROM waiting w WHERE EXISTS (
			SELECT 1 FROM pg_locks l
			WHERE l.pid = w.pid AND NOT l.granted AND l.relation = ANY(p_tables)
			  AND l.mode IN ('RowExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')
			  AND (has_table_privilege(w.usesysid, l.relation, 'INSERT') OR has_table_privilege(w.usesysid, l.relation, 'UPDATE')
			       OR has_table_privilege(w.usesysid, l.relation, 'DELETE') OR has_table_privilege(w.usesysid, l.relation, 'TRUNCATE')))
	), members AS (
		SELECT w.* FROM waiting w WHERE EXISTS (
			SELECT 1 FROM ` + stateTable + ` s, jsonb_array_elements(s.saved) g, pg_roles r
			WHERE s.fenced AND g->>'privilege' = 'MEMBER' AND quote_ident(r.rolname) = g->>'grantee'
			  AND pg_has_role(w.usesysid, r.oid, 'MEMBER'))
	), targets AS (
		SELECT pid, query_start FROM outsiders UNION SELECT pid, query_start FROM members
	), cancelled AS (
		SELECT t.pid, t.query_start FROM targets t WHERE pg_cancel_backend(t.pid)
	)
	SELECT (SELECT coalesce(array_agg(c.pid), '{}') FROM cancelled c),
	       (SELECT coalesce(array_agg(c.query_start), '{}') FROM cancelled c),
	       (SELECT coalesce(jsonb_agg(jsonb_build_object('pid', o.pid, 'user', coalesce(o.usename::text, ''),
	                'application', coalesce(o.application_name, ''), 'state', coalesce(o.state, ''),
	                'xact_age_us', coalesce((extract(epoch FROM now() - o.xact_start) * 1e6)::bigint, 0)) ORDER BY o.pid), '[]') FROM outsiders o),
	       (SELECT count(*) FROM members)
	INTO v_pids, v_starts, v_outsiders, v_members;
	LOOP
		EXIT WHEN cardinality(v_pids) = 0 OR clock_timestamp() > v_deadline;
		PERFORM pg_stat_clear_snapshot();
		EXIT WHEN NOT EXISTS (
			SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
			JOIN unnest(v_pids, v_starts) c(pid, started) ON c.pid = a.pid AND c.started = a.query_start
			WHERE NOT l.granted AND l.relation = ANY(p_tables));
		PERFORM pg_sleep(0.001);
	END LOOP;
	RETURN jsonb_build_object('outsiders', v_outsiders, 'proxy_members', v_members);
END
$refuse$`

// serverObjects are created at Prepare unless already there with the same
// body (pg_proc.prosrc is the text between the dollar quotes).
var serverObjects = []struct{ name, sql, body string }{
	{drainFuncName, drainFuncSQL, strings.Split(drainFuncSQL, "$drain$")[1]},
	{writeACLName, writeACLSQL, strings.Split(writeACLSQL, "$acl$")[1]},
	{fenceProcName, fenceProcSQL, strings.Split(fenceProcSQL, "$proc$")[1]},
	{holdersFuncName, holdersFuncSQL, strings.Split(holdersFuncSQL, "$holders$")[1]},
	{unfenceFuncName, unfenceFuncSQL, strings.Split(unfenceFuncSQL, "$unfence$")[1]},
	{loginsFuncName, loginsFuncSQL, strings.Split(loginsFuncSQL, "$logins$")[1]},
	{proxyFuncName, proxyFuncSQL, strings.Split(proxyFuncSQL, "$proxy$")[1]},
	{unproxyFuncName, unproxyFuncSQL, strings.Split(unproxyFuncSQL, "$unproxy$")[1]},
	{refuseFuncName, refuseFuncSQL, strings.Split(refuseFuncSQL, "$refuse$")[1]},
}

// createFenceProc creates the server-side functions unless they are there
// already with these bodies. Agents preparing at the same moment may
// collide on the catalog row; the check is then retried.
func createFenceProc(ctx context.Context, pool *pgxpool.Pool) error {
	for _, obj := range serverObjects {
		var err error
		for attempt := 0; attempt < 5; attempt++ {
			var body *string
			err = pool.QueryRow(ctx, `SELECT prosrc FROM pg_catalog.pg_proc WHERE oid = pg_catalog.to_regproc($1)`, obj.name).Scan(&body)
			if err != nil && !errors.Is(err, pgx.ErrNoRows) {
				return fmt.Errorf("fence: look up %s: %w", obj.name, err)
			}
			if body != nil && *body == obj.body {
				break
			}
			if _, err = pool.Exec(ctx, obj.sql); err == nil {
				break
			}
			time.Sleep(time.Duration(attempt+1) * 10 * time.Millisecond)
		}
		if err != nil {
			return fmt.Errorf("fence: create %s: %w", obj.name, err)
		}
	}
	return nil
}

// setUp makes the bookkeeping ready on the database: the schema checked
// (before and after creating what is missing: a role that is not the
// agent's nor a superuser must own nothing in it), the state table and the
// server-side functions created, and a fence left by v2's per-plan state
// folded into the database's state.
func (f *Fencer) setUp(ctx context.Context) error {
	if err := pgsafe.CheckSchema(ctx, f.pool, "cutover"); err != nil {
		return fmt.Errorf("fence: %w", err)
	}
	if _, err := f.pool.Exec(ctx, SchemaSQL); err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42501" {
			return fmt.Errorf("fence: the agent's role may not create schema cutover (%s): connect as a superuser or the tables' owner with CREATE on the database", pgErr.Message)
		}
		return fmt.Errorf("fence: create cutover schema: %w", err)
	}
	if err := createFenceProc(ctx, f.pool); err != nil {
		return err
	}
	if err := pgsafe.CheckSchema(ctx, f.pool, "cutover"); err != nil {
		return fmt.Errorf("fence: %w", err)
	}
	return f.migrateLegacy(ctx)
}

// migrateLegacy folds the fences left in v2's per-plan state table into the
// database's state, so that an upgrade forgets no fence: their saved grants
// join what is saved (table names made schema qualified the way v2's
// sessions resolved them), the highest epoch is kept, and the old rows are
// marked unfenced.
func (f *Fencer) migrateLegacy(ctx context.Context) error {
	var exists bool
	if err := f.pool.QueryRow(ctx, `SELECT pg_catalog.to_regclass($1) IS NOT NULL`, legacyStateTable).Scan(&exists); err != nil {
		return fmt.Errorf("fence: look up %s: %w", legacyStateTable, err)
	}
	if !exists {
		return nil
	}
	err := pgx.BeginFunc(ctx, f.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `INSERT INTO `+stateTable+` (id, epoch, fenced) VALUES (true, 0, false) ON CONFLICT DO NOTHING`); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `SELECT 1 FROM `+stateTable+` WHERE id FOR UPDATE`); err != nil {
			return err
		}
		type legacy struct {
			plan, pair string
			epoch      int64
			since      *time.Time
			saved      []byte
		}
		rows, err := tx.Query(ctx, `
			SELECT plan, pair, epoch, fenced_at, (
				SELECT coalesce(jsonb_agg(CASE WHEN c.oid IS NULL THEN g
					ELSE jsonb_set(g, '{table}', to_jsonb(format('%I.%I', n.nspname, c.relname))) END), '[]')
				FROM jsonb_array_elements(saved) g
				LEFT JOIN pg_class c ON c.oid = to_regclass(g->>'table')
				LEFT JOIN pg_namespace n ON n.oid = c.relnamespace)
			FROM `+legacyStateTable+` WHERE fenced ORDER BY epoch FOR UPDATE`)
		if err != nil {
			return err
		}
		olds, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (legacy, error) {
			var l legacy
			err := r.Scan(&l.plan, &l.pair, &l.epoch, &l.since, &l.saved)
			return l, err
		})
		if err != nil {
			return err
		}
		for _, l := range olds {
			_, err := tx.Exec(ctx, `
				UPDATE `+stateTable+` s SET
					saved = (SELECT coalesce(jsonb_agg(g), '[]') FROM (
						SELECT DISTINCT ON (g->>'table', g->>'column', g->>'grantor', g->>'grantee', g->>'privilege') g
						FROM (SELECT g, 0 AS src FROM jsonb_array_elements(CASE WHEN s.fenced THEN s.saved ELSE '[]' END) g
						      UNION ALL SELECT g, 1 FROM jsonb_array_elements($1::jsonb) g) u
						ORDER BY g->>'table', g->>'column', g->>'grantor', g->>'grantee', g->>'privilege', src) d),
					epoch = greatest(s.epoch, $2), fenced = true,
					plan = CASE WHEN s.fenced THEN s.plan ELSE $3 END, pair = CASE WHEN s.fenced THEN s.pair ELSE $4 END,
					fenced_at = CASE WHEN s.fenced THEN s.fenced_at ELSE coalesce($5, now()) END, unfenced_at = NULL, unfenced_by = NULL
				WHERE id`, l.saved, l.epoch, l.plan, l.pair, l.since)
			if err != nil {
				return err
			}
			f.log.Warn("folded a fence left by an older agent into the database's fence state", zap.String("old_plan", l.plan), zap.String("old_pair", l.pair), zap.Int64("old_epoch", l.epoch))
		}
		_, err = tx.Exec(ctx, `UPDATE `+legacyStateTable+` SET fenced = false, saved = '[]', unfenced_at = now() WHERE fenced`)
		return err
	})
	if err != nil {
		return fmt.Errorf("fence: fold %s into %s: %w", legacyStateTable, stateTable, err)
	}
	return nil
}

// Prepare checks that the tables exist and have keys the fence can lock,
// that the agent may change their privileges, and that the fenced roles are
// not superusers (a superuser cannot be fenced); readies the bookkeeping
// (see setUp: the schema's owners are checked first); and refuses a fence
// that would stop no role but PUBLIC. It changes no privilege.
func (f *Fencer) Prepare(ctx context.Context) error {
	if len(f.opts.Tables) == 0 {
		return errors.New("fence: no tables in scope")
	}
	if f.opts.Hold > 0 && f.pool.Config().MaxConns < warmSessions {
		return fmt.Errorf("fence: holding the drain's lock takes a session of its own: the pool needs at least %d connections, it has %d", warmSessions, f.pool.Config().MaxConns)
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
	if err := checkLockCapacity(ctx, f.pool, oids); err != nil {
		return err
	}
	if err := f.setUp(ctx); err != nil {
		return err
	}
	// A fence that would stop no application role is refused now, before
	// anything is changed: a superuser agent once fenced only PUBLIC, and
	// the application wrote on.
	dry, err := f.callOn(ctx, f.pool, 0, 0, 0, "", oids)
	if err != nil {
		return fmt.Errorf("fence: dry run: %w", err)
	}
	if !slices.ContainsFunc(dry.Holders, func(h string) bool { return h != "PUBLIC" }) {
		who := "every role that is not a superuser, the agent's or one it is a member of"
		if len(f.opts.Roles) > 0 {
			who = strings.Join(f.opts.Roles, ", ")
		}
		held := "no write privilege"
		if len(dry.Holders) > 0 {
			held = "only PUBLIC's write privileges"
		}
		return fmt.Errorf("fence: the fence would take %s on the tables in scope from %s (and the roles they are members of): it would stop no application role; name the application's roles in fence_roles, or grant them their privileges", held, who)
	}
	if f.proxying() {
		if err := f.proxy(ctx, oids); err != nil {
			if f.opts.WriteProxy == ProxyOn || !errors.Is(err, ErrWriteProxyUnavailable) {
				return err
			}
			f.log.Warn("the fence stays on the grants, revoked table by table inside the write outage: grant the agent's role CREATEROLE, or set fence.blue: grants to silence this", zap.Error(err))
		}
	}
	f.tableOIDs = oids
	return f.Warm(ctx)
}

// ErrWriteProxyUnavailable: the agent's role may not create the write
// proxies (it needs CREATEROLE), or a role named like one exists that
// cutover did not create. Nothing is changed.
var ErrWriteProxyUnavailable = errors.New("the write proxies cannot be set up")

// proxy moves the fenced roles' write grants to write proxies (see
// proxyFuncSQL), outside the outage, in one transaction.
func (f *Fencer) proxy(ctx context.Context, oids []uint32) error {
	start := time.Now()
	roles := f.opts.Roles
	if roles == nil {
		roles = []string{}
	}
	var raw []byte
	err := f.pool.QueryRow(ctx, "SELECT "+proxyFuncName+"($1::oid[], $2::text[])", pgx.QueryExecModeSimpleProtocol, oids, roles).Scan(&raw)
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && (pgErr.Code == "42501" || pgErr.Code == "CU006") {
			return fmt.Errorf("fence: %w: %s", ErrWriteProxyUnavailable, pgErr.Message)
		}
		return fmt.Errorf("fence: move the write grants to proxies: %w", err)
	}
	var res struct {
		Moved      int            `json:"moved"`
		Statements int            `json:"statements"`
		Created    int            `json:"created"`
		Proxies    []string       `json:"proxies"`
		Direct     map[string]int `json:"direct"`
		Skipped    string         `json:"skipped"`
	}
	if err := json.Unmarshal(raw, &res); err != nil {
		return fmt.Errorf("fence: proxy result: %w", err)
	}
	fields := []zap.Field{zap.Int("grants_moved", res.Moved), zap.Int("statements", res.Statements), zap.Int("proxies_created", res.Created),
		zap.Strings("proxies", res.Proxies), zap.String("skipped", res.Skipped), zap.Duration("took", time.Since(start))}
	if len(res.Direct) > 0 {
		// Still correct: the fence revokes them the old way.
		f.log.Warn("some write grants stay direct and the fence revokes them table by table inside the write outage (grant options, NOINHERIT grantees, owners' own privileges)",
			append(fields, zap.Any("direct", res.Direct))...)
		return nil
	}
	f.log.Info("write grants moved to write proxies", fields...)
	return nil
}

// unproxy moves the grants back from the write proxies and drops them,
// once the database is no longer fenced (see unproxyFuncSQL).
func (f *Fencer) unproxy(ctx context.Context) error {
	start := time.Now()
	var raw []byte
	if err := f.pool.QueryRow(ctx, "SELECT "+unproxyFuncName+"()", pgx.QueryExecModeSimpleProtocol).Scan(&raw); err != nil {
		return fmt.Errorf("move the write grants back from the proxies: %w", err)
	}
	var res struct {
		MovedBack  int      `json:"moved_back"`
		Statements int      `json:"statements"`
		Dropped    int      `json:"dropped"`
		Kept       []string `json:"kept"`
	}
	if err := json.Unmarshal(raw, &res); err != nil {
		return fmt.Errorf("unproxy result: %w", err)
	}
	if res.MovedBack == 0 && res.Dropped == 0 && len(res.Kept) == 0 {
		return nil
	}
	fields := []zap.Field{zap.Int("grants_moved_back", res.MovedBack), zap.Int("statements", res.Statements), zap.Int("proxies_dropped", res.Dropped), zap.Duration("took", time.Since(start))}
	if len(res.Kept) > 0 {
		f.log.Warn("write proxies kept: they hold privileges cutover did not give them", append(fields, zap.Strings("kept", res.Kept))...)
		return nil
	}
	f.log.Info("write grants moved back from the write proxies", fields...)
	return nil
}

// checkLockCapacity refuses tables the drain could not lock all at once:
// it holds a SHARE lock on every table in scope (partitions included, as
// LOCK TABLE takes them) in one transaction, and the server's lock table
// is shared by every session, max_locks_per_transaction x
// (max_connections + max_prepared_transactions) entries in all. Past that
// the drain would fail inside the outage with "out of shared memory";
// half of it is left to the application.
func checkLockCapacity(ctx context.Context, pool *pgxpool.Pool, oids []uint32) error {
	var locks, perTx, capacity int64
	err := pool.QueryRow(ctx, `
		SELECT (SELECT count(*) FROM pg_catalog.pg_class c
		        WHERE c.oid = ANY($1::oid[]) OR c.oid IN (SELECT i.inhrelid FROM pg_catalog.pg_inherits i WHERE i.inhparent = ANY($1::oid[]))),
		       current_setting('max_locks_per_transaction')::bigint,
		       current_setting('max_locks_per_transaction')::bigint *
		       (current_setting('max_connections')::bigint + current_setting('max_prepared_transactions')::bigint)`, oids).Scan(&locks, &perTx, &capacity)
	if err != nil {
		return fmt.Errorf("fence: read the lock table's size: %w", err)
	}
	if 2*locks > capacity {
		conns := capacity / perTx
		need := (2*locks + conns - 1) / conns
		return fmt.Errorf("fence: the drain locks %d tables at once, more than half of the server's lock table (max_locks_per_transaction %d x %d connections = %d locks, shared by every session): set max_locks_per_transaction to at least %d (a restart), or narrow the scope", locks, perTx, conns, capacity, need)
	}
	return nil
}

// warmSessions is how many sessions Warm makes ready: one for the fence,
// one for the hold.
const warmSessions = 2

// Warm readies the pool's sessions for the fence: on a session that has
// never run them, the fence procedure and the drain function are compiled
// and their queries planned on first use, which under load cost the
// outage 10-20 ms (cold backend caches included). Call it right before
// fencing, outside the outage (Prepare does too): it makes sure two
// sessions exist and warms every idle one not warmed yet. A dry run, it
// changes nothing.
func (f *Fencer) Warm(ctx context.Context) error {
	if f.tableOIDs == nil {
		return errors.New("warm: Prepare has not run")
	}
	var conns []*pgxpool.Conn
	defer func() {
		for _, c := range conns {
			c.Release()
		}
	}()
	for len(conns) < min(warmSessions, int(f.pool.Config().MaxConns)) {
		c, err := f.pool.Acquire(ctx)
		if err != nil {
			return fmt.Errorf("warm: %w", err)
		}
		conns = append(conns, c)
	}
	conns = append(conns, f.pool.AcquireAllIdle(ctx)...)
	for _, c := range conns {
		pid := c.Conn().PgConn().PID()
		f.mu.Lock()
		done := f.warmed[pid]
		f.mu.Unlock()
		if done {
			continue
		}
		if err := f.warmSession(ctx, c.Conn()); err != nil {
			return fmt.Errorf("warm: %w", err)
		}
		f.mu.Lock()
		if f.warmed == nil {
			f.warmed = map[uint32]bool{}
		}
		f.warmed[pid] = true
		f.mu.Unlock()
	}
	return nil
}

// warmSession runs the fence procedure as a dry run and the drain
// function on no table, as the fence would run them (simple protocol).
func (f *Fencer) warmSession(ctx context.Context, conn *pgx.Conn) error {
	if _, err := f.callOn(ctx, conn, 0, 0, 0, "", f.tableOIDs); err != nil {
		return err
	}
	_, err := conn.PgConn().Exec(ctx, fmt.Sprintf("SELECT %s('{}'::oid[], 1, 0); SELECT %s(NULL, NULL, NULL, NULL, NULL)", drainFuncName, unfenceFuncName)).ReadAll()
	return err
}

// WarmUnfence readies the pool's sessions for Unfence: each resolves the
// saved grants against the catalogs and plans the statements that restore
// them, as a dry run that changes nothing. Call it right before a window
// whose end unfences this side (green at the flip), when the fence and its
// saved grants are what the unfence will find: a session's first unfence
// otherwise spends 70-100 ms on catalog lookups and planning inside the
// write outage.
func (f *Fencer) WarmUnfence(ctx context.Context) error {
	var conns []*pgxpool.Conn
	defer func() {
		for _, c := range conns {
			c.Release()
		}
	}()
	for len(conns) < min(warmSessions, int(f.pool.Config().MaxConns)) {
		c, err := f.pool.Acquire(ctx)
		if err != nil {
			return fmt.Errorf("warm unfence: %w", err)
		}
		conns = append(conns, c)
	}
	conns = append(conns, f.pool.AcquireAllIdle(ctx)...)
	for _, c := range conns {
		if _, err := c.Conn().PgConn().Exec(ctx, "SELECT "+unfenceFuncName+"('', '', NULL, false, false)").ReadAll(); err != nil {
			return fmt.Errorf("warm unfence: %w", err)
		}
	}
	return nil
}

// Fence revokes the write privileges of the fenced roles on the tables in
// scope, after saving them. Calling it again (same or higher epoch) revokes
// whatever was granted since, and keeps the first saved state.
func (f *Fencer) Fence(ctx context.Context, epoch uint64) error {
	start := time.Now()
	res, err := f.call(ctx, epoch, partFence, 0, "")
	if err != nil {
		return fmt.Errorf("fence %s/%s: %w", f.opts.Plan, f.opts.Pair, err)
	}
	f.log.Info("fenced", zap.Uint64("epoch", epoch), zap.Int("revokes", res.Revoked), zap.Int("memberships_revoked", res.MembershipsRevoked), zap.Duration("took", time.Since(start)))
	return nil
}

// FenceDrain is Fence followed by Drain in one round trip to the server
// (two with Options.Hold: the REVOKE and the holding session's lock at
// once, then the marker): the outage starts with it, and every round trip
// on a busy server costs milliseconds while writers go on writing. Its
// outcome is the same as calling both: the REVOKE is committed (and saved)
// when it returns, so when the drain fails the fence stays up and must be
// lifted with Unfence.
func (f *Fencer) FenceDrain(ctx context.Context, epoch uint64, grace time.Duration) (fencing.Drained, error) {
	return f.drain(ctx, epoch, grace, true)
}

// Unfence gives back every saved privilege, each granted by its original
// grantor, in one round trip (see unfenceFuncSQL).
//
// It also ends this Fencer's hold on the tables (Options.Hold), after the
// privileges are back so that the writers it kept waiting go on, and
// whether or not the unfence succeeded: a lift never leaves writers waiting.
func (f *Fencer) Unfence(ctx context.Context, epoch uint64) error {
	if f.tableOIDs == nil {
		return errors.New("unfence: Prepare has not run")
	}
	defer f.Release(ctx)
	start := time.Now()
	res, err := f.unfence(ctx, epoch, false, false)
	if err != nil {
		return fmt.Errorf("unfence %s/%s: %w", f.opts.Plan, f.opts.Pair, err)
	}
	f.log.Info("unfenced", zap.Uint64("epoch", epoch), zap.Int("privileges_restored", res.Restored), zap.Int("grant_statements", res.Statements), zap.Int("logins_unlocked", res.Unlocked), zap.Int("memberships_restored", res.Memberships), zap.Duration("took", time.Since(start)))
	if f.proxying() || res.Memberships > 0 {
		// The application writes again from the unfence's commit; the
		// grants go back to it directly after that, table by table. Also
		// for a Fencer made without proxies (a finalize, a later agent's)
		// that found proxy memberships to give back: nothing is left
		// moved.
		if err := f.unproxy(ctx); err != nil {
			return fmt.Errorf("unfence %s/%s: %w", f.opts.Plan, f.opts.Pair, err)
		}
	}
	return nil
}

// ErrLoginFenceUnavailable: the agent's role may not lock the fenced roles'
// logins (it needs CREATEROLE, or to be a superuser for roles with
// REPLICATION or BYPASSRLS). The fence stays on the grants.
var ErrLoginFenceUnavailable = errors.New("the agent's role may not lock the application roles' logins")

// ErrLoginFenceUnsafe: the roles to lock may connect to another database
// of the cluster, which a login lock (cluster-wide) would close to them
// too. Nothing is changed; the fence stays on the grants.
var ErrLoginFenceUnsafe = errors.New("a login lock would reach other databases")

// ErrLoginBreach: a session of a role whose login the fence locked is
// connected: it got in past the lock (or the lock was lifted by hand), and
// with the grants back it may have written. Unfence refuses; the grants
// must be fenced again before anything else.
var ErrLoginBreach = errors.New("a session of a role whose login is locked is connected")

// LoginShift is what ShiftToLogins did.
type LoginShift struct {
	// Logins are the roles whose logins are locked; Restored the grants
	// given back, in Statements GRANTs; Terminated the sessions of locked
	// roles ended before that; KeptPublic PUBLIC's grants, still saved
	// (the flip restores them).
	Logins                                       []string
	Restored, Statements, Terminated, KeptPublic int
}

// ShiftToLogins turns a fence on the grants into a fence on logins, for a
// side that takes no application session until the window ends (green):
// every role that could log in and write with the saved grants is made
// NOLOGIN (saved for the unfence), and after settle, once any session
// that logged in as one of them before the lock is ended, the grants come
// back. The unfence at the flip then unlocks a few roles, whatever the
// number of tables (it was a GRANT per privilege set over every table,
// 4.4 s at 509 tables before grants were grouped).
//
// settle covers a login that passed its check just before the lock but
// does not show in pg_stat_activity yet (PostgreSQL lists a backend only
// once its start-up is done): such a session is ended with the others when
// it shows. A session of a locked role found at the flip fails the unfence
// (CU003: the fence may have been breached).
//
// The database must be fenced (Fence). The lock holds for the whole
// cluster: the roles cannot log in to its other databases either until
// the unfence, so unless otherDatabases it is refused (ErrLoginFenceUnsafe)
// while they may connect to another database of the cluster (postgres and
// templates aside). Errors: ErrLoginFenceUnavailable when the agent's role
// may not alter the roles. Nothing is changed on an error of either kind.
func (f *Fencer) ShiftToLogins(ctx context.Context, epoch uint64, settle time.Duration, otherDatabases bool) (LoginShift, error) {
	var out LoginShift
	start := time.Now()
	var raw []byte
	err := f.pool.QueryRow(ctx, "SELECT "+loginsFuncName+"($1::text, $2::text, $3::bigint, $4::boolean)", pgx.QueryExecModeSimpleProtocol,
		f.opts.Plan, f.opts.Pair, int64(epoch), otherDatabases).Scan(&raw)
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42501" {
			return out, fmt.Errorf("%w: %s", ErrLoginFenceUnavailable, pgErr.Message)
		}
		if errors.As(err, &pgErr) && pgErr.Code == "CU005" {
			return out, fmt.Errorf("%w: %s", ErrLoginFenceUnsafe, pgErr.Message)
		}
		return out, fmt.Errorf("lock logins %s/%s: %w", f.opts.Plan, f.opts.Pair, lockErr(err))
	}
	var locked struct {
		Logins   []string  `json:"logins"`
		LockedAt time.Time `json:"locked_at"`
	}
	if err := json.Unmarshal(raw, &locked); err != nil {
		return out, fmt.Errorf("lock logins: result: %w", err)
	}
	out.Logins = locked.Logins
	// The settle time counts from the lock's commit as the server saw it.
	var waitedUS int64
	if err := f.pool.QueryRow(ctx, "SELECT (extract(epoch FROM clock_timestamp() - $1::timestamptz) * 1e6)::bigint", locked.LockedAt).Scan(&waitedUS); err != nil {
		return out, fmt.Errorf("lock logins: %w", err)
	}
	waited := time.Duration(waitedUS) * time.Microsecond
	if rest := settle - waited; rest > 0 {
		select {
		case <-ctx.Done():
			return out, ctx.Err()
		case <-time.After(rest):
		}
	}
	res, err := f.unfence(ctx, epoch, false, true)
	if err != nil {
		return out, fmt.Errorf("give back grants under locked logins %s/%s: %w", f.opts.Plan, f.opts.Pair, err)
	}
	out.Restored, out.Statements, out.Terminated, out.KeptPublic = res.Restored, res.Statements, res.Terminated, res.Kept
	f.log.Info("fence shifted to logins", zap.Uint64("epoch", epoch), zap.Strings("logins_locked", out.Logins),
		zap.Int("privileges_restored", out.Restored), zap.Int("sessions_terminated", out.Terminated),
		zap.Int("public_grants_kept", out.KeptPublic), zap.Duration("took", time.Since(start)))
	return out, nil
}

// Unfenced is what a break-glass unfence did.
type Unfenced struct {
	// WasFenced says the database was fenced; Restored counts the
	// privileges given back.
	WasFenced bool
	Restored  int
}

// Inspect readies the bookkeeping as Prepare does (the schema's owners
// checked, the server-side functions created, a v2 fence folded in) but
// resolves no table and no role, and reports the fence state: what an
// operator needs before BreakGlassUnfence, to see who owns the fence.
func (f *Fencer) Inspect(ctx context.Context) (fencing.State, error) {
	if err := f.setUp(ctx); err != nil {
		return fencing.State{}, err
	}
	return f.State(ctx)
}

// BreakGlassUnfence gives back every saved privilege without an epoch: for
// an operator whose cluster may be gone (cutover unfence), so it needs no
// quorum and skips the epoch guard, and it clears the stored epoch so that
// a new cluster, whose epochs count from the start, can fence again. Call
// Inspect first (and check there that no live plan owns the fence). A
// database that is not fenced is left as it is.
func (f *Fencer) BreakGlassUnfence(ctx context.Context) (Unfenced, error) {
	var out Unfenced
	res, err := f.unfence(ctx, 0, true, false)
	if err != nil {
		return out, fmt.Errorf("break-glass unfence: %w", err)
	}
	if err := f.unproxy(ctx); err != nil {
		return out, fmt.Errorf("break-glass unfence: %w", err)
	}
	out.WasFenced, out.Restored = res.WasFenced, res.Restored
	f.log.Warn("unfenced by hand (break-glass)", zap.Bool("was_fenced", res.WasFenced), zap.Int("privileges_restored", res.Restored))
	return out, nil
}

type unfenceResult struct {
	Restored int `json:"restored"`
	// Statements counts the GRANTs that restored them.
	Statements int  `json:"statements"`
	WasFenced  bool `json:"was_fenced"`
	// Unlocked counts the logins given back; Terminated and Kept are a
	// shift's (keepLogins): sessions of locked roles ended, PUBLIC's
	// grants still saved.
	Unlocked   int `json:"unlocked"`
	Terminated int `json:"terminated"`
	Kept       int `json:"kept"`
	// Memberships counts the write proxies' memberships given back.
	Memberships int `json:"memberships"`
}

func (f *Fencer) unfence(ctx context.Context, epoch uint64, breakGlass, keepLogins bool) (unfenceResult, error) {
	var res unfenceResult
	var raw []byte
	err := f.pool.QueryRow(ctx, "SELECT "+unfenceFuncName+"($1::text, $2::text, $3::bigint, $4::boolean, $5::boolean)", pgx.QueryExecModeSimpleProtocol,
		f.opts.Plan, f.opts.Pair, int64(epoch), breakGlass, keepLogins).Scan(&raw)
	if err != nil {
		return res, lockErr(err)
	}
	if err := json.Unmarshal(raw, &res); err != nil {
		return res, fmt.Errorf("result: %w", err)
	}
	return res, nil
}

// State reports the fence state stored on the database: whether it is
// fenced, the highest epoch it has seen, and the plan and pair that own
// the fence (the last to put it up).
func (f *Fencer) State(ctx context.Context) (fencing.State, error) {
	var st fencing.State
	var epoch int64
	var since *time.Time
	var plan, pair *string
	err := f.pool.QueryRow(ctx, `SELECT epoch, fenced, fenced_at, plan, pair FROM `+stateTable+` WHERE id`).Scan(&epoch, &st.Fenced, &since, &plan, &pair)
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
	if plan != nil && pair != nil {
		st.Plan, st.Pair = *plan, *pair
	}
	return st, nil
}

// Drain waits for in-flight write transactions, terminating those still
// running after grace, and writes the catch-up marker. See the package
// documentation for why a SHARE lock proves the drain.
func (f *Fencer) Drain(ctx context.Context, epoch uint64, grace time.Duration) (fencing.Drained, error) {
	return f.drain(ctx, epoch, grace, false)
}

func (f *Fencer) drain(ctx context.Context, epoch uint64, grace time.Duration, fence bool) (fencing.Drained, error) {
	var out fencing.Drained
	nonce, err := newNonce()
	if err != nil {
		return out, err
	}
	what := "drain"
	if fence {
		what = "fence and drain"
	}
	var res procResult
	if f.opts.Hold > 0 {
		res, err = f.drainHolding(ctx, epoch, grace, fence, nonce)
	} else {
		parts := partLock | partMarker
		if fence {
			parts |= partFence
		}
		res, err = f.call(ctx, epoch, parts, grace, nonce)
	}
	if err != nil {
		return out, fmt.Errorf("%s %s/%s: %w", what, f.opts.Plan, f.opts.Pair, err)
	}
	out.Waited = time.Duration(res.WaitedUS) * time.Microsecond
	out.Held = f.opts.Hold > 0
	for _, k := range res.Terminated {
		out.Terminated = append(out.Terminated, fencing.Session{PID: k.PID, User: k.User, Application: k.Application, State: k.State, XactAge: time.Duration(k.XactAgeUS) * time.Microsecond})
	}
	out.Marker = fencing.Marker{Nonce: nonce, Epoch: epoch, Position: res.LSN}
	fields := []zap.Field{zap.Uint64("epoch", epoch), zap.String("marker", nonce), zap.String("lsn", res.LSN), zap.Duration("waited", out.Waited), zap.Int("terminated", len(out.Terminated)),
		zap.Duration("server_time", time.Duration(res.TotalUS)*time.Microsecond), zap.Int("autovacuum_cancelled", res.AutovacuumCancelled), zap.Int("deadlocks_retried", res.Deadlocks), zap.Int("lock_attempts", res.LockAttempts), zap.Bool("holding", out.Held)}
	if fence {
		fields = append(fields, zap.Int("revokes", res.Revoked), zap.Int("memberships_revoked", res.MembershipsRevoked), zap.Duration("revoke_committed_after", time.Duration(res.FenceUS)*time.Microsecond))
	}
	for _, s := range out.Terminated {
		fields = append(fields, zap.String("terminated_session", fmt.Sprintf("pid=%d user=%s app=%q state=%s xact_age=%s", s.PID, s.User, s.Application, s.State, s.XactAge.Round(time.Millisecond))))
	}
	f.log.Info("drained", fields...)
	return out, nil
}

// drainHolding drains on a session of its own that keeps the lock after the
// marker (Options.Hold). The fence's REVOKE and the drain's lock request go
// out at the same time: the lock needs no REVOKE to stop new write
// transactions (they queue behind it), and the REVOKE takes no table lock,
// so neither waits for the other. The marker is written once both are
// done, while the lock is held, so it still follows every write
// transaction begun before the fence. One round trip more than the
// unheld drain; the writers wait from the lock on.
func (f *Fencer) drainHolding(ctx context.Context, epoch uint64, grace time.Duration, fence bool, nonce string) (procResult, error) {
	f.Release(ctx) // an earlier hold of this Fencer: one at a time
	type fenced struct {
		res procResult
		err error
	}
	done := make(chan fenced, 1)
	start := time.Now()
	var fenceRTT time.Duration
	if fence {
		go func() {
			res, err := f.call(ctx, epoch, partFence, 0, "")
			fenceRTT = time.Since(start)
			done <- fenced{res, err}
		}()
	} else {
		done <- fenced{}
	}
	hres, conn, herr := f.hold(ctx, grace)
	holdRTT := time.Since(start)
	fres := <-done
	if fres.err != nil || herr != nil {
		if conn != nil {
			releaseHold(ctx, conn)
		}
		return procResult{}, errors.Join(fres.err, herr)
	}
	markerStart := time.Now()
	mres, err := f.call(ctx, epoch, partMarker, 0, nonce)
	if err != nil {
		releaseHold(ctx, conn)
		return procResult{}, err
	}
	f.log.Debug("drain round trips", zap.Duration("fence", fenceRTT), zap.Duration("fence_server", time.Duration(fres.res.FenceUS)*time.Microsecond), zap.Duration("hold", holdRTT), zap.Duration("hold_acquired", hres.acquired),
		zap.Duration("marker", time.Since(markerStart)), zap.Duration("marker_server", time.Duration(mres.TotalUS)*time.Microsecond))
	f.mu.Lock()
	f.held = startHold(conn, f.opts.Hold, f.log)
	f.mu.Unlock()
	res := hres
	res.Revoked, res.MembershipsRevoked, res.FenceUS = fres.res.Revoked, fres.res.MembershipsRevoked, fres.res.FenceUS
	res.LSN, res.TotalUS = mres.LSN, mres.TotalUS
	return res, nil
}

// hold opens a transaction on a pooled session of its own and drains in it,
// leaving the lock held. The SQL carries only numbers, so it goes as one
// simple-protocol query: one round trip, no statement to prepare.
func (f *Fencer) hold(ctx context.Context, grace time.Duration) (procResult, *pgxpool.Conn, error) {
	var res procResult
	start := time.Now()
	conn, err := f.pool.Acquire(ctx)
	if err != nil {
		return res, nil, fmt.Errorf("hold: %w", err)
	}
	acquired := time.Since(start)
	oids := make([]string, len(f.tableOIDs))
	for i, oid := range f.tableOIDs {
		oids[i] = strconv.FormatUint(uint64(oid), 10)
	}
	sql := fmt.Sprintf("BEGIN; SELECT %s('{%s}'::oid[], %d, %d)", drainFuncName, strings.Join(oids, ","),
		max(grace.Milliseconds(), 1), max(f.opts.Hold.Milliseconds(), 1))
	results, err := conn.Conn().PgConn().Exec(ctx, sql).ReadAll()
	if err == nil && (len(results) != 2 || len(results[1].Rows) != 1) {
		err = fmt.Errorf("hold: unexpected result from %s", drainFuncName)
	}
	if err != nil {
		return res, conn, lockErr(err)
	}
	if err := json.Unmarshal(results[1].Rows[0][0], &res); err != nil {
		return res, conn, fmt.Errorf("hold: %s result: %w", drainFuncName, err)
	}
	res.acquired = acquired
	return res, conn, nil
}

// Release ends the hold on the tables (Options.Hold): the writers it kept
// waiting fail on the fence, or go on if it was lifted. It is a no-op when
// nothing is held, and never fails: a session that cannot be rolled back
// within a second is closed, which ends the hold as surely.
func (f *Fencer) Release(ctx context.Context) {
	f.mu.Lock()
	h := f.held
	f.held = nil
	f.mu.Unlock()
	if h != nil {
		h.release(ctx)
		f.log.Info("released the hold on the tables")
	}
}

// Holding says whether this Fencer holds the drain's lock and its last
// keepalive found the holding session alive. See CheckHold.
func (f *Fencer) Holding() bool {
	f.mu.Lock()
	h := f.held
	f.mu.Unlock()
	return h != nil && h.lost() == nil
}

// CheckHold returns nil when no hold is asked for (Options.Hold zero), and
// otherwise whether the drain's lock is still held, asking the holding
// session now: an error wrapping fencing.ErrHoldLost when nothing is held
// (released, never taken, or taken by a deposed leader's Fencer) or the
// session is gone (the server ended it, the network dropped it). Once
// lost, writers outside the fence may have written: the caller must not
// open the gate on the strength of the hold.
func (f *Fencer) CheckHold(ctx context.Context) error {
	if f.opts.Hold <= 0 {
		return nil
	}
	f.mu.Lock()
	h := f.held
	f.mu.Unlock()
	if h == nil {
		return fmt.Errorf("%w: %s/%s: nothing is held", fencing.ErrHoldLost, f.opts.Plan, f.opts.Pair)
	}
	if err := h.ping(ctx); err != nil {
		return fmt.Errorf("%w: %s/%s: %v", fencing.ErrHoldLost, f.opts.Plan, f.opts.Pair, err)
	}
	return nil
}

// ReleaseRefusingAll ends the hold like Release, but first cancels the
// statements of the sessions that HeldBreaches lists (roles outside the
// fence), so that none of their writes lands once released: for the old
// side after the traffic has left it, where such a write would be lost.
// They get SQLSTATE 57014 (query_canceled) and stay connected. So do the
// waiting writes of roles fenced by a write proxy (see heldProxyMembers),
// which would mostly fail on the fence anyway. It returns the sessions
// of roles outside the fence it cancelled.
func (f *Fencer) ReleaseRefusingAll(ctx context.Context) ([]fencing.Session, error) {
	f.mu.Lock()
	h := f.held
	f.held = nil
	f.mu.Unlock()
	if h == nil {
		return nil, nil
	}
	oids := make([]string, len(f.tableOIDs))
	for i, oid := range f.tableOIDs {
		oids[i] = strconv.FormatUint(uint64(oid), 10)
	}
	// One round trip: the cancels, the wait for them and the ROLLBACK.
	raw, err := h.refuseAndRelease(ctx, fmt.Sprintf("SELECT %s('{%s}'::oid[], 1000); ROLLBACK", refuseFuncName, strings.Join(oids, ",")))
	f.log.Info("released the hold on the tables")
	if err != nil {
		return nil, fmt.Errorf("release refusing all: %w", err)
	}
	var res struct {
		Outsiders []struct {
			PID         int32  `json:"pid"`
			User        string `json:"user"`
			Application string `json:"application"`
			State       string `json:"state"`
			XactAgeUS   int64  `json:"xact_age_us"`
		} `json:"outsiders"`
		ProxyMembers int `json:"proxy_members"`
	}
	if err := json.Unmarshal(raw, &res); err != nil {
		return nil, fmt.Errorf("release refusing all: result: %w", err)
	}
	var held []fencing.Session
	for _, o := range res.Outsiders {
		held = append(held, fencing.Session{PID: o.PID, User: o.User, Application: o.Application, State: o.State, XactAge: time.Duration(o.XactAgeUS) * time.Microsecond})
	}
	if len(held) > 0 {
		f.log.Warn("cancelled writes of roles outside the fence waiting on the hold", zap.Int("sessions", len(held)), zap.Int32("first_pid", held[0].PID), zap.String("first_user", held[0].User))
	}
	if res.ProxyMembers > 0 {
		f.log.Info("cancelled the writes of fenced roles waiting on the hold (a session that did SET ROLE to a write proxy would pass the fence)", zap.Int("sessions", res.ProxyMembers))
	}
	return held, nil
}

// HeldBreaches lists the sessions waiting on the hold to write to a table in
// scope whose role the fence does not stop: a superuser, or a role that
// still holds a write privilege on that table. Once released, their writes
// would land on blue after the marker (a breach); seen now, while held, the
// cutover can abort before any of them lands. Sessions of fenced roles
// waiting on the hold are not listed: their writes fail once released.
// Empty when nothing is held.
func (f *Fencer) HeldBreaches(ctx context.Context) ([]fencing.Session, error) {
	f.mu.Lock()
	held := f.held != nil
	f.mu.Unlock()
	if !held {
		return nil, nil
	}
	rows, err := f.pool.Query(ctx, `
		SELECT a.pid, coalesce(a.usename::text, ''), coalesce(a.application_name, ''), coalesce(a.state, ''),
		       coalesce((extract(epoch FROM now() - a.xact_start) * 1e6)::bigint, 0)
		FROM pg_stat_activity a
		WHERE a.backend_type = 'client backend' AND EXISTS (
			SELECT 1 FROM pg_locks l
			WHERE l.pid = a.pid AND NOT l.granted AND l.relation = ANY($1::oid[])
			  AND l.mode IN ('RowExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')
			  AND (has_table_privilege(a.usesysid, l.relation, 'INSERT') OR has_table_privilege(a.usesysid, l.relation, 'UPDATE')
			       OR has_table_privilege(a.usesysid, l.relation, 'DELETE') OR has_table_privilege(a.usesysid, l.relation, 'TRUNCATE')))
		ORDER BY a.pid`, f.tableOIDs)
	if err != nil {
		return nil, fmt.Errorf("held breaches: %w", err)
	}
	defer rows.Close()
	var out []fencing.Session
	for rows.Next() {
		var s fencing.Session
		var ageUS int64
		if err := rows.Scan(&s.PID, &s.User, &s.Application, &s.State, &ageUS); err != nil {
			return nil, fmt.Errorf("held breaches: %w", err)
		}
		s.XactAge = time.Duration(ageUS) * time.Microsecond
		out = append(out, s)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("held breaches: %w", err)
	}
	return out, nil
}

// holdSession is the session holding the drain's lock. The server ends it
// after Options.Hold idle in its transaction
// (idle_in_transaction_session_timeout), which bounds the hold if the
// agent goes away; while the Fencer holds it, a keepalive statement every
// Hold/3 resets that clock, so that a flip that takes longer than Hold does
// not let writers outside the fence through after the gate opened. Every
// statement on the session (keepalive, ping, rollback) runs under mu.
type holdSession struct {
	conn     *pgxpool.Conn
	interval time.Duration
	log      *zap.Logger
	stop     chan struct{}
	stopOnce sync.Once
	done     chan struct{}

	mu  sync.Mutex
	err error // why the session no longer holds the lock; sticky
}

func startHold(conn *pgxpool.Conn, hold time.Duration, log *zap.Logger) *holdSession {
	h := &holdSession{conn: conn, interval: max(hold/3, time.Millisecond), log: log, stop: make(chan struct{}), done: make(chan struct{})}
	go h.keepalive()
	return h
}

func (h *holdSession) keepalive() {
	defer close(h.done)
	t := time.NewTicker(h.interval)
	defer t.Stop()
	for {
		select {
		case <-h.stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), h.interval)
		err := h.ping(ctx)
		cancel()
		if err != nil {
			h.log.Error("the hold on the tables is lost: its session no longer answers", zap.Error(err))
			return
		}
	}
}

// ping runs a statement on the holding session: it resets the server's
// idle clock and proves the session (and so its lock) is still there.
func (h *holdSession) ping(ctx context.Context) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.err != nil {
		return h.err
	}
	if err := h.conn.Conn().PgConn().Exec(ctx, "SELECT 1").Close(); err != nil {
		h.err = err
	}
	return h.err
}

func (h *holdSession) lost() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.err
}

// stopKeepalive stops the keepalives (and waits for the one under way).
func (h *holdSession) stopKeepalive() {
	h.stopOnce.Do(func() { close(h.stop) })
	<-h.done
}

// release stops the keepalive and ends the hold.
func (h *holdSession) release(ctx context.Context) {
	h.stopKeepalive()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.err != nil {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		defer cancel()
		_ = h.conn.Hijack().Close(cctx)
		return
	}
	releaseHold(ctx, h.conn)
}

// refuseAndRelease stops the keepalive and runs sql, which must end with
// the ROLLBACK that ends the hold, on the holding session; it returns the
// first statement's value. On an error the hold is ended all the same.
func (h *holdSession) refuseAndRelease(ctx context.Context, sql string) ([]byte, error) {
	h.stopKeepalive()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.err != nil {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		defer cancel()
		_ = h.conn.Hijack().Close(cctx)
		return nil, h.err
	}
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	results, err := h.conn.Conn().PgConn().Exec(rctx, sql).ReadAll()
	if err == nil && (len(results) != 2 || len(results[0].Rows) != 1) {
		err = errors.New("unexpected result")
	}
	if err != nil {
		releaseHold(ctx, h.conn)
		return nil, err
	}
	h.conn.Release()
	return results[0].Rows[0][0], nil
}

// releaseHold rolls back the holding transaction and gives the session
// back to the pool, or closes it.
func releaseHold(ctx context.Context, conn *pgxpool.Conn) {
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
	defer cancel()
	if err := conn.Conn().PgConn().Exec(rctx, "ROLLBACK").Close(); err != nil {
		_ = conn.Hijack().Close(rctx)
		return
	}
	conn.Release()
}

// procResult is what the fence procedure and the drain function report.
type procResult struct {
	Revoked int `json:"revoked"`
	// MembershipsRevoked counts the write proxies' memberships taken away.
	MembershipsRevoked int `json:"memberships_revoked"`
	// DependentSaved counts grants of roles outside the fence that the
	// REVOKE's CASCADE took, saved to be given back.
	DependentSaved int `json:"dependent_saved"`
	// Holders are the grantees (quoted, or PUBLIC) whose write privileges
	// the fence takes or took away (a dry run's).
	Holders []string `json:"holders"`
	// FenceUS and TotalUS are the server's time from the call to the
	// REVOKE's commit and to the marker's (the rest is network and
	// scheduling).
	FenceUS int64 `json:"fence_us"`
	// AutovacuumCancelled counts autovacuum workers cancelled on the
	// tables before the drain's lock.
	AutovacuumCancelled int `json:"autovacuum_cancelled"`
	// Deadlocks counts the drain's lock attempts that a writer deadlocked
	// with (and that were retried).
	Deadlocks int `json:"deadlocks"`
	// LockAttempts counts the drain's tries for its lock.
	LockAttempts int    `json:"lock_attempts"`
	TotalUS      int64  `json:"total_us"`
	LSN          string `json:"lsn"`
	WaitedUS     int64  `json:"waited_us"`
	Terminated   []struct {
		PID         int32  `json:"pid"`
		User        string `json:"user"`
		Application string `json:"application"`
		State       string `json:"state"`
		XactAgeUS   int64  `json:"xact_age_us"`
	} `json:"terminated"`
	// acquired is how long the holding session took to get from the pool.
	acquired time.Duration
}

// The parts of the fence procedure a call runs.
const (
	partFence  = 1 << iota // revoke and commit
	partLock               // drain: take the SHARE lock (else a holding session has it)
	partMarker             // write the marker and commit
)

// call runs the fence procedure's parts. It goes as a simple-protocol
// query: one round trip on any pooled session, with no statement to
// prepare first on a session that has not run it yet.
func (f *Fencer) call(ctx context.Context, epoch uint64, parts int, grace time.Duration, nonce string) (procResult, error) {
	if f.tableOIDs == nil {
		return procResult{}, errors.New("Prepare has not run")
	}
	return f.callOn(ctx, f.pool, epoch, parts, grace, nonce, f.tableOIDs)
}

// callOn is call on q: the pool, or one of its sessions.
func (f *Fencer) callOn(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, epoch uint64, parts int, grace time.Duration, nonce string, tables []uint32) (procResult, error) {
	var res procResult
	var raw []byte
	// A procedure may commit only when CALLed outside a transaction block:
	// on a pooled connection, it is.
	roles := f.opts.Roles
	if roles == nil {
		roles = []string{}
	}
	err := q.QueryRow(ctx, "CALL "+fenceProcName+"($1::text, $2::text, $3::bigint, $4::oid[], $5::text[], $6::boolean, $7::boolean, $8::boolean, $9::int, $10::text, NULL)",
		pgx.QueryExecModeSimpleProtocol, f.opts.Plan, f.opts.Pair, int64(epoch), tables, roles,
		parts&partFence != 0, parts&partLock != 0, parts&partMarker != 0, int32(max(grace.Milliseconds(), 1)), nonce).Scan(&raw)
	if err != nil {
		return res, lockErr(err)
	}
	if err := json.Unmarshal(raw, &res); err != nil {
		return res, fmt.Errorf("fence procedure result: %w", err)
	}
	return res, nil
}

// lockErr maps the fence's SQLSTATEs to the fencing errors.
func lockErr(err error) error {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch pgErr.Code {
		case "CU001":
			return fmt.Errorf("%w: %s", fencing.ErrStaleEpoch, pgErr.Message)
		case "CU002":
			return fmt.Errorf("%w: %s", fencing.ErrNotFenced, pgErr.Message)
		case "CU003":
			return fmt.Errorf("%w: %s", ErrLoginBreach, pgErr.Message)
		case "55P03":
			return fmt.Errorf("lock tables: %w", err)
		}
	}
	return err
}

func newNonce() (string, error) {
	b := make([]byte, 12)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("marker nonce: %w", err)
	}
	return hex.EncodeToString(b), nil
}
