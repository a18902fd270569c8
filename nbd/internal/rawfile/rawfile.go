// Package rawfile is an nbd.Backend over a raw image file, used by the nbd
// tests and the benchmark server.
package rawfile

import (
	"os"
	"syscall"
)

// File serves a raw image file. Its methods are safe for concurrent use
// (pread/pwrite).
type File struct {
	f    *os.File
	size int64
}

// Open opens path read-write and serves its current size.
func Open(path string) (*File, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &File{f: f, size: st.Size()}, nil
}

func (f *File) Size() int64                              { return f.size }
func (f *File) ReadAt(p []byte, off int64) (int, error)  { return f.f.ReadAt(p, off) }
func (f *File) WriteAt(p []byte, off int64) (int, error) { return f.f.WriteAt(p, off) }
func (f *File) Flush() error                             { return syscall.Fdatasync(int(f.f.Fd())) }
func (f *File) Close() error                             { return f.f.Close() }

// OSFile returns the open file (for SEEK_DATA/SEEK_HOLE; this package
// cannot import nbd, whose tests use it).
func (f *File) OSFile() *os.File { return f.f }

const (
	fallocKeepSize  = 0x01
	fallocPunchHole = 0x02
	fallocZeroRange = 0x10
)

// Trim punches a hole, so the range reads back as zeroes.
func (f *File) Trim(off, length int64) error {
	return f.WriteZeroes(off, length)
}

// WriteZeroes punches a hole, or zeroes the range in place where the file
// system cannot.
func (f *File) WriteZeroes(off, length int64) error {
	if syscall.Fallocate(int(f.f.Fd()), fallocPunchHole|fallocKeepSize, off, length) == nil {
		return nil
	}
	return f.WriteZeroesNoHole(off, length)
}

// WriteZeroesNoHole zeroes the range and keeps it allocated: ZERO_RANGE
// (unwritten extents, still allocated), or written zeroes where the file
// system cannot. It never punches.
func (f *File) WriteZeroesNoHole(off, length int64) error {
	if syscall.Fallocate(int(f.f.Fd()), fallocZeroRange|fallocKeepSize, off, length) == nil {
		return nil
	}
	zero := make([]byte, min(length, 1<<20))
	for length > 0 {
		n := min(length, int64(len(zero)))
		if _, err := f.f.WriteAt(zero[:n], off); err != nil {
			return err
		}
		off += n
		length -= n
	}
	return nil
}
