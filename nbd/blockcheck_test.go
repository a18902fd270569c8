package nbd_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/rebound-dr/rebound/internal/blockcheck"
	"github.com/rebound-dr/rebound/nbd"
	"github.com/rebound-dr/rebound/nbd/internal/rawfile"
)

type sparseRaw struct{ *rawfile.File }

func (f sparseRaw) Extents(off, length int64) ([]nbd.Extent, error) {
	return nbd.SeekExtents(f.OSFile(), off, length)
}

// TestBlockStatusMatchesData: after random writes, zeroes and trims on a
// raw file, every range block status reports zero reads as zero, directly
// and through NBD with libnbd, and the untouched half is reported zero.
func TestBlockStatusMatchesData(t *testing.T) {
	const size = 8 << 20
	path := filepath.Join(t.TempDir(), "d.raw")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	f, err := rawfile.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	blockcheck.Mutate(t, f, 1, 300, size/2)
	res := blockcheck.Check(t, sparseRaw{f})
	if res.Zero < size/2 || res.Hole < size/2 {
		t.Fatalf("only %d bytes reported zero, %d hole; the untouched half is %d", res.Zero, res.Hole, size/2)
	}
}
