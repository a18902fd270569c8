// Package capture is the source side of replication: it serves a machine's
// disks to the NBD server, turns every change into a record of one ordered
// stream, spools the records on local disk until the peer acks them, and
// falls back to a persisted dirty-region map (then a resync) when the spool
// is full. See docs/design/capture.md.
package capture

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/wal"
)

// Defaults for Options.
const (
	DefaultSpoolLimit  = 1 << 30
	DefaultRegionSize  = 64 << 10
	DefaultSegmentSize = 16 << 20

	// recOverhead is the spool bytes of a record besides its data (frame
	// and fixed fields of the wal encoding).
	recOverhead = 46
	// maxCacheBytes bounds the in-memory cache of recent records.
	maxCacheBytes = 64 << 20
	// metaInterval is how often the acked seq is persisted and the spool
	// truncated.
	metaInterval = 100 * time.Millisecond
	// DefaultThrottleStall is how long a throttled write waits for the
	// peer to ack anything before the stream stops waiting and tracks.
	DefaultThrottleStall = 5 * time.Second
)

// Congestion policies: what a stream does when the peer falls behind and
// the spool fills (rebound.Policy.Congestion).
const (
	// CongestionTrack: writes never wait; a full spool switches to dirty
	// region tracking and a resync (overflow).
	CongestionTrack = rebound.CongestionTrack
	// CongestionThrottle: writes wait before they are recorded while the
	// spool is above its high-water mark (3/4 of SpoolLimit) and the peer
	// is acking, so the backlog, and the lag, stay bounded.
	CongestionThrottle = rebound.CongestionThrottle
)

// Stream states reported by Stats.
const (
	StateSyncing   = "syncing"   // initial copy running
	StateResyncing = "resyncing" // dirty-region resync running
	StateStreaming = "streaming" // every write is in the stream
	StateOverflow  = "overflow"  // spool full: only dirty regions are kept
)

// ErrClosed is returned by I/O on a closed stream.
var ErrClosed = rebound.Errorf(rebound.EUNAVAILABLE, "capture stream is closed")

// DiskSpec names a raw disk file of a stream. It is created sparse with
// Size bytes if missing.
type DiskSpec struct {
	Path string
	Size int64
}

// Options configure a Stream.
type Options struct {
	SpoolLimit  int64            // bytes of unacked records kept on local disk; default 1 GiB
	RegionSize  int64            // dirty-map granularity; default 64 KiB
	SegmentSize int64            // spool wal segment size; default 16 MiB
	Now         func() time.Time // clock, for tests; default time.Now
	Logger      *slog.Logger     // default slog.Default()
	// External disks are written by their owner, not through the stream
	// (rebound agent): the spool is never replayed onto them.
	External bool
	// ReadDisk, if set, reads the disks for resync copies instead of the
	// disk files: the agent reads a device past its page cache, which a
	// mounted filesystem's writes leave stale.
	ReadDisk func(disk int, p []byte, off int64) (int, error)
	// Congestion is CongestionTrack (default, also "") or
	// CongestionThrottle; SetCongestion changes it on an open stream.
	Congestion string
	// ThrottleStall bounds a throttled write's wait for an ack; after it
	// the write proceeds (and the stream may overflow): a dead link must
	// not hang the machine. Default DefaultThrottleStall.
	ThrottleStall time.Duration
	// OnThrottle, if set, is called when a write starts waiting (tests).
	OnThrottle func()
	// Direct is protocol A (docs/design/capture.md, "Direct mode"): while
	// the peer keeps up, records go only to the in-memory ring and a
	// persisted activity map covers them; the spool is written only on
	// congestion. A kill -9 then costs a delta resync of the active
	// regions. Ignored for External streams.
	Direct bool
	// RingSize is the bytes of the in-memory ring of recent records
	// (the send buffer in direct mode); default min(SpoolLimit, 64 MiB).
	RingSize int64
}

// Stats is a snapshot of a stream's replication state.
type Stats struct {
	State         string
	HeadSeq       uint64
	AckedSeq      uint64
	BacklogBytes  int64 // unacked payload bytes
	DirtyBytes    int64 // bytes of regions marked dirty
	SyncDone      int64 // bytes copied by the running (or last) resync
	SyncTotal     int64 // bytes the running (or last) resync has to copy
	LagSeconds    float64
	ThroughputBps float64 // acked payload bytes/s over the last ~10 s
	// Error says why writes are being refused (EIO to the client): neither
	// the spool nor a dirty map could record them. Empty once a change is
	// recorded again.
	Error string
	// Throttled counts the writes that waited for the spool to drain
	// (congestion policy throttle).
	Throttled int64
	// Spills counts the times a direct stream moved to the spool because
	// the peer fell behind by more than the ring; Spooling says it is
	// there now (always true for a stream that is not direct).
	Spills   int64
	Spooling bool
}

// pending is an unacked record, for backlog, lag and spool accounting.
type pending struct {
	seq   uint64
	bytes int64 // payload
	time  int64
}

// meta is the stream's small state file (dir/meta.json).
type meta struct {
	Version    int     `json:"version"`
	RegionSize int64   `json:"regionSize"`
	Disks      []int64 `json:"disks"`   // sizes, in stream order
	Acked      uint64  `json:"acked"`   // the peer holds every record <= Acked
	Resync     bool    `json:"resync"`  // a resync window is open
	Initial    bool    `json:"initial"` // the open resync is the initial copy
	// DirtyTime is the time of the newest change kept only as a dirty
	// region (overflow) or only in memory (direct mode): such changes
	// have no spooled record, so PendingRegions reports their time from
	// here. Persisted within metaInterval.
	DirtyTime int64 `json:"dirtyTime,omitempty"`
	// Landed: every record <= Landed is acked by the peer and on the
	// disk files. Open replays only spooled records above it, and the
	// activity maps forget a record's regions only once it is persisted
	// here (direct mode).
	Landed uint64 `json:"landed,omitempty"`
	// Gaps are seqs a crash lost (direct mode) that the peer may still be
	// below: Read skips them. Dropped once acked.
	Gaps [][2]uint64 `json:"gaps,omitempty"`
}

