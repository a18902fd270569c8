package nbd

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/pki"
)

// offLoopbackListener makes accepted connections report a non-loopback
// local address, as on a site's network port, so the default TLS policy
// applies to them while the test still dials 127.0.0.1.
type offLoopbackListener struct{ net.Listener }

func (l offLoopbackListener) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return offLoopbackConn{nc}, nil
}

type offLoopbackConn struct{ net.Conn }

func (offLoopbackConn) LocalAddr() net.Addr {
	return &net.TCPAddr{IP: net.ParseIP("192.0.2.10"), Port: 10809}
}

// tlsFixture is a CA, a server certificate for 127.0.0.1 and client
// certificate directories as qemu and libnbd read them.
type tlsFixture struct {
	server               *tls.Config
	good, wrongCA, noCli string // certificate directories
	serverOnly           string // a certificate without client auth, from the right CA
	second               string // another good client
}

func newTLSFixture(t *testing.T) *tlsFixture {
	t.Helper()
	dir := t.TempDir()
	ca, err := pki.LoadOrCreateCA(filepath.Join(dir, "ca"))
	if err != nil {
		t.Fatal(err)
	}
	other, err := pki.LoadOrCreateCA(filepath.Join(dir, "other-ca"))
	if err != nil {
		t.Fatal(err)
	}
	scert, skey, err := ca.Issue("site1", []string{"127.0.0.1"}, pki.Site)
	if err != nil {
		t.Fatal(err)
	}
	f := &tlsFixture{}
	if f.server, err = ServerTLSConfig(scert, skey, ca.CertPEM()); err != nil {
		t.Fatal(err)
	}
	write := func(name string, ca *pki.CA, usage pki.Usage) string {
		c, k, err := ca.Issue(name, nil, usage)
		if err != nil {
			t.Fatal(err)
		}
		d := filepath.Join(dir, name)
		if err := WriteClientDir(d, c, k, ca.CertPEM()); err != nil {
			t.Fatal(err)
		}
		return d
	}
	f.good = write("client", ca, pki.ClientAuth)
	f.second = write("client2", ca, pki.ClientAuth)
	f.serverOnly = write("server-only", ca, pki.ServerAuth)
	// Trusts the right CA but holds a certificate from another one.
	f.wrongCA = write("wrong-ca", other, pki.ClientAuth)
	if err := os.WriteFile(filepath.Join(f.wrongCA, TLSCAFile), ca.CertPEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	// No client certificate: only the CA.
	f.noCli = filepath.Join(dir, "no-client")
	os.MkdirAll(f.noCli, 0o700)
	os.WriteFile(filepath.Join(f.noCli, TLSCAFile), ca.CertPEM(), 0o600)
	return f
}

func tlsURI(addr, export, dir string) string {
	return TLSURI(addr, export) + "?tls-certificates=" + dir
}

func dialErr(uri string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, uri)
	if err == nil {
		c.Close()
	}
	return err
}

// TestTLSGoClient: off loopback the server takes only TLS clients holding a
// certificate its CA issued for client auth; the unix socket stays plain.
func TestTLSGoClient(t *testing.T) {
	f := newTLSFixture(t)
	ts := startServerWith(t, serverOpts{tls: f.server, offLoopback: true}, exportSpec{Name: "disk0", Size: 4 << 20})

	c := ts.dial(t, tlsURI(ts.tcp, "disk0", f.good))
	if _, ok := c.nc.(*tls.Conn); !ok {
		t.Fatalf("nbds:// client runs over %T, want *tls.Conn", c.nc)
	}
	exercise(t, c, ts.files["disk0"])

	// Plain NBD off loopback: refused with the way to connect.
	err := dialErr(ts.tcpURI("disk0"))
	if err == nil || rebound.ErrorCode(err) != rebound.EUNAUTHORIZED || !strings.Contains(err.Error(), "TLS required") || !strings.Contains(err.Error(), "nbds://") {
		t.Fatalf("plain dial off loopback: %v, want an unauthorized TLS-required error naming nbds://", err)
	}
	// The unix socket stays plain.
	u := ts.dial(t, ts.unixURI("disk0"))
	got := make([]byte, 4096)
	if _, err := u.ReadAt(got, 0); err != nil {
		t.Fatalf("plain read over the unix socket: %v", err)
	}
	if want := readFile(t, ts.files["disk0"])[:4096]; !bytes.Equal(got, want) {
		t.Fatal("unix socket read differs from the file")
	}

	for name, dir := range map[string]string{"a certificate from another CA": f.wrongCA, "no client certificate": f.noCli, "a server-only certificate": f.serverOnly} {
		if err := dialErr(tlsURI(ts.tcp, "disk0", dir)); err == nil {
			t.Errorf("TLS client with %s got in", name)
		}
	}
	// A client that does not trust the server's CA stops at the handshake.
	wrong := t.TempDir()
	for _, n := range []string{TLSCertFile, TLSKeyFile} {
		b := readFile(t, filepath.Join(f.wrongCA, n))
		os.WriteFile(filepath.Join(wrong, n), b, 0o600)
	}
	os.WriteFile(filepath.Join(wrong, TLSCAFile), readFile(t, filepath.Join(f.wrongCA, TLSCertFile)), 0o600)
	if err := dialErr(tlsURI(ts.tcp, "disk0", wrong)); err == nil || !strings.Contains(err.Error(), "tls") {
		t.Errorf("client trusting another CA: %v, want a TLS handshake error", err)
	}
	// nbds:// without certificates is a usage error before any dial.
	if err := dialErr(TLSURI(ts.tcp, "disk0")); rebound.ErrorCode(err) != rebound.EINVALID || !strings.Contains(err.Error(), "tls-certificates=DIR") {
		t.Errorf("nbds:// without certificates: %v", err)
	}
	// tls-hostname names the certificate's holder when the host does not.
	named := ts.dial(t, tlsURI(ts.tcp, "disk0", f.good)+"&tls-hostname=site1")
	named.Close()
	if err := dialErr(tlsURI(ts.tcp, "disk0", f.good) + "&tls-hostname=elsewhere"); err == nil {
		t.Error("TLS client checking for another server name got in")
	}
	// The connection that got in still works after the refusals.
	if _, err := c.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
}

