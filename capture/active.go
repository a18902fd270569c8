package capture

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"os"
	"slices"
)

// activeMap is a disk's activity map (protocol A, Options.Direct): the
// regions touched by records the stream holds only in memory (the ring).
// A region's bit is persisted (pwrite of its byte, only on a clean→dirty
// transition) before the disk write of the record, so after a kill -9
// the set bits cover every record the peer may lack and the source lost.
//
// Bits are cleared by generation, not per record: cur collects the bits
// set since the last rotation, prev the generation before, whose records
// all have seqs <= prevSeq. Once the stream has persisted that every
// record <= prevSeq is acked and on the disk (meta landed), prev's bits
// that cur does not hold are cleared. So a region is clean again once
// every record touching it is acked and landed, without a per-region
// seq. Not safe for concurrent use: the stream mutex guards it.
type activeMap struct {
	m       *dirtyMap // the file image: cur | prev
	cur     []byte
	prev    []byte // nil when retired
	prevSeq uint64
	curLo   int64 // byte span of cur that may hold bits, lo > hi if none
	curHi   int64
	prevLo  int64
	prevHi  int64
	// staged: bytes of the file image changed by stage and not yet
	// persisted (commit), with their old values.
	staged []stagedByte
	added  int64
}

type stagedByte struct {
	i   int64
	old byte
}

func openActiveMap(path string, diskSize, regionSize int64) (*activeMap, error) {
	m, err := openDirtyMap(path, diskSize, regionSize)
	if err != nil {
		return nil, err
	}
	a := &activeMap{m: m, cur: make([]byte, len(m.bits)), curLo: 1, curHi: 0}
	if m.count > 0 {
		// Bits from before this open: their records are older than any
		// the stream appends now. Open decides what they mean.
		a.prev = append([]byte(nil), m.bits...)
		a.prevLo, a.prevHi = 0, int64(len(m.bits))-1
	}
	return a, nil
}

// stage sets the bits of [off, off+length) in cur and the file image, in
// memory only;
// commit persists every staged change with as few writes as it can (a
// batch of records costs one pwrite, not one per record).
func (a *activeMap) stage(off, length int64) {
	if length == 0 {
		return
	}
	first, last := off/a.m.regionSize, (off+length-1)/a.m.regionSize
	if lo, hi, _ := setBits(a.cur, first, last); lo >= 0 {
		if a.curLo > a.curHi {
			a.curLo, a.curHi = lo, hi
		} else {
			a.curLo, a.curHi = min(a.curLo, lo), max(a.curHi, hi)
		}
	}
	fb, lb := first/8, last/8
	old := append(a.m.old[:0], a.m.bits[fb:lb+1]...)
	a.m.old = old[:0]
	lo, hi, added := setBits(a.m.bits, first, last)
	if lo < 0 {
		return
	}
	for i := lo; i <= hi; i++ {
		if o := old[i-fb]; o != a.m.bits[i] {
			a.staged = append(a.staged, stagedByte{i: i, old: o})
		}
	}
	a.m.count += added
	a.added += added
}

// commit persists the staged bytes: one write per cluster of nearby
// bytes. On error every staged change is undone in memory (a bit set only
// in memory would let the next record of its region skip the write).
func (a *activeMap) commit() error {
	if len(a.staged) == 0 {
		return nil
	}
	st := a.staged
	slices.SortFunc(st, func(x, y stagedByte) int { return int(x.i - y.i) })
	var err error
	for k := 0; k < len(st) && err == nil; {
		lo, hi := st[k].i, st[k].i
		for k++; k < len(st) && st[k].i-hi <= 512; k++ {
			hi = st[k].i
		}
		_, err = a.m.f.WriteAt(a.m.bits[lo:hi+1], lo)
	}
	if err != nil {
		for k := len(st) - 1; k >= 0; k-- {
			a.m.bits[st[k].i] = st[k].old
		}
		a.m.count -= a.added
		err = fmt.Errorf("persist activity map: %w", err)
	}
	a.staged, a.added = st[:0], 0
	return err
}

// empty reports whether no bit is set in memory or the file.
func (a *activeMap) empty() bool { return a.m.count == 0 && a.prev == nil && a.curLo > a.curHi }

