package postgres

import (
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

const loadSchema = `
CREATE TABLE acct (id integer PRIMARY KEY, balance bigint NOT NULL, touched int NOT NULL DEFAULT 0, note text);
CREATE TABLE hist (id bigserial PRIMARY KEY, acct integer NOT NULL, delta bigint NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE logbook (line text, at timestamptz DEFAULT clock_timestamp());
ALTER TABLE logbook REPLICA IDENTITY FULL;
`

const loadAccounts = 1000

// errRetry rolls a load transaction back.
var errRetry = errors.New("retry")

// writer runs a write load on blue: transfers between accounts (the sum of
// balances never changes), history inserts, deletes and re-inserts of
// accounts (key reuse), key changes, and rows in a table without a key.
type writer struct {
	pool    *pgxpool.Pool
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	commits atomic.Int64
	errs    chan error
}

func seedLoad(t testing.TB, e *pairEnv) {
	t.Helper()
	e.exec(t, e.blue, `INSERT INTO acct (id, balance) SELECT g, 1000 FROM generate_series(1, $1::int) g`, loadAccounts)
}

func startWriter(t testing.TB, dsn string, clients int) *writer {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	w := &writer{pool: pool, cancel: cancel, errs: make(chan error, clients)}
	for i := 0; i < clients; i++ {
		w.wg.Add(1)
		go func(seed uint64) {
			defer w.wg.Done()
			rng := rand.New(rand.NewPCG(seed, 7))
			for ctx.Err() == nil {
				err := w.txn(ctx, rng)
				var pgErr interface{ SQLState() string }
				switch {
				case err == nil:
					w.commits.Add(1)
				case ctx.Err() != nil, errors.Is(err, errRetry):
				case errors.As(err, &pgErr) && (pgErr.SQLState() == "40P01" || pgErr.SQLState() == "23505"):
					// deadlock between transfers, or a key race: retry.
				default:
					w.errs <- err
					return
				}
			}
		}(uint64(i) + 1)
	}
	return w
}

func (w *writer) txn(ctx context.Context, rng *rand.Rand) error {
	a, b := rng.IntN(loadAccounts)+1, rng.IntN(loadAccounts)+1
	amount := rng.Int64N(100)
	return pgx.BeginFunc(ctx, w.pool, func(tx pgx.Tx) error {
		switch k := rng.IntN(20); {
		case k == 0:
			// Delete an account and put it back: its balance moves to
			// another one so the sum stays.
			var bal int64
			if err := tx.QueryRow(ctx, `DELETE FROM acct WHERE id = $1 RETURNING balance`, a).Scan(&bal); err != nil {
				if errors.Is(err, pgx.ErrNoRows) {
					return nil
				}
				return err
			}
			if _, err := tx.Exec(ctx, `INSERT INTO acct (id, balance, note) VALUES ($1, $2, 'reborn')`, a, bal); err != nil {
				return err
			}
		case k == 1:
			if _, err := tx.Exec(ctx, `INSERT INTO logbook (line) VALUES ($1)`, "line"); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `DELETE FROM logbook WHERE ctid = (SELECT ctid FROM logbook ORDER BY at LIMIT 1) AND random() < 0.3`); err != nil {
				return err
			}
		default:
			// An account being deleted and re-inserted concurrently is
			// not found (READ COMMITTED): then nothing moves, so that
			// the sum of balances stays an invariant on blue.
			tag, err := tx.Exec(ctx, `UPDATE acct SET balance = balance - $2, touched = touched + 1 WHERE id = $1`, a, amount)
			if err != nil {
				return err
			}
			if tag.RowsAffected() != 1 {
				return errRetry
			}
			tag, err = tx.Exec(ctx, `UPDATE acct SET balance = balance + $2, touched = touched + 1 WHERE id = $1`, b, amount)
			if err != nil {
				return err
			}
			if tag.RowsAffected() != 1 {
				return errRetry
			}
			if _, err := tx.Exec(ctx, `INSERT INTO hist (acct, delta) VALUES ($1, $2), ($3, $4)`, a, -amount, b, amount); err != nil {
				return err
			}
		}
		return nil
	})
}

// stop ends the load and fails the test if a writer failed.
func (w *writer) stop(t testing.TB) {
	t.Helper()
	w.cancel()
	w.wg.Wait()
	w.pool.Close()
	select {
	case err := <-w.errs:
		t.Fatalf("writer: %v", err)
	default:
	}
}

func sumBalances(ctx context.Context, pool *pgxpool.Pool) (int64, error) {
	var s int64
	err := pool.QueryRow(ctx, `SELECT coalesce(sum(balance), 0) FROM acct`).Scan(&s)
	return s, err
}

// loadDuration is how long the concurrent load runs: 30 s, or
// CUTOVER_LOAD_DURATION (a Go duration) for quicker local runs.
func loadDuration() time.Duration {
	if d, err := time.ParseDuration(os.Getenv("CUTOVER_LOAD_DURATION")); err == nil && d > 0 {
		return d
	}
	return 30 * time.Second
}
