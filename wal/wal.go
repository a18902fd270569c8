// Package wal is a segmented, checksummed, append-only log of
// rebound.Record, in the style of etcd's wal.
//
// A log is a directory of segment files named by the sequence number of
// their first record (%020d.wal). Each segment starts with an 8-byte magic
// and holds framed records:
//
//	u32 payload length | u32 crc32c(length bytes || payload) | payload
//	payload: u64 seq | i64 time | u8 kind | u32 disk | i64 offset |
//	         i64 length | u8 len(pointKind) | pointKind | data
//
// All integers are little endian. A record's Location is the file offset
// of its data, so journal reads can pread data without parsing the frame.
package wal

import (
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/rebound-dr/rebound/internal/fsutil"
	"hash/crc32"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/rebound-dr/rebound"
	"golang.org/x/sys/unix"
)

// ErrCorrupt means a record failed its checksum or framing somewhere other
// than the torn tail of the last segment. Such a record is never served.
var ErrCorrupt = errors.New("wal: corrupt record")

// ErrClosed is returned by operations on a closed log.
var ErrClosed = errors.New("wal: log closed")

// ErrTruncated is returned by ReadData for a location in a segment that
// TruncateFront removed.
var ErrTruncated = errors.New("wal: segment truncated")

const (
	magic          = "RBWAL\x00\x01\n"
	segHeaderSize  = int64(len(magic))
	frameSize      = 8                         // length + crc
	fixedSize      = 8 + 8 + 1 + 4 + 8 + 8 + 1 // payload fields before point kind
	maxPayload     = 256 << 20                 // sanity bound on a frame's length
	defaultSegSize = 64 << 20                  //
	segSuffix      = ".wal"                    //
	maxKeptBuf     = 16 << 20                  // append buffer kept between calls
	inlineData     = 64 << 10                  // smaller record data is copied into the append buffer
	tmpPrefix      = ".tmp-"                   //
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Options configure a Log.
type Options struct {
	// SegmentSize: a segment is cut once it passes this many bytes.
	// Default 64 MiB.
	SegmentSize int64
	// Logger receives warnings such as a truncated torn tail. Default
	// slog.Default().
	Logger *slog.Logger
	// Direct appends with O_DIRECT where the filesystem allows it: each
	// append is staged in aligned memory and written from the start of its
	// first block, the block holding the previous tail rewritten with the
	// same bytes, so the segment file ends in zero padding past its last
	// record until it is cut or closed (Open drops such padding as a torn
	// tail). On a VM, writing fresh page-cache pages costs 1-3 CPU-s per
	// GiB against ~0.1 staged and direct, and the journal only appends
	// fresh bytes. Reads stay buffered (the kernel keeps them coherent).
	Direct bool
	// Visit, if set, is called by Open for every good record in log
	// order, up to (not including) the first corrupt or torn one, so a
	// caller can build its state from the same pass that verifies the
	// log. rec.Data is only valid during the call. An error fails Open.
	Visit func(rec *rebound.Record, loc Location) error
}

// Location is where a record's Data starts in its segment file.
type Location struct {
	Segment uint64 // the segment's name: the seq of its first record
	Offset  int64  // byte offset of the data in the segment file
}

type segment struct {
	first uint64 // name
	last  uint64 // seq of the last record, 0 if none
	path  string
	f     *os.File
	size  int64 // committed bytes; readers never read past this
	refs  int   // the log's own ref plus one per reader/read in flight
	// next is the name of the following segment, 0 while this is the last;
	// removed is set by TruncateFront. A reader leaving a removed segment
	// can tell whether its successor is still there.
	next    uint64
	removed bool
	// corrupt is set when a bad record was found at offset size: readers
	// reaching the end of this segment get ErrCorrupt instead of moving on.
	corrupt error
	// dio is the O_DIRECT handle appends use (Options.Direct), nil until
	// the first direct append; padded says the file may end in padding.
	dio    *os.File
	padded bool
}

// Log is an append-only record log. Methods are safe for concurrent use.
type Log struct {
	dir    string
	opts   Options
	logger *slog.Logger

	syncMu sync.Mutex // serializes Sync calls

	mu       sync.Mutex
	segs     []*segment
	buf      []byte
	iov      [][]byte
	last     uint64
	size     int64
	corrupt  error
	tailLast uint64 // highest readable seq past damage in the last segment
	err      error  // sticky error after a failed write that could not be undone
	dirDirty bool   // a segment was created or removed since the last dir fsync
	closed   bool
	// direct staging (Options.Direct): stage is aligned memory kept between
	// appends; tail holds the bytes of tailSeg's last partial block.
	direct   bool
	stage    []byte
	tail     []byte
	tailSeg  *segment
	visiting bool // Open is calling opts.Visit
}

// Open opens (creating if needed) the log in dir. It verifies every
// record. A bad record at the tail of the last segment is a torn write and
// is truncated away with everything after it. A bad record elsewhere makes
// Corrupt() return an error wrapping ErrCorrupt; readers stop before it.
func Open(dir string, opts Options) (*Log, error) {
	if opts.SegmentSize <= 0 {
		opts.SegmentSize = defaultSegSize
	}
	l := &Log{dir: dir, opts: opts, logger: opts.Logger, visiting: opts.Visit != nil, direct: opts.Direct}
	if l.logger == nil {
		l.logger = slog.Default()
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("wal: %w", err)
	}
	names, err := listSegments(dir)
	if err != nil {
		return nil, err
	}
	for i, first := range names {
		isLast := i == len(names)-1
		seg, err := l.openSegment(first, isLast)
		if err != nil {
			l.closeAll()
			return nil, err
		}
		if seg == nil {
			continue // empty last segment removed
		}
		if seg.corrupt != nil {
			l.visiting = false // nothing after a bad record is visited
		}
		if n := len(l.segs); n > 0 {
			l.segs[n-1].next = seg.first
		}
		l.segs = append(l.segs, seg)
		l.size += seg.size
		if seg.last != 0 {
			l.last = seg.last
		}
		if l.tailLast > l.last {
			// Damage in the last segment: new records go after the
			// readable ones past it, never under their seqs.
			l.last = l.tailLast
		}
	}
	l.visiting = false
	return l, nil
}

func (l *Log) setCorrupt(seg *segment, off int64, err error) {
	if l.corrupt == nil {
		l.corrupt = err
	}
	if seg.corrupt == nil {
		seg.corrupt = err
	}
	l.logger.Error("wal: corrupt record", "dir", l.dir, "segment", seg.first, "offset", off, "err", err)
}

func listSegments(dir string) ([]uint64, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("wal: %w", err)
	}
	var names []uint64
	for _, e := range ents {
		n := e.Name()
		if strings.HasPrefix(n, tmpPrefix) {
			os.Remove(filepath.Join(dir, n)) // a segment creation that never got renamed
			continue
		}
		if !strings.HasSuffix(n, segSuffix) {
			continue
		}
		v, err := strconv.ParseUint(strings.TrimSuffix(n, segSuffix), 10, 64)
		if err != nil {
			continue
		}
		names = append(names, v)
	}
	sort.Slice(names, func(i, j int) bool { return names[i] < names[j] })
	return names, nil
}

