package journal

import (
	"errors"
	"fmt"
	"io"
	"sort"
	"sync"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/nbd"
)

// View is the read-only state of every disk at one consistent position.
// It pins the position: Expire never folds past an open view.
type View struct {
	j   *Journal
	seq uint64
	// layers of index roots, newest first: an extent in an earlier layer
	// hides the later ones; bytes no layer covers come from the base.
	layers [][]*node

	mu     sync.Mutex
	closed bool
}

// View returns the state of all disks at position seq, which must be
// consistent and retained. It copies no disk data: it snapshots the index
// (cheap at Durable, at most checkpointEvery records of replay otherwise).
func (j *Journal) View(seq uint64) (*View, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.closed {
		return nil, rebound.Errorf(rebound.ECONFLICT, "journal is closed")
	}
	if err := j.checkPosition(seq); err != nil {
		return nil, err
	}
	v := &View{j: j, seq: seq, layers: j.layersAt(seq)}
	j.pins[seq]++
	return v, nil
}

// checkPosition reports why seq cannot be viewed. Called with j.mu held.
func (j *Journal) checkPosition(seq uint64) error {
	low := max(j.base, j.folding)
	if d := j.durable.Load(); seq > d {
		return rebound.Errorf(rebound.ENOTFOUND, "position %d is not held yet (durable position is %d)", seq, d)
	}
	if seq < low {
		return rebound.Errorf(rebound.ENOTFOUND, "position %d is no longer retained (oldest retained position is %d)", seq, low)
	}
	if !j.consistent(seq) {
		if _, ok := j.oldestConsistent(); !ok {
			return errNoPoint
		}
		return rebound.Errorf(rebound.EINVALID, "position %d is inside a resync window and is not consistent", seq)
	}
	return nil
}

// layersAt returns index layers at position seq for a view. For an older
// position it is the nearest checkpoint below plus a small private tree of
// the records since, which is much cheaper to build than path-copying
// them into the checkpoint's large tree. Called with j.mu held.
func (j *Journal) layersAt(seq uint64) [][]*node {
	if seq == j.durable.Load() {
		return [][]*node{j.rootsAt(seq)}
	}
	i := sort.Search(len(j.checkpoints), func(i int) bool { return j.checkpoints[i].seq > seq }) - 1
	cp := j.checkpoints[i]
	delta := make([]*node, len(j.disks))
	ep := newEpoch()
	for k := j.recIndex(max(cp.seq, j.base) + 1); k < len(j.recs) && j.recs[k].seq <= seq; k++ {
		m := &j.recs[k]
		switch m.kind {
		case rebound.RecordWrite, rebound.RecordZero, rebound.RecordTrim:
			if m.length > 0 {
				delta[m.disk] = insert(delta[m.disk], extent(m), ep)
			}
		}
	}
	return [][]*node{delta, cp.roots}
}

// rootsAt returns index roots at position seq (B <= seq <= Durable) that
// no later append or fold mutates. Called with j.mu held.
func (j *Journal) rootsAt(seq uint64) []*node {
	if seq == j.durable.Load() {
		roots := append([]*node(nil), j.live...)
		j.epoch = newEpoch() // the live nodes are shared from now on
		return roots
	}
	i := sort.Search(len(j.checkpoints), func(i int) bool { return j.checkpoints[i].seq > seq }) - 1
	cp := j.checkpoints[i] // checkpoints[0].seq <= B <= seq
	roots := append([]*node(nil), cp.roots...)
	ep := newEpoch()
	for k := j.recIndex(max(cp.seq, j.base) + 1); k < len(j.recs) && j.recs[k].seq <= seq; k++ {
		m := &j.recs[k]
		switch m.kind {
		case rebound.RecordWrite, rebound.RecordZero, rebound.RecordTrim:
			if m.length > 0 {
				roots[m.disk] = insert(roots[m.disk], extent(m), ep)
			}
		}
	}
	return roots
}

// Seq returns the view's position.
func (v *View) Seq() uint64 { return v.seq }

// Disk returns a reader of disk i at the view's position. It is safe for
// concurrent use.
func (v *View) Disk(i int) DiskReader {
	return &diskView{v: v, i: i}
}

// Close unpins the view's position.
func (v *View) Close() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return nil
	}
	v.closed = true
	j := v.j
	j.mu.Lock()
	if j.pins[v.seq]--; j.pins[v.seq] <= 0 {
		delete(j.pins, v.seq)
	}
	j.mu.Unlock()
	return nil
}

var errViewClosed = errors.New("journal: view is closed")

type diskView struct {
	v *View
	i int
}

func (d *diskView) Size() int64 {
	if d.i < 0 || d.i >= len(d.v.j.disks) {
		return 0
	}
	return d.v.j.disks[d.i].Size
}

