// Package overlay is a writable copy over a read-only disk: the failed-over
// disk over a journal view. Writes land in a sparse data file; a bitmap of
// 4 KiB blocks says which blocks the data file holds. Every other block
// reads from the base.
//
// Files: path (sparse data, the disk's size) and path+".map": a 16-byte
// header ("RBOVMAP1", u64 size) then one bit per block, block i at bit
// i%64 of little-endian u64 word i/64.
//
// Crash safety: a write pwrites its data, then the map word(s) of its
// blocks, before it returns, so a killed process loses no acknowledged
// write (the page cache keeps both). Flush fsyncs data and map so a power
// loss loses nothing flushed. A block's bit is only set after its data is
// whole in the file, so a torn write leaves the block reading from base.
package overlay

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/nbd"
)

// BlockSize is the granularity of the map.
const BlockSize = 4096

const (
	mapMagic  = "RBOVMAP1"
	mapHeader = 16
	nstripes  = 64
)

// Base is the read-only disk under the overlay (a journal view's disk).
type Base interface {
	Size() int64
	ReadAt(p []byte, off int64) (int, error)
}

// Disk is a writable disk over a Base. It satisfies the NBD backend shape
// (Size, ReadAt, WriteAt, Flush, Trim, WriteZeroes) and is safe for
// concurrent use.
type Disk struct {
	path string
	data *os.File
	mapf *os.File
	base Base
	size int64

	words []atomic.Uint64 // the map in memory
	// stripes serialize read-modify-writes of one map word's blocks
	// (64 blocks, 256 KiB); word w uses stripes[w%nstripes].
	stripes [nstripes]sync.Mutex

	closeMu sync.RWMutex
	closed  bool
}

// Open opens the overlay at path over base, creating it if needed.
// Reopening restores every write that returned, even after a kill.
func Open(path string, base Base, size int64) (*Disk, error) {
	if size <= 0 {
		return nil, rebound.Errorf(rebound.EINVALID, "overlay: invalid disk size %d", size)
	}
	if base == nil {
		return nil, rebound.Errorf(rebound.EINVALID, "overlay: no base disk")
	}
	if bs := base.Size(); bs != size {
		return nil, rebound.Errorf(rebound.EINVALID, "overlay: base is %d bytes, overlay %d", bs, size)
	}
	nblocks := (size + BlockSize - 1) / BlockSize
	nwords := (nblocks + 63) / 64
	d := &Disk{path: path, base: base, size: size, words: make([]atomic.Uint64, nwords)}
	_, derr := os.Stat(path)
	_, merr := os.Stat(path + ".map")
	fresh := errors.Is(derr, os.ErrNotExist) && errors.Is(merr, os.ErrNotExist)
	if !fresh && (derr != nil || merr != nil) {
		return nil, rebound.Errorf(rebound.EINVALID, "overlay %s: data or map file missing or unreadable (data: %v, map: %v)", path, derr, merr)
	}
	var err error
	if d.data, err = os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600); err != nil {
		return nil, fmt.Errorf("overlay: %w", err)
	}
	if d.mapf, err = os.OpenFile(path+".map", os.O_RDWR|os.O_CREATE, 0o600); err != nil {
		d.data.Close()
		return nil, fmt.Errorf("overlay: %w", err)
	}
	if fresh {
		err = d.create(nwords)
	} else {
		err = d.load(nwords)
	}
	if err != nil {
		d.data.Close()
		d.mapf.Close()
		return nil, err
	}
	return d, nil
}

func (d *Disk) create(nwords int64) error {
	if err := d.data.Truncate(d.size); err != nil {
		return fmt.Errorf("overlay: %w", err)
	}
	hdr := make([]byte, mapHeader)
	copy(hdr, mapMagic)
	binary.LittleEndian.PutUint64(hdr[8:], uint64(d.size))
	if _, err := d.mapf.WriteAt(hdr, 0); err != nil {
		return fmt.Errorf("overlay: %w", err)
	}
	if err := d.mapf.Truncate(mapHeader + 8*nwords); err != nil {
		return fmt.Errorf("overlay: %w", err)
	}
	return d.Flush()
}

