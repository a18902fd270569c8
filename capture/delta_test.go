package capture

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

func randBytes(rng *rand.Rand, n int64) []byte {
	p := make([]byte, n)
	for i := 0; i+8 <= len(p); i += 8 {
		v := rng.Uint64()
		for k := range 8 {
			p[i+k] = byte(v >> (8 * k))
		}
	}
	return p
}

// deltaSetup is the state of a reprotect: the active copy (a disk file
// changed through a tracked FileDisk since the common state) and the old
// copy at the target (the common state plus changes of its own).
type deltaSetup struct {
	path    string
	target  []byte           // the target's old copy
	regions []rebound.Region // tracked changes ∪ target changes
	union   *blockModel      // the same, as 4 KiB blocks
}

func newDeltaSetup(t *testing.T, dir string, size int64, seed uint64) *deltaSetup {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, seed+1))
	// The common state: data in the first half, a hole in the second.
	common := make([]byte, size)
	copy(common, randBytes(rng, size/2))
	ds := &deltaSetup{path: filepath.Join(dir, "disk0"), union: newBlockModel(size, 4096)}
	if err := os.WriteFile(ds.path, common, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(ds.path, size); err != nil {
		t.Fatal(err)
	}
	// Changes at the active site since the common state, tracked.
	fd, err := OpenFileDisk(ds.path, size)
	if err != nil {
		t.Fatal(err)
	}
	tr, err := OpenTracker(filepath.Join(dir, "disk0.track"), size, 4096)
	if err != nil {
		t.Fatal(err)
	}
	fd.SetTracker(tr)
	for i := range 300 {
		off := rng.Int64N(size - 1)
		n := 1 + rng.Int64N(min(size-off, 20000))
		if i%10 == 0 {
			err = fd.WriteZeroes(off, n)
		} else {
			_, err = fd.WriteAt(randBytes(rng, n), off)
		}
		if err != nil {
			t.Fatal(err)
		}
		ds.union.mark(off, n)
	}
	fd.Close()
	ds.regions = tr.Regions()
	tr.Close()
	// Changes the old copy made after the common state (the old source
	// wrote before it was fenced): they must be overwritten.
	ds.target = append([]byte(nil), common...)
	for range 40 {
		off := rng.Int64N(size - 1)
		n := 1 + rng.Int64N(min(size-off, 30000))
		copy(ds.target[off:], randBytes(rng, n))
		ds.regions = append(ds.regions, rebound.Region{Offset: off, Length: n})
		ds.union.mark(off, n)
	}
	return ds
}

// readUntilEnd reads and acks records until the stream's first
// ResyncEnd, calling during while it waits.
func readUntilEnd(t *testing.T, s *Stream) []*rebound.Record {
	t.Helper()
	var recs []*rebound.Record
	next := uint64(1)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if time.Now().After(deadline) {
			t.Fatalf("no resync end: %+v", s.Stats())
		}
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		got, err := s.Read(ctx, next, 1<<20)
		cancel()
		if err != nil && !errors.Is(err, context.DeadlineExceeded) {
			t.Fatal(err)
		}
		for _, r := range got {
			recs = append(recs, r)
			if r.Kind == rebound.RecordResyncEnd {
				s.Acked(r.Seq)
				return recs
			}
		}
		next += uint64(len(got))
		s.Acked(next - 1)
	}
}

func TestStartResyncDelta(t *testing.T) {
	const size = 16 << 20
	dir := t.TempDir()
	ds := newDeltaSetup(t, dir, size, 11)
	s, err := Open(filepath.Join(dir, "stream"), []DiskSpec{{Path: ds.path, Size: size}}, Options{RegionSize: 4096, SpoolLimit: 64 << 20, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.StartResync([][]rebound.Region{{{Offset: size, Length: 1}}}); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("region past the end: %v", err)
	}
	if err := s.StartResync(make([][]rebound.Region, 2)); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("regions for 2 disks: %v", err)
	}
	if err := s.StartResync([][]rebound.Region{ds.regions}); err != nil {
		t.Fatal(err)
	}
	if st := s.Stats(); st.State != StateSyncing || st.SyncTotal != ds.union.bytes() {
		t.Fatalf("stats %+v, want total %d", st, ds.union.bytes())
	}
	recs := readUntilEnd(t, s)
	if recs[0].Kind != rebound.RecordResyncBegin {
		t.Fatalf("first record %v", recs[0].Kind)
	}
	// Bytes sent = the changed 4 KiB blocks exactly, in few records.
	var sent int64
	for _, r := range recs {
		if r.Kind == rebound.RecordWrite || r.Kind == rebound.RecordZero {
			sent += r.Length
		}
	}
	want := ds.union.bytes()
	if sent != want {
		t.Fatalf("resync sent %d bytes, changed blocks hold %d", sent, want)
	}
	if n := len(ds.union.regions()); len(recs) > n+2+int(want>>20) {
		t.Fatalf("%d records for %d merged regions of %d bytes: runs not coalesced", len(recs), n, want)
	}
	t.Logf("delta resync: %d bytes in %d records for %d changed regions (disk %d)", sent, len(recs), len(ds.union.regions()), size)
	m := model{ds.target}
	m.apply(t, recs)
	disk, _ := os.ReadFile(ds.path)
	if !bytes.Equal(m[0], disk) {
		t.Fatal("target after resync differs from the active disk")
	}
	if st := s.Stats(); st.State != StateStreaming || st.SyncDone != want {
		t.Fatalf("stats after resync %+v", st)
	}
	if _, err := s.Mark(rebound.PointCrash); err != nil {
		t.Fatal(err)
	}
}

