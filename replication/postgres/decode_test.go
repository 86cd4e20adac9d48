package postgres

import (
	"bytes"
	"encoding/binary"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
)

// Encoders for pgoutput messages, as the server writes them.

func encU16(b []byte, v uint16) []byte { return binary.BigEndian.AppendUint16(b, v) }
func encU32(b []byte, v uint32) []byte { return binary.BigEndian.AppendUint32(b, v) }
func encU64(b []byte, v uint64) []byte { return binary.BigEndian.AppendUint64(b, v) }
func encStr(b []byte, s string) []byte { return append(append(b, s...), 0) }

func encTuple(b []byte, t tuple) []byte {
	b = encU16(b, uint16(len(t)))
	for _, v := range t {
		b = append(b, v.Kind)
		if v.Kind == valText || v.Kind == valBinary {
			b = encU32(b, uint32(len(v.Data)))
			b = append(b, v.Data...)
		}
	}
	return b
}

func encBegin(final pglogrepl.LSN, at time.Time, xid uint32) []byte {
	b := encU64([]byte{msgBegin}, uint64(final))
	b = encU64(b, uint64(at.Sub(pgEpoch).Microseconds()))
	return encU32(b, xid)
}

func encCommit(commit, end pglogrepl.LSN, at time.Time) []byte {
	b := encU64([]byte{msgCommit, 0}, uint64(commit))
	b = encU64(b, uint64(end))
	return encU64(b, uint64(at.Sub(pgEpoch).Microseconds()))
}

func encRelation(r *relation) []byte {
	b := encU32([]byte{msgRelation}, r.ID)
	b = encStr(b, r.Namespace)
	b = encStr(b, r.Name)
	b = append(b, r.Identity)
	b = encU16(b, uint16(len(r.Columns)))
	for _, c := range r.Columns {
		flag := byte(0)
		if c.Key {
			flag = 1
		}
		b = append(b, flag)
		b = encStr(b, c.Name)
		b = encU32(b, c.TypeID)
		b = encU32(b, uint32(c.Typmod))
	}
	return b
}

func encInsert(rel uint32, t tuple) []byte {
	return encTuple(append(encU32([]byte{msgInsert}, rel), 'N'), t)
}

func encUpdate(rel uint32, oldKind byte, old, t tuple) []byte {
	b := encU32([]byte{msgUpdate}, rel)
	if oldKind != 0 {
		b = encTuple(append(b, oldKind), old)
	}
	return encTuple(append(b, 'N'), t)
}

func encDelete(rel uint32, oldKind byte, old tuple) []byte {
	return encTuple(append(encU32([]byte{msgDelete}, rel), oldKind), old)
}

func encTruncate(opt byte, rels ...uint32) []byte {
	b := encU32([]byte{msgTruncate}, uint32(len(rels)))
	b = append(b, opt)
	for _, r := range rels {
		b = encU32(b, r)
	}
	return b
}

func txt(s string) value { return value{Kind: valText, Data: []byte(s)} }

var (
	null      = value{Kind: valNull}
	unchanged = value{Kind: valUnchanged}
)

func sampleMessages() [][]byte {
	at := time.Date(2025, 3, 4, 5, 6, 7, 123456000, time.UTC)
	rel := &relation{ID: 16384, Namespace: "public", Name: "t", Identity: 'd', Columns: []relColumn{
		{Key: true, Name: "id", TypeID: 23, Typmod: -1}, {Name: "v", TypeID: 25, Typmod: -1}, {Name: "n", TypeID: 1700, Typmod: 655366}}}
	return [][]byte{
		encBegin(0x16B3748, at, 731),
		encRelation(rel),
		encInsert(16384, tuple{txt("1"), txt("a\x00b"), null}),
		encUpdate(16384, 0, nil, tuple{txt("1"), unchanged, txt("1.50")}),
		encUpdate(16384, 'K', tuple{txt("1"), null, null}, tuple{txt("2"), txt(""), null}),
		encUpdate(16384, 'O', tuple{txt("2"), txt(""), null}, tuple{txt("2"), txt("x"), null}),
		encDelete(16384, 'K', tuple{txt("2"), null, null}),
		encDelete(16384, 'O', tuple{txt("2"), txt("x"), null}),
		encTruncate(TruncateRestartIdentity, 16384, 16390),
		encCommit(0x16B3748, 0x16B3780, at),
	}
}

// TruncateRestartIdentity mirrors pglogrepl's option bit.
const TruncateRestartIdentity = pglogrepl.TruncateOptionRestartIdentity

func TestDecodeRoundTripsAndAgreesWithPglogrepl(t *testing.T) {
	for _, raw := range sampleMessages() {
		m, err := decode(bytes.Clone(raw))
		if err != nil {
			t.Fatalf("decode %q: %v", raw[0], err)
		}
		compareWithPglogrepl(t, raw, m)
	}
	m, _ := decode(sampleMessages()[0])
	if m.FinalLSN != 0x16B3748 || m.Xid != 731 || !m.CommitTime.Equal(time.Date(2025, 3, 4, 5, 6, 7, 123456000, time.UTC)) {
		t.Errorf("begin = %+v", m)
	}
	m, _ = decode(sampleMessages()[3])
	if m.New[1].Kind != valUnchanged || string(m.New[2].Data) != "1.50" {
		t.Errorf("update = %+v", m)
	}
}