func (d *Disk) load(nwords int64) error {
	b := make([]byte, mapHeader+8*nwords)
	if n, err := d.mapf.ReadAt(b, 0); n < mapHeader || (err != nil && err != io.EOF) {
		return rebound.Errorf(rebound.EINVALID, "overlay %s.map: unreadable header: %v", d.path, err)
	}
	if string(b[:8]) != mapMagic {
		return rebound.Errorf(rebound.EINVALID, "overlay %s.map: not an overlay map", d.path)
	}
	if s := int64(binary.LittleEndian.Uint64(b[8:])); s != d.size {
		return rebound.Errorf(rebound.EINVALID, "overlay %s: map is for a %d-byte disk, opened as %d", d.path, s, d.size)
	}
	for i := range d.words {
		d.words[i].Store(binary.LittleEndian.Uint64(b[mapHeader+8*i:]))
	}
	return nil
}

// Size returns the disk's size in bytes.
func (d *Disk) Size() int64 { return d.size }

func (d *Disk) present(blk int64) bool {
	return d.words[blk/64].Load()&(1<<(blk%64)) != 0
}

func (d *Disk) check(n int, off int64) error {
	if off < 0 || off > d.size || int64(n) > d.size-off {
		return rebound.Errorf(rebound.EINVALID, "overlay: range %d+%d is outside the %d-byte disk", off, n, d.size)
	}
	return nil
}

func (d *Disk) enter() error {
	d.closeMu.RLock()
	if d.closed {
		d.closeMu.RUnlock()
		return rebound.Errorf(rebound.ECONFLICT, "overlay: disk is closed")
	}
	return nil
}

// ReadAt reads blocks written here from the data file, the rest from base.
func (d *Disk) ReadAt(p []byte, off int64) (int, error) {
	if off >= d.size && off >= 0 {
		return 0, io.EOF
	}
	var eof error
	if off >= 0 && int64(len(p)) > d.size-off {
		p, eof = p[:d.size-off], io.EOF
	}
	if err := d.check(len(p), off); err != nil {
		return 0, err
	}
	if err := d.enter(); err != nil {
		return 0, err
	}
	defer d.closeMu.RUnlock()
	end := off + int64(len(p))
	// Read runs of blocks from the same source with one call each.
	for pos := off; pos < end; {
		blk := pos / BlockSize
		here := d.present(blk)
		runEnd := min((blk+1)*BlockSize, end)
		for runEnd < end && d.present(runEnd/BlockSize) == here {
			runEnd = min(runEnd+BlockSize, end)
		}
		var err error
		if here {
			_, err = d.data.ReadAt(p[pos-off:runEnd-off], pos)
		} else {
			_, err = d.base.ReadAt(p[pos-off:runEnd-off], pos)
			if err == io.EOF && runEnd == d.size {
				err = nil
			}
		}
		if err != nil {
			return 0, fmt.Errorf("overlay: read at %d: %w", pos, err)
		}
		pos = runEnd
	}
	return len(p), eof
}

