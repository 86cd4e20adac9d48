package integration

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"path/filepath"
	"time"
)

// A copied PostgreSQL template would share its system identifier with every
// other copy, and tools (and the agent's own pre-checks) use that identifier
// to tell clusters apart. setSystemIdentifier gives a copy its own.
//
// The identifier is the first field of pg_control (ControlFileData starts
// with uint64 system_identifier and ends with a CRC-32C of everything before
// the CRC) and sits in the long page header at the start of every WAL
// segment (XLogLongPageHeaderData: a 24-byte standard header, then uint64
// xlp_sysid). Rather than hard-coding the struct size of one major version,
// the CRC's offset is found by checking where the stored CRC matches, and
// every location must hold the old identifier before anything is written:
// on any surprise it returns an error and changes nothing, and the caller
// falls back to initdb.

const (
	pgControlFile   = "global/pg_control"
	xlpLongHeader   = 0x0002 // XLP_LONG_HEADER in xlp_info
	xlpSysidOffset  = 24     // offsetof(XLogLongPageHeaderData, xlp_sysid)
	maxControlBytes = 1024   // ControlFileData is ~300 bytes in every version
)

var crc32c = crc32.MakeTable(crc32.Castagnoli)

// newSystemIdentifier makes an identifier the way initdb does (seconds in
// the high half), with random low bits.
func newSystemIdentifier() uint64 {
	return uint64(time.Now().Unix())<<32 | uint64(rand.Uint32())
}

// setSystemIdentifier replaces the system identifier of the cleanly shut
// down cluster in dataDir with id.
func setSystemIdentifier(dataDir string, id uint64) error {
	ctlPath := filepath.Join(dataDir, pgControlFile)
	ctl, err := os.ReadFile(ctlPath)
	if err != nil {
		return err
	}
	crcOff, err := controlCRCOffset(ctl)
	if err != nil {
		return err
	}
	old := binary.NativeEndian.Uint64(ctl[:8])

	walDir := filepath.Join(dataDir, "pg_wal")
	entries, err := os.ReadDir(walDir)
	if err != nil {
		return err
	}
	var segments []string
	for _, e := range entries {
		if !e.Type().IsRegular() || !isWALSegmentName(e.Name()) {
			continue
		}
		p := filepath.Join(walDir, e.Name())
		hdr := make([]byte, xlpSysidOffset+8)
		if err := readAt(p, hdr, 0); err != nil {
			return err
		}
		if binary.NativeEndian.Uint16(hdr[2:4])&xlpLongHeader == 0 {
			continue // preallocated, never written
		}
		if got := binary.NativeEndian.Uint64(hdr[xlpSysidOffset:]); got != old {
			return fmt.Errorf("wal segment %s: system identifier %d, pg_control has %d", e.Name(), got, old)
		}
		segments = append(segments, p)
	}
	if len(segments) == 0 {
		return errors.New("no wal segment with a long page header")
	}

	// All checks passed: write.
	var idBytes [8]byte
	binary.NativeEndian.PutUint64(idBytes[:], id)
	for _, p := range segments {
		if err := writeAt(p, idBytes[:], xlpSysidOffset); err != nil {
			return err
		}
	}
	copy(ctl[:8], idBytes[:])
	binary.NativeEndian.PutUint32(ctl[crcOff:], crc32.Checksum(ctl[:crcOff], crc32c))
	return writeAt(ctlPath, ctl, 0)
}

// controlCRCOffset finds the 4-byte-aligned offset at which pg_control
// stores the CRC-32C of the bytes before it.
func controlCRCOffset(ctl []byte) (int, error) {
	var crc uint32
	prev := 0
	for off := 16; off+4 <= len(ctl) && off < maxControlBytes; off += 4 {
		crc = crc32.Update(crc, crc32c, ctl[prev:off])
		prev = off
		if crc == binary.NativeEndian.Uint32(ctl[off:]) {
			return off, nil
		}
	}
	return 0, errors.New("pg_control: no valid CRC found")
}

func isWALSegmentName(n string) bool {
	if len(n) != 24 {
		return false
	}
	for _, c := range n {
		if !('0' <= c && c <= '9' || 'A' <= c && c <= 'F') {
			return false
		}
	}
	return true
}

func readAt(path string, b []byte, off int64) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = f.ReadAt(b, off)
	return err
}

func writeAt(path string, b []byte, off int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteAt(b, off); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
