package journal

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/rebound-dr/rebound"
)

// The helpers below are called with j.mu held.

// consistent reports whether position s is a consistent state that the
// journal retains: B <= s <= Durable and s is not inside a resync window.
func (j *Journal) consistent(s uint64) bool {
	if s < j.base || s > j.durable.Load() {
		return false
	}
	if s == j.base && j.base == 0 {
		return false // empty disks before the initial copy
	}
	return j.windowAt(s) == nil
}

// windowAt returns the resync window holding s, if any.
func (j *Journal) windowAt(s uint64) *window {
	i := sort.Search(len(j.windows), func(i int) bool { return j.windows[i].lo > s }) - 1
	if i < 0 {
		return nil
	}
	w := &j.windows[i]
	if w.open || s <= w.hi {
		return w
	}
	return nil
}

// consistentAtOrBefore returns the newest consistent position <= s.
func (j *Journal) consistentAtOrBefore(s uint64) (uint64, bool) {
	if d := j.durable.Load(); s > d {
		s = d
	}
	for s >= j.base {
		w := j.windowAt(s)
		if w == nil {
			break
		}
		if w.lo == 0 {
			return 0, false
		}
		s = w.lo - 1
	}
	if s < j.base || !j.consistent(s) {
		return 0, false
	}
	return s, true
}

// oldestConsistent returns the oldest consistent position retained.
func (j *Journal) oldestConsistent() (uint64, bool) {
	s := j.base
	if s == 0 {
		s = 1
	}
	for s <= j.durable.Load() {
		w := j.windowAt(s)
		if w == nil {
			return s, true
		}
		if w.open {
			return 0, false
		}
		s = w.hi + 1
	}
	return 0, false
}

func (j *Journal) timeOf(s uint64) time.Time {
	if s == j.base {
		return time.Unix(0, j.meta.BaseTime).UTC()
	}
	return time.Unix(0, j.rec(s).time).UTC()
}

func pointID(s uint64) string { return "p" + strconv.FormatUint(s, 10) }

// pointAt describes consistent position s: a mark's kind or crash.
func (j *Journal) pointAt(s uint64) rebound.RecoveryPoint {
	kind := rebound.PointCrash
	if s == j.base {
		if j.meta.BaseKind != "" {
			kind = j.meta.BaseKind
		}
	} else if m := j.rec(s); m.kind == rebound.RecordMark && m.pk != "" {
		kind = m.pk
	}
	return rebound.RecoveryPoint{ID: pointID(s), Time: j.timeOf(s), Kind: kind, Seq: s}
}

// markPoints returns the journal's marks at consistent positions, oldest
// first, including a mark folded into the base.
func (j *Journal) markPoints() []rebound.RecoveryPoint {
	var pts []rebound.RecoveryPoint
	if j.base > 0 && j.meta.BaseKind != "" {
		pts = append(pts, j.pointAt(j.base))
	}
	for _, s := range j.marks {
		pts = append(pts, j.pointAt(s))
	}
	return pts
}

// Points returns the recovery points (marks at consistent positions,
// oldest first) and the window of time any second of which can be
// recovered.
func (j *Journal) Points() rebound.PointList {
	j.mu.Lock()
	defer j.mu.Unlock()
	pl := rebound.PointList{Points: j.markPoints()}
	if pl.Points == nil {
		pl.Points = []rebound.RecoveryPoint{}
	}
	if lo, ok := j.oldestConsistent(); ok {
		hi, _ := j.consistentAtOrBefore(j.durable.Load())
		pl.Oldest, pl.Newest = j.timeOf(lo), j.timeOf(hi)
	}
	return pl
}

// PointsPage returns one page of Points (rebound.SiteService.QueryPoints)
// without building the whole list: the marks after q.After are found by
// binary search, and only the page's points are described.
func (j *Journal) PointsPage(q rebound.PointQuery) rebound.PointList {
	j.mu.Lock()
	defer j.mu.Unlock()
	pl := rebound.PointList{Points: []rebound.RecoveryPoint{}}
	if lo, ok := j.oldestConsistent(); ok {
		hi, _ := j.consistentAtOrBefore(j.durable.Load())
		pl.Oldest, pl.Newest = j.timeOf(lo), j.timeOf(hi)
	}
	// The candidates in order: the base's folded mark, then the marks.
	var seqs []uint64
	if j.base > 0 && j.meta.BaseKind != "" && j.base > q.After {
		seqs = append(seqs, j.base)
	}
	i := sort.Search(len(j.marks), func(i int) bool { return j.marks[i] > q.After })
	add := func(p rebound.RecoveryPoint) bool {
		if !q.Match(p) {
			return true
		}
		if q.Limit > 0 && len(pl.Points) == q.Limit {
			pl.Next = pl.Points[q.Limit-1].Seq
			return false
		}
		pl.Points = append(pl.Points, p)
		return true
	}
	for _, s := range seqs {
		if !add(j.pointAt(s)) {
			return pl
		}
	}
	for _, s := range j.marks[i:] {
		if !add(j.pointAt(s)) {
			return pl
		}
	}
	return pl
}

