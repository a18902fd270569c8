package capture

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/nbd"
)

var (
	_ nbd.Backend        = (*Disk)(nil)
	_ nbd.Backend        = (*FileDisk)(nil)
	_ rebound.ReplSource = (*Stream)(nil)
)

// harness is a stream over n disks in a temp dir.
type harness struct {
	t     *testing.T
	dir   string
	specs []DiskSpec
	opts  Options
	s     *Stream
}

func newHarness(t *testing.T, n int, size int64, opts Options) *harness {
	t.Helper()
	dir := t.TempDir()
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	h := &harness{t: t, dir: dir, opts: opts}
	for i := range n {
		h.specs = append(h.specs, DiskSpec{Path: filepath.Join(dir, "disk"+string(rune('0'+i))), Size: size})
	}
	h.open()
	t.Cleanup(func() {
		if h.s != nil {
			h.s.Close()
		}
	})
	return h
}

func (h *harness) open() {
	h.t.Helper()
	s, err := Open(filepath.Join(h.dir, "stream"), h.specs, h.opts)
	if err != nil {
		h.t.Fatal(err)
	}
	h.s = s
}

// kill drops the stream as a killed process would: goroutines stop, files
// close, nothing is flushed or saved.
func (h *harness) kill() {
	s := h.s
	s.mu.Lock()
	s.closed = true
	close(s.done)
	s.mu.Unlock()
	s.wg.Wait()
	s.closeFiles()
	h.s = nil
}

// diskSum returns the sha256 of disk i's file.
func (h *harness) diskSum(i int) [32]byte {
	h.t.Helper()
	b, err := os.ReadFile(h.specs[i].Path)
	if err != nil {
		h.t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// readRange reads records [from, to] from the stream.
func readRange(t *testing.T, s *Stream, from, to uint64) []*rebound.Record {
	t.Helper()
	var out []*rebound.Record
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for from <= to {
		recs, err := s.Read(ctx, from, 1<<20)
		if err != nil {
			t.Fatalf("read %d: %v", from, err)
		}
		for _, r := range recs {
			if r.Seq != from {
				t.Fatalf("got seq %d, want %d", r.Seq, from)
			}
			from++
			out = append(out, r)
		}
	}
	return out
}

// model is the receiver's view: disks rebuilt from records.
type model [][]byte

func newModel(n int, size int64) model {
	m := make(model, n)
	for i := range m {
		m[i] = make([]byte, size)
	}
	return m
}

func (m model) apply(t *testing.T, recs []*rebound.Record) {
	t.Helper()
	var last int64
	for _, r := range recs {
		if r.Time < last {
			t.Fatalf("record %d time %d before %d", r.Seq, r.Time, last)
		}
		last = r.Time
		switch r.Kind {
		case rebound.RecordWrite:
			if int64(len(r.Data)) != r.Length {
				t.Fatalf("record %d: %d bytes for length %d", r.Seq, len(r.Data), r.Length)
			}
			copy(m[r.Disk][r.Offset:], r.Data)
		case rebound.RecordZero, rebound.RecordTrim:
			clear(m[r.Disk][r.Offset : r.Offset+r.Length])
		}
	}
}

func (m model) check(t *testing.T, h *harness) {
	t.Helper()
	for i := range m {
		if sha256.Sum256(m[i]) != h.diskSum(i) {
			t.Fatalf("disk %d: replayed model differs from the disk file", i)
		}
	}
}

// randomIO does one random write, zero or trim on d inside [0, span).
func randomIO(t *testing.T, rng *rand.Rand, d *Disk, span int64) {
	randomIOMax(t, rng, d, span, 96<<10)
}

func randomIOMax(t *testing.T, rng *rand.Rand, d *Disk, span, maxLen int64) {
	off := rng.Int64N(span - 1)
	length := 1 + rng.Int64N(min(span-off, maxLen))
	var err error
	switch rng.IntN(6) {
	case 0:
		err = d.WriteZeroes(off, length)
	case 1:
		err = d.Trim(off, length)
	default:
		p := make([]byte, length)
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		_, err = d.WriteAt(p, off)
	}
	if err != nil {
		t.Errorf("io: %v", err)
	}
}

func TestConcurrentOrder(t *testing.T) {
	const size = 2 << 20
	h := newHarness(t, 2, size, Options{})
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 1))
			for range 150 {
				// Mostly a small hot span so concurrent I/O overlaps.
				span := int64(256 << 10)
				if rng.IntN(4) == 0 {
					span = size
				}
				randomIO(t, rng, h.s.Disk(rng.IntN(2)), span)
			}
		}()
	}
	wg.Wait()
	head := h.s.Head()
	if head != 8*150 {
		t.Fatalf("head %d, want %d records", head, 8*150)
	}
	m := newModel(2, size)
	m.apply(t, readRange(t, h.s, 1, head))
	m.check(t, h)
	if st := h.s.Stats(); st.State != StateStreaming || st.BacklogBytes == 0 || st.AckedSeq != 0 {
		t.Fatalf("stats %+v", st)
	}
	h.s.Acked(head)
	if st := h.s.Stats(); st.BacklogBytes != 0 || st.AckedSeq != head || st.LagSeconds != 0 {
		t.Fatalf("stats after ack %+v", st)
	}
}

