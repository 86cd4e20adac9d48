package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/driver"
	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/internal/logging"
	"github.com/cutover/cutover/switch/health/checks"
	"github.com/cutover/cutover/switch/target/targets"
)

func newAgentCmd(g *globals) *cobra.Command {
	var (
		cfgPath string
		manual  bool
	)
	cmd := &cobra.Command{
		Use:   "agent --config FILE",
		Short: "Run a cutover agent: Raft node, HTTP API and gate",
		Long: `Run one agent of the cluster until SIGINT or SIGTERM.

The agent joins the Raft cluster described by agent.raft (bootstrapping it
from agent.raft.peers when bootstrap is set and the data directory is empty),
keeps the replicated cutover state (plans, phases, epochs, audit log) under
agent.data_dir, and serves the HTTP API on agent.api.listen:

  GET  /v1/status, /v1/plans, /v1/plans/{name}, /v1/audit, /v1/members
  GET  /v1/gate, /v1/gate/{plan}     200 open, 503 closed (?format=always200)
  POST /v1/plans, /v1/plans/{name}/start|abort|transition
  POST /v1/members, DELETE /v1/members/{id}
  GET  /healthz, /readyz, /metrics

Mutating calls need the operator token; read calls need the read (or
operator) token when one is configured and are open otherwise.

The leader runs the plan driver (the database steps). With --manual it does
not: every phase change is made through the API (drills, tests), and the
plans must say manual: true (the agents refuse an operator's move of a
phase the driver owns in any other plan).

Log settings come from the file's log section unless --log-format or
--log-level is given.

Exit status: 0 stopped on a signal, 1 invalid config, 2 failed to start or
to stop cleanly.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			loaded, err := loadConfig(g, cfgPath)
			if err != nil {
				return err
			}
			format, level := loaded.Config.Log.Format, loaded.Config.Log.Level
			if f := cmd.Flags().Lookup("log-format"); f != nil && f.Changed {
				format = g.logFormat
			}
			if f := cmd.Flags().Lookup("log-level"); f != nil && f.Changed {
				level = g.logLevel
			}
			levelFlag := cmd.Flags().Lookup("log-level")
			log, atomicLevel, err := logging.NewLeveled(format, level, g.redactor, cmd.ErrOrStderr())
			if err != nil {
				return withCode(exitFailed, err)
			}
			defer log.Sync()
			ac, err := agentConfig(loaded.Config, log)
			if err != nil {
				return withCode(exitFailed, err)
			}
			if manual {
				ac.Driver = nil // agent.NopDriver
				log.Warn("manual mode: the plan driver does not run; steps are driven through the API")
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			node, err := agent.Start(ac)
			if err != nil {
				return withCode(exitError, err)
			}
			// SIGHUP, which daemons take as "reload", must not kill the
			// agent (Go's default): the log level is reloaded, the rest
			// only takes effect at a restart, which the log says.
			hup := make(chan os.Signal, 1)
			signal.Notify(hup, syscall.SIGHUP)
			defer signal.Stop(hup)
			for ctx.Err() == nil {
				select {
				case <-ctx.Done():
				case <-hup:
					reloadOnHangup(g, cfgPath, loaded.Config, levelFlag != nil && levelFlag.Changed, atomicLevel, log)
				}
			}
			log.Info("signal received: stopping")
			if err := node.Stop(); err != nil {
				return withCode(exitError, fmt.Errorf("stop agent: %w", err))
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&cfgPath, "config", "", "configuration file")
	cmd.Flags().BoolVar(&manual, "manual", false, "do not run the plan driver: drive every step through the API")
	_ = cmd.MarkFlagRequired("config")
	return cmd
}

// reloadOnHangup reads the configuration file again on SIGHUP. A file that
// does not load changes nothing. The log level is applied at once (unless
// --log-level set it); any other change is named, to be applied by a
// restart: the Raft identity, listeners and plans of a running agent are
// not swapped under it.
func reloadOnHangup(g *globals, path string, running *config.Config, levelFromFlag bool, level zap.AtomicLevel, log *zap.Logger) {
	loaded, err := loadConfig(g, path)
	if err != nil {
		log.Error("SIGHUP: the configuration file does not load; the agent keeps the settings it runs with", zap.String("config", path), zap.Error(err))
		return
	}
	c := loaded.Config
	if !levelFromFlag {
		if lvl, err := logging.ParseLevel(c.Log.Level); err == nil && lvl != level.Level() {
			level.SetLevel(lvl)
			log.Info("SIGHUP: log level changed", zap.Stringer("level", lvl))
		}
	}
	var restart []string
	if !reflect.DeepEqual(c.Agent, running.Agent) {
		restart = append(restart, "agent")
	}
	if c.Log.Format != running.Log.Format {
		restart = append(restart, "log.format")
	}
	if !reflect.DeepEqual(c.Plans, running.Plans) {
		restart = append(restart, "plans")
	}
	if len(restart) == 0 {
		log.Info("SIGHUP: configuration reloaded", zap.String("config", path))
		return
	}
	log.Warn("SIGHUP: these settings changed in the file and take effect only when the agent restarts (plans can also be posted with cutover plan create)",
		zap.String("config", path), zap.Strings("changed", restart))
}

// agentConfig maps the configuration file to the agent's settings. The
// plan driver runs the database steps on the leader; its consistency
// reports go to the data directory.
func agentConfig(c *config.Config, log *zap.Logger) (agent.Config, error) {
	a := c.Agent
	// One registry for the agent's and the driver's metrics (replication
	// lag, outage), served at /metrics.
	reg := prometheus.NewRegistry()
	ac := agent.Config{
		NodeID:            a.NodeID,
		DataDir:           a.DataDir,
		RaftBind:          a.Raft.Bind,
		RaftAdvertise:     a.Raft.Advertise,
		Bootstrap:         a.Raft.Bootstrap,
		SnapshotThreshold: a.Raft.SnapshotThreshold,
		SnapshotRetain:    a.Raft.SnapshotRetain,
		APIListen:         a.API.Listen,
		APIAdvertise:      a.API.Advertise,
		OperatorToken:     a.API.Tokens.Operator,
		ReadToken:         a.API.Tokens.Read,
		Insecure:          a.Insecure,
		InsecureOpenReads: a.API.InsecureOpenReads,
		AuditMax:          a.History.AuditMax,
		SecretDirs:        a.SecretDirs,
		StepsMax:          a.History.StepsMax,
		Plans:             c.Plans,
		Logger:            log,
		Registry:          reg,
		Driver: driver.New(driver.Options{
			Engines:        engines,
			NewTarget:      targets.New,
			NewHealthCheck: checks.New,
			Logger:         log,
			Registerer:     reg,
			ReportDir:      filepath.Join(a.DataDir, "reports"),
			Fault:          testHold(log),
		}),
	}
	for _, p := range a.Raft.Peers {
		ac.Peers = append(ac.Peers, agent.Peer{ID: p.ID, Address: p.Address, API: p.API})
	}
	if a.TLS.Enabled() {
		t, err := agent.LoadTLS(a.TLS.CertFile, a.TLS.KeyFile, a.TLS.CAFile)
		if err != nil {
			return agent.Config{}, err
		}
		ac.TLS = t
	}
	if ac.OperatorToken == "" {
		return agent.Config{}, errors.New("agent.api.tokens.operator is required")
	}
	return ac, nil
}

// testHold reads CUTOVER_TEST_HOLD ("point=duration", a driver fault point
// such as "before catch-up"): the driver then waits that long there. It
// exists so that tests can kill an agent inside a phase that otherwise
// lasts milliseconds; it is never needed in production, and the agent says
// loudly when it is set.
func testHold(log *zap.Logger) func(string) error {
	v := os.Getenv("CUTOVER_TEST_HOLD")
	point, dur, ok := strings.Cut(v, "=")
	if !ok {
		return nil
	}
	d, err := time.ParseDuration(dur)
	if err != nil || d <= 0 {
		log.Warn("CUTOVER_TEST_HOLD ignored: want point=duration", zap.String("value", v))
		return nil
	}
	log.Warn("test hook set: the plan driver will wait at a fault point", zap.String("point", point), zap.Duration("for", d))
	return func(p string) error {
		if p == point {
			time.Sleep(d)
		}
		return nil
	}
}
