package capture

import (
	"path/filepath"
	"testing"

	"github.com/rebound-dr/rebound/internal/blockcheck"
)

// TestBlockStatusMatchesData: after random writes, zeroes and trims, every
// range the disk reports zero reads as zero (directly and through NBD with
// libnbd), for a FileDisk (an active machine's export) and a stream's disk
// (a protected machine's source export); the untouched half reports zero.
func TestBlockStatusMatchesData(t *testing.T) {
	const size = 8 << 20
	t.Run("FileDisk", func(t *testing.T) {
		d, err := OpenFileDisk(filepath.Join(t.TempDir(), "disk"), size)
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		blockcheck.Mutate(t, d, 2, 200, size/2)
		if res := blockcheck.Check(t, d); res.Zero < size/2 || res.Hole < size/2 {
			t.Fatalf("reported %d zero, %d hole bytes; the untouched half is %d", res.Zero, res.Hole, size/2)
		}
	})
	t.Run("stream disk", func(t *testing.T) {
		h := newHarness(t, 1, size, Options{})
		d := h.s.Disk(0)
		blockcheck.Mutate(t, d, 3, 200, size/2)
		if res := blockcheck.Check(t, d); res.Zero < size/2 || res.Hole < size/2 {
			t.Fatalf("reported %d zero, %d hole bytes; the untouched half is %d", res.Zero, res.Hole, size/2)
		}
	})
}