func TestBadInput(t *testing.T) {
	h := newHarness(t, 1, 1<<20, Options{})
	d := h.s.Disk(0)
	if _, err := d.WriteAt(make([]byte, 10), 1<<20-5); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("write past end: %v", err)
	}
	if err := d.WriteZeroes(-1, 10); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("zero at -1: %v", err)
	}
	if err := d.Trim(0, 1<<20+1); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("trim too long: %v", err)
	}
	if _, err := d.ReadAt(make([]byte, 10), 1<<20); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("read past end: %v", err)
	}
	if h.s.Head() != 0 {
		t.Fatalf("bad I/O appended records: head %d", h.s.Head())
	}
	if _, err := h.s.Mark("bogus"); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("mark bogus: %v", err)
	}
	// Still serving.
	if _, err := d.WriteAt([]byte("ok"), 0); err != nil {
		t.Fatal(err)
	}
	p, err := h.s.Mark(rebound.PointCrash)
	if err != nil || p.Seq != 2 || p.ID != "p2" || p.Kind != rebound.PointCrash {
		t.Fatalf("mark: %+v %v", p, err)
	}
	if h.s.Disk(1) != nil {
		t.Fatal("Disk(1) of a one-disk stream")
	}
	if _, err := Open(filepath.Join(h.dir, "stream2"), []DiskSpec{{Path: h.specs[0].Path, Size: 2 << 20}}, Options{}); rebound.ErrorCode(err) != rebound.ECONFLICT {
		t.Fatalf("open with wrong disk size: %v", err)
	}
}

