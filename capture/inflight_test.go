package capture

import (
	"bytes"
	"context"
	"log/slog"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/wal"
)

// applyLog records the order in which changes start their disk write.
type applyLog struct {
	mu   sync.Mutex
	recs []*rebound.Record
}

func (l *applyLog) add(r *rebound.Record) {
	l.mu.Lock()
	l.recs = append(l.recs, &rebound.Record{Seq: r.Seq, Disk: r.Disk, Offset: r.Offset, Length: r.Length})
	l.mu.Unlock()
}

// checkOverlapOrder fails if two overlapping changes of one disk started
// their disk writes out of seq order.
func (l *applyLog) checkOverlapOrder(t *testing.T) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	for i, a := range l.recs {
		for _, b := range l.recs[i+1:] {
			if a.Disk == b.Disk && a.Offset < b.Offset+b.Length && b.Offset < a.Offset+a.Length && a.Seq > b.Seq {
				t.Fatalf("record %d [%d,+%d) reached the disk before the earlier overlapping record %d [%d,+%d)", a.Seq, a.Offset, a.Length, b.Seq, b.Offset, b.Length)
			}
		}
	}
}

// gate holds a change in flight until opened; a failing test opens it
// in cleanup, before the harness closes the stream (which waits for it).
func gate(t *testing.T) (held, release chan struct{}, open func()) {
	held, release = make(chan struct{}), make(chan struct{})
	var once sync.Once
	open = func() { once.Do(func() { close(release) }) }
	t.Cleanup(open)
	return held, release, open
}

// waitDone fails the test if wg is not done within a generous bound (a
// deadlock detector, not a timing window: correct code finishes at once).
func waitDone(t *testing.T, wg *sync.WaitGroup, what string) {
	t.Helper()
	ch := make(chan struct{})
	go func() { wg.Wait(); close(ch) }()
	select {
	case <-ch:
	case <-time.After(30 * time.Second):
		t.Fatalf("%s did not finish", what)
	}
}

// checkSpool fails unless the stream's spool holds exactly recs, in order.
func checkSpool(t *testing.T, dir string, recs []*rebound.Record) {
	t.Helper()
	l, err := wal.Open(filepath.Join(dir, "stream", "spool"), wal.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	r, err := l.NewReader(recs[0].Seq)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	for _, want := range recs {
		got, _, err := r.Next()
		if err != nil {
			t.Fatalf("spool at %d: %v", want.Seq, err)
		}
		if got.Seq != want.Seq || got.Kind != want.Kind || got.Offset != want.Offset || got.Length != want.Length || !bytes.Equal(got.Data, want.Data) {
			t.Fatalf("spool record %d (%v at %d+%d) differs from the stream's %d (%v at %d+%d)", got.Seq, got.Kind, got.Offset, got.Length, want.Seq, want.Kind, want.Offset, want.Length)
		}
	}
}

// TestInFlightWrites holds one write in flight and runs 32 more at once:
// the disjoint ones finish meanwhile (disk writes are not serialized),
// the overlapping ones wait for it; overlapping changes reach the disk in
// seq order, and the disk, the stream and the spool all equal the records
// applied in seq order.
func TestInFlightWrites(t *testing.T) {
	const size = 1 << 20
	const hot = 64 << 10 // the held write's range
	h := newHarness(t, 1, size, Options{})
	var log applyLog
	held, release, open := gate(t)
	h.s.beforeApply = func(r *rebound.Record) {
		log.add(r)
		if r.Seq == 1 {
			close(held)
			<-release
		}
	}
	d := h.s.Disk(0)
	var first sync.WaitGroup
	first.Add(1)
	go func() {
		defer first.Done()
		if _, err := d.WriteAt(bytes.Repeat([]byte{0xAA}, hot), 0); err != nil {
			t.Error(err)
		}
	}()
	<-held

	// 32 writers: even ones inside the held range, odd ones outside it
	// (often overlapping each other).
	var overlapDone atomic.Int32
	var inside, outside sync.WaitGroup
	for g := range 32 {
		wg := &outside
		if g%2 == 0 {
			wg = &inside
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 3))
			if g%2 == 0 {
				defer overlapDone.Add(1)
				randomIOMax(t, rng, d, hot, 16<<10)
				return
			}
			off := 2*hot + rng.Int64N(128<<10)
			p := make([]byte, 4096+rng.IntN(60<<10))
			for i := range p {
				p[i] = byte(rng.Uint32())
			}
			if _, err := d.WriteAt(p, off); err != nil {
				t.Error(err)
			}
		}()
	}
	// Every change is committed (has its seq) once the head reaches 33.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := h.s.Read(ctx, 33, 1); err != nil {
		t.Fatalf("waiting for 33 records: %v", err)
	}
	waitDone(t, &outside, "writes disjoint from the in-flight one")
	if n := overlapDone.Load(); n != 0 {
		t.Fatalf("%d writes overlapping an in-flight write finished before it", n)
	}
	open()
	waitDone(t, &inside, "writes overlapping the in-flight one")
	first.Wait()

	recs := readRange(t, h.s, 1, 33)
	if h.s.Head() != 33 {
		t.Fatalf("head %d, want 33", h.s.Head())
	}
	log.checkOverlapOrder(t)
	m := newModel(1, size)
	m.apply(t, recs)
	m.check(t, h)
	if err := h.s.Close(); err != nil {
		t.Fatal(err)
	}
	h.s = nil
	checkSpool(t, h.dir, recs)
}

