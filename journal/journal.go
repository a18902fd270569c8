// Package journal is the receiving site's journal of one replication
// stream: base files holding every disk at a base position, a wal of the
// records after it, and an in-memory index that turns any consistent
// position into a read-only view of all disks without copying them.
// See docs/design/journal.md.
package journal

import (
	"encoding/json"
	"errors"
	"fmt"
	"github.com/rebound-dr/rebound/internal/fsutil"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/wal"
)

// checkpointEvery is how many records apart index snapshots are kept. A
// view of an older position replays at most this many records' metadata.
const checkpointEvery = 1024

// checkpointRatio: older checkpoints are thinned to gaps of about
// age/checkpointRatio records.
const checkpointRatio = 8

var testCheckpointEvery uint64 // tests: checkpoint more often

const (
	metaFile   = "meta.json"
	walDir     = "wal"
	metaFormat = 1
)

// Options configure a Journal.
type Options struct {
	SegmentSize int64 // wal segment size; default wal's
	Logger      *slog.Logger
	// OnRepaired, if set, is called (outside the journal's locks) when a
	// repair resync closes the window of a gap: seqs from..to were lost
	// and their regions are whole again.
	OnRepaired func(from, to uint64)
}

// DiskReader reads one disk of a view.
type DiskReader interface {
	Size() int64
	ReadAt(p []byte, off int64) (int, error)
}

// recMeta is what the index keeps of a record: everything but its data.
type recMeta struct {
	seq    uint64
	time   int64
	off    int64
	length int64
	loc    wal.Location
	disk   uint32
	kind   rebound.RecordKind
	pk     rebound.PointKind
}

type checkpoint struct {
	seq   uint64
	roots []*node
}

// window is a run [lo, hi] of positions inside a resync window; open
// windows have not seen their ResyncEnd yet and extend to Durable.
type window struct {
	lo, hi uint64
	open   bool
	// gap: the window was opened by a gap (damaged records dropped at
	// Open). Only a ResyncEnd after a ResyncBegin tagged ResyncRepair
	// (armed) closes it: an unrelated resync's end would leave the lost
	// regions stale.
	gap, armed bool
	lost       [2]uint64 // first and last seq the gap dropped
	// crash: the gap is seqs a restarted source lost (a gap record
	// tagged ResyncSourceCrash), not damage: the source's crash resync
	// (a ResyncBegin tagged so) arms it and its ResyncEnd closes it; no
	// repair is asked for.
	crash bool
}

type meta struct {
	Format   int               `json:"format"`
	Disks    []rebound.Disk    `json:"disks"`
	Base     uint64            `json:"base"`               // base position B
	BaseTime int64             `json:"baseTime"`           // time of the record at B
	BaseKind rebound.PointKind `json:"baseKind,omitempty"` // set if the record at B was a mark
	FoldTo   uint64            `json:"foldTo,omitempty"`   // a fold to this position was in progress
	// Lost is the intent of a repair: seqs Lost[0]..Lost[1] were dropped
	// as damage. Written before the wal is cut, so a crash before the gap
	// record lands still knows the gap (Open writes it then).
	Lost *[2]uint64 `json:"lost,omitempty"`
}

// Journal is one stream's journal. It implements rebound.ReplSink. Methods
// are safe for concurrent use.
type Journal struct {
	dir    string
	disks  []rebound.Disk
	bases  []*os.File
	log    *wal.Log
	logger *slog.Logger

	durable atomic.Uint64
	shut    atomic.Bool // closed, for readers that avoid mu; set under baseMu

	appendMu sync.Mutex // serializes Append
	foldMu   sync.Mutex // serializes Expire

	// baseMu: readers hold it shared while they decide between base and
	// wal and read; a fold holds it exclusively to move the base position.
	baseMu sync.RWMutex
	base   uint64 // B; written under baseMu and mu

	mu          sync.Mutex
	meta        meta
	recs        []recMeta // records (B, Durable], recs[i].seq == B+1+i
	live        []*node   // index roots at Durable, one per disk
	epoch       uint64    // epoch of the live tree's private nodes
	checkpoints []checkpoint
	windows     []window
	marks       []uint64 // seqs of marks at consistent positions
	pins        map[uint64]int
	folding     uint64 // target of a fold in progress, 0 if none
	corrupt     error
	gaps        []uint64 // seqs of gap records above B
	repaired    [][2]uint64
	onRepaired  func(from, to uint64)
	err         error // sticky: an append failed in a way that leaves the wal unknown
	closed      bool

	crashAt int    // tests: stop a fold at this step
	cpEvery uint64 // checkpointEvery; tests lower it
}