// rotate starts a new generation if prev is retired and cur holds bits:
// every record marked so far has a seq <= head.
func (a *activeMap) rotate(head uint64) {
	if a.prev != nil || a.curLo > a.curHi {
		return
	}
	a.prev, a.cur = a.cur, a.prev
	if a.cur == nil {
		a.cur = make([]byte, len(a.prev))
	}
	a.prevSeq = head
	a.prevLo, a.prevHi = a.curLo, a.curHi
	a.curLo, a.curHi = 1, 0
}

// retire clears prev's bits that cur does not hold, if every record <=
// prevSeq is acked and landed (landed, as persisted). It persists the
// changed bytes with one write.
func (a *activeMap) retire(landed uint64) error {
	if a.prev == nil || landed < a.prevSeq {
		return nil
	}
	lo, hi := a.prevLo, a.prevHi
	changed := false
	for i := lo; i <= hi; i++ {
		if b := a.cur[i]; a.m.bits[i] != b {
			a.m.count -= int64(bits.OnesCount8(a.m.bits[i] &^ b))
			a.m.bits[i] = b
			changed = true
		}
	}
	for i := lo; i <= hi; i++ {
		a.prev[i] = 0
	}
	a.prev = nil
	if !changed {
		return nil
	}
	if _, err := a.m.f.WriteAt(a.m.bits[lo:hi+1], lo); err != nil {
		// Only bits of acked, landed records stay set on disk: a restart
		// resends those regions once more.
		return fmt.Errorf("persist activity map: %w", err)
	}
	return nil
}

// drainInto moves every bit of the map into the dirty map d (persisted
// first), then clears the map: after a crash, the active regions are the
// ones a resync must send.
func (a *activeMap) drainInto(d *dirtyMap) error {
	if a.m.count == 0 {
		return nil
	}
	for i, b := range a.m.bits {
		d.bits[i] |= b
	}
	d.count = 0
	for _, b := range d.bits {
		d.count += int64(bits.OnesCount8(b))
	}
	if _, err := d.f.WriteAt(d.bits, 0); err != nil {
		return fmt.Errorf("persist dirty map: %w", err)
	}
	return a.reset()
}

// reset clears every bit, in memory and in the file.
func (a *activeMap) reset() error {
	if a.empty() {
		return nil
	}
	clear(a.m.bits)
	a.m.count = 0
	a.prev = nil
	clear(a.cur)
	a.curLo, a.curHi = 1, 0
	if _, err := a.m.f.WriteAt(a.m.bits, 0); err != nil {
		return fmt.Errorf("persist activity map: %w", err)
	}
	return nil
}

// seqFile is the stream's seq watermark (file "seq", 16 bytes: u64 mark,
// u64 flags). In direct mode no seq above mark is handed out before mark
// is persisted, so seqs never repeat after a kill -9 although the newest
// records were only in memory. Flag seqDirect is set while a direct
// stream is open and cleared by Close: set at Open, the last run crashed.
type seqFile struct {
	f     *os.File
	mark  uint64
	flags uint64
}

const (
	seqDirect = 1 // a direct stream had the file open and did not close
	// seqAhead is how far the watermark runs ahead of the head.
	seqAhead = 1 << 20
)

func openSeqFile(path string) (*seqFile, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open seq file: %w", err)
	}
	sf := &seqFile{f: f}
	var b [16]byte
	n, err := f.ReadAt(b[:], 0)
	switch {
	case n == len(b):
		sf.mark = binary.LittleEndian.Uint64(b[0:])
		sf.flags = binary.LittleEndian.Uint64(b[8:])
	case n == 0 && (err == nil || errors.Is(err, io.EOF)):
	default:
		f.Close()
		return nil, fmt.Errorf("read seq file %s: %d bytes, %v", path, n, err)
	}
	return sf, nil
}

// set persists mark and flags (pwrite, then fsync: a power loss must not
// make the watermark go back either).
func (sf *seqFile) set(mark, flags uint64) error {
	var b [16]byte
	binary.LittleEndian.PutUint64(b[0:], mark)
	binary.LittleEndian.PutUint64(b[8:], flags)
	if _, err := sf.f.WriteAt(b[:], 0); err != nil {
		return fmt.Errorf("persist seq watermark: %w", err)
	}
	if err := sf.f.Sync(); err != nil {
		return fmt.Errorf("persist seq watermark: %w", err)
	}
	sf.mark, sf.flags = mark, flags
	return nil
}
