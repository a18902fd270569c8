package journal

import (
	"fmt"
	"path/filepath"
	"sort"
	"syscall"
	"time"

	"github.com/rebound-dr/rebound"
)

// Expire folds into the base files every record up to F, the newest
// consistent position older than before, but never past the newest
// recovery point (one is always kept) nor past the lowest open view. It
// returns how many records were folded.
func (j *Journal) Expire(before time.Time) (uint64, error) {
	j.foldMu.Lock()
	defer j.foldMu.Unlock()
	j.mu.Lock()
	if j.closed {
		j.mu.Unlock()
		return 0, rebound.Errorf(rebound.ECONFLICT, "journal is closed")
	}
	b := j.base
	if pending := j.meta.FoldTo; pending != 0 {
		// An earlier fold failed part way: the base may hold some of its
		// records, so it must reach at least that position first.
		j.mu.Unlock()
		if err := j.fold(pending); err != nil {
			return 0, err
		}
		j.mu.Lock()
	}
	f, ok := j.foldTarget(before.UnixNano())
	if !ok || f <= j.base {
		j.mu.Unlock()
		return j.base - b, nil
	}
	if err := j.foldToLocked(f); err != nil {
		return 0, err
	}
	return f - b, nil
}

// foldToLocked records in meta.json that the base is moving to f, then
// folds. Called with j.mu held (it unlocks it) and foldMu held. From the
// meta write on, a failure leaves folding and meta.FoldTo set: views below
// f stay refused and the next Expire or Open finishes the fold.
func (j *Journal) foldToLocked(f uint64) error {
	j.folding = f // new views below f are refused from now on
	m := j.meta
	j.mu.Unlock()
	m.FoldTo = f
	if err := writeMeta(j.dir, m); err != nil {
		j.mu.Lock()
		j.folding = 0
		j.mu.Unlock()
		return err
	}
	j.mu.Lock()
	j.meta = m
	j.mu.Unlock()
	return j.fold(f)
}

// foldTarget picks F. Called with j.mu held.
func (j *Journal) foldTarget(before int64) (uint64, bool) {
	limit := j.durable.Load()
	// Keep the newest recovery point: a mark, or without marks the
	// newest consistent position.
	if n := len(j.marks); n > 0 {
		limit = min(limit, j.marks[n-1])
	} else if j.meta.BaseKind != "" {
		return 0, false // the only point is the base itself
	} else if s, ok := j.consistentAtOrBefore(limit); ok {
		limit = s
	} else {
		return 0, false
	}
	for s := range j.pins {
		limit = min(limit, s)
	}
	// Positions whose time is < before.
	n := sort.Search(len(j.recs), func(i int) bool { return j.recs[i].time >= before })
	if n == 0 {
		return 0, false
	}
	limit = min(limit, j.recs[n-1].seq)
	return j.consistentAtOrBefore(limit)
}

