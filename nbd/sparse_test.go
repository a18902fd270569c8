package nbd

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/rebound-dr/rebound/internal/nbdtest"
	"github.com/rebound-dr/rebound/nbd/internal/rawfile"
)

// countingListener counts the bytes the server writes to its connections.
type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return countingConn{c, l.n}, nil
}

type countingConn struct {
	net.Conn
	n *atomic.Int64
}

func (c countingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.n.Add(int64(n))
	return n, err
}

// sparseExport serves a 1 GiB raw file holding 16 MiB of data (16 runs of
// 1 MiB spread over the disk) and counts the bytes the server sends.
func sparseExport(t testing.TB) (uri, path string, sent *atomic.Int64, data int64) {
	const size, chunk = 1 << 30, 1 << 20
	path = filepath.Join(t.TempDir(), "sparse.raw")
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
	t.Cleanup(func() { f.Close() })
	buf := make([]byte, chunk)
	for i := range int64(16) {
		rand.Read(buf)
		if _, err := f.WriteAt(buf, i*(size/16)+i*12288); err != nil {
			t.Fatal(err)
		}
		data += chunk
	}
	sent = new(atomic.Int64)
	s := &Server{
		Lookup: func(name string) (*Export, error) {
			if name != "s" {
				return nil, fmt.Errorf("no export %q", name)
			}
			return &Export{Name: "s", Backend: sparseFile{f}}, nil
		},
		List:   func() []string { return []string{"s"} },
		Logger: slog.New(slog.DiscardHandler),
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(countingListener{l, sent})
	t.Cleanup(func() { s.Close() })
	return URI("tcp", l.Addr().String(), "s"), path, sent, data
}

// TestSparseMap: nbdinfo --map and qemu-img map see exactly the data runs
// of a sparse export as data, the rest as holes that read as zero.
func TestSparseMap(t *testing.T) {
	uri, _, _, data := sparseExport(t)
	out := run(t, "nbdinfo", "--map", uri)
	var dataBytes, holeBytes int64
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 4 {
			t.Fatalf("nbdinfo --map line %q", line)
		}
		n, _ := strconv.ParseInt(f[1], 10, 64)
		switch strings.Join(f[3:], " ") {
		case "data":
			dataBytes += n
		case "hole,zero":
			holeBytes += n
		default:
			t.Fatalf("nbdinfo --map line %q", line)
		}
	}
	if dataBytes != data || dataBytes+holeBytes != 1<<30 {
		t.Fatalf("nbdinfo --map: %d data, %d hole bytes, want %d data of 1 GiB:\n%s", dataBytes, holeBytes, data, out)
	}

	var m []struct {
		Start, Length int64
		Data, Zero    bool
	}
	if err := json.Unmarshal([]byte(run(t, "qemu-img", "map", "--output=json", "-f", "raw", uri)), &m); err != nil {
		t.Fatal(err)
	}
	dataBytes, holeBytes = 0, 0
	for _, e := range m {
		switch {
		case e.Data && !e.Zero:
			dataBytes += e.Length
		case !e.Data && e.Zero:
			holeBytes += e.Length
		default:
			t.Fatalf("qemu-img map extent %+v", e)
		}
	}
	if dataBytes != data || dataBytes+holeBytes != 1<<30 {
		t.Fatalf("qemu-img map: %d data, %d hole bytes, want %d data of 1 GiB", dataBytes, holeBytes, data)
	}
}

