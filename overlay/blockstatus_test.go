package overlay

import (
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/rebound-dr/rebound/internal/blockcheck"
	"github.com/rebound-dr/rebound/nbd"
)

// fileBase is a sparse base file that reports its holes.
type fileBase struct {
	f    *os.File
	size int64
}

func (b fileBase) Size() int64                             { return b.size }
func (b fileBase) ReadAt(p []byte, off int64) (int, error) { return b.f.ReadAt(p, off) }
func (b fileBase) Extents(off, n int64) ([]nbd.Extent, error) {
	return nbd.SeekExtents(b.f, off, n)
}

// TestBlockStatusMatchesData: an overlay (failover and test-failover
// exports) over a sparse base with data at 1-2 MiB and 5-6 MiB, after
// random writes, zeroes and trims in the first half: every range it
// reports zero reads as zero, directly and through NBD with libnbd, and
// the base's untouched holes (4-5 MiB, 6-8 MiB) are reported zero. An
// overlay over a base that cannot tell reports its own holes only.
func TestBlockStatusMatchesData(t *testing.T) {
	const size = 8 << 20
	dir := t.TempDir()
	f, err := os.Create(filepath.Join(dir, "base"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for _, off := range []int64{1 << 20, 5 << 20} {
		rand.Read(buf)
		if _, err := f.WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
	d, err := Open(filepath.Join(dir, "ov"), fileBase{f, size}, size)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	blockcheck.Mutate(t, d, 4, 200, size/2)
	if res := blockcheck.Check(t, d); res.Zero < 3<<20 || res.Hole < 3<<20 {
		t.Fatalf("reported %d zero, %d hole bytes; the base has 3 MiB of holes untouched", res.Zero, res.Hole)
	}

	type plain struct{ Base } // hides Extents
	o, err := Open(filepath.Join(dir, "ov2"), plain{fileBase{f, size}}, size)
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	if err := o.WriteZeroes(0, 1<<20); err != nil {
		t.Fatal(err)
	}
	if res := blockcheck.Check(t, o); res.Zero != 1<<20 {
		t.Fatalf("over a base without extents: %d zero bytes, want the 1 MiB punched here", res.Zero)
	}
}
