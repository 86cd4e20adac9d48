package pgscope_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/internal/pgscope"
)

// catalogSQL has a mixed-case "Orders" beside orders, a table whose name
// holds a dot and a quote, a partitioned table of two levels and a table
// in a second schema.
const catalogSQL = `
CREATE TABLE public."Orders" (id int PRIMARY KEY);
CREATE TABLE public.orders (id int PRIMARY KEY);
CREATE TABLE public."odd.name""q" (id int PRIMARY KEY);
CREATE TABLE public.events (id int, at date, region text, PRIMARY KEY (id, at, region)) PARTITION BY RANGE (at);
CREATE TABLE public.events_2025 PARTITION OF public.events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01') PARTITION BY LIST (region);
CREATE TABLE public.events_2025_eu PARTITION OF public.events_2025 FOR VALUES IN ('eu');
CREATE TABLE public.events_2025_us PARTITION OF public.events_2025 FOR VALUES IN ('us');
CREATE TABLE public.events_2026 PARTITION OF public.events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE SCHEMA billing;
CREATE TABLE billing.invoices (id int PRIMARY KEY);
CREATE TEMPORARY TABLE scratch (id int);
`

func newCatalog(t *testing.T) (*integration.Postgres, *pgxpool.Pool) {
	t.Helper()
	pg := integration.NewPostgres(t, integration.PostgresOptions{})
	ctx := context.Background()
	if err := pg.Exec(ctx, catalogSQL); err != nil {
		t.Fatalf("create tables: %v", err)
	}
	pool, err := pgxpool.New(ctx, pg.DSN())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pg, pool
}

func resolveNames(t *testing.T, pool *pgxpool.Pool, scope config.Scope) (all, leaves, roots []string) {
	t.Helper()
	set, err := pgscope.Resolve(context.Background(), pool, scope)
	if err != nil {
		t.Fatalf("resolve %+v: %v", scope, err)
	}
	return pgscope.Idents(set.All()), pgscope.Idents(set.Leaves()), pgscope.Idents(set.Roots())
}

