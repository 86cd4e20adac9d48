package postgres

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/cutover/cutover/consistency"
	cpg "github.com/cutover/cutover/consistency/postgres"
	"github.com/cutover/cutover/engine"
	fpg "github.com/cutover/cutover/fencing/postgres"
	"github.com/cutover/cutover/internal/config"
	"github.com/cutover/cutover/internal/pgscope"
	rpg "github.com/cutover/cutover/replication/postgres"
)

// pair is a PostgreSQL pair open for one plan's term.
type pair struct {
	opts engine.PairOptions
	log  *zap.Logger
	cfg  config.Pair
	// fwdSlot and revSlot name the slots and publications of each
	// direction (rpg.PlanNames).
	fwdSlot, revSlot string

	bluePool, greenPool *pgxpool.Pool
	// The fences' own pools: their sessions are warmed for the fence
	// (fpg.Fencer.Warm) and never busy with other work.
	blueFencePool, greenFencePool *pgxpool.Pool
	blueFence, greenFence         *fpg.Fencer

	// scope is the pair's scope resolved on blue (internal/pgscope):
	// tables are its roots, what verification compares, as schema.table
	// (the verifier matches them exactly, case and all); fenceTables are
	// all of its tables, partitions included, as quoted identifiers.
	scopeMu     sync.Mutex
	scope       *pgscope.Set
	tables      []string
	fenceTables []string
	rootOf      map[string]string // partition -> its root, schema.table

	// fwd is the newest forward stream, which the online verification
	// waits on (waiter).
	fwdMu sync.Mutex
	fwd   *rpg.Replicator

	blueDB, greenDB *cpg.DB
	verifier        *verifier
}

var (
	_ engine.Pair             = (*pair)(nil)
	_ engine.ScopeChecker     = (*pair)(nil)
	_ engine.PrivilegeChecker = (*pair)(nil)
)

func (pr *pair) Fence(c engine.Colour) engine.Fencer {
	if c == engine.Green {
		return fencer{pr.greenFence}
	}
	return fencer{pr.blueFence}
}

func (pr *pair) NameFacts() map[string]string {
	return rpg.NameFacts(pr.cfg.Name, pr.fwdSlot, pr.revSlot)
}

func (pr *pair) Tables() []string {
	pr.scopeMu.Lock()
	defer pr.scopeMu.Unlock()
	return pr.tables
}

// setScope installs a resolved scope.
func (pr *pair) setScope(set *pgscope.Set) {
	pr.scopeMu.Lock()
	defer pr.scopeMu.Unlock()
	pr.scope = set
	pr.tables = pgscope.Names(set.Roots())
	pr.fenceTables = pgscope.Idents(set.All())
	pr.rootOf = map[string]string{}
	for _, t := range set.Leaves() {
		if root, _ := set.Root(t.OID); root.OID != t.OID {
			pr.rootOf[t.String()] = root.String()
		}
	}
}

// rootTable is the table verification compares for a replicated row
// change: a partition's rows count under its partitioned table in scope.
func (pr *pair) rootTable(table string) string {
	pr.scopeMu.Lock()
	defer pr.scopeMu.Unlock()
	if root, ok := pr.rootOf[table]; ok {
		return root
	}
	return table
}

func (pr *pair) Forward(o engine.StreamOptions) (engine.Stream, error) {
	onChange := o.OnRowChange
	r, err := rpg.New(rpg.Options{
		Plan: pr.opts.Plan.Name, Pair: pr.cfg, Slot: pr.fwdSlot, Epoch: o.Epoch,
		GreenFencedSince: o.GreenFencedSince,
		Logger:           pr.log.With(zap.String("plan", pr.opts.Plan.Name), zap.String("pair", pr.cfg.Name)),
		Registerer:       pr.opts.Registerer,
		OnRowChange: func(table string, key []string) {
			if onChange != nil {
				onChange(pr.rootTable(table), key)
			}
		},
	})
	if err != nil {
		return nil, err
	}
	pr.fwdMu.Lock()
	pr.fwd = r
	pr.fwdMu.Unlock()
	return &stream{r: r}, nil
}

func (pr *pair) newReverse(epoch uint64) (*rpg.Replicator, error) {
	return rpg.New(rpg.Options{
		Plan: pr.opts.Plan.Name, Pair: ReversePair(pr.cfg), Slot: pr.revSlot, Epoch: epoch,
		Logger:   pr.log.With(zap.String("plan", pr.opts.Plan.Name), zap.String("pair", pr.cfg.Name), zap.String("direction", "reverse")),
		SkipCopy: true,
	})
}

func (pr *pair) Reverse(epoch uint64) (engine.Stream, error) {
	r, err := pr.newReverse(epoch)
	if err != nil {
		return nil, err
	}
	return &stream{r: r}, nil
}

