package postgres

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
)

// This file decodes pgoutput messages (protocol version 1, which is also
// what versions 2 and up send when streaming of in-progress transactions
// is off). pglogrepl has a decoder too; this one exists for the apply hot
// path: it allocates one slice per tuple instead of one object and one
// buffer per column, and its values alias the message buffer, which the
// receiver copies once. It is fuzzed, and checked against pglogrepl's.

// Message kinds (the first byte of a pgoutput message).
const (
	msgBegin    = 'B'
	msgCommit   = 'C'
	msgOrigin   = 'O'
	msgRelation = 'R'
	msgType     = 'Y'
	msgInsert   = 'I'
	msgUpdate   = 'U'
	msgDelete   = 'D'
	msgTruncate = 'T'
	msgMessage  = 'M'
)

// Value kinds inside a tuple.
const (
	valNull      = 'n'
	valUnchanged = 'u' // an unchanged TOASTed value: keep what green has
	valText      = 't'
	valBinary    = 'b'
)

// errShort is returned for a message that ends before its fields do.
var errShort = errors.New("pgoutput: message truncated")

// value is one column of a tuple.
type value struct {
	Kind byte
	Data []byte // aliases the message buffer
}

type tuple []value

// relColumn is one column of a Relation message.
type relColumn struct {
	Key    bool // part of the replica identity
	Name   string
	TypeID uint32
	Typmod int32
}

// relation is a Relation message: pgoutput sends one before the first
// change of a table in a session and after every change of its definition.
type relation struct {
	ID        uint32
	Namespace string
	Name      string
	Identity  byte // d, f, i or n, as relreplident
	Columns   []relColumn
}

// message is one decoded pgoutput message. Which fields are set depends on
// Kind.
type message struct {
	Kind byte
	// Begin: FinalLSN is the transaction's commit position; Commit:
	// CommitLSN and EndLSN (the position after the commit record, which is
	// what a restart resumes from).
	FinalLSN   pglogrepl.LSN
	CommitLSN  pglogrepl.LSN
	EndLSN     pglogrepl.LSN
	CommitTime time.Time
	Xid        uint32
	// Relation.
	Relation *relation
	// Insert, Update, Delete: OldKind is 'K' (the old key), 'O' (the whole
	// old row, REPLICA IDENTITY FULL) or 0 (update without key change).
	RelID   uint32
	OldKind byte
	Old     tuple
	New     tuple
	// Truncate.
	TruncateOption byte
	RelIDs         []uint32
	// Message (pg_logical_emit_message).
	Prefix  string
	Content []byte
}

type reader struct {
	b   []byte
	err error
}

func (r *reader) byte1() byte {
	if r.err != nil || len(r.b) < 1 {
		r.err = errShort
		return 0
	}
	v := r.b[0]
	r.b = r.b[1:]
	return v
}

func (r *reader) u16() uint16 {
	if r.err != nil || len(r.b) < 2 {
		r.err = errShort
		return 0
	}
	v := binary.BigEndian.Uint16(r.b)
	r.b = r.b[2:]
	return v
}

func (r *reader) u32() uint32 {
	if r.err != nil || len(r.b) < 4 {
		r.err = errShort
		return 0
	}
	v := binary.BigEndian.Uint32(r.b)
	r.b = r.b[4:]
	return v
}

func (r *reader) u64() uint64 {
	if r.err != nil || len(r.b) < 8 {
		r.err = errShort
		return 0
	}
	v := binary.BigEndian.Uint64(r.b)
	r.b = r.b[8:]
	return v
}

func (r *reader) bytes(n int) []byte {
	if r.err != nil || n < 0 || len(r.b) < n {
		r.err = errShort
		return nil
	}
	v := r.b[:n:n]
	r.b = r.b[n:]
	return v
}

func (r *reader) cstring() string {
	if r.err != nil {
		return ""
	}
	for i, c := range r.b {
		if c == 0 {
			s := string(r.b[:i])
			r.b = r.b[i+1:]
			return s
		}
	}
	r.err = errors.New("pgoutput: unterminated string")
	return ""
}

// pgEpoch is PostgreSQL's timestamp epoch.
var pgEpoch = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

