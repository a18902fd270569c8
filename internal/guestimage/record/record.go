// Package record is the on-disk format of the test guest's records file
// (/data/records): fixed-size records, numbered from 1, record seq at offset
// (seq-1)*Size. The guest writes them (cmd/rebound-guest) and verifies them at
// boot; host tests may verify the same bytes read over NBD or from an image.
//
// Layout of one record, little endian:
//
//	0:8      Magic
//	8:16     seq
//	16:24    boot id of the boot that wrote it
//	24:32    unix nanoseconds when written
//	32:4064  payload, a function of seq only (see Payload)
//	4064:    SHA-256 of bytes 0:4064
package record

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

const (
	Size       = 4096
	Magic      = "RBGREC01"
	payloadOff = 32
	sumOff     = Size - sha256.Size
)

// Encode fills buf (len Size) with record seq.
func Encode(buf []byte, seq, boot uint64, unixNano int64) {
	_ = buf[Size-1]
	copy(buf[0:8], Magic)
	binary.LittleEndian.PutUint64(buf[8:], seq)
	binary.LittleEndian.PutUint64(buf[16:], boot)
	binary.LittleEndian.PutUint64(buf[24:], uint64(unixNano))
	Payload(buf[payloadOff:sumOff], seq)
	sum := sha256.Sum256(buf[:sumOff])
	copy(buf[sumOff:], sum[:])
}

// Payload fills p with bytes derived from seq (splitmix64 seeded by seq), so a
// record that is intact but misplaced or stale is still caught.
func Payload(p []byte, seq uint64) {
	x := seq * 0x9E3779B97F4A7C15
	var w [8]byte
	for i := 0; i < len(p); i += 8 {
		x += 0x9E3779B97F4A7C15
		z := x
		z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
		z = (z ^ (z >> 27)) * 0x94D049BB133111EB
		z ^= z >> 31
		binary.LittleEndian.PutUint64(w[:], z)
		copy(p[i:], w[:])
	}
}

// Check reports why buf is not a valid record number seq, or nil.
func Check(buf []byte, seq uint64) error {
	if len(buf) != Size {
		return fmt.Errorf("record is %d bytes, want %d", len(buf), Size)
	}
	if string(buf[0:8]) != Magic {
		return fmt.Errorf("bad magic %q", buf[0:8])
	}
	sum := sha256.Sum256(buf[:sumOff])
	if !bytes.Equal(sum[:], buf[sumOff:]) {
		return errors.New("checksum mismatch")
	}
	if got := binary.LittleEndian.Uint64(buf[8:]); got != seq {
		return fmt.Errorf("holds seq %d", got)
	}
	want := make([]byte, sumOff-payloadOff)
	Payload(want, seq)
	if !bytes.Equal(buf[payloadOff:sumOff], want) {
		return errors.New("payload does not match its seq")
	}
	return nil
}

// Boot returns the boot id stored in a record.
func Boot(buf []byte) uint64 { return binary.LittleEndian.Uint64(buf[16:]) }

// Verdict is the result of verifying a records file.
type Verdict struct {
	Records  uint64 // valid records, 1..Records
	ZeroTail uint64 // all-zero whole records after the last valid one
	TornTail int    // bytes of a trailing partial record
	Corrupt  error  // first bad record (*CorruptError), nil when ok
}

// OK reports whether every record is intact. A zero or torn tail is not an
// error: it is a record whose write was cut before its fsync returned.
func (v Verdict) OK() bool { return v.Corrupt == nil }

// Line is the guest's console verdict, as tests match it.
func (v Verdict) Line() string {
	if v.Corrupt != nil {
		return "REBOUND-GUEST CORRUPT " + v.Corrupt.Error()
	}
	s := fmt.Sprintf("REBOUND-GUEST verified %d records, last seq %d, ok", v.Records, v.Records)
	if v.ZeroTail > 0 || v.TornTail > 0 {
		s += fmt.Sprintf(" (unsynced tail: %d zero records, %d torn bytes)", v.ZeroTail, v.TornTail)
	}
	return s
}

// CorruptError names the first record that failed.
type CorruptError struct {
	Record uint64 // 1-based index, the seq it should hold
	Reason string
}

func (e *CorruptError) Error() string {
	return fmt.Sprintf("at record %d: %s", e.Record, e.Reason)
}

// Verify reads a records file: every whole record must hold its own seq and
// checksum, up to an optional tail of all-zero records and a partial record.
// A valid record after a zero one is corruption. Read errors are returned.
func Verify(r io.Reader) (Verdict, error) {
	var v Verdict
	buf := make([]byte, Size)
	for k := uint64(1); ; k++ {
		n, err := io.ReadFull(r, buf)
		if err == io.EOF {
			return v, nil
		}
		if err == io.ErrUnexpectedEOF {
			if v.Corrupt == nil {
				v.TornTail = n
			}
			return v, nil
		}
		if err != nil {
			return v, err
		}
		if v.Corrupt != nil {
			continue
		}
		if isZero(buf) {
			v.ZeroTail++
			continue
		}
		if v.ZeroTail > 0 {
			v.Corrupt = &CorruptError{Record: k - v.ZeroTail, Reason: fmt.Sprintf("all zero, yet record %d after it is not", k)}
			v.ZeroTail = 0
			continue
		}
		if err := Check(buf, k); err != nil {
			v.Corrupt = &CorruptError{Record: k, Reason: err.Error()}
			continue
		}
		v.Records = k
	}
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
