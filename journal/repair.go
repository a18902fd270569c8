package journal

import (
	"context"
	"fmt"
	"sort"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/digest"
)

// recIndex returns the index in recs of the first record with seq >= s.
// Without a gap before s that is s-B-1; a gap leaves fewer records than
// seqs, so then it searches. Called with j.mu held.
func (j *Journal) recIndex(s uint64) int {
	if s <= j.base {
		return 0
	}
	if i := s - j.base - 1; i < uint64(len(j.recs)) && j.recs[i].seq == s {
		return int(i)
	}
	return sort.Search(len(j.recs), func(k int) bool { return j.recs[k].seq >= s })
}

// rec returns the record at position s, which must exist (B < s <= Durable
// and not inside a gap). Called with j.mu held.
func (j *Journal) rec(s uint64) *recMeta { return &j.recs[j.recIndex(s)] }

// Repair is the first step of an automatic repair of a damaged journal: it
// drops the wal from the first damaged record on (wal.DropCorrupt) and
// writes a gap record in its place, so the journal takes appends again
// after the last seq the wal had. The points before the damage stay; no
// position from the damage on is consistent until the source's repair
// resync (see RepairRequest) ends. It returns the seqs lost, from..to
// (from > to when the damage held nothing above the base).
func (j *Journal) Repair() (from, to uint64, err error) {
	j.appendMu.Lock()
	defer j.appendMu.Unlock()
	j.mu.Lock()
	corrupt, closed := j.corrupt, j.closed
	j.mu.Unlock()
	switch {
	case closed:
		return 0, 0, rebound.Errorf(rebound.ECONFLICT, "journal is closed")
	case corrupt == nil:
		return 1, 0, nil
	case j.log.Corrupt() == nil:
		// A checksummed record that does not fit the stream: not a
		// damaged frame, so the wal cannot cut it.
		return 0, 0, rebound.Errorf(rebound.EINTERNAL, "journal cannot repair itself: %v", corrupt)
	}
	durable := j.durable.Load()
	last := j.log.LastSeq()
	if last <= durable {
		last = durable + 1 // nothing readable past the damage: one seq at least
	}
	j.mu.Lock()
	m := j.meta
	j.mu.Unlock()
	m.Lost = &[2]uint64{durable + 1, last}
	if err := writeMeta(j.dir, m); err != nil {
		return 0, 0, err
	}
	j.mu.Lock()
	j.meta = m
	j.mu.Unlock()
	if _, _, err := j.log.DropCorrupt(); err != nil {
		return 0, 0, fmt.Errorf("journal: repair: %w", err)
	}
	if j.log.LastSeq() > durable {
		return 0, 0, rebound.Errorf(rebound.EINTERNAL, "journal: repair: the wal kept records up to %d, the journal indexed up to %d", j.log.LastSeq(), durable)
	}
	if err := j.appendGap(durable+1, last); err != nil {
		return 0, 0, err
	}
	j.mu.Lock()
	j.corrupt = nil
	j.mu.Unlock()
	j.logger.Warn("journal: damaged records dropped; waiting for the source's repair resync", "dir", j.dir, "lost_from", durable+1, "lost_to", last)
	return durable + 1, last, nil
}

// appendGap writes the gap record of lost seqs from..to (Seq to) and
// indexes it. Called with appendMu held, or from Open.
func (j *Journal) appendGap(from, to uint64) error {
	j.log.Skip(to - 1)
	rec := &rebound.Record{Seq: to, Time: time.Now().UnixNano(), Kind: rebound.RecordGap, Offset: int64(from)}
	locs, err := j.log.Append(rec)
	if err == nil {
		err = j.log.Sync()
	}
	if err != nil {
		return fmt.Errorf("journal: write gap record: %w", err)
	}
	j.mu.Lock()
	j.index(rec, locs[0])
	j.mu.Unlock()
	return nil
}

// Repairing returns the seqs a gap lost while its window waits for the
// source's repair resync; ok is false when no repair is pending.
func (j *Journal) Repairing() (from, to uint64, armed, ok bool) {
	j.mu.Lock()
	defer j.mu.Unlock()
	for i := len(j.windows) - 1; i >= 0; i-- {
		if w := j.windows[i]; w.open && w.gap && !w.crash {
			return w.lost[0], w.lost[1], w.armed, true
		}
	}
	return 0, 0, false, false
}

// RepairRequest returns the digests a pending, not yet armed repair sends
// its source (nil when no repair is waiting for them). Any block whose digest here equals the
// source's is right once the stream continues: its bytes not written
// after the gap are the same at both ends, the others arrive as records.
func (j *Journal) RepairRequest(ctx context.Context) (*rebound.RepairRequest, error) {
	from, to, armed, ok := j.Repairing()
	if !ok || armed {
		return nil, nil
	}
	j.mu.Lock()
	if j.closed {
		j.mu.Unlock()
		return nil, rebound.Errorf(rebound.ECONFLICT, "journal is closed")
	}
	seq := j.durable.Load()
	// Not a consistent position: the view is only read for digests.
	v := &View{j: j, seq: seq, layers: j.layersAt(seq)}
	j.pins[seq]++
	j.mu.Unlock()
	defer v.Close()
	blockSize := repairBlockSize(j.disks)
	req := &rebound.RepairRequest{From: from, To: to, BlockSize: blockSize}
	for i, d := range j.disks {
		sums, err := digest.ReaderAt(ctx, v.Disk(i), d.Size, blockSize, 0)
		if err != nil {
			return nil, fmt.Errorf("journal: digests of disk %d: %w", i, err)
		}
		packed := make([]byte, 0, len(sums)*digest.Size)
		for _, s := range sums {
			packed = append(packed, s...)
		}
		req.Digests = append(req.Digests, packed)
	}
	return req, nil
}

// repairBlockSize picks the digest block size of a repair: 4 KiB (the
// resync's region size at the site) while the digests stay under 1 MiB
// (they travel in one message), larger blocks for larger disks.
func repairBlockSize(disks []rebound.Disk) int64 {
	bs := int64(4 << 10)
	for bs < digest.MaxBlockSize {
		var n int64
		for _, d := range disks {
			n += (d.Size + bs - 1) / bs
		}
		if n*digest.Size <= 1<<20 {
			break
		}
		bs *= 2
	}
	return bs
}