// TestSparseCopyWire: nbdcopy and qemu-img convert of a 1 GiB export
// holding 16 MiB of data move at most 1.1x the data over the wire, and
// copy the disk exactly.
func TestSparseCopyWire(t *testing.T) {
	uri, path, sent, data := sparseExport(t)
	dir := t.TempDir()
	for _, c := range []struct {
		name string
		args []string
	}{
		{"nbdcopy", []string{uri, filepath.Join(dir, "nbdcopy.raw")}},
		{"qemu-img", []string{"convert", "-n", "--target-is-zero", "-f", "raw", "-O", "raw", uri, filepath.Join(dir, "qemu-img.raw")}},
	} {
		dst := c.args[len(c.args)-1]
		if err := os.WriteFile(dst, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(dst, 1<<30); err != nil {
			t.Fatal(err)
		}
		before := sent.Load()
		run(t, c.name, c.args...)
		wire := sent.Load() - before
		t.Logf("%s: %d bytes on the wire for %d bytes of data (%.3fx)", c.name, wire, data, float64(wire)/float64(data))
		if wire > data*11/10 {
			t.Errorf("%s moved %d bytes for %d of data: more than 1.1x", c.name, wire, data)
		}
		if !sameFile(t, dst, path) {
			t.Errorf("%s: copy differs from the export", c.name)
		}
	}
}

// sameFile compares two files a chunk at a time (they are 1 GiB).
func sameFile(t testing.TB, a, b string) bool {
	t.Helper()
	fa, err := os.Open(a)
	if err != nil {
		t.Fatal(err)
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		t.Fatal(err)
	}
	defer fb.Close()
	pa, pb := make([]byte, 1<<20), make([]byte, 1<<20)
	for {
		na, ea := io.ReadFull(fa, pa)
		nb, eb := io.ReadFull(fb, pb)
		if na != nb || !bytes.Equal(pa[:na], pb[:nb]) {
			return false
		}
		if ea != nil || eb != nil {
			return ea == eb || (na == 0 && nb == 0)
		}
	}
}

// countFast counts fast zeroes.
type countFast struct {
	sparseFile
	n *atomic.Int64
}

func (c countFast) WriteZeroesFast(off, length int64) error {
	c.n.Add(1)
	return c.sparseFile.WriteZeroesFast(off, length)
}

// TestFastZeroLibnbd: libnbd sees FAST_ZERO, CACHE and DF advertised; a
// fast zero of the whole export (the way a copy tool pre-zeroes a target)
// punches it, reads back zero and leaves the file sparse; a fast zero with
// NO_HOLE is refused with ENOTSUP and changes nothing.
func TestFastZeroLibnbd(t *testing.T) {
	const size = 64 << 20
	ts := startServer(t, exportSpec{Name: "t", Size: size})
	var fast atomic.Int64
	ts.mu.Lock()
	ts.exports["t"].Backend = countFast{ts.exports["t"].Backend.(sparseFile), &fast}
	ts.mu.Unlock()
	old := make([]byte, size)
	rand.Read(old)
	if err := os.WriteFile(ts.files["t"], old, 0o644); err != nil {
		t.Fatal(err)
	}
	const script = `
import errno, os, nbd
h = nbd.NBD()
h.connect_uri(os.environ["URI"])
assert h.can_fast_zero() and h.can_cache() and h.can_df(), "flags"
try:
    h.zero(1 << 20, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    print("no-hole fast zero succeeded")
except nbd.Error as e:
    assert e.errnum == errno.ENOTSUP, e
assert h.pread(4096, 0) != bytes(4096), "NO_HOLE fast zero changed data"
h.zero(h.get_size(), 0, nbd.CMD_FLAG_FAST_ZERO)
h.cache(h.get_size(), 0)
assert h.pread(1 << 20, 0) == bytes(1 << 20)
h.shutdown()
print("ok")
`
	cmd := exec.Command(pythonLibnbd(t), "-c", script)
	cmd.Env = append(os.Environ(), "URI="+ts.unixURI("t"))
	out, err := cmd.CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "ok" {
		t.Fatalf("libnbd: %v\n%s", err, out)
	}
	if fast.Load() != 1 {
		t.Fatalf("%d fast zeroes reached the backend, want 1", fast.Load())
	}
	checkRange(t, readFile(t, ts.files["t"]), 0, size, 0)
	if a := nbdtest.AllocatedIn(t, ts.files["t"], 0, size); a != 0 {
		t.Fatalf("export file has %d bytes allocated after a fast zero", a)
	}
}

// pythonLibnbd returns the interpreter with the libnbd module (nbdsh's);
// internal/blockcheck has the same, but it imports this package.
func pythonLibnbd(t *testing.T) string {
	t.Helper()
	for _, p := range []string{"/usr/bin/python3", "python3"} {
		if exec.Command(p, "-c", "import nbd").Run() == nil {
			return p
		}
	}
	t.Fatal("python3 with the libnbd module is required (apt-get install python3-libnbd)")
	return ""
}
