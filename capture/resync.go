package capture

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/digest"
)

// lseek's SEEK_DATA and SEEK_HOLE whence.
const (
	seekData = 3
	seekHole = 4
)

// StartInitialCopy marks every region of every disk dirty and starts a
// resync: the first protection of a machine sends the whole disks.
func (s *Stream) StartInitialCopy() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	for _, d := range s.disks {
		if err := d.dirty.markAll(); err != nil {
			s.mu.Unlock()
			return err
		}
	}
	s.initial = true
	if s.resyncing {
		s.syncTotal = s.syncDone + s.dirtyBytesLocked()
	} else {
		s.startResyncLocked()
	}
	s.mu.Unlock()
	return s.saveMeta()
}

// StartResync starts a resync of only the given regions, per disk: the
// seed of a delta reprotect, whose target already holds the rest. The
// regions, rounded out to RegionSize, become dirty and a window opens as
// with StartInitialCopy (the state reports syncing). With no regions at
// all the window still opens and closes (ResyncBegin, ResyncEnd), so the
// target gets a consistent position, its first point. regions has one
// entry per disk, or is empty.
func (s *Stream) StartResync(regions [][]rebound.Region) error {
	if len(regions) != 0 && len(regions) != len(s.disks) {
		return rebound.Errorf(rebound.EINVALID, "capture: resync regions for %d disks, stream has %d", len(regions), len(s.disks))
	}
	for i, rs := range regions {
		for _, r := range rs {
			if err := checkRange(s.disks[i].fd.size, r.Offset, r.Length); err != nil {
				return rebound.Errorf(rebound.EINVALID, "capture: resync region of disk %d: %v", i, err)
			}
		}
	}
	s.mu.Lock()
	if err := s.markResyncLocked(regions); err != nil {
		s.mu.Unlock()
		return fmt.Errorf("capture: %w", err)
	}
	s.initial = true
	s.mu.Unlock()
	return s.saveMeta()
}

// markResyncLocked makes regions dirty and starts a resync, or widens the
// running one. Called with s.mu held.
func (s *Stream) markResyncLocked(regions [][]rebound.Region) error {
	if s.closed {
		return ErrClosed
	}
	for i, rs := range regions {
		for _, r := range rs {
			if _, err := s.disks[i].dirty.markRange(r.Offset, r.Length); err != nil {
				return err
			}
		}
	}
	if s.resyncing {
		s.syncTotal = s.syncDone + s.dirtyBytesLocked()
	} else {
		s.startResyncLocked()
	}
	return nil
}

// startResyncLocked starts the resync goroutine. Called with s.mu held.
func (s *Stream) startResyncLocked() {
	if s.closed || s.resyncing {
		return
	}
	s.resyncing = true
	s.syncDone = 0
	s.syncTotal = s.dirtyBytesLocked()
	// Open the window now, under the same lock that saw the dirty
	// regions, so no record lands between them and the window. If the
	// spool fails, the goroutine retries.
	var pk rebound.PointKind
	if s.crashResync {
		pk = rebound.ResyncSourceCrash
	}
	begun := s.appendLocked(&rebound.Record{Kind: rebound.RecordResyncBegin, PointKind: pk}) == nil
	if begun {
		s.crashResync = false
	}
	s.wg.Add(1)
	go s.resync(begun, pk)
}

// resync sends every dirty region, inside a ResyncBegin/ResyncEnd window,
// until no region is dirty. Each region is read and appended under the
// stream mutex, so it lands in the stream at the position where the disk
// had exactly that content.
func (s *Stream) resync(begun bool, pk rebound.PointKind) {
	defer s.wg.Done()
	if !begun {
		if !s.appendMarker(rebound.RecordResyncBegin, pk) {
			return
		}
		s.mu.Lock()
		s.crashResync = false
		s.mu.Unlock()
	}
	if err := s.saveMeta(); err != nil {
		s.logger.Error("saving stream state failed", "err", err)
	}
	s.logger.Info("resync started", "initial", s.initial, "bytes", s.syncTotal)
	scratch := make([]byte, s.copyLen())
	for {
		for _, d := range s.disks {
			for r := int64(0); ; {
				s.mu.Lock()
				if r = d.dirty.next(r); r < 0 {
					s.mu.Unlock()
					break
				}
				if !s.waitSpaceLocked(int64(len(scratch)) + recOverhead) {
					s.mu.Unlock()
					return
				}
				if !d.dirty.isDirty(r) { // cleared meanwhile? only by us; cheap check
					s.mu.Unlock()
					continue
				}
				next, busy, err := s.copyRegionLocked(d, r, scratch)
				s.mu.Unlock()
				if busy != nil {
					// A change to the run is on its way to the disk: copy
					// once it has landed.
					if s.onCopyWait != nil {
						s.onCopyWait()
					}
					select {
					case <-busy:
					case <-s.done:
						return
					}
					continue
				}
				if err != nil {
					s.logger.Error("resync: copying region failed; retrying", "disk", d.idx, "region", r, "err", err)
					if !s.sleep(time.Second) {
						return
					}
					continue
				}
				r = next
			}
		}
		// End the window only if nothing was dirtied meanwhile, atomically.
		s.mu.Lock()
		if !s.waitSpaceLocked(recOverhead) {
			s.mu.Unlock()
			return
		}
		if s.dirtyBytesLocked() > 0 {
			s.mu.Unlock()
			continue
		}
		if err := s.appendLocked(&rebound.Record{Kind: rebound.RecordResyncEnd}); err != nil {
			s.mu.Unlock()
			s.logger.Error("resync: appending end marker failed; retrying", "err", err)
			if !s.sleep(time.Second) {
				return
			}
			continue
		}
		initial := s.initial
		s.resyncing = false
		s.initial = false
		s.mu.Unlock()
		if err := s.saveMeta(); err != nil {
			s.logger.Error("saving stream state failed", "err", err)
		}
		s.logger.Info("resync done", "initial", initial)
		return
	}
}

