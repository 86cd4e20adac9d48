package postgres

import (
	"time"

	"github.com/jackc/pglogrepl"
)

// A batch is several source transactions applied in one green transaction.
// Batching is what lets the applier beat native apply, which commits every
// source transaction on its own: the applied position is written in the
// same green transaction, so a batch is applied exactly once or not at all.
//
// Within a batch, changes are kept per table. Tables whose only unique
// index on green is the replica identity ("compact" tables) merge every
// change of a row into its net effect (insert then update is an insert of
// the new row; update then delete is a delete; ...), because with
// session_replication_role = replica (no triggers, no foreign-key checks)
// and no other unique index, changes to different rows commute and only a
// row's final state within the batch is ever visible. Their changes are
// then applied as one set-based statement per kind. Other tables replay
// their changes in order, one statement per row, except that runs of
// inserts are grouped into one statement.

// op kinds beyond insert/update/delete.
const (
	opDead      = 0   // merged away
	opKeyUpdate = 'K' // an update that changed the key: applied alone, in order
)

// op is one pending row change.
type op struct {
	kind byte  // msgInsert, msgUpdate, msgDelete, opKeyUpdate or opDead
	key  tuple // identity values used to find the row (old key), compact tables and key updates
	row  tuple // new row (insert, update)
	old  tuple // the whole old row, REPLICA IDENTITY FULL tables
	// alone: apply by itself, in order, never merged (key changes and
	// anything a consistent stream cannot produce).
	alone bool
}

// tableBatch holds one table's pending changes.
type tableBatch struct {
	rs    *relState
	ops   []op
	index map[string]int // compact tables: key -> index of the row's pending op
	live  int            // ops not dead
}

// batch accumulates source transactions until they are applied.
type batch struct {
	tables map[uint32]*tableBatch
	order  []*tableBatch
	// truncates are groups of relation ids truncated together, in order.
	// A truncate discards the table's pending changes (they happened
	// before it), so truncates run before the remaining changes.
	truncates [][]uint32

	// Source transactions in the batch.
	firstCommit    pglogrepl.LSN // commit position of the first transaction
	lastEnd        pglogrepl.LSN // end of the last complete transaction
	lastCommitTime time.Time
	txns           int
	changes        int // row changes added (before merging)
	pending        int // live ops not yet sent to green
	started        time.Time

	// Facts collected for after the commit.
	markers      []markerSeen
	txnMarkers   []string // markers of the transaction being added
	heartbeatSeq int64
	rowKeys      []rowKey
	appChanges   []appChange
	txnAppStart  int // first appChange of the transaction being added
}

// markerSeen is a marker row and the end of the transaction that wrote it.
type markerSeen struct {
	nonce string
	end   pglogrepl.LSN
}

// rowKey is one changed key for OnRowChange; key nil means the whole table.
type rowKey struct {
	table string
	key   []string
}

// appChange is one application row change, kept for breach detection.
type appChange struct {
	table      string
	kind       byte
	key        []string
	end        pglogrepl.LSN
	commitTime time.Time
}

func newBatch() *batch {
	return &batch{tables: map[uint32]*tableBatch{}, started: time.Now()}
}

func (b *batch) table(rs *relState) *tableBatch {
	tb := b.tables[rs.rel.ID]
	if tb == nil || tb.rs != rs {
		tb = &tableBatch{rs: rs}
		if rs.compact {
			tb.index = map[string]int{}
		}
		b.tables[rs.rel.ID] = tb
		b.order = append(b.order, tb)
	}
	return tb
}

// keyString makes a map key of identity values: each value is length
// prefixed so that ("a","bc") and ("ab","c") differ.
func keyString(key tuple) string {
	n := 0
	for _, v := range key {
		n += 5 + len(v.Data)
	}
	buf := make([]byte, 0, n)
	for _, v := range key {
		l := len(v.Data)
		buf = append(buf, v.Kind, byte(l>>24), byte(l>>16), byte(l>>8), byte(l))
		buf = append(buf, v.Data...)
	}
	return string(buf)
}

// mergeRow overlays newer on older: columns newer leaves unchanged
// (unchanged TOAST) keep older's value.
func mergeRow(older, newer tuple) tuple {
	if len(older) != len(newer) {
		return newer
	}
	var out tuple
	for i, v := range newer {
		if v.Kind == valUnchanged && older[i].Kind != valUnchanged {
			if out == nil {
				out = make(tuple, len(newer))
				copy(out, newer)
			}
			out[i] = older[i]
		}
	}
	if out == nil {
		return newer
	}
	return out
}

func complete(t tuple) bool {
	for _, v := range t {
		if v.Kind == valUnchanged {
			return false
		}
	}
	return true
}

// add records one row change of a complete or partial transaction.
func (tb *tableBatch) add(o op) {
	rs := tb.rs
	// Bookkeeping tables upsert: their rows may predate the slot (they are
	// not part of the initial copy), so an update must create the row.
	if rs.upsert && o.kind == msgUpdate && complete(o.row) {
		o.kind = msgInsert
	}
	if !rs.compact {
		tb.append(o)
		return
	}
	if o.kind == opKeyUpdate {
		// A key change is applied alone, in order: nothing after it may
		// merge into anything before it for either key.
		delete(tb.index, keyString(o.key))
		delete(tb.index, keyString(rs.keyOf(o.row)))
		o.alone = true
		tb.append(o)
		return
	}
	k := keyString(o.key)
	i, ok := tb.index[k]
	if !ok {
		tb.index[k] = len(tb.ops)
		tb.append(o)
		return
	}
	prev := &tb.ops[i]
	switch {
	case prev.kind == msgInsert && o.kind == msgUpdate:
		prev.row = mergeRow(prev.row, o.row)
	case prev.kind == msgUpdate && o.kind == msgUpdate:
		prev.row = mergeRow(prev.row, o.row)
	case prev.kind == msgInsert && o.kind == msgDelete:
		// The row did not exist before the batch and does not after it.
		prev.kind = opDead
		tb.live--
		delete(tb.index, k)
	case prev.kind == msgUpdate && o.kind == msgDelete:
		prev.kind = msgDelete
		prev.row = nil
	case prev.kind == msgDelete && o.kind == msgInsert:
		// The row existed before the batch: its net change is a new
		// version (or, for bookkeeping tables, an upsert).
		if rs.upsert {
			prev.kind = msgInsert
		} else {
			prev.kind = msgUpdate
		}
		prev.row = o.row
	case o.kind == msgInsert:
		// Cannot happen on a consistent stream (the row exists); keep the
		// newest row, as an upsert would.
		prev.kind = msgInsert
		if !rs.upsert {
			prev.kind = msgUpdate
		}
		prev.row = o.row
	default:
		// Delete after delete, update after delete: cannot happen on a
		// consistent stream; apply in order, as a barrier for the key.
		delete(tb.index, k)
		o.alone = true
		tb.append(o)
	}
}

func (tb *tableBatch) append(o op) {
	tb.ops = append(tb.ops, o)
	tb.live++
}

// reset drops the table's pending changes (after a flush or a truncate).
func (tb *tableBatch) reset() {
	tb.ops = tb.ops[:0]
	tb.live = 0
	if tb.index != nil {
		clear(tb.index)
	}
}
