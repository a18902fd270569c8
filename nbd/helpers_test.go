package nbd

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rebound-dr/rebound/internal/syncbuf"
	"github.com/rebound-dr/rebound/nbd/internal/rawfile"
)

// testServer serves file-backed exports on a TCP port and a unix socket.
type testServer struct {
	*Server
	tcp, sock string
	files     map[string]string // export name -> backing file
	logs      *syncBuffer
	mu        sync.Mutex
	exports   map[string]*Export
	serveErrs chan error
}

// syncBuffer is a log sink safe for concurrent writers.
type syncBuffer = syncbuf.Buffer

// sparseFile reports the raw file's holes (block status, hole chunks).
type sparseFile struct{ *rawfile.File }

func (f sparseFile) Extents(off, length int64) ([]Extent, error) {
	return SeekExtents(f.OSFile(), off, length)
}

// WriteZeroesFast punches a hole, or is not fast.
func (f sparseFile) WriteZeroesFast(off, length int64) error {
	const punchHole, keepSize = 0x02, 0x01
	if syscall.Fallocate(int(f.OSFile().Fd()), punchHole|keepSize, off, length) != nil {
		return ErrNotFast
	}
	return nil
}

// exportSpec describes an export to create: a file of Size bytes.
type exportSpec struct {
	Name     string
	Size     int64
	ReadOnly bool
}

func startServer(t testing.TB, specs ...exportSpec) *testServer {
	t.Helper()
	return startServerWith(t, serverOpts{}, specs...)
}

// serverOpts changes what startServerWith starts.
type serverOpts struct {
	tls *tls.Config
	// offLoopback makes the TCP listener's connections report a
	// non-loopback local address, as on a site's network port.
	offLoopback bool
}

func startServerWith(t testing.TB, opts serverOpts, specs ...exportSpec) *testServer {
	t.Helper()
	dir := t.TempDir()
	ts := &testServer{files: map[string]string{}, exports: map[string]*Export{}, logs: &syncBuffer{}, serveErrs: make(chan error, 2)}
	for _, sp := range specs {
		path := filepath.Join(dir, sp.Name+".raw")
		if err := os.WriteFile(path, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(path, sp.Size); err != nil {
			t.Fatal(err)
		}
		f, err := rawfile.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		ts.files[sp.Name] = path
		ts.exports[sp.Name] = &Export{Name: sp.Name, Description: "disk " + sp.Name, Backend: sparseFile{f}, ReadOnly: sp.ReadOnly}
	}
	ts.Server = &Server{
		Lookup: func(name string) (*Export, error) {
			ts.mu.Lock()
			defer ts.mu.Unlock()
			e, ok := ts.exports[name]
			if !ok {
				return nil, fmt.Errorf("no such export %q on this rebound site", name)
			}
			return e, nil
		},
		List: func() []string {
			ts.mu.Lock()
			defer ts.mu.Unlock()
			var names []string
			for n := range ts.exports {
				names = append(names, n)
			}
			return names
		},
		Logger:    slog.New(slog.NewTextHandler(ts.logs, nil)),
		TLSConfig: opts.tls,
	}
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if opts.offLoopback {
		tl = offLoopbackListener{tl}
	}
	ts.tcp = tl.Addr().String()
	// Unix socket paths are limited to 108 bytes; t.TempDir can be long.
	sdir, err := os.MkdirTemp("", "nbd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sdir) })
	ts.sock = filepath.Join(sdir, "s")
	ul, err := net.Listen("unix", ts.sock)
	if err != nil {
		t.Fatal(err)
	}
	go func() { ts.serveErrs <- ts.Serve(tl) }()
	go func() { ts.serveErrs <- ts.Serve(ul) }()
	t.Cleanup(func() {
		ts.Close()
		for range 2 {
			if err := <-ts.serveErrs; err != net.ErrClosed {
				t.Errorf("Serve returned %v, want net.ErrClosed", err)
			}
		}
	})
	return ts
}

func (ts *testServer) tcpURI(name string) string  { return URI("tcp", ts.tcp, name) }
func (ts *testServer) unixURI(name string) string { return URI("unix", ts.sock, name) }

func (ts *testServer) dial(t testing.TB, uri string) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, uri)
	if err != nil {
		t.Fatalf("Dial %s: %v", uri, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func tool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s is required: %v", name, err)
	}
	return p
}

// run runs a command and returns its combined output; it fails the test on
// a non-zero exit.
func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := runErr(t, name, args...)
	if err != nil {
		t.Fatalf("%s %q: %v\n%s", name, args, err, out)
	}
	return out
}

func runErr(t testing.TB, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, tool(t, name), args...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func randomFile(t testing.TB, path string, size int) []byte {
	t.Helper()
	b := make([]byte, size)
	rand.Read(b)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return b
}

func fileSHA(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func readFile(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// checkRange fails unless b[off:off+n] is all v.
func checkRange(t testing.TB, b []byte, off, n int, v byte) {
	t.Helper()
	for i := off; i < off+n; i++ {
		if b[i] != v {
			t.Fatalf("byte %d = %#x, want %#x (range %d+%d)", i, b[i], v, off, n)
		}
	}
}
