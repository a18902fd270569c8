package grpc

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/grpc/pb"
	"github.com/rebound-dr/rebound/pki"
	ggrpc "google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// tokens is a one-time token store.
type tokens struct {
	mu   sync.Mutex
	live map[string]bool
}

func (tk *tokens) validate(_ context.Context, secret, name string, _ pki.Role, _ string) error {
	tk.mu.Lock()
	defer tk.mu.Unlock()
	if !tk.live[secret] {
		return rebound.Errorf(rebound.EUNAUTHORIZED, "join token is invalid, expired or already used")
	}
	delete(tk.live, secret)
	return nil
}

func TestEnroll(t *testing.T) {
	e := newEnv(t)
	tk := &tokens{live: map[string]bool{"good": true}}
	connected := make(chan string, 4)
	ctl := &ControlServer{OnConnect: func(s string) { connected <- s }}
	seen := &compressionSeen{}
	ts := startServer(t, e.serverTLS, func(s *ggrpc.Server) {
		(&EnrollServer{CA: e.ca, Validate: tk.validate}).Register(s)
		ctl.Register(s)
	}, ggrpc.StatsHandler(seen))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	certPEM, keyPEM, caPEM, err := Enroll(ctx, ts.addr, pki.FormatJoinToken("good", e.ca.Fingerprint()), "site-a")
	if err != nil {
		t.Fatal(err)
	}
	cert, err := pki.ParseCert(certPEM)
	if err != nil {
		t.Fatal(err)
	}
	if cert.Subject.CommonName != "site-a" || !pki.IsSite(cert) {
		t.Fatalf("enrolled cert CN %q site %v", cert.Subject.CommonName, pki.IsSite(cert))
	}
	if string(caPEM) != string(e.ca.CertPEM()) {
		t.Fatal("returned CA differs")
	}
	if got := seen.get(pb.Enrollment_Enroll_FullMethodName); got != Compressor {
		t.Fatalf("Enroll arrived with compression %q, want %q", got, Compressor)
	}

	// The token was one-time.
	_, _, _, err = Enroll(ctx, ts.addr, pki.FormatJoinToken("good", e.ca.Fingerprint()), "site-a")
	if rebound.ErrorCode(err) != rebound.EUNAUTHORIZED || !strings.Contains(err.Error(), "join token is invalid") {
		t.Fatalf("reused token: %v", err)
	}
	// A token pinned to another CA never reaches the server.
	other, _ := pki.LoadOrCreateCA(t.TempDir())
	tk.live["fresh"] = true
	if _, _, _, err = Enroll(ctx, ts.addr, pki.FormatJoinToken("fresh", other.Fingerprint()), "site-a"); err == nil {
		t.Fatal("enrolled with a token pinned to another CA")
	} else if !tk.live["fresh"] {
		t.Fatal("token consumed through an unpinned server")
	}
	if _, _, _, err = Enroll(ctx, ts.addr, "not-a-token", "site-a"); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("malformed token: %v", err)
	}

	// The enrolled certificate opens the control channel.
	cli, err := pki.ClientTLS(certPEM, keyPEM, caPEM, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	go RunControl(ctx, ts.addr, cli, &fakeSite{name: "site-a"}, time.Hour)
	select {
	case s := <-connected:
		if s != "site-a" {
			t.Fatalf("connected %q", s)
		}
	case <-ctx.Done():
		t.Fatal("enrolled site did not connect")
	}
}

func TestAuth_NoClientCert(t *testing.T) {
	e := newEnv(t)
	ts := startServer(t, e.serverTLS, func(s *ggrpc.Server) {
		(&EnrollServer{CA: e.ca, Validate: (&tokens{}).validate}).Register(s)
		(&ControlServer{}).Register(s)
		(&ReplicationServer{Target: func(string) (Target, error) { return Target{Sink: newMemSink(), SourceSite: "site-a"}, nil }}).Register(s)
	})
	anon, _ := pki.ClientTLS(nil, nil, e.ca.CertPEM(), "127.0.0.1")
	cc, err := Dial(ts.addr, anon)
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	cs, err := pb.NewControlClient(cc).Connect(ctx)
	if err == nil {
		_, err = cs.Recv()
	}
	if status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "client certificate") {
		t.Fatalf("control without cert: %v", err)
	}
	rs, err := pb.NewReplicationClient(cc).Replicate(ctx)
	if err == nil {
		_, err = rs.Recv()
	}
	if status.Code(err) != codes.Unauthenticated {
		t.Fatalf("replicate without cert: %v", err)
	}

	// A certificate from another CA fails the handshake.
	other, _ := pki.LoadOrCreateCA(t.TempDir())
	c, k, _ := other.Issue("site-a", nil, pki.Site)
	forged, _ := pki.ClientTLS(c, k, e.ca.CertPEM(), "127.0.0.1")
	cc2, _ := Dial(ts.addr, forged)
	defer cc2.Close()
	cs2, err := pb.NewControlClient(cc2).Connect(ctx)
	if err == nil {
		_, err = cs2.Recv()
	}
	if err == nil {
		t.Fatal("foreign certificate accepted")
	}

	// Enrollment stays open without a certificate.
	_, csr, _ := pki.NewKeyAndCSR("x")
	_, err = pb.NewEnrollmentClient(cc).Enroll(ctx, &pb.EnrollRequest{Version: ProtocolVersion, SiteName: "x", TokenSecret: "nope", CsrPem: csr})
	if status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "join token") {
		t.Fatalf("enroll with bad token: %v", err)
	}
	_, err = pb.NewEnrollmentClient(cc).Enroll(ctx, &pb.EnrollRequest{Version: 7, SiteName: "x", TokenSecret: "nope"})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "version 7") || !strings.Contains(err.Error(), "speaks 1") {
		t.Fatalf("enroll with version 7: %v", err)
	}
}

// Garbage on the port does not stop the server.
func TestBadInput_Garbage(t *testing.T) {
	e := newEnv(t)
	tk := &tokens{live: map[string]bool{"a": true}}
	ts := startServer(t, e.serverTLS, func(s *ggrpc.Server) {
		(&EnrollServer{CA: e.ca, Validate: tk.validate}).Register(s)
	})
	junk := make([]byte, 64<<10)
	rand.Read(junk)
	for i := 0; i < 5; i++ {
		c, err := net.Dial("tcp", ts.addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(2 * time.Second))
		c.Write(junk[:1<<(i*3)])
		c.Read(make([]byte, 1024))
		c.Close()
	}
	// Garbage inside a good TLS session (a broken HTTP/2 preface and a
	// frame header announcing a huge frame).
	_, cli := e.site(t, "site-x", "127.0.0.1")
	cli = cli.Clone()
	cli.NextProtos = []string{"h2"}
	for _, msg := range [][]byte{junk[:100], []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\x00\x00\x00\x00\x00\x01")} {
		c, err := tls.Dial("tcp", ts.addr, cli)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(2 * time.Second))
		c.Write(msg)
		c.Read(make([]byte, 1024))
		c.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, _, _, err := Enroll(ctx, ts.addr, pki.FormatJoinToken("a", e.ca.Fingerprint()), "site-a"); err != nil {
		t.Fatalf("good client after garbage: %v", err)
	}
}