// WriteAt writes p at off. Blocks not yet here that p covers only in part
// are filled from base first. The map is written before it returns.
func (d *Disk) WriteAt(p []byte, off int64) (int, error) {
	if err := d.check(len(p), off); err != nil {
		return 0, err
	}
	if err := d.enter(); err != nil {
		return 0, err
	}
	defer d.closeMu.RUnlock()
	if err := d.write(off, int64(len(p)), func(dst []byte, at int64) { copy(dst, p[at-off:]) }, fillData); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteZeroes makes [off, off+n) read as zeroes; whole zero blocks are
// punched out of the data file.
func (d *Disk) WriteZeroes(off, n int64) error { return d.zeroes(off, n, zeroPunch) }

// WriteZeroesNoHole makes [off, off+n) read as zeroes and keeps those
// blocks allocated in the data file (NBD_CMD_FLAG_NO_HOLE): zeroed with
// FALLOC_FL_ZERO_RANGE or written, never punched.
func (d *Disk) WriteZeroesNoHole(off, n int64) error { return d.zeroes(off, n, zeroKeep) }

// How writeData stores a buffer.
const (
	fillData  = iota // write it
	zeroPunch        // all-zero whole blocks may be punched
	zeroKeep         // zeroes that stay allocated
)

func (d *Disk) zeroes(off, n int64, mode int) error {
	if n < 0 || n > d.size {
		return rebound.Errorf(rebound.EINVALID, "overlay: invalid length %d", n)
	}
	if err := d.check(int(n), off); err != nil {
		return err
	}
	if err := d.enter(); err != nil {
		return err
	}
	defer d.closeMu.RUnlock()
	return d.write(off, n, func(dst []byte, _ int64) { clear(dst) }, mode)
}

// Trim discards [off, off+n); trimmed ranges read back as zeroes.
func (d *Disk) Trim(off, n int64) error { return d.WriteZeroes(off, n) }

// write sets [off, off+n) from fill, one map word's worth of blocks at a
// time under that word's stripe lock; mode says how writeData stores it.
func (d *Disk) write(off, n int64, fill func(dst []byte, at int64), mode int) error {
	end := off + n
	var buf []byte
	for pos := off; pos < end; {
		w := pos / BlockSize / 64
		wEnd := min((w+1)*64*BlockSize, end) // end of this word's blocks
		if err := d.writeWord(w, pos, wEnd, fill, mode, &buf); err != nil {
			return err
		}
		pos = wEnd
	}
	return nil
}

func (d *Disk) writeWord(w, lo, hi int64, fill func([]byte, int64), mode int, bufp *[]byte) error {
	mu := &d.stripes[w%nstripes]
	mu.Lock()
	defer mu.Unlock()
	// Widen to whole blocks: edges not yet here come from base.
	alo := lo / BlockSize * BlockSize
	ahi := min((hi+BlockSize-1)/BlockSize*BlockSize, d.size)
	if cap(*bufp) < int(ahi-alo) {
		*bufp = make([]byte, ahi-alo)
	}
	buf := (*bufp)[:ahi-alo]
	first, last := alo/BlockSize, (ahi-1)/BlockSize
	if alo < lo {
		if err := d.readBlock(buf, alo, first); err != nil {
			return err
		}
	}
	if hi < ahi && (last != first || alo == lo) {
		if err := d.readBlock(buf, alo, last); err != nil {
			return err
		}
	}
	fill(buf[lo-alo:hi-alo], lo)
	if err := d.writeData(buf, alo, mode); err != nil {
		return err
	}
	var mask uint64
	for b := alo / BlockSize; b*BlockSize < ahi; b++ {
		mask |= 1 << (b % 64)
	}
	return d.setBits(w, mask)
}

// readBlock reads block b's current contents into its place in buf (which
// starts at disk offset at). Called with the block's stripe held.
func (d *Disk) readBlock(buf []byte, at, b int64) error {
	lo, hi := b*BlockSize, min((b+1)*BlockSize, d.size)
	p := buf[lo-at : hi-at]
	if !d.present(b) {
		return d.readBase(p, lo)
	}
	if _, err := d.data.ReadAt(p, lo); err != nil {
		return fmt.Errorf("overlay: read at %d: %w", lo, err)
	}
	return nil
}

func (d *Disk) readBase(p []byte, off int64) error {
	n, err := d.base.ReadAt(p, off)
	if err == io.EOF && n == len(p) {
		err = nil
	}
	if err != nil {
		return fmt.Errorf("overlay: read base at %d: %w", off, err)
	}
	return nil
}

// writeData writes whole blocks. An all-zero buffer (its merged edges
// zero too) is punched out for zeroPunch, and zeroed in place, staying
// allocated, with FALLOC_FL_ZERO_RANGE for zeroKeep; where the file system
// cannot, the zeroes are written.
func (d *Disk) writeData(buf []byte, off int64, mode int) error {
	if mode != fillData && len(buf) >= BlockSize && allZero(buf) {
		const keepSize, punchHole, zeroRange = 0x01, 0x02, 0x10
		fl := uint32(punchHole | keepSize)
		if mode == zeroKeep {
			fl = zeroRange | keepSize
		}
		if syscall.Fallocate(int(d.data.Fd()), fl, off, int64(len(buf))) == nil {
			return nil
		}
	}
	if _, err := d.data.WriteAt(buf, off); err != nil {
		return fmt.Errorf("overlay: write at %d: %w", off, err)
	}
	return nil
}

func allZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.LittleEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// setBits marks blocks of word w present in memory and in the map file.
// Called with the word's stripe held.
func (d *Disk) setBits(w int64, mask uint64) error {
	old := d.words[w].Load()
	if old&mask == mask {
		return nil
	}
	nw := old | mask
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], nw)
	if _, err := d.mapf.WriteAt(b[:], mapHeader+8*w); err != nil {
		return fmt.Errorf("overlay: write map: %w", err)
	}
	d.words[w].Store(nw)
	return nil
}

