package capture

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/rebound-dr/rebound"
)

// blockModel is the set of blocks a tracker must have marked.
type blockModel struct {
	set             []bool
	blockSize, size int64
}

func newBlockModel(size, bs int64) *blockModel {
	return &blockModel{set: make([]bool, (size+bs-1)/bs), blockSize: bs, size: size}
}

func (m *blockModel) mark(off, length int64) {
	end := min(off+length, m.size)
	if length == 0 || off >= end {
		return
	}
	for b := off / m.blockSize; b <= (end-1)/m.blockSize; b++ {
		m.set[b] = true
	}
}

func (m *blockModel) regions() []rebound.Region {
	var out []rebound.Region
	for i := 0; i < len(m.set); {
		if !m.set[i] {
			i++
			continue
		}
		j := i
		for j < len(m.set) && m.set[j] {
			j++
		}
		out = append(out, rebound.Region{Offset: int64(i) * m.blockSize, Length: min(int64(j)*m.blockSize, m.size) - int64(i)*m.blockSize})
		i = j
	}
	return out
}

func (m *blockModel) bytes() int64 {
	var n int64
	for _, r := range m.regions() {
		n += r.Length
	}
	return n
}

func checkTracker(t *testing.T, tr *Tracker, m *blockModel) {
	t.Helper()
	got, want := tr.Regions(), m.regions()
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("regions:\n got %v\nwant %v", got, want)
	}
	if tr.Bytes() != m.bytes() {
		t.Fatalf("bytes %d, want %d", tr.Bytes(), m.bytes())
	}
}

func TestTrackerRandom(t *testing.T) {
	// An odd size: the last block is short.
	const size = 10<<20 + 1234
	path := filepath.Join(t.TempDir(), "disk.track")
	tr, err := OpenTracker(path, size, 0)
	if err != nil {
		t.Fatal(err)
	}
	if tr.BlockSize() != 4096 || tr.Bytes() != 0 || len(tr.Regions()) != 0 {
		t.Fatalf("fresh tracker: %d %d %v", tr.BlockSize(), tr.Bytes(), tr.Regions())
	}
	m := newBlockModel(size, 4096)
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range 3000 {
		off := rng.Int64N(size)
		length := rng.Int64N(64 << 10)
		if i%50 == 0 {
			length = rng.Int64N(3 << 20)
		}
		if i%2 == 0 {
			if err := tr.Mark(off, length); err != nil {
				t.Fatal(err)
			}
		} else if err := tr.MarkRegions([]rebound.Region{{Offset: off, Length: length}, {Offset: off / 2, Length: 1}}); err != nil {
			t.Fatal(err)
		} else {
			m.mark(off/2, 1)
		}
		m.mark(off, length)
		if i%500 == 0 {
			checkTracker(t, tr, m)
		}
	}
	checkTracker(t, tr, m)
	// The end of the disk: the last region is clipped to the size.
	tr.Mark(size-1, 100)
	m.mark(size-1, 100)
	checkTracker(t, tr, m)

	// A kill (no Close, no Sync): reopening sees every mark.
	tr2, err := OpenTracker(path, size, 4096)
	if err != nil {
		t.Fatal(err)
	}
	checkTracker(t, tr2, m)
	tr2.Close()
	tr.Close()
	if err := tr.Mark(0, 1); rebound.ErrorCode(err) != rebound.ECONFLICT {
		t.Fatalf("mark after close: %v", err)
	}

	// Bad input.
	if _, err := OpenTracker(path, size, 65536); rebound.ErrorCode(err) != rebound.ECONFLICT {
		t.Fatalf("other block size: %v", err)
	}
	if _, err := OpenTracker(path, size+4096, 4096); rebound.ErrorCode(err) != rebound.ECONFLICT {
		t.Fatalf("other disk size: %v", err)
	}
	bad := filepath.Join(t.TempDir(), "bad")
	os.WriteFile(bad, []byte("not a tracker at all, really not"), 0o600)
	if _, err := OpenTracker(bad, size, 4096); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("garbage file: %v", err)
	}
	if err := RemoveTracker(path); err != nil {
		t.Fatal(err)
	}
	if err := RemoveTracker(path); err != nil {
		t.Fatal(err)
	}
	tr3, err := OpenTracker(path, size, 4096)
	if err != nil {
		t.Fatal(err)
	}
	defer tr3.Close()
	if tr3.Bytes() != 0 {
		t.Fatal("recreated tracker is not empty")
	}
}

func TestTrackerEdges(t *testing.T) {
	tr, err := OpenTracker(filepath.Join(t.TempDir(), "t"), 100<<10, 4096)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	tr.Mark(4095, 2) // straddles blocks 0 and 1
	tr.Mark(8*4096, 0)
	tr.Mark(200<<10, 10) // past the end: ignored
	if err := tr.Mark(-1, 5); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("negative offset: %v", err)
	}
	want := []rebound.Region{{Offset: 0, Length: 8192}}
	if got := tr.Regions(); !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v", got)
	}
	// A long run crossing full bytes.
	tr.Mark(3*4096, 20*4096)
	want = []rebound.Region{{Offset: 0, Length: 8192}, {Offset: 3 * 4096, Length: 20 * 4096}}
	if got := tr.Regions(); !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v", got)
	}
	tr.Mark(0, 100<<10)
	want = []rebound.Region{{Offset: 0, Length: 100 << 10}}
	if got := tr.Regions(); !reflect.DeepEqual(got, want) || tr.Bytes() != 100<<10 {
		t.Fatalf("got %v %d", got, tr.Bytes())
	}
}

func TestFileDiskTracker(t *testing.T) {
	const size = 4 << 20
	dir := t.TempDir()
	fd, err := OpenFileDisk(filepath.Join(dir, "disk"), size)
	if err != nil {
		t.Fatal(err)
	}
	defer fd.Close()
	// Untracked writes mark nothing.
	fd.WriteAt([]byte("before"), 0)
	tr, err := OpenTracker(filepath.Join(dir, "disk.track"), size, 4096)
	if err != nil {
		t.Fatal(err)
	}
	fd.SetTracker(tr)
	m := newBlockModel(size, 4096)
	rng := rand.New(rand.NewPCG(5, 6))
	for range 200 {
		off := rng.Int64N(size - 1)
		length := 1 + rng.Int64N(min(size-off, 200<<10))
		switch rng.IntN(3) {
		case 0:
			if _, err := fd.WriteAt(make([]byte, length), off); err != nil {
				t.Fatal(err)
			}
		case 1:
			if err := fd.WriteZeroes(off, length); err != nil {
				t.Fatal(err)
			}
		case 2:
			if err := fd.Trim(off, length); err != nil {
				t.Fatal(err)
			}
		}
		m.mark(off, length)
	}
	// Out-of-range I/O is refused and marks nothing.
	if _, err := fd.WriteAt([]byte{1}, size); err == nil {
		t.Fatal("write past the end")
	}
	checkTracker(t, tr, m)
	// A change the tracker cannot record is refused, not silently lost.
	tr.Close()
	if _, err := fd.WriteAt([]byte{1}, 0); err == nil {
		t.Fatal("write with a closed tracker succeeded")
	}
	fd.SetTracker(nil)
	if _, err := fd.WriteAt([]byte{1}, 0); err != nil {
		t.Fatal(err)
	}
	tr2, err := OpenTracker(filepath.Join(dir, "disk.track"), size, 4096)
	if err != nil {
		t.Fatal(err)
	}
	defer tr2.Close()
	checkTracker(t, tr2, m)
}
