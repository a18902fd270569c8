package grpc

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound/internal/syncbuf"
	"github.com/rebound-dr/rebound/pki"
	ggrpc "google.golang.org/grpc"
)

// syncBuffer is a log sink safe for concurrent writers.
type syncBuffer = syncbuf.Buffer

// untilClosed reads c until the server closes the TCP connection (a TLS
// alert comes before that); the deadline is far beyond the server's
// connection timeout.
func untilClosed(t *testing.T, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	if tc, ok := c.(*tls.Conn); ok {
		io.Copy(io.Discard, tc) // to the alert
		c = tc.NetConn()
	}
	_, err := io.Copy(io.Discard, c)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatal("the server kept a bad connection open")
	}
}

// TestBadHandshakesLogRate: 300 bad connections (garbage, a plain TCP
// probe, a certificate from another CA, and on a replication port a TLS
// client without a certificate) on the server's control/enroll port and on
// a site's replication port give at most 5 log lines per port, each naming
// the remote address and the reason; a probe that closes at once is not
// logged; good clients still get in.
func TestBadHandshakesLogRate(t *testing.T) {
	e := newEnv(t)
	_, fcert, fkey := foreignSite(t, "site-a")
	siteTLS, _ := e.site(t, "site-b", "")
	_, siteA := e.site(t, "site-a", "site-b")
	tk := &tokens{live: map[string]bool{"good": true}}

	for _, port := range []struct {
		name       string
		conf       *tls.Config
		serverName string
		register   func(*ggrpc.Server)
	}{
		{"control", e.serverTLS, "rebound-server", (&EnrollServer{CA: e.ca, Validate: tk.validate}).Register},
		{"replication", siteTLS, "site-b", (&ReplicationServer{}).Register},
	} {
		t.Run(port.name, func(t *testing.T) {
			logs := &syncBuffer{}
			ts := &testServer{t: t, addr: "127.0.0.1:0", conf: port.conf, register: port.register,
				logger: slog.New(slog.NewTextHandler(logs, nil))}
			ts.start()
			t.Cleanup(ts.stop)
			foreign, err := pki.ClientTLS(fcert, fkey, e.ca.CertPEM(), port.serverName)
			if err != nil {
				t.Fatal(err)
			}
			noCert := foreign.Clone()
			noCert.Certificates = nil

			for i := range 300 {
				switch i % 3 {
				case 0: // garbage
					c, err := net.Dial("tcp", ts.addr)
					if err != nil {
						t.Fatal(err)
					}
					c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
					untilClosed(t, c)
					c.Close()
				case 1: // a probe: connect, close
					c, err := net.Dial("tcp", ts.addr)
					if err != nil {
						t.Fatal(err)
					}
					c.Close()
				case 2: // a certificate the CA did not issue (or none where one is required)
					conf := foreign
					if port.name == "replication" && i%2 == 0 {
						conf = noCert
					}
					raw, err := net.Dial("tcp", ts.addr)
					if err != nil {
						t.Fatal(err)
					}
					c := tls.Client(raw, conf)
					c.Handshake() // TLS 1.3: the server refuses after the client is done
					untilClosed(t, c)
					raw.Close()
				}
			}
			// A good client after the flood: the port still serves.
			if port.name == "control" {
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				if _, _, _, err := Enroll(ctx, ts.addr, pki.FormatJoinToken("good", e.ca.Fingerprint()), "site-c"); err != nil {
					t.Fatalf("enroll after the flood: %v", err)
				}
			} else {
				conf := siteA.Clone()
				conf.NextProtos = []string{"h2"}
				c, err := tls.Dial("tcp", ts.addr, conf)
				if err != nil {
					t.Fatalf("site certificate after the flood: %v", err)
				}
				c.Close()
			}

			out := logs.String()
			n := strings.Count(out, "TLS handshake failed")
			if n == 0 || n > 5 {
				t.Fatalf("300 bad connections logged %d lines, want 1..5:\n%s", n, out)
			}
			// The bad connections take turns and each is logged before the
			// server closes it, so the lines are those of the first five.
			lines := strings.Split(strings.TrimSpace(out), "\n")
			want := []string{"first record does not look like a TLS handshake", "certificate signed by unknown authority",
				"first record does not look like a TLS handshake", "certificate signed by unknown authority"}
			if port.name == "replication" {
				want[1] = "client didn't provide a certificate"
			}
			for i, w := range want {
				if l := lines[i]; !strings.Contains(l, w) || !strings.Contains(l, "remote=127.0.0.1:") || !strings.Contains(l, "level=WARN") {
					t.Fatalf("line %d is %s\nwant a warning naming the remote address and %q", i, l, w)
				}
			}
		})
	}
}

// foreignSite issues a site certificate for name from a CA of its own, one
// the servers under test do not trust.
func foreignSite(t testing.TB, name string) (*pki.CA, []byte, []byte) {
	t.Helper()
	other, err := pki.LoadOrCreateCA(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cert, key, err := other.Issue(name, []string{"127.0.0.1"}, pki.Site)
	if err != nil {
		t.Fatal(err)
	}
	return other, cert, key
}