// Stream is the ordered outbound stream of a set of disks. Disk indexes are
// global to the stream. It implements rebound.ReplSource.
type Stream struct {
	dir    string
	opts   Options
	logger *slog.Logger
	spool  *wal.Log
	disks  []*Disk

	// mu orders the stream: a change takes its seq and is appended to the
	// spool (or marked dirty) and registered in flight under mu; it is
	// applied to its disk file outside mu, after the earlier in-flight
	// changes it overlaps (see change).
	mu     sync.Mutex
	closed bool

	// fmu guards the disks' in-flight changes (Disk.flights). Lock order:
	// mu, then fmu.
	fmu sync.Mutex
	// applying counts registered changes not yet applied; Close waits.
	applying sync.WaitGroup
	// beforeApply, if set, runs before a change is applied to its disk
	// (tests hold a change in flight with it).
	beforeApply func(*rebound.Record)
	// beforeFlush, if set, runs at the start of each flush round, and
	// onFlushWait when a flush waits for a round, with flushMu held
	// (tests).
	beforeFlush func()
	onFlushWait func()

	// flushMu guards the flush rounds (group commit, see Flush).
	flushMu      sync.Mutex
	flushCond    *sync.Cond
	flushing     bool   // a round is running
	flushStarted uint64 // rounds started
	flushDone    uint64 // the last round finished
	flushErr     error  // its result
	// onCopyWait, if set, runs when a resync copy waits for an in-flight
	// change of its run (tests).
	onCopyWait func()

	// qmu guards the queue of changes waiting for the leader (see change).
	qmu     sync.Mutex
	queue   []*change
	spare   []*change
	leading bool

	head       uint64
	acked      uint64
	lastTime   int64
	unacked    []pending // records > acked, in order
	spoolBytes int64     // wal bytes of unacked records
	backlog    int64     // payload bytes of unacked records
	cache      *ring
	overflow   bool
	spoolErr   error  // why the last spool append failed, nil once one succeeds
	refusing   string // Stats.Error: why the last change was refused
	resyncing  bool   // resync goroutine running
	initial    bool   // the resync is the initial copy
	dirtyTime  int64  // time of the newest change marked dirty instead of spooled
	syncDone   int64
	syncTotal  int64
	ackedBytes int64         // cumulative acked payload, for throughput
	readCh     chan struct{} // closed when a record is appended; nil if nobody waits
	ackCh      chan struct{} // closed on Acked; nil if nobody waits
	rd         *wal.Reader   // spool reader positioned at rdNext, reused by Read
	rdNext     uint64
	rdMu       sync.Mutex    // guards rd, rdNext
	unsynced   int64         // spool bytes appended since the last background sync kick
	syncKick   chan struct{} // wakes the background spool syncer

	throttle   atomic.Bool  // congestion policy is throttle
	spoolLevel atomic.Int64 // spoolBytes, readable without mu
	// backlogLevel is backlog, readable without mu: a throttled write
	// checks both levels before it takes the mutex (throttleWait).
	backlogLevel atomic.Int64
	throttled    int64 // Stats.Throttled
	stalled      bool  // a throttled write got no ack in ThrottleStall; cleared by the next ack

	samples [12]sample // throughput samples, one per second, ring
	nsample int

	// Direct mode (protocol A). direct is fixed at Open; spooling says
	// records currently go to the spool (congestion), always true when
	// not direct.
	direct      bool
	spooling    bool
	seqf        *seqFile
	landed      uint64      // last computed Landed (meta)
	gaps        [][2]uint64 // seqs lost in a crash, skipped by Read
	crashResync bool        // the next ResyncBegin is tagged ResyncSourceCrash
	spills      int64       // Stats.Spills

	metaMu   sync.Mutex // serializes meta writes
	lastMeta meta       // as last persisted

	done chan struct{}
	wg   sync.WaitGroup
}

type sample struct {
	t     time.Time
	acked int64
}

