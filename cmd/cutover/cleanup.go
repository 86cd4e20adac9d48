package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/spf13/cobra"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/engine"
	"github.com/cutover/cutover/internal/config"
	pgrepl "github.com/cutover/cutover/replication/postgres"
)

func newCleanupCmd(g *globals) *cobra.Command {
	var (
		cfgPath, planName, pairName string
		list, orphans, force        bool
		r                           remote
	)
	cmd := &cobra.Command{
		Use:   "cleanup --config FILE [--plan NAME] [--pair NAME] [--list | --orphans [--force]]",
		Short: "Drop the replication slots and publications a plan left behind",
		Long: `Drop what replication made for a plan's PostgreSQL pairs, by the names that
plan owns: the forward slot and publication on blue (which otherwise keep
blue's WAL forever), the reverse ones on green, the heartbeat rows, and the
applied positions. Green's data stays. Names are unique per plan, pair and
direction, so nothing of another plan is touched.

With --addr (or CUTOVER_ADDR) the cluster is asked too: a plan's recorded
names are used (a plan created by an older version keeps its names), and a
plan that is still live is refused unless --force.

--list prints every cutover slot and publication on each server of the
config with its owner: a plan and pair of the config, a live plan of the
cluster, or "orphan" (no plan known here uses the name). --orphans drops the
orphans, only with --force: a name unknown here may belong to a plan of
another config.

Exit status: 0 done (or nothing to do), 1 leftovers listed or orphans left,
2 error.`,
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
			ctx := cmd.Context()
			if ctx == nil {
				ctx = context.Background()
			}
			if list && orphans {
				return withCode(exitError, errors.New("cleanup: give --list or --orphans, not both"))
			}
			live, err := livePlans(ctx, g, &r)
			if err != nil {
				return withCode(exitError, err)
			}
			out := cmd.OutOrStdout()
			if list || orphans {
				return cleanupLeftovers(ctx, out, loaded.Config, live, orphans, force)
			}
			for _, plan := range loaded.Config.Plans {
				if planName != "" && plan.Name != planName {
					continue
				}
				var facts map[string]string
				if p, ok := live.plans[plan.Name]; ok {
					if !p.Phase.Terminal() && !force {
						return withCode(exitFailed, fmt.Errorf("cleanup: plan %s is live (%s): its slots are in use; abort it first, or give --force", plan.Name, p.Phase))
					}
					facts = p.Facts
				}
				for _, pair := range plan.Pairs {
					if pairName != "" && pair.Name != pairName {
						continue
					}
					// Only engines whose replication leaves state behind.
					eng, _ := engines.Lookup(pair.Engine)
					cl, ok := eng.(engine.Cleaner)
					if !ok {
						continue
					}
					dropped, err := cl.Cleanup(ctx, engine.PairOptions{Plan: plan, Pair: pair, Facts: facts, Logger: log})
					if err != nil {
						return withCode(exitError, fmt.Errorf("pair %s: %w", pair.Name, err))
					}
					if len(dropped) == 0 {
						fmt.Fprintf(out, "%s/%s: nothing to drop\n", plan.Name, pair.Name)
					} else {
						fmt.Fprintf(out, "%s/%s: dropped %s\n", plan.Name, pair.Name, strings.Join(dropped, ", "))
					}
				}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&cfgPath, "config", "", "config file (required)")
	cmd.Flags().StringVar(&planName, "plan", "", "only this plan")
	cmd.Flags().StringVar(&pairName, "pair", "", "only this pair")
	cmd.Flags().BoolVar(&list, "list", false, "list leftovers with their owners instead of dropping anything")
	cmd.Flags().BoolVar(&orphans, "orphans", false, "drop the slots and publications no known plan uses (needs --force)")
	cmd.Flags().BoolVar(&force, "force", false, "drop orphans, or clean up a plan that is still live")
	r.register(cmd)
	_ = cmd.MarkFlagRequired("config")
	return cmd
}

// cluster is what the agents know, when asked (--addr or CUTOVER_ADDR).
type cluster struct {
	asked bool
	plans map[string]agent.Plan
	pairs map[string][]string // each plan's postgres pairs
}

func livePlans(ctx context.Context, g *globals, r *remote) (cluster, error) {
	out := cluster{plans: map[string]agent.Plan{}}
	if r.addr == "" && os.Getenv("CUTOVER_ADDR") == "" {
		return out, nil
	}
	c, _, err := r.client(g)
	if err != nil {
		return out, err
	}
	infos, err := c.Plans(ctx)
	if err != nil {
		return out, fmt.Errorf("cleanup: ask the cluster for its plans: %w", err)
	}
	out.asked = true
	out.pairs = map[string][]string{}
	for _, p := range infos {
		out.plans[p.Name] = p.Plan
		var spec struct {
			Pairs []struct {
				Name   string `json:"name"`
				Engine string `json:"engine"`
			} `json:"pairs"`
		}
		if json.Unmarshal(p.Spec, &spec) == nil {
			for _, pr := range spec.Pairs {
				if pr.Engine == "" || pr.Engine == string(config.Postgres) {
					out.pairs[p.Name] = append(out.pairs[p.Name], pr.Name)
				}
			}
		}
	}
	return out, nil
}

// cleanupLeftovers lists (or, for orphans with force, drops) every cutover
// slot and publication on the config's servers.
func cleanupLeftovers(ctx context.Context, w interface{ Write([]byte) (int, error) }, cfg *config.Config, live cluster, drop, force bool) error {
	owners := map[string]string{}
	for _, p := range live.plans {
		if p.Finalized.IsZero() {
			owner := "plan " + p.Name + " (" + string(p.Phase) + ")"
			for _, n := range pgrepl.RecordedNames(p.Facts) {
				owners[n] = owner
			}
			for _, pair := range live.pairs[p.Name] {
				fwd, rev := pgrepl.PlanNames(p.Name, pair, p.Facts)
				owners[fwd], owners[rev] = owner, owner
			}
		}
	}
	servers := map[config.DSN]string{}
	var order []config.DSN
	for _, plan := range cfg.Plans {
		facts := live.plans[plan.Name].Facts
		for _, pair := range plan.Pairs {
			if pair.Engine != config.Postgres {
				continue
			}
			fwd, rev := pgrepl.PlanNames(plan.Name, pair.Name, facts)
			owners[fwd] = plan.Name + "/" + pair.Name + " forward"
			owners[rev] = plan.Name + "/" + pair.Name + " reverse"
			for side, dsn := range map[string]config.DSN{"blue": pair.Blue.DSN, "green": pair.Green.DSN} {
				if _, ok := servers[dsn]; !ok {
					servers[dsn] = plan.Name + "/" + pair.Name + " " + side
					order = append(order, dsn)
				}
			}
		}
	}
	sort.Slice(order, func(i, j int) bool { return servers[order[i]] < servers[order[j]] })
	found, orphaned := 0, 0
	for _, dsn := range order {
		left, err := pgrepl.Leftovers(ctx, dsn, pgrepl.NamePrefix)
		if err != nil {
			return withCode(exitError, fmt.Errorf("%s: %w", servers[dsn], err))
		}
		for _, l := range left {
			found++
			owner, ok := owners[l.Name]
			if !ok {
				owner = "orphan"
				orphaned++
			}
			extra := ""
			if l.Kind == "slot" {
				extra = fmt.Sprintf(" active=%t retains=%d bytes", l.Active, l.RetainedWAL)
			}
			action := ""
			if drop && !ok && force {
				if err := pgrepl.DropLeftover(ctx, dsn, l); err != nil {
					return withCode(exitError, fmt.Errorf("%s: drop %s %s: %w", servers[dsn], l.Kind, l.Name, err))
				}
				action = " dropped"
				orphaned--
			}
			fmt.Fprintf(w, "%s: %s %s%s owner=%s%s\n", servers[dsn], l.Kind, l.Name, extra, owner, action)
		}
	}
	if !live.asked {
		fmt.Fprintln(w, "the cluster was not asked (no --addr): names of live plans outside this config count as orphans")
	}
	switch {
	case drop && orphaned > 0:
		return withCode(exitFailed, fmt.Errorf("%d orphan(s) left: drop them with --orphans --force", orphaned))
	case !drop && found > 0:
		return withCode(exitFailed, fmt.Errorf("%d leftover(s) found, %d orphan(s)", found, orphaned))
	}
	return nil
}
