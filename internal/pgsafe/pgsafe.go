// Package pgsafe checks that a schema of the agent's on a PostgreSQL
// database can be trusted before the agent runs what is in it.
//
// The agent keeps its bookkeeping and server-side functions in a schema
// named cutover, created if missing. A role that created that schema first
// (or an object in it) could replace the functions the agent then runs as
// itself, often a superuser: so the schema and everything in it must be
// owned by the agent's role or by a superuser, and nobody else may create
// objects in it.
package pgsafe

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
)

// ErrUntrusted: the schema, or an object in it, is owned by a role that is
// neither the agent's nor a superuser.
var ErrUntrusted = errors.New("untrusted owner")

// Querier is a pool, a connection or a transaction.
type Querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// checkSQL lists what in the schema is owned by another role than the
// current one that is not a superuser: the schema itself, relations,
// functions and procedures, types, operators.
const checkSQL = `
WITH s AS (SELECT oid, nspowner FROM pg_catalog.pg_namespace WHERE nspname = $1),
objs AS (
	SELECT 'schema ' || pg_catalog.quote_ident($1) AS what, s.nspowner AS owner FROM s
	UNION ALL
	SELECT 'relation ' || pg_catalog.quote_ident($1) || '.' || pg_catalog.quote_ident(c.relname), c.relowner
	FROM pg_catalog.pg_class c, s WHERE c.relnamespace = s.oid
	UNION ALL
	SELECT 'function ' || p.oid::pg_catalog.regprocedure::text, p.proowner
	FROM pg_catalog.pg_proc p, s WHERE p.pronamespace = s.oid
	UNION ALL
	SELECT 'type ' || pg_catalog.quote_ident($1) || '.' || pg_catalog.quote_ident(t.typname), t.typowner
	FROM pg_catalog.pg_type t, s WHERE t.typnamespace = s.oid
	UNION ALL
	SELECT 'operator ' || o.oid::pg_catalog.regoperator::text, o.oprowner
	FROM pg_catalog.pg_operator o, s WHERE o.oprnamespace = s.oid
)
SELECT coalesce(pg_catalog.array_agg(o.what || ' is owned by ' || pg_catalog.quote_ident(r.rolname) ORDER BY o.what), '{}')
FROM objs o JOIN pg_catalog.pg_roles r ON r.oid = o.owner
WHERE r.rolname OPERATOR(pg_catalog.<>) current_user AND NOT r.rolsuper`

// CheckSchema returns an error wrapping ErrUntrusted, naming the objects
// and their owners, when schema or anything in it is owned by a role that
// is neither the current one nor a superuser. A schema that does not exist
// passes: the agent creates it.
func CheckSchema(ctx context.Context, q Querier, schema string) error {
	var bad []string
	if err := q.QueryRow(ctx, checkSQL, schema).Scan(&bad); err != nil {
		return fmt.Errorf("check the owners in schema %s: %w", schema, err)
	}
	if len(bad) == 0 {
		return nil
	}
	more := ""
	if len(bad) > 5 {
		more = fmt.Sprintf(" (and %d more)", len(bad)-5)
		bad = bad[:5]
	}
	return fmt.Errorf("%w in schema %s: %s%s: the agent would run what such a role can replace; drop them (or the schema) or give them to the agent's role", ErrUntrusted, schema, strings.Join(bad, ", "), more)
}
