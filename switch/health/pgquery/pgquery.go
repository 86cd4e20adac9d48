// Package pgquery is the rollback health check that runs a SQL query on
// PostgreSQL (health.Check), apart from package health so that the plan
// driver, which depends on health, links no database client.
package pgquery

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cutover/cutover/internal/redact"
	"github.com/cutover/cutover/switch/health"
)

var _ health.Check = Query{}

// Query is healthy when a SQL query's single numeric result (an error rate,
// a count of failed jobs...) is at most Max.
type Query struct {
	DSN   string
	SQL   string
	Max   float64
	Label string
}

// Name implements Check.
func (q Query) Name() string {
	if q.Label != "" {
		return "query " + q.Label
	}
	return "query"
}

// Probe implements Check.
func (q Query) Probe(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, q.DSN)
	if err != nil {
		return fmt.Errorf("connect: %s", redact.Text(err.Error()))
	}
	defer conn.Close(context.Background())
	var v float64
	if err := conn.QueryRow(ctx, q.SQL).Scan(&v); err != nil {
		return fmt.Errorf("run: %w", err)
	}
	if v > q.Max {
		return fmt.Errorf("value %g is over %g", v, q.Max)
	}
	return nil
}
