package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/cutover/cutover/agent"
)

func newPlanCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "plan",
		Short: "Create, start, move and abort plans on the agent cluster",
		Long: `Work with the plans in the cluster's replicated state, through the agent at
--addr (a follower forwards writes to the leader). Writes need the operator
token.

Exit status: 0 done, 1 refused (illegal transition, stale epoch, unknown or
existing plan, invalid spec), 2 no answer (unreachable, unauthorized, no
leader).`,
	}
	cmd.AddCommand(planList(g), planShow(g), planCreate(g), planStart(g), planAbort(g), planTransition(g), planDelete(g))
	return cmd
}

// planRun wraps a plan subcommand: the remote flags, --json, and printing.
func planRun(g *globals, use, short string, args cobra.PositionalArgs, setup func(cmd *cobra.Command),
	do func(ctx context.Context, cmd *cobra.Command, c clientAPI, args []string) (any, error)) *cobra.Command {
	var (
		r      remote
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   use,
		Short: short,
		Args:  args,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, _, err := r.client(g)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(context.Background(), r.timeout)
			defer cancel()
			v, err := do(ctx, cmd, c, args)
			if err != nil {
				return apiExit(err)
			}
			return printPlans(cmd.OutOrStdout(), v, asJSON)
		},
	}
	r.register(cmd)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	if setup != nil {
		setup(cmd)
	}
	return cmd
}

// clientAPI is what the plan and members commands use of client.Client.
type clientAPI interface {
	Plans(ctx context.Context) ([]agent.PlanInfo, error)
	Plan(ctx context.Context, name string) (agent.PlanInfo, error)
	CreatePlan(ctx context.Context, req agent.CreatePlanRequest) (agent.PlanInfo, error)
	Start(ctx context.Context, plan, reason string) (agent.PlanInfo, error)
	Abort(ctx context.Context, plan, reason string) (agent.PlanInfo, error)
	Transition(ctx context.Context, plan string, req agent.TransitionRequest) (agent.PlanInfo, error)
	Members(ctx context.Context) ([]agent.MemberStatus, error)
	AddMember(ctx context.Context, req agent.AddMemberRequest) ([]agent.MemberStatus, error)
	RemoveMember(ctx context.Context, id, reason string) ([]agent.MemberStatus, error)
	DeletePlan(ctx context.Context, plan, reason string) error
}

func planList(g *globals) *cobra.Command {
	return planRun(g, "list", "List plans", cobra.NoArgs, nil, func(ctx context.Context, _ *cobra.Command, c clientAPI, _ []string) (any, error) {
		return c.Plans(ctx)
	})
}

func planShow(g *globals) *cobra.Command {
	return planRun(g, "show NAME", "Show a plan, its steps and its audit log (secrets masked)", cobra.ExactArgs(1), nil,
		func(ctx context.Context, _ *cobra.Command, c clientAPI, args []string) (any, error) {
			return c.Plan(ctx, args[0])
		})
}

func planCreate(g *globals) *cobra.Command {
	var (
		file, reason  string
		allowLiterals bool
	)
	return planRun(g, "create [NAME | --file SPEC.json]", "Create a plan from the leader's configuration file, or from a JSON spec",
		cobra.MaximumNArgs(1), func(cmd *cobra.Command) {
			cmd.Long = `Create a plan in phase pending. NAME is a plan of the configuration file of
the leader (agents share their plans section). --file posts a plan spec
instead: one plan written as in the configuration file, in JSON; it is
validated like the file. Write its secrets as ${CUTOVER_NAME} references to
variables set on every agent: the agents store the references, never the
values. A spec that writes a secret out (DSN password, header value, URL
password or token) is refused unless --allow-literal-secrets is given, since
every agent's Raft log and snapshots would then hold it.`
			cmd.Flags().StringVar(&file, "file", "", "JSON plan spec to post")
			cmd.Flags().BoolVar(&allowLiterals, "allow-literal-secrets", false, "accept a spec that writes secrets out (they are then stored in the Raft log)")
			cmd.Flags().StringVar(&reason, "reason", "", "why (kept in the audit log)")
		}, func(ctx context.Context, _ *cobra.Command, c clientAPI, args []string) (any, error) {
			req := agent.CreatePlanRequest{Reason: reason, AllowLiteralSecrets: allowLiterals}
			switch {
			case len(args) == 1 && file != "":
				return nil, withCode(exitFailed, fmt.Errorf("give NAME or --file, not both"))
			case len(args) == 1:
				req.ConfigPlan = args[0]
			case file != "":
				data, err := os.ReadFile(file)
				if err != nil {
					return nil, withCode(exitError, err)
				}
				req.Spec = data
			default:
				return nil, withCode(exitFailed, fmt.Errorf("give a plan NAME from the configuration, or --file"))
			}
			return c.CreatePlan(ctx, req)
		})
}

func planStart(g *globals) *cobra.Command {
	var reason string
	return planRun(g, "start NAME", "Start a pending plan (pending -> copying)", cobra.ExactArgs(1),
		func(cmd *cobra.Command) { cmd.Flags().StringVar(&reason, "reason", "", "why (kept in the audit log)") },
		func(ctx context.Context, _ *cobra.Command, c clientAPI, args []string) (any, error) {
			return c.Start(ctx, args[0], reason)
		})
}

func planAbort(g *globals) *cobra.Command {
	var reason string
	return planRun(g, "abort NAME", "Abort a plan that has not switched yet (up to authorized, before the flip begins)", cobra.ExactArgs(1),
		func(cmd *cobra.Command) { cmd.Flags().StringVar(&reason, "reason", "", "why (kept in the audit log)") },
		func(ctx context.Context, _ *cobra.Command, c clientAPI, args []string) (any, error) {
			return c.Abort(ctx, args[0], reason)
		})
}

