package capture

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/rebound-dr/rebound"
)

// PendingRegions returns, per disk, the regions of a closed (released or
// killed) stream in dir that its peer may lack: every region touched by a
// write, zero or trim record in the spool that the peer has not
// acknowledged (as meta.json says: the persisted acked seq lags the real
// one, which only adds regions), and every dirty-map region. Acknowledged
// records are in the peer's journal (journal.RegionsAfter covers them).
//
// lastWrite is the time of the newest write, zero or trim record in the
// spool, acknowledged or not, or of the newest change kept only in the
// dirty map (overflow; persisted within 100 ms of it), zero if none.
//
// It only reads: neither dir nor the disks change (a torn spool tail is
// skipped, not truncated), so it is safe on the seed of a reprotect. A
// spool corrupt before its tail is an EINTERNAL error: the regions are
// then unknown and the caller must compare digests.
func PendingRegions(dir string, disks []DiskSpec) (regions [][]rebound.Region, lastWrite time.Time, err error) {
	b, err := os.ReadFile(filepath.Join(dir, "meta.json"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, time.Time{}, rebound.Errorf(rebound.ENOTFOUND, "capture: no stream in %s", dir)
	} else if err != nil {
		return nil, time.Time{}, fmt.Errorf("capture: %w", err)
	}
	var m meta
	if err := json.Unmarshal(b, &m); err != nil || m.RegionSize <= 0 {
		return nil, time.Time{}, rebound.Errorf(rebound.EINTERNAL, "capture: bad meta file in %s: %v", dir, err)
	}
	if len(m.Disks) != len(disks) {
		return nil, time.Time{}, rebound.Errorf(rebound.ECONFLICT, "capture: stream %s has %d disks, not %d", dir, len(m.Disks), len(disks))
	}
	for i, d := range disks {
		if m.Disks[i] != d.Size {
			return nil, time.Time{}, rebound.Errorf(rebound.ECONFLICT, "capture: disk %d of stream %s has %d bytes, not %d", i, dir, m.Disks[i], d.Size)
		}
	}
	regions = make([][]rebound.Region, len(disks))
	for i, d := range disks {
		rs, err := dirtyRegions(filepath.Join(dir, fmt.Sprintf("dirty.%d", i)), d.Size, m.RegionSize)
		if err != nil {
			return nil, time.Time{}, err
		}
		// Direct mode: regions of records held only in memory.
		as, err := dirtyRegions(filepath.Join(dir, fmt.Sprintf("active.%d", i)), d.Size, m.RegionSize)
		if err != nil {
			return nil, time.Time{}, err
		}
		regions[i] = append(rs, as...)
	}
	var last int64
	err = scanSpool(filepath.Join(dir, "spool"), func(seq uint64, t int64, kind rebound.RecordKind, disk uint32, off, length int64) error {
		switch kind {
		case rebound.RecordWrite, rebound.RecordZero, rebound.RecordTrim:
		default:
			return nil
		}
		if int(disk) >= len(disks) || checkRange(disks[disk].Size, off, length) != nil {
			return rebound.Errorf(rebound.EINTERNAL, "capture: spooled record %d (disk %d, %d+%d) does not fit the disks", seq, disk, off, length)
		}
		// Records the peer acknowledged are in its journal: it knows them.
		if length > 0 && seq > m.Acked {
			regions[disk] = append(regions[disk], rebound.Region{Offset: off, Length: length})
		}
		last = max(last, t)
		return nil
	})
	if err != nil {
		return nil, time.Time{}, err
	}
	for i := range regions {
		regions[i] = rebound.MergeRegions(regions[i])
	}
	// Changes kept only in the dirty map have no record; the stream kept
	// the newest one's time.
	last = max(last, m.DirtyTime)
	if last != 0 {
		lastWrite = time.Unix(0, last).UTC()
	}
	return regions, lastWrite, nil
}

// dirtyRegions reads a dirty map file without changing it; a missing map
// has no dirty region.
func dirtyRegions(path string, diskSize, regionSize int64) ([]rebound.Region, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, fmt.Errorf("capture: %w", err)
	}
	n := (diskSize + regionSize - 1) / regionSize
	if len(b) == 0 {
		return nil, nil
	}
	if int64(len(b)) != (n+7)/8 {
		return nil, rebound.Errorf(rebound.EINTERNAL, "capture: dirty map %s has %d bytes, want %d", path, len(b), (n+7)/8)
	}
	return bitRegions(b, n, regionSize, diskSize), nil
}

