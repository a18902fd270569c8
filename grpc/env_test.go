package grpc

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/rebound-dr/rebound/pki"
	ggrpc "google.golang.org/grpc"
	"google.golang.org/grpc/stats"
)

func init() {
	controlMaxBackoff = 200 * time.Millisecond
	senderMaxBackoff = 200 * time.Millisecond
	helloTimeout = 500 * time.Millisecond
}

// env is a CA with a server certificate and helpers to get site configs.
type env struct {
	ca        *pki.CA
	serverTLS *tls.Config // client cert optional (server listener)
}

func newEnv(t testing.TB) *env {
	t.Helper()
	ca, err := pki.LoadOrCreateCA(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cert, key, err := ca.Issue("rebound-server", []string{"127.0.0.1"}, pki.ServerAuth)
	if err != nil {
		t.Fatal(err)
	}
	conf, err := pki.ServerTLS(cert, key, ca.CertPEM(), false)
	if err != nil {
		t.Fatal(err)
	}
	return &env{ca: ca, serverTLS: conf}
}

// site returns the server and client TLS configs of a site certificate;
// the client config verifies a peer named serverName.
func (e *env) site(t testing.TB, name, serverName string) (server, client *tls.Config) {
	t.Helper()
	cert, key, err := e.ca.Issue(name, []string{"127.0.0.1"}, pki.Site)
	if err != nil {
		t.Fatal(err)
	}
	server, err = pki.ServerTLS(cert, key, e.ca.CertPEM(), true)
	if err != nil {
		t.Fatal(err)
	}
	client, err = pki.ClientTLS(cert, key, e.ca.CertPEM(), serverName)
	if err != nil {
		t.Fatal(err)
	}
	return server, client
}

// testServer is a gRPC server that can be stopped and restarted on the
// same address.
type testServer struct {
	t        testing.TB
	addr     string
	conf     *tls.Config
	register func(*ggrpc.Server)
	opts     []ggrpc.ServerOption
	logger   *slog.Logger // nil: discard

	mu  sync.Mutex
	srv *ggrpc.Server
	wg  sync.WaitGroup
}

func startServer(t testing.TB, conf *tls.Config, register func(*ggrpc.Server), opts ...ggrpc.ServerOption) *testServer {
	ts := &testServer{t: t, addr: "127.0.0.1:0", conf: conf, register: register, opts: opts}
	ts.start()
	t.Cleanup(ts.stop)
	return ts
}

func (ts *testServer) start() {
	ts.t.Helper()
	var ln net.Listener
	var err error
	for i := 0; i < 50; i++ { // the old socket may linger briefly
		if ln, err = net.Listen("tcp", ts.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		ts.t.Fatal(err)
	}
	ts.addr = ln.Addr().String()
	logger := ts.logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	srv := NewServer(ts.conf, logger, ts.opts...)
	ts.register(srv)
	ts.mu.Lock()
	ts.srv = srv
	ts.mu.Unlock()
	ts.wg.Add(1)
	go func() {
		defer ts.wg.Done()
		_ = srv.Serve(ln)
	}()
}

func (ts *testServer) stop() {
	ts.mu.Lock()
	srv := ts.srv
	ts.srv = nil
	ts.mu.Unlock()
	if srv != nil {
		srv.Stop()
	}
	ts.wg.Wait()
}

func (ts *testServer) restart() {
	ts.stop()
	ts.start()
}

// compressionSeen records the compression of every incoming RPC.
type compressionSeen struct {
	mu   sync.Mutex
	seen map[string]string // method → grpc-encoding
}

func (c *compressionSeen) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context {
	return ctx
}
func (c *compressionSeen) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	return ctx
}
func (c *compressionSeen) HandleConn(context.Context, stats.ConnStats) {}
func (c *compressionSeen) HandleRPC(_ context.Context, s stats.RPCStats) {
	if h, ok := s.(*stats.InHeader); ok && h.FullMethod != "" {
		c.mu.Lock()
		if c.seen == nil {
			c.seen = make(map[string]string)
		}
		c.seen[h.FullMethod] = h.Compression
		c.mu.Unlock()
	}
}

func (c *compressionSeen) get(method string) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.seen[method]
}

// waitFor polls cond for up to d.
func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
