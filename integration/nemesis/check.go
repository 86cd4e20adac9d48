package nemesis

import (
	"context"
	"fmt"
	"math"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/anishathalye/porcupine"
	"github.com/jackc/pgx/v5"
	"github.com/redis/go-redis/v9"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/integration/load"
	"github.com/cutover/cutover/internal/demo"
	rpg "github.com/cutover/cutover/replication/postgres"
)

// checker runs the invariants over a finished run.
type checker struct {
	ctx         context.Context
	blue, green *integration.Postgres
	rdb         *redis.Client
	final       agent.Phase
	h           *history
	dir         string
}

// finalSide is the side that serves once the plan ended.
func (c *checker) finalSide() (*integration.Postgres, string) {
	if c.final == agent.PhaseDone || c.final == agent.PhaseSwitched {
		return c.green, "green"
	}
	return c.blue, "blue"
}

// writes: no acknowledged write is missing on the side that serves at the
// end, neither in the keyed history nor in the key-less events table.
func (c *checker) writes(receipts []load.Receipt) []string {
	side, name := c.finalSide()
	var out []string
	missing, err := load.Missing(c.ctx, side.DSN(), planName, receipts)
	if err != nil {
		return []string{fmt.Sprintf("lost writes: cannot check %s: %v", name, err)}
	}
	if len(missing) > 0 {
		out = append(out, fmt.Sprintf("lost writes: %d of %d acknowledged writes missing on %s (first: writer %d seq %d at %s)",
			len(missing), len(receipts), name, missing[0].Writer, missing[0].Seq, missing[0].At.Format("15:04:05.000")))
	}
	events, err := load.MissingEvents(c.ctx, side.DSN(), planName, receipts)
	if err != nil {
		return append(out, fmt.Sprintf("lost writes: cannot check events on %s: %v", name, err))
	}
	if len(events) > 0 {
		out = append(out, fmt.Sprintf("lost writes: %d acknowledged events missing on %s (first: writer %d seq %d)", len(events), name, events[0].Writer, events[0].Seq))
	}
	return out
}

// bothWritable: the prober never found both sides taking an application
// write at the same moment.
func (c *checker) bothWritable(samples []load.Sample) []string {
	both := load.BothWritable(samples)
	if len(both) == 0 {
		return nil
	}
	return []string{fmt.Sprintf("split brain: both sides took an application write in %d of %d samples, first at %s",
		len(both), len(samples), both[0].At.Format("15:04:05.000"))}
}

// gateInput is an operation on the gate register: a write (a committed
// phase change, Open = the new phase opens the gate) or a read.
type gateInput struct {
	Write bool
	Open  bool
	Desc  string
}

// gateModel is a register holding whether the plan's gate is open. The
// phase commits of the audit log write it (authorized and switched write
// open; every other phase, aborted and rolled_back included, writes
// closed); the application's gate reads read it. A read returning open
// must be explained by an open write that had been proposed before the
// read returned, with no closing write committed in between; likewise for
// closed. Initial state: closed (a new plan is pending).
var gateModel = porcupine.Model{
	Init: func() any { return false },
	Step: func(state, input, output any) (bool, any) {
		in := input.(gateInput)
		if in.Write {
			return true, in.Open
		}
		return output.(bool) == state.(bool), state
	},
	DescribeOperation: func(input, output any) string {
		in := input.(gateInput)
		if in.Write {
			return fmt.Sprintf("commit %s (open=%v)", in.Desc, in.Open)
		}
		return fmt.Sprintf("gate read -> open=%v", output.(bool))
	},
	DescribeState: func(state any) string { return fmt.Sprintf("open=%v", state.(bool)) },
}

