package main

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/cutover/cutover/internal/config"
	pgrepl "github.com/cutover/cutover/replication/postgres"
)

func newCleanupCmd(g *globals) *cobra.Command {
	var (
		cfgPath, planName, pairName string
		list                        bool
	)
	cmd := &cobra.Command{
		Use:   "cleanup --config FILE [--plan NAME] [--pair NAME]",
		Short: "Drop the replication slots and publications a plan left on blue",
		Long: `Drop what replication made for a plan's PostgreSQL pairs: the slot (which
otherwise keeps blue's WAL forever), the publication and the heartbeat row on
blue, and the applied position on green. Green's data stays. With --list,
only print every cutover slot and publication found on each blue, with the WAL
each slot retains.

Exit status: 0 done (or nothing to do), 1 leftovers listed, 2 error.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			loaded, err := loadConfig(g, cfgPath)
			if err != nil {
				return err
			}
			log, err := g.logger(cmd.ErrOrStderr())
			if err != nil {
				return withCode(exitError, err)
			}
			found := 0
			for _, plan := range loaded.Config.Plans {
				if planName != "" && plan.Name != planName {
					continue
				}
				for _, pair := range plan.Pairs {
					if pair.Engine != config.Postgres || (pairName != "" && pair.Name != pairName) {
						continue
					}
					if list {
						left, err := pgrepl.Leftovers(cmd.Context(), pair.Blue.DSN, pgrepl.NamePrefix)
						if err != nil {
							return withCode(exitError, fmt.Errorf("pair %s: %w", pair.Name, err))
						}
						for _, l := range left {
							found++
							extra := ""
							if l.Kind == "slot" {
								extra = fmt.Sprintf(" active=%t retains=%d bytes", l.Active, l.RetainedWAL)
							}
							fmt.Fprintf(cmd.OutOrStdout(), "%s/%s: %s %s%s\n", plan.Name, pair.Name, l.Kind, l.Name, extra)
						}
						continue
					}
					d, err := pgrepl.Cleanup(cmd.Context(), plan.Name, pair, log)
					if err != nil {
						return withCode(exitError, fmt.Errorf("pair %s: %w", pair.Name, err))
					}
					dropped := append(append([]string{}, d.Slots...), d.Publications...)
					if len(dropped) == 0 {
						fmt.Fprintf(cmd.OutOrStdout(), "%s/%s: nothing to drop\n", plan.Name, pair.Name)
					} else {
						fmt.Fprintf(cmd.OutOrStdout(), "%s/%s: dropped %s\n", plan.Name, pair.Name, strings.Join(dropped, ", "))
					}
				}
			}
			if list && found > 0 {
				return withCode(exitFailed, fmt.Errorf("%d leftover(s) found", found))
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&cfgPath, "config", "", "config file (required)")
	cmd.Flags().StringVar(&planName, "plan", "", "only this plan")
	cmd.Flags().StringVar(&pairName, "pair", "", "only this pair")
	cmd.Flags().BoolVar(&list, "list", false, "list leftovers instead of dropping them")
	_ = cmd.MarkFlagRequired("config")
	return cmd
}
