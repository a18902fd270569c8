package capture

import (
	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/nbd"
)

// Disk is one disk of a Stream, the backend the NBD server serves. Every
// change is recorded in the stream before it reaches the disk file. Safe
// for concurrent use.
type Disk struct {
	s     *Stream
	idx   uint32
	fd    *FileDisk
	dirty *dirtyMap // guarded by s.mu
	// active is the activity map (direct mode; nil otherwise). Guarded
	// by s.mu.
	active *activeMap
	// flights are the changes committed to the stream and not yet
	// applied to fd. Guarded by s.fmu.
	flights []*flight
}

// Size returns the disk size in bytes.
func (d *Disk) Size() int64 { return d.fd.Size() }

// ReadAt reads len(p) bytes at off. Reads are not ordered with writes
// (like a real disk, a read racing an overlapping write may see either).
func (d *Disk) ReadAt(p []byte, off int64) (int, error) { return d.fd.ReadAt(p, off) }

// WriteAt writes p at off and records it in the stream.
func (d *Disk) WriteAt(p []byte, off int64) (int, error) {
	if err := checkRange(d.fd.size, off, int64(len(p))); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	// p is only borrowed: the spool writes it and the cache copies it
	// before change returns.
	rec := &rebound.Record{Kind: rebound.RecordWrite, Disk: d.idx, Offset: off, Length: int64(len(p)), Data: p}
	var n int
	err := d.s.change(d, rec, func() (err error) {
		n, err = d.fd.f.WriteAt(p, off)
		return err
	})
	return n, err
}

// WriteZeroes sets length bytes at off to zero, punching a hole, and
// records it.
func (d *Disk) WriteZeroes(off, length int64) error {
	return d.zero(rebound.RecordZero, off, length, false)
}

// WriteZeroesNoHole sets length bytes at off to zero, keeping them
// allocated (NBD_CMD_FLAG_NO_HOLE), and records it. The record is the same
// Zero as WriteZeroes': the replica gets zeroes and allocates as it likes.
func (d *Disk) WriteZeroesNoHole(off, length int64) error {
	return d.zero(rebound.RecordZero, off, length, true)
}

// Trim discards length bytes at off (they read back as zeroes) and
// records it.
func (d *Disk) Trim(off, length int64) error {
	return d.zero(rebound.RecordTrim, off, length, false)
}

func (d *Disk) zero(kind rebound.RecordKind, off, length int64, keep bool) error {
	if err := checkRange(d.fd.size, off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	rec := &rebound.Record{Kind: kind, Disk: d.idx, Offset: off, Length: length}
	return d.s.change(d, rec, func() error { return d.fd.zero(off, length, keep) })
}

// Flush makes every completed change of the stream durable (FLUSH, FUA).
func (d *Disk) Flush() error { return d.s.Flush() }

// replay applies a spooled record to the disk file, except inside dirty
// regions: their content on disk is newer than the spool (overflow writes
// were not spooled) and a resync will send it.
func (d *Disk) replay(rec *rebound.Record) error {
	if err := checkRange(d.fd.size, rec.Offset, rec.Length); err != nil {
		return err
	}
	if rec.Kind == rebound.RecordWrite && int64(len(rec.Data)) != rec.Length {
		return rebound.Errorf(rebound.EINTERNAL, "write record with %d bytes of data for length %d", len(rec.Data), rec.Length)
	}
	apply := func(off, end int64) error {
		if rec.Kind == rebound.RecordWrite {
			_, err := d.fd.f.WriteAt(rec.Data[off-rec.Offset:end-rec.Offset], off)
			return err
		}
		return d.fd.rezero(off, end, rec.Kind == rebound.RecordZero)
	}
	end := rec.Offset + rec.Length
	active := d.active != nil && d.active.m.count > 0
	if d.dirty.count == 0 && !active {
		return apply(rec.Offset, end)
	}
	// Active regions (a clean reopen of a direct stream) hold records
	// newer than the spool's, all landed: skipped like dirty ones.
	skip := func(r int64) bool { return d.dirty.isDirty(r) || active && d.active.m.isDirty(r) }
	rs := d.dirty.regionSize
	for pos := rec.Offset; pos < end; {
		r := pos / rs
		if skip(r) {
			pos = (r + 1) * rs
			continue
		}
		runEnd := end
		if nd := d.dirty.next(r); nd >= 0 && nd*rs < end {
			runEnd = nd * rs
		}
		if active {
			if nd := d.active.m.next(r); nd >= 0 && nd*rs < runEnd {
				runEnd = nd * rs
			}
		}
		if err := apply(pos, runEnd); err != nil {
			return err
		}
		pos = runEnd
	}
	return nil
}

// dirtyBytes returns the bytes of the disk's dirty regions. Called with
// s.mu held.
func (d *Disk) dirtyBytes() int64 {
	m := d.dirty
	n := m.count * m.regionSize
	if last := m.regions - 1; m.isDirty(last) {
		n -= m.regions*m.regionSize - d.fd.size
	}
	return n
}

// Extents reports the allocation of [off, off+length) of the disk file
// (nbd.Extenter). The file holds every acknowledged change (the stream
// records it first, then writes the file), so its holes read as zeroes.
func (d *Disk) Extents(off, length int64) ([]nbd.Extent, error) { return d.fd.Extents(off, length) }

// WriteZeroesFast records a zero and punches a hole (nbd.FastZeroer), or
// returns nbd.ErrNotFast, recording nothing, where the file system cannot
// punch holes.
func (d *Disk) WriteZeroesFast(off, length int64) error {
	if d.fd.nohole.Load() {
		return nbd.ErrNotFast
	}
	return d.WriteZeroes(off, length)
}
