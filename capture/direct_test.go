package capture

import (
	"bytes"
	"context"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

// drain reads every record from next on until the stream has nothing
// more, acking as it goes, and returns them.
func drain(t *testing.T, s *Stream, next uint64) []*rebound.Record {
	t.Helper()
	var out []*rebound.Record
	for next <= s.Head() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		got, err := s.Read(ctx, next, 1<<20)
		cancel()
		if err != nil {
			t.Fatalf("read %d: %v", next, err)
		}
		out = append(out, got...)
		next = got[len(got)-1].Seq + 1
		s.Acked(next - 1)
	}
	return out
}

// drainResync reads from next on, acking, until a ResyncEnd.
func drainResync(t *testing.T, s *Stream, next uint64) []*rebound.Record {
	t.Helper()
	var out []*rebound.Record
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		got, err := s.Read(ctx, next, 1<<20)
		cancel()
		if err != nil {
			t.Fatalf("read %d: %v (%+v)", next, err, s.Stats())
		}
		out = append(out, got...)
		next = got[len(got)-1].Seq + 1
		s.Acked(next - 1)
		if got[len(got)-1].Kind == rebound.RecordResyncEnd {
			return out
		}
	}
}

// regionsOf lists the regions set in a disk's activity map file.
func regionsOf(t *testing.T, path string, size, rs int64) []rebound.Region {
	t.Helper()
	regs, err := dirtyRegions(path, size, rs)
	if err != nil {
		t.Fatal(err)
	}
	return regs
}