func segName(first uint64) string { return fmt.Sprintf("%020d%s", first, segSuffix) }

// openSegment scans one segment. It returns nil for an empty last segment,
// which it removes.
func (l *Log) openSegment(first uint64, isLast bool) (*segment, error) {
	path := filepath.Join(l.dir, segName(first))
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("wal: %w", err)
	}
	seg := &segment{first: first, path: path, f: f, refs: 1}
	if l.last != 0 && first <= l.last {
		// Out of order with the previous segment: serve nothing of it.
		seg.size = segHeaderSize
		l.setCorrupt(seg, segHeaderSize, fmt.Errorf("%w: segment %s starts at or before seq %d of the previous one", ErrCorrupt, segName(first), l.last))
		return seg, nil
	}
	end, badErr, err := scanSegment(f, first, func(rec *rebound.Record, loc Location, _ int64) error {
		seg.last = rec.Seq
		if l.visiting {
			return l.opts.Visit(rec, loc)
		}
		return nil
	})
	if err != nil {
		f.Close()
		return nil, err
	}
	seg.size = end
	if badErr != nil && isLast {
		// A torn tail is an incomplete final write: nothing readable
		// follows it. A bad record with good ones after it is damage, and
		// cutting there would silently drop acknowledged records.
		prev := seg.last
		if prev == 0 {
			prev = first - 1
		}
		if at, last, ok := findRecordAfter(f, first, end, prev); ok {
			l.setCorrupt(seg, end, fmt.Errorf("%w: segment %s offset %d: %v; readable records follow at offset %d (seq %d)", ErrCorrupt, segName(first), end, badErr, at, last))
			l.tailLast = last
			badErr = nil
		}
	}
	if badErr != nil {
		if isLast {
			st, _ := f.Stat()
			var fileSize int64
			if st != nil {
				fileSize = st.Size()
			}
			if zeroPadding(f, end, fileSize) {
				l.logger.Debug("wal: dropping a direct append's zero padding", "segment", path, "offset", end, "bytes", fileSize-end)
			} else {
				l.logger.Warn("wal: truncating torn tail", "segment", path, "offset", end, "dropped_bytes", fileSize-end, "reason", badErr)
			}
			if end < segHeaderSize {
				end = 0
			}
			if err := f.Truncate(end); err != nil {
				f.Close()
				return nil, fmt.Errorf("wal: truncate torn tail: %w", err)
			}
			if err := f.Sync(); err != nil {
				f.Close()
				return nil, fmt.Errorf("wal: %w", err)
			}
			seg.size = end
		} else {
			l.setCorrupt(seg, end, fmt.Errorf("%w: segment %s offset %d: %v", ErrCorrupt, segName(first), end, badErr))
		}
	}
	if seg.last == 0 {
		if isLast && seg.corrupt == nil {
			// Created but nothing landed before a crash: drop it so the
			// next append recreates it under the right name.
			f.Close()
			if err := os.Remove(path); err != nil {
				return nil, fmt.Errorf("wal: %w", err)
			}
			l.dirDirty = true
			return nil, nil
		}
		if seg.corrupt == nil {
			l.setCorrupt(seg, seg.size, fmt.Errorf("%w: segment %s holds no record", ErrCorrupt, segName(first)))
		}
	}
	return seg, nil
}

