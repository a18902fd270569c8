package grpc

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rebound-dr/rebound/pki"
	"golang.org/x/sys/unix"
	ggrpc "google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// guard bounds a blocking call that must return; it is no timing window:
// a correct run returns as soon as the peer acts.
const guard = 30 * time.Second

// countConn counts the socket writes and reads under the TLS conn, can
// corrupt the next write, and signals its first write after arm.
type countConn struct {
	net.Conn
	writes, reads atomic.Int64
	corrupt       atomic.Bool
	armed         atomic.Bool
	wrote         chan struct{} // closed at the first write after arm
	once          sync.Once
}

func newCountConn(c net.Conn) *countConn { return &countConn{Conn: c, wrote: make(chan struct{})} }

func (c *countConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	if c.armed.Load() {
		c.once.Do(func() { close(c.wrote) })
	}
	if c.corrupt.CompareAndSwap(true, false) {
		q := bytes.Clone(p)
		q[len(q)-1] ^= 0xff // in the last record's tag
		return c.Conn.Write(q)
	}
	return c.Conn.Write(p)
}

func (c *countConn) Read(p []byte) (int, error) {
	c.reads.Add(1)
	return c.Conn.Read(p)
}

type tlsPair struct {
	client, server       net.Conn
	cRaw, sRaw           *countConn
	clientInfo, srvInfo  credentials.AuthInfo
	clientErr, serverErr error
}

// tlsPairOver handshakes a client and a server over TCP loopback with
// wrap(credentials.NewTLS(conf)) on both sides, as NewServer and Dial do.
func tlsPairOver(t testing.TB, serverConf, clientConf *tls.Config, wrap func(credentials.TransportCredentials) credentials.TransportCredentials) *tlsPair {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	p := &tlsPair{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		raw, err := ln.Accept()
		if err != nil {
			p.serverErr = err
			return
		}
		p.sRaw = newCountConn(raw)
		p.server, p.srvInfo, p.serverErr = wrap(credentials.NewTLS(serverConf)).ServerHandshake(p.sRaw)
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	p.cRaw = newCountConn(raw)
	ctx, cancel := context.WithTimeout(context.Background(), guard)
	defer cancel()
	p.client, p.clientInfo, p.clientErr = wrap(credentials.NewTLS(clientConf)).ClientHandshake(ctx, "site-b", p.cRaw)
	if p.clientErr != nil {
		raw.Close() // a server waiting for the client's certificate
	}
	<-done
	t.Cleanup(func() {
		for _, c := range []net.Conn{p.client, p.server} {
			if c != nil {
				c.Close()
			}
		}
	})
	return p
}

func siteConfs(t testing.TB) (server, client *tls.Config) {
	e := newEnv(t)
	server, _ = e.site(t, "site-b", "")
	_, client = e.site(t, "site-a", "site-b")
	return server, client
}

func coalescedPair(t testing.TB) *tlsPair {
	t.Helper()
	s, c := siteConfs(t)
	p := tlsPairOver(t, s, c, coalesced)
	if p.clientErr != nil || p.serverErr != nil {
		t.Fatalf("handshake: client %v, server %v", p.clientErr, p.serverErr)
	}
	return p
}

// TestTLSConnIntact: both sides write a stream of mixed sizes (1 byte to
// 3 MiB) while reading the other's concurrently; each reads exactly what
// the other wrote, in order; the wrapper keeps the peer's verified
// certificate and the socket reachable.
func TestTLSConnIntact(t *testing.T) {
	p := coalescedPair(t)
	ti, ok := p.srvInfo.(credentials.TLSInfo)
	if name, _ := pki.PeerName(ti.State); !ok || name != "site-a" {
		t.Fatalf("server sees peer %q (TLS info %v), want site-a", name, ok)
	}
	for _, c := range []net.Conn{p.client, p.server} {
		if _, ok := c.(syscall.Conn); !ok {
			t.Fatalf("%T does not reach the socket", c)
		}
	}

	// plan returns a stream of pieces of mixed sizes, half of them
	// under 20 kB (a few TLS records), the rest up to 3 MiB.
	plan := func(seed uint64) (pieces [][]byte, size int64) {
		r := rand.New(rand.NewPCG(seed, 0))
		buf := make([]byte, 3<<20)
		for i := range buf {
			buf[i] = byte(r.Uint32())
		}
		for range 40 {
			n := 1 + r.IntN(len(buf))
			if r.IntN(2) == 0 {
				n = 1 + r.IntN(20000)
			}
			pieces = append(pieces, buf[r.IntN(len(buf)-n+1):][:n])
			size += int64(n)
		}
		return pieces, size
	}
	send := func(c net.Conn, pieces [][]byte) ([32]byte, error) {
		h := sha256.New()
		for _, p := range pieces {
			h.Write(p)
			if _, err := c.Write(p); err != nil {
				return [32]byte{}, err
			}
		}
		return [32]byte(h.Sum(nil)), nil
	}
	recv := func(c net.Conn, size int64) ([32]byte, error) {
		h := sha256.New()
		c.SetReadDeadline(time.Now().Add(guard))
		_, err := io.CopyN(h, c, size)
		return [32]byte(h.Sum(nil)), err
	}
	fromClient, nc := plan(1)
	fromServer, ns := plan(2)

	var wg sync.WaitGroup
	var sentC, sentS, gotC, gotS [32]byte
	errs := make([]error, 4)
	wg.Go(func() { sentC, errs[0] = send(p.client, fromClient) })
	wg.Go(func() { sentS, errs[1] = send(p.server, fromServer) })
	wg.Go(func() { gotS, errs[2] = recv(p.server, nc) })
	wg.Go(func() { gotC, errs[3] = recv(p.client, ns) })
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	if gotS != sentC || gotC != sentS {
		t.Fatal("data arrived changed or out of order")
	}
}

// TestTLSConnWritesCoalesced: one 1 MiB Write reaches the socket in at
// most 2 writes through the wrapper; plain tls.Conn makes one per record.
func TestTLSConnWritesCoalesced(t *testing.T) {
	s, c := siteConfs(t)
	for _, tc := range []struct {
		name string
		wrap func(credentials.TransportCredentials) credentials.TransportCredentials
		ok   func(int64) bool
		want string
	}{
		{"coalesced", coalesced, func(n int64) bool { return n <= 2 }, "at most 2"},
		{"plain", func(c credentials.TransportCredentials) credentials.TransportCredentials { return c }, func(n int64) bool { return n >= 64 }, "at least 64"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := tlsPairOver(t, s, c, tc.wrap)
			if p.clientErr != nil || p.serverErr != nil {
				t.Fatalf("handshake: client %v, server %v", p.clientErr, p.serverErr)
			}
			before := p.cRaw.writes.Load()
			data := bytes.Repeat([]byte("rebound!"), 1<<17)
			errc := make(chan error, 1)
			go func() {
				_, err := p.client.Write(data)
				errc <- err
			}()
			p.server.SetReadDeadline(time.Now().Add(guard))
			got := make([]byte, len(data))
			if _, err := io.ReadFull(p.server, got); err != nil {
				t.Fatal(err)
			}
			if err := <-errc; err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Fatal("data changed")
			}
			if n := p.cRaw.writes.Load() - before; !tc.ok(n) {
				t.Fatalf("1 MiB took %d socket writes, want %s", n, tc.want)
			}
		})
	}
}