func TestReadBlocks(t *testing.T) {
	h := newHarness(t, 1, 1<<20, Options{})
	got := make(chan []*rebound.Record, 1)
	go func() {
		recs, err := h.s.Read(context.Background(), 1, 1<<20)
		if err != nil {
			t.Error(err)
		}
		got <- recs
	}()
	select {
	case <-got:
		t.Fatal("Read returned before any record existed")
	case <-time.After(50 * time.Millisecond):
	}
	if _, err := h.s.Disk(0).WriteAt([]byte("hello"), 100); err != nil {
		t.Fatal(err)
	}
	select {
	case recs := <-got:
		if len(recs) != 1 || string(recs[0].Data) != "hello" || recs[0].Offset != 100 || recs[0].Seq != 1 {
			t.Fatalf("got %+v", recs)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Read did not wake up")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	if _, err := h.s.Read(ctx, 2, 1<<20); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("read with ctx: %v", err)
	}
	errc := make(chan error, 1)
	go func() {
		_, err := h.s.Read(context.Background(), 2, 1<<20)
		errc <- err
	}()
	time.Sleep(20 * time.Millisecond)
	h.s.Close()
	if err := <-errc; err != ErrClosed {
		t.Fatalf("read on close: %v", err)
	}
}

func TestInitialCopy(t *testing.T) {
	const size = 8 << 20
	dir := t.TempDir()
	// Existing content: random data in some places, holes elsewhere.
	rng := rand.New(rand.NewPCG(7, 7))
	path := filepath.Join(dir, "disk0")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(size)
	for range 20 {
		p := make([]byte, 1+rng.IntN(200<<10))
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		f.WriteAt(p, rng.Int64N(size/2-int64(len(p))))
	}
	f.Close()
	h := &harness{t: t, dir: dir, specs: []DiskSpec{{Path: path, Size: size}}, opts: Options{SpoolLimit: 1 << 20, Logger: slog.New(slog.DiscardHandler)}}
	h.open()
	defer h.s.Close()
	if err := h.s.StartInitialCopy(); err != nil {
		t.Fatal(err)
	}
	if st := h.s.Stats(); st.State != StateSyncing || st.SyncTotal != size {
		t.Fatalf("stats %+v", st)
	}
	if _, err := h.s.Mark(rebound.PointCrash); rebound.ErrorCode(err) != rebound.ECONFLICT {
		t.Fatalf("mark during sync: %v", err)
	}
	// One live write is inside the window whatever the timing: the copy
	// keeps to half the spool (512 KiB; the disk holds about 2 MiB of data), so it cannot end
	// before the receiver below acks, and live writes have the other half.
	if _, err := h.s.Disk(0).WriteAt(bytes.Repeat([]byte{7}, 4096), 12288); err != nil {
		t.Fatal(err)
	}
	// Writers run during the copy; a receiver reads and acks slowly.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		rng := rand.New(rand.NewPCG(1, 2))
		for {
			select {
			case <-stop:
				return
			default:
			}
			randomIO(t, rng, h.s.Disk(0), size)
			time.Sleep(time.Millisecond)
		}
	}()
	var recs []*rebound.Record
	next := uint64(1)
	deadline := time.Now().Add(20 * time.Second)
	for h.s.Stats().State != StateStreaming {
		if time.Now().After(deadline) {
			t.Fatalf("initial copy did not finish: %+v", h.s.Stats())
		}
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		got, err := h.s.Read(ctx, next, 256<<10)
		cancel()
		if err != nil && !errors.Is(err, context.DeadlineExceeded) {
			t.Fatal(err)
		}
		recs = append(recs, got...)
		next += uint64(len(got))
		h.s.Acked(next - 1)
	}
	close(stop)
	wg.Wait()
	recs = append(recs, readRange(t, h.s, next, h.s.Head())...)
	// The stream opens with ResyncBegin and has exactly one window.
	if recs[0].Kind != rebound.RecordResyncBegin {
		t.Fatalf("first record is %v", recs[0].Kind)
	}
	end, inWindow, zeroBytes := -1, 0, int64(0)
	for i, r := range recs {
		if r.Kind == rebound.RecordResyncEnd {
			if end >= 0 {
				t.Fatal("two resync ends")
			}
			end = i
		}
		if end < 0 && r.Kind != rebound.RecordResyncBegin && (r.Offset%(64<<10) != 0 || r.Kind == rebound.RecordTrim) {
			inWindow++ // a live write inside the window
		}
		if end < 0 && r.Kind == rebound.RecordZero {
			zeroBytes += r.Length
		}
	}
	if end < 0 || inWindow == 0 {
		t.Fatalf("end %d, live writes in window %d", end, inWindow)
	}
	if zeroBytes < size/2-(1<<20) {
		t.Fatalf("the sparse half was copied as data: zero records cover %d bytes", zeroBytes)
	}
	st := h.s.Stats()
	if st.SyncDone < st.SyncTotal || st.DirtyBytes != 0 {
		t.Fatalf("stats %+v", st)
	}
	m := newModel(1, size)
	m.apply(t, recs)
	m.check(t, h)
	if _, err := h.s.Mark(rebound.PointApp); err != nil {
		t.Fatal(err)
	}
}