// scanSegment reads records from the start of f and calls fn for each good
// one (with the record's start offset). It returns the end of the last
// good record and, if scanning stopped early, why (badErr). err is an I/O
// failure. fn's record's Data aliases a buffer valid only during the call.
func scanSegment(f *os.File, first uint64, fn func(*rebound.Record, Location, int64) error) (end int64, badErr, err error) {
	st, err := f.Stat()
	if err != nil {
		return 0, nil, fmt.Errorf("wal: %w", err)
	}
	fileSize := st.Size()
	var hdr [segHeaderSize]byte
	if n, _ := f.ReadAt(hdr[:], 0); n < len(hdr) || string(hdr[:]) != magic {
		return 0, fmt.Errorf("bad segment header"), nil
	}
	r := newBufReader(f, fileSize)
	off := segHeaderSize
	prev := uint64(0)
	for off < fileSize {
		rec, loc, n, bad := r.record(first, off, false)
		if bad != nil {
			return off, bad, nil
		}
		if prev == 0 && rec.Seq != first {
			return off, fmt.Errorf("first record has seq %d, segment is named %d", rec.Seq, first), nil
		}
		if prev != 0 && rec.Seq <= prev {
			return off, fmt.Errorf("seq %d does not follow %d", rec.Seq, prev), nil
		}
		prev = rec.Seq
		if err := fn(rec, loc, off); err != nil {
			return off, nil, err
		}
		off += n
	}
	return off, nil, nil
}

// findRecordAfter looks for a good record past a bad one at off: a frame
// whose checksum holds and whose seq follows prev. It returns the first
// such record's offset and the seq of the last good record of the run that
// starts there. Only Open calls it, on a bad record in the last segment.
func findRecordAfter(f *os.File, first uint64, off int64, prev uint64) (at int64, last uint64, ok bool) {
	st, err := f.Stat()
	if err != nil {
		return 0, 0, false
	}
	size := st.Size()
	r := newBufReader(f, size)
	for o := off + 1; o+frameSize+fixedSize <= size; o++ {
		h, err := r.bytes(o, frameSize+fixedSize)
		if err != nil {
			return 0, 0, false
		}
		// Cheap tests first: a plausible length and a seq after prev.
		plen := binary.LittleEndian.Uint32(h[0:4])
		seq := binary.LittleEndian.Uint64(h[frameSize:])
		if plen < fixedSize || plen > maxPayload || o+frameSize+int64(plen) > size || seq <= prev || seq-prev > 1<<32 {
			continue
		}
		rec, _, n, bad := r.record(first, o, false)
		if bad != nil {
			continue
		}
		last = rec.Seq
		for p := o + n; p < size; p += n {
			next, _, m, bad := r.record(first, p, false)
			if bad != nil || next.Seq <= last {
				break
			}
			last, n = next.Seq, m
		}
		return o, last, true
	}
	return 0, 0, false
}