// appendMarker appends a resync marker, waiting for spool space and
// retrying failed appends. It returns false if the stream closed.
func (s *Stream) appendMarker(kind rebound.RecordKind, pk rebound.PointKind) bool {
	for {
		s.mu.Lock()
		if !s.waitSpaceLocked(recOverhead) {
			s.mu.Unlock()
			return false
		}
		err := s.appendLocked(&rebound.Record{Kind: kind, PointKind: pk})
		s.mu.Unlock()
		if err == nil {
			return true
		}
		s.logger.Error("resync: appending marker failed; retrying", "kind", kind, "err", err)
		if !s.sleep(time.Second) {
			return false
		}
	}
}

// waitSpaceLocked waits until n more bytes keep the spool within half its
// limit, leaving the other half to live writes so they need not overflow.
// It returns false if the stream closed. Called with s.mu held; may unlock.
func (s *Stream) waitSpaceLocked(n int64) bool {
	limit := s.opts.SpoolLimit / 2
	if s.direct {
		// Copies stay within half the ring, so live writes are not
		// spilled to the spool by the resync's own records.
		limit = min(limit, int64(len(s.cache.buf))/2)
	}
	for !s.closed && s.spoolBytes > 0 && s.spoolBytes+n > limit {
		if s.ackCh == nil {
			s.ackCh = make(chan struct{})
		}
		ch := s.ackCh
		s.mu.Unlock()
		select {
		case <-ch:
		case <-s.done:
		}
		s.mu.Lock()
	}
	return !s.closed
}

// sleep waits d or until the stream closes (false).
func (s *Stream) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-s.done:
		return false
	}
}

// maxCopy bounds the bytes of one resync record: runs of dirty regions are
// coalesced up to it, so a fine-grained map (4 KiB) still copies in large
// records.
const maxCopy = 1 << 20

// copyLen is the most bytes one copy appends: maxCopy, but at most a
// quarter of the spool (the copy half is SpoolLimit/2) and at least one
// region.
func (s *Stream) copyLen() int64 {
	rs := s.opts.RegionSize
	n := min(int64(maxCopy), s.opts.SpoolLimit/4) / rs * rs
	return max(n, rs)
}

// copyRegionLocked appends dirty region r of d and the dirty regions right
// after it, as one record, and clears their bits. A run inside a file hole
// (found with SEEK_DATA) becomes one Zero record of any length without
// reading; a run holding data, of at most len(scratch) bytes, is read and
// appended as a Write (or a Zero if it reads all zero). It returns the
// region to look at next. If a committed change to the run has not yet
// reached the disk, it copies nothing and returns a channel closed when
// that change lands: holding s.mu, no other change can be committed, so
// once none is in flight the run on disk is exactly its state at the
// copy's seq. Called with s.mu held.
func (s *Stream) copyRegionLocked(d *Disk, r int64, scratch []byte) (int64, chan struct{}, error) {
	rs := s.opts.RegionSize
	size := d.fd.size
	off := r * rs
	last := r
	var rec *rebound.Record
	inHole := func(k, dataOff int64) bool { return min((k+1)*rs, size) <= dataOff }
	if dataOff := d.fd.nextData(off); inHole(r, dataOff) {
		for last+1 < d.dirty.regions && d.dirty.isDirty(last+1) && inHole(last+1, dataOff) {
			last++
		}
		rec = &rebound.Record{Kind: rebound.RecordZero, Disk: d.idx, Offset: off, Length: min((last+1)*rs, size) - off}
		if busy := s.busyLocked(d, off, off+rec.Length); busy != nil {
			return r, busy, nil
		}
	} else {
		maxRun := max(int64(len(scratch))/rs, 1)
		for last+1 < d.dirty.regions && last+1-r < maxRun && d.dirty.isDirty(last+1) {
			last++
		}
		buf := scratch[:min((last+1)*rs, size)-off]
		if busy := s.busyLocked(d, off, off+int64(len(buf))); busy != nil {
			return r, busy, nil
		}
		read := d.fd.ReadAt
		if s.opts.ReadDisk != nil {
			read = func(p []byte, off int64) (int, error) { return s.opts.ReadDisk(int(d.idx), p, off) }
		}
		if _, err := read(buf, off); err != nil {
			return r, nil, err
		}
		if allZero(buf) {
			rec = &rebound.Record{Kind: rebound.RecordZero, Disk: d.idx, Offset: off, Length: int64(len(buf))}
		} else {
			rec = &rebound.Record{Kind: rebound.RecordWrite, Disk: d.idx, Offset: off, Length: int64(len(buf)), Data: append([]byte(nil), buf...)}
		}
	}
	if err := s.appendLocked(rec); err != nil {
		return r, nil, err
	}
	if err := d.dirty.clearRange(r, last); err != nil {
		// In memory the bits are clear; a restart would only copy again.
		s.logger.Error("persisting dirty map failed", "disk", d.idx, "err", err)
	}
	s.syncDone += rec.Length
	return last + 1, nil, nil
}

