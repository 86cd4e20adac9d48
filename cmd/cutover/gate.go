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

	"github.com/cutover/cutover/switch/gate"
)

func newGateCmd(g *globals) *cobra.Command {
	var (
		r        remote
		plan     string
		wait     bool
		timeout  time.Duration
		interval time.Duration
		asJSON   bool
	)
	cmd := &cobra.Command{
		Use:   "gate [--plan P] [--wait] [--timeout D]",
		Short: "Ask the gate whether traffic may flip; exit 0 only when it is open",
		Long: `Ask the agent at --addr whether the plan's traffic flip is authorized. The
answer is linearizable: the leader confirms it with a majority, and an agent
cut off from the majority answers closed.

Without --plan the agent answers for its single active plan (closed if there
are none or several). With --wait it asks every --interval until the gate
opens or --timeout passes (0: until interrupted); errors on the way (an
agent restarting, an election) are retried.

The answer is printed on stdout (--json: the API's JSON body).

Exit status: 0 open, 1 closed or timed out, 2 no answer (unreachable,
unauthorized, bad URL).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, _, err := r.client(g)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			if timeout > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, timeout)
				defer cancel()
			}
			var resp gate.Response
			if wait {
				resp, err = c.WaitGate(ctx, plan, interval)
			} else {
				resp, err = c.Gate(ctx, plan)
			}
			code := gate.ExitCode(resp, err)
			if code != gate.ExitError {
				if asJSON {
					json.NewEncoder(cmd.OutOrStdout()).Encode(resp)
				} else {
					state := "closed"
					if resp.Open {
						state = "open"
					}
					fmt.Fprintf(cmd.OutOrStdout(), "%s: %s\n", state, resp.Reason)
				}
			}
			switch code {
			case gate.ExitOpen:
				return nil
			case gate.ExitClosed:
				if err == nil {
					err = errors.New("gate closed")
				}
				return withCode(exitFailed, err)
			default:
				return withCode(exitError, err)
			}
		},
	}
	r.register(cmd)
	cmd.Flags().StringVar(&plan, "plan", "", "plan to ask about (default: the single active plan)")
	cmd.Flags().BoolVar(&wait, "wait", false, "wait until the gate opens")
	cmd.Flags().DurationVar(&timeout, "timeout", 0, "give up after this long (0: no limit with --wait; one request otherwise)")
	cmd.Flags().DurationVar(&interval, "interval", time.Second, "time between asks with --wait")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the answer as JSON")
	return cmd
}
