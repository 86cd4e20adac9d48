package postgres

import (
	"context"
	"strings"
	"testing"

	"github.com/cutover/cutover/integration"
)

// PostgreSQL hashes 8-byte integers, and the timestamp and time types
// through their int64 microseconds, as lo ^ hi of the two 32-bit halves
// (hashint8extended): each pair below hashes alike by the type's own hash.
// The canonical encoding must tell every pair apart.
func TestValuesWhoseHalvesXorAlikeHashApart(t *testing.T) {
	if testing.Short() {
		t.Skip("needs a PostgreSQL server")
	}
	ctx := context.Background()
	pg, err := integration.StartPostgres(ctx, integration.PostgresOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pg.Stop(context.Background()) })
	db := openDB(t, pg.DSN())

	pairs := []struct {
		typ  string
		base uint32
		a, b string
	}{
		{"bigint", oidInt8, "5", "4294967300"},
		// microseconds since 2000-01-01 xor 0x100000001
		{"timestamp", oidTimestamp, "2024-01-01 00:00:00", "2023-12-31 22:48:25.032705"},
		// xor 0x300000003
		{"timestamptz", oidTimestamptz, "2025-06-15 12:34:56.789012+00", "2025-06-15 11:23:21.821719+00"},
		// microseconds since midnight xor 0x100000001
		{"time", oidTime, "12:00:00", "13:11:34.967297"},
		// local time xor 0x200000002, same zone
		{"timetz", oidTimetz, "13:05:07.123456+02", "10:41:57.188866+02"},
	}
	for _, p := range pairs {
		t.Run(p.typ, func(t *testing.T) {
			lit := func(v string) string { return "'" + v + "'::" + p.typ }
			enc := func(v string) string {
				return "hash_record_extended(ROW(" + strings.ReplaceAll(hashTemplate(p.base, p.typ, false, false), "%s", lit(v)) + "), 0)"
			}
			var typeHashAlike, encodedAlike bool
			err := db.pool.QueryRow(ctx, "SELECT hash_record_extended(ROW("+lit(p.a)+"), 0) = hash_record_extended(ROW("+lit(p.b)+"), 0), "+
				enc(p.a)+" = "+enc(p.b)).Scan(&typeHashAlike, &encodedAlike)
			if err != nil {
				t.Fatal(err)
			}
			if !typeHashAlike {
				t.Errorf("%s and %s no longer hash alike by the type's hash: the pair tests nothing", p.a, p.b)
			}
			if encodedAlike {
				t.Errorf("%s and %s hash alike in the canonical encoding", p.a, p.b)
			}
		})
	}
}