// Open opens (creating if needed) the stream state in dir for the given
// disks. It replays every record retained in the spool onto the disk files,
// so a disk write lost by a killed process is redone, restores the acked
// seq and the dirty maps, and resumes an interrupted resync.
func Open(dir string, disks []DiskSpec, opts Options) (*Stream, error) {
	if len(disks) == 0 {
		return nil, rebound.Errorf(rebound.EINVALID, "capture: a stream needs at least one disk")
	}
	if opts.SpoolLimit <= 0 {
		opts.SpoolLimit = DefaultSpoolLimit
	}
	if opts.RegionSize <= 0 {
		opts.RegionSize = DefaultRegionSize
	}
	if opts.SegmentSize <= 0 {
		opts.SegmentSize = DefaultSegmentSize
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.RingSize <= 0 {
		opts.RingSize = min(opts.SpoolLimit, maxCacheBytes)
	}
	if opts.ThrottleStall <= 0 {
		opts.ThrottleStall = DefaultThrottleStall
	}
	if opts.Congestion != "" && opts.Congestion != CongestionTrack && opts.Congestion != CongestionThrottle {
		return nil, rebound.Errorf(rebound.EINVALID, "capture: unknown congestion policy %q (want %s or %s)", opts.Congestion, CongestionThrottle, CongestionTrack)
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("capture: %w", err)
	}
	s := &Stream{
		dir:      dir,
		opts:     opts,
		logger:   opts.Logger.With("stream", dir),
		cache:    newRing(opts.RingSize),
		done:     make(chan struct{}),
		syncKick: make(chan struct{}, 1),
	}
	s.flushCond = sync.NewCond(&s.flushMu)
	s.direct = opts.Direct && !opts.External
	s.spooling = !s.direct
	s.throttle.Store(opts.Congestion == CongestionThrottle)
	m, err := s.readMeta()
	if err != nil {
		return nil, err
	}
	fresh := m == nil
	if fresh {
		m = &meta{Version: 1, RegionSize: opts.RegionSize}
		for _, d := range disks {
			m.Disks = append(m.Disks, d.Size)
		}
	} else {
		if m.RegionSize != opts.RegionSize {
			return nil, rebound.Errorf(rebound.ECONFLICT, "capture: stream %s has region size %d, not %d", dir, m.RegionSize, opts.RegionSize)
		}
		if len(m.Disks) != len(disks) {
			return nil, rebound.Errorf(rebound.ECONFLICT, "capture: stream %s has %d disks, not %d", dir, len(m.Disks), len(disks))
		}
		for i, d := range disks {
			if m.Disks[i] != d.Size {
				return nil, rebound.Errorf(rebound.ECONFLICT, "capture: disk %d of stream %s has %d bytes, not %d", i, dir, m.Disks[i], d.Size)
			}
		}
	}
	ok := false
	defer func() {
		if !ok {
			s.closeFiles()
		}
	}()
	for i, spec := range disks {
		fd, err := OpenFileDisk(spec.Path, spec.Size)
		if err != nil {
			return nil, err
		}
		d := &Disk{s: s, idx: uint32(i), fd: fd}
		s.disks = append(s.disks, d)
		if d.dirty, err = openDirtyMap(filepath.Join(dir, fmt.Sprintf("dirty.%d", i)), spec.Size, opts.RegionSize); err != nil {
			return nil, fmt.Errorf("capture: %w", err)
		}
		apath := filepath.Join(dir, fmt.Sprintf("active.%d", i))
		if _, err := os.Stat(apath); s.direct || err == nil {
			if d.active, err = openActiveMap(apath, spec.Size, opts.RegionSize); err != nil {
				return nil, fmt.Errorf("capture: %w", err)
			}
		}
	}
	if s.seqf, err = openSeqFile(filepath.Join(dir, "seq")); err != nil {
		return nil, fmt.Errorf("capture: %w", err)
	}
	// A direct stream that did not close lost the records it held only in
	// memory: their regions (the activity maps) must be resynced.
	crashed := s.seqf.flags&seqDirect != 0
	if crashed {
		for _, d := range s.disks {
			if d.active != nil {
				if err := d.active.drainInto(d.dirty); err != nil {
					return nil, fmt.Errorf("capture: %w", err)
				}
			}
		}
	}
	if s.spool, err = wal.Open(filepath.Join(dir, "spool"), wal.Options{SegmentSize: opts.SegmentSize, Logger: s.logger}); err != nil {
		return nil, fmt.Errorf("capture: open spool: %w", err)
	}
	if err := s.spool.Corrupt(); err != nil && !fresh {
		// Records past the bad one are unreadable: the peer must resync.
		s.logger.Error("spool is corrupt; disks will be resynced", "err", err)
		for _, d := range s.disks {
			d.dirty.markAll()
		}
	}
	s.acked = m.Acked
	if fresh {
		if err := s.writeMeta(m); err != nil {
			return nil, err
		}
	} else {
		s.lastMeta = *m
	}
	s.initial = m.Initial
	s.dirtyTime = m.DirtyTime
	s.landed = m.Landed
	for _, g := range m.Gaps {
		if g[1] > s.acked {
			s.gaps = append(s.gaps, g)
		}
	}
	open, err := s.replay(m.Landed)
	if err != nil {
		return nil, err
	}
	spoolLast := s.spool.LastSeq()
	s.head = max(spoolLast, s.acked, s.seqf.mark)
	if crashed && s.head > spoolLast {
		// Seqs up to the watermark may have been handed out and are gone
		// with the ring: the peer skips them (a gap), and the resync
		// below, tagged as a source crash, resends their regions.
		s.gaps = append(s.gaps, [2]uint64{spoolLast + 1, s.head})
		s.logger.Warn("stream restarted after a crash: records held only in memory are lost; resyncing their regions", "lost_after", spoolLast, "head", s.head)
	}
	if s.acked > s.head {
		s.acked = s.head
	}
	if s.direct {
		s.spooling = spoolLast > s.acked
		if err := s.seqf.set(s.head+seqAhead, seqDirect); err != nil {
			return nil, fmt.Errorf("capture: %w", err)
		}
	} else if s.seqf.flags != 0 {
		if err := s.seqf.set(s.head, 0); err != nil {
			return nil, fmt.Errorf("capture: %w", err)
		}
	}
	if s.lastTime == 0 {
		s.lastTime = opts.Now().UnixNano()
	}
	// An open window or dirty regions mean a resync is due: at once if it
	// was running, else (overflow) once the backlog has drained.
	dirty := s.dirtyBytesLocked() > 0
	switch {
	case crashed:
		s.crashResync = true
		s.startResyncLocked()
	case m.Resync || open:
		s.startResyncLocked()
	case dirty && s.spoolBytes >= s.opts.SpoolLimit/2:
		s.overflow = true
	case dirty:
		s.startResyncLocked()
	}
	s.wg.Add(2)
	go s.housekeep()
	go s.syncer()
	ok = true
	return s, nil
}

// replay applies the spooled records above landed (those may not be on
// the disks) in order and rebuilds the unacked accounting. It reports
// whether the spool ends inside a resync window.
func (s *Stream) replay(landed uint64) (open bool, err error) {
	first := s.spool.FirstSeq()
	if first == 0 {
		return false, nil
	}
	r, err := s.spool.NewReader(first)
	if err != nil {
		return false, fmt.Errorf("capture: replay spool: %w", err)
	}
	defer r.Close()
	n := 0
	for {
		rec, _, err := r.Next()
		if err == io.EOF {
			break
		} else if errors.Is(err, wal.ErrCorrupt) {
			break // reported by Open via Corrupt
		} else if err != nil {
			return false, fmt.Errorf("capture: replay spool: %w", err)
		}
		switch rec.Kind {
		case rebound.RecordResyncBegin:
			open = true
		case rebound.RecordResyncEnd:
			open = false
		case rebound.RecordWrite, rebound.RecordZero, rebound.RecordTrim:
			if int(rec.Disk) >= len(s.disks) {
				return false, rebound.Errorf(rebound.ECONFLICT, "capture: spooled record %d is for disk %d of %d", rec.Seq, rec.Disk, len(s.disks))
			}
			if !s.opts.External && rec.Seq > landed {
				if err := s.disks[rec.Disk].replay(rec); err != nil {
					return false, fmt.Errorf("capture: replay record %d: %w", rec.Seq, err)
				}
				n++
			}
		}
		s.lastTime = max(s.lastTime, rec.Time)
		if rec.Seq > s.acked {
			s.unacked = append(s.unacked, pending{seq: rec.Seq, bytes: int64(len(rec.Data)), time: rec.Time})
			s.spoolBytes += int64(len(rec.Data)) + recOverhead
			s.backlog += int64(len(rec.Data))
		}
	}
	s.storeLevelsLocked()
	if n > 0 {
		s.logger.Info("replayed spool onto disks", "records", n, "from", first)
	}
	return open, nil
}

// Disk returns disk i of the stream, the backend the NBD server serves.
func (s *Stream) Disk(i int) *Disk {
	if i < 0 || i >= len(s.disks) {
		return nil
	}
	return s.disks[i]
}

// now returns the record time: the clock, but never going back.
func (s *Stream) nowLocked() int64 {
	t := s.opts.Now().UnixNano()
	if t < s.lastTime {
		t = s.lastTime
	}
	s.lastTime = t
	return t
}

// appendLocked gives rec the next seq and time and appends it to the spool
// and the cache. Called with s.mu held.
func (s *Stream) appendLocked(rec *rebound.Record) error {
	return s.appendBatchLocked([]*rebound.Record{rec})
}

// appendBatchLocked appends recs with one write to the spool; on error
// none of them is appended. Called with s.mu held.
func (s *Stream) appendBatchLocked(recs []*rebound.Record) error {
	if err := s.reserveSeqsLocked(len(recs)); err != nil {
		s.spoolErr = err
		return err
	}
	for i, rec := range recs {
		rec.Seq = s.head + 1 + uint64(i)
		rec.Time = s.nowLocked()
	}
	if !s.spooling && !s.cache.room(s.firstUnackedLocked(), recs) {
		// The peer is behind by more than the ring: congestion. The
		// unacked records move to the spool, which takes the rest.
		if err := s.spillLocked(); err != nil {
			s.spoolErr = err
			return err
		}
	}
	if s.spooling {
		// After a crash or the ring the head may be past the spool's
		// last record: those seqs are not in the spool.
		s.spool.Skip(recs[0].Seq - 1)
		if _, err := s.spool.Append(recs...); err != nil {
			s.spoolErr = err
			return err
		}
		for _, rec := range recs {
			s.unsynced += int64(len(rec.Data)) + recOverhead
		}
	} else {
		// Direct: the record lives in the ring only. Its regions are
		// marked active (persisted) before its disk write.
		changes := false
		for _, rec := range recs {
			switch rec.Kind {
			case rebound.RecordWrite, rebound.RecordZero, rebound.RecordTrim:
				s.disks[rec.Disk].active.stage(rec.Offset, rec.Length)
				changes = true
			}
		}
		var err error
		for _, d := range s.disks {
			if e := d.active.commit(); err == nil {
				err = e
			}
		}
		if err != nil {
			s.spoolErr = err
			return err
		}
		if changes {
			s.dirtyTime = recs[len(recs)-1].Time
		}
	}
	s.spoolErr, s.refusing = nil, ""
	for _, rec := range recs {
		s.head = rec.Seq
		n := int64(len(rec.Data))
		s.unacked = append(s.unacked, pending{seq: rec.Seq, bytes: n, time: rec.Time})
		s.spoolBytes += n + recOverhead
		s.backlog += n
		s.storeLevelsLocked()
		s.cache.add(rec)
	}
	if s.unsynced >= s.opts.SegmentSize/4 {
		s.unsynced = 0
		select {
		case s.syncKick <- struct{}{}:
		default:
		}
	}
	if s.readCh != nil {
		close(s.readCh)
		s.readCh = nil
	}
	return nil
}

// reserveSeqsLocked persists a seq watermark ahead of the next n seqs
// (direct mode): a restart after a kill starts above every seq handed out.
func (s *Stream) reserveSeqsLocked(n int) error {
	if !s.direct || s.head+uint64(n) <= s.seqf.mark {
		return nil
	}
	return s.seqf.set(s.head+uint64(n)+seqAhead, seqDirect)
}

// firstUnackedLocked is the oldest seq the peer may still read: after
// acked, skipping seqs a crash lost.
func (s *Stream) firstUnackedLocked() uint64 {
	next := s.acked + 1
	for _, g := range s.gaps {
		if next >= g[0] && next <= g[1] {
			next = g[1] + 1
		}
	}
	return next
}

// spillLocked switches a direct stream to the spool (congestion): the
// records the peer has not acked, until now only in the ring, are
// appended to the spool, and so is every record after them until the
// peer has acked the spool (Acked switches back).
func (s *Stream) spillLocked() error {
	first := s.firstUnackedLocked()
	recs := s.cache.from(first)
	if first <= s.head && (len(recs) == 0 || recs[0].Seq != first) {
		return rebound.Errorf(rebound.EINTERNAL, "capture: ring lost unacked record %d", first)
	}
	s.spool.Skip(first - 1)
	if len(recs) > 0 {
		if _, err := s.spool.Append(recs...); err != nil {
			return err
		}
	}
	s.spooling = true
	s.spills++
	s.logger.Info("peer is behind by more than the ring: spooling", "from", first, "backlog", s.backlog)
	return nil
}

// fitsLocked reports whether n more spool bytes stay within SpoolLimit. A
// record larger than the limit fits an empty spool.
func (s *Stream) fitsLocked(n int64) bool {
	return s.spoolBytes == 0 || s.spoolBytes+n <= s.opts.SpoolLimit
}

// change is one change of a disk waiting to be recorded and applied.
type change struct {
	d      *Disk
	rec    *rebound.Record
	apply  func() error
	logged bool
	err    error
	// done is closed by the leader once the change is committed, or to
	// hand the change the lead (lead set).
	done chan struct{}
	lead bool
	fl   *flight   // in flight on d until applied; nil if refused
	wait []*flight // earlier in-flight changes it overlaps
}

// flight is a change registered on its disk between its commit and the
// end of its disk write. Guarded by s.fmu.
type flight struct {
	seq      uint64 // 0 if tracked as a dirty region instead of spooled
	off, end int64
	landed   bool
	ch       chan struct{} // made by the first waiter, closed when landed
}

// change records one change of disk d and applies it with apply. Changes
// arriving together are combined: one goroutine, the leader, appends all
// their records to the spool with a single write (taking consecutive
// seqs) and registers each as in flight on its disk, under the stream
// mutex; then it hands the lead to the next queued change, and every
// writer applies its own change to the disk file outside the mutex, once
// the earlier in-flight changes it overlaps have landed. So the spool and
// the stream hold changes in seq order, overlapping changes reach the
// disk in seq order, and disjoint ones are written concurrently.
func (s *Stream) change(d *Disk, rec *rebound.Record, apply func() error) error {
	if s.throttle.Load() {
		s.throttleWait(int64(len(rec.Data)) + recOverhead)
	}
	c := &change{d: d, rec: rec, apply: apply}
	s.qmu.Lock()
	s.queue = append(s.queue, c)
	if s.leading {
		c.done = make(chan struct{})
		s.qmu.Unlock()
		<-c.done
	} else {
		s.leading = true
		c.lead = true
		s.qmu.Unlock()
	}
	if c.lead {
		s.lead(c)
	}
	return s.land(c)
}

// lead commits the queued changes (c's among them) as one batch and hands
// the lead to the next queued change, if any.
func (s *Stream) lead(c *change) {
	s.qmu.Lock()
	batch := s.queue
	s.queue, s.spare = s.spare[:0], nil
	s.qmu.Unlock()

	s.mu.Lock()
	s.commitLocked(batch)
	s.mu.Unlock()

	s.qmu.Lock()
	if len(s.queue) > 0 {
		next := s.queue[0]
		next.lead = true
		close(next.done)
	} else {
		s.leading = false
	}
	s.qmu.Unlock()
	for i, x := range batch {
		if x != c {
			close(x.done)
		}
		batch[i] = nil
	}
	s.qmu.Lock()
	if s.spare == nil {
		s.spare = batch[:0]
	}
	s.qmu.Unlock()
}

// land applies a committed change to its disk file after the earlier
// in-flight changes it overlaps, then takes it out of flight. A failed
// disk write leaves its regions dirty (the disk may or may not hold the
// change; the resync sends whatever it has); if even the map cannot say
// so, they are kept in memory and Flush fails until they are saved.
func (s *Stream) land(c *change) error {
	if c.fl == nil {
		return c.err
	}
	for _, w := range c.wait {
		s.fmu.Lock()
		ch := w.waitChan()
		s.fmu.Unlock()
		if ch != nil {
			<-ch
		}
	}
	if s.beforeApply != nil {
		s.beforeApply(c.rec)
	}
	err := c.apply()
	if err != nil {
		s.mu.Lock()
		if merr := s.markLocked(c.d, c.rec.Offset, c.rec.Length); merr != nil {
			c.d.dirty.markUnsaved(c.rec.Offset, c.rec.Length)
			s.logger.Error("disk write failed and the dirty map cannot record it; kept in memory", "disk", c.d.idx, "err", err, "map", merr)
		}
		s.mu.Unlock()
	}
	s.fmu.Lock()
	c.d.unflight(c.fl)
	s.fmu.Unlock()
	s.applying.Done()
	return err
}

// waitChan returns a channel closed when f has landed, or nil if it has.
// Called with s.fmu held.
func (f *flight) waitChan() chan struct{} {
	if f.landed {
		return nil
	}
	if f.ch == nil {
		f.ch = make(chan struct{})
	}
	return f.ch
}

// unflight takes f out of d's in-flight changes and wakes its waiters.
// Called with s.fmu held.
func (d *Disk) unflight(f *flight) {
	for i, x := range d.flights {
		if x == f {
			last := len(d.flights) - 1
			d.flights[i] = d.flights[last]
			d.flights[last] = nil
			d.flights = d.flights[:last]
			break
		}
	}
	f.landed = true
	if f.ch != nil {
		close(f.ch)
	}
}

// overlapping returns the in-flight changes of d that overlap [off, end).
// Called with s.fmu held.
func (d *Disk) overlapping(off, end int64, out []*flight) []*flight {
	for _, f := range d.flights {
		if f.off < end && off < f.end {
			out = append(out, f)
		}
	}
	return out
}

// oldestFlightLocked returns the lowest seq of a spooled change not yet
// applied to its disk, or 0. Called with s.mu held.
func (s *Stream) oldestFlightLocked() uint64 {
	s.fmu.Lock()
	defer s.fmu.Unlock()
	var oldest uint64
	for _, d := range s.disks {
		for _, f := range d.flights {
			if f.seq != 0 && (oldest == 0 || f.seq < oldest) {
				oldest = f.seq
			}
		}
	}
	return oldest
}

// storeLevelsLocked publishes spoolBytes and backlog for throttleWait.
func (s *Stream) storeLevelsLocked() {
	s.spoolLevel.Store(s.spoolBytes)
	s.backlogLevel.Store(s.backlog)
}

// highWater is the spool level above which throttled writes wait.
func (s *Stream) highWater() int64 { return s.opts.SpoolLimit / 4 * 3 }

// ringHighWater is a direct stream's backlog above which throttled
// writes wait, before the ring would spill.
func (s *Stream) ringHighWater() int64 { return s.opts.RingSize / 4 * 3 }

// throttleLevelLocked is the backlog a throttled write waits on, and its
// high-water mark. A direct stream that is not spooling waits on its
// unacked bytes against 3/4 of the ring, before the ring would spill:
// DRBD's on-congestion block, so under throttle the spool is not written
// while the peer acks at all. Otherwise the spool level against 3/4 of
// SpoolLimit.
func (s *Stream) throttleLevelLocked() (lvl, high int64) {
	if s.direct && !s.spooling {
		return s.backlog, s.ringHighWater()
	}
	return s.spoolBytes, s.highWater()
}

// SetCongestion sets the congestion policy (CongestionTrack or
// CongestionThrottle) of an open stream.
func (s *Stream) SetCongestion(mode string) error {
	switch mode {
	case "", CongestionTrack:
		s.throttle.Store(false)
	case CongestionThrottle:
		s.throttle.Store(true)
	default:
		return rebound.Errorf(rebound.EINVALID, "capture: unknown congestion policy %q (want %s or %s)", mode, CongestionThrottle, CongestionTrack)
	}
	s.mu.Lock()
	if s.ackCh != nil { // wake throttled writers: they re-check the mode
		close(s.ackCh)
		s.ackCh = nil
	}
	s.mu.Unlock()
	return nil
}

// throttleWait holds a change of n spool bytes, before it is queued and
// outside every lock, while the backlog is above its high-water mark
// (throttleLevelLocked: the spool's, or a direct stream's ring): the NBD
// write is acknowledged only once the peer has drained the backlog.
// It gives up (and the write goes on, tracked if the spool is full) when
// no ack comes for ThrottleStall, and then no write waits until an ack
// comes (a dead link costs one stall, not one per write); also in
// overflow (tracking is already on) and on close. Concurrent writers may
// each pass the check, so the backlog can pass the mark by the writes in
// flight; the quarter above it absorbs them (past the ring's, a direct
// stream spills).
func (s *Stream) throttleWait(n int64) {
	// Below both marks no write waits, whichever level applies: the
	// common case takes no lock.
	sp, bl := s.spoolLevel.Load(), s.backlogLevel.Load()
	if (sp == 0 || sp+n <= s.highWater()) && (!s.direct || bl == 0 || bl+n <= s.ringHighWater()) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	waited := false
	for s.throttle.Load() && !s.closed && !s.overflow && !s.stalled {
		if lvl, high := s.throttleLevelLocked(); lvl == 0 || lvl+n <= high {
			return
		}
		first := !waited
		if first {
			waited = true
			s.throttled++
		}
		if s.ackCh == nil {
			s.ackCh = make(chan struct{})
		}
		ch := s.ackCh
		s.mu.Unlock()
		if first && s.opts.OnThrottle != nil {
			s.opts.OnThrottle()
		}
		t := time.NewTimer(s.opts.ThrottleStall)
		stalled := false
		select {
		case <-ch:
		case <-s.done:
		case <-t.C:
			stalled = true
		}
		t.Stop()
		s.mu.Lock()
		if stalled {
			s.stalled = true
			s.logger.Warn("throttled write got no ack in time: the peer is stalled; the write goes on", "wait", s.opts.ThrottleStall, "backlog", s.backlog)
			return
		}
	}
}

// commitLocked appends the records of a batch of changes to the spool, or
// marks their regions dirty in overflow, and registers them in flight;
// each is applied by its writer (land).
func (s *Stream) commitLocked(batch []*change) {
	if s.closed {
		for _, c := range batch {
			c.err = ErrClosed
		}
		return
	}
	var recs []*rebound.Record
	var logged []*change
	if !s.overflow {
		var need int64
		for _, c := range batch {
			n := int64(len(c.rec.Data)) + recOverhead
			if !s.fitsLocked(need + n) {
				s.overflow = true
				s.logger.Warn("spool full: tracking dirty regions until the peer catches up", "limit", s.opts.SpoolLimit, "backlog", s.backlog)
				break
			}
			need += n
			recs, logged = append(recs, c.rec), append(logged, c)
		}
	}
	if len(recs) > 0 {
		if err := s.appendBatchLocked(recs); err != nil {
			// ENOSPC or an I/O error: keep the writes as dirty regions.
			s.overflow = true
			s.logger.Error("spool append failed: tracking dirty regions", "err", err)
		} else {
			for _, c := range logged {
				c.logged = true
			}
		}
	}
	for _, c := range batch {
		if !c.logged {
			if err := s.markLocked(c.d, c.rec.Offset, c.rec.Length); err != nil {
				// Neither the spool nor the dirty map can hold the change:
				// refuse it before it reaches the disk, so nothing is
				// acknowledged that the peer could miss.
				c.err = s.refuseLocked(c.d, err)
			}
		}
	}
	s.fmu.Lock()
	for _, c := range batch {
		if c.err != nil {
			continue
		}
		// In flight from here until land: a later overlapping change
		// waits for it, and so do resync copies of its regions.
		f := &flight{off: c.rec.Offset, end: c.rec.Offset + c.rec.Length}
		if c.logged {
			f.seq = c.rec.Seq
		}
		c.wait = c.d.overlapping(f.off, f.end, c.wait)
		c.d.flights = append(c.d.flights, f)
		c.fl = f
		s.applying.Add(1)
	}
	s.fmu.Unlock()
}

// markLocked marks a range dirty, persisting the map before the disk
// write. On error the regions are left as they were.
func (s *Stream) markLocked(d *Disk, off, length int64) error {
	before := d.dirty.count
	wrote, err := d.dirty.markRange(off, length)
	if err != nil {
		return err
	}
	s.dirtyTime = s.nowLocked()
	if wrote {
		s.refusing = ""
	}
	if s.resyncing {
		s.syncTotal += (d.dirty.count - before) * s.opts.RegionSize
	}
	return nil
}

// refuseLocked is the error for a change that neither the spool nor the
// dirty map could record. It is not ENOSPC (the NBD client gets EIO: the
// export is not full, Rebound's state directory is).
func (s *Stream) refuseLocked(d *Disk, mapErr error) error {
	spool := "full"
	if s.spoolErr != nil {
		spool = s.spoolErr.Error()
	}
	msg := fmt.Sprintf("write refused: neither the spool (%s) nor the dirty map (%v) can record it; free space in %s", spool, mapErr, s.dir)
	if s.refusing == "" {
		s.logger.Error("writes refused until the stream can record them", "disk", d.idx, "spool", spool, "map", mapErr)
	}
	s.refusing = msg
	return rebound.Errorf(rebound.EUNAVAILABLE, "capture: disk %d: %s", d.idx, msg)
}

// dirtyBytesLocked returns the bytes of all dirty regions.
func (s *Stream) dirtyBytesLocked() int64 {
	var n int64
	for _, d := range s.disks {
		n += d.dirtyBytes()
	}
	return n
}

// Read blocks until a record with Seq >= from exists or ctx is done, and
// returns consecutive records starting at from, about maxBytes of payload
// at most (at least one record). from below the oldest retained record is
// an error: the peer lost data the source no longer has and must resync.
// The records are fresh copies (of the ring cache, or read from the
// spool), never reused here: the sender's codec does not copy them
// (rebound.ReplSource).
func (s *Stream) Read(ctx context.Context, from uint64, maxBytes int) ([]*rebound.Record, error) {
	if from == 0 {
		return nil, rebound.Errorf(rebound.EINVALID, "capture: read from seq 0; seqs start at 1")
	}
	s.mu.Lock()
	for _, g := range s.gaps {
		if from >= g[0] && from <= g[1] {
			from = g[1] + 1 // lost in a crash: the next record is the resync's begin
		}
	}
	for from > s.head {
		if s.closed {
			s.mu.Unlock()
			return nil, ErrClosed
		}
		if s.readCh == nil {
			s.readCh = make(chan struct{})
		}
		ch := s.readCh
		s.mu.Unlock()
		select {
		case <-ch:
		case <-s.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		s.mu.Lock()
	}
	if first := s.cache.first(); first != 0 && from >= first {
		recs := s.cache.batch(from, maxBytes)
		s.mu.Unlock()
		return recs, nil
	}
	// A batch ends before a crash gap: the peer takes the jump only at
	// the start of one.
	until := ^uint64(0)
	for _, g := range s.gaps {
		if g[0] > from {
			until = min(until, g[0]-1)
		}
	}
	s.mu.Unlock()
	return s.readSpool(from, until, maxBytes)
}

// readSpool serves a Read the cache cannot, up to seq until at most.
func (s *Stream) readSpool(from, until uint64, maxBytes int) ([]*rebound.Record, error) {
	s.rdMu.Lock()
	defer s.rdMu.Unlock()
	if first := s.spool.FirstSeq(); first == 0 || from < first {
		return nil, rebound.Errorf(rebound.ECONFLICT, "capture: record %d is no longer spooled (oldest is %d); the peer must resync", from, first)
	}
	if s.rd == nil || s.rdNext != from {
		if s.rd != nil {
			s.rd.Close()
		}
		rd, err := s.spool.NewReader(from)
		if err != nil {
			s.rd = nil
			return nil, fmt.Errorf("capture: read spool: %w", err)
		}
		s.rd, s.rdNext = rd, from
	}
	var recs []*rebound.Record
	size := 0
	for {
		if s.rdNext > until && len(recs) > 0 {
			break
		}
		rec, _, err := s.rd.Next()
		if err == io.EOF && len(recs) > 0 {
			break
		} else if err != nil {
			s.rd.Close()
			s.rd = nil
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, fmt.Errorf("capture: read spool at %d: %w", s.rdNext, err)
		}
		if rec.Seq != s.rdNext {
			s.rd.Close()
			s.rd = nil
			return nil, rebound.Errorf(rebound.ECONFLICT, "capture: spool has record %d where %d was expected; the peer must resync", rec.Seq, s.rdNext)
		}
		recs = append(recs, rec)
		s.rdNext++
		size += len(rec.Data)
		if size >= maxBytes {
			break
		}
	}
	return recs, nil
}

// Acked tells the stream the peer holds every record <= seq durably. The
// acked seq is persisted and the spool truncated in the background.
func (s *Stream) Acked(seq uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if seq > s.head {
		// The peer holds records this source does not (power loss here
		// after the peer got them): the caller must resync.
		s.logger.Warn("peer acked records beyond the head", "acked", seq, "head", s.head)
		seq = s.head
	}
	if seq <= s.acked {
		return
	}
	s.acked = seq
	s.stalled = false
	i := 0
	for ; i < len(s.unacked) && s.unacked[i].seq <= seq; i++ {
		p := s.unacked[i]
		s.spoolBytes -= p.bytes + recOverhead
		s.backlog -= p.bytes
		s.ackedBytes += p.bytes
	}
	s.unacked = s.unacked[i:]
	s.storeLevelsLocked()
	if len(s.unacked) == 0 {
		s.unacked = s.unacked[:0:0] // let the backing array go
	}
	if s.direct && s.spooling && !s.overflow && seq >= s.spool.LastSeq() {
		// The peer holds everything spooled: back to the ring only.
		s.spooling = false
	}
	for len(s.gaps) > 0 && s.gaps[0][1] <= seq {
		s.gaps = s.gaps[1:]
	}
	s.maybeLeaveOverflowLocked()
	if s.ackCh != nil {
		close(s.ackCh)
		s.ackCh = nil
	}
}

// maybeLeaveOverflowLocked ends overflow once the backlog is below half
// the limit, and starts a resync of the dirty regions (written during the
// overflow, or whose disk write failed) if none is running.
func (s *Stream) maybeLeaveOverflowLocked() {
	if s.overflow {
		if s.spoolBytes >= s.opts.SpoolLimit/2 {
			return
		}
		s.overflow = false
	}
	if !s.resyncing && s.dirtyBytesLocked() > 0 {
		s.startResyncLocked()
	}
}

// Mark appends a recovery point mark. A point can only be cut when the
// stream holds every write (not in overflow) and no resync window is open.
func (s *Stream) Mark(kind rebound.PointKind) (rebound.RecoveryPoint, error) {
	if kind != rebound.PointCrash && kind != rebound.PointApp {
		return rebound.RecoveryPoint{}, rebound.Errorf(rebound.EINVALID, "capture: unknown point kind %q", kind)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.closed:
		return rebound.RecoveryPoint{}, ErrClosed
	case s.resyncing:
		return rebound.RecoveryPoint{}, rebound.Errorf(rebound.ECONFLICT, "capture: cannot cut a point during a resync")
	case s.overflow || s.dirtyBytesLocked() > 0:
		return rebound.RecoveryPoint{}, rebound.Errorf(rebound.ECONFLICT, "capture: cannot cut a point while the spool is in overflow")
	}
	rec := &rebound.Record{Kind: rebound.RecordMark, PointKind: kind}
	if err := s.appendLocked(rec); err != nil {
		return rebound.RecoveryPoint{}, fmt.Errorf("capture: append mark: %w", err)
	}
	return rebound.RecoveryPoint{
		ID:   fmt.Sprintf("p%d", rec.Seq),
		Time: time.Unix(0, rec.Time).UTC(),
		Kind: kind,
		Seq:  rec.Seq,
	}, nil
}

// Head returns the seq of the last record appended.
func (s *Stream) Head() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.head
}

// Flush makes every completed change durable: the spool, then the dirty
// maps, then the disks (so a synced disk never holds a change the synced
// spool and map do not account for). Concurrent flushes share rounds
// (group commit): a flush waits for a round that starts after it was
// called, so that round covers every change completed before the call,
// and flushes arriving during one round are all served by the next.
func (s *Stream) Flush() error {
	s.flushMu.Lock()
	want := s.flushStarted + 1
	for s.flushDone < want && s.flushing {
		if s.onFlushWait != nil {
			s.onFlushWait()
		}
		s.flushCond.Wait()
	}
	if s.flushDone >= want {
		err := s.flushErr
		s.flushMu.Unlock()
		return err
	}
	s.flushing = true
	s.flushStarted++
	round := s.flushStarted
	s.flushMu.Unlock()

	err := s.flushRound()

	s.flushMu.Lock()
	s.flushing = false
	s.flushDone, s.flushErr = round, err
	s.flushCond.Broadcast()
	s.flushMu.Unlock()
	return err
}

// flushRound is one round of Flush.
func (s *Stream) flushRound() error {
	if s.beforeFlush != nil {
		s.beforeFlush()
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	// Regions a failed disk write left dirty only in memory must be on
	// disk before a flush can say every change is accounted for.
	for _, d := range s.disks {
		if err := d.dirty.save(); err != nil {
			s.mu.Unlock()
			return fmt.Errorf("capture: %w", err)
		}
	}
	s.mu.Unlock()
	if err := s.spool.Sync(); err != nil {
		return fmt.Errorf("capture: sync spool: %w", err)
	}
	for _, d := range s.disks {
		if err := d.dirty.sync(); err != nil {
			return fmt.Errorf("capture: sync dirty map: %w", err)
		}
		if d.active != nil {
			if err := d.active.m.sync(); err != nil {
				return fmt.Errorf("capture: sync activity map: %w", err)
			}
		}
	}
	for _, d := range s.disks {
		if err := d.fd.Flush(); err != nil {
			return fmt.Errorf("capture: sync disk %d: %w", d.idx, err)
		}
	}
	return nil
}

// Stats returns a snapshot of the stream's state.
func (s *Stream) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.opts.Now()
	st := Stats{
		HeadSeq:      s.head,
		AckedSeq:     s.acked,
		BacklogBytes: s.backlog,
		DirtyBytes:   s.dirtyBytesLocked(),
		SyncDone:     s.syncDone,
		SyncTotal:    s.syncTotal,
		Error:        s.refusing,
		Throttled:    s.throttled,
		Spills:       s.spills,
		Spooling:     s.spooling,
	}
	switch {
	case s.resyncing && s.initial:
		st.State = StateSyncing
	case s.resyncing:
		st.State = StateResyncing
	case s.overflow || st.DirtyBytes > 0 || s.refusing != "":
		st.State = StateOverflow
	default:
		st.State = StateStreaming
	}
	if len(s.unacked) > 0 {
		st.LagSeconds = max(0, now.Sub(time.Unix(0, s.unacked[0].time)).Seconds())
	}
	// Throughput over the oldest sample within ~10 s.
	for i := range min(s.nsample, len(s.samples)) {
		sm := s.samples[(s.nsample-1-i)%len(s.samples)]
		if now.Sub(sm.t) > 11*time.Second {
			break
		}
		if dt := now.Sub(sm.t).Seconds(); dt >= 0.5 {
			st.ThroughputBps = float64(s.ackedBytes-sm.acked) / dt
		}
	}
	return st
}

// housekeep persists the acked seq, truncates the spool, samples
// throughput and leaves an overflow no ack would end (failed spool).
func (s *Stream) housekeep() {
	defer s.wg.Done()
	t := time.NewTicker(metaInterval)
	defer t.Stop()
	var lastSample time.Time
	for {
		select {
		case <-s.done:
			return
		case <-t.C:
		}
		s.mu.Lock()
		now := s.opts.Now()
		if now.Sub(lastSample) >= time.Second || now.Before(lastSample) {
			s.samples[s.nsample%len(s.samples)] = sample{t: now, acked: s.ackedBytes}
			s.nsample++
			lastSample = now
		}
		s.maybeLeaveOverflowLocked()
		for _, d := range s.disks {
			if err := d.dirty.save(); err != nil {
				s.logger.Error("saving dirty map failed; retrying", "disk", d.idx, "err", err)
			}
		}
		s.mu.Unlock()
		s.persistProgress()
	}
}

// persistProgress persists the acked seq and how far records have landed,
// then lets the activity maps and the spool forget what that covers.
func (s *Stream) persistProgress() {
	s.mu.Lock()
	s.landed = s.acked
	if f := s.oldestFlightLocked(); f != 0 && f <= s.landed {
		s.landed = f - 1
	}
	s.mu.Unlock()
	if err := s.saveMeta(); err != nil {
		s.logger.Error("saving stream state failed", "err", err)
		return
	}
	s.retireActive()
	if err := s.trimSpool(); err != nil {
		s.logger.Error("truncating spool failed", "err", err)
	}
}

// retireActive clears the activity maps' bits of records that are acked
// and landed, as persisted in the meta (so a restart never replays a
// spooled record over a region whose newer record's bit is gone), and
// starts the next generation.
func (s *Stream) retireActive() {
	s.metaMu.Lock()
	landed := s.lastMeta.Landed
	s.metaMu.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, d := range s.disks {
		if d.active == nil {
			continue
		}
		if err := d.active.retire(landed); err != nil {
			s.logger.Error("clearing activity map failed", "disk", d.idx, "err", err)
		}
		d.active.rotate(s.head)
	}
}

// trimSpool drops the spool segments the peer has acked, except those
// holding a record still on its way to the local disk: a restart after a
// kill replays it from the spool.
func (s *Stream) trimSpool() error {
	s.mu.Lock()
	keep := s.acked
	if f := s.oldestFlightLocked(); f != 0 && f <= keep {
		keep = f - 1
	}
	s.mu.Unlock()
	return s.spool.TruncateFront(keep)
}

// syncer fsyncs the spool in the background every quarter segment. The wal
// fsyncs a segment when it cuts the next one, inside Append and so inside
// the stream mutex; syncing ahead keeps that fsync short.
func (s *Stream) syncer() {
	defer s.wg.Done()
	for {
		select {
		case <-s.done:
			return
		case <-s.syncKick:
		}
		if err := s.spool.Sync(); err != nil {
			s.logger.Error("background spool sync failed", "err", err)
		}
	}
}

// saveMeta persists the stream state if it changed (write temp, rename).
func (s *Stream) saveMeta() error {
	s.metaMu.Lock()
	defer s.metaMu.Unlock()
	s.mu.Lock()
	m := meta{Version: 1, RegionSize: s.opts.RegionSize, Acked: s.acked, Resync: s.resyncing, Initial: s.initial && s.resyncing, DirtyTime: s.dirtyTime, Landed: s.landed, Gaps: append([][2]uint64(nil), s.gaps...)}
	for _, d := range s.disks {
		m.Disks = append(m.Disks, d.fd.Size())
	}
	s.mu.Unlock()
	if m.Acked == s.lastMeta.Acked && m.Resync == s.lastMeta.Resync && m.Initial == s.lastMeta.Initial && m.DirtyTime == s.lastMeta.DirtyTime &&
		m.Landed == s.lastMeta.Landed && len(m.Gaps) == len(s.lastMeta.Gaps) && len(s.lastMeta.Disks) > 0 {
		return nil
	}
	return s.writeMeta(&m)
}

func (s *Stream) writeMeta(m *meta) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	path := filepath.Join(s.dir, "meta.json")
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("capture: write meta: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("capture: write meta: %w", err)
	}
	s.lastMeta = *m
	return nil
}

