package overlay

import (
	"bytes"
	"fmt"
	"net"
	"path/filepath"
	"testing"

	"github.com/rebound-dr/rebound/internal/nbdtest"
	"github.com/rebound-dr/rebound/nbd"
)

// TestNoHoleThroughNBD: an overlay (a failed-over or test export) served
// over NBD keeps the blocks qemu-io zeroes with NO_HOLE allocated in its
// data file and punches them without it; zeroed ranges read back as zero,
// also after a reopen, and the rest still reads from the base.
func TestNoHoleThroughNBD(t *testing.T) {
	const size = 8 << 20
	baseData := randBase(7, size)
	path := filepath.Join(t.TempDir(), "disk")
	d, err := Open(path, bytes.NewReader(baseData), size)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	srv := &nbd.Server{Lookup: func(name string) (*nbd.Export, error) {
		if name != "o" {
			return nil, fmt.Errorf("no export %q", name)
		}
		return &nbd.Export{Name: name, Backend: d}, nil
	}}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	defer srv.Close()

	nbdtest.CheckZeroes(t, "nbd://"+l.Addr().String()+"/o", path, 1<<20)

	check := func(d *Disk) {
		t.Helper()
		got := make([]byte, size)
		if _, err := d.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		want := append([]byte(nil), baseData...)
		clear(want[1<<20 : 4<<20])
		if !bytes.Equal(got, want) {
			t.Fatal("overlay differs from base with 3 MiB zeroed")
		}
	}
	check(d)
	srv.Close()
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if d, err = Open(path, bytes.NewReader(baseData), size); err != nil {
		t.Fatal(err)
	}
	check(d)
}
