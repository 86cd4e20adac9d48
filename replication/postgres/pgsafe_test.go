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
}
