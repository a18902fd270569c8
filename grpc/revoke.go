package grpc

import (
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"sync"
	"syscall"

	"github.com/rebound-dr/rebound/internal/lograte"
	"github.com/rebound-dr/rebound/pki"
	ggrpc "google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// RevocableCreds are a listener's TLS credentials that remember each
// connection's peer certificate, so that CloseRevoked can cut the
// connections of a certificate revoked after their handshake: a
// revocation list checked only at the handshake would leave an open
// replication stream running.
type RevocableCreds struct {
	credentials.TransportCredentials
	rev *pki.Revocations

	mu    sync.Mutex
	conns map[*trackedConn]string // -> peer serial
}

// NewRevocableServer is NewServer (failed handshakes logged alike) whose
// connections are tracked by peer certificate, for CloseRevoked. tlsConf
// should have rev applied (pki.Revocations.Apply).
func NewRevocableServer(tlsConf *tls.Config, log *slog.Logger, rev *pki.Revocations, opts ...ggrpc.ServerOption) (*ggrpc.Server, *RevocableCreds) {
	if log == nil {
		log = slog.Default()
	}
	creds := &RevocableCreds{
		TransportCredentials: &loggedCreds{TransportCredentials: coalesced(credentials.NewTLS(tlsConf)), log: log, limit: &lograte.Limiter{}},
		rev:                  rev, conns: map[*trackedConn]string{},
	}
	// The last Creds option wins: these replace NewServer's.
	return NewServer(tlsConf, log, append(opts, ggrpc.Creds(creds))...), creds
}

// ServerHandshake runs the TLS handshake and tracks the connection.
func (c *RevocableCreds) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, info, err := c.TransportCredentials.ServerHandshake(raw)
	if err != nil {
		return conn, info, err
	}
	ti, ok := info.(credentials.TLSInfo)
	if !ok || len(ti.State.PeerCertificates) == 0 {
		return conn, info, nil
	}
	tc := &trackedConn{Conn: conn, creds: c}
	c.mu.Lock()
	c.conns[tc] = pki.Serial(ti.State.PeerCertificates[0])
	c.mu.Unlock()
	return tc, info, nil
}

// Clone returns c: the tracking is the listener's, whoever clones it.
func (c *RevocableCreds) Clone() credentials.TransportCredentials { return c }

// CloseRevoked closes the open connections whose peer certificate is on
// the revocation list now, and returns how many it closed.
func (c *RevocableCreds) CloseRevoked() int {
	revoked := map[string]bool{}
	for _, s := range c.rev.List() {
		revoked[s] = true
	}
	var cut []*trackedConn
	c.mu.Lock()
	for tc, serial := range c.conns {
		if revoked[serial] {
			cut = append(cut, tc)
		}
	}
	c.mu.Unlock()
	for _, tc := range cut {
		tc.Close()
	}
	return len(cut)
}

type trackedConn struct {
	net.Conn
	creds *RevocableCreds
	once  sync.Once
}

// SyscallConn keeps the socket reachable through the wrapper, as grpc-go
// expects of a TCP connection.
func (t *trackedConn) SyscallConn() (syscall.RawConn, error) {
	if sc, ok := t.Conn.(syscall.Conn); ok {
		return sc.SyscallConn()
	}
	return nil, errors.ErrUnsupported
}

func (t *trackedConn) Close() error {
	t.once.Do(func() {
		t.creds.mu.Lock()
		delete(t.creds.conns, t)
		t.creds.mu.Unlock()
	})
	return t.Conn.Close()
}