// TestInFlightQD32 runs 32 writers of random writes, zeroes and trims on
// two disks (mostly a hot span, so they overlap): overlapping changes
// reach the disk in seq order and the disks equal the stream applied in
// order, also after a kill and reopen (replay) and in the spool.
func TestInFlightQD32(t *testing.T) {
	const size = 2 << 20
	h := newHarness(t, 2, size, Options{})
	var log applyLog
	h.s.beforeApply = log.add
	var wg sync.WaitGroup
	for g := range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 4))
			for range 40 {
				span := int64(128 << 10)
				if rng.IntN(4) == 0 {
					span = size
				}
				randomIOMax(t, rng, h.s.Disk(rng.IntN(2)), span, 32<<10)
			}
		}()
	}
	waitDone(t, &wg, "writers")
	const n = 32 * 40
	recs := readRange(t, h.s, 1, n)
	log.checkOverlapOrder(t)
	m := newModel(2, size)
	m.apply(t, recs)
	m.check(t, h)
	h.kill()
	checkSpool(t, h.dir, recs)
	h.open()
	m.check(t, h)
}

// TestResyncWaitsForInFlight: a resync copy of a region waits for a
// committed write to it that has not reached the disk, so the copy, after
// the write in the stream, carries the write's data.
func TestResyncWaitsForInFlight(t *testing.T) {
	const size = 1 << 20
	h := newHarness(t, 1, size, Options{RegionSize: 4096})
	held, release, open := gate(t)
	h.s.beforeApply = func(r *rebound.Record) {
		if r.Seq == 1 {
			close(held)
			<-release
		}
	}
	waiting := make(chan struct{})
	var once sync.Once
	h.s.onCopyWait = func() { once.Do(func() { close(waiting) }) }
	done := make(chan error, 1)
	go func() {
		_, err := h.s.Disk(0).WriteAt(bytes.Repeat([]byte{0x5A}, 8192), 4096)
		done <- err
	}()
	<-held
	if err := h.s.StartResync([][]rebound.Region{{{Offset: 0, Length: 16384}}}); err != nil {
		t.Fatal(err)
	}
	// The write is 1, ResyncBegin 2: a record 3 now is a copy taken
	// while the write is in flight.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	copied := make(chan struct{})
	go func() {
		if _, err := h.s.Read(ctx, 3, 1); err == nil {
			close(copied)
		}
	}()
	select {
	case <-waiting:
	case <-copied:
		t.Fatal("the resync copied a region with a write in flight")
	}
	open()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// The write, then the window: begin, copies, end.
	var recs []*rebound.Record
	for next := uint64(1); len(recs) == 0 || recs[len(recs)-1].Kind != rebound.RecordResyncEnd; {
		got, err := h.s.Read(ctx, next, 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		recs = append(recs, got...)
		next += uint64(len(got))
	}
	if recs[0].Seq != 1 || recs[0].Kind != rebound.RecordWrite || recs[1].Kind != rebound.RecordResyncBegin {
		t.Fatalf("records start %v, %v; want the write, then resync-begin", recs[0].Kind, recs[1].Kind)
	}
	m := newModel(1, size)
	m.apply(t, recs)
	m.check(t, h)
	if !bytes.Equal(m[0][4096:12288], bytes.Repeat([]byte{0x5A}, 8192)) {
		t.Fatal("the stream lost the write")
	}
}

// TestAckedInFlightSurvivesKill: the peer acks a record whose disk write
// has not happened yet, the spool is trimmed, and the process is killed
// before the disk write: the record stays in the spool and the reopened
// disk holds it, as the peer does.
func TestAckedInFlightSurvivesKill(t *testing.T) {
	const size = 1 << 20
	h := newHarness(t, 1, size, Options{SegmentSize: 64 << 10})
	held, release, open := gate(t)
	h.s.beforeApply = func(r *rebound.Record) {
		if r.Seq == 1 {
			close(held)
			<-release
		}
	}
	d := h.s.Disk(0)
	want := bytes.Repeat([]byte{0xC3}, 4096)
	done := make(chan error, 1)
	go func() {
		_, err := d.WriteAt(want, 0)
		done <- err
	}()
	<-held
	// Later records fill more segments, so the first one could go.
	p := bytes.Repeat([]byte{1}, 32<<10)
	for i := range 8 {
		if _, err := d.WriteAt(p, int64(64<<10+i*len(p))); err != nil {
			t.Fatal(err)
		}
	}
	h.s.Acked(h.s.Head())
	if err := h.s.trimSpool(); err != nil {
		t.Fatal(err)
	}
	if first := h.s.spool.FirstSeq(); first != 1 {
		t.Fatalf("spool starts at %d: the acked record 1 was dropped before it reached the disk", first)
	}
	// Kill with record 1 still in flight; it then fails on closed files.
	s := h.s
	s.mu.Lock()
	s.closed = true
	close(s.done)
	s.mu.Unlock()
	s.wg.Wait()
	s.closeFiles()
	open()
	<-done
	h.s = nil
	h.open()
	got := make([]byte, len(want))
	if _, err := h.s.Disk(0).ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("the reopened disk lacks the acked write")
	}
	// Once landed, the acked records go.
	h.s.Acked(h.s.Head())
	if err := h.s.trimSpool(); err != nil {
		t.Fatal(err)
	}
	if first := h.s.spool.FirstSeq(); first == 1 {
		t.Fatal("the spool kept segments that are acked and on disk")
	}
}