// Flush makes every completed write durable: fsync data, then map.
func (d *Disk) Flush() error {
	if err := d.data.Sync(); err != nil {
		return fmt.Errorf("overlay: flush data: %w", err)
	}
	if err := d.mapf.Sync(); err != nil {
		return fmt.Errorf("overlay: flush map: %w", err)
	}
	return nil
}

// Present returns how many bytes of the disk the data file holds.
func (d *Disk) Present() int64 {
	var n int64
	for i := range d.words {
		n += int64(bits.OnesCount64(d.words[i].Load())) * BlockSize
	}
	return min(n, d.size)
}

// Written returns the merged regions of the blocks the data file holds
// because of writes (WriteAt, WriteZeroes, Trim), in whole 4 KiB blocks,
// the last clipped to the disk size: the regions that differ from the base
// view. Call it before Flatten: Flatten makes every block present, after
// which Written returns the whole disk. Writes racing the call may or may
// not be included.
func (d *Disk) Written() []rebound.Region {
	var out []rebound.Region
	nblocks := (d.size + BlockSize - 1) / BlockSize
	start := int64(-1)
	for w := range d.words {
		word := d.words[w].Load()
		base := int64(w) * 64
		if start < 0 && word == 0 || start >= 0 && word == ^uint64(0) {
			continue
		}
		for b := base; b < min(base+64, nblocks); b++ {
			set := word&(1<<(b%64)) != 0
			switch {
			case set && start < 0:
				start = b
			case !set && start >= 0:
				out = append(out, rebound.Region{Offset: start * BlockSize, Length: (b - start) * BlockSize})
				start = -1
			}
		}
	}
	if start >= 0 {
		out = append(out, rebound.Region{Offset: start * BlockSize, Length: d.size - start*BlockSize})
	}
	return out
}

// Flatten copies every block not written here from base into the data
// file, so that the data file alone is the disk. It runs while I/O goes
// on: each map word's blocks are copied under that word's stripe. It ends
// with a Flush. progress, if set, gets bytes done of total.
func (d *Disk) Flatten(ctx context.Context, progress func(done, total int64)) error {
	if err := d.enter(); err != nil {
		return err
	}
	defer d.closeMu.RUnlock()
	buf := make([]byte, 64*BlockSize)
	total := d.size
	for w := int64(0); w < int64(len(d.words)); w++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := d.flattenWord(w, buf); err != nil {
			return err
		}
		if progress != nil {
			progress(min((w+1)*64*BlockSize, total), total)
		}
	}
	return d.Flush()
}

