package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"

	"github.com/spf13/cobra"
)

func newAuditCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "audit",
		Short: "Work with the cluster's audit log",
	}
	cmd.AddCommand(auditExport(g))
	return cmd
}

// auditExport writes the whole audit log, to keep it before the agents
// compact its oldest entries (agent.history.audit_max).
func auditExport(g *globals) *cobra.Command {
	var (
		r   remote
		out string
	)
	cmd := &cobra.Command{
		Use:   "export [--out FILE]",
		Short: "Write the whole audit log as JSON (to keep it before its oldest entries are compacted)",
		Long: `Write the cluster's whole audit log, oldest first, as a JSON array: to
standard output, or to --out FILE (written 0600). Past agent.history.audit_max
entries the agents fold the oldest into one summary entry; export the log
first to keep every entry.

Exit status: 0 written, 2 no answer or unwritable output.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, _, err := r.client(g)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(context.Background(), r.timeout)
			defer cancel()
			entries, err := c.Audit(ctx, "", 0)
			if err != nil {
				return apiExit(err)
			}
			write := func(w io.Writer) error {
				enc := json.NewEncoder(w)
				enc.SetIndent("", "  ")
				return enc.Encode(entries)
			}
			if out == "" || out == "-" {
				return write(cmd.OutOrStdout())
			}
			if err := writeFileAtomic(out, write); err != nil {
				return withCode(exitError, fmt.Errorf("audit export: %w", err))
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "%d audit entries written to %s\n", len(entries), out)
			return nil
		},
	}
	r.register(cmd)
	cmd.Flags().StringVar(&out, "out", "", "file to write (default standard output)")
	return cmd
}
