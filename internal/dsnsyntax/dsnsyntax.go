// Package dsnsyntax reads PostgreSQL and Redis connection strings with
// their clients' own parsers (pgconn, go-redis): the checks and password
// extraction internal/config uses to validate a configuration and redact
// its secrets. It is apart from config so that config, and the agent and
// plan driver that depend on it, link neither client; package register
// installs it in config (every binary and test that validates imports it).
package dsnsyntax

import (
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/redis/go-redis/v9"

	"github.com/cutover/cutover/internal/redact"
)

// CheckPostgres reports whether dsn is a well-formed PostgreSQL connection
// string naming a database. The error never contains the password.
func CheckPostgres(dsn string) error {
	if !strings.HasPrefix(dsn, "postgres://") && !strings.HasPrefix(dsn, "postgresql://") && !strings.Contains(dsn, "=") {
		return fmt.Errorf("not a PostgreSQL DSN: use postgres://user@host:5432/db or host=... dbname=...")
	}
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		return fmt.Errorf("not a valid PostgreSQL DSN: %s", scrub(err, dsn))
	}
	if cfg.Database == "" {
		return fmt.Errorf("PostgreSQL DSN names no database")
	}
	return nil
}

// PostgresPassword is the password a PostgreSQL connection with dsn would
// use ("" when none, or dsn does not parse).
func PostgresPassword(dsn string) string {
	if cfg, err := pgconn.ParseConfig(dsn); err == nil {
		return cfg.Password
	}
	return ""
}

// CheckRedis reports whether dsn is a well-formed Redis URL.
func CheckRedis(dsn string) error {
	if _, err := redis.ParseURL(dsn); err != nil {
		return fmt.Errorf("not a valid Redis URL (redis://[:password@]host:port/db): %s", scrub(err, dsn))
	}
	return nil
}

// RedisPassword is the password in a Redis URL ("" when none).
func RedisPassword(dsn string) string {
	if o, err := redis.ParseURL(dsn); err == nil {
		return o.Password
	}
	return ""
}

// scrub is a parser's error without the DSN and its secrets (as config's
// scrubDSNError).
func scrub(err error, dsn string) string {
	msg := err.Error()
	msg = strings.ReplaceAll(msg, dsn, "<dsn>")
	return redact.Text(msg)
}
