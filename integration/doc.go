// Package integration starts throwaway PostgreSQL, MariaDB and Redis servers
// (and a PgBouncer in front of PostgreSQL, StartPgBouncer, running as the
// system user "postgres" when the caller is root) for tests and for
// `cutover demo`; StartPgbench runs pgbench's TPC-B against them.
//
// Every server gets its own temporary directory under os.TempDir() named
// "cutover-it-<engine>-*", listens only on 127.0.0.1 on a free port picked at
// start (never the standard 5432/3306/6379, so the machine's own instances
// are left alone), and runs in its own process group. Stop kills the group,
// reaps it and removes the directory.
//
//	pg, err := integration.StartPostgres(ctx, integration.PostgresOptions{})
//	if err != nil { ... }
//	defer pg.Stop(context.Background())
//	conn, err := pgx.Connect(ctx, pg.DSN())
//
// In tests, NewPostgres, NewMariaDB and NewRedis do the same, fail the test
// with the server's log tail when the start fails, and register Stop with
// t.Cleanup, which the testing package runs also when the test fails or
// panics.
//
// # Binaries
//
// Server binaries are looked up in PATH first, then in the Debian locations
// (/usr/lib/postgresql/<highest version>/bin, /usr/sbin, /usr/bin). A missing
// binary yields a *BinaryNotFoundError that names the Debian package to
// install and matches ErrBinaryNotFound.
//
// # Users
//
// PostgreSQL and MariaDB refuse to run as root. When the caller is root (as
// tests and CI are here) they run as the system users "postgres" and
// "mysql" (set through SysProcAttr.Credential, not runuser, so that the
// server is a direct child and Pdeathsig reaches it); Redis runs as "redis"
// when that user exists. Otherwise everything runs as the caller.
//
// # Speed
//
// initdb and mariadb-install-db take about a second each, so they run once
// per configuration: the result is kept as a template in
// os.TempDir()/cutover-it-cache-<uid>/ (shared by all test binaries of a run
// and later runs; delete the folder to rebuild) and each server starts from a
// copy. Every PostgreSQL copy gets a fresh system identifier, so two
// instances never look like the same cluster. The servers run with
// durability turned off (PostgreSQL fsync=off and full_page_writes=off,
// InnoDB flushing relaxed): data of a throwaway server need not survive a
// machine crash.
//
// Measured on the two-core development machine with a warm cache:
// PostgreSQL 0.5-0.7 s, MariaDB 0.4-0.5 s, Redis 0.03 s from
// Start to the first accepted connection; the first start of a
// configuration adds about 1.5 s to build its template. Most of the
// PostgreSQL time is creating the ~1,300 files of the copy on ext4: with
// TMPDIR on a tmpfs (TMPDIR=/dev/shm) it drops to about 0.25 s, at the cost
// of keeping the servers' data in memory.
//
// # Crashed callers
//
// Servers get a parent-death signal (Pdeathsig): when the process that
// started them dies, even by SIGKILL, the kernel signals them and they exit.
// Linux sends it when the OS thread that forked the server exits, which in
// Go happens only when a goroutine locked to its thread with
// runtime.LockOSThread returns without unlocking; do not call Start from such
// a goroutine. The temporary directory of a killed caller is left behind;
// the prefix makes it easy to spot.
package integration
