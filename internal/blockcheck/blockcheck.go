// Package blockcheck checks an NBD backend's block status against the
// bytes it reads back: directly (nbd.Extenter) and through the NBD server
// with libnbd (python3-libnbd, as nbdsh uses it). Shared by the tests of
// the packages that implement backends.
package blockcheck

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rebound-dr/rebound/nbd"
)

// Mutate applies n random writes, zeroes (with and without NO_HOLE, fast
// where b can) and trims to b inside [0, limit), leaving the rest of the disk untouched.
func Mutate(t testing.TB, b nbd.Backend, seed uint64, n int, limit int64) {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, seed^0x5eed))
	for range n {
		var length int64
		switch rng.IntN(3) {
		case 0:
			length = 1 + rng.Int64N(5000) // small, unaligned
		case 1:
			length = 4096 * (1 + rng.Int64N(16))
		default:
			length = 1 + rng.Int64N(1<<20)
		}
		length = min(length, limit)
		off := rng.Int64N(limit - length + 1)
		if rng.IntN(2) == 0 {
			off &^= 4095
		}
		var err error
		k := rng.IntN(10)
		switch {
		case k < 5:
			p := make([]byte, length)
			for i := range p {
				p[i] = byte(rng.Uint32() | 1)
			}
			_, err = b.WriteAt(p, off)
		case k < 7:
			err = b.WriteZeroes(off, length)
		case k < 8:
			err = b.WriteZeroesNoHole(off, length)
		case k < 9:
			err = b.Trim(off, length)
		default:
			if err = nbd.WriteZeroesFast(b, off, length); errors.Is(err, nbd.ErrNotFast) {
				err = b.WriteZeroes(off, length)
			}
		}
		if err != nil {
			t.Fatalf("op %d at %d+%d: %v", k, off, length, err)
		}
	}
}

// Result is what Check saw.
type Result struct {
	Zero, Hole int64 // bytes reported zero, hole (whole disk)
}

// Check asserts that b's extents tile the disk (and random sub-ranges)
// exactly and that every byte of an extent reported Zero reads as zero;
// then it serves b over NBD and asserts the same of the block status and
// reads libnbd gets (structured replies, base:allocation), and that
// libnbd reads the same bytes as b.ReadAt.
func Check(t testing.TB, b Disk) Result {
	t.Helper()
	size := b.Size()
	x := b
	all := make([]byte, size)
	if _, err := b.ReadAt(all, 0); err != nil {
		t.Fatalf("read disk: %v", err)
	}
	var res Result
	check := func(off, length int64) {
		xs, err := x.Extents(off, length)
		if err != nil {
			t.Fatalf("Extents(%d, %d): %v", off, length, err)
		}
		pos := off
		for _, e := range xs {
			if e.Length <= 0 {
				t.Fatalf("Extents(%d, %d): empty extent %+v", off, length, e)
			}
			end := pos + e.Length
			if end > off+length {
				t.Fatalf("Extents(%d, %d): extent %+v at %d passes the end", off, length, e, pos)
			}
			if e.Zero {
				if i := bytes.IndexFunc(all[pos:end], func(r rune) bool { return r != 0 }); i >= 0 {
					t.Fatalf("Extents(%d, %d): extent %d+%d reported zero (hole %v), byte %d is not", off, length, pos, e.Length, e.Hole, pos+int64(i))
				}
				if off == 0 && length == size {
					res.Zero += e.Length
				}
			}
			if e.Hole && off == 0 && length == size {
				res.Hole += e.Length
			}
			pos = end
		}
		if pos != off+length {
			t.Fatalf("Extents(%d, %d) covers up to %d", off, length, pos)
		}
	}
	check(0, size)
	rng := rand.New(rand.NewPCG(uint64(size), 1))
	for range 200 {
		n := 1 + rng.Int64N(size)
		check(rng.Int64N(size-n+1), n)
	}

	// The same through NBD with libnbd.
	wire := libnbd(t, b)
	if !strings.Contains(wire, "bad=0 ") {
		t.Fatalf("libnbd found reported-zero bytes that are not zero: %s", wire)
	}
	sum := sha256.Sum256(all)
	if want := "sha=" + hex.EncodeToString(sum[:]); !strings.Contains(wire, want) {
		t.Fatalf("libnbd read other bytes than ReadAt: %s, want %s", wire, want)
	}
	var zero, covered int64
	fmt.Sscanf(wire[strings.Index(wire, "zero="):], "zero=%d covered=%d", &zero, &covered)
	if covered != size || zero != res.Zero {
		t.Fatalf("libnbd block status covered %d of %d bytes, %d zero (Extents: %d zero)", covered, size, zero, res.Zero)
	}
	return res
}