// TestTLSConnCloseSeen: after either side writes and closes, the other's
// blocking read gets all the data, then a clean EOF (close_notify, not
// just the TCP close): nothing stayed in a buffer.
func TestTLSConnCloseSeen(t *testing.T) {
	for _, clientCloses := range []bool{true, false} {
		p := coalescedPair(t)
		closer, reader := p.server, p.client
		if clientCloses {
			closer, reader = p.client, p.server
		}
		data := bytes.Repeat([]byte{7}, 100_000)
		errc := make(chan error, 1)
		go func() {
			_, err := closer.Write(data)
			errc <- errors.Join(err, closer.Close())
		}()
		reader.SetReadDeadline(time.Now().Add(guard))
		got, err := io.ReadAll(reader)
		if err != nil {
			t.Fatalf("client closes %v: reader got %v after %d bytes, want close_notify", clientCloses, err, len(got))
		}
		if !bytes.Equal(got, data) {
			t.Fatalf("client closes %v: got %d bytes, want %d", clientCloses, len(got), len(data))
		}
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
}

// TestTLSConnCloseBreaksWrite: Close during a Write blocked on a peer that
// does not read returns, and so does the Write, with an error.
func TestTLSConnCloseBreaksWrite(t *testing.T) {
	p := coalescedPair(t)
	p.cRaw.armed.Store(true)
	errc := make(chan error, 1)
	go func() {
		_, err := p.client.Write(make([]byte, 64<<20)) // far beyond the socket buffers
		errc <- err
	}()
	<-p.cRaw.wrote // the Write is under way
	closed := make(chan error, 1)
	go func() { closed <- p.client.Close() }()
	select {
	case <-closed:
	case <-time.After(guard):
		t.Fatal("Close hung behind a blocked Write")
	}
	select {
	case err := <-errc:
		if err == nil {
			t.Fatal("the Write of a closed connection succeeded")
		}
	case <-time.After(guard):
		t.Fatal("the Write hung after Close")
	}
}

// TestTLSConnDeadlines: deadlines reach the socket. An expired read
// deadline times the Read out and, once cleared, the data still comes; an
// expired write deadline fails the Write and every later one, as tls.Conn
// does (a torn record would corrupt the stream).
func TestTLSConnDeadlines(t *testing.T) {
	p := coalescedPair(t)
	p.server.SetReadDeadline(time.Now().Add(-time.Second))
	var ne net.Error
	if _, err := p.server.Read(make([]byte, 10)); !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("read past its deadline: %v, want a timeout", err)
	}
	p.server.SetReadDeadline(time.Now().Add(guard))
	if _, err := p.client.Write([]byte("after")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 5)
	if _, err := io.ReadFull(p.server, got); err != nil || string(got) != "after" {
		t.Fatalf("read %q, %v after a timeout, want \"after\"", got, err)
	}

	p.client.SetWriteDeadline(time.Now().Add(-time.Second))
	if _, err := p.client.Write(make([]byte, 100_000)); !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("write past its deadline: %v, want a timeout", err)
	}
	p.client.SetWriteDeadline(time.Time{})
	if _, err := p.client.Write([]byte("x")); err == nil {
		t.Fatal("a write after a timed-out write succeeded")
	}
}