var epochs atomic.Uint64

func newEpoch() uint64 { return epochs.Add(1) }

// Open opens the journal in dir, creating it (and sparse zero base files
// of the disks' sizes) on first use. It rebuilds the index from the wal,
// finishing a fold a crash interrupted. A torn wal tail is truncated; a
// corrupt record makes Corrupt() non-nil and the journal ends before it.
func Open(dir string, disks []rebound.Disk, opts Options) (*Journal, error) {
	if len(disks) == 0 {
		return nil, rebound.Errorf(rebound.EINVALID, "journal needs at least one disk")
	}
	for i, d := range disks {
		if d.Size <= 0 {
			return nil, rebound.Errorf(rebound.EINVALID, "disk %d (%s): invalid size %d", i, d.Name, d.Size)
		}
	}
	j := &Journal{dir: dir, logger: opts.Logger, pins: map[uint64]int{}, cpEvery: checkpointEvery, onRepaired: opts.OnRepaired}
	if testCheckpointEvery != 0 {
		j.cpEvery = testCheckpointEvery
	}
	if j.logger == nil {
		j.logger = slog.Default()
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	m, err := readMeta(dir)
	fresh := errors.Is(err, os.ErrNotExist)
	if err != nil && !fresh {
		return nil, err
	}
	if fresh {
		m = meta{Format: metaFormat, Disks: disks}
	} else if err := sameDisks(m.Disks, disks); err != nil {
		return nil, err
	}
	j.disks = m.Disks
	j.meta = m
	for i, d := range j.disks {
		f, err := os.OpenFile(filepath.Join(dir, baseName(i)), os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			j.closeFiles()
			return nil, fmt.Errorf("journal: %w", err)
		}
		j.bases = append(j.bases, f)
		if fresh {
			if err := f.Truncate(d.Size); err != nil {
				j.closeFiles()
				return nil, fmt.Errorf("journal: create base: %w", err)
			}
			if err := f.Sync(); err != nil {
				j.closeFiles()
				return nil, fmt.Errorf("journal: create base: %w", err)
			}
		}
	}
	if fresh {
		// meta.json's existence marks the base files as complete.
		if err := writeMeta(dir, m); err != nil {
			j.closeFiles()
			return nil, err
		}
	}
	// The wal's verifying pass at open also rebuilds the index.
	j.prepare()
	j.log, err = wal.Open(filepath.Join(dir, walDir), wal.Options{SegmentSize: opts.SegmentSize, Logger: j.logger, Visit: j.visit, Direct: true})
	if err != nil {
		j.closeFiles()
		return nil, fmt.Errorf("journal: %w", err)
	}
	if err := j.log.Corrupt(); err != nil && j.corrupt == nil {
		j.setCorrupt(fmt.Errorf("journal: records after seq %d are unreadable: %w", j.durable.Load(), err))
	}
	if l := j.meta.Lost; l != nil && j.corrupt == nil && j.durable.Load() < l[1] && j.durable.Load()+1 >= l[0] {
		// A repair cut the wal but its gap record never landed.
		if err := j.appendGap(l[0], l[1]); err != nil {
			j.log.Close()
			j.closeFiles()
			return nil, err
		}
	}
	if j.meta.FoldTo != 0 {
		// A fold was interrupted: redo it; applying its records again is
		// idempotent.
		j.logger.Warn("journal: finishing interrupted fold", "dir", dir, "base", j.base, "to", j.meta.FoldTo)
		if err := j.fold(j.meta.FoldTo); err != nil {
			j.log.Close()
			j.closeFiles()
			return nil, err
		}
	}
	j.repaired = nil // repairs finished before this Open are history
	return j, nil
}

func baseName(i int) string { return fmt.Sprintf("base-%03d.img", i) }

func sameDisks(have, want []rebound.Disk) error {
	if len(have) != len(want) {
		return rebound.Errorf(rebound.EINVALID, "journal holds %d disks, asked to open with %d", len(have), len(want))
	}
	for i := range have {
		if have[i].Size != want[i].Size {
			return rebound.Errorf(rebound.EINVALID, "journal disk %d is %d bytes, asked to open with %d", i, have[i].Size, want[i].Size)
		}
	}
	return nil
}

func readMeta(dir string) (meta, error) {
	var m meta
	b, err := os.ReadFile(filepath.Join(dir, metaFile))
	if err != nil {
		return m, err
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("journal: %s: %w", metaFile, err)
	}
	if m.Format != metaFormat {
		return m, fmt.Errorf("journal: %s: unknown format %d", metaFile, m.Format)
	}
	return m, nil
}

// writeMeta replaces meta.json atomically and durably.
func writeMeta(dir string, m meta) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(filepath.Join(dir, metaFile), b, 0o600); err != nil {
		return fmt.Errorf("journal: write meta: %w", err)
	}
	return nil
}

