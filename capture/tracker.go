package capture

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"sync"

	"github.com/rebound-dr/rebound"
)

// DefaultTrackerBlock is the default granularity of a Tracker: small
// enough that a reprotect sends about the bytes that changed.
const DefaultTrackerBlock = 4096

const (
	trackerMagic  = "RBTRACK1"
	trackerHeader = 24 // magic, u64 disk size, u64 block size
)

// Tracker is a persistent map of the blocks of one disk written since a
// moment (the failover point of a failed-over disk). A block's bit is
// pwritten to the file before Mark returns, and only on a clean→dirty
// transition, so a killed process loses no mark and steady-state writes to
// already marked blocks cost no syscall. Safe for concurrent use.
//
// File: 24-byte header ("RBTRACK1", u64 disk size, u64 block size, little
// endian) then one bit per block, block i at bit i%8 of byte i/8.
type Tracker struct {
	mu        sync.Mutex
	f         *os.File
	path      string
	size      int64
	blockSize int64
	blocks    int64
	bits      []byte
	count     int64
	closed    bool
}

// OpenTracker opens the tracker at path, creating it (nothing marked) if
// it does not exist. blockSize <= 0 means DefaultTrackerBlock. Reopening
// with another disk size or block size is an ECONFLICT error.
func OpenTracker(path string, diskSize, blockSize int64) (*Tracker, error) {
	if blockSize <= 0 {
		blockSize = DefaultTrackerBlock
	}
	if diskSize <= 0 {
		return nil, rebound.Errorf(rebound.EINVALID, "tracker %s: invalid disk size %d", path, diskSize)
	}
	blocks := (diskSize + blockSize - 1) / blockSize
	t := &Tracker{path: path, size: diskSize, blockSize: blockSize, blocks: blocks, bits: make([]byte, (blocks+7)/8)}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("capture: open tracker: %w", err)
	}
	t.f = f
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("capture: open tracker: %w", err)
	}
	want := trackerHeader + int64(len(t.bits))
	if fi.Size() == 0 {
		// Written in full, not truncated: a sparse map could hit ENOSPC
		// on a later mark. Synced so the header survives a power loss.
		b := make([]byte, want)
		copy(b, trackerMagic)
		binary.LittleEndian.PutUint64(b[8:], uint64(diskSize))
		binary.LittleEndian.PutUint64(b[16:], uint64(blockSize))
		if _, err := f.WriteAt(b, 0); err == nil {
			err = f.Sync()
		}
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("capture: create tracker: %w", err)
		}
		return t, nil
	}
	b := make([]byte, want)
	if n, _ := f.ReadAt(b, 0); n < trackerHeader || string(b[:8]) != trackerMagic {
		f.Close()
		return nil, rebound.Errorf(rebound.EINVALID, "tracker %s: not a tracker file", path)
	}
	hs, hb := int64(binary.LittleEndian.Uint64(b[8:])), int64(binary.LittleEndian.Uint64(b[16:]))
	if hs != diskSize || hb != blockSize {
		f.Close()
		return nil, rebound.Errorf(rebound.ECONFLICT, "tracker %s is for a %d-byte disk at %d-byte blocks, not %d at %d", path, hs, hb, diskSize, blockSize)
	}
	if fi.Size() != want {
		f.Close()
		return nil, rebound.Errorf(rebound.EINVALID, "tracker %s has %d bytes, want %d", path, fi.Size(), want)
	}
	copy(t.bits, b[trackerHeader:])
	if r := blocks % 8; r != 0 {
		t.bits[len(t.bits)-1] &= byte(1)<<r - 1
	}
	for _, x := range t.bits {
		t.count += int64(bits.OnesCount8(x))
	}
	return t, nil
}

// RemoveTracker deletes a tracker file; a missing one is no error.
func RemoveTracker(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("capture: remove tracker: %w", err)
	}
	return nil
}

// BlockSize returns the tracker's granularity.
func (t *Tracker) BlockSize() int64 { return t.blockSize }

