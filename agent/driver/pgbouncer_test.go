package driver

import (
	"context"
	"encoding/json"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/agenttest"
	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/internal/config"
)

// pgbouncerPaused reads SHOW DATABASES: is the database paused?
func pgbouncerPaused(t *testing.T, b *integration.PgBouncer, db string) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	res, err := b.Admin(ctx, "SHOW DATABASES")
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range res {
		for _, row := range r.Rows {
			if string(row[0]) != db {
				continue
			}
			for i, fd := range r.FieldDescriptions {
				if fd.Name == "paused" {
					return string(row[i]) == "1"
				}
			}
		}
	}
	t.Fatalf("no database %s in SHOW DATABASES", db)
	return false
}

// A window that fails after the pool was paused aborts the plan and
// resumes the pool pointing at blue, unfenced: the application, held
// through the window, goes on writing on blue.
func TestAFailedWindowResumesThePgBouncerPoolAtBlue(t *testing.T) {
	s := newScenario(t, 200)
	pgb := integration.NewPgBouncer(t, integration.PgBouncerOptions{
		Databases: map[string]string{"shop": s.blue.PgBouncerEntry("cutover")},
		Users:     map[string]string{"app": "app-password"},
	})
	s.spec.Switch.Targets = []config.Target{{
		Type: config.TargetPgBouncer, DSN: config.DSN(pgb.AdminDSN()), Database: "shop", DatabasesFile: pgb.DatabasesFile,
		Blue: s.blue.PgBouncerEntry("cutover"), Green: s.green.PgBouncerEntry("cutover"),
		PauseTimeout: config.Duration(2 * time.Second), Timeout: config.Duration(5 * time.Second),
	}}
	var pausedInWindow, failed atomic.Bool
	c := newCluster(t, Options{Fault: func(point string) error {
		if point == "before verify" && failed.CompareAndSwap(false, true) {
			pausedInWindow.Store(pgbouncerPaused(t, pgb, "shop"))
			return errors.New("injected: verification fails")
		}
		return nil
	}})
	createAndStartRaw(t, c, s.spec)
	p := waitPhase(t, c, "shop", 90*time.Second, agent.PhaseAborted, agent.PhaseSwitched)
	if p.Phase != agent.PhaseAborted {
		t.Fatalf("plan reached %s", p.Phase)
	}
	if !pausedInWindow.Load() {
		t.Error("the pool was not paused inside the window")
	}
	if pgbouncerPaused(t, pgb, "shop") {
		t.Fatal("the pool stays paused after the abort")
	}
	// The application through PgBouncer writes on blue.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	app, err := pgx.Connect(ctx, pgb.DSNFor("shop", "app", "app-password")+"&default_query_exec_mode=simple_protocol")
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close(context.Background())
	var port int
	if err := app.QueryRow(ctx, "UPDATE load_accounts SET balance = balance WHERE id = 1 RETURNING current_setting('port')::int").Scan(&port); err != nil {
		t.Fatalf("the application cannot write through PgBouncer after the abort: %v", err)
	}
	if port != s.blue.Port {
		t.Fatalf("after the abort the pool points at port %d, blue is %d", port, s.blue.Port)
	}
}

// createAndStartRaw is createAndStart with the pgbouncer target's fields.
func createAndStartRaw(t *testing.T, c *agenttest.Cluster, spec config.Plan) {
	t.Helper()
	m := specForAPI(spec)
	var targets []map[string]any
	for _, tg := range spec.Switch.Targets {
		targets = append(targets, map[string]any{"type": tg.Type, "dsn": tg.DSN.Reveal(), "database": tg.Database, "databases_file": tg.DatabasesFile,
			"blue": tg.Blue, "green": tg.Green, "pause_timeout": tg.PauseTimeout.D().String(), "timeout": tg.Timeout.D().String()})
	}
	m["switch"] = map[string]any{"targets": targets}
	raw, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	ctx := agenttest.Ctx(t, 30*time.Second)
	c.Leader(15 * time.Second)
	cl := c.Client(0)
	if _, err := cl.CreatePlan(ctx, agent.CreatePlanRequest{Spec: raw, Reason: "test", AllowLiteralSecrets: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.Start(ctx, spec.Name, "test"); err != nil {
		t.Fatal(err)
	}
}