func (j *Journal) closeFiles() {
	for _, f := range j.bases {
		f.Close()
	}
}

// prepare sets up the in-memory state at the base position, before the
// wal's records are visited.
func (j *Journal) prepare() {
	j.base = j.meta.Base
	j.durable.Store(j.base)
	j.epoch = newEpoch()
	j.live = make([]*node, len(j.disks))
	j.checkpoints = []checkpoint{{seq: j.base, roots: make([]*node, len(j.disks))}}
	if j.base == 0 {
		// The stream starts with its initial copy: nothing is consistent
		// before the first ResyncEnd.
		j.windows = []window{{lo: 1, open: true}}
	}
}

// visit indexes one record of the wal during Open. Records at or below the
// base are already folded (a crash came between moving the base and
// truncating the wal). Indexing stops at the first record that does not
// fit: the journal is then corrupt and ends before it.
func (j *Journal) visit(rec *rebound.Record, loc wal.Location) error {
	if rec.Seq <= j.base || j.corrupt != nil {
		return nil
	}
	if rec.Kind == rebound.RecordGap && rec.Seq > j.durable.Load() {
		j.index(rec, loc)
		return nil
	}
	if d := j.durable.Load(); rec.Seq != d+1 {
		j.setCorrupt(fmt.Errorf("journal: wal record %d does not follow seq %d: records are missing", rec.Seq, d))
		return nil
	}
	if err := j.validate(rec); err != nil {
		j.setCorrupt(fmt.Errorf("journal: wal record %d: %w", rec.Seq, err))
		return nil
	}
	j.index(rec, loc)
	return nil
}

func (j *Journal) setCorrupt(err error) {
	j.corrupt = err
	j.logger.Error("journal: corrupt", "dir", j.dir, "err", err)
}

// Corrupt returns a non-nil error if the journal found records it cannot
// serve. The journal then ends before them and refuses appends.
func (j *Journal) Corrupt() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.corrupt
}

// Durable returns the highest sequence held durably, 0 if none.
func (j *Journal) Durable() uint64 { return j.durable.Load() }

// Disks returns the journal's disk table.
func (j *Journal) Disks() []rebound.Disk { return append([]rebound.Disk(nil), j.disks...) }

// Size returns the bytes the journal's wal holds on disk.
func (j *Journal) Size() int64 { return j.log.Size() }

func (j *Journal) validate(r *rebound.Record) error {
	switch r.Kind {
	case rebound.RecordWrite, rebound.RecordZero, rebound.RecordTrim:
		if int(r.Disk) >= len(j.disks) {
			return rebound.Errorf(rebound.EINVALID, "record %d: disk %d does not exist (stream has %d disks)", r.Seq, r.Disk, len(j.disks))
		}
		size := j.disks[r.Disk].Size
		if r.Offset < 0 || r.Length < 0 || r.Offset > size || r.Length > size-r.Offset {
			return rebound.Errorf(rebound.EINVALID, "record %d: range %d+%d is outside disk %d (%d bytes)", r.Seq, r.Offset, r.Length, r.Disk, size)
		}
		if r.Kind == rebound.RecordWrite && int64(len(r.Data)) != r.Length {
			return rebound.Errorf(rebound.EINVALID, "record %d: write of %d bytes carries %d", r.Seq, r.Length, len(r.Data))
		}
		if r.Kind != rebound.RecordWrite && len(r.Data) != 0 {
			return rebound.Errorf(rebound.EINVALID, "record %d: %s carries data", r.Seq, r.Kind)
		}
	case rebound.RecordMark:
		if r.PointKind != "" && r.PointKind != rebound.PointCrash && r.PointKind != rebound.PointApp {
			return rebound.Errorf(rebound.EINVALID, "record %d: unknown point kind %q", r.Seq, r.PointKind)
		}
	case rebound.RecordResyncBegin, rebound.RecordResyncEnd:
	default:
		return rebound.Errorf(rebound.EINVALID, "record %d: unknown kind %d", r.Seq, r.Kind)
	}
	return nil
}

