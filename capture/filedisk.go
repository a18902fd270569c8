package capture

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"
	"syscall"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/nbd"
)

// fallocate modes (linux/falloc.h); syscall has Fallocate but not the flags.
const (
	fallocKeepSize  = 0x01
	fallocPunchHole = 0x02
	fallocZeroRange = 0x10
)

// zeroChunk is the buffer written when the file system cannot punch holes.
var zeroChunk = make([]byte, 1<<20)

// FileDisk is a plain, unreplicated disk backed by a raw file. It implements
// the NBD backend methods and is safe for concurrent use (pread/pwrite).
type FileDisk struct {
	f      *os.File
	size   int64
	nohole atomic.Bool // punching holes is not supported; write zeroes instead
	nozero atomic.Bool // FALLOC_FL_ZERO_RANGE is not supported; write zeroes instead
	track  atomic.Pointer[Tracker]
}

// SetTracker makes WriteAt, WriteZeroes and Trim mark their range in t
// before they touch the file (a change the tracker failed to record is
// refused), so t holds every region changed from now on. nil stops
// tracking. The Disk of a Stream does not go through these methods.
func (d *FileDisk) SetTracker(t *Tracker) { d.track.Store(t) }

// mark records a change in the tracker, if any.
func (d *FileDisk) mark(off, length int64) error {
	if t := d.track.Load(); t != nil {
		return t.Mark(off, length)
	}
	return nil
}

// OpenFileDisk opens the raw disk file at path, creating it sparse with the
// given size if it is missing. An existing file must have exactly that size.
func OpenFileDisk(path string, size int64) (*FileDisk, error) {
	if size <= 0 {
		return nil, rebound.Errorf(rebound.EINVALID, "disk %s: size must be positive, got %d", path, size)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open disk: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("stat disk: %w", err)
	}
	n := fi.Size()
	if fi.Mode()&os.ModeDevice != 0 { // a block device (rebound agent): its size is fixed
		if n, err = f.Seek(0, io.SeekEnd); err != nil {
			f.Close()
			return nil, fmt.Errorf("size of device: %w", err)
		}
	}
	switch {
	case n == 0:
		if err := f.Truncate(size); err != nil {
			f.Close()
			return nil, fmt.Errorf("size disk: %w", err)
		}
	case n != size:
		f.Close()
		return nil, rebound.Errorf(rebound.ECONFLICT, "disk %s has %d bytes, want %d", path, n, size)
	}
	return &FileDisk{f: f, size: size}, nil
}

// Size returns the disk size in bytes.
func (d *FileDisk) Size() int64 { return d.size }

// ReadAt reads len(p) bytes at off.
func (d *FileDisk) ReadAt(p []byte, off int64) (int, error) {
	if err := checkRange(d.size, off, int64(len(p))); err != nil {
		return 0, err
	}
	n, err := d.f.ReadAt(p, off)
	if err == io.EOF && n == len(p) {
		err = nil
	}
	return n, err
}

// WriteAt writes p at off.
func (d *FileDisk) WriteAt(p []byte, off int64) (int, error) {
	if err := checkRange(d.size, off, int64(len(p))); err != nil {
		return 0, err
	}
	if err := d.mark(off, int64(len(p))); err != nil {
		return 0, err
	}
	return d.f.WriteAt(p, off)
}

// WriteZeroes sets length bytes at off to zero, punching a hole.
func (d *FileDisk) WriteZeroes(off, length int64) error {
	if err := checkRange(d.size, off, length); err != nil {
		return err
	}
	if err := d.mark(off, length); err != nil {
		return err
	}
	return d.zero(off, length, false)
}

// WriteZeroesNoHole sets length bytes at off to zero and keeps them
// allocated (NBD_CMD_FLAG_NO_HOLE).
func (d *FileDisk) WriteZeroesNoHole(off, length int64) error {
	if err := checkRange(d.size, off, length); err != nil {
		return err
	}
	if err := d.mark(off, length); err != nil {
		return err
	}
	return d.zero(off, length, true)
}

// Trim discards length bytes at off; they read back as zeroes.
func (d *FileDisk) Trim(off, length int64) error {
	if err := checkRange(d.size, off, length); err != nil {
		return err
	}
	if err := d.mark(off, length); err != nil {
		return err
	}
	return d.zero(off, length, false)
}

