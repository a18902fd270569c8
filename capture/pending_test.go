package capture

import (
	"crypto/sha256"
	"errors"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

// snapshotTree hashes every file under dir (name, size, content).
func snapshotTree(t *testing.T, dir string) map[string][32]byte {
	t.Helper()
	out := map[string][32]byte{}
	err := filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
		if err != nil || e.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		out[p] = sha256.Sum256(b)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestPendingRegions(t *testing.T) {
	const size = 4 << 20
	h := newHarness(t, 2, size, Options{SpoolLimit: 256 << 10, SegmentSize: 64 << 10})
	rng := rand.New(rand.NewPCG(21, 22))
	written := make([]*blockModel, 2) // byte-exact coverage check
	for i := range written {
		written[i] = newBlockModel(size, 1)
	}
	if _, err := h.s.Mark(rebound.PointCrash); err != nil {
		t.Fatal(err)
	}
	// Nothing is acked: the spool fills, then overflow keeps dirty bits.
	for i := range 120 {
		d := i % 2
		off := rng.Int64N(size - 1)
		n := 1 + rng.Int64N(min(size-off, 9000))
		var err error
		switch i % 7 {
		case 0:
			err = h.s.Disk(d).WriteZeroes(off, n)
		case 1:
			err = h.s.Disk(d).Trim(off, n)
		default:
			_, err = h.s.Disk(d).WriteAt(randBytes(rng, n), off)
		}
		if err != nil {
			t.Fatal(err)
		}
		written[d].mark(off, n)
	}
	st := h.s.Stats()
	if st.State != StateOverflow || st.DirtyBytes == 0 {
		t.Fatalf("stats %+v: the test wants both spooled records and dirty regions", st)
	}
	// The expected answer, from the stream's own view before the kill.
	recs := readRange(t, h.s, 1, h.s.Head())
	want := make([][]rebound.Region, 2)
	var wantLast int64
	for _, r := range recs {
		if r.Kind == rebound.RecordWrite || r.Kind == rebound.RecordZero || r.Kind == rebound.RecordTrim {
			want[r.Disk] = append(want[r.Disk], rebound.Region{Offset: r.Offset, Length: r.Length})
			wantLast = r.Time
		}
	}
	h.s.mu.Lock()
	for i, d := range h.s.disks {
		want[i] = append(want[i], bitRegions(d.dirty.bits, d.dirty.regions, d.dirty.regionSize, size)...)
		want[i] = rebound.MergeRegions(want[i])
	}
	h.s.mu.Unlock()
	// Overflow writes have no record: their time comes from the meta,
	// which the housekeeper saves within 100 ms.
	if err := h.s.saveMeta(); err != nil {
		t.Fatal(err)
	}
	dirtyTime := h.s.dirtyTime
	if dirtyTime <= wantLast {
		t.Fatalf("overflow time %d is not after the last record %d", dirtyTime, wantLast)
	}
	wantLast = dirtyTime
	h.kill() // dropped without Close

	dir := filepath.Join(h.dir, "stream")
	before := snapshotTree(t, h.dir)
	got, last, err := PendingRegions(dir, h.specs)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("regions:\n got %v\nwant %v", got, want)
	}
	if !last.Equal(time.Unix(0, wantLast)) {
		t.Fatalf("last write %v, want %v", last, time.Unix(0, wantLast))
	}
	// Every written byte is covered.
	for d := range 2 {
		cover := newBlockModel(size, 1)
		for _, r := range got[d] {
			cover.mark(r.Offset, r.Length)
		}
		for b, set := range written[d].set {
			if set && !cover.set[b] {
				t.Fatalf("disk %d byte %d was written but is not pending", d, b)
			}
		}
	}
	if after := snapshotTree(t, h.dir); !reflect.DeepEqual(before, after) {
		t.Fatal("PendingRegions changed the stream dir or the disks")
	}

	// A torn tail is skipped and left alone.
	segs, _ := filepath.Glob(filepath.Join(dir, "spool", "*.wal"))
	if len(segs) < 3 {
		t.Fatalf("want several segments, have %d", len(segs))
	}
	f, _ := os.OpenFile(segs[len(segs)-1], os.O_WRONLY|os.O_APPEND, 0)
	f.Write([]byte{40, 0, 0, 0, 1, 2, 3})
	f.Close()
	before = snapshotTree(t, h.dir)
	got2, _, err := PendingRegions(dir, h.specs)
	if err != nil || !reflect.DeepEqual(got2, want) {
		t.Fatalf("with a torn tail: %v %v", err, got2)
	}
	if after := snapshotTree(t, h.dir); !reflect.DeepEqual(before, after) {
		t.Fatal("PendingRegions repaired the torn tail")
	}

	// Bytes flipped in the last segment with good records after them are
	// damage, not a torn tail: an error (the regions are unknown), and
	// nothing is cut.
	lastSeg := segs[len(segs)-1]
	lb, _ := os.ReadFile(lastSeg)
	if err := os.WriteFile(lastSeg, flipped(lb, 8+8+20), 0o600); err != nil {
		t.Fatal(err)
	}
	before = snapshotTree(t, h.dir)
	if _, _, err := PendingRegions(dir, h.specs); rebound.ErrorCode(err) != rebound.EINTERNAL || !errors.Is(err, ErrSpoolDamaged) || !strings.Contains(err.Error(), "not a torn tail") {
		t.Fatalf("damaged last segment: %v", err)
	}
	if after := snapshotTree(t, h.dir); !reflect.DeepEqual(before, after) {
		t.Fatal("PendingRegions changed a damaged spool")
	}
	os.WriteFile(lastSeg, lb, 0o600)

	// Bad input.
	if _, _, err := PendingRegions(filepath.Join(h.dir, "nothing"), h.specs); rebound.ErrorCode(err) != rebound.ENOTFOUND {
		t.Fatalf("missing dir: %v", err)
	}
	if _, _, err := PendingRegions(dir, h.specs[:1]); rebound.ErrorCode(err) != rebound.ECONFLICT {
		t.Fatalf("other disk table: %v", err)
	}
	// Corruption before the tail: the regions are unknown.
	b, _ := os.ReadFile(segs[0])
	b[len(b)/2] ^= 0xff
	os.WriteFile(segs[0], b, 0o600)
	if _, _, err := PendingRegions(dir, h.specs); rebound.ErrorCode(err) != rebound.EINTERNAL || !errors.Is(err, ErrSpoolDamaged) {
		t.Fatalf("corrupt spool: %v", err)
	}

	// The stream still opens afterwards (it was not disturbed).
	b[len(b)/2] ^= 0xff
	os.WriteFile(segs[0], b, 0o600)
	h.open()
	if h.s.spool.Corrupt() != nil {
		t.Fatal("spool corrupt after restoring the byte")
	}
}

// TestPendingRegionsAcked: records the peer acknowledged are in its
// journal and not pending; the newest write's time still counts.
func TestPendingRegionsAcked(t *testing.T) {
	h := newHarness(t, 1, 1<<20, Options{RegionSize: 4096})
	for i := range 10 {
		if _, err := h.s.Disk(0).WriteAt([]byte{1, 2, 3}, int64(i)*8192); err != nil {
			t.Fatal(err)
		}
	}
	h.s.Acked(6)
	head := h.s.Head()
	recs := readRange(t, h.s, 7, head)
	if err := h.s.Close(); err != nil {
		t.Fatal(err)
	}
	h.s = nil
	got, last, err := PendingRegions(filepath.Join(h.dir, "stream"), h.specs)
	if err != nil {
		t.Fatal(err)
	}
	var want []rebound.Region
	for _, r := range recs {
		want = append(want, rebound.Region{Offset: r.Offset, Length: r.Length})
	}
	if !reflect.DeepEqual(got, [][]rebound.Region{want}) {
		t.Fatalf("got %v, want %v", got, want)
	}
	if !last.Equal(time.Unix(0, recs[len(recs)-1].Time)) {
		t.Fatalf("last write %v", last)
	}
}

// flipped returns a copy of b with 16 bytes from off inverted.
func flipped(b []byte, off int) []byte {
	c := append([]byte(nil), b...)
	for i := off; i < off+16 && i < len(c); i++ {
		c[i] ^= 0x5a
	}
	return c
}
