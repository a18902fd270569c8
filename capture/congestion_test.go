package capture

import (
	"context"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

// congestionRun writes 4x the spool limit sequentially in 1 MiB writes to
// one disk, while a peer reads and acks: under throttle the peer starts
// when the first write waits, under track once every write is done. It
// returns every record the peer got, the highest backlog it saw, and the
// stream's final stats, once the peer holds the head and the stream
// streams again.
func congestionRun(t *testing.T, mode string) ([]*rebound.Record, int64, Stats, *harness) {
	return congestionRunOpts(t, mode, Options{})
}

// congestionRunOpts is congestionRun on a stream opened with opts
// (Direct, RingSize) besides the run's own options.
func congestionRunOpts(t *testing.T, mode string, opts Options) ([]*rebound.Record, int64, Stats, *harness) {
	const limit = 8 << 20
	const size = 4 * limit
	throttled := make(chan struct{}, 1)
	opts.SpoolLimit, opts.SegmentSize, opts.Congestion = limit, 1<<20, mode
	opts.ThrottleStall = time.Minute // the peer is slow only on a loaded box, never stalled
	opts.OnThrottle = func() {
		select {
		case throttled <- struct{}{}:
		default:
		}
	}
	h := newHarness(t, 1, size, opts)
	wrote := make(chan error, 1)
	go func() {
		rng := rand.New(rand.NewPCG(7, 8))
		buf := make([]byte, 1<<20)
		for off := int64(0); off < size; off += int64(len(buf)) {
			for i := range buf {
				buf[i] = byte(rng.Uint32())
			}
			if _, err := h.s.Disk(0).WriteAt(buf, off); err != nil {
				wrote <- err
				return
			}
		}
		wrote <- nil
	}()
	writerDone := false
	if mode == CongestionThrottle {
		select {
		case <-throttled:
		case err := <-wrote:
			t.Fatalf("every write went through without waiting (err %v): %+v", err, h.s.Stats())
		}
	} else {
		if err := <-wrote; err != nil {
			t.Fatal(err)
		}
		writerDone = true
	}
	var recs []*rebound.Record
	var maxBacklog int64
	next := uint64(1)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for {
		if !writerDone {
			select {
			case err := <-wrote:
				if err != nil {
					t.Fatal(err)
				}
				writerDone = true
			default:
			}
		}
		st := h.s.Stats()
		maxBacklog = max(maxBacklog, st.BacklogBytes)
		if writerDone && st.State == StateStreaming && st.HeadSeq == next-1 {
			return recs, maxBacklog, st, h
		}
		rctx, rcancel := context.WithTimeout(ctx, 50*time.Millisecond)
		got, err := h.s.Read(rctx, next, 1<<20)
		rcancel()
		if ctx.Err() != nil {
			t.Fatalf("peer did not catch up: %+v", h.s.Stats())
		}
		if err != nil && rctx.Err() == nil {
			t.Fatal(err)
		}
		recs = append(recs, got...)
		next += uint64(len(got))
		h.s.Acked(next - 1)
	}
}

// Under throttle a sequential write of 4x the spool limit never overflows:
// writes wait while the spool is above its high-water mark, every write is
// one record, and the peer's copy equals the disk.
func TestCongestionThrottle(t *testing.T) {
	recs, maxBacklog, st, h := congestionRun(t, CongestionThrottle)
	if st.Throttled == 0 {
		t.Fatalf("no write waited: %+v", st)
	}
	if maxBacklog > h.opts.SpoolLimit {
		t.Fatalf("backlog %d above the spool limit %d", maxBacklog, h.opts.SpoolLimit)
	}
	writes := 0
	for _, r := range recs {
		if r.Kind != rebound.RecordWrite {
			t.Fatalf("record %d is %v: the stream overflowed or resynced", r.Seq, r.Kind)
		}
		writes++
	}
	if writes != 32 || st.DirtyBytes != 0 {
		t.Fatalf("%d write records, stats %+v", writes, st)
	}
	m := newModel(1, 4*h.opts.SpoolLimit)
	m.apply(t, recs)
	m.check(t, h)
}

// A direct stream under throttle holds the writer before its ring would
// spill: the same write of 4x the spool limit, through a 4 MiB ring, is
// never spooled (no spill, no spool record), the backlog stays within the
// ring, and the peer's copy equals the disk.
func TestCongestionThrottleDirect(t *testing.T) {
	const ring = 4 << 20
	recs, maxBacklog, st, h := congestionRunOpts(t, CongestionThrottle, Options{Direct: true, RegionSize: 4096, RingSize: ring})
	if st.Throttled == 0 {
		t.Fatalf("no write waited: %+v", st)
	}
	if st.Spills != 0 || h.s.spool.LastSeq() != 0 {
		t.Fatalf("the throttled direct stream spooled: %d spills, spool up to seq %d", st.Spills, h.s.spool.LastSeq())
	}
	if maxBacklog > ring {
		t.Fatalf("backlog %d above the ring's %d", maxBacklog, ring)
	}
	for _, r := range recs {
		if r.Kind != rebound.RecordWrite {
			t.Fatalf("record %d is %v: the stream overflowed or resynced", r.Seq, r.Kind)
		}
	}
	m := newModel(1, 4*h.opts.SpoolLimit)
	m.apply(t, recs)
	m.check(t, h)
}

// Under track the same write overflows the spool, the stream tracks dirty
// regions and resyncs them once the peer catches up, and the peer's copy
// equals the disk.
func TestCongestionTrack(t *testing.T) {
	recs, _, st, h := congestionRun(t, CongestionTrack)
	if st.Throttled != 0 {
		t.Fatalf("a write waited under track: %+v", st)
	}
	begins := 0
	for _, r := range recs {
		if r.Kind == rebound.RecordResyncBegin {
			begins++
		}
	}
	if begins == 0 || recs[len(recs)-1].Kind != rebound.RecordResyncEnd || st.DirtyBytes != 0 {
		t.Fatalf("no overflow and resync: %d begins, last %v, stats %+v", begins, recs[len(recs)-1].Kind, st)
	}
	m := newModel(1, 4*h.opts.SpoolLimit)
	m.apply(t, recs)
	m.check(t, h)
	if err := h.s.SetCongestion("block"); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("SetCongestion(block): %v", err)
	}
}

