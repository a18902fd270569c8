package agent

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"math/rand"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/capture"
)

const testSize = 8 << 20

// replica applies a stream's records to a model disk, as a target would.
type replica struct {
	t    *testing.T
	disk []byte
	next uint64
	sent int64 // payload bytes of write and zero records
}

func (r *replica) pull(s *capture.Stream) {
	r.t.Helper()
	for r.next <= s.Head() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		recs, err := s.Read(ctx, r.next, 64<<20)
		cancel()
		if err != nil {
			r.t.Fatalf("read stream at %d: %v", r.next, err)
		}
		for _, rec := range recs {
			switch rec.Kind {
			case rebound.RecordWrite:
				copy(r.disk[rec.Offset:], rec.Data)
				r.sent += rec.Length
			case rebound.RecordZero, rebound.RecordTrim:
				clear(r.disk[rec.Offset : rec.Offset+rec.Length])
				r.sent += rec.Length
			}
			r.next = rec.Seq + 1
		}
		s.Acked(r.next - 1)
	}
}

func testAgent(t *testing.T, dir, disk string) *Agent {
	t.Helper()
	a, err := New(Config{Machine: "srv1", Disks: []string{disk}, StateDir: filepath.Join(dir, "state"), Interval: time.Hour,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	close(a.ready)
	return a
}

func openStream(t *testing.T, dir, disk string) *capture.Stream {
	t.Helper()
	s, err := capture.Open(filepath.Join(dir, "stream"), []capture.DiskSpec{{Path: disk, Size: testSize}},
		capture.Options{RegionSize: 4096, External: true, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// startScan runs the agent's loop on s (its first cycle runs at once) and
// waits for that cycle; stop ends the loop.
func startScan(t *testing.T, a *Agent, s *capture.Stream) (stop func()) {
	t.Helper()
	before := a.Stats().Cycles
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); a.Scan(ctx, "srv1", "srv1.1", s) }()
	deadline := time.Now().Add(10 * time.Second)
	for a.Stats().Cycles == before {
		if time.Now().After(deadline) {
			t.Fatalf("no cycle: %s", a.Stats().LastError)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return func() { cancel(); <-done }
}

func writeAt(t *testing.T, path string, b []byte, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func readAll(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestCycles: the first cycle sends every block that is not zero, later
// ones only the 64 KiB blocks that changed, and the replica equals the
// disk at each point. After a restart, the persisted digests mean nothing
// is resent, and reopening the stream does not write old records onto the
// disk (the server's own OS owns it).
func TestCycles(t *testing.T) {
	dir := t.TempDir()
	disk := filepath.Join(dir, "disk.raw")
	rng := rand.New(rand.NewSource(1))
	data := make([]byte, testSize)
	for _, off := range []int64{0, 1 << 20, 5<<20 + 4096} { // three data runs, the rest zero
		rng.Read(data[off : off+200<<10])
	}
	if err := os.WriteFile(disk, data, 0o600); err != nil {
		t.Fatal(err)
	}
	a := testAgent(t, dir, disk)
	s := openStream(t, dir, disk)
	stop := startScan(t, a, s)
	r := &replica{t: t, disk: make([]byte, testSize), next: 1}
	r.pull(s)
	if !bytes.Equal(r.disk, readAll(t, disk)) {
		t.Fatal("replica differs from the disk after the first cycle")
	}
	if st := a.Stats(); st.LastPoint.ID == "" || st.LastChanged > 3*(200<<10+2*DefaultBlockSize) {
		t.Fatalf("first cycle: point %q, %d bytes copied; want a point and only the data runs", st.LastPoint.ID, st.LastChanged)
	}

	// Change two separate bytes: two blocks go.
	writeAt(t, disk, []byte{1}, 3<<20+10)
	writeAt(t, disk, []byte{2}, 7<<20)
	r.sent = 0
	p, err := a.Cycle(context.Background(), rebound.PointCrash)
	if err != nil {
		t.Fatal(err)
	}
	r.pull(s)
	if r.sent != 2*DefaultBlockSize || a.Stats().LastChanged != 2*DefaultBlockSize {
		t.Fatalf("second cycle sent %d bytes (agent says %d), want %d", r.sent, a.Stats().LastChanged, 2*DefaultBlockSize)
	}
	if !bytes.Equal(r.disk, readAll(t, disk)) {
		t.Fatalf("replica differs from the disk at %s", p.ID)
	}
	if p.Kind != rebound.PointCrash || p.Seq != s.Head() {
		t.Fatalf("point %+v, head %d", p, s.Head())
	}
	if _, err := a.Cycle(context.Background(), rebound.PointApp); rebound.ErrorCode(err) != rebound.ECONFLICT {
		t.Fatalf("app-consistent cycle without a freeze mount: %v, want a conflict", err)
	}
	stop()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	// The OS writes while the agent is down; a stale record must not
	// overwrite it when the stream reopens.
	writeAt(t, disk, bytes.Repeat([]byte{9}, 4096), 0)
	want := readAll(t, disk)
	a2 := testAgent(t, dir, disk)
	s2 := openStream(t, dir, disk)
	defer s2.Close()
	if !bytes.Equal(readAll(t, disk), want) {
		t.Fatal("reopening the stream changed the disk")
	}
	stop = startScan(t, a2, s2)
	defer stop()
	r.sent = 0
	r.pull(s2)
	if r.sent != DefaultBlockSize {
		t.Fatalf("cycle after restart sent %d bytes, want one block (%d): the digests were not kept", r.sent, DefaultBlockSize)
	}
	if !bytes.Equal(r.disk, want) {
		t.Fatal("replica differs from the disk after the restart")
	}
}

// TestDigestsFile: a damaged digests file is refused (everything is sent
// again rather than trusting it).
func TestDigestsFile(t *testing.T) {
	dir := t.TempDir()
	disk := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(disk, make([]byte, testSize), 0o600); err != nil {
		t.Fatal(err)
	}
	a := testAgent(t, dir, disk)
	sums, err := ScanFile(context.Background(), disk, testSize, DefaultBlockSize, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.saveDigests("s1", [][][]byte{sums}); err != nil {
		t.Fatal(err)
	}
	got, err := a.loadDigests("s1")
	if err != nil || len(got) != 1 || len(got[0]) != len(sums) || !bytes.Equal(got[0][5], sums[5]) {
		t.Fatalf("load: %v", err)
	}
	b := readAll(t, a.digestsPath("s1"))
	b[20] ^= 1
	if err := os.WriteFile(a.digestsPath("s1"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := a.loadDigests("s1"); err == nil {
		t.Fatal("a damaged digests file was accepted")
	}
	if got, err := a.loadDigests("other"); err != nil || got != nil {
		t.Fatalf("missing digests: %v %v", got, err)
	}
}

func TestNewBadDisk(t *testing.T) {
	for _, d := range []string{"relative.raw", "/nonexistent/disk", "/dev/null"} {
		_, err := New(Config{Machine: "srv1", Disks: []string{d}, StateDir: t.TempDir()})
		if rebound.ErrorCode(err) != rebound.EINVALID {
			t.Errorf("disk %s: %v, want invalid", d, err)
		}
	}
}

// TestDirectRead: unaligned reads through the O_DIRECT bounce buffers,
// across chunks and up to an unaligned file end, return the file's bytes.
func TestDirectRead(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	size := int64(9<<20 + 777)
	data := make([]byte, size)
	rand.New(rand.NewSource(5)).Read(data)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	d, err := openDirect(path, size)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	t.Logf("O_DIRECT: %v", d.direct)
	rng := rand.New(rand.NewSource(6))
	for i := 0; i < 200; i++ {
		off := rng.Int63n(size)
		n := rng.Int63n(min(size-off, 9<<20)) + 1
		if i == 0 {
			off, n = 0, size
		}
		p := make([]byte, n)
		if got, err := d.ReadAt(p, off); err != nil || int64(got) != n {
			t.Fatalf("read %d at %d: %d, %v", n, off, got, err)
		}
		if !bytes.Equal(p, data[off:off+n]) {
			t.Fatalf("read %d at %d: wrong bytes", n, off)
		}
	}
	if _, err := d.ReadAt(make([]byte, 10), size-5); err == nil {
		t.Fatal("a read past the end succeeded")
	}
}

// TestCopyOutlastsFreeze: when the copy cannot finish within the freeze
// timeout (the spool waits for a peer that does not ack), the cycle gives
// up without a point and keeps the old digests; once the peer acks, the
// next cycle completes and the replica equals the disk.
func TestCopyOutlastsFreeze(t *testing.T) {
	dir := t.TempDir()
	disk := filepath.Join(dir, "disk.raw")
	data := make([]byte, testSize)
	rand.New(rand.NewSource(2)).Read(data[:2<<20])
	if err := os.WriteFile(disk, data, 0o600); err != nil {
		t.Fatal(err)
	}
	a, err := New(Config{Machine: "srv1", Disks: []string{disk}, StateDir: filepath.Join(dir, "state"), Interval: time.Hour,
		FreezeTimeout: 300 * time.Millisecond, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	close(a.ready)
	s, err := capture.Open(filepath.Join(dir, "stream"), []capture.DiskSpec{{Path: disk, Size: testSize}},
		capture.Options{RegionSize: 4096, SpoolLimit: 256 << 10, External: true, ReadDisk: func(i int, p []byte, off int64) (int, error) {
			return a.ReadDisk("srv1", i, p, off)
		}, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	a.mu.Lock()
	a.stream, a.streamID = s, "s1"
	a.mu.Unlock()

	if _, err := a.Cycle(context.Background(), rebound.PointCrash); rebound.ErrorCode(err) != rebound.EUNAVAILABLE {
		t.Fatalf("cycle with a stalled peer: %v, want unavailable", err)
	}
	if st := a.Stats(); st.Cycles != 0 || st.LastError == "" {
		t.Fatalf("stats after the timed-out cycle: %+v", st)
	}
	if got, _ := a.loadDigests("s1"); got != nil {
		t.Fatal("digests were saved for a cycle that cut no point")
	}

	// The peer acks from now on.
	r := &replica{t: t, disk: make([]byte, testSize), next: 1}
	stop := make(chan struct{})
	pulled := make(chan struct{})
	go func() {
		defer close(pulled)
		for {
			select {
			case <-stop:
				return
			default:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
			recs, err := s.Read(ctx, r.next, 1<<20)
			cancel()
			if err != nil {
				continue
			}
			for _, rec := range recs {
				if rec.Kind == rebound.RecordWrite {
					copy(r.disk[rec.Offset:], rec.Data)
				} else if rec.Kind == rebound.RecordZero {
					clear(r.disk[rec.Offset : rec.Offset+rec.Length])
				}
				r.next = rec.Seq + 1
			}
			s.Acked(r.next - 1)
		}
	}()
	a.cfg.FreezeTimeout = 10 * time.Second
	p, err := a.Cycle(context.Background(), rebound.PointCrash)
	if err != nil {
		t.Fatalf("cycle once the peer acks: %v", err)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if s.Stats().AckedSeq >= p.Seq {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the point was never acked")
		}
	}
	close(stop)
	<-pulled
	if !bytes.Equal(r.disk, data) {
		t.Fatalf("replica differs from the disk at %s", p.ID)
	}
}

// TestTwoDisks: each disk's changed blocks land on that disk.
func TestTwoDisks(t *testing.T) {
	dir := t.TempDir()
	paths := []string{filepath.Join(dir, "a.raw"), filepath.Join(dir, "b.raw")}
	sizes := []int64{4 << 20, 2<<20 + 512}
	var specs []capture.DiskSpec
	for i, p := range paths {
		b := make([]byte, sizes[i])
		rand.New(rand.NewSource(int64(i))).Read(b[:300<<10])
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		specs = append(specs, capture.DiskSpec{Path: p, Size: sizes[i]})
	}
	a, err := New(Config{Machine: "srv1", Disks: paths, StateDir: filepath.Join(dir, "state"), Interval: time.Hour,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	close(a.ready)
	s, err := capture.Open(filepath.Join(dir, "stream"), specs, capture.Options{RegionSize: 4096, External: true,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	a.mu.Lock()
	a.stream, a.streamID = s, "s1"
	a.mu.Unlock()
	replicas := [][]byte{make([]byte, sizes[0]), make([]byte, sizes[1])}
	next := uint64(1)
	pull := func() {
		for next <= s.Head() {
			recs, err := s.Read(context.Background(), next, 64<<20)
			if err != nil {
				t.Fatal(err)
			}
			for _, rec := range recs {
				switch rec.Kind {
				case rebound.RecordWrite:
					copy(replicas[rec.Disk][rec.Offset:], rec.Data)
				case rebound.RecordZero:
					clear(replicas[rec.Disk][rec.Offset : rec.Offset+rec.Length])
				}
				next = rec.Seq + 1
			}
		}
	}
	for round := 0; round < 2; round++ {
		if round == 1 {
			writeAt(t, paths[1], []byte("tail"), sizes[1]-4) // the short last block
			writeAt(t, paths[0], []byte("x"), 3<<20)
		}
		if _, err := a.Cycle(context.Background(), rebound.PointCrash); err != nil {
			t.Fatal(err)
		}
		pull()
		for i, p := range paths {
			if !bytes.Equal(replicas[i], readAll(t, p)) {
				t.Fatalf("round %d: disk %d differs", round, i)
			}
		}
	}
	if got, want := a.Stats().LastChanged, int64(DefaultBlockSize+512); got != want {
		t.Fatalf("second cycle copied %d bytes, want a block of disk 0 and the 512-byte last block of disk 1 (%d)", got, want)
	}
}
