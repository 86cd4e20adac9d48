package postgres

import (
	"context"
	"slices"
	"testing"

	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/internal/pgscope"
)

// Moved from agent/driver (scope_test.go) with the scope's code.
func TestTheDriverFencesEveryTableInScopeByQuotedNamePartitionsIncluded(t *testing.T) {
	pg := integration.NewPostgres(t, integration.PostgresOptions{})
	ctx := context.Background()
	if err := pg.Exec(ctx, `CREATE TABLE public."Orders" (id int PRIMARY KEY); CREATE TABLE public.orders (id int PRIMARY KEY);
		CREATE TABLE public.events (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
		CREATE TABLE public.events_2025 PARTITION OF public.events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');`); err != nil {
		t.Fatal(err)
	}
	pool, err := OpenPool(ctx, config.DSN(pg.DSN()), "blue", 2)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	got, err := FenceTables(ctx, pool, config.Scope{Tables: []string{"Orders", "events"}})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{`"public"."Orders"`, `"public"."events"`, `"public"."events_2025"`}
	if !slices.Equal(got, want) {
		t.Errorf("fence tables = %v, want %v", got, want)
	}
	// Row changes replicated from a partition count against the
	// partitioned table, which is what verification compares.
	set, err := pgscope.Resolve(ctx, pool, config.Scope{Tables: []string{"Orders", "events"}})
	if err != nil {
		t.Fatal(err)
	}
	pr := &pair{}
	pr.setScope(set)
	if !slices.Equal(pr.tables, []string{"public.Orders", "public.events"}) {
		t.Errorf("verified tables = %v", pr.tables)
	}
	if root := pr.rootOf["public.events_2025"]; root != "public.events" {
		t.Errorf("a change to public.events_2025 counts against %q, want public.events", root)
	}
}