// Append writes records that continue Durable() and returns once they are
// fsynced. Records at or below Durable() are ignored; a gap or an invalid
// record is an EINVALID error and nothing is written.
func (j *Journal) Append(recs []*rebound.Record) error {
	j.appendMu.Lock()
	defer j.appendMu.Unlock()
	j.mu.Lock()
	closed, corrupt, serr := j.closed, j.corrupt, j.err
	j.mu.Unlock()
	switch {
	case closed:
		return rebound.Errorf(rebound.ECONFLICT, "journal is closed")
	case corrupt != nil:
		return rebound.Errorf(rebound.EINTERNAL, "journal is corrupt and needs a resync: %v", corrupt)
	case serr != nil:
		return rebound.Errorf(rebound.EINTERNAL, "journal failed an earlier write and must be reopened: %v", serr)
	}
	durable := j.durable.Load()
	i := 0
	for i < len(recs) && recs[i].Seq <= durable {
		i++
	}
	recs = recs[i:]
	if len(recs) == 0 {
		return nil
	}
	next := durable + 1
	// A source restarted after a crash continues above seqs it lost
	// (docs/design/journal.md, "Source crash"): its tagged ResyncBegin
	// may jump, and a gap record stands for the seqs skipped.
	out := make([]*rebound.Record, 0, len(recs)+1)
	for _, r := range recs {
		if r.Seq > next && r.Kind == rebound.RecordResyncBegin && r.PointKind == rebound.ResyncSourceCrash {
			out = append(out, &rebound.Record{Seq: r.Seq - 1, Time: r.Time, Kind: rebound.RecordGap, Offset: int64(next), PointKind: rebound.ResyncSourceCrash})
			next = r.Seq
		}
		if r.Seq != next {
			return rebound.Errorf(rebound.EINVALID, "journal expects seq %d, got %d (records must continue durable seq %d without a gap)", next, r.Seq, durable)
		}
		if err := j.validate(r); err != nil {
			return err
		}
		out = append(out, r)
		next++
	}
	recs = out
	if recs[0].Kind == rebound.RecordGap {
		j.log.Skip(recs[0].Seq - 1)
	}
	locs, err := j.log.Append(recs...)
	if err == nil {
		err = j.log.Sync()
		if err != nil {
			// The records may or may not be on disk; only a reopen can tell.
			j.mu.Lock()
			j.err = err
			j.mu.Unlock()
		}
	}
	if err != nil {
		return fmt.Errorf("journal: append: %w", err)
	}
	j.mu.Lock()
	for k, r := range recs {
		j.index(r, locs[k])
	}
	repaired := j.repaired
	j.repaired = nil
	j.mu.Unlock()
	for _, l := range repaired {
		j.logger.Info("journal: repaired", "dir", j.dir, "lost_from", l[0], "lost_to", l[1])
		if j.onRepaired != nil {
			j.onRepaired(l[0], l[1])
		}
	}
	return nil
}

