package driver

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/integration"
	"github.com/cutover/cutover/integration/load"
)

// eventsTable is a key-less table the application writes, replicated
// with REPLICA IDENTITY FULL.
const eventsTable = `
CREATE TABLE events (at timestamptz, what text);
ALTER TABLE events REPLICA IDENTITY FULL;
GRANT SELECT, INSERT, UPDATE, DELETE ON events TO app;`

// withEvents adds events to the scenario's scope: 1,000 rows on blue,
// none on green (the initial copy fills it).
func withEvents(t *testing.T, s *scenario) {
	t.Helper()
	for _, side := range []*integration.Postgres{s.blue, s.green} {
		if err := side.Exec(context.Background(), eventsTable); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.blue.Exec(context.Background(), `INSERT INTO events SELECT '2025-01-01 00:00:00+00'::timestamptz + g * interval '1 minute', 'event ' || g FROM generate_series(1, 1000) g`); err != nil {
		t.Fatal(err)
	}
	s.spec.Pairs[0].Scope.Tables = append(s.spec.Pairs[0].Scope.Tables, "public.events")
}

func TestAKeyLessTableInScopeIsReplicatedVerifiedAndFlipped(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := newScenario(t, 300)
	withEvents(t, s)
	s.followRoute(ctx)
	c := newCluster(t, Options{})
	l := load.Start(ctx, load.Options{Run: "heap", Target: s.appDSN, Writers: 2, Accounts: 300, Think: 5 * time.Millisecond})
	// The application also appends to the key-less table, duplicates
	// included, until the flip.
	var appended atomic.Int64
	go func() {
		for i := 0; ctx.Err() == nil; i++ {
			conn, err := pgxConnect(s.appDSN())
			if err == nil {
				if _, err = conn.Exec(ctx, `INSERT INTO events VALUES ('2026-01-01 00:00:00+00', 'appended ' || $1::int % 10)`, i); err == nil {
					appended.Add(1)
				}
				conn.Close(context.Background())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()
	createAndStart(t, c, s.spec)
	p := waitPhase(t, c, "shop", 120*time.Second, agent.PhaseSwitched, agent.PhaseAborted)
	l.Stop()
	if p.Phase != agent.PhaseSwitched {
		t.Fatalf("plan ended %s: %s\n%s", p.Phase, p.Reason, tail(c.Logs(), 40))
	}
	t.Logf("%d rows appended to the key-less table while the plan ran", appended.Load())
	if appended.Load() == 0 {
		t.Error("nothing was appended to the key-less table")
	}
}

func TestAChangedRowInAKeyLessTableAbortsThePlanNamingIt(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := newScenario(t, 300)
	withEvents(t, s)
	var injected atomic.Bool
	c := newCluster(t, Options{Fault: func(point string) error {
		if point == "before online verification" && injected.CompareAndSwap(false, true) {
			// Behind the stream's back.
			return s.green.Exec(context.Background(), "UPDATE events SET what = 'corrupt' WHERE what = 'event 42'")
		}
		return nil
	}})
	l := load.Start(ctx, load.Options{Run: "heapdiff", Target: s.appDSN, Writers: 2, Accounts: 300, Think: 5 * time.Millisecond})
	createAndStart(t, c, s.spec)
	// Before, the online pass refused the table and the driver retried
	// in replicating for ever.
	p := waitPhase(t, c, "shop", 120*time.Second, agent.PhaseAborted, agent.PhaseAuthorized, agent.PhaseSwitched)
	l.Stop()
	if p.Phase != agent.PhaseAborted {
		t.Fatalf("plan reached %s despite a changed row in the key-less table", p.Phase)
	}
	// The row is named by the columns that did not change.
	if !strings.Contains(p.Reason, "public.events changed") || !strings.Contains(p.Reason, "2025-01-01 00:42:00+00") {
		t.Errorf("abort reason does not name the row: %s", p.Reason)
	}
}