// ReadAt reads the disk at the view's position: the newest extent of
// (B, seq] covering each byte, the base file elsewhere.
func (d *diskView) ReadAt(p []byte, off int64) (int, error) {
	v, j := d.v, d.v.j
	if d.i < 0 || d.i >= len(j.disks) {
		return 0, rebound.Errorf(rebound.EINVALID, "disk %d does not exist (view has %d disks)", d.i, len(j.disks))
	}
	size := j.disks[d.i].Size
	if off < 0 {
		return 0, rebound.Errorf(rebound.EINVALID, "negative offset %d", off)
	}
	if off >= size {
		return 0, io.EOF
	}
	var eof error
	if int64(len(p)) > size-off {
		p, eof = p[:size-off], io.EOF
	}
	v.mu.Lock()
	closed := v.closed
	v.mu.Unlock()
	if closed {
		return 0, errViewClosed
	}
	// Shared: a fold cannot move B (and truncate the wal) mid-read.
	j.baseMu.RLock()
	defer j.baseMu.RUnlock()
	if j.shut.Load() {
		return 0, rebound.Errorf(rebound.ECONFLICT, "journal is closed")
	}
	base := j.bases[d.i]
	readBase := func(lo, hi int64) error {
		if lo >= hi {
			return nil
		}
		if _, err := base.ReadAt(p[lo-off:hi-off], lo); err != nil {
			return fmt.Errorf("journal: read base of disk %d at %d: %w", d.i, lo, err)
		}
		return nil
	}
	readExtent := func(n *node, a, b int64) error {
		switch {
		case n.seq <= j.base:
			// Folded: the base holds exactly these bytes now (no later
			// record up to the view's seq covers them).
			return readBase(a, b)
		case n.zero:
			clear(p[a-off : b-off])
			return nil
		}
		loc := n.loc
		loc.Offset += a - n.start
		if err := j.log.ReadData(loc, p[a-off:b-off]); err != nil {
			return fmt.Errorf("journal: read disk %d at %d: data of record %d is unavailable: %w", d.i, a, n.seq, err)
		}
		return nil
	}
	// read fills [lo, hi) from layers[k:], gaps from the base.
	var read func(k int, lo, hi int64) error
	read = func(k int, lo, hi int64) error {
		if lo >= hi {
			return nil
		}
		if k == len(v.layers) {
			return readBase(lo, hi)
		}
		pos := lo
		err := visit(v.layers[k][d.i], lo, hi, func(n *node) error {
			a, b := max(n.start, lo), min(n.end, hi)
			if err := read(k+1, pos, a); err != nil {
				return err
			}
			pos = b
			return readExtent(n, a, b)
		})
		if err != nil {
			return err
		}
		return read(k+1, pos, hi)
	}
	err := read(0, off, off+int64(len(p)))
	if err != nil {
		return 0, err
	}
	return len(p), eof
}

// Extents reports the allocation of [off, off+length) at the view's
// position (nbd.Extenter), following ReadAt: bytes of a zero or trim
// record are Zero, of a write record data, and bytes read from the base
// file take its holes (SEEK_DATA/SEEK_HOLE).
func (d *diskView) Extents(off, length int64) ([]nbd.Extent, error) {
	v, j := d.v, d.v.j
	if d.i < 0 || d.i >= len(j.disks) {
		return nil, rebound.Errorf(rebound.EINVALID, "disk %d does not exist (view has %d disks)", d.i, len(j.disks))
	}
	size := j.disks[d.i].Size
	if off < 0 || length < 0 || off > size || length > size-off {
		return nil, rebound.Errorf(rebound.EINVALID, "range %d+%d is outside the %d-byte disk", off, length, size)
	}
	v.mu.Lock()
	closed := v.closed
	v.mu.Unlock()
	if closed {
		return nil, errViewClosed
	}
	j.baseMu.RLock()
	defer j.baseMu.RUnlock()
	if j.shut.Load() {
		return nil, rebound.Errorf(rebound.ECONFLICT, "journal is closed")
	}
	base := j.bases[d.i]
	var out []nbd.Extent
	fromBase := func(lo, hi int64) error {
		if lo >= hi {
			return nil
		}
		xs, err := nbd.SeekExtents(base, lo, hi-lo)
		if err != nil {
			return fmt.Errorf("journal: extents of base of disk %d at %d: %w", d.i, lo, err)
		}
		for _, x := range xs {
			out = nbd.AppendExtent(out, x)
		}
		return nil
	}
	var walk func(k int, lo, hi int64) error
	walk = func(k int, lo, hi int64) error {
		if lo >= hi {
			return nil
		}
		if k == len(v.layers) {
			return fromBase(lo, hi)
		}
		pos := lo
		err := visit(v.layers[k][d.i], lo, hi, func(n *node) error {
			a, b := max(n.start, lo), min(n.end, hi)
			if err := walk(k+1, pos, a); err != nil {
				return err
			}
			pos = b
			switch {
			case n.seq <= j.base:
				if err := fromBase(a, b); err != nil { // folded: the base holds these bytes
					return err
				}
			case n.zero:
				out = nbd.AppendExtent(out, nbd.Extent{Length: b - a, Zero: true})
			default:
				out = nbd.AppendExtent(out, nbd.Extent{Length: b - a})
			}
			if len(out) >= nbd.MaxExtents {
				return errEnough // a prefix is a valid answer
			}
			return nil
		})
		if err != nil {
			return err
		}
		return walk(k+1, pos, hi)
	}
	if err := walk(0, off, off+length); err != nil && err != errEnough {
		return nil, err
	}
	return out, nil
}

var errEnough = errors.New("enough extents")