// index adds a durable record to the in-memory state. Called with j.mu
// held (or during Open).
func (j *Journal) index(r *rebound.Record, loc wal.Location) {
	m := recMeta{seq: r.Seq, time: r.Time, off: r.Offset, length: r.Length, loc: loc, disk: r.Disk, kind: r.Kind, pk: r.PointKind}
	j.recs = append(j.recs, m)
	open := len(j.windows) > 0 && j.windows[len(j.windows)-1].open
	switch r.Kind {
	case rebound.RecordWrite, rebound.RecordZero, rebound.RecordTrim:
		if r.Length > 0 {
			j.live[r.Disk] = insert(j.live[r.Disk], extent(&m), j.epoch)
		}
	case rebound.RecordMark:
		if !open {
			j.marks = append(j.marks, r.Seq)
		}
	case rebound.RecordResyncBegin:
		if !open {
			j.windows = append(j.windows, window{lo: r.Seq + 1, open: true})
		} else if w := &j.windows[len(j.windows)-1]; w.gap && (r.PointKind == rebound.ResyncRepair && !w.crash || r.PointKind == rebound.ResyncSourceCrash && w.crash) {
			w.armed = true
		}
	case rebound.RecordResyncEnd:
		if w := &j.windows[len(j.windows)-1]; open && (!w.gap || w.armed) {
			w.open = false
			w.hi = r.Seq - 1
			if w.gap && !w.crash {
				j.repaired = append(j.repaired, w.lost)
			}
			if w.hi < w.lo {
				j.windows = j.windows[:len(j.windows)-1]
			}
		}
	case rebound.RecordGap:
		// Seqs r.Offset..r.Seq are lost: no position from the first of
		// them on is consistent until a repair resync ends.
		// A source-crash gap lost seqs the target never had; the
		// source's resync resends their regions.
		lost := [2]uint64{uint64(r.Offset), r.Seq}
		crash := r.PointKind == rebound.ResyncSourceCrash
		if open {
			w := &j.windows[len(j.windows)-1]
			switch {
			case crash && w.gap && !w.crash:
				// A repair is pending: its end closes the window.
			case crash && w.gap:
				w.lost[1], w.armed = r.Seq, false
			default:
				w.gap, w.crash, w.armed, w.lost = true, crash, false, lost
			}
		} else {
			j.windows = append(j.windows, window{lo: max(uint64(r.Offset), j.base+1), open: true, gap: true, crash: crash, lost: lost})
		}
		if !crash {
			j.gaps = append(j.gaps, r.Seq)
		}
	}
	j.durable.Store(r.Seq)
	if r.Seq-j.checkpoints[len(j.checkpoints)-1].seq >= j.cpEvery {
		j.checkpoints = append(j.checkpoints, checkpoint{seq: r.Seq, roots: append([]*node(nil), j.live...)})
		j.epoch = newEpoch() // the live tree's nodes are now shared
		j.thinCheckpoints()
	}
}

// thinCheckpoints drops checkpoints so that the gap around a dropped one
// stays at most 1/checkpointRatio of its age: recent positions keep one
// every checkpointEvery records, old ones fewer (O(log) in all), which
// bounds the memory of nodes held only by checkpoints. A view of an old
// position replays at most ~age/checkpointRatio records. The first
// checkpoint (at or below B) is always kept.
func (j *Journal) thinCheckpoints() {
	cps := j.checkpoints
	now := j.durable.Load()
	out := cps[:1]
	for i := 1; i < len(cps)-1; i++ {
		prev, next := out[len(out)-1].seq, cps[i+1].seq
		if (next-prev)*checkpointRatio > now-next {
			out = append(out, cps[i])
		}
	}
	out = append(out, cps[len(cps)-1])
	clear(cps[len(out):])
	j.checkpoints = out
}

func extent(m *recMeta) *node {
	return &node{start: m.off, end: m.off + m.length, seq: m.seq, zero: m.kind != rebound.RecordWrite, loc: m.loc}
}

// Close closes the journal. Open views fail their reads afterwards.
func (j *Journal) Close() error {
	j.foldMu.Lock()
	defer j.foldMu.Unlock()
	j.appendMu.Lock()
	defer j.appendMu.Unlock()
	j.baseMu.Lock()
	defer j.baseMu.Unlock()
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.closed {
		return nil
	}
	j.closed = true
	j.shut.Store(true)
	err := j.log.Close()
	for _, f := range j.bases {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	return err
}

// Remove deletes the journal in dir (which must be closed), also one whose
// creation a crash interrupted. It refuses a directory holding anything
// else, and succeeds if dir does not exist.
func Remove(dir string) error {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	} else if err != nil {
		return fmt.Errorf("journal: remove: %w", err)
	}
	for _, e := range ents {
		n := e.Name()
		if n != metaFile && n != metaFile+".tmp" && n != walDir && !(strings.HasPrefix(n, "base-") && strings.HasSuffix(n, ".img")) {
			return rebound.Errorf(rebound.EINVALID, "%s does not look like a journal (it holds %s); not removing it", dir, n)
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("journal: remove: %w", err)
	}
	return nil
}