func planTransition(g *globals) *cobra.Command {
	var (
		to, reason string
		ifEpoch    uint64
	)
	return planRun(g, "transition NAME --to PHASE", "Move a manual plan to its next phase (the state machine refuses illegal moves, and the moves the driver owns in a plan that is not manual)", cobra.ExactArgs(1),
		func(cmd *cobra.Command) {
			cmd.Flags().StringVar(&to, "to", "", "target phase")
			cmd.Flags().StringVar(&reason, "reason", "", "why (kept in the audit log)")
			cmd.Flags().Uint64Var(&ifEpoch, "if-epoch", 0, "only if the plan is still at this epoch")
			_ = cmd.MarkFlagRequired("to")
		},
		func(ctx context.Context, _ *cobra.Command, c clientAPI, args []string) (any, error) {
			return c.Transition(ctx, args[0], agent.TransitionRequest{To: agent.Phase(to), Reason: reason, IfEpoch: ifEpoch})
		})
}

func planDelete(g *globals) *cobra.Command {
	var reason string
	return planRun(g, "delete NAME", "Forget a finished plan (done or aborted, and finalized); its audit entries and reports stay", cobra.ExactArgs(1),
		func(cmd *cobra.Command) { cmd.Flags().StringVar(&reason, "reason", "", "why (kept in the audit log)") },
		func(ctx context.Context, _ *cobra.Command, c clientAPI, args []string) (any, error) {
			if err := c.DeletePlan(ctx, args[0], reason); err != nil {
				return nil, err
			}
			return map[string]string{"deleted": args[0]}, nil
		})
}

func newMembersCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "members",
		Short: "List, add and remove the cluster's voters",
	}
	var api, reason string
	cmd.AddCommand(
		planRun(g, "list", "List the Raft configuration", cobra.NoArgs, nil,
			func(ctx context.Context, _ *cobra.Command, c clientAPI, _ []string) (any, error) {
				return c.Members(ctx)
			}),
		planRun(g, "add ID RAFT_ADDRESS", "Add a voter (start its agent first, without bootstrap)", cobra.ExactArgs(2),
			func(cmd *cobra.Command) {
				cmd.Flags().StringVar(&api, "api", "", "the new member's API base URL")
				cmd.Flags().StringVar(&reason, "reason", "", "why (kept in the audit log)")
			},
			func(ctx context.Context, _ *cobra.Command, c clientAPI, args []string) (any, error) {
				return c.AddMember(ctx, agent.AddMemberRequest{ID: args[0], Address: args[1], API: api, Reason: reason})
			}),
		planRun(g, "remove ID", "Remove a voter", cobra.ExactArgs(1),
			func(cmd *cobra.Command) { cmd.Flags().StringVar(&reason, "reason", "", "why (kept in the audit log)") },
			func(ctx context.Context, _ *cobra.Command, c clientAPI, args []string) (any, error) {
				return c.RemoveMember(ctx, args[0], reason)
			}),
	)
	return cmd
}

func printPlans(w io.Writer, v any, asJSON bool) error {
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	defer tw.Flush()
	switch v := v.(type) {
	case []agent.PlanInfo:
		fmt.Fprintln(tw, "PLAN\tPHASE\tEPOCH\tSTEP\tUPDATED")
		for _, p := range v {
			step := "-"
			if p.Step != nil {
				step = p.Step.Name
			}
			fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", p.Name, p.Phase, p.Epoch, step, p.Updated.Format(time.RFC3339))
		}
	case agent.PlanInfo:
		fmt.Fprintf(tw, "plan\t%s\nphase\t%s\nepoch\t%d\nreason\t%s\nupdated\t%s\n", v.Name, v.Phase, v.Epoch, v.Reason, v.Updated.Format(time.RFC3339))
		if len(v.MissingEnv) > 0 {
			fmt.Fprintf(tw, "missing\tthis agent lacks %s: it cannot drive the plan\n", strings.Join(v.MissingEnv, ", "))
		}
		if len(v.LiteralSecrets) > 0 {
			fmt.Fprintf(tw, "warning\tsecrets written out in %s are stored in the Raft log; recreate the plan with ${NAME} references\n", strings.Join(v.LiteralSecrets, ", "))
		}
		for _, s := range v.Steps {
			outcome := string(s.Outcome)
			if outcome == "" {
				outcome = "in progress"
			}
			fmt.Fprintf(tw, "step\t%s at epoch %d (%s on %s): %s %s\n", s.Name, s.Epoch, s.Phase, s.Node, outcome, s.Detail)
		}
		for _, a := range v.Audit {
			what := string(a.Op)
			if a.To != "" {
				what += " " + string(a.From) + " -> " + string(a.To)
			}
			if a.Refused != "" {
				what += " REFUSED: " + a.Refused
			}
			fmt.Fprintf(tw, "audit\t%d %s %s by %s: %s %s\n", a.Index, a.At.Format(time.RFC3339), a.Node, a.Actor, what, a.Reason)
		}
	case []agent.MemberStatus:
		fmt.Fprintln(tw, "MEMBER\tRAFT\tAPI\tSUFFRAGE\tROLE")
		for _, m := range v {
			role := "follower"
			if m.Leader {
				role = "leader"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", m.ID, m.Address, m.API, m.Suffrage, role)
		}
	default:
		return json.NewEncoder(w).Encode(v)
	}
	return nil
}