func (s *Stream) readMeta() (*meta, error) {
	b, err := os.ReadFile(filepath.Join(s.dir, "meta.json"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, fmt.Errorf("capture: read meta: %w", err)
	}
	var m meta
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, rebound.Errorf(rebound.EINTERNAL, "capture: bad meta file in %s: %v", s.dir, err)
	}
	return &m, nil
}

// Close stops the stream's goroutines, persists its state and closes its
// files. Blocked Reads return ErrClosed.
func (s *Stream) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	close(s.done)
	s.mu.Unlock()
	s.wg.Wait()
	s.applying.Wait() // changes committed before closed land first
	var err error
	clean := true
	if s.direct {
		// The ring goes with the process: what the peer lacks goes to
		// the spool, so the next Open serves it without a resync.
		s.mu.Lock()
		if !s.spooling {
			if err = s.spillLocked(); err != nil {
				clean = false
			}
		}
		s.landed = s.acked
		s.mu.Unlock()
	}
	if merr := s.saveMeta(); err == nil {
		err = merr
	}
	if ferr := s.flushAll(); err == nil {
		err = ferr
	}
	if s.direct && clean && err == nil {
		// Every record has landed and the unacked ones are spooled: the
		// activity maps have nothing left to cover (a reprotect's
		// PendingRegions then sends no acked region again).
		for _, d := range s.disks {
			if d.active != nil && err == nil {
				err = d.active.reset()
			}
		}
	}
	if s.direct && clean && err == nil {
		// Last: a crash before this reopens as a crash (resync).
		if serr := s.seqf.set(s.head, 0); err == nil {
			err = serr
		}
	}
	if cerr := s.closeFiles(); err == nil {
		err = cerr
	}
	return err
}