// bufReader reads records from a segment file through a read-ahead buffer.
type bufReader struct {
	f      *os.File
	limit  int64
	buf    []byte
	bufOff int64 // file offset of buf[0]
}

func newBufReader(f *os.File, limit int64) *bufReader {
	return &bufReader{f: f, limit: limit, bufOff: -1}
}

// bytes returns n bytes at off, valid until the next call.
func (r *bufReader) bytes(off int64, n int) ([]byte, error) {
	if off+int64(n) > r.limit {
		return nil, fmt.Errorf("record past end of segment at offset %d", off)
	}
	if r.bufOff >= 0 && off >= r.bufOff && off+int64(n) <= r.bufOff+int64(len(r.buf)) {
		s := off - r.bufOff
		return r.buf[s : s+int64(n)], nil
	}
	want := max(n, 1<<20)
	if rem := r.limit - off; int64(want) > rem {
		want = int(rem)
	}
	if cap(r.buf) < want {
		r.buf = make([]byte, want)
	}
	r.buf = r.buf[:want]
	m, err := r.f.ReadAt(r.buf, off)
	if m < n {
		r.bufOff = -1
		if err == nil {
			err = fmt.Errorf("short read")
		}
		return nil, fmt.Errorf("read at %d: %w", off, err)
	}
	r.buf = r.buf[:m]
	r.bufOff = off
	return r.buf[:n], nil
}

// record decodes the record at off. bad is non-nil when the bytes there do
// not form a good record; n is the record's size on disk.
func (r *bufReader) record(segFirst uint64, off int64, copyData bool) (rec *rebound.Record, loc Location, n int64, bad error) {
	h, err := r.bytes(off, frameSize)
	if err != nil {
		return nil, loc, 0, err
	}
	plen := binary.LittleEndian.Uint32(h[0:4])
	sum := binary.LittleEndian.Uint32(h[4:8])
	if plen < fixedSize || plen > maxPayload {
		return nil, loc, 0, fmt.Errorf("bad record length %d at offset %d", plen, off)
	}
	b, err := r.bytes(off, frameSize+int(plen))
	if err != nil {
		return nil, loc, 0, err
	}
	crc := crc32.Update(0, castagnoli, b[0:4])
	crc = crc32.Update(crc, castagnoli, b[frameSize:])
	if crc != sum {
		return nil, loc, 0, fmt.Errorf("checksum mismatch at offset %d", off)
	}
	p := b[frameSize:]
	rec = &rebound.Record{
		Seq:    binary.LittleEndian.Uint64(p[0:]),
		Time:   int64(binary.LittleEndian.Uint64(p[8:])),
		Kind:   rebound.RecordKind(p[16]),
		Disk:   binary.LittleEndian.Uint32(p[17:]),
		Offset: int64(binary.LittleEndian.Uint64(p[21:])),
		Length: int64(binary.LittleEndian.Uint64(p[29:])),
	}
	pk := int(p[37])
	if fixedSize+pk > len(p) {
		return nil, loc, 0, fmt.Errorf("bad point kind length at offset %d", off)
	}
	rec.PointKind = rebound.PointKind(p[fixedSize : fixedSize+pk])
	if d := p[fixedSize+pk:]; len(d) > 0 && copyData {
		rec.Data = append([]byte(nil), d...)
	} else if len(d) > 0 {
		rec.Data = d
	}
	loc = Location{Segment: segFirst, Offset: off + frameSize + int64(fixedSize+pk)}
	return rec, loc, frameSize + int64(plen), nil
}

// encode appends rec's frame to buf and returns it with the offset of the
// data within the frame.
func encode(buf []byte, rec *rebound.Record) ([]byte, int, error) {
	return encodeFrame(buf, rec, true)
}