// Disk is what Check needs: a readable disk that reports extents. One
// that is not an nbd.Backend is served read-only.
type Disk interface {
	Size() int64
	ReadAt(p []byte, off int64) (int, error)
	nbd.Extenter
}

// readOnly serves a Disk that has no write methods.
type readOnly struct{ Disk }

func (readOnly) WriteAt([]byte, int64) (int, error)   { return 0, syscall.EPERM }
func (readOnly) Flush() error                         { return nil }
func (readOnly) Trim(int64, int64) error              { return syscall.EPERM }
func (readOnly) WriteZeroes(int64, int64) error       { return syscall.EPERM }
func (readOnly) WriteZeroesNoHole(int64, int64) error { return syscall.EPERM }

// script walks the whole export with block_status, reads every extent
// reported zero and counts the non-zero ones, and hashes a full read.
const script = `
import hashlib, os, nbd
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(os.environ["URI"])
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
size = h.get_size()
exts = []
def cb(ctx, off, entries, err):
    pos = off
    for i in range(0, len(entries), 2):
        exts.append((pos, entries[i], entries[i+1]))
        pos += entries[i]
off = 0
while off < size:
    n = len(exts)
    h.block_status(min(size - off, 1 << 30), off, cb)
    assert len(exts) > n
    off = min(exts[-1][0] + exts[-1][1], size)
bad = zero = covered = 0
for (pos, n, f) in exts:
    n = min(n, size - pos)
    covered += n
    if f & nbd.STATE_ZERO:
        zero += n
        while n > 0:
            k = min(n, 32 << 20)
            if h.pread(k, pos) != bytes(k):
                bad += 1
            pos += k
            n -= k
sha = hashlib.sha256()
for pos in range(0, size, 32 << 20):
    sha.update(h.pread(min(32 << 20, size - pos), pos))
h.shutdown()
print("bad=%d zero=%d covered=%d sha=%s" % (bad, zero, covered, sha.hexdigest()))
`

// Python returns the interpreter that has the libnbd module (nbdsh's).
func Python(t testing.TB) string {
	t.Helper()
	for _, p := range []string{"/usr/bin/python3", "python3"} {
		if exec.Command(p, "-c", "import nbd").Run() == nil {
			return p
		}
	}
	t.Fatal("python3 with the libnbd module is required (apt-get install python3-libnbd)")
	return ""
}

func libnbd(t testing.TB, b Disk) string {
	t.Helper()
	py := Python(t)
	uri := Serve(t, b)
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, py, "-c", script)
	cmd.Env = append(os.Environ(), "URI="+uri)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("libnbd check: %v\n%s", err, out)
	}
	return string(out)
}

// Serve serves d as export "d" on a unix socket until the test ends and
// returns its URI; read-only unless d is an nbd.Backend.
func Serve(t testing.TB, d Disk) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "bc") // short: unix socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	b, ok := d.(nbd.Backend)
	if !ok {
		b = readOnly{d}
	}
	s := &nbd.Server{
		Lookup: func(name string) (*nbd.Export, error) {
			if name != "d" {
				return nil, fmt.Errorf("no export %q", name)
			}
			return &nbd.Export{Name: "d", Backend: b, ReadOnly: !ok}, nil
		},
		List:   func() []string { return []string{"d"} },
		Logger: slog.New(slog.DiscardHandler),
	}
	go s.Serve(l)
	t.Cleanup(func() { s.Close() })
	return nbd.URI("unix", sock, "d")
}
