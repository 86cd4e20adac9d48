package driver

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/internal/config"
)

func TestATableCreatedDuringReplicationStopsThePlanBeforeTheFenceAndIsNamed(t *testing.T) {
	s := newScenario(t, 200)
	// Every table of schema public: a table created there later is in
	// scope, but neither published nor fenced.
	s.spec.Pairs[0].Scope = config.Scope{Schemas: []string{"public"}}
	var created atomic.Bool
	c := newCluster(t, Options{Fault: func(point string) error {
		if point == "before online verification" && created.CompareAndSwap(false, true) {
			// A migration run on both sides while streaming, and the
			// application writing to the new table on blue.
			for _, side := range []string{s.blue.DSN(), s.green.DSN()} {
				conn, err := pgxConnect(side)
				if err != nil {
					return err
				}
				_, err = conn.Exec(context.Background(), `CREATE TABLE public.late_table (id int PRIMARY KEY, v text)`)
				conn.Close(context.Background())
				if err != nil {
					return err
				}
			}
			return s.blue.Exec(context.Background(), `INSERT INTO public.late_table SELECT g, 'row ' || g FROM generate_series(1, 50) g`)
		}
		return nil
	}})
	createAndStart(t, c, s.spec)
	deadline := time.Now().Add(90 * time.Second)
	for !(c.LogsContain("scope changed during replication") && c.LogsContain("late_table")) {
		if time.Now().After(deadline) {
			t.Fatalf("no error named the table created during replication\n%s", tail(c.Logs(), 40))
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		p, err := c.Client(0).Plan(ctx, "shop")
		cancel()
		if err == nil && p.Phase != agent.PhaseCopying && p.Phase != agent.PhaseReplicating && p.Phase != agent.PhasePending {
			t.Fatalf("the plan went on to %s (%s) with a table in scope that is neither published nor fenced", p.Phase, p.Reason)
		}
		time.Sleep(100 * time.Millisecond)
	}
	var line string
	for _, l := range strings.Split(c.Logs(), "\n") {
		if strings.Contains(l, "scope changed during replication") {
			line = l
			break
		}
	}
	for _, want := range []string{"not published", "not fenced", "late_table"} {
		if !strings.Contains(line, want) {
			t.Errorf("the error does not say %q: %s", want, line)
		}
	}
	// It stays there: the plan never fences with the table left out.
	time.Sleep(2 * time.Second)
	p := waitPhase(t, c, "shop", 10*time.Second, agent.PhaseReplicating)
	if p.Phase != agent.PhaseReplicating {
		t.Errorf("plan is %s", p.Phase)
	}
}

func TestAScopeNamingATableThatDoesNotExistAbortsThePlanNamingIt(t *testing.T) {
	s := newScenario(t, 50)
	s.spec.Pairs[0].Scope = config.Scope{Tables: []string{"public.load_accounts", "public.no_such_table"}}
	c := newCluster(t, Options{})
	createAndStart(t, c, s.spec)
	p := waitPhase(t, c, "shop", 60*time.Second, agent.PhaseAborted, agent.PhaseReplicating, agent.PhaseReady)
	if p.Phase != agent.PhaseAborted || !strings.Contains(p.Reason, "public.no_such_table") {
		t.Errorf("plan is %s (%s), want aborted naming public.no_such_table", p.Phase, p.Reason)
	}
}
