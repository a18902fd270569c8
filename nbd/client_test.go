package nbd

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// exercise runs concurrent writes, trims, zeroes and reads through c and
// checks the bytes against a model and against the file behind the export.
func exercise(t *testing.T, c *Client, file string) {
	t.Helper()
	size := int(c.Size())
	model := make([]byte, size)
	const workers, ops = 8, 60
	var wg sync.WaitGroup
	var mu sync.Mutex
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 1))
			// Each worker owns a disjoint slice of the disk so the model is exact.
			span := size / workers
			base := w * span
			buf := make([]byte, 256<<10)
			for i := range ops {
				n := 1 + r.IntN(len(buf))
				off := base + r.IntN(span-n)
				switch i % 5 {
				case 0, 1, 2:
					for j := range buf[:n] {
						buf[j] = byte(r.Uint32())
					}
					var err error
					if i%2 == 0 {
						_, err = c.WriteAtFUA(buf[:n], int64(off))
					} else {
						_, err = c.WriteAt(buf[:n], int64(off))
					}
					if err != nil {
						errs <- err
						return
					}
					mu.Lock()
					copy(model[off:], buf[:n])
					mu.Unlock()
				case 3:
					if err := c.Trim(int64(off), int64(n)); err != nil {
						errs <- err
						return
					}
					mu.Lock()
					clear(model[off : off+n])
					mu.Unlock()
				case 4:
					if err := c.WriteZeroes(int64(off), int64(n)); err != nil {
						errs <- err
						return
					}
					mu.Lock()
					clear(model[off : off+n])
					mu.Unlock()
				}
				got := make([]byte, n)
				if _, err := c.ReadAt(got, int64(off)); err != nil {
					errs <- err
					return
				}
				mu.Lock()
				ok := bytes.Equal(got, model[off:off+n])
				mu.Unlock()
				if !ok {
					errs <- errors.New("read back differs from what was written")
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	all := make([]byte, size)
	if _, err := c.ReadAt(all, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(all, model) {
		t.Fatal("whole-disk read differs from model")
	}
	if file != "" && !bytes.Equal(readFile(t, file), model) {
		t.Fatal("backing file differs from model")
	}
}

func TestClientServer(t *testing.T) {
	ts := startServer(t, exportSpec{Name: "d", Size: 8 << 20})
	for _, uri := range []string{ts.tcpURI("d"), ts.unixURI("d")} {
		c := ts.dial(t, uri)
		if c.Size() != 8<<20 || c.ReadOnly() {
			t.Fatalf("size %d readonly %v", c.Size(), c.ReadOnly())
		}
		exercise(t, c, ts.files["d"])
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := c.ReadAt(make([]byte, 1), 0); !errors.Is(err, ErrClientClosed) {
			t.Fatalf("read after close: %v", err)
		}
	}
}

func TestClientErrors(t *testing.T) {
	ts := startServer(t, exportSpec{Name: "rw", Size: 1 << 20}, exportSpec{Name: "ro", Size: 1 << 20, ReadOnly: true})
	c := ts.dial(t, ts.tcpURI("rw"))
	buf := make([]byte, 4096)
	if _, err := c.ReadAt(buf, 1<<20-100); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("read past end: %v, want EINVAL", err)
	}
	if _, err := c.WriteAt(buf, 1<<20); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("write past end: %v, want ENOSPC", err)
	}
	if err := c.Trim(1<<20, 1); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("trim past end: %v, want EINVAL", err)
	}
	var ne *Error
	if _, err := c.ReadAt(buf, 1<<40); !errors.As(err, &ne) || ne.Op != "read" || ne.Off != 1<<40 {
		t.Fatalf("error %v lacks details", err)
	}
	// The connection still works.
	for i := range buf {
		buf[i] = 0x42
	}
	if _, err := c.WriteAt(buf, 4096); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	if _, err := c.ReadAt(got, 4096); err != nil || !bytes.Equal(got, buf) {
		t.Fatalf("read after errors: %v", err)
	}

	ro := ts.dial(t, ts.unixURI("ro"))
	if !ro.ReadOnly() {
		t.Fatal("read-only export not flagged")
	}
	if _, err := ro.WriteAt(buf, 0); !errors.Is(err, syscall.EPERM) {
		t.Fatalf("write to read-only: %v, want EPERM", err)
	}
	if err := ro.WriteZeroes(0, 10); !errors.Is(err, syscall.EPERM) {
		t.Fatalf("zero read-only: %v, want EPERM", err)
	}
	if _, err := ro.ReadAt(got, 0); err != nil {
		t.Fatalf("read of read-only export: %v", err)
	}
	checkRange(t, readFile(t, ts.files["ro"]), 0, 1<<20, 0)

	// qemu-io cannot write either.
	out, err := runErr(t, "qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", ts.tcpURI("ro"))
	// qemu sees NBD_FLAG_READ_ONLY and refuses to open the export writable.
	if err == nil || !strings.Contains(out, "Permission denied") {
		t.Fatalf("qemu-io write to a read-only export: %v\n%s", err, out)
	}
	checkRange(t, readFile(t, ts.files["ro"]), 0, 1<<20, 0)

	// Unknown export.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := Dial(ctx, ts.tcpURI("missing")); err == nil || !strings.Contains(err.Error(), `no such export "missing"`) {
		t.Fatalf("dial unknown export: %v", err)
	}
}