// TestFlushGroupCommit: flushes called while a flush round runs cannot be
// served by it (it may have started before their writes completed); they
// wait and share one next round.
func TestFlushGroupCommit(t *testing.T) {
	h := newHarness(t, 1, 1<<20, Options{})
	held, release, open := gate(t)
	var rounds atomic.Int32
	h.s.beforeFlush = func() {
		if rounds.Add(1) == 1 {
			close(held)
			<-release
		}
	}
	const n = 8
	waiting := make(chan struct{}, 2*n)
	h.s.onFlushWait = func() { waiting <- struct{}{} }
	errs := make(chan error, n+1)
	go func() { errs <- h.s.Flush() }()
	<-held
	for i := range n {
		go func() {
			if _, err := h.s.Disk(0).WriteAt([]byte{byte(i)}, int64(i)); err != nil {
				errs <- err
				return
			}
			errs <- h.s.Flush()
		}()
	}
	for range n {
		<-waiting
	}
	open()
	for range n + 1 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if r := rounds.Load(); r != 2 {
		t.Fatalf("%d flush rounds for %d flushes during the first: want 2", r, n)
	}
	if err := h.s.Flush(); err != nil || rounds.Load() != 3 {
		t.Fatalf("a later flush: err %v, %d rounds; want its own round", err, rounds.Load())
	}
}

// benchWriteQD writes size-byte blocks from qd goroutines at once (random
// block-aligned offsets of a 1 GiB disk), the load an NBD client at that
// queue depth puts on the stream.
// benchWriteQD runs the spool path (today's default Options) and direct
// mode (protocol A, as the site opens its streams: 4 KiB regions).
func benchWriteQD(b *testing.B, size, qd int) {
	b.Run("spool", func(b *testing.B) { benchWriteQDOpts(b, size, qd, Options{}) })
	b.Run("direct", func(b *testing.B) { benchWriteQDOpts(b, size, qd, Options{Direct: true, RegionSize: 4096}) })
}

func benchWriteQDOpts(b *testing.B, size, qd int, opts Options) {
	dir := b.TempDir()
	const diskSize = 1 << 30
	opts.Logger = slog.New(slog.DiscardHandler)
	s, err := Open(filepath.Join(dir, "stream"), []DiskSpec{{Path: filepath.Join(dir, "disk"), Size: diskSize}}, opts)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	var n atomic.Int64
	var wg sync.WaitGroup
	b.SetBytes(int64(size))
	b.ResetTimer()
	for w := range qd {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 5))
			p := make([]byte, size)
			for i := range p {
				p[i] = byte(rng.Uint32())
			}
			for {
				i := n.Add(1)
				if i > int64(b.N) {
					return
				}
				if _, err := s.Disk(0).WriteAt(p, rng.Int64N(diskSize/int64(size))*int64(size)); err != nil {
					b.Error(err)
					return
				}
				if i%64 == 0 {
					s.Acked(s.Head()) // a peer keeping up
				}
			}
		}()
	}
	wg.Wait()
	b.StopTimer()
	if st := s.Stats(); opts.Direct {
		b.ReportMetric(float64(st.Spills), "spills")
	}
}

func BenchmarkWrite4KQD32(b *testing.B) { benchWriteQD(b, 4096, 32) }
func BenchmarkWrite1MQD8(b *testing.B)  { benchWriteQD(b, 1<<20, 8) }
