package site

import (
	"bytes"
	"path/filepath"
	"testing"

	"github.com/rebound-dr/rebound/capture"
	"github.com/rebound-dr/rebound/internal/blockcheck"
	"github.com/rebound-dr/rebound/overlay"
)

// TestLiveDiskExtents: the wrappers the site serves (liveDisk, and
// trackedDisk of a failover) report their backend's holes, so block status
// works on the real exports, and pass fast zeroes on, tracked; a live disk
// not served any more refuses.
func TestLiveDiskExtents(t *testing.T) {
	const size = 4 << 20
	dir := t.TempDir()
	fd, err := capture.OpenFileDisk(filepath.Join(dir, "disk"), size)
	if err != nil {
		t.Fatal(err)
	}
	defer fd.Close()
	if _, err := fd.WriteAt(bytes.Repeat([]byte{7}, 1<<20), 1<<20); err != nil {
		t.Fatal(err)
	}
	d := &liveDisk{b: fd, size: size, name: "m-disk0"}
	if res := blockcheck.Check(t, d); res.Zero != 3<<20 {
		t.Fatalf("live disk over a file disk: %d zero bytes, want 3 MiB", res.Zero)
	}

	ov, err := overlay.Open(filepath.Join(dir, "ov"), fd, size)
	if err != nil {
		t.Fatal(err)
	}
	defer ov.Close()
	tr, err := capture.OpenTracker(filepath.Join(dir, "tracker"), size, 4096)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	td := trackedDisk{ov, tr}
	if _, err := td.WriteAt(bytes.Repeat([]byte{9}, 4096), 3<<20); err != nil {
		t.Fatal(err)
	}
	d.b = td
	if res := blockcheck.Check(t, d); res.Zero != 3<<20-4096 {
		t.Fatalf("live disk over a failover overlay: %d zero bytes, want 3 MiB - 4 KiB", res.Zero)
	}

	// A fast zero through the live disk is marked for the resync back.
	if err := d.WriteZeroesFast(2<<20, 8192); err != nil {
		t.Fatal(err)
	}
	marked := false
	for _, r := range tr.Regions() {
		if r.Offset <= 2<<20 && r.Offset+r.Length >= 2<<20+8192 {
			marked = true
		}
	}
	if !marked {
		t.Fatalf("fast zero not tracked: %v", tr.Regions())
	}
	got := make([]byte, 8192)
	if _, err := d.ReadAt(got, 2<<20); err != nil || !bytes.Equal(got, make([]byte, 8192)) {
		t.Fatalf("fast zero did not zero: %v", err)
	}

	d.b = nil
	if _, err := d.Extents(0, 4096); err == nil {
		t.Fatal("extents of a disk no longer served succeeded")
	}
}