// compareWithPglogrepl checks our decoding against pglogrepl's for the
// fields both have. pglogrepl does not bounds-check, so its panics on
// malformed input are not failures.
func compareWithPglogrepl(t *testing.T, raw []byte, m message) {
	t.Helper()
	var theirs pglogrepl.Message
	func() {
		defer func() { _ = recover() }()
		theirs, _ = pglogrepl.Parse(bytes.Clone(raw))
	}()
	if theirs == nil {
		return
	}
	sameTuple := func(name string, ours tuple, td *pglogrepl.TupleData) {
		if td == nil {
			if ours != nil {
				t.Errorf("%s: pglogrepl has no tuple, we have %v", name, ours)
			}
			return
		}
		if len(td.Columns) != len(ours) {
			t.Fatalf("%s: %d columns, pglogrepl %d", name, len(ours), len(td.Columns))
		}
		for i, c := range td.Columns {
			if c.DataType != ours[i].Kind || !bytes.Equal(c.Data, ours[i].Data) {
				t.Errorf("%s column %d: %q %q, pglogrepl %q %q", name, i, ours[i].Kind, ours[i].Data, c.DataType, c.Data)
			}
		}
	}
	// pglogrepl's time conversion overflows past year 2262; compare times
	// only where it cannot.
	sameTime := func(a, b time.Time) bool {
		if a.Year() < 1800 || a.Year() > 2200 {
			return true
		}
		return a.Equal(b)
	}
	switch th := theirs.(type) {
	case *pglogrepl.BeginMessage:
		if th.FinalLSN != m.FinalLSN || th.Xid != m.Xid || !sameTime(m.CommitTime, th.CommitTime) {
			t.Errorf("begin %+v vs %+v", m, th)
		}
	case *pglogrepl.CommitMessage:
		if th.CommitLSN != m.CommitLSN || th.TransactionEndLSN != m.EndLSN || !sameTime(m.CommitTime, th.CommitTime) {
			t.Errorf("commit %+v vs %+v", m, th)
		}
	case *pglogrepl.RelationMessage:
		r := m.Relation
		if th.RelationID != r.ID || th.Namespace != r.Namespace || th.RelationName != r.Name || th.ReplicaIdentity != r.Identity || len(th.Columns) != len(r.Columns) {
			t.Fatalf("relation %+v vs %+v", r, th)
		}
		for i, c := range th.Columns {
			o := r.Columns[i]
			if c.Name != o.Name || (c.Flags&1 != 0) != o.Key || c.DataType != o.TypeID || c.TypeModifier != o.Typmod {
				t.Errorf("relation column %d: %+v vs %+v", i, o, c)
			}
		}
	case *pglogrepl.InsertMessage:
		if th.RelationID != m.RelID {
			t.Errorf("insert rel %d vs %d", m.RelID, th.RelationID)
		}
		sameTuple("insert", m.New, th.Tuple)
	case *pglogrepl.UpdateMessage:
		if th.RelationID != m.RelID || th.OldTupleType != m.OldKind {
			t.Errorf("update %+v vs %+v", m, th)
		}
		sameTuple("update old", m.Old, th.OldTuple)
		sameTuple("update new", m.New, th.NewTuple)
	case *pglogrepl.DeleteMessage:
		if th.RelationID != m.RelID || th.OldTupleType != m.OldKind {
			t.Errorf("delete %+v vs %+v", m, th)
		}
		sameTuple("delete", m.Old, th.OldTuple)
	case *pglogrepl.TruncateMessage:
		if th.Option != m.TruncateOption || len(th.RelationIDs) != len(m.RelIDs) {
			t.Fatalf("truncate %+v vs %+v", m, th)
		}
		for i := range th.RelationIDs {
			if th.RelationIDs[i] != m.RelIDs[i] {
				t.Errorf("truncate rel %d", i)
			}
		}
	}
}

func TestDecodeRejectsTruncatedMessages(t *testing.T) {
	for _, raw := range sampleMessages() {
		for n := 1; n < len(raw); n++ {
			if _, err := decode(bytes.Clone(raw[:n])); err == nil && raw[0] != msgCommit {
				// A commit cut after its fields is still whole; the
				// others must notice a missing byte.
				t.Errorf("%q cut to %d of %d bytes decoded without error", raw[0], n, len(raw))
			}
		}
	}
}

func FuzzDecode(f *testing.F) {
	for _, raw := range sampleMessages() {
		f.Add(raw)
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		m, err := decode(bytes.Clone(raw))
		if err != nil {
			return
		}
		compareWithPglogrepl(t, raw, m)
	})
}
