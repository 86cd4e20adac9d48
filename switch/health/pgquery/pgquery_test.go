package pgquery

import (
	"context"
	"strings"
	"testing"

	"github.com/cutover/cutover/integration"
)

// Moved from switch/health with the check.
func TestQueryCheckComparesTheValueWithTheLimit(t *testing.T) {
	pg := integration.NewPostgres(t, integration.PostgresOptions{})
	ctx := context.Background()
	if err := pg.Exec(ctx, "CREATE TABLE requests (ok bool); INSERT INTO requests SELECT g % 10 <> 0 FROM generate_series(1, 100) g"); err != nil {
		t.Fatal(err)
	}
	rate := "SELECT avg(CASE WHEN ok THEN 0 ELSE 1 END) FROM requests"
	if err := (Query{DSN: pg.DSN(), SQL: rate, Max: 0.2}).Probe(ctx); err != nil {
		t.Errorf("10%% errors under a 20%% limit: %v", err)
	}
	if err := (Query{DSN: pg.DSN(), SQL: rate, Max: 0.05}).Probe(ctx); err == nil || !strings.Contains(err.Error(), "0.1 is over 0.05") {
		t.Errorf("10%% errors over a 5%% limit: %v", err)
	}
}
