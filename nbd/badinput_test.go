package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// rawConn negotiates an export by hand so tests can send arbitrary bytes in
// the transmission phase.
func rawConn(t *testing.T, addr, export string) net.Conn {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	hs := make([]byte, 18)
	if _, err := io.ReadFull(nc, hs); err != nil {
		t.Fatal(err)
	}
	msg := binary.BigEndian.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes)
	msg = appendOpt(msg, optExportName, []byte(export))
	if _, err := nc.Write(msg); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(nc, make([]byte, 10)); err != nil {
		t.Fatalf("export %q: %v", export, err)
	}
	return nc
}

func reqHeader(typ, flags uint16, handle, off uint64, length uint32) []byte {
	b := binary.BigEndian.AppendUint32(nil, requestMagic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, handle)
	b = binary.BigEndian.AppendUint64(b, off)
	return binary.BigEndian.AppendUint32(b, length)
}

func readReply(t *testing.T, nc net.Conn) (errno uint32, handle uint64) {
	t.Helper()
	var h [16]byte
	if _, err := io.ReadFull(nc, h[:]); err != nil {
		t.Fatalf("read reply: %v", err)
	}
	if binary.BigEndian.Uint32(h[:]) != simpleReplyMagic {
		t.Fatalf("bad reply magic %x", h[:4])
	}
	return binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
}

// expectClosed fails unless the server hangs up on nc.
func expectClosed(t *testing.T, nc net.Conn) {
	t.Helper()
	nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 64)
	for {
		_, err := nc.Read(b)
		if err == nil {
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("server did not close the connection")
		}
		return
	}
}