// PrepareReverse connects, checks, creates the publication and the slot on
// green, all of which kept the application from a writable green for
// 150-300 ms when done at the flip.
func (pr *pair) PrepareReverse(ctx context.Context, epoch uint64) (engine.PreparedStream, error) {
	r, err := pr.newReverse(epoch)
	if err != nil {
		return nil, err
	}
	if err := r.Prepare(ctx); err != nil {
		return nil, fmt.Errorf("prepare reverse replication of %s: %w", pr.cfg.Name, err)
	}
	if err := r.PrepareSlot(ctx); err != nil {
		r.Stop(ctx)
		return nil, fmt.Errorf("prepare reverse replication of %s: %w", pr.cfg.Name, err)
	}
	return &prepared{pr: pr, r: r}, nil
}

// CheckScope re-resolves the scope on blue and compares it with what the
// forward publication carries and what the fences revoke.
func (pr *pair) CheckScope(ctx context.Context, fwd engine.Stream) ([]string, error) {
	set, err := pgscope.Resolve(ctx, pr.bluePool, pr.cfg.Scope)
	if err != nil {
		return nil, fmt.Errorf("blue: %w", scopeErr(err))
	}
	s, ok := fwd.(*stream)
	if !ok {
		return nil, fmt.Errorf("not a PostgreSQL stream: %T", fwd)
	}
	published, err := s.r.PublishedTables(ctx)
	if err != nil {
		return nil, err
	}
	pr.scopeMu.Lock()
	fenced := slices.Clone(pr.fenceTables)
	pr.scopeMu.Unlock()
	var problems []string
	if d := setDiff("published", pgscope.Idents(set.Leaves()), published); d != "" {
		problems = append(problems, d)
	}
	if d := setDiff("fenced", pgscope.Idents(set.All()), fenced); d != "" {
		problems = append(problems, d)
	}
	return problems, nil
}

// setDiff says how got differs from want, the tables in scope now.
func setDiff(what string, want, got []string) string {
	var missing, extra []string
	for _, t := range want {
		if !slices.Contains(got, t) {
			missing = append(missing, t)
		}
	}
	for _, t := range got {
		if !slices.Contains(want, t) {
			extra = append(extra, t)
		}
	}
	var parts []string
	if len(missing) > 0 {
		parts = append(parts, fmt.Sprintf("in scope but not %s: %s", what, strings.Join(missing, ", ")))
	}
	if len(extra) > 0 {
		parts = append(parts, fmt.Sprintf("%s but no longer in scope: %s", what, strings.Join(extra, ", ")))
	}
	return strings.Join(parts, "; ")
}

// PrivilegeParity lists how what every fenced role will have on green once
// unfenced differs from what it has on blue.
func (pr *pair) PrivilegeParity(ctx context.Context) ([]string, error) {
	return fpg.PrivilegeParity(ctx, pr.blueFence, pr.greenFence)
}

// Verifier opens the verifier's connections on first use; it is kept for
// the term, so that the pass inside the fence neither connects nor reads
// the catalogs again.
func (pr *pair) Verifier(ctx context.Context) (engine.Verifier, error) {
	if pr.verifier != nil {
		return pr.verifier, nil
	}
	spec := pr.opts.Plan
	par := max(spec.Verify.Parallel, 1)
	blue, err := cpg.Open(ctx, pr.cfg.Blue.DSN.Reveal(), par+2)
	if err != nil {
		return nil, fmt.Errorf("blue: %w", err)
	}
	green, err := cpg.Open(ctx, pr.cfg.Green.DSN.Reveal(), par+2)
	if err != nil {
		blue.Close()
		return nil, fmt.Errorf("green: %w", err)
	}
	pr.blueDB, pr.greenDB = blue, green
	v := consistency.NewVerifier(blue, green, consistency.Options{
		Plan: spec.Name, BlueDSN: pr.cfg.Blue.DSN.String(), GreenDSN: pr.cfg.Green.DSN.String(),
		ChunkTime: spec.Verify.ChunkTime.D(), Parallel: par, MaxRowsPerSecond: spec.Verify.MaxRowsPerSecond,
		Logger: pr.log.With(zap.String("plan", spec.Name), zap.String("pair", pr.cfg.Name)),
	})
	pr.verifier = &verifier{pr: pr, v: v}
	return pr.verifier, nil
}

// Close releases the pair's connections. A held fence session is out of
// its pool, and closing the pool waits for it: it is released first.
// Fences stay as they are: the next leader decides.
func (pr *pair) Close() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, f := range []*fpg.Fencer{pr.blueFence, pr.greenFence} {
		if f != nil {
			f.Release(ctx)
		}
	}
	for _, p := range []*pgxpool.Pool{pr.bluePool, pr.greenPool, pr.blueFencePool, pr.greenFencePool} {
		if p != nil {
			p.Close()
		}
	}
	for _, db := range []*cpg.DB{pr.blueDB, pr.greenDB} {
		if db != nil {
			db.Close()
		}
	}
}
