package capture_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/capture"
	"github.com/rebound-dr/rebound/journal"
	"github.com/rebound-dr/rebound/overlay"
)

var quiet = slog.New(slog.DiscardHandler)

func rbytes(rng *rand.Rand, n int64) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(rng.Uint32() | 1)
	}
	return p
}

// pump ships records from s to j until stop says so, acking what j holds.
func pump(t *testing.T, s *capture.Stream, j *journal.Journal, stop func(last *rebound.Record) bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		recs, err := s.Read(ctx, j.Durable()+1, 1<<20)
		cancel()
		if errors.Is(err, context.DeadlineExceeded) {
			if stop(nil) {
				return
			}
			continue
		} else if err != nil {
			t.Fatal(err)
		}
		if err := j.Append(recs); err != nil {
			t.Fatal(err)
		}
		s.Acked(j.Durable())
		if stop(recs[len(recs)-1]) {
			return
		}
	}
	t.Fatal("pump: timed out")
}

func drained(s *capture.Stream, j *journal.Journal) func(*rebound.Record) bool {
	return func(*rebound.Record) bool { return j.Durable() == s.Head() }
}

func randomWrites(t *testing.T, rng *rand.Rand, w interface {
	WriteAt([]byte, int64) (int, error)
	WriteZeroes(off, n int64) error
}, size int64, n int) {
	t.Helper()
	for i := range n {
		off := rng.Int64N(size - 1)
		l := 1 + rng.Int64N(min(size-off, 40000))
		var err error
		if i%8 == 0 {
			err = w.WriteZeroes(off, l)
		} else {
			_, err = w.WriteAt(rbytes(rng, l), off)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

// covered reports whether every byte where a and b differ is in one of
// the region lists.
func covered(a, b []byte, lists ...[]rebound.Region) (bool, int64) {
	in := make([]bool, len(a))
	for _, rs := range lists {
		for _, r := range rs {
			for k := r.Offset; k < r.Offset+r.Length; k++ {
				in[k] = true
			}
		}
	}
	var missed int64
	for k := range a {
		if a[k] != b[k] && !in[k] {
			missed++
		}
	}
	return missed == 0, missed
}

// TestReprotectDelta runs the whole delta path of a reprotect with the
// storage packages: protect P→R, fail over to a point, P keeps writing
// (some of it reaches R's journal after the point, some stays in P's spool,
// some only in P's dirty map), commit at R, R writes more (tracked), then
// R→P with P's disks adopted and only D sent. P's first point must equal
// R's disk, and every input of D must be needed.
func TestReprotectDelta(t *testing.T) {
	const size = 8 << 20
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(77, 78))
	disks := []rebound.Disk{{Name: "d0", Size: size}}

	// Protect P→R.
	pdisk := filepath.Join(dir, "p-disk0")
	if err := os.WriteFile(pdisk, rbytes(rng, size), 0o600); err != nil {
		t.Fatal(err)
	}
	pspecs := []capture.DiskSpec{{Path: pdisk, Size: size}}
	pdir := filepath.Join(dir, "p-stream")
	ps, err := capture.Open(pdir, pspecs, capture.Options{RegionSize: 4096, SpoolLimit: 1 << 20, SegmentSize: 64 << 10, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	rj, err := journal.Open(filepath.Join(dir, "r-journal"), disks, journal.Options{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	if err := ps.StartInitialCopy(); err != nil {
		t.Fatal(err)
	}
	randomWrites(t, rng, ps.Disk(0), size, 50)
	pump(t, ps, rj, func(*rebound.Record) bool {
		return ps.Stats().State == capture.StateStreaming && rj.Durable() == ps.Head()
	})
	randomWrites(t, rng, ps.Disk(0), size, 30)
	pt, err := ps.Mark(rebound.PointCrash)
	if err != nil {
		t.Fatal(err)
	}
	// After the point: records R's journal gets (and P's spool drops)...
	for range 6 {
		randomWrites(t, rng, ps.Disk(0), size, 10)
		pump(t, ps, rj, drained(ps, rj))
	}
	time.Sleep(300 * time.Millisecond) // the spool truncates in the background
	// ...records that stay in P's spool, then overflow: dirty map only.
	randomWrites(t, rng, ps.Disk(0), size, 150)
	if st := ps.Stats(); st.State != capture.StateOverflow || st.DirtyBytes == 0 {
		t.Fatalf("P did not overflow: %+v", st)
	}

	// Fail over to the point at R: an overlay over the view.
	view, err := rj.View(pt.Seq)
	if err != nil {
		t.Fatal(err)
	}
	rdisk := filepath.Join(dir, "r-disk0")
	ov, err := overlay.Open(rdisk, view.Disk(0), size)
	if err != nil {
		t.Fatal(err)
	}
	randomWrites(t, rng, ov, size, 40)
	// P is released (its process dies); R commits.
	if err := ps.Close(); err != nil {
		t.Fatal(err)
	}
	after := rj.RegionsAfter(pt.Seq)[0]
	written := ov.Written()
	if err := ov.Flatten(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	ov.Close()
	view.Close()
	rj.Close()
	os.Remove(rdisk + ".map")
	// Active at R: writes are tracked.
	fd, err := capture.OpenFileDisk(rdisk, size)
	if err != nil {
		t.Fatal(err)
	}
	tr, err := capture.OpenTracker(rdisk+".track", size, 4096)
	if err != nil {
		t.Fatal(err)
	}
	fd.SetTracker(tr)
	randomWrites(t, rng, fd, size, 40)
	fd.Close()
	tracked := tr.Regions()
	tr.Close()

	// D, and D1: it covers every difference, and each input is needed.
	pending, _, err := capture.PendingRegions(pdir, pspecs)
	if err != nil {
		t.Fatal(err)
	}
	pb, _ := os.ReadFile(pdisk)
	rb, _ := os.ReadFile(rdisk)
	if ok, missed := covered(pb, rb, tracked, written, after, pending[0]); !ok {
		t.Fatalf("D misses %d differing bytes", missed)
	}
	for name, without := range map[string][][]rebound.Region{
		"journal records after the point": {tracked, written, pending[0]},
		"P's spool and dirty map":         {tracked, written, after},
		"R's writes":                      {after, pending[0]},
	} {
		if ok, _ := covered(pb, rb, without...); ok {
			t.Fatalf("the test does not need %s: make it write more", name)
		}
	}
	d := rebound.MergeRegions(append(append(append(append([]rebound.Region(nil), tracked...), written...), after...), pending[0]...))
	var dBytes int64
	for _, r := range d {
		dBytes += r.Length
	}

	// Reprotect R→P: P adopts its disks, R sends D while writing on.
	pj := filepath.Join(dir, "p-journal")
	if err := journal.Adopt(pj, disks, []string{pdisk}); err != nil {
		t.Fatal(err)
	}
	jp, err := journal.Open(pj, disks, journal.Options{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer jp.Close()
	rs, err := capture.Open(filepath.Join(dir, "r-stream"), []capture.DiskSpec{{Path: rdisk, Size: size}}, capture.Options{RegionSize: 4096, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer rs.Close()
	if err := rs.StartResync([][]rebound.Region{d}); err != nil {
		t.Fatal(err)
	}
	inWindow := true
	pump(t, rs, jp, func(last *rebound.Record) bool {
		if last != nil && last.Kind == rebound.RecordResyncEnd {
			inWindow = false
		}
		return !inWindow
	})
	end := jp.Durable()
	if _, err := jp.View(end - 1); err == nil {
		t.Fatal("a position inside the delta window is served")
	}
	randomWrites(t, rng, rs.Disk(0), size, 20) // live, after the window
	pump(t, rs, jp, drained(rs, jp))
	if err := rs.Flush(); err != nil {
		t.Fatal(err)
	}
	v, err := jp.View(jp.Durable())
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	got := make([]byte, size)
	if _, err := v.Disk(0).ReadAt(got, 0); err != nil && err != io.EOF {
		t.Fatal(err)
	}
	rb, _ = os.ReadFile(rdisk)
	if !bytes.Equal(got, rb) {
		t.Fatal("P's journal after the delta resync differs from R's disk")
	}
	st := rs.Stats()
	t.Logf("D: %d bytes in %d regions (disk %d); resync copied %d", dBytes, len(d), size, st.SyncDone)
	// Exactly D's 4 KiB blocks are copied, none besides.
	var blocks []rebound.Region
	for _, r := range d {
		lo, hi := r.Offset/4096*4096, min((r.Offset+r.Length+4095)/4096*4096, size)
		blocks = append(blocks, rebound.Region{Offset: lo, Length: hi - lo})
	}
	var want int64
	for _, r := range rebound.MergeRegions(blocks) {
		want += r.Length
	}
	if st.SyncDone != want || st.SyncTotal != want {
		t.Fatalf("resync copied %d of %d bytes; D's blocks hold %d", st.SyncDone, st.SyncTotal, want)
	}
}