// fold applies (B, f] to the base files, then moves B to f. meta.json
// already says FoldTo f, so a crash anywhere makes Open redo the fold;
// redoing it writes the same bytes again.
func (j *Journal) fold(f uint64) error {
	j.mu.Lock()
	b := j.base
	if f <= b {
		j.mu.Unlock()
		return nil
	}
	if f > j.durable.Load() {
		j.mu.Unlock()
		return fmt.Errorf("journal: fold to %d past durable position %d: the wal lost records", f, j.durable.Load())
	}
	roots := j.rootsAt(f)
	fm := *j.rec(f)
	j.mu.Unlock()

	// The index at f holds, per byte range, the newest record <= f. Writing
	// the extents newer than B gives the base the state at f. Ranges with
	// no record in (B, f] are already right.
	buf := make([]byte, 1<<20)
	for i, root := range roots {
		base := j.bases[i]
		err := visit(root, 0, j.disks[i].Size, func(n *node) error {
			if n.seq <= b {
				return nil
			}
			if n.zero {
				return zeroRange(base, n.start, n.end-n.start, buf)
			}
			for pos := n.start; pos < n.end; {
				k := min(int64(len(buf)), n.end-pos)
				loc := n.loc
				loc.Offset += pos - n.start
				if err := j.log.ReadData(loc, buf[:k]); err != nil {
					return fmt.Errorf("journal: fold record %d: %w", n.seq, err)
				}
				if _, err := base.WriteAt(buf[:k], pos); err != nil {
					return fmt.Errorf("journal: fold into base %d: %w", i, err)
				}
				pos += k
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	if j.crashAt == 1 {
		return errCrash
	}
	for i, base := range j.bases {
		if err := base.Sync(); err != nil {
			return fmt.Errorf("journal: fold: sync base %d: %w", i, err)
		}
	}
	j.mu.Lock()
	m := j.meta
	j.mu.Unlock()
	m.Base, m.BaseTime, m.FoldTo, m.BaseKind = f, fm.time, 0, ""
	if fm.kind == rebound.RecordMark {
		m.BaseKind = fm.pk
		if m.BaseKind == "" {
			m.BaseKind = rebound.PointCrash
		}
	}
	if j.crashAt == 2 {
		return errCrash
	}
	if err := writeMeta(j.dir, m); err != nil {
		return err
	}
	if j.crashAt == 3 {
		return errCrash
	}

	j.baseMu.Lock()
	j.mu.Lock()
	j.meta = m
	j.base = f
	j.folding = 0
	j.recs = append([]recMeta(nil), j.recs[j.recIndex(f+1):]...)
	g := sort.Search(len(j.gaps), func(i int) bool { return j.gaps[i] > f })
	j.gaps = append([]uint64(nil), j.gaps[g:]...)
	i := sort.Search(len(j.checkpoints), func(i int) bool { return j.checkpoints[i].seq > f }) - 1
	j.checkpoints = j.checkpoints[i:]
	k := sort.Search(len(j.marks), func(i int) bool { return j.marks[i] > f })
	j.marks = append([]uint64(nil), j.marks[k:]...)
	w := 0
	for _, win := range j.windows {
		if win.open || win.hi > f {
			j.windows[w] = win
			w++
		}
	}
	j.windows = j.windows[:w]
	j.mu.Unlock()
	j.baseMu.Unlock()

	if err := j.log.TruncateFront(f); err != nil {
		// Harmless: the records stay in the wal and are skipped on open.
		j.logger.Warn("journal: truncate wal after fold", "err", err)
	}
	return nil
}

// zeroRange makes [off, off+n) of f read as zeroes, punching a hole where
// the filesystem can.
func zeroRange(f interface {
	Fd() uintptr
	WriteAt([]byte, int64) (int, error)
}, off, n int64, buf []byte) error {
	const punchHole, keepSize = 0x02, 0x01
	if err := syscall.Fallocate(int(f.Fd()), punchHole|keepSize, off, n); err == nil {
		return nil
	}
	clear(buf)
	for n > 0 {
		k := min(int64(len(buf)), n)
		if _, err := f.WriteAt(buf[:k], off); err != nil {
			return fmt.Errorf("journal: zero base range: %w", err)
		}
		off += k
		n -= k
	}
	return nil
}

// Test hooks: crashAt stops a fold at a step as a crash would.
var errCrash = fmt.Errorf("journal: simulated crash")

// abandon drops the journal's files without any cleanup, as a crash does.
func (j *Journal) abandon() {
	j.log.Close()
	j.closeFiles()
}

// FoldAll folds every durable record into the base files, so they hold the
// journal's newest state: a group changing members adopts them as the base
// of its new journal (site/group.go). No view may be open; the journal's
// points end at its head.
func (j *Journal) FoldAll() error {
	j.foldMu.Lock()
	defer j.foldMu.Unlock()
	j.mu.Lock()
	switch {
	case j.closed:
		j.mu.Unlock()
		return rebound.Errorf(rebound.ECONFLICT, "journal is closed")
	case len(j.pins) > 0:
		j.mu.Unlock()
		return rebound.Errorf(rebound.ECONFLICT, "journal: a view is open; close the failover or test failover first")
	case len(j.gaps) > 0 || j.corrupt != nil:
		j.mu.Unlock()
		return rebound.Errorf(rebound.ECONFLICT, "journal: damaged records are being repaired; retry when the repair is done")
	}
	pending, f := j.meta.FoldTo, j.durable.Load()
	j.mu.Unlock()
	if pending != 0 {
		if err := j.fold(pending); err != nil {
			return err
		}
	}
	j.mu.Lock()
	if f <= j.base {
		j.mu.Unlock()
		return nil
	}
	return j.foldToLocked(f)
}

// BasePath is the base file of disk i of the journal in dir.
func BasePath(dir string, i int) string { return filepath.Join(dir, baseName(i)) }
