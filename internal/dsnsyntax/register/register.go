// Package register installs dsnsyntax's PostgreSQL and Redis connection
// string readers in internal/config (config.RegisterDSNSyntax). Import it
// for its side effect in every binary, and every test, that validates a
// configuration or a plan, or computes a plan's secrets: config refuses a
// DSN of an engine without a reader (and panics on reading its password,
// rather than leave a secret unredacted).
package register

import (
	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/internal/dsnsyntax"
)

func init() {
	config.RegisterDSNSyntax(config.Postgres, config.DSNSyntax{Check: dsnsyntax.CheckPostgres, Password: dsnsyntax.PostgresPassword})
	config.RegisterDSNSyntax(config.Redis, config.DSNSyntax{Check: dsnsyntax.CheckRedis, Password: dsnsyntax.RedisPassword})
}
