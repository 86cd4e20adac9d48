// Package driver is the leader's plan driver: it carries a plan through the
// phases of docs/design.md for every pair, committing each intent through Raft
// before acting and each outcome after.
//
// It speaks to the pairs' engines through package engine (Options.Engines,
// the registry cmd/cutover builds) and to flip targets and health checks
// through the factories it is given: it links no database or Redis client.
// Its files follow the phases (docs/design.md, "The engine seam").
//
// # Resume rules (a new leader finds the plan in this phase)
//
//   - pending: nothing to do until an operator starts the plan.
//   - copying, replicating: safe to resume. The replicator resumes from
//     green's stored position (or restarts an interrupted copy); green's
//     fence is idempotent and accepts the higher epoch.
//   - ready: safe to resume: nothing application-visible has changed. The
//     new leader runs its own online verification (its dirty set only knows
//     the changes its own stream applied) before it fences.
//   - fenced, caught_up, verified: not resumed. The outage clock started on
//     the old leader and the proof of catch-up lives in its memory; the new
//     leader unfences blue with its higher epoch and aborts. Invariant 5
//     bounds the outage; retrying is a new plan.
//   - authorized: resume the flip under a new intent: every target is
//     idempotent for an epoch and accepts a higher one. A flip that
//     switched no target fences green again and aborts; while green cannot
//     be fenced again, blue stays fenced and the flip is retried.
//
// Errors that retrying cannot heal (permanent.go) are marked for the
// leader, which aborts the plan with them; manual plans are not driven.
//   - switched: resume reverse replication, the health watch and the
//     rollback window from the committed flip time.
//   - rolling_back: resume the rollback under a new intent: fencing green,
//     the marker through the reverse stream and the flip back are all
//     idempotent.
package driver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/engine"
	"github.com/cutover/cutover/fencing"
	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/switch/health"
	"github.com/cutover/cutover/switch/target"
)

// Options configure a Driver.
type Options struct {
	Logger     *zap.Logger
	Registerer prometheus.Registerer
	// ReportDir receives the consistency reports (JSON and HTML) of every
	// verification pass; empty writes none.
	ReportDir string
	// LagPoll is how often lag is measured while waiting for the gate.
	LagPoll time.Duration
	// Fault, when set, is called at named points of the driver ("before
	// fence", "after flip" ...); a test returns an error or kills the process
	// there to prove that a crash at that point completes or aborts cleanly.
	Fault func(point string) error
	// Engines are the database engines the driver runs pairs of: the
	// registry cmd/cutover builds. A pair of an engine not in it is
	// refused (permanently: the plan aborts).
	Engines engine.Registry
	// NewTarget builds a flip target from its config, and NewHealthCheck
	// a rollback health check (nil: a check type the binary does not
	// carry, skipped): cmd/cutover passes switch/target/targets.New and
	// the health checks it carries, so that the driver links no client.
	NewTarget      func(config.Target) (target.Target, error)
	NewHealthCheck func(config.HealthCheck) health.Check
}

// Driver implements agent.Driver for the pairs of the engines in
// Options.Engines.
type Driver struct {
	opts Options
	log  *zap.Logger

	mu    sync.Mutex
	plans map[string]*planRT
}

var _ agent.Driver = (*Driver)(nil)

// New returns a Driver.
func New(opts Options) *Driver {
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.LagPoll <= 0 {
		opts.LagPoll = 200 * time.Millisecond
	}
	if opts.Registerer != nil {
		if err := opts.Registerer.Register(outageSeconds); err != nil {
			var are prometheus.AlreadyRegisteredError
			if !errors.As(err, &are) {
				opts.Logger.Warn("register outage metric", zap.Error(err))
			}
		}
	}
	return &Driver{opts: opts, log: opts.Logger, plans: map[string]*planRT{}}
}

// fault runs the named fault point.
func (d *Driver) fault(point string) error {
	if d.opts.Fault == nil {
		return nil
	}
	if err := d.opts.Fault(point); err != nil {
		return fmt.Errorf("fault at %q: %w", point, err)
	}
	return nil
}

// runtime returns the plan's runtime for this leadership term, creating it
// on the first call of the term. It lives until ctx (the term's context for
// the plan) ends, then stops everything it started.
func (d *Driver) runtime(ctx context.Context, plan agent.Plan) (*planRT, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if rt, ok := d.plans[plan.Name]; ok && rt.ctx == ctx {
		return rt, nil
	}
	spec, err := plan.Spec()
	if err != nil {
		return nil, fmt.Errorf("plan spec: %w", err)
	}
	rt, err := newPlanRT(ctx, d, spec, plan.Facts)
	if err != nil {
		return nil, err
	}
	d.plans[plan.Name] = rt
	go func() {
		<-ctx.Done()
		rt.close()
		d.mu.Lock()
		if d.plans[plan.Name] == rt {
			delete(d.plans, plan.Name)
		}
		d.mu.Unlock()
	}()
	return rt, nil
}

// Drive implements agent.Driver.
// A manual plan is left to its operators. Errors that retrying cannot heal
// are marked agent.Permanent (see permanent.go): the leader aborts the plan.
func (d *Driver) Drive(ctx context.Context, plan agent.Plan, p agent.Proposer) error {
	if plan.Phase == agent.PhasePending || plan.Manual {
		return nil
	}
	if err := checkSpec(plan, d.opts.Engines); err != nil {
		return classify(err)
	}
	rt, err := d.runtime(ctx, plan)
	if err != nil {
		if errors.Is(err, engine.ErrScope) && plan.Phase == agent.PhaseCopying {
			return abortBadScope(ctx, plan, p, err)
		}
		return classify(err)
	}
	log := d.log.With(zap.String("plan", plan.Name), zap.String("phase", string(plan.Phase)), zap.Uint64("epoch", plan.Epoch))
	err = rt.drive(ctx, plan, p, log)
	if errors.Is(err, errAborted) {
		return nil
	}
	return classify(err)
}

