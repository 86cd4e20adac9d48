package postgres

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/cutover/cutover/internal/pgsafe"
)

func TestACutoverSchemaAnotherRoleCreatedFirstIsRefusedAndItsFunctionsNeverRun(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE t (id int PRIMARY KEY)`)
	// On green, an application role got there first, with a function of
	// the name the agent runs there.
	e.exec(t, e.green, `
		CREATE ROLE mallory LOGIN PASSWORD 'mallory-password';
		GRANT CREATE ON DATABASE cutover TO mallory;
		SET ROLE mallory;
		CREATE SCHEMA cutover;
		CREATE TABLE cutover.ran (at timestamptz);
		CREATE FUNCTION cutover.claim_apply(text, pg_lsn, bigint) RETURNS pg_lsn LANGUAGE sql
			AS $$ INSERT INTO cutover.ran VALUES (now()); SELECT '0/0'::pg_lsn $$;
		-- and an index "left by a dead copy" whose definition does more.
		CREATE TABLE cutover.deferred_indexes (schema_name text, index_name text, table_name text, def text, slot text, deferred_at timestamptz);
		INSERT INTO cutover.deferred_indexes VALUES ('public', 't_x', 'public.t', 'CREATE INDEX t_x ON public.t (id); ALTER ROLE mallory SUPERUSER', 's', now());
		RESET ROLE;`)
	err := startErr(t, e.options(t))
	if !errors.Is(err, pgsafe.ErrUntrusted) || !strings.Contains(err.Error(), "green") || !strings.Contains(err.Error(), "schema cutover is owned by mallory") {
		t.Fatalf("start over mallory's schema: %v, want a refusal naming green and mallory", err)
	}
	conn, err := pgx.Connect(context.Background(), e.green.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var ran int
	if err := conn.QueryRow(context.Background(), `SELECT count(*) FROM cutover.ran`).Scan(&ran); err != nil || ran != 0 {
		t.Errorf("mallory's function ran %d times (%v)", ran, err)
	}
	var super, index bool
	if err := conn.QueryRow(context.Background(), `SELECT rolsuper, to_regclass('public.t_x') IS NOT NULL FROM pg_roles WHERE rolname = 'mallory'`).Scan(&super, &index); err != nil || super || index {
		t.Errorf("mallory's index definition ran: superuser %v, index %v (%v)", super, index, err)
	}
}
