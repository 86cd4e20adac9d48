package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/spf13/cobra"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/client"
	fpg "github.com/cutover/cutover/fencing/postgres"
	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/internal/pgsafe"
)

func newUnfenceCmd(g *globals) *cobra.Command {
	var (
		cfgPath, pairName, side, planName string
		force                             bool
		timeout                           time.Duration
	)
	cmd := &cobra.Command{
		Use:   "unfence --config FILE --pair P --side blue|green [--plan NAME] [--force]",
		Short: "Break glass: give back the privileges and logins a fence took, from the state saved on the database",
		Long: `Lift the fence on one side of a PostgreSQL pair by hand, from the original
grants the fence saved on that database (cutover.fence_state_v3): every saved
privilege is granted again by its original grantor, and every login the fence
locked (green, fence.green: logins) is unlocked, every membership in a write
proxy (blue, fence.blue: proxy) is given back, and the grants the proxies
hold go back to their roles and the proxies are dropped. No quorum is needed: the
agent cluster may be gone. The stored epoch is cleared, so that a new cluster
can fence the database again.

It refuses while a live plan owns the fence: the fence state names the plan,
and the cluster (agent.api in the config, with its read or operator token) is
asked whether that plan has ended (done, aborted, rolled back). If the cluster
cannot be reached it refuses too, and says so. --force unfences anyway: only
when you know that no agent will act on the pair (the application could
otherwise write on both sides).

Exit status: 0 unfenced (or nothing to do), 1 refused, 2 error.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if side != "blue" && side != "green" {
				return withCode(exitFailed, fmt.Errorf("--side must be blue or green, not %q", side))
			}
			loaded, err := loadConfig(g, cfgPath)
			if err != nil {
				return err
			}
			plan, pair, err := pairOfPlans(loaded.Config, planName, pairName)
			if err != nil {
				return withCode(exitFailed, err)
			}
			dsn := pair.Blue.DSN
			if side == "green" {
				dsn = pair.Green.DSN
			}
			log, err := g.logger(cmd.ErrOrStderr())
			if err != nil {
				return withCode(exitError, err)
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			pcfg, err := pgxpool.ParseConfig(dsn.Reveal())
			if err != nil {
				return withCode(exitFailed, fmt.Errorf("%s of %s: bad DSN %s", side, pair.Name, dsn))
			}
			pcfg.MaxConns = 2
			pool, err := pgxpool.NewWithConfig(ctx, pcfg)
			if err != nil {
				return withCode(exitError, fmt.Errorf("%s of %s: %w", side, pair.Name, err))
			}
			defer pool.Close()
			f := fpg.New(pool, fpg.Options{Plan: plan.Name, Pair: pair.Name, Logger: log})
			st, err := f.Inspect(ctx)
			if errors.Is(err, pgsafe.ErrUntrusted) {
				return withCode(exitFailed, fmt.Errorf("%s of %s: %w", side, pair.Name, err))
			}
			if err != nil {
				return withCode(exitError, fmt.Errorf("%s of %s: %w", side, pair.Name, err))
			}
			out := cmd.OutOrStdout()
			where := fmt.Sprintf("%s of %s", side, pair.Name)
			if !st.Fenced {
				fmt.Fprintf(out, "%s: not fenced, nothing to do\n", where)
				return nil
			}
			owner := "an unknown plan"
			if st.Plan != "" {
				owner = fmt.Sprintf("plan %s (pair %s, epoch %d, since %s)", st.Plan, st.Pair, st.Epoch, st.Since.UTC().Format(time.RFC3339))
			}
			if !force {
				if err := ownerEnded(ctx, g, loaded.Config.Agent, st.Plan); err != nil {
					return withCode(exitFailed, fmt.Errorf("%s is fenced by %s: %w", where, owner, err))
				}
			}
			res, err := f.BreakGlassUnfence(ctx)
			if err != nil {
				return withCode(exitError, fmt.Errorf("%s: %w", where, err))
			}
			if !res.WasFenced {
				fmt.Fprintf(out, "%s: not fenced, nothing to do\n", where)
				return nil
			}
			fmt.Fprintf(out, "%s: unfenced; %d privilege(s) given back; the fence was put up by %s\n", where, res.Restored, owner)
			return nil
		},
	}
	cmd.Flags().StringVar(&cfgPath, "config", "", "config file (required)")
	cmd.Flags().StringVar(&pairName, "pair", "", "the pair (required)")
	cmd.Flags().StringVar(&side, "side", "", "blue or green (required)")
	cmd.Flags().StringVar(&planName, "plan", "", "the plan whose pair it is, when several have a pair of that name")
	cmd.Flags().BoolVar(&force, "force", false, "unfence even while a live plan owns the fence, or when the cluster cannot tell")
	cmd.Flags().DurationVar(&timeout, "timeout", time.Minute, "give up after this long")
	for _, f := range []string{"config", "pair", "side"} {
		_ = cmd.MarkFlagRequired(f)
	}
	return cmd
}

// pairOfPlans finds the PostgreSQL pair named pair in any plan, or in plan
// when named.
func pairOfPlans(c *config.Config, plan, pair string) (config.Plan, config.Pair, error) {
	var found []config.Plan
	var at config.Pair
	for _, p := range c.Plans {
		if plan != "" && p.Name != plan {
			continue
		}
		for _, pc := range p.Pairs {
			if pc.Name == pair {
				found = append(found, p)
				at = pc
			}
		}
	}
	switch {
	case len(found) == 0 && plan != "":
		return config.Plan{}, config.Pair{}, fmt.Errorf("no pair %s in plan %s", pair, plan)
	case len(found) == 0:
		return config.Plan{}, config.Pair{}, fmt.Errorf("no pair %s in the config", pair)
	case len(found) > 1:
		names := make([]string, len(found))
		for i, p := range found {
			names[i] = p.Name
		}
		return config.Plan{}, config.Pair{}, fmt.Errorf("plans %s all have a pair %s: name one with --plan", strings.Join(names, ", "), pair)
	}
	if at.Engine != config.Postgres {
		return config.Plan{}, config.Pair{}, fmt.Errorf("pair %s is %s: only PostgreSQL fences are lifted by hand", pair, at.Engine)
	}
	return found[0], at, nil
}

// ownerEnded asks the cluster whether plan has ended. nil when it has, or
// when the cluster does not know it; an error saying why not otherwise,
// including when the cluster cannot be asked.
func ownerEnded(ctx context.Context, g *globals, a config.Agent, plan string) error {
	if plan == "" {
		return errors.New("the fence state names no owner to ask the cluster about; --force to unfence anyway")
	}
	addr := a.API.Advertise
	if addr == "" {
		scheme := "http://"
		if a.TLS.Enabled() {
			scheme = "https://"
		}
		addr = scheme + firstSet(a.API.Listen, config.DefaultAPIListen)
	}
	r := remote{token: firstSet(a.API.Tokens.Read.Reveal(), a.API.Tokens.Operator.Reveal()), timeout: 10 * time.Second}
	if a.TLS.Enabled() {
		r.caFile, r.certFile, r.keyFile = a.TLS.CAFile, a.TLS.CertFile, a.TLS.KeyFile
	}
	c, _, err := r.clientFor(g, addr)
	if err != nil {
		return err
	}
	p, err := c.Plan(ctx, plan)
	var apiErr *client.Error
	switch {
	case errors.As(err, &apiErr) && apiErr.Status == http.StatusNotFound:
		return nil // not a plan of this cluster
	case err != nil:
		return fmt.Errorf("cannot ask the cluster at %s whether plan %s has ended (%v): refusing; --force to unfence anyway, if no agent will act on the pair", addr, plan, err)
	case !agent.Phase(p.Phase).Terminal():
		return fmt.Errorf("plan %s is live (%s): abort it (cutover abort), or --force if no agent will act on the pair", plan, p.Phase)
	}
	return nil
}
