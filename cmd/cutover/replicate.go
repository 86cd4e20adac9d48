package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/replication"
	pgrepl "github.com/cutover/cutover/replication/postgres"
)

// findPair picks a pair of a plan from the config: the plan may be omitted
// when there is only one.
func findPair(cfg *config.Config, planName, pairName string) (config.Plan, config.Pair, error) {
	var plan *config.Plan
	for i := range cfg.Plans {
		if cfg.Plans[i].Name == planName || (planName == "" && len(cfg.Plans) == 1) {
			plan = &cfg.Plans[i]
		}
	}
	if plan == nil {
		return config.Plan{}, config.Pair{}, withCode(exitFailed, fmt.Errorf("no plan %q in the config (use --plan)", planName))
	}
	for _, p := range plan.Pairs {
		if p.Name == pairName {
			if p.Engine != config.Postgres {
				return config.Plan{}, config.Pair{}, withCode(exitFailed, fmt.Errorf("pair %s is engine %s; replicate supports postgres", p.Name, p.Engine))
			}
			return *plan, p, nil
		}
	}
	return config.Plan{}, config.Pair{}, withCode(exitFailed, fmt.Errorf("plan %s has no pair %q (use --pair)", plan.Name, pairName))
}

func newReplicateCmd(g *globals) *cobra.Command {
	var (
		cfgPath, planName, pairName string
		cleanup, jsonStatus         bool
		every                       time.Duration
		epoch                       uint64
	)
	cmd := &cobra.Command{
		Use:   "replicate --config FILE --pair NAME",
		Short: "Copy blue into green and stream changes, reporting lag, until interrupted",
		Long: `Replicate one PostgreSQL pair outside the agent: pre-check both sides, create
the publication and slot (named cutover_<plan>_<pair>), copy blue into green from
the slot's snapshot, then apply changes as they happen and print lag every
--every, until SIGINT or SIGTERM.

A restart resumes exactly after the last change applied on green. With
--cleanup the slot and publication are dropped on exit (otherwise they stay,
so that a restart resumes; remove them later with 'cutover cleanup').

Exit status: 0 stopped on a signal, 1 a pre-check failed (nothing was
created), 2 replication failed.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			loaded, err := loadConfig(g, cfgPath)
			if err != nil {
				return err
			}
			plan, pair, err := findPair(loaded.Config, planName, pairName)
			if err != nil {
				return err
			}
			log, err := g.logger(cmd.ErrOrStderr())
			if err != nil {
				return withCode(exitError, err)
			}
			defer func() { _ = log.Sync() }()
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()

			r, err := pgrepl.New(pgrepl.Options{Plan: plan.Name, Pair: pair, Epoch: epoch, Logger: log})
			if err != nil {
				return withCode(exitError, err)
			}
			if err := r.Start(ctx); err != nil {
				if errors.Is(err, replication.ErrPrecheck) {
					return withCode(exitFailed, err)
				}
				return withCode(exitError, err)
			}
			log.Info("replicating", zap.String("plan", plan.Name), zap.String("pair", pair.Name), zap.String("slot", r.SlotName()))
			t := time.NewTicker(every)
			defer t.Stop()
			var runErr error
		loop:
			for {
				select {
				case <-ctx.Done():
					break loop
				case <-r.Done():
					runErr = r.Err()
					break loop
				case <-t.C:
					st := r.Status()
					if jsonStatus {
						out, _ := json.Marshal(st)
						fmt.Fprintln(cmd.OutOrStdout(), string(out))
						continue
					}
					if st.Phase == pgrepl.PhaseCopying {
						fmt.Fprintf(cmd.OutOrStdout(), "copying: %d/%d tables, %d rows, %d bytes, eta %s\n",
							st.Copy.TablesDone, st.Copy.TablesTotal, st.Copy.Rows, st.Copy.Bytes, st.Copy.ETA.Round(time.Second))
						continue
					}
					fmt.Fprintf(cmd.OutOrStdout(), "%s: applied %s, lag %d bytes, %s (last commit %s ago)\n",
						st.Phase, st.Applied, st.Lag.Bytes, st.Lag.Delay.Round(time.Millisecond), st.Lag.CommitAge.Round(time.Millisecond))
				}
			}
			stopCtx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if cleanup {
				if err := r.Cleanup(stopCtx); err != nil {
					return withCode(exitError, fmt.Errorf("cleanup: %w", err))
				}
			} else if err := r.Stop(stopCtx); err != nil {
				return withCode(exitError, err)
			}
			if runErr != nil {
				return withCode(exitError, runErr)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&cfgPath, "config", "", "config file (required)")
	cmd.Flags().StringVar(&planName, "plan", "", "plan name (optional when the config has one plan)")
	cmd.Flags().StringVar(&pairName, "pair", "", "pair name (required)")
	cmd.Flags().BoolVar(&cleanup, "cleanup", false, "drop the slot and publication on exit")
	cmd.Flags().DurationVar(&every, "every", 5*time.Second, "how often to print the status")
	cmd.Flags().BoolVar(&jsonStatus, "json", false, "print the status as JSON lines")
	cmd.Flags().Uint64Var(&epoch, "epoch", 0, "fencing epoch stored with every apply batch (an applier with a lower one stops)")
	_ = cmd.MarkFlagRequired("config")
	_ = cmd.MarkFlagRequired("pair")
	return cmd
}