// encodeFrame is encode that appends the record's data to buf only if
// withData; otherwise the caller writes rec.Data right after buf's frame
// header (the crc covers it either way).
func encodeFrame(buf []byte, rec *rebound.Record, withData bool) ([]byte, int, error) {
	pk := len(rec.PointKind)
	if pk > 255 {
		return buf, 0, fmt.Errorf("wal: point kind too long")
	}
	plen := fixedSize + pk + len(rec.Data)
	if plen > maxPayload {
		return buf, 0, fmt.Errorf("wal: record %d too large (%d bytes)", rec.Seq, plen)
	}
	start := len(buf)
	buf = append(buf, make([]byte, frameSize+fixedSize)...)
	h := buf[start:]
	binary.LittleEndian.PutUint32(h[0:], uint32(plen))
	p := h[frameSize:]
	binary.LittleEndian.PutUint64(p[0:], rec.Seq)
	binary.LittleEndian.PutUint64(p[8:], uint64(rec.Time))
	p[16] = byte(rec.Kind)
	binary.LittleEndian.PutUint32(p[17:], rec.Disk)
	binary.LittleEndian.PutUint64(p[21:], uint64(rec.Offset))
	binary.LittleEndian.PutUint64(p[29:], uint64(rec.Length))
	p[37] = byte(pk)
	buf = append(buf, rec.PointKind...)
	crc := crc32.Update(0, castagnoli, buf[start:start+4])
	crc = crc32.Update(crc, castagnoli, buf[start+frameSize:])
	crc = crc32.Update(crc, castagnoli, rec.Data)
	if withData {
		buf = append(buf, rec.Data...)
	}
	binary.LittleEndian.PutUint32(buf[start+4:], crc)
	return buf, frameSize + fixedSize + pk, nil
}

// Corrupt returns a non-nil error wrapping ErrCorrupt if Open found a bad
// record that was not a torn tail.
func (l *Log) Corrupt() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.corrupt
}

// Append writes records at the end of the log with one write(2). Seqs must
// be strictly increasing and the first must be LastSeq()+1 unless the log
// is empty. Records are not durable until Sync.
func (l *Log) Append(recs ...*rebound.Record) ([]Location, error) {
	if len(recs) == 0 {
		return nil, nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil, ErrClosed
	}
	if l.err != nil {
		return nil, l.err
	}
	prev := l.last
	for i, r := range recs {
		switch {
		case r.Seq == 0:
			return nil, fmt.Errorf("wal: append seq 0: %w", ErrSeq)
		case i == 0 && prev != 0 && r.Seq != prev+1:
			return nil, fmt.Errorf("wal: append seq %d, want %d: %w", r.Seq, prev+1, ErrSeq)
		case i > 0 && r.Seq <= prev:
			return nil, fmt.Errorf("wal: append seq %d after %d: %w", r.Seq, prev, ErrSeq)
		}
		prev = r.Seq
	}
	var seg *segment
	if n := len(l.segs); n > 0 {
		seg = l.segs[n-1]
	}
	if seg == nil || seg.size >= l.opts.SegmentSize || seg.corrupt != nil {
		var err error
		if seg, err = l.cut(recs[0].Seq); err != nil {
			return nil, err
		}
	}
	// Frame headers and small records are encoded into buf; the data of
	// large records is written from the caller's slices (pwritev), not
	// copied: a copy per byte was a tenth of the replication CPU.
	buf := l.buf[:0]
	iov := l.iov[:0]
	locs := make([]Location, len(recs))
	var err error
	var total int64
	chunk := 0 // start of buf not yet in iov
	for i, r := range recs {
		start := len(buf)
		// Direct appends copy everything into their staging once: small
		// records are not copied into buf first.
		inline := len(r.Data) < inlineData && !l.direct
		var dataOff int
		if buf, dataOff, err = encodeFrame(buf, r, inline); err != nil {
			return nil, err
		}
		locs[i] = Location{Segment: seg.first, Offset: seg.size + total + int64(dataOff)}
		total += int64(len(buf) - start)
		if !inline {
			total += int64(len(r.Data))
			iov = append(iov, buf[chunk:], r.Data)
			chunk = len(buf)
		}
	}
	if chunk < len(buf) {
		iov = append(iov, buf[chunk:])
	}
	if cap(buf) <= maxKeptBuf {
		l.buf = buf
	} else {
		l.buf = nil
	}
	if l.direct {
		err = l.writeDirect(seg, iov, total)
	}
	if !l.direct {
		err = pwritev(seg.f, iov, seg.size)
	}
	clear(iov) // do not pin the caller's data
	l.iov = iov[:0]
	if err != nil {
		// Undo a partial write so the segment stays well formed.
		l.tailSeg = nil
		if terr := seg.f.Truncate(seg.size); terr != nil {
			l.err = fmt.Errorf("wal: write failed and could not be undone: %w", err)
		} else {
			seg.padded = false
		}
		return nil, fmt.Errorf("wal: write: %w", err)
	}
	seg.size += total
	l.size += total
	seg.last = prev
	l.last = prev
	return locs, nil
}

