package nbd

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/rebound-dr/rebound"
)

// countingBackend counts flushes and can fail writes with a chosen error.
type countingBackend struct {
	memBackend
	flushes  atomic.Int64
	writeErr error
	mu       sync.Mutex
}

func (b *countingBackend) Flush() error { b.flushes.Add(1); return nil }
func (b *countingBackend) WriteAt(p []byte, off int64) (int, error) {
	b.mu.Lock()
	err := b.writeErr
	b.mu.Unlock()
	if err != nil {
		return 0, err
	}
	return b.memBackend.WriteAt(p, off)
}

func serveBackend(t *testing.T, b Backend) string {
	t.Helper()
	s := &Server{
		Lookup: func(string) (*Export, error) { return &Export{Name: "x", Backend: b}, nil },
		Logger: slog.New(slog.DiscardHandler),
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(l)
	t.Cleanup(func() { s.Close() })
	return URI("tcp", l.Addr().String(), "x")
}

func TestFUAAndFlush(t *testing.T) {
	b := &countingBackend{memBackend: memBackend{b: make([]byte, 1<<20)}}
	uri := serveBackend(t, b)
	c := (&testServer{}).dial(t, uri)
	if _, err := c.WriteAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if n := b.flushes.Load(); n != 0 {
		t.Fatalf("plain write flushed %d times", n)
	}
	if _, err := c.WriteAtFUA(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if n := b.flushes.Load(); n != 1 {
		t.Fatalf("FUA write: %d flushes, want 1", n)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if n := b.flushes.Load(); n != 2 {
		t.Fatalf("flush: %d flushes, want 2", n)
	}
	run(t, "qemu-io", "-f", "raw", "-c", "write -f -P 1 0 4k", uri)
	if n := b.flushes.Load(); n < 3 {
		t.Fatalf("qemu-io write -f: %d flushes, want >= 3", n)
	}
}

func TestBackendErrors(t *testing.T) {
	b := &countingBackend{memBackend: memBackend{b: make([]byte, 1<<20)}}
	c := (&testServer{}).dial(t, serveBackend(t, b))
	for _, tc := range []struct {
		err  error
		want syscall.Errno
	}{
		{fmt.Errorf("journal full: %w", syscall.ENOSPC), syscall.ENOSPC},
		{rebound.Errorf(rebound.EINVALID, "bad write"), syscall.EINVAL},
		{syscall.EINVAL, syscall.EINVAL},
		{errors.New("disk on fire"), syscall.EIO},
	} {
		b.mu.Lock()
		b.writeErr = tc.err
		b.mu.Unlock()
		if _, err := c.WriteAt([]byte{1}, 0); !errors.Is(err, tc.want) {
			t.Errorf("backend error %v: client got %v, want %v", tc.err, err, tc.want)
		}
	}
	b.mu.Lock()
	b.writeErr = nil
	b.mu.Unlock()
	if _, err := c.WriteAt([]byte{1}, 0); err != nil {
		t.Fatalf("write after backend errors: %v", err)
	}
	if e := (&Error{Op: "write", Errno: syscall.EIO}).Error(); !strings.Contains(e, "input/output error") {
		t.Errorf("error text %q", e)
	}
}
