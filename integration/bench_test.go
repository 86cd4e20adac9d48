package integration

import (
	"context"
	"testing"
	"time"
)

// The benchmarks time starting a server (ns/op and start-ms: until it
// accepts connections), from a warm template cache; Stop is not timed.
// The first, untimed start builds the template if the machine has none.

func BenchmarkStartPostgres(b *testing.B) {
	benchStart(b, func(ctx context.Context) (time.Duration, func(context.Context) error, error) {
		p, err := StartPostgres(ctx, PostgresOptions{})
		if err != nil {
			return 0, nil, err
		}
		return p.StartupDuration, p.Stop, nil
	})
}

func BenchmarkStartMariaDB(b *testing.B) {
	benchStart(b, func(ctx context.Context) (time.Duration, func(context.Context) error, error) {
		m, err := StartMariaDB(ctx, MariaDBOptions{})
		if err != nil {
			return 0, nil, err
		}
		return m.StartupDuration, m.Stop, nil
	})
}

func BenchmarkStartRedis(b *testing.B) {
	benchStart(b, func(ctx context.Context) (time.Duration, func(context.Context) error, error) {
		r, err := StartRedis(ctx, RedisOptions{})
		if err != nil {
			return 0, nil, err
		}
		return r.StartupDuration, r.Stop, nil
	})
}

func benchStart(b *testing.B, start func(context.Context) (time.Duration, func(context.Context) error, error)) {
	ctx := context.Background()
	_, stop, err := start(ctx) // warm-up
	if err != nil {
		b.Fatal(err)
	}
	if err := stop(ctx); err != nil {
		b.Fatal(err)
	}
	var total, stopTotal time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		d, stop, err := start(ctx)
		if err != nil {
			b.Fatal(err)
		}
		total += d
		b.StopTimer()
		t0 := time.Now()
		if err := stop(ctx); err != nil {
			b.Fatal(err)
		}
		stopTotal += time.Since(t0)
		b.StartTimer()
	}
	b.ReportMetric(float64(total.Microseconds())/1000/float64(b.N), "start-ms")
	b.ReportMetric(float64(stopTotal.Microseconds())/1000/float64(b.N), "stop-ms")
}
