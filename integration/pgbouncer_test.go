package integration

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// A client reaches PostgreSQL through the harness's PgBouncer with the
// user's password, and the admin console answers.
func TestPgBouncerProxiesToPostgres(t *testing.T) {
	pg := NewPostgres(t, PostgresOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := pg.Exec(ctx, `CREATE ROLE app LOGIN PASSWORD 'app-pw'`); err != nil {
		t.Fatal(err)
	}
	b := NewPgBouncer(t, PgBouncerOptions{
		Databases: map[string]string{"appdb": pg.PgBouncerEntry(pg.Database)},
		Users:     map[string]string{"app": "app-pw"},
	})
	conn, err := pgx.Connect(ctx, b.DSNFor("appdb", "app", "app-pw")+"&default_query_exec_mode=simple_protocol")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var user string
	var port int
	if err := conn.QueryRow(ctx, "SELECT current_user, current_setting('port')::int").Scan(&user, &port); err != nil {
		t.Fatal(err)
	}
	if user != "app" || port != pg.Port {
		t.Fatalf("through pgbouncer: user %s port %d, want app on %d", user, port, pg.Port)
	}
	if _, err := pgx.Connect(ctx, b.DSNFor("appdb", "app", "wrong")); err == nil {
		t.Fatal("a wrong password was accepted")
	}
	res, err := b.Admin(ctx, "SHOW DATABASES")
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, row := range res[0].Rows {
		if string(row[0]) == "appdb" {
			found = true
		}
	}
	if !found {
		t.Fatalf("SHOW DATABASES does not list appdb")
	}
}
