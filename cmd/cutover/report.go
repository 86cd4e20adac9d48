package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/cutover/cutover/consistency"
)

func newReportCmd(g *globals) *cobra.Command {
	var jsonIn, htmlOut string
	cmd := &cobra.Command{
		Use:   "report --json FILE --html OUT",
		Short: "Render a JSON consistency report as a self-contained HTML page",
		Long: `Render the JSON report of a verification (cutover verify --json, or a plan's
verification) as an HTML page with inline styles and no external assets, to
read and archive. --html - writes to standard output.

Exit status: 0 rendered, 2 unreadable report or unwritable output.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if jsonIn == "" || htmlOut == "" {
				return withCode(exitError, errors.New("report: give --json FILE and --html OUT"))
			}
			f, err := os.Open(jsonIn)
			if err != nil {
				return withCode(exitError, fmt.Errorf("report: %w", err))
			}
			defer f.Close()
			rep, err := consistency.ReadReport(f)
			if err != nil {
				return withCode(exitError, fmt.Errorf("report: %s: %w", jsonIn, err))
			}
			if htmlOut == "-" {
				if err := rep.WriteHTML(cmd.OutOrStdout()); err != nil {
					return withCode(exitError, err)
				}
				return nil
			}
			if err := writeFileAtomic(htmlOut, rep.WriteHTML); err != nil {
				return withCode(exitError, fmt.Errorf("report: %w", err))
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "%s: %s report written to %s\n", jsonIn, rep.Verdict, htmlOut)
			return nil
		},
	}
	cmd.Flags().StringVar(&jsonIn, "json", "", "JSON report to read")
	cmd.Flags().StringVar(&htmlOut, "html", "", "HTML page to write (- for standard output)")
	return cmd
}
