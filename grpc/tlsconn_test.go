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
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rebound-dr/rebound/pki"
	"google.golang.org/grpc/credentials"
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

// TestTLSConnAlerts: alerts reach the peer through the wrapper: a client
// certificate from another CA (sent by the server's handshake), and a bad
// record MAC (sent by the receiver's Read, not from a Write).
func TestTLSConnAlerts(t *testing.T) {
	s, c := siteConfs(t)
	other, err := pki.LoadOrCreateCA(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	fcert, fkey, err := other.Issue("site-a", []string{"127.0.0.1"}, pki.Site)
	if err != nil {
		t.Fatal(err)
	}
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
