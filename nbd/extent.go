package nbd

import (
	"errors"
	"fmt"
	"os"
	"syscall"
)

// Extent is a run of a disk's bytes with one allocation status, as
// NBD_CMD_BLOCK_STATUS reports it in the base:allocation context.
type Extent struct {
	Length int64
	// Hole: not allocated in the backing storage (NBD_STATE_HOLE).
	Hole bool
	// Zero: reads back as zeroes (NBD_STATE_ZERO). Reporting Zero where
	// the bytes are not zero is a bug (clients skip such ranges when they
	// copy); leaving it clear where they are is merely imprecise.
	Zero bool
}

// Extenter is an optional Backend interface: the allocation status of a
// range. Extents returns extents in order from off; they cover
// [off, off+length) exactly, or a prefix of it once there are MaxExtents
// (the server clips longer answers and serves a shorter one as it is, so
// a client asks again for the rest). A backend without it reports every
// byte as allocated data. Wrappers of backends should forward it (see
// ExtentsOf).
type Extenter interface {
	Extents(off, length int64) ([]Extent, error)
}

// ExtentsOf asks b for the extents of [off, off+length), or reports the
// range as one extent of allocated data when b cannot tell.
func ExtentsOf(b any, off, length int64) ([]Extent, error) {
	if x, ok := b.(Extenter); ok {
		return x.Extents(off, length)
	}
	return []Extent{{Length: length}}, nil
}

// MaxExtents bounds one answer of Extents and one BLOCK_STATUS reply (the
// spec asks for at most 2^20 descriptors).
const MaxExtents = 1 << 14

const (
	seekData = 3 // SEEK_DATA
	seekHole = 4 // SEEK_HOLE
)

// SeekExtents returns the extents of [off, off+length) of a file from
// SEEK_DATA/SEEK_HOLE: holes are Hole|Zero, the rest allocated data (which
// includes unwritten extents on file systems that report them as data). A
// file system that cannot seek for holes reports everything as data.
// Concurrent calls on one file are safe (the file offset is not used by
// pread/pwrite).
func SeekExtents(f *os.File, off, length int64) ([]Extent, error) {
	fd := int(f.Fd())
	end := off + length
	var out []Extent
	for pos := off; pos < end && len(out) < MaxExtents; {
		data, err := syscall.Seek(fd, pos, seekData)
		switch {
		case errors.Is(err, syscall.ENXIO):
			data = end // no data from pos to the end of the file
		case err != nil:
			return AppendExtent(out, Extent{Length: end - pos}), nil
		}
		if data > pos {
			h := min(data, end)
			out = AppendExtent(out, Extent{Length: h - pos, Hole: true, Zero: true})
			pos = h
			continue
		}
		hole, err := syscall.Seek(fd, pos, seekHole)
		if err != nil || hole <= pos {
			hole = end
		}
		h := min(hole, end)
		out = AppendExtent(out, Extent{Length: h - pos})
		pos = h
	}
	return out, nil
}

// AppendExtent appends x to out, merging it into the last extent when
// their status is the same. Empty extents are dropped.
func AppendExtent(out []Extent, x Extent) []Extent {
	if x.Length <= 0 {
		return out
	}
	if n := len(out); n > 0 && out[n-1].Hole == x.Hole && out[n-1].Zero == x.Zero {
		out[n-1].Length += x.Length
		return out
	}
	return append(out, x)
}

// FastZeroer is an optional Backend interface for NBD_CMD_FLAG_FAST_ZERO:
// WriteZeroesFast makes the range read as zeroes only if it can do so
// faster than writing them (punching a hole, recording a zero); otherwise
// it returns ErrNotFast having changed nothing the client can read. A
// backend without it answers every fast zero with NBD_ENOTSUP. Wrappers
// that act on writes (trackers) must implement it themselves rather than
// let an embedded backend's method through.
type FastZeroer interface {
	WriteZeroesFast(off, length int64) error
}

// ErrNotFast is what WriteZeroesFast returns when zeroing would not be
// fast; the client gets NBD_ENOTSUP and writes the zeroes itself.
var ErrNotFast = fmt.Errorf("zeroing would not be faster than writing: %w", syscall.EOPNOTSUPP)

// WriteZeroesFast calls b's WriteZeroesFast, or returns ErrNotFast.
func WriteZeroesFast(b any, off, length int64) error {
	if z, ok := b.(FastZeroer); ok {
		return z.WriteZeroesFast(off, length)
	}
	return ErrNotFast
}
