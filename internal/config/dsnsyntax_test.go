package config

import "github.com/cutover/cutover/internal/dsnsyntax"

// What internal/dsnsyntax/register installs in a binary (it imports this
// package, so this package's tests install the same readers themselves).
func init() {
	RegisterDSNSyntax(Postgres, DSNSyntax{Check: dsnsyntax.CheckPostgres, Password: dsnsyntax.PostgresPassword})
	RegisterDSNSyntax(Redis, DSNSyntax{Check: dsnsyntax.CheckRedis, Password: dsnsyntax.RedisPassword})
}