// ErrSeq is returned by Append for records that do not continue the log.
var ErrSeq = errors.New("wal: sequence must continue the log")

// cut creates a new segment named first via temp file + rename. The
// previous segment is fsynced first so that a synced later segment never
// follows an unsynced earlier one. Called with l.mu held.
func (l *Log) cut(first uint64) (*segment, error) {
	if n := len(l.segs); n > 0 {
		prev := l.segs[n-1]
		if err := l.unpad(prev); err != nil {
			return nil, fmt.Errorf("wal: sync segment: %w", err)
		}
		if err := prev.f.Sync(); err != nil {
			return nil, fmt.Errorf("wal: sync segment: %w", err)
		}
	}
	path := filepath.Join(l.dir, segName(first))
	tmp := filepath.Join(l.dir, tmpPrefix+segName(first))
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("wal: create segment: %w", err)
	}
	if _, err := f.WriteAt([]byte(magic), 0); err != nil {
		f.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("wal: create segment: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("wal: create segment: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		f.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("wal: create segment: %w", err)
	}
	seg := &segment{first: first, path: path, f: f, size: segHeaderSize, refs: 1}
	if n := len(l.segs); n > 0 {
		l.segs[n-1].next = first
	}
	l.segs = append(l.segs, seg)
	l.size += segHeaderSize
	l.dirDirty = true
	return seg, nil
}

// Sync makes every record appended before the call durable: it fsyncs the
// current segment and, when a segment was created or removed, the directory.
func (l *Log) Sync() error {
	l.syncMu.Lock()
	defer l.syncMu.Unlock()
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return ErrClosed
	}
	var seg *segment
	if n := len(l.segs); n > 0 {
		seg = l.segs[n-1]
		seg.refs++
	}
	dirDirty := l.dirDirty
	l.dirDirty = false
	l.mu.Unlock()
	// fsync outside l.mu so appends can continue meanwhile; earlier
	// segments were synced when they were cut.
	var err error
	if seg != nil {
		err = seg.f.Sync()
		l.release(seg)
	}
	if dirDirty {
		if derr := fsutil.SyncDir(l.dir); derr != nil && err == nil {
			err = derr
		}
		if err != nil {
			l.mu.Lock()
			l.dirDirty = true
			l.mu.Unlock()
		}
	}
	if err != nil {
		return fmt.Errorf("wal: sync: %w", err)
	}
	return nil
}

// release drops one reference to seg, closing its file at zero.
func (l *Log) release(seg *segment) {
	l.mu.Lock()
	seg.refs--
	n := seg.refs
	l.mu.Unlock()
	if n == 0 {
		seg.f.Close()
		if seg.dio != nil {
			seg.dio.Close()
		}
	}
}

// FirstSeq returns the seq of the first retained record, 0 when empty.
func (l *Log) FirstSeq() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, s := range l.segs {
		if s.last != 0 {
			return s.first
		}
	}
	return 0
}

// LastSeq returns the seq of the last record, 0 when empty.
func (l *Log) LastSeq() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.last
}

// Size returns the bytes the log's segments hold on disk.
func (l *Log) Size() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.size
}

// findSeg returns the segment named first. Called with l.mu held.
func (l *Log) findSeg(first uint64) *segment {
	i := sort.Search(len(l.segs), func(i int) bool { return l.segs[i].first >= first })
	if i < len(l.segs) && l.segs[i].first == first {
		return l.segs[i]
	}
	return nil
}

// ReadData reads len(p) bytes of record data at loc (which may point into
// the middle of a record's data). It does not verify the checksum; Open
// and readers do.
func (l *Log) ReadData(loc Location, p []byte) error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return ErrClosed
	}
	seg := l.findSeg(loc.Segment)
	if seg == nil {
		l.mu.Unlock()
		return fmt.Errorf("wal: read segment %d: %w", loc.Segment, ErrTruncated)
	}
	if loc.Offset < segHeaderSize || loc.Offset+int64(len(p)) > seg.size {
		l.mu.Unlock()
		return fmt.Errorf("wal: read %d bytes at segment %d offset %d: out of range", len(p), loc.Segment, loc.Offset)
	}
	seg.refs++
	l.mu.Unlock()
	defer l.release(seg)
	if _, err := seg.f.ReadAt(p, loc.Offset); err != nil {
		return fmt.Errorf("wal: read segment %d: %w", loc.Segment, err)
	}
	return nil
}

