package main

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/cutover/cutover/integration"
	pgrepl "github.com/cutover/cutover/replication/postgres"
)

func TestCleanupDropsOnlyThePlansOwnNamesAndOrphansOnlyWithForce(t *testing.T) {
	blue, green := startPair(t)
	ctx := context.Background()
	dir := t.TempDir()
	cfg := filepath.Join(dir, "c.yaml")
	write(t, cfg, `agent:
  node_id: a1
  data_dir: `+dir+`
  api: {tokens: {operator: "tok-abcdefghijklmnopq"}}
plans:
  - name: shop
    pairs:
      - name: db-1
        engine: postgres
        blue: {dsn: "`+blue.DSN()+`"}
        green: {dsn: "`+green.DSN()+`"}
`)
	mine := pgrepl.Name("shop", "db-1", pgrepl.Forward)
	// Another plan's pair whose name differs only by _ for -, and a slot
	// of the old naming scheme that no plan here recorded.
	other := pgrepl.Name("shop", "db_1", pgrepl.Forward)
	legacy := pgrepl.LegacyName("shop", "db-1")
	conn, err := pgx.Connect(ctx, blue.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	for _, n := range []string{mine, other, legacy} {
		if _, err := conn.Exec(ctx, `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, n); err != nil {
			t.Fatal(err)
		}
	}
	slots := func() map[string]bool {
		t.Helper()
		rows, _ := conn.Query(ctx, `SELECT slot_name::text FROM pg_replication_slots`)
		names, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]bool{}
		for _, n := range names {
			out[n] = true
		}
		return out
	}
	cleanup := func(args ...string) (int, string) {
		t.Helper()
		t.Setenv("CUTOVER_ADDR", "")
		var out, errb bytes.Buffer
		code := run(append([]string{"cleanup", "--config", cfg}, args...), &out, &errb)
		return code, out.String() + errb.String()
	}

	code, out := cleanup("--list")
	if code != 1 {
		t.Errorf("--list exit %d, want 1 (leftovers listed):\n%s", code, out)
	}
	for _, want := range []string{mine + " active=false retains=", "owner=shop/db-1 forward", other, legacy, "owner=orphan"} {
		if !strings.Contains(out, want) {
			t.Errorf("--list does not show %q:\n%s", want, out)
		}
	}
	if strings.Count(out, "owner=orphan") != 2 {
		t.Errorf("want two orphans listed:\n%s", out)
	}

	if code, out := cleanup(); code != 0 || !strings.Contains(out, "dropped "+mine) {
		t.Errorf("cleanup exit %d:\n%s", code, out)
	}
	if got := slots(); got[mine] || !got[other] || !got[legacy] {
		t.Errorf("after the plan's cleanup the slots are %v: want only %s gone", got, mine)
	}

	if code, out := cleanup("--orphans"); code != 1 || !strings.Contains(out, "--orphans --force") {
		t.Errorf("--orphans without --force: exit %d:\n%s", code, out)
	}
	if got := slots(); !got[other] || !got[legacy] {
		t.Errorf("--orphans without --force dropped something: %v", got)
	}
	if code, out := cleanup("--orphans", "--force"); code != 0 {
		t.Errorf("--orphans --force: exit %d:\n%s", code, out)
	}
	if got := slots(); got[other] || got[legacy] {
		t.Errorf("orphans left after --orphans --force: %v", got)
	}
}

func TestVerifyTakesTheDSNsAndTheScopeOfAConfigPair(t *testing.T) {
	blue, green := startPair(t)
	ctx := context.Background()
	for _, s := range []*integration.Postgres{blue, green} {
		if err := s.Exec(ctx, `CREATE TABLE events (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
			CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
			INSERT INTO events SELECT g, '2025-02-01' FROM generate_series(1, 100) g;
			CREATE TABLE "Orders" (id int PRIMARY KEY); INSERT INTO "Orders" VALUES (1)`); err != nil {
			t.Fatal(err)
		}
	}
	// orders (lower case) differs, but is not in the pair's scope.
	if err := green.Exec(ctx, `DELETE FROM orders WHERE id = 1`); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cfg := filepath.Join(dir, "c.yaml")
	write(t, cfg, `agent:
  node_id: a1
  data_dir: `+dir+`
  api: {tokens: {operator: "tok-abcdefghijklmnopq"}}
plans:
  - name: shop
    pairs:
      - name: db
        engine: postgres
        blue: {dsn: "`+blue.DSN()+`"}
        green: {dsn: "`+green.DSN()+`"}
        scope: {tables: [events, 'public."Orders"']}
`)
	verify := func() (int, string) {
		var out, errb bytes.Buffer
		code := run([]string{"verify", "--progress", "never", "--config", cfg, "--pair", "db"}, &out, &errb)
		return code, out.String() + errb.String()
	}
	if code, out := verify(); code != 0 || !strings.Contains(out, "equal: 2 tables") {
		t.Errorf("exit %d, want 0 over events and Orders only:\n%s", code, out)
	}
	if err := green.Exec(ctx, `UPDATE events_2025 SET at = '2025-03-01' WHERE id = 7`); err != nil {
		t.Fatal(err)
	}
	if code, out := verify(); code != 1 || !strings.Contains(out, "public.events") {
		t.Errorf("exit %d, want 1 naming public.events:\n%s", code, out)
	}
}