func TestBadInput(t *testing.T) {
	ts := startServer(t, exportSpec{Name: "d", Size: 1 << 20})
	good := ts.dial(t, ts.tcpURI("d"))
	ack := bytes.Repeat([]byte{0x3c}, 8192)
	if _, err := good.WriteAt(ack, 0); err != nil {
		t.Fatal(err)
	}
	// After each abuse, a fresh client and the long-lived one still work
	// and the acknowledged write is intact.
	check := func(what string) {
		t.Helper()
		for _, c := range []*Client{good, ts.dial(t, ts.unixURI("d"))} {
			got := make([]byte, len(ack))
			if _, err := c.ReadAt(got, 0); err != nil || !bytes.Equal(got, ack) {
				t.Fatalf("after %s: read %v, equal %v", what, err, bytes.Equal(got, ack))
			}
		}
		if !bytes.Equal(readFile(t, ts.files["d"])[:len(ack)], ack) {
			t.Fatalf("after %s: acknowledged write lost", what)
		}
	}

	t.Run("garbage handshake", func(t *testing.T) {
		nc, err := net.Dial("tcp", ts.tcp)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		nc.Write(bytes.Repeat([]byte("GET / HTTP/1.1\r\n"), 10))
		expectClosed(t, nc)
		check("garbage handshake")
	})
	t.Run("oldstyle client flags", func(t *testing.T) {
		nc, err := net.Dial("tcp", ts.tcp)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		io.ReadFull(nc, make([]byte, 18))
		nc.Write([]byte{0, 0, 0, 0}) // not fixed newstyle
		expectClosed(t, nc)
		check("non-fixed client")
	})
	t.Run("bad option", func(t *testing.T) {
		nc, err := net.Dial("tcp", ts.tcp)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		io.ReadFull(nc, make([]byte, 18))
		msg := binary.BigEndian.AppendUint32(nil, flagFixedNewstyle)
		msg = appendOpt(msg, 99, []byte("x"))                  // unknown option
		msg = appendOpt(msg, 11, nil)                          // unsupported (extended headers)
		msg = appendOpt(msg, optGo, []byte{0, 0, 0, 200, 'a'}) // malformed
		msg = appendOpt(msg, optList, []byte("junk"))          // LIST with data
		msg = appendOpt(msg, optExportName, []byte("d"))       // finally a good one
		msg = append(msg, reqHeader(cmdRead, 0, 7, 0, 16)...)  // and a read
		nc.Write(msg)
		nc.SetReadDeadline(time.Now().Add(5 * time.Second))
		want := []uint32{repErrUnsup, repErrUnsup, repErrInvalid, repErrInvalid}
		for i, w := range want {
			var h [20]byte
			if _, err := io.ReadFull(nc, h[:]); err != nil {
				t.Fatal(err)
			}
			if got := binary.BigEndian.Uint32(h[12:]); got != w {
				t.Fatalf("option reply %d type %#x, want %#x", i, got, w)
			}
			io.ReadFull(nc, make([]byte, binary.BigEndian.Uint32(h[16:])))
		}
		io.ReadFull(nc, make([]byte, 10+124)) // export reply with zeroes: client did not ask for NO_ZEROES
		if errno, h := readReply(t, nc); errno != 0 || h != 7 {
			t.Fatalf("read reply errno %d handle %d", errno, h)
		}
		got := make([]byte, 16)
		io.ReadFull(nc, got)
		if !bytes.Equal(got, ack[:16]) {
			t.Fatalf("read data %x", got)
		}
	})
	t.Run("bad request magic", func(t *testing.T) {
		nc := rawConn(t, ts.tcp, "d")
		h := reqHeader(cmdRead, 0, 1, 0, 512)
		h[0] ^= 0xff
		nc.Write(h)
		expectClosed(t, nc)
		if !strings.Contains(ts.logs.String(), "bad request magic") {
			t.Error("bad magic not logged")
		}
		check("bad magic")
	})
	t.Run("truncated header", func(t *testing.T) {
		nc := rawConn(t, ts.tcp, "d")
		nc.Write(reqHeader(cmdRead, 0, 1, 0, 512)[:13])
		nc.(*net.TCPConn).CloseWrite()
		expectClosed(t, nc)
		check("truncated header")
	})
	t.Run("truncated write payload", func(t *testing.T) {
		nc := rawConn(t, ts.tcp, "d")
		nc.Write(append(reqHeader(cmdWrite, 0, 1, 0, 4096), bytes.Repeat([]byte{0xee}, 1000)...))
		nc.(*net.TCPConn).CloseWrite()
		expectClosed(t, nc)
		check("truncated payload") // the partial write must not reach the disk
	})
	t.Run("errors keep the connection", func(t *testing.T) {
		nc := rawConn(t, ts.tcp, "d")
		var msg []byte
		msg = append(msg, reqHeader(cmdRead, 0, 1, 1<<20-1, 2)...)        // read past end
		msg = append(msg, reqHeader(cmdRead, 0, 2, 1<<63, 1)...)          // offset overflow
		msg = append(msg, reqHeader(cmdWrite, 0, 3, 1<<20-2, 4)...)       // write past end
		msg = append(msg, 1, 2, 3, 4)                                     //  (payload)
		msg = append(msg, reqHeader(77, 0, 4, 0, 0)...)                   // unknown command
		msg = append(msg, reqHeader(cmdRead, 1<<9, 5, 0, 1)...)           // unknown flag
		msg = append(msg, reqHeader(cmdRead, 0, 6, 0, MaxPayload+1)...)   // read too big
		msg = append(msg, reqHeader(cmdTrim, 0, 8, 1<<20, 1)...)          // trim past end
		msg = append(msg, reqHeader(cmdWriteZeroes, 0, 9, 1<<20-1, 2)...) // zero past end
		msg = append(msg, reqHeader(cmdRead, 0, 10, 0, 4)...)             // good read
		nc.Write(msg)
		want := map[uint64]uint32{1: errInval, 2: errInval, 3: errNoSpc, 4: errInval, 5: errInval, 6: errInval, 8: errInval, 9: errNoSpc, 10: 0}
		for range want {
			errno, h := readReply(t, nc)
			if w, ok := want[h]; !ok || errno != w {
				t.Fatalf("handle %d errno %d, want %d", h, errno, w)
			}
			delete(want, h)
			if h == 10 {
				got := make([]byte, 4)
				io.ReadFull(nc, got)
				if !bytes.Equal(got, ack[:4]) {
					t.Fatalf("good read got %x", got)
				}
			}
		}
		check("error replies")
	})
	t.Run("huge write drops connection", func(t *testing.T) {
		nc := rawConn(t, ts.tcp, "d")
		nc.Write(reqHeader(cmdWrite, 0, 11, 0, 1<<31))
		if errno, h := readReply(t, nc); errno != errInval || h != 11 {
			t.Fatalf("huge write: errno %d handle %d", errno, h)
		}
		expectClosed(t, nc)
		check("huge write")
	})
	t.Run("disc waits for in-flight", func(t *testing.T) {
		nc := rawConn(t, ts.tcp, "d")
		msg := append(reqHeader(cmdWrite, cmdFlagFUA, 12, 8192, 4), 9, 9, 9, 9)
		msg = append(msg, reqHeader(cmdDisc, 0, 13, 0, 0)...)
		nc.Write(msg)
		if errno, h := readReply(t, nc); errno != 0 || h != 12 {
			t.Fatalf("write before disc: errno %d handle %d", errno, h)
		}
		expectClosed(t, nc)
		if got := readFile(t, ts.files["d"])[8192:8196]; !bytes.Equal(got, []byte{9, 9, 9, 9}) {
			t.Fatalf("write before DISC not on disk: %x", got)
		}
	})
}

