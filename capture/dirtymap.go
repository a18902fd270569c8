package capture

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"os"
)

// dirtyMap is a per-disk bitmap of regions whose content the peer may lack.
// It lives in memory and in a file of the same bytes; a bit is persisted
// (pwrite of its byte) before the disk write it covers, so a killed process
// never forgets a dirty region. Not safe for concurrent use: the stream
// mutex guards it.
type dirtyMap struct {
	f          *os.File
	bits       []byte
	regionSize int64
	regions    int64
	count      int64 // bits set
	unsaved    bool  // bits set by markUnsaved are not in the file yet
	old        []byte
}

func openDirtyMap(path string, diskSize, regionSize int64) (*dirtyMap, error) {
	regions := (diskSize + regionSize - 1) / regionSize
	n := (regions + 7) / 8
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open dirty map: %w", err)
	}
	m := &dirtyMap{f: f, bits: make([]byte, n), regionSize: regionSize, regions: regions}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if fi.Size() != 0 {
		if fi.Size() != n {
			f.Close()
			return nil, fmt.Errorf("dirty map %s has %d bytes, want %d", path, fi.Size(), n)
		}
		if _, err := f.ReadAt(m.bits, 0); err != nil {
			f.Close()
			return nil, fmt.Errorf("read dirty map: %w", err)
		}
	} else if _, err := f.WriteAt(m.bits, 0); err != nil {
		// Written, not truncated: a sparse map could hit ENOSPC later.
		f.Close()
		return nil, fmt.Errorf("create dirty map: %w", err)
	}
	// Bits past the last region are never used; clear them in case.
	if r := regions % 8; r != 0 {
		m.bits[n-1] &= byte(1)<<r - 1
	}
	for _, b := range m.bits {
		m.count += int64(bits.OnesCount8(b))
	}
	return m, nil
}

func (m *dirtyMap) isDirty(r int64) bool { return m.bits[r/8]&(1<<(r%8)) != 0 }

// markRange sets the bits of every region overlapping [off, off+length) and
// persists the changed bytes with one write. It reports whether it wrote.
// If the write fails the bits are restored: a bit set only in memory would
// let the next write of that region go through as recorded.
func (m *dirtyMap) markRange(off, length int64) (bool, error) {
	if length == 0 {
		return false, nil
	}
	first, last := off/m.regionSize, (off+length-1)/m.regionSize
	old := append(m.old[:0], m.bits[first/8:last/8+1]...)
	m.old = old[:0]
	lo, hi, added := setBits(m.bits, first, last)
	if lo < 0 {
		return false, nil
	}
	if _, err := m.f.WriteAt(m.bits[lo:hi+1], lo); err != nil {
		copy(m.bits[first/8:], old)
		return false, fmt.Errorf("persist dirty map: %w", err)
	}
	m.count += added
	return true, nil
}

// markUnsaved sets the bits of [off, off+length) in memory only, for a
// change the map could not record on disk: the running process resyncs the
// regions, and save retries persisting them.
func (m *dirtyMap) markUnsaved(off, length int64) {
	if length == 0 {
		return
	}
	_, _, added := setBits(m.bits, off/m.regionSize, (off+length-1)/m.regionSize)
	m.count += added
	m.unsaved = true
}

// save persists the whole map if markUnsaved left bits only in memory.
func (m *dirtyMap) save() error {
	if !m.unsaved {
		return nil
	}
	if _, err := m.f.WriteAt(m.bits, 0); err != nil {
		return fmt.Errorf("persist dirty map: %w", err)
	}
	m.unsaved = false
	return nil
}

// markAll sets every bit and persists the whole map.
func (m *dirtyMap) markAll() error {
	for i := range m.bits {
		m.bits[i] = 0xff
	}
	if r := m.regions % 8; r != 0 {
		m.bits[len(m.bits)-1] = byte(1)<<r - 1
	}
	m.count = m.regions
	if _, err := m.f.WriteAt(m.bits, 0); err != nil {
		m.unsaved = true // in memory every bit is set; save retries
		return fmt.Errorf("persist dirty map: %w", err)
	}
	m.unsaved = false
	return nil
}

// clear clears region r's bit and persists its byte.
func (m *dirtyMap) clear(r int64) error {
	if !m.isDirty(r) {
		return nil
	}
	m.bits[r/8] &^= 1 << (r % 8)
	m.count--
	if _, err := m.f.WriteAt(m.bits[r/8:r/8+1], r/8); err != nil {
		return fmt.Errorf("persist dirty map: %w", err)
	}
	return nil
}

// next returns the first dirty region >= r, or -1. Clean stretches are
// skipped eight bytes at a time (fine-grained maps are large).
func (m *dirtyMap) next(r int64) int64 {
	for ; r < m.regions; r++ {
		if r%64 == 0 && r/8+8 <= int64(len(m.bits)) && binary.LittleEndian.Uint64(m.bits[r/8:]) == 0 {
			r += 63
			continue
		}
		if r%8 == 0 && m.bits[r/8] == 0 {
			r += 7
			continue
		}
		if m.isDirty(r) {
			return r
		}
	}
	return -1
}

func (m *dirtyMap) sync() error  { return m.f.Sync() }
func (m *dirtyMap) close() error { return m.f.Close() }

// clearRange clears regions [first, last] and persists the changed bytes
// with one write.
func (m *dirtyMap) clearRange(first, last int64) error {
	for r := first; r <= last; r++ {
		if m.isDirty(r) {
			m.bits[r/8] &^= 1 << (r % 8)
			m.count--
		}
	}
	lo, hi := first/8, last/8+1
	if _, err := m.f.WriteAt(m.bits[lo:hi], lo); err != nil {
		return fmt.Errorf("persist dirty map: %w", err)
	}
	return nil
}
