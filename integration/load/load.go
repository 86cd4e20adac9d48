// Package load runs a pgbench-like write load against PostgreSQL and keeps
// the receipt of every write the database acknowledged, so that a test (or
// the demo) can prove afterwards that none of them is missing elsewhere.
//
// Each transaction updates a random account and inserts a history row whose
// key (run, writer, seq) the writer chose itself, so that "acknowledged" has
// one meaning on both sides: the COMMIT returned without error.
package load

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Schema creates the load's tables. history.id comes from a sequence, so
// that a cutover that forgets to sync sequences shows up as duplicate keys
// on green after the flip.
const Schema = `
CREATE TABLE IF NOT EXISTS load_accounts (
	id      int PRIMARY KEY,
	balance bigint NOT NULL DEFAULT 0,
	touched timestamptz
);
CREATE TABLE IF NOT EXISTS load_history (
	id      bigserial PRIMARY KEY,
	run     text   NOT NULL,
	writer  int    NOT NULL,
	seq     bigint NOT NULL,
	account int    NOT NULL,
	delta   bigint NOT NULL,
	at      timestamptz NOT NULL DEFAULT now(),
	UNIQUE (run, writer, seq)
);
-- A table without a key, the way an application's log or event tables
-- often are: replicated with REPLICA IDENTITY FULL and verified without
-- a key (Options.Events).
CREATE TABLE IF NOT EXISTS load_events (
	run    text   NOT NULL,
	writer int    NOT NULL,
	seq    bigint NOT NULL,
	note   text
);
ALTER TABLE load_events REPLICA IDENTITY FULL;
-- Not a key (rows may repeat): an index that the apply of an UPDATE or
-- DELETE matched on the whole row can use on green.
CREATE INDEX IF NOT EXISTS load_events_run_writer_seq ON load_events (run, writer, seq);`

// Setup creates the tables on dsn and fills accounts (idempotent).
func Setup(ctx context.Context, dsn string, accounts int) error {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return fmt.Errorf("load setup: %w", err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, Schema); err != nil {
		return fmt.Errorf("load setup: %w", err)
	}
	_, err = conn.Exec(ctx, `INSERT INTO load_accounts (id) SELECT g FROM generate_series(1, $1::int) g ON CONFLICT DO NOTHING`, accounts)
	if err != nil {
		return fmt.Errorf("load setup: %w", err)
	}
	return nil
}

// Options configure a load.
type Options struct {
	// Run names this load's rows; writers of different runs never collide.
	Run string
	// Target returns the DSN to write to. It is called before every
	// transaction, so a load can follow a traffic flip.
	Target func() string
	// Writers is the number of concurrent sessions.
	Writers int
	// Accounts is how many accounts exist (see Setup).
	Accounts int
	// Think is the pause between a writer's transactions (0: none).
	Think time.Duration
	// LongEvery makes every n-th transaction hold its locks for Long
	// before committing (0: never).
	LongEvery int
	Long      time.Duration
	// Events makes every transaction also insert a row into the key-less
	// table load_events, and every tenth update one of its writer's
	// earlier rows there (an UPDATE without a key: matched on the whole
	// row). MissingEvents checks them.
	Events bool
}

// Receipt identifies one acknowledged write.
type Receipt struct {
	Writer int
	Seq    int64
	At     time.Time
	DSN    string
}

// Load is a running write load.
type Load struct {
	opts   Options
	cancel context.CancelFunc
	done   chan struct{}

	mu       sync.Mutex
	receipts []Receipt
	errs     map[string]int // SQLSTATE (or "conn") -> count
	acked    atomic.Int64
	// switches: per writer that moved to another target, from the first
	// transaction that chose the new target to its first connection there
	// (failed attempts included): what reconnecting adds to the gap.
	switches []time.Duration
}

// Start begins the load; Stop ends it.
func Start(ctx context.Context, opts Options) *Load {
	if opts.Writers <= 0 {
		opts.Writers = 4
	}
	if opts.Accounts <= 0 {
		opts.Accounts = 1000
	}
	if opts.Run == "" {
		opts.Run = fmt.Sprintf("run-%d", time.Now().UnixNano())
	}
	ctx, cancel := context.WithCancel(ctx)
	l := &Load{opts: opts, cancel: cancel, done: make(chan struct{}), errs: map[string]int{}}
	var wg sync.WaitGroup
	for w := 0; w < opts.Writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			l.writer(ctx, w)
		}(w)
	}
	go func() { wg.Wait(); close(l.done) }()
	return l
}

// Acked is how many writes have been acknowledged so far.
func (l *Load) Acked() int64 { return l.acked.Load() }

// Refused is how many writes have been refused so far, by SQLSTATE.
func (l *Load) Refused() map[string]int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return copyMap(l.errs)
}

// Switches returns, for every writer that moved to another target, how
// long it took from choosing the new target to being connected there.
func (l *Load) Switches() []time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]time.Duration(nil), l.switches...)
}