// A write waiting under throttle goes on as soon as the policy becomes
// track, and the stream then overflows as track does.
func TestCongestionSwitchReleasesWriters(t *testing.T) {
	const limit = 1 << 20
	throttled := make(chan struct{}, 1)
	h := newHarness(t, 1, 8*limit, Options{
		SpoolLimit: limit, SegmentSize: 256 << 10, Congestion: CongestionThrottle, ThrottleStall: time.Minute,
		OnThrottle: func() { throttled <- struct{}{} },
	})
	done := make(chan error, 1)
	go func() {
		buf := make([]byte, 256<<10)
		for off := int64(0); off < 8*limit; off += int64(len(buf)) {
			buf[0]++
			if _, err := h.s.Disk(0).WriteAt(buf, off); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	<-throttled
	if err := h.s.SetCongestion(CongestionTrack); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if st := h.s.Stats(); st.State != StateOverflow || st.Throttled != 1 {
		t.Fatalf("stats %+v", st)
	}
}

// With a peer that acks nothing, one throttled write waits ThrottleStall
// and then no write waits until an ack comes: the writer goes on and the
// stream tracks, as under track. The next ack re-arms the throttle.
func TestCongestionStalledPeer(t *testing.T) {
	const limit = 1 << 20
	h := newHarness(t, 1, 8*limit, Options{
		SpoolLimit: limit, SegmentSize: 256 << 10, Congestion: CongestionThrottle, ThrottleStall: 100 * time.Millisecond,
	})
	buf := make([]byte, 128<<10)
	for off := int64(0); off < 8*limit; off += int64(len(buf)) {
		buf[0]++
		if _, err := h.s.Disk(0).WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
	st := h.s.Stats()
	if st.State != StateOverflow || st.Throttled != 1 || st.DirtyBytes == 0 {
		t.Fatalf("stats %+v", st)
	}
	h.s.mu.Lock()
	stalled := h.s.stalled
	h.s.mu.Unlock()
	h.s.Acked(1)
	h.s.mu.Lock()
	rearmed := !h.s.stalled
	h.s.mu.Unlock()
	if !stalled || !rearmed {
		t.Fatalf("stalled %v, re-armed after an ack %v", stalled, rearmed)
	}
}