// Flush makes every completed write durable, the tracker's marks first, so
// a flushed change is never durable without its mark.
func (d *FileDisk) Flush() error {
	if t := d.track.Load(); t != nil {
		if err := t.Sync(); err != nil {
			return err
		}
	}
	return d.f.Sync()
}

// Close closes the file.
func (d *FileDisk) Close() error { return d.f.Close() }

// zero makes [off, off+length) read as zeroes. Without keep it punches a
// hole, so zeroed ranges stay sparse (the initial copy of a sparse disk
// then finds all-zero regions cheaply). With keep (NO_HOLE) the range must
// stay allocated: FALLOC_FL_ZERO_RANGE turns it into allocated unwritten
// extents without writing. Where the file system supports neither, zeroes
// are written (allocated too).
func (d *FileDisk) zero(off, length int64, keep bool) error {
	if length == 0 {
		return nil
	}
	mode, unsupported := fallocPunchHole|fallocKeepSize, &d.nohole
	if keep {
		mode, unsupported = fallocZeroRange|fallocKeepSize, &d.nozero
	}
	if !unsupported.Load() {
		err := syscall.Fallocate(int(d.f.Fd()), uint32(mode), off, length)
		if err == nil {
			return nil
		}
		if !errors.Is(err, syscall.EOPNOTSUPP) && !errors.Is(err, syscall.ENOSYS) {
			return fmt.Errorf("zero range: %w", err)
		}
		unsupported.Store(true)
	}
	for length > 0 {
		n := min(length, int64(len(zeroChunk)))
		if _, err := d.f.WriteAt(zeroChunk[:n], off); err != nil {
			return err
		}
		off += n
		length -= n
	}
	return nil
}

// rezero zeroes again the data of [off, end) when a zero or trim record is
// replayed, and leaves holes and unwritten extents alone: they read as
// zeroes already. So a replay never allocates a range (a disk-sized
// WRITE_ZEROES would fill the file system) nor punches the allocated
// range a NO_HOLE zero left: the record does not say which it was, and
// replay keeps whatever allocation the live write chose. Data found is
// zeroed with keep (a NO_HOLE zero that had not reached the disk), or
// punched for a trim.
func (d *FileDisk) rezero(off, end int64, keep bool) error {
	for off < end {
		data := d.nextData(off)
		if data >= end {
			return nil
		}
		stop := min(d.nextHole(data), end)
		if err := d.zero(data, stop-data, keep); err != nil {
			return err
		}
		off = stop
	}
	return nil
}

// checkRange rejects I/O that does not fit the disk.
func checkRange(size, off, length int64) error {
	if off < 0 || length < 0 || off > size || length > size-off {
		return rebound.Errorf(rebound.EINVALID, "I/O out of range: offset %d length %d on a %d-byte disk", off, length, size)
	}
	return nil
}

// Extents reports the allocation of [off, off+length) from SEEK_DATA and
// SEEK_HOLE on the file (nbd.Extenter): holes read as zeroes. A block
// device reports everything as data.
func (d *FileDisk) Extents(off, length int64) ([]nbd.Extent, error) {
	if err := checkRange(d.size, off, length); err != nil {
		return nil, err
	}
	return nbd.SeekExtents(d.f, off, length)
}

// WriteZeroesFast punches a hole (nbd.FastZeroer, NBD_CMD_FLAG_FAST_ZERO);
// where the file system cannot, it returns nbd.ErrNotFast with the file
// unchanged and the client writes the zeroes.
func (d *FileDisk) WriteZeroesFast(off, length int64) error {
	if err := checkRange(d.size, off, length); err != nil {
		return err
	}
	if d.nohole.Load() {
		return nbd.ErrNotFast
	}
	if err := d.mark(off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	err := syscall.Fallocate(int(d.f.Fd()), fallocPunchHole|fallocKeepSize, off, length)
	if errors.Is(err, syscall.EOPNOTSUPP) || errors.Is(err, syscall.ENOSYS) {
		d.nohole.Store(true)
		return nbd.ErrNotFast
	}
	if err != nil {
		return fmt.Errorf("zero range: %w", err)
	}
	return nil
}
