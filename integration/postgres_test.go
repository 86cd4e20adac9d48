package integration

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

func pgConnect(t *testing.T, dsn string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatalf("connect %s: %v", dsn, err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

func pgShow(t *testing.T, conn *pgx.Conn, name string) string {
	t.Helper()
	var v string
	if err := conn.QueryRow(context.Background(), "SHOW "+name).Scan(&v); err != nil {
		t.Fatalf("SHOW %s: %v", name, err)
	}
	return v
}

func TestTwoPostgresClustersAreLogicalAndDistinct(t *testing.T) {
	t.Parallel()
	a := NewPostgres(t, PostgresOptions{})
	b := NewPostgres(t, PostgresOptions{})
	ctx := context.Background()

	var sysids []uint64
	for _, pg := range []*Postgres{a, b} {
		if pg.Port == 5432 || pg.Port == 0 {
			t.Fatalf("port %d: want a fresh one", pg.Port)
		}
		conn := pgConnect(t, pg.DSN())
		if got, want := pgShow(t, conn, "wal_level"), "logical"; got != want {
			t.Errorf("wal_level = %q, want %q", got, want)
		}
		for _, name := range []string{"max_replication_slots", "max_wal_senders"} {
			if n, _ := strconv.Atoi(pgShow(t, conn, name)); n < 20 {
				t.Errorf("%s = %d, want >= 20", name, n)
			}
		}
		if got, want := pgShow(t, conn, "listen_addresses"), "127.0.0.1"; got != want {
			t.Errorf("listen_addresses = %q, want %q", got, want)
		}
		var db string
		var super bool
		if err := conn.QueryRow(ctx, "SELECT current_database(), rolsuper FROM pg_roles WHERE rolname = current_user").Scan(&db, &super); err != nil {
			t.Fatal(err)
		}
		if db != "cutover" || !super {
			t.Errorf("database %q, superuser %v; want cutover, true", db, super)
		}
		var id uint64
		if err := conn.QueryRow(ctx, "SELECT system_identifier FROM pg_control_system()").Scan(&id); err != nil {
			t.Fatal(err)
		}
		sysids = append(sysids, id)
	}
	if a.Port == b.Port || a.DataDir == b.DataDir {
		t.Errorf("clusters share port (%d, %d) or data dir (%s, %s)", a.Port, b.Port, a.DataDir, b.DataDir)
	}
	if n := sysidFallbacks.Load(); n != 0 {
		t.Errorf("%d clusters were made by initdb instead of from the template", n)
	}
	if sysids[0] == sysids[1] {
		t.Errorf("both clusters have system identifier %d", sysids[0])
	}
}

func TestPostgresOptionsReachTheServer(t *testing.T) {
	t.Parallel()
	pg := NewPostgres(t, PostgresOptions{
		Database: "other",
		Locale:   "C.UTF-8",
		Settings: map[string]string{
			"TimeZone":           "Asia/Tokyo",
			"DateStyle":          "SQL, DMY",
			"extra_float_digits": "0",
			"max_wal_senders":    "25", // overrides a harness default
			"application_name":   "it's quoted",
		},
	})
	conn := pgConnect(t, pg.DSN())
	for name, want := range map[string]string{
		"TimeZone":           "Asia/Tokyo",
		"DateStyle":          "SQL, DMY",
		"extra_float_digits": "0",
		"max_wal_senders":    "25",
		"application_name":   "it's quoted",
		"lc_collate":         "C.UTF-8",
	} {
		if got := pgShow(t, conn, name); got != want {
			t.Errorf("%s = %q, want %q", name, got, want)
		}
	}
	var db string
	if err := conn.QueryRow(context.Background(), "SELECT current_database()").Scan(&db); err != nil || db != "other" {
		t.Errorf("current_database() = %q, %v; want other", db, err)
	}
}

// The rules later tests rely on: application roles log in with their
// password, a wrong one is refused, the unix socket trusts everyone, and a
// role without REPLICATION gets past authentication for a logical
// replication connection but is refused by the walsender.
func TestPostgresAuthenticationRules(t *testing.T) {
	t.Parallel()
	pg := NewPostgres(t, PostgresOptions{})
	ctx := context.Background()
	if err := pg.Exec(ctx, `
		CREATE ROLE app LOGIN PASSWORD 'app-secret';
		CREATE ROLE repl LOGIN REPLICATION PASSWORD 'repl-secret';
		CREATE ROLE nopw LOGIN;
		GRANT CREATE ON DATABASE cutover TO app;`); err != nil {
		t.Fatal(err)
	}

	t.Run("an application role logs in with its password", func(t *testing.T) {
		conn := pgConnect(t, pg.DSNFor("cutover", "app", "app-secret"))
		if _, err := conn.Exec(ctx, "CREATE SCHEMA s"); err != nil {
			t.Errorf("app cannot use its database: %v", err)
		}
	})
	t.Run("a wrong password is refused", func(t *testing.T) {
		_, err := pgx.Connect(ctx, pg.DSNFor("cutover", "app", "wrong"))
		if code := sqlState(err); code != "28P01" {
			t.Errorf("err = %v (SQLSTATE %q), want invalid_password 28P01", err, code)
		}
	})
	t.Run("a role without password cannot log in over TCP", func(t *testing.T) {
		_, err := pgx.Connect(ctx, pg.DSNFor("cutover", "nopw", ""))
		if err == nil {
			t.Error("nopw logged in over TCP without a password")
		}
	})
	t.Run("the unix socket trusts every role", func(t *testing.T) {
		conn := pgConnect(t, "host="+pg.SocketDir+" port="+strconv.Itoa(pg.Port)+" user=nopw dbname=cutover")
		var who string
		if err := conn.QueryRow(ctx, "SELECT current_user").Scan(&who); err != nil || who != "nopw" {
			t.Errorf("current_user = %q, %v", who, err)
		}
	})
	t.Run("logical replication works for REPLICATION roles only", func(t *testing.T) {
		for _, tc := range []struct {
			user, password string
			wantCode       string
		}{
			{"postgres", "", ""},
			{"repl", "repl-secret", ""},
			{"app", "app-secret", "42501"}, // insufficient_privilege
		} {
			conn, err := pgconn.Connect(ctx, pg.DSNFor("cutover", tc.user, tc.password)+"&replication=database")
			if err == nil {
				_, err = conn.Exec(ctx, "IDENTIFY_SYSTEM").ReadAll()
				conn.Close(ctx)
			}
			if code := sqlState(err); code != tc.wantCode {
				t.Errorf("%s: err = %v (SQLSTATE %q), want SQLSTATE %q", tc.user, err, code, tc.wantCode)
			}
		}
	})
}

func sqlState(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	if err != nil {
		return "not a server error: " + err.Error()
	}
	return ""
}

func TestSetSystemIdentifierRefusesUnknownLayout(t *testing.T) {
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "global"), 0o700); err != nil {
		t.Fatal(err)
	}
	junk := make([]byte, 8192)
	for i := range junk {
		junk[i] = byte(i*7 + 1)
	}
	path := filepath.Join(dir, pgControlFile)
	if err := os.WriteFile(path, junk, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := setSystemIdentifier(dir, 42); err == nil {
		t.Fatal("patched a pg_control without a valid CRC")
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != string(junk) {
		t.Error("pg_control changed although the patch was refused")
	}
}

// Restart (the fault suite's database restart) cuts every session and
// brings the server back on the same port with what was committed,
// replication slots included.
func TestPostgresRestartKeepsPortDataAndSlots(t *testing.T) {
	pg := NewPostgres(t, PostgresOptions{})
	ctx := context.Background()
	conn := pgConnect(t, pg.DSN())
	if _, err := conn.Exec(ctx, `CREATE TABLE kept (id int); INSERT INTO kept VALUES (42)`); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, `SELECT pg_create_logical_replication_slot('kept_slot', 'pgoutput')`); err != nil {
		t.Fatal(err)
	}
	port := pg.Port
	if err := pg.Restart(ctx, 200*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if pg.Port != port {
		t.Fatalf("restarted on port %d, was %d", pg.Port, port)
	}
	if _, err := conn.Exec(ctx, `SELECT 1`); err == nil {
		t.Error("a session from before the restart still answers")
	}
	after := pgConnect(t, pg.DSN())
	var id int
	if err := after.QueryRow(ctx, `SELECT id FROM kept`).Scan(&id); err != nil || id != 42 {
		t.Fatalf("the committed row after the restart: %d, %v", id, err)
	}
	var slots int
	if err := after.QueryRow(ctx, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'kept_slot'`).Scan(&slots); err != nil || slots != 1 {
		t.Fatalf("the slot after the restart: %d, %v", slots, err)
	}
}
