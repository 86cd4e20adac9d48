// Package targets builds a flip target from its configuration: the one
// switch over target types, kept out of package target so that what
// depends on the Target interface (the plan driver) links no Redis or
// PostgreSQL client.
package targets

import (
	"fmt"

	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/switch/target"
	"github.com/cutover/cutover/switch/target/pgbouncer"
	"github.com/cutover/cutover/switch/target/redistarget"
)

// New builds the target that cfg describes.
func New(cfg config.Target) (target.Target, error) {
	switch cfg.Type {
	case config.TargetRedis:
		return redistarget.NewRedis(cfg.DSN.Reveal(), cfg.Key, cfg.Channel)
	case config.TargetWebhook:
		return target.NewWebhook(cfg.URL, cfg.Headers, cfg.Timeout.D(), cfg.Retries), nil
	case config.TargetCommand:
		return target.NewCommand(cfg.Command, cfg.Timeout.D(), cfg.EnvAllow), nil
	case config.TargetPgBouncer:
		return pgbouncer.NewPgBouncer(pgbouncer.PgBouncerOptions{
			AdminDSN: cfg.DSN.Reveal(), Database: cfg.Database, File: cfg.DatabasesFile,
			Blue: cfg.Blue, Green: cfg.Green, PauseTimeout: cfg.PauseTimeout.D(), Timeout: cfg.Timeout.D(),
		})
	}
	return nil, fmt.Errorf("unknown target type %q", cfg.Type)
}
