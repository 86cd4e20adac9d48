package postgres

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/cutover/cutover/internal/config"
)

// Cleanup stops the replicator and drops what it made on blue: the slot
// (which otherwise pins blue's WAL forever), the publication and this
// pair's heartbeat row; on green it forgets the applied position. Green's
// data and the cutover schema stay. It is idempotent and works after Stop.
func (r *Replicator) Cleanup(ctx context.Context) error {
	if err := r.Stop(ctx); err != nil {
		return err
	}
	_, err := Cleanup(ctx, r.opts.Plan, r.opts.Pair, r.name, r.log)
	return err
}

// Dropped lists what a cleanup removed.
type Dropped struct {
	Slots        []string
	Publications []string
	Forgotten    bool // green's applied position was removed
	// IndexesRebuilt counts green's indexes that an interrupted copy had
	// dropped (see deferIndexes) and the cleanup built again.
	IndexesRebuilt int
}

// Cleanup drops the slot and the publication named name of one pair of a
// plan on blue (the name the plan recorded: nothing else is touched), its
// heartbeat row, and green's applied position for it. A walsender still
// holding the slot is terminated first. It is idempotent: what does not
// exist is skipped. The green side is best effort when green is
// unreachable (blue is what must not keep a slot).
func Cleanup(ctx context.Context, plan string, pair config.Pair, name string, log *zap.Logger) (Dropped, error) {
	if log == nil {
		log = zap.NewNop()
	}
	if !validSlotName(name) {
		return Dropped{}, fmt.Errorf("cleanup: %q is not a slot name", name)
	}
	var out Dropped
	blue, err := pgx.Connect(ctx, pair.Blue.DSN.Reveal())
	if err != nil {
		return out, fmt.Errorf("blue: connect: %w", err)
	}
	defer blue.Close(context.WithoutCancel(ctx))
	dropped, err := dropSlotConn(ctx, blue, name, log)
	if err != nil {
		return out, err
	}
	if dropped {
		out.Slots = append(out.Slots, name)
	}
	tag, err := blue.Exec(ctx, `SELECT 1 FROM pg_publication WHERE pubname = $1`, name)
	if err != nil {
		return out, fmt.Errorf("blue: look up publication: %w", err)
	}
	if tag.RowsAffected() > 0 {
		if _, err := blue.Exec(ctx, "DROP PUBLICATION IF EXISTS "+quoteIdent(name)); err != nil {
			return out, fmt.Errorf("blue: drop publication %s: %w", name, err)
		}
		out.Publications = append(out.Publications, name)
	}
	if _, err := blue.Exec(ctx, `DELETE FROM cutover.heartbeat WHERE plan = $1 AND pair = $2`, plan, pair.Name); err != nil && !undefinedTable(err) {
		return out, fmt.Errorf("blue: delete heartbeat row: %w", err)
	}
	if pair.Green.DSN != "" {
		green, err := pgx.Connect(ctx, pair.Green.DSN.Reveal())
		if err != nil {
			log.Warn("green unreachable; its applied position for the slot stays", zap.Error(err))
			return out, nil
		}
		defer green.Close(context.WithoutCancel(ctx))
		tag, err := green.Exec(ctx, forgetSQL, name)
		if err != nil && !undefinedTable(err) {
			return out, fmt.Errorf("green: forget applied position: %w", err)
		}
		out.Forgotten = err == nil && tag.RowsAffected() > 0
		// A copy that died leaves green without the indexes it dropped:
		// an aborted plan gives them back.
		connect := func(ctx context.Context) (*pgx.Conn, error) { return pgx.Connect(ctx, pair.Green.DSN.Reveal()) }
		built, err := rebuildIndexes(ctx, connect, name, 2, log)
		if err != nil {
			return out, err
		}
		out.IndexesRebuilt = built
	}
	log.Info("cleaned up", zap.Strings("slots", out.Slots), zap.Strings("publications", out.Publications), zap.Bool("forgot_applied_position", out.Forgotten), zap.Int("indexes_rebuilt", out.IndexesRebuilt))
	return out, nil
}