// Stop ends the load, waits for every writer, and returns the receipts of
// the acknowledged writes and the count of refused ones by SQLSTATE.
func (l *Load) Stop() ([]Receipt, map[string]int) {
	l.cancel()
	<-l.done
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]Receipt(nil), l.receipts...), copyMap(l.errs)
}

func copyMap(m map[string]int) map[string]int {
	out := make(map[string]int, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

func (l *Load) writer(ctx context.Context, w int) {
	rng := rand.New(rand.NewPCG(uint64(w), uint64(time.Now().UnixNano())))
	var conn *pgx.Conn
	var connDSN string
	var switching time.Time // when this writer first chose a new target
	defer func() {
		if conn != nil {
			conn.Close(context.Background())
		}
	}()
	for seq := int64(1); ctx.Err() == nil; seq++ {
		dsn := l.opts.Target()
		if conn == nil || conn.IsClosed() || dsn != connDSN {
			if connDSN != "" && dsn != connDSN && switching.IsZero() {
				switching = time.Now()
			}
			if conn != nil {
				conn.Close(context.Background())
			}
			var err error
			conn, err = pgx.Connect(ctx, dsn)
			if err != nil {
				conn = nil
				l.fail(err)
				sleep(ctx, 20*time.Millisecond)
				continue
			}
			if connDSN != "" && dsn != connDSN {
				l.mu.Lock()
				l.switches = append(l.switches, time.Since(switching))
				l.mu.Unlock()
			}
			switching = time.Time{}
			connDSN = dsn
		}
		account := 1 + rng.IntN(l.opts.Accounts)
		delta := int64(rng.IntN(1000) - 500)
		long := l.opts.LongEvery > 0 && seq%int64(l.opts.LongEvery) == 0
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `UPDATE load_accounts SET balance = balance + $1, touched = now() WHERE id = $2`, delta, account); err != nil {
				return err
			}
			if long {
				sleep(ctx, l.opts.Long)
			}
			if _, err := tx.Exec(ctx, `INSERT INTO load_history (run, writer, seq, account, delta) VALUES ($1, $2, $3, $4, $5)`, l.opts.Run, w, seq, account, delta); err != nil {
				return err
			}
			if !l.opts.Events {
				return nil
			}
			if _, err := tx.Exec(ctx, `INSERT INTO load_events (run, writer, seq) VALUES ($1, $2, $3)`, l.opts.Run, w, seq); err != nil {
				return err
			}
			if seq%10 == 0 {
				_, err := tx.Exec(ctx, `UPDATE load_events SET note = $4 WHERE run = $1 AND writer = $2 AND seq = $3`, l.opts.Run, w, 1+rng.Int64N(seq), fmt.Sprintf("touched by %d", seq))
				return err
			}
			return nil
		})
		if err != nil {
			if ctx.Err() == nil {
				l.fail(err)
			}
			if l.opts.Think == 0 {
				sleep(ctx, time.Millisecond) // don't spin on a fenced database
			}
		} else {
			l.mu.Lock()
			l.receipts = append(l.receipts, Receipt{Writer: w, Seq: seq, At: time.Now(), DSN: connDSN})
			l.mu.Unlock()
			l.acked.Add(1)
		}
		if l.opts.Think > 0 {
			sleep(ctx, l.opts.Think)
		}
	}
}

func (l *Load) fail(err error) {
	code := "conn"
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		code = pgErr.Code
	}
	l.mu.Lock()
	l.errs[code]++
	l.mu.Unlock()
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// Missing returns the receipts whose rows are not in dsn's load_history.
func Missing(ctx context.Context, dsn, run string, receipts []Receipt) ([]Receipt, error) {
	return missingIn(ctx, dsn, "load_history", run, receipts)
}

// MissingEvents returns the receipts whose rows are not in dsn's
// load_events (a load with Options.Events).
func MissingEvents(ctx context.Context, dsn, run string, receipts []Receipt) ([]Receipt, error) {
	return missingIn(ctx, dsn, "load_events", run, receipts)
}

func missingIn(ctx context.Context, dsn, table, run string, receipts []Receipt) ([]Receipt, error) {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return nil, fmt.Errorf("check receipts: %w", err)
	}
	defer conn.Close(ctx)
	have := map[[2]int64]bool{}
	rows, err := conn.Query(ctx, `SELECT writer, seq FROM `+table+` WHERE run = $1`, run)
	if err != nil {
		return nil, fmt.Errorf("check receipts: %w", err)
	}
	for rows.Next() {
		var w, s int64
		if err := rows.Scan(&w, &s); err != nil {
			return nil, err
		}
		have[[2]int64{w, s}] = true
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("check receipts: %w", err)
	}
	var missing []Receipt
	for _, r := range receipts {
		if !have[[2]int64{int64(r.Writer), r.Seq}] {
			missing = append(missing, r)
		}
	}
	sort.Slice(missing, func(i, j int) bool { return missing[i].At.Before(missing[j].At) })
	return missing, nil
}