// time reads microseconds since pgEpoch, without overflowing for any value.
func (r *reader) time() time.Time {
	us := int64(r.u64())
	return time.Unix(pgEpoch.Unix()+us/1e6, (us%1e6)*1e3).UTC()
}

func (r *reader) tuple() tuple {
	n := int(r.u16())
	if r.err != nil {
		return nil
	}
	// Each column takes at least one byte: refuse counts the message
	// cannot hold before allocating for them.
	if n > len(r.b) {
		r.err = errShort
		return nil
	}
	t := make(tuple, n)
	for i := range t {
		k := r.byte1()
		t[i].Kind = k
		switch k {
		case valNull, valUnchanged:
		case valText, valBinary:
			l := r.u32()
			if l > uint32(len(r.b)) {
				r.err = errShort
				return nil
			}
			t[i].Data = r.bytes(int(l))
		default:
			if r.err == nil {
				r.err = fmt.Errorf("pgoutput: unknown tuple value kind %q", k)
			}
			return nil
		}
	}
	return t
}

// decode decodes one pgoutput message. The returned message aliases data,
// which the caller must not reuse while the message is in use.
func decode(data []byte) (message, error) {
	var m message
	if len(data) == 0 {
		return m, errShort
	}
	m.Kind = data[0]
	r := &reader{b: data[1:]}
	switch m.Kind {
	case msgBegin:
		m.FinalLSN = pglogrepl.LSN(r.u64())
		m.CommitTime = r.time()
		m.Xid = r.u32()
	case msgCommit:
		r.byte1() // flags, unused
		m.CommitLSN = pglogrepl.LSN(r.u64())
		m.EndLSN = pglogrepl.LSN(r.u64())
		m.CommitTime = r.time()
	case msgOrigin:
		m.CommitLSN = pglogrepl.LSN(r.u64())
		m.Prefix = r.cstring()
	case msgRelation:
		rel := &relation{}
		rel.ID = r.u32()
		rel.Namespace = r.cstring()
		rel.Name = r.cstring()
		rel.Identity = r.byte1()
		n := int(r.u16())
		if r.err == nil && n > len(r.b) {
			r.err = errShort
		}
		if r.err == nil {
			rel.Columns = make([]relColumn, n)
			for i := range rel.Columns {
				c := &rel.Columns[i]
				c.Key = r.byte1()&1 != 0
				c.Name = r.cstring()
				c.TypeID = r.u32()
				c.Typmod = int32(r.u32())
			}
		}
		m.Relation = rel
	case msgType:
		r.u32()
		r.cstring()
		r.cstring()
	case msgInsert:
		m.RelID = r.u32()
		if k := r.byte1(); k != 'N' && r.err == nil {
			return m, fmt.Errorf("pgoutput: insert: expected new tuple, got %q", k)
		}
		m.New = r.tuple()
	case msgUpdate:
		m.RelID = r.u32()
		k := r.byte1()
		if k == 'K' || k == 'O' {
			m.OldKind = k
			m.Old = r.tuple()
			k = r.byte1()
		}
		if k != 'N' && r.err == nil {
			return m, fmt.Errorf("pgoutput: update: expected new tuple, got %q", k)
		}
		m.New = r.tuple()
	case msgDelete:
		m.RelID = r.u32()
		k := r.byte1()
		if k != 'K' && k != 'O' && r.err == nil {
			return m, fmt.Errorf("pgoutput: delete: expected old key or row, got %q", k)
		}
		m.OldKind = k
		m.Old = r.tuple()
	case msgTruncate:
		n := r.u32()
		m.TruncateOption = r.byte1()
		if r.err == nil && uint64(n)*4 > uint64(len(r.b)) {
			r.err = errShort
		}
		if r.err == nil {
			m.RelIDs = make([]uint32, n)
			for i := range m.RelIDs {
				m.RelIDs[i] = r.u32()
			}
		}
	case msgMessage:
		r.byte1() // transactional flag
		m.FinalLSN = pglogrepl.LSN(r.u64())
		m.Prefix = r.cstring()
		m.Content = r.bytes(int(r.u32()))
	default:
		return m, fmt.Errorf("pgoutput: unsupported message kind %q", m.Kind)
	}
	if r.err != nil {
		return m, fmt.Errorf("pgoutput: %c message: %w", m.Kind, r.err)
	}
	return m, nil
}