// Mark records that [off, off+length) was written. The bits of blocks not
// marked before are persisted (one pwrite of the changed byte span) before
// it returns; the range is clipped to the disk.
func (t *Tracker) Mark(off, length int64) error {
	if off < 0 || length < 0 {
		return rebound.Errorf(rebound.EINVALID, "tracker: invalid range %d+%d", off, length)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.markLocked(off, length)
}

func (t *Tracker) markLocked(off, length int64) error {
	if t.closed {
		return rebound.Errorf(rebound.ECONFLICT, "tracker %s is closed", t.path)
	}
	end := min(off+length, t.size)
	if length == 0 || off >= end {
		return nil
	}
	lo, hi, added := setBits(t.bits, off/t.blockSize, (end-1)/t.blockSize)
	t.count += added
	if lo < 0 {
		return nil
	}
	if _, err := t.f.WriteAt(t.bits[lo:hi+1], trackerHeader+lo); err != nil {
		return fmt.Errorf("capture: persist tracker %s: %w", t.path, err)
	}
	return nil
}

// MarkRegions marks every region of rs.
func (t *Tracker) MarkRegions(rs []rebound.Region) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, r := range rs {
		if r.Offset < 0 || r.Length < 0 {
			return rebound.Errorf(rebound.EINVALID, "tracker: invalid region %d+%d", r.Offset, r.Length)
		}
		if err := t.markLocked(r.Offset, r.Length); err != nil {
			return err
		}
	}
	return nil
}

// Regions returns the marked blocks as sorted, merged regions, the last
// one clipped to the disk size.
func (t *Tracker) Regions() []rebound.Region {
	t.mu.Lock()
	defer t.mu.Unlock()
	return bitRegions(t.bits, t.blocks, t.blockSize, t.size)
}

// Bytes returns the bytes of the marked blocks (clipped to the disk).
func (t *Tracker) Bytes() int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := t.count * t.blockSize
	if last := t.blocks - 1; t.count > 0 && t.bits[last/8]&(1<<(last%8)) != 0 {
		n -= t.blocks*t.blockSize - t.size
	}
	return n
}

// Sync fsyncs the tracker file (marks survive a power loss).
func (t *Tracker) Sync() error {
	if err := t.f.Sync(); err != nil {
		return fmt.Errorf("capture: sync tracker %s: %w", t.path, err)
	}
	return nil
}

// Close syncs and closes the file. Later Marks fail.
func (t *Tracker) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil
	}
	t.closed = true
	err := t.f.Sync()
	if cerr := t.f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("capture: close tracker %s: %w", t.path, err)
	}
	return nil
}

// bitRegions turns a bitmap (bit i%8 of byte i/8 = block i) into merged
// regions clipped to size.
func bitRegions(b []byte, blocks, blockSize, size int64) []rebound.Region {
	var out []rebound.Region
	start := int64(-1)
	for i := int64(0); i < blocks; i++ {
		// Whole words, then whole bytes, that do not end or start a run.
		if i%64 == 0 && i+64 <= blocks {
			if w := binary.LittleEndian.Uint64(b[i/8:]); start < 0 && w == 0 || start >= 0 && w == ^uint64(0) {
				i += 63
				continue
			}
		}
		if i%8 == 0 && start < 0 && b[i/8] == 0 {
			i += 7
			continue
		}
		if i%8 == 0 && start >= 0 && b[i/8] == 0xff && i+8 <= blocks {
			i += 7
			continue
		}
		set := b[i/8]&(1<<(i%8)) != 0
		switch {
		case set && start < 0:
			start = i
		case !set && start >= 0:
			out = append(out, rebound.Region{Offset: start * blockSize, Length: (i - start) * blockSize})
			start = -1
		}
	}
	if start >= 0 {
		out = append(out, rebound.Region{Offset: start * blockSize, Length: size - start*blockSize})
	}
	return out
}
