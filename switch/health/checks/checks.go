// Package checks builds a rollback health check from its configuration:
// the one switch over check types, kept out of package health so that what
// depends on health.Check (the plan driver) links no database client.
package checks

import (
	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/switch/health"
	"github.com/cutover/cutover/switch/health/pgquery"
)

// New builds the check c describes; nil for a type it does not know
// (skipped by the driver).
func New(c config.HealthCheck) health.Check {
	switch c.Type {
	case "http":
		return health.HTTP{URL: c.URL, Status: c.Status, MaxLatency: c.MaxLatency.D()}
	case "query":
		return pgquery.Query{DSN: c.DSN.Reveal(), SQL: c.Query, Max: c.Max}
	}
	return nil
}
