package demo

import (
	"context"
	"io"
	"slices"
	"testing"
	"time"

	"github.com/cutover/cutover/integration"
)

// BenchmarkDemoViaPgBouncer runs the whole cutover through PgBouncer with
// 32 TPC-B clients (pgbench, as the fenced role) b.N times and reports the
// client-observed stall (each client's longest transaction, pooled over
// every client of every run) next to the write outage (fence on blue to a
// writable green with the route flipped) and the pool's pause, with the
// application errors and lost writes summed over the runs (both must be 0).
//
//	flock /tmp/cutover-bench.lock go test ./internal/demo -run '^$' -bench DemoViaPgBouncer -benchtime 5x -timeout 60m
func BenchmarkDemoViaPgBouncer(b *testing.B) {
	if testing.Short() {
		b.Skip("end-to-end")
	}
	var stalls, outages, pauses, fenceToGate, perRunMax []time.Duration
	errs, lost := 0, 0
	for i := 0; i < b.N; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		sum, err := Run(ctx, Options{Binary: binary, Via: ViaPgBouncer, Clients: 32, Seconds: 60, ReportDir: b.TempDir()}, io.Discard)
		cancel()
		if err != nil {
			b.Fatal(err)
		}
		pb := sum.PgBouncer
		if sum.Phase != "done" || pb == nil {
			b.Fatalf("run %d ended %s", i, sum.Phase)
		}
		errs += pb.ApplicationErrors
		lost += pb.LostWrites
		stalls = append(stalls, pb.Stalls...)
		if n := len(pb.Stalls); n > 0 {
			perRunMax = append(perRunMax, pb.Stalls[n-1])
		}
		outages = append(outages, time.Duration(sum.WriteOutageMS)*time.Millisecond)
		fenceToGate = append(fenceToGate, time.Duration(sum.OutageMS)*time.Millisecond)
		pauses = append(pauses, time.Duration(pb.PoolPauseMS)*time.Millisecond)
		b.Logf("run %d: stall p50 %.0f p99 %.0f max %.0f ms, pool pause %d ms, write outage %d ms, fence to gate %d ms, committed %d, errors %d, lost %d",
			i, pb.StallP50MS, pb.StallP99MS, pb.StallMaxMS, pb.PoolPauseMS, sum.WriteOutageMS, sum.OutageMS, pb.Committed, pb.ApplicationErrors, pb.LostWrites)
	}
	for _, s := range [][]time.Duration{stalls, outages, pauses, fenceToGate, perRunMax} {
		slices.Sort(s)
	}
	msOf := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	b.ReportMetric(msOf(integration.Percentile(stalls, 50)), "stall_p50_ms")
	b.ReportMetric(msOf(integration.Percentile(stalls, 99)), "stall_p99_ms")
	b.ReportMetric(msOf(integration.Percentile(perRunMax, 99)), "stall_max_p99_ms")
	b.ReportMetric(msOf(integration.Percentile(pauses, 50)), "pool_pause_p50_ms")
	b.ReportMetric(msOf(integration.Percentile(outages, 50)), "write_outage_p50_ms")
	b.ReportMetric(msOf(integration.Percentile(outages, 99)), "write_outage_p99_ms")
	b.ReportMetric(msOf(integration.Percentile(fenceToGate, 99)), "fence_to_gate_p99_ms")
	b.ReportMetric(float64(errs), "app_errors")
	b.ReportMetric(float64(lost), "lost_writes")
	b.ReportMetric(0, "ns/op")
}