// gateHistory builds the porcupine history. A phase commit's interval runs
// from its audit timestamp (taken when the command was proposed, so before
// it committed) to the first moment an agent was seen to have applied it
// (so after it committed); never seen: open-ended. Gate reads are their
// invoke and complete times; reads that failed or answered closed without
// reading the plan (no leader) say nothing about the register and are left
// out.
func gateHistory(audit []agent.AuditEntry, obs []Observation, reads []GateRead) []porcupine.Operation {
	var ops []porcupine.Operation
	for _, e := range audit {
		if e.To == "" || e.Refused != "" {
			continue
		}
		ret := int64(math.MaxInt64)
		for _, o := range obs {
			if o.Index >= e.Index {
				ret = max(o.At.UnixNano(), e.At.UnixNano())
				break
			}
		}
		ops = append(ops, porcupine.Operation{ClientId: 0, Input: gateInput{Write: true, Open: e.To.GateOpen(), Desc: fmt.Sprintf("#%d %s->%s", e.Index, e.From, e.To)},
			Call: e.At.UnixNano(), Return: ret})
	}
	for _, g := range reads {
		if g.Err != "" || g.Phase == "" {
			continue
		}
		ops = append(ops, porcupine.Operation{ClientId: 1, Input: gateInput{}, Output: g.Open, Call: g.Invoke.UnixNano(), Return: g.Complete.UnixNano()})
	}
	return ops
}

// gate checks the gate reads against the phase commits; a violation comes
// with a visualization next to the history.
func (c *checker) gate(audit []agent.AuditEntry) ([]string, int) {
	ops := gateHistory(audit, c.h.observations(), c.h.gateReads())
	reads := 0
	for _, op := range ops {
		if !op.Input.(gateInput).Write {
			reads++
		}
	}
	if len(audit) == 0 {
		return []string{"gate: no audit log to check the gate reads against"}, reads
	}
	res, info := porcupine.CheckOperationsVerbose(gateModel, ops, 30*time.Second)
	switch res {
	case porcupine.Ok:
		return nil, reads
	case porcupine.Unknown:
		c.h.note("gate", "linearizability check timed out (not a violation)")
		return nil, reads
	}
	msg := fmt.Sprintf("gate: the %d gate reads are not linearizable against the phase commits", reads)
	if c.dir != "" {
		path := filepath.Join(c.dir, "gate.html")
		if porcupine.VisualizePath(gateModel, info, path) == nil {
			msg += " (see " + path + ")"
		}
	}
	return []string{msg}, reads
}

// fence is one side's fence state, read from cutover.fence_state_v3.
type fence struct {
	fenced bool
	epoch  int64
	plan   string
}

func readFence(ctx context.Context, dsn string) (fence, error) {
	var f fence
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return f, err
	}
	defer conn.Close(ctx)
	var plan *string
	err = conn.QueryRow(ctx, `SELECT fenced, epoch, plan FROM cutover.fence_state_v3 WHERE id`).Scan(&f.fenced, &f.epoch, &plan)
	if err == pgx.ErrNoRows || (err != nil && strings.Contains(err.Error(), "42P01")) {
		return f, nil // never fenced
	}
	if plan != nil {
		f.plan = *plan
	}
	return f, err
}

// appCanWrite tries a write as the application and rolls it back.
func appCanWrite(ctx context.Context, dsn string) (bool, string) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return false, err.Error()
	}
	defer conn.Close(ctx)
	tx, err := conn.Begin(ctx)
	if err != nil {
		return false, err.Error()
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, `UPDATE load_accounts SET touched = touched WHERE id = 1`); err != nil {
		return false, err.Error()
	}
	return true, ""
}

// endState: the plan ended (completed, aborted or rolled back), the side
// that should serve takes the application's writes and the other does
// not, the fence states say so too, and the routing key points at it.
func (c *checker) endState(blueApp, greenApp string) []string {
	var out []string
	switch c.final {
	case agent.PhaseDone, agent.PhaseAborted, agent.PhaseRolledBack:
	default:
		out = append(out, fmt.Sprintf("end: the plan ended in %s, not completed, aborted or rolled back", c.final))
	}
	_, want := c.finalSide()
	fb, errB := readFence(c.ctx, c.blue.DSN())
	fg, errG := readFence(c.ctx, c.green.DSN())
	if errB != nil || errG != nil {
		return append(out, fmt.Sprintf("end: cannot read the fence states: blue %v, green %v", errB, errG))
	}
	c.h.note("fences", fmt.Sprintf("blue fenced=%v epoch %d, green fenced=%v epoch %d", fb.fenced, fb.epoch, fg.fenced, fg.epoch))
	if fb.fenced && fg.fenced {
		out = append(out, "end: both sides fenced: nobody takes the application's writes")
	}
	if (want == "blue" && fb.fenced) || (want == "green" && fg.fenced) {
		out = append(out, fmt.Sprintf("end: the plan ended %s but %s, the side that should serve, is fenced", c.final, want))
	}
	bw, berr := appCanWrite(c.ctx, blueApp)
	gw, gerr := appCanWrite(c.ctx, greenApp)
	if bw && gw {
		out = append(out, "end: the application can write on both sides")
	}
	if (want == "blue" && !bw) || (want == "green" && !gw) {
		why := berr
		if want == "green" {
			why = gerr
		}
		out = append(out, fmt.Sprintf("end: the plan ended %s but the application cannot write on %s: %s", c.final, want, why))
	}
	route, err := c.rdb.Get(c.ctx, demo.RouteKey).Result()
	if err == redis.Nil {
		route, err = "blue", nil // never flipped: the application's default
	}
	if err != nil {
		out = append(out, fmt.Sprintf("end: cannot read the routing key: %v", err))
	} else if route != want {
		out = append(out, fmt.Sprintf("end: the plan ended %s but the routing key points at %s", c.final, route))
	}
	return out
}