// TestTLSConnAlerts: alerts reach the peer through the wrapper: a client
// certificate from another CA (sent by the server's handshake), and a bad
// record MAC (sent by the receiver's Read, not from a Write).
func TestTLSConnAlerts(t *testing.T) {
	s, c := siteConfs(t)
	other, fcert, fkey := foreignSite(t, "site-a")
	foreign, err := pki.ClientTLS(fcert, fkey, other.CertPEM(), "site-b")
	if err != nil {
		t.Fatal(err)
	}
	foreign.RootCAs = c.RootCAs // trusts the server, but the server does not trust it

	t.Run("bad certificate", func(t *testing.T) {
		p := tlsPairOver(t, s, foreign, coalesced)
		if p.serverErr == nil {
			t.Fatal("the server accepted a certificate from another CA")
		}
		err := p.clientErr
		if err == nil { // TLS 1.3: the client learns on its first read
			p.client.SetReadDeadline(time.Now().Add(guard))
			_, err = p.client.Read(make([]byte, 1))
		}
		if err == nil || !strings.Contains(err.Error(), "remote error: tls: ") {
			t.Fatalf("client got %v, want the server's alert", err)
		}
	})

	t.Run("bad record", func(t *testing.T) {
		p := coalescedPair(t)
		p.cRaw.corrupt.Store(true)
		if _, err := p.client.Write([]byte("hello")); err != nil {
			t.Fatal(err)
		}
		p.server.SetReadDeadline(time.Now().Add(guard))
		if _, err := p.server.Read(make([]byte, 10)); err == nil {
			t.Fatal("the server read a corrupted record")
		}
		p.client.SetReadDeadline(time.Now().Add(guard))
		_, err := p.client.Read(make([]byte, 10))
		if err == nil || !strings.Contains(err.Error(), "remote error: tls: bad record MAC") {
			t.Fatalf("client got %v, want the server's bad record MAC alert", err)
		}
	})
}

func threadCPU() time.Duration  { return rusage(unix.RUSAGE_THREAD) }
func processCPU() time.Duration { return rusage(unix.RUSAGE_SELF) }