// TestTLSLoopbackPlain: with TLS configured, a loopback TCP client may
// still use plain NBD, or TLS if it asks.
func TestTLSLoopbackPlain(t *testing.T) {
	f := newTLSFixture(t)
	ts := startServerWith(t, serverOpts{tls: f.server}, exportSpec{Name: "disk0", Size: 1 << 20})
	p := ts.dial(t, ts.tcpURI("disk0"))
	if _, ok := p.nc.(*tls.Conn); ok {
		t.Fatal("plain loopback client negotiated TLS")
	}
	if _, err := p.WriteAt([]byte("plain"), 0); err != nil {
		t.Fatal(err)
	}
	c := ts.dial(t, tlsURI(ts.tcp, "disk0", f.good))
	got := make([]byte, 5)
	if _, err := c.ReadAt(got, 0); err != nil || string(got) != "plain" {
		t.Fatalf("TLS read on loopback: %q %v", got, err)
	}
	// A server without TLS refuses STARTTLS, so a TLS client never falls
	// back to plain.
	plain := startServer(t, exportSpec{Name: "d", Size: 1 << 20})
	if err := dialErr(tlsURI(plain.tcp, "d", f.good)); err == nil || !strings.Contains(err.Error(), "refused TLS") {
		t.Fatalf("TLS dial of a plain server: %v", err)
	}
}

func TestTLSPolicy(t *testing.T) {
	for _, tc := range []struct {
		addr net.Addr
		want bool
	}{
		{&net.TCPAddr{IP: net.ParseIP("127.0.0.1")}, false},
		{&net.TCPAddr{IP: net.ParseIP("127.1.2.3")}, false},
		{&net.TCPAddr{IP: net.ParseIP("::1")}, false},
		{&net.TCPAddr{IP: net.ParseIP("192.0.2.10")}, true},
		{&net.TCPAddr{IP: net.ParseIP("::ffff:10.0.0.1")}, true},
		{&net.TCPAddr{IP: net.ParseIP("fe80::1")}, true},
		{&net.UnixAddr{Name: "/run/nbd.sock", Net: "unix"}, false},
	} {
		if got := tlsRequiredFor(tc.addr); got != tc.want {
			t.Errorf("tlsRequiredFor(%v) = %v, want %v", tc.addr, got, tc.want)
		}
	}
}

// optExchange sends one option and reads its replies up to the first
// ack or error.
func optExchange(t *testing.T, nc net.Conn, opt uint32, data []byte) (typ uint32, msgs []string) {
	t.Helper()
	if _, err := nc.Write(appendOpt(nil, opt, data)); err != nil {
		t.Fatal(err)
	}
	for {
		var rh [20]byte
		if _, err := io.ReadFull(nc, rh[:]); err != nil {
			t.Fatalf("option %d reply: %v", opt, err)
		}
		if binary.BigEndian.Uint64(rh[:]) != optReplyMagic || binary.BigEndian.Uint32(rh[8:]) != opt {
			t.Fatalf("bad reply header %x", rh)
		}
		typ = binary.BigEndian.Uint32(rh[12:])
		p := make([]byte, binary.BigEndian.Uint32(rh[16:]))
		if _, err := io.ReadFull(nc, p); err != nil {
			t.Fatal(err)
		}
		msgs = append(msgs, string(p))
		if typ == repAck || typ&repFlagError != 0 {
			return typ, msgs
		}
	}
}