// TruncateFront removes whole segments all of whose records have Seq <= seq.
// The last segment is always kept so LastSeq stays known. Readers and reads
// in flight on a removed segment finish normally (the file is unlinked but
// stays open until they release it).
func (l *Log) TruncateFront(seq uint64) error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return ErrClosed
	}
	var removed []*segment
	for len(l.segs) > 1 && l.segs[0].last <= seq && l.segs[0].corrupt == nil {
		s := l.segs[0]
		if err := os.Remove(s.path); err != nil {
			l.mu.Unlock()
			return fmt.Errorf("wal: truncate front: %w", err)
		}
		s.removed = true
		l.segs = l.segs[1:]
		l.size -= s.size
		removed = append(removed, s)
	}
	l.mu.Unlock()
	for _, s := range removed {
		l.release(s)
	}
	if len(removed) > 0 {
		if err := fsutil.SyncDir(l.dir); err != nil {
			return fmt.Errorf("wal: truncate front: %w", err)
		}
	}
	return nil
}

// DropCorrupt cuts the log at its first damaged record: the segment holding
// it keeps its good prefix, and it and every later segment lose the rest.
// It returns the seqs dropped, from..to (from > to when none), and clears
// Corrupt, so appends continue at LastSeq()+1. The caller must get what the
// dropped records held back from elsewhere: the journal resyncs them from
// the source.
func (l *Log) DropCorrupt() (from, to uint64, err error) {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return 0, 0, ErrClosed
	}
	i := 0
	for i < len(l.segs) && l.segs[i].corrupt == nil {
		i++
	}
	if i == len(l.segs) {
		l.mu.Unlock()
		return l.last + 1, l.last, nil
	}
	oldLast := l.last
	seg := l.segs[i]
	var drop []*segment
	if seg.last == 0 {
		drop = l.segs[i:] // nothing good in it: it goes too
		l.segs = l.segs[:i]
	} else {
		l.tailSeg = nil
		if err := seg.f.Truncate(seg.size); err != nil {
			l.mu.Unlock()
			return 0, 0, fmt.Errorf("wal: drop corrupt: %w", err)
		}
		if err := seg.f.Sync(); err != nil {
			l.mu.Unlock()
			return 0, 0, fmt.Errorf("wal: drop corrupt: %w", err)
		}
		drop = l.segs[i+1:]
		l.segs = l.segs[:i+1]
		seg.corrupt, seg.next = nil, 0
	}
	for _, s := range drop {
		if err := os.Remove(s.path); err != nil && !os.IsNotExist(err) {
			l.mu.Unlock()
			return 0, 0, fmt.Errorf("wal: drop corrupt: %w", err)
		}
		s.removed = true
		l.size -= s.size
	}
	l.last = 0
	if n := len(l.segs); n > 0 {
		l.segs[n-1].next = 0
		l.last = l.segs[n-1].last
	}
	l.corrupt, l.tailLast = nil, 0
	l.dirDirty = true
	newLast := l.last
	l.mu.Unlock()
	for _, s := range drop {
		l.release(s)
	}
	if err := fsutil.SyncDir(l.dir); err != nil {
		return 0, 0, fmt.Errorf("wal: drop corrupt: %w", err)
	}
	l.logger.Warn("wal: dropped records at and after damage", "dir", l.dir, "from", newLast+1, "to", oldLast)
	return newLast + 1, oldLast, nil
}

// Skip lets the next Append start at seq+1 although the records after
// LastSeq up to seq were never appended: the journal marks where it
// dropped damaged records this way. Only forward; the jump is kept on disk
// by the record appended next (a segment's seqs need only increase).
func (l *Log) Skip(seq uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if seq > l.last {
		l.last = seq
	}
}

// Close closes the log. Readers still open keep their segment files until
// they are closed; their next Next returns ErrClosed.
func (l *Log) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	segs := l.segs
	l.segs = nil
	var err error
	if n := len(segs); n > 0 {
		// A clean close leaves no padding for the next Open to drop.
		err = l.unpad(segs[n-1])
	}
	l.mu.Unlock()
	for _, s := range segs {
		l.release(s)
	}
	if err != nil {
		return fmt.Errorf("wal: close: %w", err)
	}
	return nil
}

