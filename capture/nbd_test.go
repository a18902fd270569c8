package capture

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/nbdtest"
	"github.com/rebound-dr/rebound/nbd"
)

// TestThroughNBD drives a captured disk with real NBD clients (nbdcopy with
// parallel requests, qemu-io with overlapping writes, zeroes and discards)
// and checks that the stream replayed onto zeroes reproduces the disk.
func TestThroughNBD(t *testing.T) {
	for _, tool := range []string{"nbdcopy", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed: %v", tool, err)
		}
	}
	const size = 8 << 20
	h := newHarness(t, 1, size, Options{})
	uri := serveExports(t, map[string]nbd.Backend{"d0": h.s.Disk(0)}) + "d0"

	src := make([]byte, size)
	rand.Read(src[:size/2]) // the second half stays zero
	srcPath := filepath.Join(h.dir, "src.raw")
	if err := os.WriteFile(srcPath, src, 0o600); err != nil {
		t.Fatal(err)
	}
	run := func(name string, args ...string) {
		t.Helper()
		if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
			t.Fatalf("%s %v: %v\n%s", name, args, err, out)
		}
	}
	run("nbdcopy", "--requests=16", "--request-size=65536", srcPath, uri)
	got := make([]byte, size)
	if _, err := h.s.Disk(0).ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, src) {
		t.Fatal("disk differs from what nbdcopy wrote")
	}
	run("qemu-io", "-f", "raw",
		"-c", "aio_write -P 0x11 0 96k",
		"-c", "aio_write -P 0x22 32k 96k",
		"-c", "aio_write -z 64k 8k",
		"-c", "aio_flush",
		"-c", "discard 1m 100k",
		"-c", "write -f -P 0x33 5m 4k", // FUA
		"-c", "write -z 2m 1m",
		uri)

	// The clients' writes reached the disk (qemu-io exits 0 on a bad command).
	if _, err := h.s.Disk(0).ReadAt(got[:4096], 5<<20); err != nil || !bytes.Equal(got[:4096], bytes.Repeat([]byte{0x33}, 4096)) {
		t.Fatalf("FUA write missing: %v", err)
	}
	if _, err := h.s.Disk(0).ReadAt(got[:1<<20], 2<<20); err != nil || !bytes.Equal(got[:1<<20], make([]byte, 1<<20)) {
		t.Fatalf("write zeroes missing: %v", err)
	}

	head := h.s.Head()
	m := newModel(1, size)
	m.apply(t, readRange(t, h.s, 1, head))
	m.check(t, h)
	if head < size/2/(64<<10) {
		t.Fatalf("only %d records", head)
	}
}

// TestNoHoleThroughNBD: WRITE_ZEROES from qemu-io with NO_HOLE keeps the
// disk file allocated, without it punches, for a stream's disk (a source's
// export) and a FileDisk (an active machine's export). The stream records
// both as Zero records that rebuild the disk; reopening the stream, which
// replays its spool, neither punches the NO_HOLE ranges nor allocates a
// hole that a zero record covers.
func TestNoHoleThroughNBD(t *testing.T) {
	const size = 8 << 20
	h := newHarness(t, 1, size, Options{})
	fpath := filepath.Join(h.dir, "plain.raw")
	fd, err := OpenFileDisk(fpath, size)
	if err != nil {
		t.Fatal(err)
	}
	defer fd.Close()
	uri := serveExports(t, map[string]nbd.Backend{"d0": h.s.Disk(0), "f0": fd})

	nbdtest.CheckZeroes(t, uri+"f0", fpath, 1<<20)
	nbdtest.CheckZeroes(t, uri+"d0", h.specs[0].Path, 1<<20)
	// A zero over a hole, without NO_HOLE: stays a hole.
	nbdtest.QemuIO(t, uri+"d0", "write -z -u 6M 1M")

	head := h.s.Head()
	recs := readRange(t, h.s, 1, head)
	zeroes := 0
	for _, r := range recs {
		if r.Kind == rebound.RecordZero {
			zeroes++
		}
	}
	if zeroes != 4 {
		t.Fatalf("%d zero records for 4 WRITE_ZEROES", zeroes)
	}
	m := newModel(1, size)
	m.apply(t, recs)
	m.check(t, h)

	// Reopen: the whole spool (nothing acked) is replayed onto the disk.
	if err := h.s.Close(); err != nil {
		t.Fatal(err)
	}
	h.open()
	m.check(t, h)
	path := h.specs[0].Path
	if a := nbdtest.AllocatedIn(t, path, 1<<20, 2<<20); a != 2<<20 {
		t.Fatalf("after replay %d of the 2 MiB zeroed with NO_HOLE are allocated", a)
	}
	if a := nbdtest.AllocatedIn(t, path, 6<<20, 1<<20); a != 0 {
		t.Fatalf("replaying a zero record allocated %d bytes of a hole", a)
	}
}

// serveExports serves backends over NBD on loopback until the test ends
// and returns the URI prefix an export name completes.
func serveExports(t *testing.T, backends map[string]nbd.Backend) string {
	t.Helper()
	srv := &nbd.Server{Lookup: func(name string) (*nbd.Export, error) {
		b, ok := backends[name]
		if !ok {
			return nil, fmt.Errorf("no export %q", name)
		}
		return &nbd.Export{Name: name, Backend: b}, nil
	}}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return "nbd://" + l.Addr().String() + "/"
}