func TestDisconnect(t *testing.T) {
	ts := startServer(t, exportSpec{Name: "a", Size: 1 << 20}, exportSpec{Name: "b", Size: 1 << 20})
	a1 := ts.dial(t, ts.tcpURI("a"))
	a2 := ts.dial(t, ts.unixURI("a"))
	b := ts.dial(t, ts.tcpURI("b"))
	// Keep writes flowing on a1 while it is disconnected: every acknowledged
	// write must be on disk afterwards.
	const blocks = 2048
	last := make([]byte, blocks) // last acknowledged value per 512-byte block
	var inflight int = -1        // block of the write that got no reply
	var werr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		p := make([]byte, 512)
		for i := 0; ; i++ {
			blk, v := i%blocks, byte(i/blocks+1)
			for j := range p {
				p[j] = v
			}
			if _, werr = a1.WriteAt(p, int64(blk)*512); werr != nil {
				inflight = blk
				return
			}
			last[blk] = v
		}
	}()
	time.Sleep(50 * time.Millisecond)
	if n := ts.Disconnect("a"); n != 2 {
		t.Fatalf("Disconnect closed %d connections, want 2", n)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("writer on a disconnected connection did not fail")
	}
	if werr == nil {
		t.Fatal("no error after Disconnect")
	}
	disk := readFile(t, ts.files["a"])
	for blk := range blocks {
		got := disk[blk*512]
		if got != last[blk] && !(blk == inflight && got == last[blk]+1) {
			t.Fatalf("block %d = %d, last acknowledged %d", blk, got, last[blk])
		}
		checkRange(t, disk, blk*512, 512, got)
	}
	if _, err := a2.ReadAt(make([]byte, 1), 0); err == nil {
		t.Fatal("client of disconnected export still works")
	}
	if _, err := b.WriteAt([]byte{1}, 0); err != nil {
		t.Fatalf("client of other export broken: %v", err)
	}
	if n := ts.Disconnect("nothing"); n != 0 {
		t.Fatalf("Disconnect(nothing) = %d", n)
	}
	// New connections to the export work again (fencing is Lookup's job).
	a3 := ts.dial(t, ts.tcpURI("a"))
	if _, err := a3.ReadAt(make([]byte, 1), 0); err != nil {
		t.Fatal(err)
	}
}

