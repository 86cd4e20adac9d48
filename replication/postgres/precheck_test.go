package postgres

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/replication"
)

// requireNothingCreated fails if a failed start left anything behind.
func requireNothingCreated(t *testing.T, e *pairEnv) {
	t.Helper()
	ctx := context.Background()
	for side, s := range map[string]*integration.Postgres{"blue": e.blue, "green": e.green} {
		conn, err := pgx.Connect(ctx, s.DSN())
		if err != nil {
			t.Fatal(err)
		}
		var schemas, pubs, slots int
		err = conn.QueryRow(ctx, `SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = 'cutover'),
			(SELECT count(*) FROM pg_publication), (SELECT count(*) FROM pg_replication_slots)`).Scan(&schemas, &pubs, &slots)
		conn.Close(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if schemas+pubs+slots != 0 {
			t.Errorf("%s: a failed pre-check left %d cutover schema(s), %d publication(s), %d slot(s)", side, schemas, pubs, slots)
		}
	}
}

func startErr(t *testing.T, opts Options) error {
	t.Helper()
	r, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	err = r.Start(ctx)
	if err == nil {
		_ = r.Stop(ctx)
		t.Fatal("start succeeded, want a pre-check failure")
	}
	return err
}

func requirePrecheck(t *testing.T, err error, side string, wants ...string) {
	t.Helper()
	var pe *replication.PrecheckError
	if !errors.As(err, &pe) || !errors.Is(err, replication.ErrPrecheck) {
		t.Fatalf("error %v is not a PrecheckError", err)
	}
	if pe.Side != side {
		t.Errorf("side = %q, want %q", pe.Side, side)
	}
	for _, w := range wants {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error does not say %q:\n%v", w, err)
		}
	}
}

func TestPrecheckFailsFastAndCreatesNothing(t *testing.T) {
	t.Run("a table without a primary key is named", func(t *testing.T) {
		e := newPairEnv(t, `CREATE TABLE keyed (id int PRIMARY KEY); CREATE TABLE loose (a int, b text); CREATE TABLE "Loose Too" (a int);`)
		err := startErr(t, e.options(t))
		requirePrecheck(t, err, "blue", "public.loose", "public.Loose Too", "REPLICA IDENTITY FULL")
		if strings.Contains(err.Error(), "public.keyed") {
			t.Errorf("keyed table reported: %v", err)
		}
		requireNothingCreated(t, e)
	})
	t.Run("schema differences are named one by one", func(t *testing.T) {
		e := newPairEnv(t, "")
		e.exec(t, e.blue, `CREATE TABLE t (id int PRIMARY KEY, a text, b numeric(10,2), c int NOT NULL); CREATE TABLE gone (id int PRIMARY KEY)`)
		e.exec(t, e.green, `CREATE TABLE t (id int PRIMARY KEY, a varchar(5), b numeric(10,2), extra int NOT NULL)`)
		err := startErr(t, e.options(t))
		requirePrecheck(t, err, "green",
			"table public.gone is missing on green",
			"column public.t.a is text on blue but character varying(5) on green",
			"column public.t.c (integer) is missing on green",
			"column public.t.extra (integer) exists only on green")
		requireNothingCreated(t, e)
	})
	t.Run("wal_level must be logical", func(t *testing.T) {
		if testing.Short() {
			t.Skip("needs PostgreSQL")
		}
		blue := integration.NewPostgres(t, integration.PostgresOptions{Settings: map[string]string{"wal_level": "replica"}})
		green := integration.NewPostgres(t, integration.PostgresOptions{})
		e := &pairEnv{blue: blue, green: green, plan: "wal", pair: config.Pair{Name: "db",
			Blue: config.Endpoint{DSN: config.DSN(blue.DSN())}, Green: config.Endpoint{DSN: config.DSN(green.DSN())}}}
		for _, s := range []*integration.Postgres{blue, green} {
			e.exec(t, s, `CREATE TABLE t (id int PRIMARY KEY)`)
		}
		err := startErr(t, e.options(t))
		requirePrecheck(t, err, "blue", `wal_level is "replica"`, "wal_level = logical")
		requireNothingCreated(t, e)
	})
	t.Run("a role without privileges is told which", func(t *testing.T) {
		e := newPairEnv(t, `CREATE TABLE t (id int PRIMARY KEY)`)
		e.exec(t, e.blue, `CREATE ROLE app LOGIN PASSWORD 'app-secret-pw'`)
		e.exec(t, e.green, `CREATE ROLE app LOGIN PASSWORD 'app-secret-pw'; GRANT ALL ON ALL TABLES IN SCHEMA public TO app`)
		e.pair.Blue.DSN = config.DSN(e.blue.DSNFor("cutover", "app", "app-secret-pw"))
		e.pair.Green.DSN = config.DSN(e.green.DSNFor("cutover", "app", "app-secret-pw"))
		err := startErr(t, e.options(t))
		requirePrecheck(t, err, "blue", `role "app" may not replicate`, "ALTER ROLE", "lacks CREATE on the database", `does not own public.t`)
		if strings.Contains(err.Error(), "app-secret-pw") {
			t.Errorf("the error shows the password: %v", err)
		}
		requireNothingCreated(t, e)

		// Blue fixed; green's role is still no superuser.
		e.pair.Blue.DSN = config.DSN(e.blue.DSN())
		err = startErr(t, e.options(t))
		requirePrecheck(t, err, "green", "not a superuser", "session_replication_role")
		requireNothingCreated(t, e)
	})
	t.Run("green must start empty", func(t *testing.T) {
		e := newPairEnv(t, `CREATE TABLE t (id int PRIMARY KEY)`)
		e.exec(t, e.green, `INSERT INTO t VALUES (1)`)
		err := startErr(t, e.options(t))
		requirePrecheck(t, err, "green", "public.t", "TRUNCATE")
		requireNothingCreated(t, e)
	})
}