// The spool's wal format (see docs/design/journal.md, wal): segments
// %020d.wal of an 8-byte magic and frames
// u32 len | u32 crc32c(len bytes || payload) | payload, payload = u64 seq |
// i64 time | u8 kind | u32 disk | i64 offset | i64 length | u8 len(pk) |
// pk | data. It is parsed here, read-only, because wal.Open repairs a torn
// tail in place. TestPendingRegions writes the spool through wal, so a
// format change fails it.
const (
	spoolMagic      = "RBWAL\x00\x01\n"
	spoolFixed      = 38
	spoolMaxPayload = 256 << 20
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrSpoolDamaged marks a spool with a bad record that is not a torn tail:
// the regions its records touched are unknown, and only a compare of the
// disks (a digest resync) recovers them.
var ErrSpoolDamaged = errors.New("spool damaged")

// spoolDamage is an EINTERNAL error that is ErrSpoolDamaged.
type spoolDamage struct{ err *rebound.Error }

func (e *spoolDamage) Error() string        { return e.err.Message }
func (e *spoolDamage) Unwrap() error        { return e.err }
func (e *spoolDamage) Is(target error) bool { return target == ErrSpoolDamaged }

func damaged(format string, args ...any) error {
	return &spoolDamage{rebound.Errorf(rebound.EINTERNAL, format, args...)}
}

// scanSpool calls fn for every intact record of the spool in dir, in
// order. Only an incomplete final write is a torn tail: a bad frame in the
// last segment with nothing readable after it ends the scan. A bad frame
// followed by a readable one (a good checksum and a seq after the last
// good record), or a bad frame in any other segment, is damage: an
// EINTERNAL error wrapping ErrSpoolDamaged.
func scanSpool(dir string, fn func(seq uint64, t int64, kind rebound.RecordKind, disk uint32, off, length int64) error) error {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	} else if err != nil {
		return fmt.Errorf("capture: read spool: %w", err)
	}
	var segs []uint64
	for _, e := range ents {
		name := e.Name()
		if !strings.HasSuffix(name, ".wal") || strings.HasPrefix(name, ".") {
			continue
		}
		v, err := strconv.ParseUint(strings.TrimSuffix(name, ".wal"), 10, 64)
		if err == nil {
			segs = append(segs, v)
		}
	}
	sort.Slice(segs, func(i, j int) bool { return segs[i] < segs[j] })
	prev := uint64(0)
	for i, first := range segs {
		isLast := i == len(segs)-1
		path := filepath.Join(dir, fmt.Sprintf("%020d.wal", first))
		bad, at, err := scanSegmentFile(path, &prev, fn)
		if err != nil {
			return err
		}
		if bad == nil {
			continue
		}
		if !isLast {
			return damaged("capture: spool segment %d is damaged at offset %d (%v); the regions of its records are unknown", first, at, bad)
		}
		if next, ok := frameAfter(path, at, prev); ok {
			return damaged("capture: spool segment %d is damaged at offset %d (%v) and readable records follow at offset %d: not a torn tail; the regions of its records are unknown", first, at, bad, next)
		}
	}
	return nil
}

// scanSegmentFile scans one segment; bad says why it stopped early and at
// is the offset of the bad frame.
func scanSegmentFile(path string, prev *uint64, fn func(uint64, int64, rebound.RecordKind, uint32, int64, int64) error) (bad error, at int64, err error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, fmt.Errorf("capture: read spool: %w", err)
	}
	defer f.Close()
	r := bufio.NewReaderSize(f, 1<<20)
	var hdr [8]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil || string(hdr[:]) != spoolMagic {
		return fmt.Errorf("bad segment header"), 0, nil
	}
	var payload []byte
	off := int64(len(hdr))
	for {
		var h [8]byte
		if _, err := io.ReadFull(r, h[:]); err == io.EOF {
			return nil, off, nil
		} else if err != nil {
			return fmt.Errorf("short frame: %v", err), off, nil
		}
		plen := binary.LittleEndian.Uint32(h[0:])
		if plen < spoolFixed || plen > spoolMaxPayload {
			return fmt.Errorf("bad record length %d", plen), off, nil
		}
		if cap(payload) < int(plen) {
			payload = make([]byte, plen)
		}
		p := payload[:plen]
		if _, err := io.ReadFull(r, p); err != nil {
			return fmt.Errorf("short record: %v", err), off, nil
		}
		if !frameSumOK(h[:], p) {
			return fmt.Errorf("checksum mismatch"), off, nil
		}
		seq := binary.LittleEndian.Uint64(p[0:])
		if seq <= *prev {
			return fmt.Errorf("seq %d does not follow %d", seq, *prev), off, nil
		}
		*prev = seq
		if err := fn(seq, int64(binary.LittleEndian.Uint64(p[8:])), rebound.RecordKind(p[16]),
			binary.LittleEndian.Uint32(p[17:]), int64(binary.LittleEndian.Uint64(p[21:])), int64(binary.LittleEndian.Uint64(p[29:]))); err != nil {
			return nil, off, err
		}
		off += int64(len(h)) + int64(plen)
	}
}

func frameSumOK(h, p []byte) bool {
	crc := crc32.Update(0, castagnoli, h[0:4])
	return crc32.Update(crc, castagnoli, p) == binary.LittleEndian.Uint32(h[4:])
}

// frameAfter looks for a good frame whose seq follows prev anywhere after
// the bad one at off (byte by byte, cheap length and seq tests before the
// checksum), as wal.Open does: one means the bad frame is damage.
func frameAfter(path string, off int64, prev uint64) (int64, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	for o := off + 1; o+8+spoolFixed <= int64(len(b)); o++ {
		plen := int64(binary.LittleEndian.Uint32(b[o:]))
		if plen < spoolFixed || plen > spoolMaxPayload || o+8+plen > int64(len(b)) {
			continue
		}
		if seq := binary.LittleEndian.Uint64(b[o+8:]); seq <= prev {
			continue
		}
		if frameSumOK(b[o:o+8], b[o+8:o+8+plen]) {
			return o, true
		}
	}
	return 0, false
}