func TestParseURI(t *testing.T) {
	for _, tc := range []struct{ uri, network, addr, export string }{
		{"nbd://127.0.0.1:1234/disk", "tcp", "127.0.0.1:1234", "disk"},
		{"nbd://host/disk", "tcp", "host:10809", "disk"},
		{"nbd://[::1]:99/", "tcp", "[::1]:99", ""},
		{"nbd+unix:///d%20x?socket=/run/s.sock", "unix", "/run/s.sock", "d x"},
		{"nbd+unix:///d?socket=%2Ftmp%2Fa+b%26c", "unix", "/tmp/a b&c", "d"},
		{"nbds://h:7/x?tls-certificates=/d", "tcp", "h:7", "x"},
	} {
		n, a, e, err := ParseURI(tc.uri)
		if err != nil || n != tc.network || a != tc.addr || e != tc.export {
			t.Errorf("ParseURI(%q) = %q %q %q %v", tc.uri, n, a, e, err)
		}
		if n2, a2, e2, _ := ParseURI(URI(n, a, e)); n2 != n || a2 != a || e2 != e {
			t.Errorf("URI round trip of %q: %q %q %q", tc.uri, n2, a2, e2)
		}
	}
	for _, bad := range []string{"http://x/y", "nbd+unix:///x", "nbd:///x", "nbds:///x", "::"} {
		if _, _, _, err := ParseURI(bad); err == nil {
			t.Errorf("ParseURI(%q) succeeded", bad)
		}
	}
}

// TestClientQemuNBD proves the client interoperates with qemu-nbd.
func TestClientQemuNBD(t *testing.T) {
	qnbd := tool(t, "qemu-nbd")
	dir := t.TempDir()
	img := filepath.Join(dir, "q.raw")
	if err := os.WriteFile(img, make([]byte, 4<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	sdir, err := os.MkdirTemp("", "qnbd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sdir)
	sock := filepath.Join(sdir, "s")
	cmd := exec.Command(qnbd, "-f", "raw", "-x", "qd", "-t", "-e", "4", "--cache=writeback", "--discard=unmap", "--socket", sock, img)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	uri := URI("unix", sock, "qd")
	var c *Client
	for start := time.Now(); ; time.Sleep(20 * time.Millisecond) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err = Dial(ctx, uri)
		cancel()
		if err == nil {
			break
		}
		if time.Since(start) > 10*time.Second {
			t.Fatalf("dial qemu-nbd: %v", err)
		}
	}
	defer c.Close()
	if c.Size() != 4<<20 {
		t.Fatalf("size %d", c.Size())
	}
	exercise(t, c, img)
	if _, err := c.ReadAt(make([]byte, 10), 4<<20); err == nil {
		t.Fatal("read past end of qemu-nbd export succeeded")
	}
	got := make([]byte, 10)
	if _, err := c.ReadAt(got, 0); err != nil {
		t.Fatalf("read after error from qemu-nbd: %v", err)
	}
}