func undefinedTable(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && (pgErr.Code == "42P01" || pgErr.Code == "3F000")
}

// Leftover is a slot or publication made by cutover that is still on a
// server.
type Leftover struct {
	Kind string // "slot" or "publication"
	Name string
	// Slots only: whether a walsender holds it, and how much WAL it pins.
	Active      bool
	RetainedWAL int64
	Confirmed   string
}

// Leftovers lists every slot and publication on the server at dsn whose
// name starts with prefix (NamePrefix for all of cutover's, or
// NamePrefix+plan+"_" for one plan's).
func Leftovers(ctx context.Context, dsn config.DSN, prefix string) ([]Leftover, error) {
	conn, err := pgx.Connect(ctx, dsn.Reveal())
	if err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	like := strings.NewReplacer(`\`, `\\`, `_`, `\_`, `%`, `\%`).Replace(prefix) + "%"
	rows, err := conn.Query(ctx, `
		SELECT 'slot', slot_name::text, active, coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::int8, coalesce(confirmed_flush_lsn::text, '')
		FROM pg_replication_slots WHERE slot_name LIKE $1 AND database = current_database()
		UNION ALL
		SELECT 'publication', pubname::text, false, 0, '' FROM pg_publication WHERE pubname LIKE $1
		ORDER BY 1, 2`, like)
	if err != nil {
		return nil, fmt.Errorf("list slots and publications: %w", err)
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (Leftover, error) {
		var l Leftover
		err := row.Scan(&l.Kind, &l.Name, &l.Active, &l.RetainedWAL, &l.Confirmed)
		return l, err
	})
}

// DropLeftover drops one slot or publication found by Leftovers.
func DropLeftover(ctx context.Context, dsn config.DSN, l Leftover) error {
	conn, err := pgx.Connect(ctx, dsn.Reveal())
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	switch l.Kind {
	case "slot":
		_, err = dropSlotConn(ctx, conn, l.Name, nil)
		return err
	case "publication":
		_, err = conn.Exec(ctx, "DROP PUBLICATION IF EXISTS "+quoteIdent(l.Name))
		return err
	}
	return fmt.Errorf("unknown leftover kind %q", l.Kind)
}

type execQueryer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

func dropSlot(ctx context.Context, pool *pgxpool.Pool, name string, log *zap.Logger) error {
	_, err := dropSlotConn(ctx, pool, name, log)
	return err
}

// dropSlotConn drops a slot, terminating the walsender that holds it (a
// slot in use cannot be dropped). It reports whether there was one.
func dropSlotConn(ctx context.Context, q execQueryer, name string, log *zap.Logger) (bool, error) {
	if log == nil {
		log = zap.NewNop()
	}
	for attempt := 0; ; attempt++ {
		var pid *int32
		err := q.QueryRow(ctx, `SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1`, name).Scan(&pid)
		if errors.Is(err, pgx.ErrNoRows) {
			return attempt > 0, nil
		}
		if err != nil {
			return false, fmt.Errorf("blue: look up slot %s: %w", name, err)
		}
		if pid != nil {
			log.Info("terminating the walsender holding the slot", zap.Int32("pid", *pid))
			if _, err := q.Exec(ctx, `SELECT pg_terminate_backend($1)`, *pid); err != nil {
				return false, fmt.Errorf("blue: terminate walsender %d of slot %s: %w", *pid, name, err)
			}
		}
		_, err = q.Exec(ctx, `SELECT pg_drop_replication_slot($1)`, name)
		if err == nil {
			log.Info("dropped slot", zap.String("slot", name))
			return true, nil
		}
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42704" {
			return attempt > 0, nil
		}
		if !(errors.As(err, &pgErr) && pgErr.Code == "55006") || attempt >= 50 {
			return false, fmt.Errorf("blue: drop slot %s: %w", name, err)
		}
		select {
		case <-ctx.Done():
			return false, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}