func (s *Stream) flushAll() error {
	var err error
	if s.spool != nil {
		err = s.spool.Sync()
	}
	for _, d := range s.disks {
		if e := d.dirty.sync(); err == nil {
			err = e
		}
		if d.active != nil {
			if e := d.active.m.sync(); err == nil {
				err = e
			}
		}
		if e := d.fd.Flush(); err == nil {
			err = e
		}
	}
	return err
}

func (s *Stream) closeFiles() error {
	var err error
	s.rdMu.Lock()
	if s.rd != nil {
		s.rd.Close()
		s.rd = nil
	}
	s.rdMu.Unlock()
	if s.spool != nil {
		err = s.spool.Close()
	}
	if s.seqf != nil {
		if e := s.seqf.f.Close(); err == nil {
			err = e
		}
	}
	for _, d := range s.disks {
		if d.dirty != nil {
			if e := d.dirty.close(); err == nil {
				err = e
			}
		}
		if d.active != nil {
			if e := d.active.m.close(); err == nil {
				err = e
			}
		}
		if e := d.fd.Close(); err == nil {
			err = e
		}
	}
	return err
}

// Remove deletes a stream's state in dir (spool, meta, dirty maps). Disk
// files are left alone even if they live in dir.
func Remove(dir string) error {
	if err := os.RemoveAll(filepath.Join(dir, "spool")); err != nil {
		return fmt.Errorf("capture: remove: %w", err)
	}
	names, _ := filepath.Glob(filepath.Join(dir, "dirty.*"))
	active, _ := filepath.Glob(filepath.Join(dir, "active.*"))
	names = append(names, active...)
	names = append(names, filepath.Join(dir, "meta.json"), filepath.Join(dir, "meta.json.tmp"), filepath.Join(dir, "seq"))
	for _, n := range names {
		if err := os.Remove(n); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("capture: remove: %w", err)
		}
	}
	// Only if nothing else lives there.
	if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		if ents, rerr := os.ReadDir(dir); rerr == nil && len(ents) > 0 {
			return nil
		}
		return fmt.Errorf("capture: remove: %w", err)
	}
	return nil
}
