package agent_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cutover/cutover/agent"
	"github.com/cutover/cutover/agent/agenttest"
)

// reportLatencies reports the p50 and p99 of lat in microseconds.
func reportLatencies(b *testing.B, lat []time.Duration) {
	if len(lat) == 0 {
		return
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	at := func(q float64) float64 { return float64(lat[int(q*float64(len(lat)-1))].Microseconds()) }
	b.ReportMetric(at(0.50), "p50-µs")
	b.ReportMetric(at(0.99), "p99-µs")
}

// BenchmarkGateLinearizable measures the gate on a three-node cluster on
// loopback with the plan authorized: over HTTP on the leader and on a
// follower (which asks the leader), in process on the leader, and with 8
// concurrent HTTP callers on the leader.
func BenchmarkGateLinearizable(b *testing.B) {
	c := agenttest.New(b, agenttest.Options{})
	leader := c.Leader(10 * time.Second)
	mustCreate(b, c.Client(leader.Index), "orders")
	walkTo(b, c.Client(leader.Index), "orders", agent.PhaseAuthorized)
	follower := (leader.Index + 1) % 3
	c.WaitReplicated(5 * time.Second)

	hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 16}}
	// ask may run in RunParallel's goroutines: it reports with Error.
	ask := func(b *testing.B, url string) time.Duration {
		start := time.Now()
		req, _ := http.NewRequest(http.MethodGet, url+"/v1/gate/orders", nil)
		req.Header.Set("Authorization", "Bearer "+agenttest.ReadToken)
		resp, err := hc.Do(req)
		if err != nil {
			b.Error(err)
			return 0
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			b.Errorf("gate answered %d", resp.StatusCode)
		}
		return time.Since(start)
	}
	for _, tc := range []struct {
		name string
		node int
	}{{"leader-http", leader.Index}, {"follower-http", follower}} {
		b.Run(tc.name, func(b *testing.B) {
			url := c.URL(tc.node)
			lat := make([]time.Duration, 0, b.N)
			for b.Loop() {
				lat = append(lat, ask(b, url))
			}
			reportLatencies(b, lat)
		})
	}
	b.Run("leader-inprocess", func(b *testing.B) {
		lat := make([]time.Duration, 0, b.N)
		for b.Loop() {
			start := time.Now()
			if r := leader.Node.Gate(context.Background(), "orders"); !r.Open {
				b.Fatalf("closed: %s", r.Reason)
			}
			lat = append(lat, time.Since(start))
		}
		reportLatencies(b, lat)
	})
	b.Run("leader-http-8-callers", func(b *testing.B) {
		var (
			mu  sync.Mutex
			lat []time.Duration
		)
		b.SetParallelism(max(1, 8/runtime.GOMAXPROCS(0)))
		b.RunParallel(func(pb *testing.PB) {
			var mine []time.Duration
			for pb.Next() {
				mine = append(mine, ask(b, c.URL(leader.Index)))
			}
			mu.Lock()
			lat = append(lat, mine...)
			mu.Unlock()
		})
		reportLatencies(b, lat)
	})
}

// BenchmarkCommittedTransitions measures committed phase transitions per
// second on the leader of a three-node cluster on loopback (each one a Raft
// commit to a majority, fsynced by raft-wal), one at a time and from 16
// concurrent proposers (which Raft batches).
func BenchmarkCommittedTransitions(b *testing.B) {
	c := agenttest.New(b, agenttest.Options{})
	leader := c.Leader(10 * time.Second)
	n := leader.Node
	forward := []agent.Phase{agent.PhaseCopying, agent.PhaseReplicating, agent.PhaseReady, agent.PhaseFenced,
		agent.PhaseCaughtUp, agent.PhaseVerified, agent.PhaseAuthorized, agent.PhaseSwitched, agent.PhaseDone}
	base, err := agent.ParsePlanSpec(specFor("bench"), nil)
	if err != nil {
		b.Fatal(err)
	}
	var seq atomic.Int64
	// drive creates plans and walks them until next says stop. It may run
	// in several goroutines, so it reports with Error, not Fatal.
	drive := func(b *testing.B, next func() bool) {
		ctx := context.Background()
		for {
			spec := base
			spec.Name = fmt.Sprintf("b%d", seq.Add(1))
			if _, err := n.CreatePlan(ctx, spec, "bench", agent.Origin{Actor: "bench"}); err != nil {
				b.Error(err)
				return
			}
			for _, to := range forward {
				if !next() {
					return
				}
				if _, err := n.Transition(ctx, spec.Name, to, 0, agent.Origin{Actor: "bench"}); err != nil {
					b.Error(err)
					return
				}
			}
		}
	}
	b.Run("sequential", func(b *testing.B) {
		i := 0
		drive(b, func() bool { i++; return i <= b.N })
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "transitions/s")
	})
	b.Run("16-proposers", func(b *testing.B) {
		var left atomic.Int64
		left.Store(int64(b.N))
		var wg sync.WaitGroup
		for range 16 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				drive(b, func() bool { return left.Add(-1) >= 0 })
			}()
		}
		wg.Wait()
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "transitions/s")
	})
}
