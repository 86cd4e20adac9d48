package main

import (
	"context"
	"errors"

	"github.com/spf13/cobra"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/client"
)

// The cutover's lifecycle commands, against any agent of the cluster.

func newStartCmd(g *globals) *cobra.Command {
	var reason string
	return planRun(g, "start PLAN", "Start a cutover: create the plan from the configuration if needed, then run it", cobra.ExactArgs(1),
		func(cmd *cobra.Command) { cmd.Flags().StringVar(&reason, "reason", "", "why (kept in the audit log)") },
		func(ctx context.Context, _ *cobra.Command, c clientAPI, args []string) (any, error) {
			if _, err := c.Plan(ctx, args[0]); err != nil {
				var apiErr *client.Error
				if !errors.As(err, &apiErr) || apiErr.Status != 404 {
					return nil, err
				}
				if _, err := c.CreatePlan(ctx, agent.CreatePlanRequest{ConfigPlan: args[0], Reason: reason}); err != nil {
					return nil, err
				}
			}
			return c.Start(ctx, args[0], reason)
		})
}

func newAbortCmd(g *globals) *cobra.Command {
	var reason string
	return planRun(g, "abort PLAN", "Abort a cutover that has not flipped: blue is unfenced, nothing flipped", cobra.ExactArgs(1),
		func(cmd *cobra.Command) { cmd.Flags().StringVar(&reason, "reason", "", "why (kept in the audit log)") },
		func(ctx context.Context, _ *cobra.Command, c clientAPI, args []string) (any, error) {
			return c.Abort(ctx, args[0], reason)
		})
}

func newRollbackCmd(g *globals) *cobra.Command {
	var reason string
	return planRun(g, "rollback PLAN", "Move traffic back to blue: fence green, prove blue caught up, flip back", cobra.ExactArgs(1),
		func(cmd *cobra.Command) { cmd.Flags().StringVar(&reason, "reason", "", "why (kept in the audit log)") },
		func(ctx context.Context, _ *cobra.Command, c clientAPI, args []string) (any, error) {
			return c.Transition(ctx, args[0], agent.TransitionRequest{To: agent.PhaseRollingBack, Reason: reason})
		})
}

func newCompleteCmd(g *globals) *cobra.Command {
	var reason string
	return planRun(g, "complete PLAN", "Close the rollback window: stop reverse replication and drop slots and publications", cobra.ExactArgs(1),
		func(cmd *cobra.Command) { cmd.Flags().StringVar(&reason, "reason", "", "why (kept in the audit log)") },
		func(ctx context.Context, _ *cobra.Command, c clientAPI, args []string) (any, error) {
			return c.Transition(ctx, args[0], agent.TransitionRequest{To: agent.PhaseDone, Reason: reason})
		})
}