func rusage(who int) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(who, &ru); err != nil {
		panic(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// BenchmarkTLSConn sends b.N × 1 MiB over a loopback TLS connection, in
// Writes of 1 MiB or 32 KiB (grpc-go's default write buffer), with plain
// tls.Conn and through the wrapper, and reports the CPU time per GiB
// of the sending and the receiving goroutine (each locked to its thread,
// user + system, RUSAGE_THREAD: both ends share this process) and of the
// whole process, and the socket writes and reads per MiB. The receiver
// reads 32 KiB at a time, as grpc-go's framer does by default.
//
//	go test ./grpc -run '^$' -bench 'BenchmarkTLSConn$' -benchtime 1024x -count 5
func BenchmarkTLSConn(b *testing.B) {
	s, c := siteConfs(b)
	msg := randomBytes(1 << 20)
	for _, bc := range []struct {
		name  string
		wrap  func(credentials.TransportCredentials) credentials.TransportCredentials
		write int
	}{
		{"plain/1MiB", func(c credentials.TransportCredentials) credentials.TransportCredentials { return c }, 1 << 20},
		{"coalesced/1MiB", coalesced, 1 << 20},
		{"plain/32KiB", func(c credentials.TransportCredentials) credentials.TransportCredentials { return c }, 32 << 10},
		{"coalesced/32KiB", coalesced, 32 << 10},
	} {
		b.Run(bc.name, func(b *testing.B) {
			p := tlsPairOver(b, s, c, bc.wrap)
			if p.clientErr != nil || p.serverErr != nil {
				b.Fatalf("handshake: client %v, server %v", p.clientErr, p.serverErr)
			}
			total := int64(b.N) << 20
			type result struct {
				cpu time.Duration
				err error
			}
			recv := make(chan result, 1)
			ready := make(chan struct{})
			go func() {
				runtime.LockOSThread()
				defer runtime.UnlockOSThread()
				buf := make([]byte, 32<<10)
				close(ready)
				t0 := threadCPU()
				var err error
				for n := int64(0); n < total && err == nil; {
					var m int
					m, err = p.server.Read(buf)
					n += int64(m)
				}
				recv <- result{threadCPU() - t0, err}
			}()
			<-ready
			w0, r0 := p.cRaw.writes.Load(), p.sRaw.reads.Load()
			runtime.LockOSThread()
			b.ResetTimer()
			all0, t0 := processCPU(), threadCPU()
			for range b.N {
				for m := msg; len(m) > 0; m = m[bc.write:] {
					if _, err := p.client.Write(m[:bc.write]); err != nil {
						b.Fatal(err)
					}
				}
			}
			send := threadCPU() - t0
			runtime.UnlockOSThread()
			r := <-recv
			all := processCPU() - all0
			b.StopTimer()
			if r.err != nil {
				b.Fatal(r.err)
			}
			gib := float64(total) / (1 << 30)
			mib := float64(total) / (1 << 20)
			b.SetBytes(1 << 20)
			b.ReportMetric(send.Seconds()/gib, "send-cpu-s/GiB")
			b.ReportMetric(r.cpu.Seconds()/gib, "recv-cpu-s/GiB")
			b.ReportMetric(all.Seconds()/gib, "cpu-s/GiB")
			b.ReportMetric(float64(p.cRaw.writes.Load()-w0)/mib, "writes/MiB")
			b.ReportMetric(float64(p.sRaw.reads.Load()-r0)/mib, "reads/MiB")
		})
	}
}

// benchSink is a client-streaming service that swallows its messages.
var benchSink = ggrpc.ServiceDesc{
	ServiceName: "rebound.bench.Sink",
	HandlerType: (*any)(nil),
	Streams: []ggrpc.StreamDesc{{
		StreamName:    "Send",
		ClientStreams: true,
		ServerStreams: true,
		Handler: func(_ any, ss ggrpc.ServerStream) error {
			m := new(wrapperspb.BytesValue)
			for {
				if err := ss.RecvMsg(m); err == io.EOF {
					return ss.SendMsg(&wrapperspb.BytesValue{})
				} else if err != nil {
					return err
				}
			}
		},
	}},
}

// BenchmarkGRPCStream sends b.N 4 MiB messages on one stream through
// NewServer and Dial (mutual TLS, uncompressed: the data is random), with
// and without the coalescing wrapper, and reports the process's CPU time
// (client and server together, RUSAGE_SELF) per GiB.
//
//	go test ./grpc -run '^$' -bench 'BenchmarkGRPCStream$' -benchtime 256x -count 5
func BenchmarkGRPCStream(b *testing.B) {
	s, c := siteConfs(b)
	msg := &wrapperspb.BytesValue{Value: randomBytes(4 << 20)}
	for _, coalesce := range []bool{false, true} {
		name := map[bool]string{false: "plain", true: "coalesced"}[coalesce]
		b.Run(name, func(b *testing.B) {
			coalesceTLS = coalesce
			defer func() { coalesceTLS = true }()
			ts := startServer(b, s, func(s *ggrpc.Server) { s.RegisterService(&benchSink, struct{}{}) })
			cc, err := Dial(ts.addr, c)
			if err != nil {
				b.Fatal(err)
			}
			defer cc.Close()
			st, err := cc.NewStream(context.Background(), &benchSink.Streams[0], "/rebound.bench.Sink/Send", ggrpc.UseCompressor("identity"))
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(4 << 20)
			b.ResetTimer()
			t0 := processCPU()
			for range b.N {
				if err := st.SendMsg(msg); err != nil {
					b.Fatal(err)
				}
			}
			if err := st.CloseSend(); err != nil {
				b.Fatal(err)
			}
			if err := st.RecvMsg(new(wrapperspb.BytesValue)); err != nil {
				b.Fatal(err)
			}
			cpu := processCPU() - t0
			b.StopTimer()
			b.ReportMetric(cpu.Seconds()/(float64(b.N)*4/1024), "cpu-s/GiB")
		})
	}
}