// orphans: once the plan ended, its slots and publications go on both
// sides (the driver finalizes a finished plan; give it a minute).
func (c *checker) orphans() []string {
	var left []string
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(500 * time.Millisecond) {
		left = left[:0]
		for _, side := range []struct {
			name string
			pg   *integration.Postgres
		}{{"blue", c.blue}, {"green", c.green}} {
			names, err := replicationObjects(c.ctx, side.pg.DSN())
			if err != nil {
				left = append(left, side.name+": "+err.Error())
			}
			for _, n := range names {
				left = append(left, side.name+": "+n)
			}
		}
		if len(left) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			break
		}
	}
	return []string{"orphans: left after the plan ended: " + strings.Join(left, ", ")}
}

func replicationObjects(ctx context.Context, dsn string) ([]string, error) {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return nil, err
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, `
		SELECT 'slot ' || slot_name FROM pg_replication_slots WHERE slot_name LIKE $1
		UNION ALL
		SELECT 'publication ' || pubname FROM pg_publication WHERE pubname LIKE $1`, rpg.NamePrefix+"%")
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}

// story: the audit log and the history agree on the flip. No application
// write was acknowledged on green before the plan committed authorized
// (the gate opened), and none at all when the plan never got there.
func (c *checker) story(audit []agent.AuditEntry, receipts []load.Receipt, greenApp string) []string {
	var opened time.Time
	for _, e := range audit {
		if e.To == agent.PhaseAuthorized && e.Refused == "" {
			opened = e.At
			break
		}
	}
	for _, r := range receipts {
		if r.DSN != greenApp {
			continue
		}
		if opened.IsZero() {
			return []string{fmt.Sprintf("story: a write was acknowledged on green at %s but the audit log has no authorized", r.At.Format("15:04:05.000"))}
		}
		if r.At.Before(opened) {
			return []string{fmt.Sprintf("story: a write was acknowledged on green at %s, before the plan was authorized at %s", r.At.Format("15:04:05.000"), opened.Format("15:04:05.000"))}
		}
	}
	return nil
}

// audited: the audit log tells the same story as the history. Every phase
// the agents were seen in is the one the audit log's last applied phase
// change at or before that index names, and the plan's last phase is the
// audit log's last.
func (c *checker) audited(audit []agent.AuditEntry, obs []Observation, final agent.Phase) []string {
	type change struct {
		index uint64
		to    agent.Phase
	}
	var changes []change
	for _, e := range audit {
		if e.Refused == "" && e.To != "" && e.Summary == nil {
			changes = append(changes, change{e.Index, e.To})
		}
	}
	if len(changes) == 0 {
		return []string{"story: the audit log records no phase change"}
	}
	var out []string
	if last := changes[len(changes)-1]; last.to != final {
		out = append(out, fmt.Sprintf("story: the plan ended %s, but the audit log's last phase change (index %d) is to %s", final, last.index, last.to))
	}
	for _, o := range obs {
		k := sort.Search(len(changes), func(i int) bool { return changes[i].index > o.Index }) - 1
		if k < 0 {
			continue // before the first change the log still holds
		}
		if changes[k].to != o.Phase {
			out = append(out, fmt.Sprintf("story: the agents were seen %s at index %d (%s), but the audit log's last phase change by then (index %d) is to %s",
				o.Phase, o.Index, o.At.Format("15:04:05.000"), changes[k].index, changes[k].to))
			break
		}
	}
	return out
}