// TestDirectKillResyncsActiveRegions: in direct mode, acknowledged writes
// that the peer never acked live only in the ring and never reach the
// spool. A kill -9 (the stream abandoned without Close) loses them; the
// reopened stream resyncs exactly their regions, in a window opened by a
// ResyncBegin tagged as a source crash at a seq above every seq handed
// out before, and the peer's copy then equals the disk.
func TestDirectKillResyncsActiveRegions(t *testing.T) {
	const size = 4 << 20
	const rs = 4096
	h := newHarness(t, 2, size, Options{Direct: true, RegionSize: rs, SpoolLimit: 8 << 20, SegmentSize: 64 << 10})
	rng := rand.New(rand.NewPCG(7, 8))
	m := newModel(2, size)

	// Phase 1: writes the peer receives and acks; once that is persisted
	// (two housekeeping rounds: rotate, retire) no region is active.
	for range 40 {
		randomIOMax(t, rng, h.s.Disk(rng.IntN(2)), size, 20<<10)
	}
	recs := drain(t, h.s, 1)
	m.apply(t, recs)
	h.s.persistProgress()
	h.s.persistProgress()
	for i := range 2 {
		if regs := regionsOf(t, filepath.Join(h.dir, "stream", "active."+string(rune('0'+i))), size, rs); len(regs) != 0 {
			t.Fatalf("disk %d: regions %v still active after every record was acked and landed", i, regs)
		}
	}
	acked := h.s.Head()
	spoolLast := h.s.spool.LastSeq()

	// Phase 2: acknowledged writes the peer never gets.
	want := make([][]rebound.Region, 2)
	for range 25 {
		i := rng.IntN(2)
		off := rng.Int64N(size - 16<<10)
		n := 1 + rng.Int64N(12<<10)
		p := bytes.Repeat([]byte{byte(1 + rng.IntN(255))}, int(n))
		if _, err := h.s.Disk(i).WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		first, last := off/rs*rs, (off+n+rs-1)/rs*rs
		want[i] = append(want[i], rebound.Region{Offset: first, Length: min(last, size) - first})
	}
	for i := range want {
		want[i] = rebound.MergeRegions(want[i])
	}
	lostHead := h.s.Head()
	if lostHead <= acked {
		t.Fatal("phase 2 appended nothing")
	}
	if got := h.s.spool.LastSeq(); got != spoolLast {
		t.Fatalf("direct mode wrote records to the spool (last %d, was %d)", got, spoolLast)
	}
	sums := [2][32]byte{h.diskSum(0), h.diskSum(1)}

	h.kill()
	h.open()

	// The resync (running already) has exactly the lost records' regions
	// to send; the disks did not change.
	var total int64
	for i := range want {
		for _, r := range want[i] {
			total += r.Length
		}
		if h.diskSum(i) != sums[i] {
			t.Fatalf("disk %d changed across the kill", i)
		}
	}
	if st := h.s.Stats(); st.SyncTotal != total || st.HeadSeq <= lostHead {
		t.Fatalf("after the kill: %+v; want %d bytes to resync and a head above %d", st, total, lostHead)
	}

	// The peer resumes at acked+1: the stream jumps past the lost seqs to
	// the crash resync's begin.
	recs = drainResync(t, h.s, acked+1)
	begin := recs[0]
	if begin.Kind != rebound.RecordResyncBegin || begin.PointKind != rebound.ResyncSourceCrash || begin.Seq <= lostHead {
		t.Fatalf("first record after the kill: seq %d %s %q; want a %q resync begin above %d", begin.Seq, begin.Kind, begin.PointKind, rebound.ResyncSourceCrash, lostHead)
	}
	for k := 1; k < len(recs); k++ {
		if recs[k].Seq != recs[k-1].Seq+1 {
			t.Fatalf("record %d follows %d", recs[k].Seq, recs[k-1].Seq)
		}
	}
	if end := recs[len(recs)-1]; end.Kind != rebound.RecordResyncEnd {
		t.Fatalf("the resync did not end: last record %d is %s", end.Seq, end.Kind)
	}
	sent := make([][]rebound.Region, 2)
	for _, r := range recs {
		if r.Kind == rebound.RecordWrite || r.Kind == rebound.RecordZero {
			sent[r.Disk] = append(sent[r.Disk], rebound.Region{Offset: r.Offset, Length: r.Length})
		}
	}
	for i := range sent {
		if got := rebound.MergeRegions(sent[i]); !slices.Equal(got, want[i]) {
			t.Fatalf("disk %d: resync sent %v, want exactly %v", i, got, want[i])
		}
	}
	m.apply(t, recs)
	m.check(t, h)
	if st := h.s.Stats(); st.State != StateStreaming {
		t.Fatalf("after the resync: %+v", st)
	}

	// A clean Close keeps unacked ring records (in the spool): the next
	// Open resumes without a resync.
	p := bytes.Repeat([]byte{0x5A}, 8192)
	if _, err := h.s.Disk(0).WriteAt(p, 4096); err != nil {
		t.Fatal(err)
	}
	from := h.s.Head()
	if err := h.s.Close(); err != nil {
		t.Fatal(err)
	}
	h.open()
	if st := h.s.Stats(); st.State != StateStreaming || st.HeadSeq != from {
		t.Fatalf("after a clean close: %+v, want streaming at head %d", st, from)
	}
	recs = drain(t, h.s, from)
	if len(recs) != 1 || recs[0].Seq != from || !bytes.Equal(recs[0].Data, p) {
		t.Fatalf("after a clean close the unacked write was not served: %d records", len(recs))
	}
	m.apply(t, recs)
	m.check(t, h)
}

// TestDirectSpillsOnCongestion: a peer behind by more than the ring moves
// the stream to the spool (its unacked ring records first), and it comes
// back to the ring once the peer has acked the spool. Every record is
// served in order across both switches, and a kill while spooling replays
// the spool like the spool-only stream.
func TestDirectSpillsOnCongestion(t *testing.T) {
	const size = 8 << 20
	h := newHarness(t, 1, size, Options{Direct: true, RegionSize: 4096, SpoolLimit: 8 << 20, RingSize: 1 << 20, SegmentSize: 64 << 10})
	d := h.s.Disk(0)
	rng := rand.New(rand.NewPCG(1, 2))
	m := newModel(1, size)
	write := func(n int) {
		for range n {
			p := make([]byte, 64<<10)
			for i := range p {
				p[i] = byte(rng.Uint32())
			}
			if _, err := d.WriteAt(p, rng.Int64N(size/int64(len(p)))*int64(len(p))); err != nil {
				t.Fatal(err)
			}
		}
	}
	write(4) // 256 KiB: fits the 1 MiB ring
	if h.s.spooling || h.s.spool.LastSeq() != 0 {
		t.Fatal("spooled while the ring had room")
	}
	write(13) // past the ring: spill
	if !h.s.spooling || h.s.spool.LastSeq() != h.s.Head() {
		t.Fatalf("not spooling with 1 MiB unacked (spool last %d, head %d)", h.s.spool.LastSeq(), h.s.Head())
	}
	if h.s.spool.FirstSeq() != 1 {
		t.Fatalf("spill did not spool the unacked ring records: spool starts at %d", h.s.spool.FirstSeq())
	}
	recs := drain(t, h.s, 1)
	if h.s.spooling {
		t.Fatal("still spooling after the peer acked the spool")
	}
	write(3)
	if h.s.spool.LastSeq() == h.s.Head() {
		t.Fatal("writes after the peer caught up went to the spool")
	}
	recs = append(recs, drain(t, h.s, recs[len(recs)-1].Seq+1)...)
	write(20) // spill again, then die while spooling
	h.kill()
	h.open()
	recs = append(recs, drainResync(t, h.s, recs[len(recs)-1].Seq+1)...)
	for k := 1; k < len(recs); k++ {
		if recs[k].Seq != recs[k-1].Seq+1 && !(recs[k].Kind == rebound.RecordResyncBegin && recs[k].PointKind == rebound.ResyncSourceCrash) {
			t.Fatalf("record %d follows %d", recs[k].Seq, recs[k-1].Seq)
		}
	}
	m.apply(t, recs)
	m.check(t, h)
}