// TestTLSOptionsBeforeTLS speaks the handshake by hand: before TLS every
// option but STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD and no export
// name leaks; EXPORT_NAME hangs up; inside TLS the same options work and a
// second STARTTLS is invalid.
func TestTLSOptionsBeforeTLS(t *testing.T) {
	f := newTLSFixture(t)
	ts := startServerWith(t, serverOpts{tls: f.server, offLoopback: true}, exportSpec{Name: "secret-disk", Size: 1 << 20})
	open := func() net.Conn {
		nc, err := net.Dial("tcp", ts.tcp)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { nc.Close() })
		nc.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(nc, make([]byte, 18)); err != nil {
			t.Fatal(err)
		}
		if _, err := nc.Write(binary.BigEndian.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes)); err != nil {
			t.Fatal(err)
		}
		return nc
	}
	goData := binary.BigEndian.AppendUint32(nil, uint32(len("secret-disk")))
	goData = append(goData, "secret-disk"...)
	goData = binary.BigEndian.AppendUint16(goData, 0)

	nc := open()
	for _, o := range []struct {
		opt  uint32
		data []byte
	}{{optList, nil}, {optInfo, goData}, {optGo, goData}, {optStructuredReply, nil}, {99, nil}} {
		typ, msgs := optExchange(t, nc, o.opt, o.data)
		if typ != repErrTLSReqd || len(msgs) != 1 {
			t.Fatalf("option %d before TLS: reply %#x %q, want only NBD_REP_ERR_TLS_REQD", o.opt, typ, msgs)
		}
		if strings.Contains(msgs[0], "secret") {
			t.Fatalf("option %d before TLS revealed an export: %q", o.opt, msgs[0])
		}
	}
	if typ, _ := optExchange(t, nc, optStartTLS, []byte{1}); typ != repErrInvalid {
		t.Fatalf("STARTTLS with data: %#x, want NBD_REP_ERR_INVALID", typ)
	}
	if typ, _ := optExchange(t, nc, optStartTLS, nil); typ != repAck {
		t.Fatalf("STARTTLS: %#x", typ)
	}
	conf, err := LoadClientTLS(f.good, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	tc := tls.Client(nc, conf)
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	typ, msgs := optExchange(t, tc, optList, nil)
	if typ != repAck || len(msgs) != 2 || !strings.Contains(msgs[0], "secret-disk") {
		t.Fatalf("LIST inside TLS: %#x %q", typ, msgs)
	}
	if typ, _ := optExchange(t, tc, optStartTLS, nil); typ != repErrInvalid {
		t.Fatalf("second STARTTLS: %#x, want NBD_REP_ERR_INVALID", typ)
	}
	if typ, _ := optExchange(t, tc, optGo, goData); typ != repAck {
		t.Fatalf("GO inside TLS: %#x", typ)
	}
	tc.Write(reqHeader(cmdRead, 0, 7, 0, 512))
	if errno, h := readReply(t, tc); errno != 0 || h != 7 {
		t.Fatalf("read inside TLS: errno %d handle %d", errno, h)
	}

	// EXPORT_NAME cannot be refused in-band: the server hangs up.
	nc2 := open()
	nc2.Write(appendOpt(nil, optExportName, []byte("secret-disk")))
	expectClosed(t, nc2)
	// ABORT is answered without TLS.
	if typ, _ := optExchange(t, open(), optAbort, nil); typ != repAck {
		t.Fatalf("ABORT before TLS: %#x", typ)
	}
}

// TestTLSDisconnect: Disconnect finds and closes a TLS connection like a
// plain one, after its in-flight requests.
func TestTLSDisconnect(t *testing.T) {
	f := newTLSFixture(t)
	ts := startServerWith(t, serverOpts{tls: f.server, offLoopback: true}, exportSpec{Name: "disk0", Size: 1 << 20})
	c := ts.dial(t, tlsURI(ts.tcp, "disk0", f.good))
	if _, err := c.WriteAt([]byte("x"), 0); err != nil {
		t.Fatal(err)
	}
	if n := ts.Disconnect("disk0"); n != 1 {
		t.Fatalf("Disconnect closed %d connections, want 1", n)
	}
	if _, err := c.ReadAt(make([]byte, 1), 0); err == nil {
		t.Fatal("read on a disconnected TLS connection succeeded")
	}
}

// TestTLSCloseTLSPeers: the connections of a matching (revoked) client
// certificate are closed; another certificate's and a plain one go on.
func TestTLSCloseTLSPeers(t *testing.T) {
	f := newTLSFixture(t)
	ts := startServerWith(t, serverOpts{tls: f.server}, exportSpec{Name: "disk0", Size: 1 << 20})
	victim := ts.dial(t, tlsURI(ts.tcp, "disk0", f.good))
	other := ts.dial(t, tlsURI(ts.tcp, "disk0", f.second))
	plain := ts.dial(t, ts.tcpURI("disk0"))
	n := ts.CloseTLSPeers(func(c *x509.Certificate) bool { return c.Subject.CommonName == "client" })
	if n != 1 {
		t.Fatalf("closed %d connections, want 1", n)
	}
	buf := make([]byte, 512)
	if _, err := victim.ReadAt(buf, 0); err == nil {
		t.Fatal("the revoked certificate's connection still reads")
	}
	for name, c := range map[string]*Client{"another certificate": other, "plain": plain} {
		if _, err := c.ReadAt(buf, 0); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
}