func TestOverflowAndResync(t *testing.T) {
	const size = 4 << 20
	h := newHarness(t, 2, size, Options{SpoolLimit: 256 << 10, SegmentSize: 64 << 10})
	rng := rand.New(rand.NewPCG(3, 4))
	start := time.Now()
	for range 200 {
		randomIO(t, rng, h.s.Disk(rng.IntN(2)), size)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("writes blocked: %v", d)
	}
	st := h.s.Stats()
	if st.State != StateOverflow || st.DirtyBytes == 0 || st.BacklogBytes > 256<<10 {
		t.Fatalf("stats %+v", st)
	}
	if _, err := h.s.Mark(rebound.PointCrash); rebound.ErrorCode(err) != rebound.ECONFLICT {
		t.Fatalf("mark in overflow: %v", err)
	}
	// The peer now reads and acks everything; writes go on.
	var recs []*rebound.Record
	next := uint64(1)
	deadline := time.Now().Add(20 * time.Second)
	for i := 0; ; i++ {
		if time.Now().After(deadline) {
			t.Fatalf("resync did not finish: %+v", h.s.Stats())
		}
		if st := h.s.Stats(); st.BacklogBytes > h.opts.SpoolLimit {
			t.Fatalf("spool above its limit: %+v", st)
		}
		if i < 100 {
			randomIO(t, rng, h.s.Disk(rng.IntN(2)), size)
		} else if st := h.s.Stats(); st.State == StateStreaming && st.HeadSeq == next-1 {
			break
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		got, err := h.s.Read(ctx, next, 128<<10)
		cancel()
		if err != nil && !errors.Is(err, context.DeadlineExceeded) {
			t.Fatal(err)
		}
		recs = append(recs, got...)
		next += uint64(len(got))
		h.s.Acked(next - 1)
	}
	var begins, ends int
	for _, r := range recs {
		switch r.Kind {
		case rebound.RecordResyncBegin:
			begins++
		case rebound.RecordResyncEnd:
			ends++
		}
	}
	if begins == 0 || ends != 1 || recs[len(recs)-1].Kind != rebound.RecordResyncEnd {
		t.Fatalf("begins %d ends %d last %v", begins, ends, recs[len(recs)-1].Kind)
	}
	m := newModel(2, size)
	m.apply(t, recs)
	m.check(t, h)
	if _, err := h.s.Mark(rebound.PointCrash); err != nil {
		t.Fatal(err)
	}
	// The spool was truncated: the oldest records are gone.
	time.Sleep(3 * metaInterval)
	if _, err := h.s.Read(context.Background(), 1, 1<<20); rebound.ErrorCode(err) != rebound.ECONFLICT {
		t.Fatalf("read of a truncated record: %v", err)
	}
}

func TestKillAndReopen(t *testing.T) {
	const size = 4 << 20
	h := newHarness(t, 2, size, Options{SpoolLimit: 512 << 10, SegmentSize: 64 << 10})
	rng := rand.New(rand.NewPCG(5, 6))
	for range 30 {
		randomIOMax(t, rng, h.s.Disk(rng.IntN(2)), size, 8<<10)
	}
	if h.s.Head() != 30 {
		t.Fatalf("head %d", h.s.Head())
	}
	acked := h.s.Head() / 2
	pre := readRange(t, h.s, 1, h.s.Head())
	h.s.Acked(acked)
	for range 100 { // into overflow
		randomIO(t, rng, h.s.Disk(rng.IntN(2)), size)
	}
	// A last write is spooled but its disk write is lost in the kill.
	if st := h.s.Stats(); st.State != StateOverflow {
		t.Fatalf("not in overflow: %+v", st)
	}
	time.Sleep(3 * metaInterval) // acked seq persisted
	before := h.s.Stats()
	// Find a spooled write in a clean region and undo it on the file, as
	// if the process died between the spool write and the disk write.
	var lost *rebound.Record
	for i := len(pre) - 1; i >= 0 && lost == nil; i-- {
		r := pre[i]
		d := h.s.disks[r.Disk]
		if r.Seq > acked && r.Kind == rebound.RecordWrite && !d.dirty.isDirty(r.Offset/d.dirty.regionSize) && !d.dirty.isDirty((r.Offset+r.Length-1)/d.dirty.regionSize) && r.Offset/d.dirty.regionSize+1 >= (r.Offset+r.Length-1)/d.dirty.regionSize {
			lost = r
		}
	}
	if lost == nil {
		t.Fatal("no spooled write in a clean region")
	}
	want := [2][32]byte{h.diskSum(0), h.diskSum(1)}
	h.kill()
	f, _ := os.OpenFile(h.specs[lost.Disk].Path, os.O_RDWR, 0)
	f.WriteAt(bytes.Repeat([]byte{0xAA}, int(lost.Length)), lost.Offset)
	f.Close()
	if h.diskSum(int(lost.Disk)) == want[lost.Disk] {
		t.Fatal("undo did not change the disk")
	}

	// Reopen redoes the lost write and keeps the overflow writes (which the
	// spool does not have) in the dirty regions.
	h.open()
	for i := range 2 {
		if h.diskSum(i) != want[i] {
			t.Fatalf("disk %d after reopen differs from before the kill", i)
		}
	}
	after := h.s.Stats()
	if after.AckedSeq != acked || after.HeadSeq != before.HeadSeq || after.DirtyBytes != before.DirtyBytes || after.DirtyBytes == 0 {
		t.Fatalf("before kill %+v, after %+v", before, after)
	}
	// The peer resumes from acked+1 (the spool has it) and catches up.
	recs := pre[:acked]
	next := acked + 1
	deadline := time.Now().Add(20 * time.Second)
	for {
		if time.Now().After(deadline) {
			t.Fatalf("did not catch up: %+v", h.s.Stats())
		}
		if st := h.s.Stats(); st.State == StateStreaming && st.HeadSeq == next-1 {
			break
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		got, err := h.s.Read(ctx, next, 128<<10)
		cancel()
		if err != nil && !errors.Is(err, context.DeadlineExceeded) {
			t.Fatal(err)
		}
		recs = append(recs, got...)
		next += uint64(len(got))
		h.s.Acked(next - 1)
	}
	m := newModel(2, size)
	m.apply(t, recs)
	m.check(t, h)
	// Kill inside the resync of a fresh initial copy: it resumes.
	if err := h.s.StartInitialCopy(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * metaInterval)
	h.kill()
	h.open()
	if st := h.s.Stats(); st.State != StateSyncing {
		t.Fatalf("after kill during initial copy: %+v", st)
	}
	// The peer goes on from where it was; the copy resumes and completes.
	deadline = time.Now().Add(20 * time.Second)
	for {
		if time.Now().After(deadline) {
			t.Fatalf("initial copy did not finish after restart: %+v", h.s.Stats())
		}
		if st := h.s.Stats(); st.State == StateStreaming && st.HeadSeq == next-1 {
			break
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		got, err := h.s.Read(ctx, next, 128<<10)
		cancel()
		if err != nil && !errors.Is(err, context.DeadlineExceeded) {
			t.Fatal(err)
		}
		recs = append(recs, got...)
		next += uint64(len(got))
		h.s.Acked(next - 1)
	}
	m = newModel(2, size)
	m.apply(t, recs)
	m.check(t, h)
}

func TestSpoolFailureFallsBackToDirty(t *testing.T) {
	h := newHarness(t, 1, 1<<20, Options{})
	h.s.spool.Close() // every append now fails
	p := bytes.Repeat([]byte{7}, 4096)
	if _, err := h.s.Disk(0).WriteAt(p, 8192); err != nil {
		t.Fatalf("write with a failed spool: %v", err)
	}
	got := make([]byte, 4096)
	h.s.Disk(0).ReadAt(got, 8192)
	if !bytes.Equal(got, p) {
		t.Fatal("write lost")
	}
	if st := h.s.Stats(); st.DirtyBytes != 64<<10 || st.HeadSeq != 0 {
		t.Fatalf("stats %+v", st)
	}
}

func TestFileDisk(t *testing.T) {
	path := filepath.Join(t.TempDir(), "d")
	d, err := OpenFileDisk(path, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	p := bytes.Repeat([]byte{1}, 8192)
	if _, err := d.WriteAt(p, 4096); err != nil {
		t.Fatal(err)
	}
	if err := d.Trim(4096, 4096); err != nil {
		t.Fatal(err)
	}
	if err := d.WriteZeroes(10000, 10); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 3*4096)
	if _, err := d.ReadAt(got, 4096); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 3*4096)
	copy(want[4096:8192], p)
	clear(want[10000-4096 : 10010-4096])
	if !bytes.Equal(got, want) {
		t.Fatal("content differs")
	}
	if _, err := d.WriteAt(p, 1<<20-1); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("write past end: %v", err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenFileDisk(path, 2<<20); rebound.ErrorCode(err) != rebound.ECONFLICT {
		t.Fatalf("reopen with another size: %v", err)
	}
}

func TestLagAndThroughput(t *testing.T) {
	var mu sync.Mutex
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	h := newHarness(t, 1, 4<<20, Options{Now: clock})
	time.Sleep(2 * metaInterval) // first throughput sample, 0 bytes acked
	if _, err := h.s.Disk(0).WriteAt(make([]byte, 1<<20), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := h.s.Disk(0).WriteAt(make([]byte, 1<<20), 1<<20); err != nil {
		t.Fatal(err)
	}
	advance(2 * time.Second)
	if st := h.s.Stats(); st.LagSeconds != 2 || st.BacklogBytes != 2<<20 || st.ThroughputBps != 0 {
		t.Fatalf("before ack: %+v", st)
	}
	h.s.Acked(2)
	st := h.s.Stats()
	if st.LagSeconds != 0 || st.BacklogBytes != 0 || st.ThroughputBps != float64(2<<20)/2 {
		t.Fatalf("after ack: %+v", st)
	}
	advance(30 * time.Second)
	time.Sleep(2 * metaInterval)
	if st := h.s.Stats(); st.ThroughputBps != 0 {
		t.Fatalf("throughput 30 s later: %+v", st)
	}
}

func TestClockGoesBack(t *testing.T) {
	var mu sync.Mutex
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	h := newHarness(t, 1, 1<<20, Options{Now: clock})
	h.s.Disk(0).WriteAt([]byte("a"), 0)
	mu.Lock()
	now = now.Add(-time.Hour)
	mu.Unlock()
	h.s.Disk(0).WriteAt([]byte("b"), 0)
	recs := readRange(t, h.s, 1, 2)
	if recs[1].Time != recs[0].Time {
		t.Fatalf("record time went back: %d then %d", recs[0].Time, recs[1].Time)
	}
}

// Benchmarks: the cost of capture on the write path against a plain file.

func benchWrite(b *testing.B, size int, stream bool) {
	dir := b.TempDir()
	const diskSize = 1 << 30
	var w interface {
		WriteAt([]byte, int64) (int, error)
	}
	var s *Stream
	if stream {
		var err error
		s, err = Open(filepath.Join(dir, "stream"), []DiskSpec{{Path: filepath.Join(dir, "disk"), Size: diskSize}}, Options{Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			b.Fatal(err)
		}
		defer s.Close()
		w = s.Disk(0)
	} else {
		d, err := OpenFileDisk(filepath.Join(dir, "disk"), diskSize)
		if err != nil {
			b.Fatal(err)
		}
		defer d.Close()
		w = d
	}
	p := make([]byte, size)
	for i := range p {
		p[i] = byte(i * 7)
	}
	b.SetBytes(int64(size))
	b.ResetTimer()
	for i := range b.N {
		off := int64(i*size) % (diskSize - int64(size))
		if _, err := w.WriteAt(p, off); err != nil {
			b.Fatal(err)
		}
		if s != nil && i%64 == 63 {
			s.Acked(s.Head()) // a peer keeping up, so the spool stays small
		}
	}
}

func BenchmarkWrite4K(b *testing.B) {
	b.Run("stream", func(b *testing.B) { benchWrite(b, 4<<10, true) })
	b.Run("filedisk", func(b *testing.B) { benchWrite(b, 4<<10, false) })
}

func BenchmarkWrite1M(b *testing.B) {
	b.Run("stream", func(b *testing.B) { benchWrite(b, 1<<20, true) })
	b.Run("filedisk", func(b *testing.B) { benchWrite(b, 1<<20, false) })
}

func TestRemove(t *testing.T) {
	h := newHarness(t, 1, 1<<20, Options{})
	h.s.Disk(0).WriteAt([]byte("x"), 0)
	h.s.Close()
	h.s = nil
	dir := filepath.Join(h.dir, "stream")
	if err := Remove(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("stream dir still there: %v", err)
	}
	if _, err := os.Stat(h.specs[0].Path); err != nil {
		t.Fatalf("disk removed: %v", err)
	}
	// A stream dir that holds a disk file keeps the disk.
	dir2 := t.TempDir()
	disk := filepath.Join(dir2, "disk")
	s, err := Open(dir2, []DiskSpec{{Path: disk, Size: 1 << 20}}, Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if err := Remove(dir2); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(dir2)
	if len(ents) != 1 || ents[0].Name() != "disk" {
		t.Fatalf("left %v", ents)
	}
}