// TestStartResyncWhileWriting: writes go on during the resync; replaying
// the stream onto the target's old copy reproduces the disk.
func TestStartResyncWhileWriting(t *testing.T) {
	const size = 16 << 20
	dir := t.TempDir()
	ds := newDeltaSetup(t, dir, size, 12)
	// A small spool: the copy is paced by acks and live writes interleave.
	s, err := Open(filepath.Join(dir, "stream"), []DiskSpec{{Path: ds.path, Size: size}}, Options{RegionSize: 4096, SpoolLimit: 2 << 20, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// The whole first half too: a big run at 4 KiB granularity.
	regions := append(ds.regions, rebound.Region{Offset: 0, Length: size / 2})
	if err := s.StartResync([][]rebound.Region{regions}); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		rng := rand.New(rand.NewPCG(9, 9))
		for {
			select {
			case <-stop:
				return
			default:
			}
			randomIOMax(t, rng, s.Disk(0), size, 40<<10)
			time.Sleep(200 * time.Microsecond)
		}
	}()
	recs := readUntilEnd(t, s)
	close(stop)
	wg.Wait()
	recs = append(recs, readRange(t, s, recs[len(recs)-1].Seq+1, s.Head())...)
	live, big := 0, 0
	for _, r := range recs {
		if r.Offset%4096 != 0 || r.Kind == rebound.RecordTrim {
			live++
		}
		if r.Length >= 256<<10 {
			big++
		}
	}
	if live == 0 || big == 0 {
		t.Fatalf("live writes %d, large copy records %d", live, big)
	}
	m := model{ds.target}
	m.apply(t, recs)
	disk, _ := os.ReadFile(ds.path)
	if !bytes.Equal(m[0], disk) {
		t.Fatal("target after resync and live writes differs from the active disk")
	}
}

func TestStartResyncEmpty(t *testing.T) {
	h := newHarness(t, 2, 1<<20, Options{RegionSize: 4096})
	if err := h.s.StartResync(nil); err != nil {
		t.Fatal(err)
	}
	recs := readUntilEnd(t, h.s)
	if len(recs) != 2 || recs[0].Kind != rebound.RecordResyncBegin || recs[1].Kind != rebound.RecordResyncEnd {
		t.Fatalf("records %v", recs)
	}
	// The state settles to streaming once the goroutine saved it.
	deadline := time.Now().Add(5 * time.Second)
	for h.s.Stats().State != StateStreaming {
		if time.Now().After(deadline) {
			t.Fatalf("stats %+v", h.s.Stats())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := h.s.Mark(rebound.PointCrash); err != nil {
		t.Fatal(err)
	}
}

// benchFullResync copies a 64 MiB disk of data through StartResync with a
// reader that acks at once: the cost of the copy at a region size.
func benchFullResync(b *testing.B, regionSize int64) {
	const size = 64 << 20
	dir := b.TempDir()
	path := filepath.Join(dir, "disk0")
	rng := rand.New(rand.NewPCG(1, 1))
	if err := os.WriteFile(path, randBytes(rng, size), 0o600); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(size)
	for i := range b.N {
		sdir := filepath.Join(dir, fmt.Sprintf("stream%d", i))
		s, err := Open(sdir, []DiskSpec{{Path: path, Size: size}}, Options{RegionSize: regionSize, SpoolLimit: 256 << 20, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			b.Fatal(err)
		}
		if err := s.StartResync([][]rebound.Region{{{Offset: 0, Length: size}}}); err != nil {
			b.Fatal(err)
		}
		recs := 0
		for next := uint64(1); ; {
			got, err := s.Read(context.Background(), next, 4<<20)
			if err != nil {
				b.Fatal(err)
			}
			next += uint64(len(got))
			recs += len(got)
			s.Acked(next - 1)
			if got[len(got)-1].Kind == rebound.RecordResyncEnd {
				break
			}
		}
		s.Close()
		b.ReportMetric(float64(recs), "records")
	}
}

func BenchmarkFullResync4K(b *testing.B)  { benchFullResync(b, 4096) }
func BenchmarkFullResync64K(b *testing.B) { benchFullResync(b, 64<<10) }
