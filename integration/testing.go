package integration

import (
	"context"
	"testing"
	"time"
)

// Bounds for the test helpers, generous for a loaded two-core machine.
const (
	testStartTimeout = 2 * time.Minute
	testStopTimeout  = 30 * time.Second
)

// NewPostgres starts a PostgreSQL cluster for the test, fails the test
// (t.Fatalf, with the server's log tail) if it cannot, and stops it in
// t.Cleanup, which also runs when the test fails or panics. With -short
// (`make unit`) it skips the test instead: short runs start no servers.
func NewPostgres(t testing.TB, opts PostgresOptions) *Postgres {
	t.Helper()
	skipIfShort(t)
	ctx, cancel := context.WithTimeout(context.Background(), testStartTimeout)
	defer cancel()
	p, err := StartPostgres(ctx, opts)
	if err != nil {
		t.Fatalf("integration: %v", err)
	}
	t.Cleanup(func() { stopInTest(t, "postgres", p.Stop) })
	return p
}

// NewMariaDB is NewPostgres for MariaDB.
func NewMariaDB(t testing.TB, opts MariaDBOptions) *MariaDB {
	t.Helper()
	skipIfShort(t)
	ctx, cancel := context.WithTimeout(context.Background(), testStartTimeout)
	defer cancel()
	m, err := StartMariaDB(ctx, opts)
	if err != nil {
		t.Fatalf("integration: %v", err)
	}
	t.Cleanup(func() { stopInTest(t, "mariadb", m.Stop) })
	return m
}

// NewRedis is NewPostgres for Redis.
func NewRedis(t testing.TB, opts RedisOptions) *Redis {
	t.Helper()
	skipIfShort(t)
	ctx, cancel := context.WithTimeout(context.Background(), testStartTimeout)
	defer cancel()
	r, err := StartRedis(ctx, opts)
	if err != nil {
		t.Fatalf("integration: %v", err)
	}
	t.Cleanup(func() { stopInTest(t, "redis", r.Stop) })
	return r
}

func skipIfShort(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("integration: starts a real server; skipped with -short")
	}
}

func stopInTest(t testing.TB, engine string, stop func(context.Context) error) {
	ctx, cancel := context.WithTimeout(context.Background(), testStopTimeout)
	defer cancel()
	if err := stop(ctx); err != nil {
		t.Errorf("integration: stop %s: %v", engine, err)
	}
}

// NewPgBouncer is NewPostgres for PgBouncer.
func NewPgBouncer(t testing.TB, opts PgBouncerOptions) *PgBouncer {
	t.Helper()
	skipIfShort(t)
	ctx, cancel := context.WithTimeout(context.Background(), testStartTimeout)
	defer cancel()
	b, err := StartPgBouncer(ctx, opts)
	if err != nil {
		t.Fatalf("integration: %v", err)
	}
	t.Cleanup(func() { stopInTest(t, "pgbouncer", b.Stop) })
	return b
}