func TestResolve(t *testing.T) {
	pg, pool := newCatalog(t)
	ctx := context.Background()

	t.Run("an empty scope covers every table, partitions under their parent, and nothing temporary", func(t *testing.T) {
		all, leaves, roots := resolveNames(t, pool, config.Scope{})
		wantAll := []string{`"billing"."invoices"`, `"public"."Orders"`, `"public"."events"`, `"public"."events_2025"`, `"public"."events_2025_eu"`, `"public"."events_2025_us"`, `"public"."events_2026"`, `"public"."odd.name""q"`, `"public"."orders"`}
		if !slices.Equal(all, wantAll) {
			t.Errorf("All = %v, want %v", all, wantAll)
		}
		wantLeaves := []string{`"billing"."invoices"`, `"public"."Orders"`, `"public"."events_2025_eu"`, `"public"."events_2025_us"`, `"public"."events_2026"`, `"public"."odd.name""q"`, `"public"."orders"`}
		if !slices.Equal(leaves, wantLeaves) {
			t.Errorf("Leaves = %v, want %v", leaves, wantLeaves)
		}
		wantRoots := []string{`"billing"."invoices"`, `"public"."Orders"`, `"public"."events"`, `"public"."odd.name""q"`, `"public"."orders"`}
		if !slices.Equal(roots, wantRoots) {
			t.Errorf("Roots = %v, want %v", roots, wantRoots)
		}
	})

	t.Run("a mixed-case name picks that table and not its lower-case namesake", func(t *testing.T) {
		all, _, _ := resolveNames(t, pool, config.Scope{Tables: []string{"Orders"}})
		if !slices.Equal(all, []string{`"public"."Orders"`}) {
			t.Errorf("All = %v", all)
		}
		all, _, _ = resolveNames(t, pool, config.Scope{Tables: []string{`public."Orders"`}})
		if !slices.Equal(all, []string{`"public"."Orders"`}) {
			t.Errorf("quoted: All = %v", all)
		}
		all, _, _ = resolveNames(t, pool, config.Scope{Tables: []string{"public.orders"}})
		if !slices.Equal(all, []string{`"public"."orders"`}) {
			t.Errorf("lower case: All = %v", all)
		}
	})

	t.Run("a quoted name may hold a dot and a quote", func(t *testing.T) {
		all, _, _ := resolveNames(t, pool, config.Scope{Tables: []string{`"public"."odd.name""q"`}})
		if !slices.Equal(all, []string{`"public"."odd.name""q"`}) {
			t.Errorf("All = %v", all)
		}
	})

	t.Run("a named partitioned table brings its partitions at every level", func(t *testing.T) {
		all, leaves, roots := resolveNames(t, pool, config.Scope{Tables: []string{"public.events"}})
		want := []string{`"public"."events"`, `"public"."events_2025"`, `"public"."events_2025_eu"`, `"public"."events_2025_us"`, `"public"."events_2026"`}
		if !slices.Equal(all, want) {
			t.Errorf("All = %v, want %v", all, want)
		}
		if want := []string{`"public"."events_2025_eu"`, `"public"."events_2025_us"`, `"public"."events_2026"`}; !slices.Equal(leaves, want) {
			t.Errorf("Leaves = %v, want %v", leaves, want)
		}
		if !slices.Equal(roots, []string{`"public"."events"`}) {
			t.Errorf("Roots = %v", roots)
		}
	})

	t.Run("a named partition is its own root", func(t *testing.T) {
		all, leaves, roots := resolveNames(t, pool, config.Scope{Tables: []string{"events_2025"}})
		if want := []string{`"public"."events_2025"`, `"public"."events_2025_eu"`, `"public"."events_2025_us"`}; !slices.Equal(all, want) {
			t.Errorf("All = %v, want %v", all, want)
		}
		if want := []string{`"public"."events_2025_eu"`, `"public"."events_2025_us"`}; !slices.Equal(leaves, want) {
			t.Errorf("Leaves = %v", leaves)
		}
		if !slices.Equal(roots, []string{`"public"."events_2025"`}) {
			t.Errorf("Roots = %v", roots)
		}
	})

	t.Run("a scope by schema covers its tables and their partitions", func(t *testing.T) {
		all, _, _ := resolveNames(t, pool, config.Scope{Schemas: []string{"billing"}})
		if !slices.Equal(all, []string{`"billing"."invoices"`}) {
			t.Errorf("All = %v", all)
		}
		all, _, roots := resolveNames(t, pool, config.Scope{Schemas: []string{"public"}})
		if len(all) != 8 || slices.Contains(all, `"billing"."invoices"`) {
			t.Errorf("All = %v", all)
		}
		if !slices.Contains(roots, `"public"."events"`) || slices.Contains(roots, `"public"."events_2026"`) {
			t.Errorf("Roots = %v", roots)
		}
	})

	t.Run("excluding a partitioned table excludes its partitions", func(t *testing.T) {
		all, _, _ := resolveNames(t, pool, config.Scope{Schemas: []string{"public"}, ExcludeTables: []string{"public.events_2025", `"Orders"`}})
		want := []string{`"public"."events"`, `"public"."events_2026"`, `"public"."odd.name""q"`, `"public"."orders"`}
		if !slices.Equal(all, want) {
			t.Errorf("All = %v, want %v", all, want)
		}
	})

	t.Run("a partition attached later is covered at the next resolve", func(t *testing.T) {
		if err := pg.Exec(ctx, `CREATE TABLE public.events_2027 PARTITION OF public.events FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')`); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pg.Exec(ctx, `DROP TABLE public.events_2027`) })
		_, leaves, _ := resolveNames(t, pool, config.Scope{Tables: []string{"public.events"}})
		if !slices.Contains(leaves, `"public"."events_2027"`) {
			t.Errorf("Leaves = %v, want events_2027 among them", leaves)
		}
	})

	t.Run("names that do not exist and an empty result are scope errors naming the problem", func(t *testing.T) {
		_, err := pgscope.Resolve(ctx, pool, config.Scope{Tables: []string{"public.orders", "public.ORDERS", "nope.x"}})
		if !errors.Is(err, pgscope.ErrScope) || err == nil {
			t.Fatalf("err = %v, want a scope error", err)
		}
		for _, name := range []string{"public.ORDERS", "nope.x"} {
			if !strings.Contains(err.Error(), name) {
				t.Errorf("error %q does not name %s", err, name)
			}
		}
		_, err = pgscope.Resolve(ctx, pool, config.Scope{Tables: []string{"events"}, ExcludeTables: []string{"events"}})
		if !errors.Is(err, pgscope.ErrScope) {
			t.Errorf("everything excluded: err = %v, want a scope error", err)
		}
	})

	t.Run("Root maps a partition at any level to the partitioned table in scope", func(t *testing.T) {
		set, err := pgscope.Resolve(ctx, pool, config.Scope{})
		if err != nil {
			t.Fatal(err)
		}
		leaf, ok := set.Lookup("public", "events_2025_eu")
		if !ok {
			t.Fatal("events_2025_eu not in scope")
		}
		root, ok := set.Root(leaf.OID)
		if !ok || root.String() != "public.events" {
			t.Errorf("Root(events_2025_eu) = %v %v, want public.events", root, ok)
		}
	})
}

func TestParseName(t *testing.T) {
	for _, tc := range []struct{ in, schema, name string }{
		{"orders", "public", "orders"},
		{"Orders", "public", "Orders"},
		{"billing.invoices", "billing", "invoices"},
		{`public."Orders"`, "public", "Orders"},
		{`"my.schema"."a""b"`, "my.schema", `a"b`},
	} {
		s, n, err := pgscope.ParseName(tc.in)
		if err != nil || s != tc.schema || n != tc.name {
			t.Errorf("ParseName(%q) = %q, %q, %v; want %q, %q", tc.in, s, n, err, tc.schema, tc.name)
		}
	}
	for _, bad := range []string{"", "a.b.c", `"open`, `"a"b`, ".x", "x."} {
		if _, _, err := pgscope.ParseName(bad); err == nil {
			t.Errorf("ParseName(%q) accepted", bad)
		}
	}
}
