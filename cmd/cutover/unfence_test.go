package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cutover/cutover/agent/agenttest"
	fpg "github.com/cutover/cutover/fencing/postgres"
	"github.com/cutover/cutover/integration"
)

func TestUnfenceGivesBackTheSavedGrantsOnlyOnceNoLivePlanOwnsTheFence(t *testing.T) {
	ctx := context.Background()
	pg := integration.NewPostgres(t, integration.PostgresOptions{})
	if err := pg.Exec(ctx, `
		CREATE ROLE app LOGIN PASSWORD 'app-password';
		CREATE TABLE orders (id int PRIMARY KEY);
		GRANT SELECT, INSERT, UPDATE, DELETE ON orders TO app;`); err != nil {
		t.Fatal(err)
	}
	pool, err := pgxpool.New(ctx, pg.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	// Plan orders fenced green and is still live in the cluster.
	f := fpg.New(pool, fpg.Options{Plan: "orders", Pair: "db", Tables: []string{"public.orders"}, Roles: []string{"app"}})
	if err := f.Prepare(ctx); err != nil {
		t.Fatal(err)
	}
	if err := f.Fence(ctx, 5); err != nil {
		t.Fatal(err)
	}
	appWrites := func() error {
		app, err := pgxpool.New(ctx, pg.DSNFor("cutover", "app", "app-password"))
		if err != nil {
			t.Fatal(err)
		}
		defer app.Close()
		_, err = app.Exec(ctx, "INSERT INTO orders VALUES (1) ON CONFLICT DO NOTHING")
		return err
	}
	if appWrites() == nil {
		t.Fatal("the app writes through the fence")
	}

	c := agenttest.New(t, agenttest.Options{})
	c.Leader(10 * time.Second)
	t.Setenv("CUTOVER_TOKEN", agenttest.OperatorToken)
	t.Setenv("CUTOVER_ADDR", c.URL(0))
	dir := t.TempDir()
	spec := filepath.Join(dir, "orders.json")
	if err := os.WriteFile(spec, []byte(fmt.Sprintf(`{"name":"orders","pairs":[{"name":"db","engine":"postgres",
		"blue":{"dsn":%q},"green":{"dsn":%q}}]}`, "postgres://postgres@127.0.0.1:1/none", pg.DSN())), 0o600); err != nil {
		t.Fatal(err)
	}
	if code, out, errOut := cli(t, "plan", "create", "--file", spec); code != 0 {
		t.Fatalf("plan create: %d %s %s", code, out, errOut)
	}
	config := func(api string) string {
		path := filepath.Join(dir, fmt.Sprintf("cutover-%d.yaml", time.Now().UnixNano()))
		if err := os.WriteFile(path, []byte(fmt.Sprintf(`agent:
  node_id: a1
  data_dir: %s
  api: {advertise: %q, tokens: {operator: %q, read: %q}}
plans:
  - name: orders
    pairs:
      - name: db
        engine: postgres
        fence_roles: [app]
        blue: {dsn: %q}
        green: {dsn: %q}
`, dir, api, agenttest.OperatorToken, agenttest.ReadToken, "postgres://postgres@127.0.0.1:1/none", pg.DSN())), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	live := config(c.URL(1))

	steps := []struct {
		name              string
		args              []string
		code              int
		want              string
		appWritesAfterAll bool
	}{
		{"a side that is not blue or green is refused", []string{"unfence", "--config", live, "--pair", "db", "--side", "purple"}, 1, "--side must be blue or green", false},
		{"an unknown pair is refused", []string{"unfence", "--config", live, "--pair", "nope", "--side", "green"}, 1, "no pair nope", false},
		{"a live owner refuses", []string{"unfence", "--config", live, "--pair", "db", "--side", "green"}, 1, "plan orders is live (pending)", false},
		{"an unreachable cluster refuses", []string{"unfence", "--config", config("http://127.0.0.1:1"), "--pair", "db", "--side", "green"}, 1, "cannot ask the cluster at http://127.0.0.1:1", false},
		{"an unreachable blue is an error", []string{"unfence", "--config", live, "--pair", "db", "--side", "blue", "--timeout", "5s"}, 2, "blue of db", false},
	}
	for _, s := range steps {
		code, out, errOut := cli(t, s.args...)
		if code != s.code || !strings.Contains(out+errOut, s.want) {
			t.Errorf("%s: exit %d (want %d), stdout %q, stderr %q (want %q)", s.name, code, s.code, out, errOut, s.want)
		}
		if strings.Contains(out+errOut, agenttest.ReadToken) || strings.Contains(out+errOut, agenttest.OperatorToken) {
			t.Errorf("%s: the output shows a token", s.name)
		}
	}
	if appWrites() == nil {
		t.Fatal("a refused unfence let the app write")
	}

	if code, out, errOut := cli(t, "plan", "abort", "orders", "--reason", "test"); code != 0 {
		t.Fatalf("plan abort: %d %s %s", code, out, errOut)
	}
	code, out, errOut := cli(t, "unfence", "--config", live, "--pair", "db", "--side", "green")
	if code != 0 || !strings.Contains(out, "green of db: unfenced; 3 privilege(s) given back; the fence was put up by plan orders (pair db, epoch 5") {
		t.Fatalf("unfence once the owner aborted: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	if err := appWrites(); err != nil {
		t.Errorf("the app cannot write after the unfence: %v", err)
	}
	code, out, errOut = cli(t, "unfence", "--config", live, "--pair", "db", "--side", "green")
	if code != 0 || !strings.Contains(out, "not fenced, nothing to do") {
		t.Errorf("a second unfence: exit %d, stdout %q, stderr %q", code, out, errOut)
	}

	// Fenced again, by a plan the cluster cannot be asked about: --force.
	if err := f.Fence(ctx, 1); err != nil {
		t.Fatalf("fence after the break-glass unfence cleared the epoch: %v", err)
	}
	code, out, errOut = cli(t, "unfence", "--config", config("http://127.0.0.1:1"), "--pair", "db", "--side", "green", "--force")
	if code != 0 || !strings.Contains(out, "unfenced") {
		t.Fatalf("unfence --force: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	if err := appWrites(); err != nil {
		t.Errorf("the app cannot write after unfence --force: %v", err)
	}
}
