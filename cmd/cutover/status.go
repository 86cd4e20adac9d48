package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/cutover/cutover/agent"
)

func newStatusCmd(g *globals) *cobra.Command {
	var (
		r      remote
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show an agent's view of the cluster: leader, members, plans",
		Long: `Show the cluster as the agent at --addr sees it: its Raft state, the leader,
the members, and every plan's phase and epoch. Plans and members are the
replicated state; the indexes are the agent's own. The answer reflects the
state at the Raft index shown (its X-Cutover-Index): at least the index of
the last write or read this CLI made through the same --addr in the last
10 minutes (kept in $CUTOVER_STATE_DIR, default ~/.local/state/cutover).

Exit status: 0 shown, 2 the agent could not be asked.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, _, err := r.client(g)
			if err != nil {
				return err
			}
			st, err := c.Status(context.Background())
			if err != nil {
				return withCode(exitError, err)
			}
			// Live figures (lag, outage timer, verification) come from the
			// leader's driver: ask the leader when this agent is not it.
			if st.LeaderAPI != "" && st.State != "Leader" {
				lc, _, err := r.clientFor(g, st.LeaderAPI)
				if err == nil {
					if ls, err := lc.Status(context.Background()); err == nil {
						live := map[string]*agent.Live{}
						for _, p := range ls.Plans {
							live[p.Name] = p.Live
						}
						for i := range st.Plans {
							st.Plans[i].Live = live[st.Plans[i].Name]
						}
					}
				}
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			printStatus(cmd.OutOrStdout(), st, c.Index())
			return nil
		},
	}
	r.register(cmd)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the status as JSON")
	return cmd
}

// printStatus prints the status; index is the Raft index the answer
// reflects (its X-Cutover-Index).
func printStatus(w io.Writer, st agent.Status, index uint64) {
	leader := st.Leader
	if leader == "" {
		leader = "(none known)"
	}
	fmt.Fprintf(w, "node %s: %s, term %d, leader %s\n", st.Node, st.State, st.Term, leader)
	fmt.Fprintf(w, "commit index %d, applied %d, last snapshot %d\n", st.CommitIndex, st.AppliedIndex, st.LastSnapshotIndex)
	fmt.Fprintf(w, "this answer reflects the state at Raft index %d\n\n", index)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "MEMBER\tRAFT\tAPI\tSUFFRAGE\tROLE")
	for _, m := range st.Members {
		role := "follower"
		if m.Leader {
			role = "leader"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", m.ID, m.Address, m.API, m.Suffrage, role)
	}
	tw.Flush()
	fmt.Fprintln(w)
	if len(st.Plans) == 0 {
		fmt.Fprintln(w, "no plans")
		return
	}
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PLAN\tPHASE\tEPOCH\tSTEP\tGATE")
	for _, p := range st.Plans {
		gateState := "closed"
		if p.GateOpen {
			gateState = "open"
		}
		step := p.Step
		if step == "" {
			step = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", p.Name, p.Phase, p.Epoch, step, gateState)
	}
	tw.Flush()
	for _, p := range st.Plans {
		if p.Manual {
			fmt.Fprintf(w, "%s: manual (operators move its phases; the driver leaves it alone)\n", p.Name)
		}
		if len(p.MissingEnv) > 0 {
			fmt.Fprintf(w, "%s: missing %s on %s: this agent cannot drive the plan\n", p.Name, strings.Join(p.MissingEnv, ", "), st.Node)
		}
		if len(p.LiteralSecrets) > 0 {
			fmt.Fprintf(w, "%s: WARNING: secrets written out in %s are stored in the Raft log; recreate the plan with ${NAME} references\n", p.Name, strings.Join(p.LiteralSecrets, ", "))
		}
		if d := p.Driver; d != nil && d.Failures > 0 {
			fmt.Fprintf(w, "%s: RETRYING: the driver failed %d times in a row (%d retries in all); last error in %s at %s: %s\n",
				p.Name, d.Failures, d.Retries, d.Phase, d.At.Format(time.RFC3339), d.LastError)
		}
	}
	for _, p := range st.Plans {
		if p.WriteOutageMS != nil {
			fmt.Fprintf(w, "%s: write outage %d ms (fence on blue to a writable green, route flipped)\n", p.Name, *p.WriteOutageMS)
		}
	}
	for _, p := range st.Plans {
		if p.Live == nil {
			continue
		}
		if p.Live.OutageMS > 0 {
			fmt.Fprintf(w, "%s: FENCED for %d ms\n", p.Name, p.Live.OutageMS)
		}
		for _, lp := range p.Live.Pairs {
			fmt.Fprintf(w, "%s/%s: replication %s, lag %d bytes / %d ms", p.Name, lp.Name, orDash(lp.Replication), lp.LagBytes, lp.LagMS)
			if lp.VerifyPass != "" {
				fmt.Fprintf(w, ", verification %s: %d rows", lp.VerifyPass, lp.VerifyRows)
				if lp.VerifyETA != "" {
					fmt.Fprintf(w, ", ETA %s", lp.VerifyETA)
				}
			}
			fmt.Fprintln(w)
		}
	}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
