package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/cutover/cutover/internal/demo"
)

func newDemoCmd(g *globals) *cobra.Command {
	var opts demo.Options
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run a whole cutover locally: blue and green PostgreSQL, Redis, 3 agents, a write load",
		Long: `Start a throwaway blue and green PostgreSQL and a Redis for the routing key,
three cutover agents (as processes), and an application of writers that follows
the routing key; run the whole cutover under that load; print a timeline and
the consistency report's path; stop everything it started. The last line is a
JSON summary (phase, write_outage_ms, outage_ms, rows_verified, writes_acknowledged,
writes_missing, gate_open, route).

With --rollback the demo also rolls back after the flip and shows that
nothing written on green is lost.

With --via pgbouncer the application is pgbench's TPC-B (--clients, default
32, for --seconds) connecting through a throwaway PgBouncer, and the flip
target is pgbouncer: the pool is paused through the window and repointed to
green, so the clients see a stall instead of errors. The summary adds the
transactions committed, the application errors, the lost writes (committed
transactions missing from pgbench_history on the serving side) and the
client-observed stall p50/p99 next to the write outage. Needs the Debian
package pgbouncer besides.

Needs the PostgreSQL and Redis server binaries (Debian packages postgresql and
redis-server). Exit status 0 when the cutover completed with no write
missing, 1 otherwise, 2 on error.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			exe, err := os.Executable()
			if err != nil {
				return withCode(exitError, err)
			}
			opts.Binary = exe
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			sum, err := demo.Run(ctx, opts, cmd.OutOrStdout())
			if err != nil {
				return withCode(exitError, err)
			}
			want := "done"
			if opts.Rollback {
				want = "rolled_back"
			}
			if pb := sum.PgBouncer; pb != nil && (sum.Phase != want || pb.ApplicationErrors > 0 || pb.LostWrites > 0 || pb.BalanceMismatch) {
				return withCode(exitFailed, fmt.Errorf("demo via pgbouncer ended %s with %d application errors and %d lost writes", sum.Phase, pb.ApplicationErrors, pb.LostWrites))
			}
			if sum.Phase != want || sum.WritesMissing > 0 || sum.BothWritable > 0 {
				return withCode(exitFailed, errors.New(fmt.Sprintf("demo ended %s with %d writes missing and %d double-writable samples", sum.Phase, sum.WritesMissing, sum.BothWritable)))
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&opts.Rollback, "rollback", false, "also roll back after the flip")
	cmd.Flags().IntVar(&opts.Writers, "writers", 8, "application sessions writing during the cutover")
	cmd.Flags().IntVar(&opts.Accounts, "accounts", 20000, "rows in the application's accounts table")
	cmd.Flags().StringVar(&opts.ReportDir, "report-dir", "cutover-demo-report", "where the consistency reports are written")
	cmd.Flags().BoolVar(&opts.KeepDir, "keep", false, "keep the agents' data directories and logs")
	cmd.Flags().StringVar(&opts.Via, "via", "", `"pgbouncer": the application (pgbench TPC-B) goes through PgBouncer, paused through the window`)
	cmd.Flags().IntVar(&opts.Clients, "clients", 32, "with --via pgbouncer: pgbench clients")
	cmd.Flags().IntVar(&opts.Seconds, "seconds", 30, "with --via pgbouncer: how long pgbench runs (it must outlast the cutover)")
	return cmd
}