// TestDirectKillUnderLoad: 8 writers of overlapping writes, zeroes and
// trims on a direct stream whose small ring spills now and then, a peer
// reading and acking as it goes and then falling behind, and a kill -9
// in the middle of it all.
// After the restart and its source-crash resync the peer's copy, built
// from every record it received before and after the kill, equals the
// disks: whatever the kill cut (records the peer never got, writes in
// flight) lies in regions the activity map had set.
func TestDirectKillUnderLoad(t *testing.T) {
	// A small ring: the lagging peer makes the stream spill, the kill
	// finds the unacked records spooled. A large one: the kill loses the
	// last ~100 records, held only in the ring.
	t.Run("spilled", func(t *testing.T) { directKillUnderLoad(t, 512<<10, 1000) })
	t.Run("ring", func(t *testing.T) { directKillUnderLoad(t, 16<<20, 1400) })
}

func directKillUnderLoad(t *testing.T, ring int64, peerStops int64) {
	const size = 2 << 20
	h := newHarness(t, 2, size, Options{Direct: true, RegionSize: 4096, SpoolLimit: 64 << 20, RingSize: ring, SegmentSize: 256 << 10})
	m := newModel(2, size)
	s := h.s
	next := uint64(1)
	var done atomic.Int64
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		for done.Load() < peerStops { // then the peer falls behind until the kill
			recs, err := s.Read(context.Background(), next, 256<<10)
			if err != nil {
				return // closed by the kill
			}
			m.apply(t, recs)
			next = recs[len(recs)-1].Seq + 1
			s.Acked(next - 1)
		}
	}()
	var wg sync.WaitGroup
	var stop atomic.Bool
	enough := make(chan struct{})
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 99))
			for !stop.Load() {
				d := s.Disk(rng.IntN(2))
				off := rng.Int64N(size - 64<<10)
				n := 1 + rng.Int64N(48<<10)
				var err error
				switch rng.IntN(6) {
				case 0:
					err = d.WriteZeroes(off, n)
				case 1:
					err = d.Trim(off, n)
				default:
					_, err = d.WriteAt(bytes.Repeat([]byte{byte(rng.Uint32())}, int(n)), off)
				}
				if err != nil {
					return // the kill
				}
				if done.Add(1) == 1500 {
					close(enough)
				}
			}
		}()
	}
	<-enough
	// The kill: the stream takes nothing more and its goroutines stop;
	// the writes already committed finish (or not: either is allowed)
	// before the files close, so no writer uses a closed descriptor.
	s.mu.Lock()
	s.closed = true
	close(s.done)
	s.mu.Unlock()
	s.wg.Wait()
	stop.Store(true)
	wg.Wait()
	s.closeFiles()
	h.s = nil
	<-readerDone
	st := s.Stats()
	t.Logf("killed after %d writes at head %d, peer at %d, %d spills, spooling %v", done.Load(), st.HeadSeq, next-1, st.Spills, st.Spooling)

	h.open()
	m.apply(t, drainResync(t, h.s, next))
	m.check(t, h)
}
