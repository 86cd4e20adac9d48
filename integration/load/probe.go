package load

import (
	"context"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// Sample is one moment at which the prober tried to write on both sides.
type Sample struct {
	At                time.Time
	Blue, Green       bool // whether a write succeeded (and was rolled back)
	BlueErr, GreenErr string
}

// Prober checks invariant 1 (never can applications write to both sides):
// it repeatedly tries a write transaction as the application on blue and on
// green at the same moment, rolls both back, and records which succeeded.
type Prober struct {
	cancel context.CancelFunc
	done   chan struct{}

	mu      sync.Mutex
	samples []Sample
}

// StartProber samples every interval until Stop. The DSNs should log in as
// the application role, whose writes the fence stops.
func StartProber(ctx context.Context, blueDSN, greenDSN string, interval time.Duration) *Prober {
	ctx, cancel := context.WithCancel(ctx)
	p := &Prober{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		var blue, green *pgx.Conn
		defer func() {
			for _, c := range []*pgx.Conn{blue, green} {
				if c != nil {
					c.Close(context.Background())
				}
			}
		}()
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			var s Sample
			var wg sync.WaitGroup
			wg.Add(2)
			go func() { defer wg.Done(); s.Blue, s.BlueErr = tryWrite(ctx, &blue, blueDSN) }()
			go func() { defer wg.Done(); s.Green, s.GreenErr = tryWrite(ctx, &green, greenDSN) }()
			wg.Wait()
			if ctx.Err() != nil {
				return
			}
			s.At = time.Now()
			p.mu.Lock()
			p.samples = append(p.samples, s)
			p.mu.Unlock()
		}
	}()
	return p
}

// tryWrite holds its transaction open briefly so that a write that would
// only fail at commit also shows.
func tryWrite(ctx context.Context, conn **pgx.Conn, dsn string) (bool, string) {
	if *conn == nil || (*conn).IsClosed() {
		c, err := pgx.Connect(ctx, dsn)
		if err != nil {
			return false, err.Error()
		}
		*conn = c
	}
	tx, err := (*conn).Begin(ctx)
	if err != nil {
		return false, err.Error()
	}
	defer tx.Rollback(context.Background())
	if _, err := tx.Exec(ctx, `UPDATE load_accounts SET touched = touched WHERE id = 1`); err != nil {
		return false, err.Error()
	}
	return true, ""
}

// Stop ends sampling and returns every sample.
func (p *Prober) Stop() []Sample {
	p.cancel()
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]Sample(nil), p.samples...)
}

// BothWritable returns the samples at which both sides took a write.
func BothWritable(samples []Sample) []Sample {
	var out []Sample
	for _, s := range samples {
		if s.Blue && s.Green {
			out = append(out, s)
		}
	}
	return out
}