// busyLocked returns a channel closed when an in-flight change of d
// overlapping [off, end) lands, or nil if none is in flight. Called with
// s.mu held.
func (s *Stream) busyLocked(d *Disk, off, end int64) chan struct{} {
	s.fmu.Lock()
	defer s.fmu.Unlock()
	for _, f := range d.flights {
		if f.off < end && off < f.end {
			return f.waitChan()
		}
	}
	return nil
}

// nextData returns the offset of the first data (non-hole) byte at or after
// off, the disk size if there is none, or off if the file system cannot say.
func (d *FileDisk) nextData(off int64) int64 {
	n, err := syscall.Seek(int(d.f.Fd()), off, seekData)
	switch {
	case errors.Is(err, syscall.ENXIO):
		return d.size
	case err != nil:
		return off
	}
	return min(n, d.size)
}

// nextHole returns the offset of the first hole at or after off (the disk
// size if there is none), or the disk size if the file system cannot say.
func (d *FileDisk) nextHole(off int64) int64 {
	n, err := syscall.Seek(int(d.f.Fd()), off, seekHole)
	if err != nil || n <= off {
		return d.size
	}
	return min(n, d.size)
}

func allZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeroChunk))
		if !bytes.Equal(b[:n], zeroChunk[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

// Repair answers a target that dropped damaged records (req.From..To): it
// compares every block of the disks with the target's digests, taken
// after the gap, and resyncs the blocks that differ. The regions become
// dirty and, under the same lock, a ResyncBegin tagged ResyncRepair is
// appended (inside a running resync too, which then also sends them): the
// target's gap window closes at the ResyncEnd that follows, when every
// dirty region has been sent. A block whose digest matches is right at the
// target already: its bytes not written after the gap are equal at both
// ends, and the rest arrive as records.
func (s *Stream) Repair(ctx context.Context, req *rebound.RepairRequest) error {
	if len(req.Digests) != len(s.disks) {
		return rebound.Errorf(rebound.EINVALID, "capture: repair digests cover %d disks, stream has %d", len(req.Digests), len(s.disks))
	}
	bs := req.BlockSize
	regions := make([][]rebound.Region, len(s.disks))
	var differ int64
	for i, d := range s.disks {
		size := d.fd.size
		n := (size + bs - 1) / bs
		if bs <= 0 || int64(len(req.Digests[i])) != n*digest.Size {
			return rebound.Errorf(rebound.EINVALID, "capture: repair digests of disk %d: %d bytes for %d-byte blocks of %d bytes", i, len(req.Digests[i]), bs, size)
		}
		theirs := make([][]byte, n)
		for k := range theirs {
			theirs[k] = req.Digests[i][k*digest.Size : (k+1)*digest.Size]
		}
		ours, err := digest.ReaderAt(ctx, d.fd.f, size, bs, 0)
		if err != nil {
			return fmt.Errorf("capture: repair: digests of disk %d: %w", i, err)
		}
		regions[i] = digest.Diff(ours, theirs, bs, size)
		for _, r := range regions[i] {
			differ += r.Length
		}
	}
	s.mu.Lock()
	if err := s.markResyncLocked(regions); err != nil {
		s.mu.Unlock()
		return fmt.Errorf("capture: repair: %w", err)
	}
	err := s.appendLocked(&rebound.Record{Kind: rebound.RecordResyncBegin, PointKind: rebound.ResyncRepair})
	s.mu.Unlock()
	if err != nil {
		// The target asks again on the next connect.
		return fmt.Errorf("capture: repair: %w", err)
	}
	s.logger.Warn("repairing the target's damaged journal", "lost_from", req.From, "lost_to", req.To, "differing_bytes", differ)
	return s.saveMeta()
}