func (rt *planRT) drive(ctx context.Context, plan agent.Plan, p agent.Proposer, log *zap.Logger) error {
	switch plan.Phase {
	case agent.PhaseCopying:
		return rt.copying(ctx, plan, p, log)
	case agent.PhaseReplicating:
		return rt.replicating(ctx, plan, p, log)
	case agent.PhaseReady:
		return rt.cutover(ctx, plan, p, log)
	case agent.PhaseFenced, agent.PhaseCaughtUp, agent.PhaseVerified:
		return rt.abortInterruptedWindow(ctx, plan, p, log)
	case agent.PhaseAuthorized:
		return rt.flip(ctx, plan, p, log)
	case agent.PhaseSwitched:
		return rt.switched(ctx, plan, p, log)
	case agent.PhaseRollingBack:
		return rt.rollback(ctx, plan, p, log)
	}
	return nil
}

// Finalize releases what a finished plan holds on the databases: slots and
// publications in both directions. Blue stays fenced after done; green stays
// fenced after rolled_back and after an abort (it no longer follows blue, so
// writing to it would split the data); blue is unfenced after an abort.
//
// A manual plan holds nothing of the driver's: there is nothing to release.
func (d *Driver) Finalize(ctx context.Context, plan agent.Plan) error {
	if plan.Manual {
		return nil
	}
	spec, err := plan.Spec()
	if err != nil {
		return fmt.Errorf("plan spec: %w", err)
	}
	d.mu.Lock()
	if rt, ok := d.plans[plan.Name]; ok {
		rt.close()
		delete(d.plans, plan.Name)
	}
	d.mu.Unlock()
	var errs []error
	for _, pair := range spec.Pairs {
		if err := finalizePair(ctx, d, spec, pair, plan); err != nil {
			errs = append(errs, fmt.Errorf("pair %s: %w", pair.Name, err))
		}
	}
	if plan.Phase == agent.PhaseAborted {
		// An abort from outside the driver (an operator, mid-window) may
		// leave pools paused: they go back to blue, unfenced above.
		if err := d.resumeAborted(ctx, spec, plan.Epoch); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// outage measures the write outage of the last cutover window.
var outageSeconds = prometheus.NewGaugeVec(prometheus.GaugeOpts{
	Name: "cutover_outage_seconds",
	Help: "Write outage of the last cutover window, from the fence to the gate opening.",
}, []string{"plan"})

// writeReport saves a consistency report as JSON and HTML.
func (d *Driver) writeReport(name string, write func(jsonPath, htmlPath string) error) (string, error) {
	if d.opts.ReportDir == "" {
		return "", nil
	}
	// Reports name tables, roles and row keys: for the agent's user only.
	if err := os.MkdirAll(d.opts.ReportDir, 0o700); err != nil {
		return "", err
	}
	if err := os.Chmod(d.opts.ReportDir, 0o700); err != nil {
		return "", err
	}
	base := filepath.Join(d.opts.ReportDir, name)
	if err := write(base+".json", base+".html"); err != nil {
		return "", err
	}
	return base + ".json", nil
}

func itoa(n int) string { return strconv.Itoa(n) }

func maxWindow(spec config.Plan) time.Duration {
	if w := spec.Fence.MaxFenceWindow.D(); w > 0 {
		return w
	}
	return config.DefaultMaxFenceWindow
}

// errBreach means an application write reached blue after the fence.
var errBreach = errors.New("fence breach")

// errAborted unwinds a step after it aborted the plan.
var errAborted = errors.New("plan aborted")

var _ = fencing.ErrStaleEpoch

func writeReportFiles(rep interface {
	WriteJSON(io.Writer) error
	WriteHTML(io.Writer) error
}, jsonPath, htmlPath string) error {
	for _, f := range []struct {
		path  string
		write func(io.Writer) error
	}{{jsonPath, rep.WriteJSON}, {htmlPath, rep.WriteHTML}} {
		out, err := os.OpenFile(f.path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			return err
		}
		if err := out.Chmod(0o600); err != nil {
			out.Close()
			return err
		}
		if err := f.write(out); err != nil {
			out.Close()
			return err
		}
		if err := out.Close(); err != nil {
			return err
		}
	}
	return nil
}

// Live implements agent.LiveReporter.
func (d *Driver) Live(plan string) *agent.Live {
	d.mu.Lock()
	rt, ok := d.plans[plan]
	d.mu.Unlock()
	if !ok {
		return nil
	}
	out := &agent.Live{}
	if m := rt.fenceStart.Load(); m != nil {
		out.OutageMS = time.Since(m.mono).Milliseconds()
	}
	for _, pr := range rt.pairs {
		lp := agent.LivePair{Name: pr.cfg.Name}
		if r := pr.fwdRunning(); r != nil {
			st := r.Status()
			lp.Replication = string(st.Phase)
			lp.LagBytes, lp.LagMS = st.Lag.Bytes, st.Lag.Delay.Milliseconds()
		}
		if v := pr.verifierNow(); v != nil {
			p := v.Progress()
			lp.VerifyPass, lp.VerifyRows = string(p.Pass), p.Rows
			if p.ETA > 0 {
				lp.VerifyETA = p.ETA.Round(time.Second).String()
			}
		}
		out.Pairs = append(out.Pairs, lp)
	}
	return out
}