// NewestPoint returns the newest recovery point (the last of Points)
// without building the list: the site reports it for every journal every
// 2 s, and a list is one point per mark.
func (j *Journal) NewestPoint() (rebound.RecoveryPoint, bool) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if n := len(j.marks); n > 0 {
		return j.pointAt(j.marks[n-1]), true
	}
	if j.base > 0 && j.meta.BaseKind != "" {
		return j.pointAt(j.base), true
	}
	return rebound.RecoveryPoint{}, false
}

var errNoPoint = rebound.Errorf(rebound.ENOTFOUND, "no recovery point yet: initial replication has not completed")

// Resolve turns a selector into a consistent retained position:
// "latest" (newest consistent position), "latest-processed" (newest mark),
// "latest-app-consistent" (newest app mark), "p<seq>", or an RFC 3339 time
// (newest consistent position at or before it).
func (j *Journal) Resolve(selector string) (rebound.RecoveryPoint, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	var none rebound.RecoveryPoint
	sel := strings.TrimSpace(selector)
	if sel == "" {
		return none, rebound.Errorf(rebound.EINVALID, "empty point selector: use latest, latest-processed, latest-app-consistent, a point ID (p<seq>) or an RFC 3339 time")
	}
	oldest, ok := j.oldestConsistent()
	if !ok {
		return none, errNoPoint
	}
	newest, _ := j.consistentAtOrBefore(j.durable.Load())
	switch {
	case sel == rebound.PointLatest:
		p := j.pointAt(newest)
		p.Kind = rebound.PointCrash
		return p, nil
	case sel == rebound.PointLatestProcessed, sel == rebound.PointLatestAppConsistent:
		pts := j.markPoints()
		for i := len(pts) - 1; i >= 0; i-- {
			if sel == rebound.PointLatestProcessed || pts[i].Kind == rebound.PointApp {
				return pts[i], nil
			}
		}
		if sel == rebound.PointLatestProcessed {
			return none, rebound.Errorf(rebound.ENOTFOUND, "no recovery point has been cut yet")
		}
		return none, rebound.Errorf(rebound.ENOTFOUND, "no app-consistent recovery point is retained")
	case len(sel) > 1 && sel[0] == 'p' && sel[1] >= '0' && sel[1] <= '9':
		s, err := strconv.ParseUint(sel[1:], 10, 64)
		if err != nil {
			return none, rebound.Errorf(rebound.EINVALID, "invalid point ID %q", sel)
		}
		if s < j.base || s > j.durable.Load() {
			return none, rebound.Errorf(rebound.ENOTFOUND, "point %s is not retained (retained positions: %d to %d)", sel, j.base, j.durable.Load())
		}
		if !j.consistent(s) {
			return none, rebound.Errorf(rebound.ENOTFOUND, "point %s is inside a resync window and is not consistent", sel)
		}
		return j.pointAt(s), nil
	}
	t, err := time.Parse(time.RFC3339Nano, sel)
	if err != nil {
		return none, rebound.Errorf(rebound.EINVALID, "invalid point selector %q: use latest, latest-processed, latest-app-consistent, a point ID (p<seq>) or an RFC 3339 time", selector)
	}
	lo, hi := j.timeOf(oldest), j.timeOf(newest)
	window := fmt.Sprintf("recoverable window is %s to %s", lo.Format(time.RFC3339Nano), hi.Format(time.RFC3339Nano))
	if t.Before(lo) {
		return none, rebound.Errorf(rebound.ENOTFOUND, "time %s is before the oldest recoverable point; %s", sel, window)
	}
	if t.After(hi) {
		return none, rebound.Errorf(rebound.ENOTFOUND, "time %s is after the newest recoverable point; %s", sel, window)
	}
	// The newest position whose record time is <= t, then back to a
	// consistent one.
	tn := t.UnixNano()
	var s uint64
	if n := sort.Search(len(j.recs), func(i int) bool { return j.recs[i].time > tn }); n > 0 {
		s = j.recs[n-1].seq
	} else {
		s = j.base
	}
	p, ok := j.consistentAtOrBefore(s)
	if !ok || p < oldest {
		return none, rebound.Errorf(rebound.ENOTFOUND, "no consistent position at or before %s; %s", sel, window)
	}
	return j.pointAt(p), nil
}