func (d *Disk) flattenWord(w int64, buf []byte) error {
	mu := &d.stripes[w%nstripes]
	mu.Lock()
	defer mu.Unlock()
	lo := w * 64 * BlockSize
	hi := min(lo+64*BlockSize, d.size)
	have := d.words[w].Load()
	var mask uint64
	for b := lo / BlockSize; b*BlockSize < hi; b++ {
		mask |= 1 << (b % 64)
	}
	if have&mask == mask {
		return nil
	}
	// Copy runs of missing blocks.
	for pos := lo; pos < hi; {
		if have&(1<<(pos/BlockSize%64)) != 0 {
			pos += BlockSize
			continue
		}
		end := pos
		for end < hi && have&(1<<(end/BlockSize%64)) == 0 {
			end = min(end+BlockSize, hi)
		}
		p := buf[:end-pos]
		if err := d.readBase(p, pos); err != nil {
			return err
		}
		// Zero runs are punched (the data file may hold bytes of a write
		// that was killed before its map update).
		mode := fillData
		if allZero(p) {
			mode = zeroPunch
		}
		if err := d.writeData(p, pos, mode); err != nil {
			return err
		}
		pos = end
	}
	return d.setBits(w, mask)
}

// Close flushes and closes the files.
func (d *Disk) Close() error {
	d.closeMu.Lock()
	defer d.closeMu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	err := d.Flush()
	if cerr := d.data.Close(); err == nil {
		err = cerr
	}
	if cerr := d.mapf.Close(); err == nil {
		err = cerr
	}
	return err
}

// Extents reports the allocation of [off, off+length) (nbd.Extenter):
// blocks written here from the data file's holes (a punched block reads
// zeroes), the others from the base if it can tell, else as data.
func (d *Disk) Extents(off, length int64) ([]nbd.Extent, error) {
	if length < 0 {
		return nil, rebound.Errorf(rebound.EINVALID, "overlay: invalid length %d", length)
	}
	if err := d.check(int(length), off); err != nil {
		return nil, err
	}
	if err := d.enter(); err != nil {
		return nil, err
	}
	defer d.closeMu.RUnlock()
	end := off + length
	var out []nbd.Extent
	for pos := off; pos < end && len(out) < nbd.MaxExtents; {
		here := d.present(pos / BlockSize)
		runEnd := d.runEnd(pos, end, here)
		var xs []nbd.Extent
		var err error
		if here {
			xs, err = nbd.SeekExtents(d.data, pos, runEnd-pos)
		} else {
			xs, err = nbd.ExtentsOf(d.base, pos, runEnd-pos)
		}
		if err != nil {
			return nil, fmt.Errorf("overlay: extents at %d: %w", pos, err)
		}
		// Keep exactly the run: a base answering short or long is
		// clipped, and what it left out counts as data.
		var got int64
		for _, x := range xs {
			x.Length = min(x.Length, runEnd-pos-got)
			out = nbd.AppendExtent(out, x)
			got += max(x.Length, 0)
		}
		out = nbd.AppendExtent(out, nbd.Extent{Length: runEnd - pos - got})
		pos = runEnd
	}
	return out, nil
}

// runEnd returns where the run of blocks at pos that are (here) or are
// not present ends, at most end; whole map words are skipped at once.
func (d *Disk) runEnd(pos, end int64, here bool) int64 {
	for blk := pos/BlockSize + 1; blk*BlockSize < end; {
		if blk%64 == 0 {
			w := d.words[blk/64].Load()
			if here && w == ^uint64(0) || !here && w == 0 {
				blk += 64
				continue
			}
		}
		if d.present(blk) != here {
			return blk * BlockSize
		}
		blk++
	}
	return end
}

// WriteZeroesFast is WriteZeroes (nbd.FastZeroer): whole blocks are
// punched out of the data file and marked, only partial edge blocks are
// written, so it beats writing the zeroes.
func (d *Disk) WriteZeroesFast(off, n int64) error { return d.WriteZeroes(off, n) }