func (l *Log) closeAll() {
	for _, s := range l.segs {
		s.f.Close()
		if s.dio != nil {
			s.dio.Close()
		}
	}
	l.segs = nil
}

// pwritev writes iov at off, all of it (a short write continues).
func pwritev(f *os.File, iov [][]byte, off int64) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	for len(iov) > 0 {
		if len(iov[0]) == 0 {
			iov = iov[1:]
			continue
		}
		batch := iov[:min(len(iov), 1024)] // IOV_MAX
		var n int
		var werr error
		if err := rc.Write(func(fd uintptr) bool {
			n, werr = unix.Pwritev(int(fd), batch, off)
			return true
		}); err != nil {
			return err
		}
		if werr == unix.EINTR {
			continue
		} else if werr != nil {
			return &os.PathError{Op: "pwritev", Path: f.Name(), Err: werr}
		} else if n == 0 {
			return io.ErrShortWrite
		}
		off += int64(n)
		for n > 0 {
			if n >= len(iov[0]) {
				n -= len(iov[0])
				iov = iov[1:]
			} else {
				iov[0] = iov[0][n:]
				n = 0
			}
		}
	}
	return nil
}

// openDirect opens a segment for direct writes (a variable so tests can
// refuse it as a filesystem without O_DIRECT does).
var openDirect = func(path string) (*os.File, error) {
	return os.OpenFile(path, os.O_WRONLY|unix.O_DIRECT, 0)
}

// directAlign is the offset, length and memory alignment of direct writes.
const directAlign = fsutil.DirectAlign

// writeDirect writes iov (total bytes) at seg.size through seg's O_DIRECT
// handle: staged after the bytes of the partial block it continues, padded
// with zeros to whole blocks. A filesystem that refuses O_DIRECT, or an
// alignment it refuses, turns direct writes off for the log (l.direct
// false, nothing written) and the caller writes buffered. Called with l.mu
// held.
func (l *Log) writeDirect(seg *segment, iov [][]byte, total int64) error {
	if seg.dio == nil {
		f, err := openDirect(seg.path)
		if err != nil {
			l.logger.Debug("wal: appending through the page cache", "dir", l.dir, "reason", err)
			l.direct = false
			return nil
		}
		seg.dio = f
	}
	base := seg.size &^ (directAlign - 1)
	head := int(seg.size - base)
	if l.tailSeg != seg {
		l.tail = l.tail[:0]
		if head > 0 {
			l.tail = append(l.tail, make([]byte, head)...)
			if _, err := seg.f.ReadAt(l.tail, base); err != nil {
				return fmt.Errorf("read the tail block: %w", err)
			}
		}
		l.tailSeg = seg
	}
	end := head + int(total)
	padded := (end + directAlign - 1) &^ (directAlign - 1)
	if cap(l.stage) < padded {
		l.stage = fsutil.AlignedBuf(padded)
	}
	st := l.stage[:padded]
	n := copy(st, l.tail)
	for _, b := range iov {
		n += copy(st[n:], b)
	}
	clear(st[n:])
	if err := pwritev(seg.dio, [][]byte{st}, base); err != nil {
		if errors.Is(err, unix.EINVAL) && !seg.padded {
			// Alignment refused before anything was written this way.
			l.logger.Debug("wal: appending through the page cache", "dir", l.dir, "reason", err)
			l.direct = false
			seg.dio.Close()
			seg.dio = nil
			l.tailSeg = nil
			return nil
		}
		return err
	}
	seg.padded = padded > end
	keep := end &^ (directAlign - 1)
	l.tail = append(l.tail[:0], st[keep:end]...)
	if cap(l.stage) > maxKeptBuf {
		l.stage = nil
	}
	return nil
}

// unpad cuts the zero padding direct appends left after seg's last record.
// Called with l.mu held.
func (l *Log) unpad(seg *segment) error {
	if !seg.padded {
		return nil
	}
	if err := seg.f.Truncate(seg.size); err != nil {
		return err
	}
	seg.padded = false
	return nil
}

// zeroPadding reports whether f holds only zeros from off to end, fewer
// than a direct block of them: the padding of a direct append that a crash
// left behind, not a torn record.
func zeroPadding(f *os.File, off, end int64) bool {
	if end <= off || end-off >= directAlign {
		return false
	}
	b := make([]byte, end-off)
	if _, err := f.ReadAt(b, off); err != nil {
		return false
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