func TestCloseServer(t *testing.T) {
	ts := startServer(t, exportSpec{Name: "a", Size: 1 << 20})
	c := ts.dial(t, ts.tcpURI("a"))
	done := make(chan struct{})
	go func() { ts.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close hangs")
	}
	if _, err := c.ReadAt(make([]byte, 1), 0); err == nil {
		t.Fatal("client works after server Close")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if _, err := Dial(ctx, ts.tcpURI("a")); err == nil {
		t.Fatal("dial after Close succeeded")
	}
}

// memBackend is an in-memory Backend for the fuzz test.
type memBackend struct {
	mu sync.Mutex
	b  []byte
}

func (m *memBackend) Size() int64 { return int64(len(m.b)) }
func (m *memBackend) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(p, m.b[off:]), nil
}
func (m *memBackend) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(m.b[off:], p), nil
}
func (m *memBackend) Flush() error { return nil }
func (m *memBackend) Trim(off, n int64) error {
	return m.WriteZeroes(off, n)
}
func (m *memBackend) WriteZeroesNoHole(off, n int64) error { return m.WriteZeroes(off, n) }
func (m *memBackend) WriteZeroes(off, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.b[off : off+n])
	return nil
}

func FuzzServerInput(f *testing.F) {
	hello := binary.BigEndian.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes)
	goData := append(binary.BigEndian.AppendUint32(nil, 1), 'm', 0, 1, 0, 3)
	f.Add([]byte{})
	f.Add(appendOpt(hello, optExportName, []byte("m")))
	f.Add(append(appendOpt(hello, optExportName, []byte("m")), reqHeader(cmdWrite, 1, 1, 10, 4)...))
	f.Add(append(appendOpt(appendOpt(hello, optList, nil), optGo, goData), reqHeader(cmdRead, 0, 1, 0, 100)...))
	f.Add(appendOpt(appendOpt(hello, optInfo, goData), optAbort, nil))
	f.Add(append(appendOpt(hello, optExportName, []byte("m")), append(reqHeader(cmdTrim, 0, 1, 0, 4096), reqHeader(cmdDisc, 0, 2, 0, 0)...)...))
	f.Add(append(appendOpt(hello, optExportName, []byte("x")), 1, 2, 3))
	meta := append(binary.BigEndian.AppendUint32(nil, 1), 'm', 0, 0, 0, 1, 0, 0, 0, 15)
	meta = append(meta, metaAllocation...)
	sr := appendOpt(appendOpt(appendOpt(hello, optStructuredReply, nil), optListMetaContext, meta), optSetMetaContext, meta)
	f.Add(append(appendOpt(sr, optGo, goData), append(reqHeader(cmdBlockStatus, cmdFlagReqOne, 1, 0, 4096), reqHeader(cmdRead, cmdFlagDF, 2, 0, 8192)...)...))
	f.Add(append(appendOpt(hello, optExportName, nil), reqHeader(cmdBlockStatus, 0, 1, 0, 0)...))
	f.Fuzz(func(t *testing.T, in []byte) {
		exp := &Export{Name: "m", Backend: &memBackend{b: make([]byte, 64<<10)}}
		s := &Server{
			Lookup: func(name string) (*Export, error) {
				if name == "m" {
					return exp, nil
				}
				return nil, syscall.ENOENT
			},
			List:   func() []string { return []string{"m"} },
			Logger: slog.New(slog.DiscardHandler),
		}
		cli, srv := net.Pipe()
		s.serveConn(srv)
		go io.Copy(io.Discard, cli)
		cli.SetWriteDeadline(time.Now().Add(2 * time.Second))
		cli.Write(in)
		cli.Close()
		s.Close()
	})
}

// TestBadClientsLogRate: 300 garbage connections make a handful of log
// lines, not 300, and a good client still works.
func TestBadClientsLogRate(t *testing.T) {
	ts := startServer(t, exportSpec{Name: "d", Size: 1 << 20})
	for range 300 {
		nc, err := net.Dial("tcp", ts.tcp)
		if err != nil {
			t.Fatal(err)
		}
		nc.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
		expectClosed(t, nc)
		nc.Close()
	}
	if n := strings.Count(ts.logs.String(), "nbd handshake failed"); n == 0 || n > 5 {
		t.Fatalf("300 bad handshakes logged %d lines, want 1..5:\n%s", n, ts.logs.String())
	}
	c := ts.dial(t, ts.tcpURI("d"))
	if _, err := c.ReadAt(make([]byte, 512), 0); err != nil {
		t.Fatal(err)
	}
}
