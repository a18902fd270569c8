// Package grpc is Rebound's wire: enrollment and the control channel
// between the server and its sites, and replication between sites, all
// over gRPC with mutual TLS and zstd. See docs/design/wire.md.
package grpc

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/grpc/pb"
	"github.com/rebound-dr/rebound/internal/lograte"
	"github.com/rebound-dr/rebound/pki"
	ggrpc "google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/experimental"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// ProtocolVersion is carried in every hello. Peers with another version are
// refused with FailedPrecondition.
const ProtocolVersion = 1

// MaxMessageSize bounds one gRPC message either way.
const MaxMessageSize = 64 << 20

// Keepalive: a ping every 5 s, dropped after 5 s more without an answer, so
// a dead peer is noticed within ~10 s even on an idle stream.
const (
	keepaliveTime    = 5 * time.Second
	keepaliveTimeout = 5 * time.Second
)

// NewServer returns a gRPC server with Rebound's TLS, keepalive, message
// size and authentication settings. Every method but Enroll requires a
// client certificate verified against the CA (tlsConf's ClientCAs); callers
// without one get Unauthenticated. Failed TLS handshakes are logged to log
// (nil: slog.Default) at a bounded rate. opts are appended.
func NewServer(tlsConf *tls.Config, log *slog.Logger, opts ...ggrpc.ServerOption) *ggrpc.Server {
	if log == nil {
		log = slog.Default()
	}
	o := []ggrpc.ServerOption{
		ggrpc.Creds(&loggedCreds{TransportCredentials: coalesced(credentials.NewTLS(tlsConf)), log: log, limit: &lograte.Limiter{}}),
		ggrpc.MaxRecvMsgSize(MaxMessageSize),
		ggrpc.MaxSendMsgSize(MaxMessageSize),
		ggrpc.KeepaliveParams(keepalive.ServerParameters{Time: keepaliveTime, Timeout: keepaliveTimeout}),
		ggrpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: keepaliveTime / 2, PermitWithoutStream: true}),
		ggrpc.ConnectionTimeout(10 * time.Second),
		ggrpc.ChainUnaryInterceptor(authUnary),
		ggrpc.ChainStreamInterceptor(authStream),
		ggrpc.ForceServerCodecV2(codec{}),
		experimental.BufferPool(bufferPool),
	}
	return ggrpc.NewServer(append(o, opts...)...)
}

// loggedCreds logs the server's failed TLS handshakes (garbage, a plain
// TCP client, a certificate the CA did not issue, an old TLS version):
// grpc-go reports them only at its info level, which is off, so a site with
// a wrong certificate would fail to connect without a word here. The
// limiter keeps a scanner from flooding the log. A connection closed before
// its first byte (a TCP probe) is not logged, as grpc-go does not.
type loggedCreds struct {
	credentials.TransportCredentials
	log   *slog.Logger
	limit *lograte.Limiter
}

func (c *loggedCreds) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	hc := &handshakeConn{Conn: raw}
	hc.holdClose.Store(true)
	out, info, err := c.TransportCredentials.ServerHandshake(hc)
	hc.holdClose.Store(false)
	if err != nil {
		if !errors.Is(err, io.EOF) && !errors.Is(err, credentials.ErrConnDispatched) {
			c.limit.Warn(c.log, "grpc: refused a connection: TLS handshake failed", "listen", raw.LocalAddr().String(), "remote", raw.RemoteAddr().String(), "err", err)
		}
		raw.Close()
		return nil, nil, err
	}
	return out, info, nil
}

// handshakeConn holds back the close of a failed handshake until it is
// logged, so that the log line comes before the peer sees the close.
type handshakeConn struct {
	net.Conn
	holdClose atomic.Bool
}

func (h *handshakeConn) Close() error {
	if h.holdClose.Load() {
		return nil
	}
	return h.Conn.Close()
}

// SyscallConn keeps the socket reachable through the wrapper, as grpc-go
// expects of a TCP connection.
func (h *handshakeConn) SyscallConn() (syscall.RawConn, error) {
	if sc, ok := h.Conn.(syscall.Conn); ok {
		return sc.SyscallConn()
	}
	return nil, errors.ErrUnsupported
}

func (c *loggedCreds) Clone() credentials.TransportCredentials {
	return &loggedCreds{TransportCredentials: c.TransportCredentials.Clone(), log: c.log, limit: c.limit}
}

// Dial returns a client connection with Rebound's settings: zstd on every
// call, keepalive and message size limits. It does not connect yet.
func Dial(addr string, tlsConf *tls.Config) (*ggrpc.ClientConn, error) {
	return ggrpc.NewClient(addr,
		ggrpc.WithTransportCredentials(coalesced(credentials.NewTLS(tlsConf))),
		ggrpc.WithDefaultCallOptions(
			ggrpc.UseCompressor(Compressor),
			ggrpc.MaxCallRecvMsgSize(MaxMessageSize),
			ggrpc.MaxCallSendMsgSize(MaxMessageSize),
			ggrpc.ForceCodecV2(codec{}),
		),
		ggrpc.WithKeepaliveParams(keepalive.ClientParameters{Time: keepaliveTime, Timeout: keepaliveTimeout, PermitWithoutStream: true}),
		experimental.WithBufferPool(bufferPool),
	)
}

// unauthenticated lists the methods callable without a client certificate.
var unauthenticated = map[string]bool{
	pb.Enrollment_Enroll_FullMethodName: true,
}

func authUnary(ctx context.Context, req any, info *ggrpc.UnaryServerInfo, h ggrpc.UnaryHandler) (any, error) {
	if !unauthenticated[info.FullMethod] {
		if _, err := PeerSite(ctx); err != nil {
			return nil, err
		}
	}
	return h(ctx, req)
}

func authStream(srv any, ss ggrpc.ServerStream, info *ggrpc.StreamServerInfo, h ggrpc.StreamHandler) error {
	if !unauthenticated[info.FullMethod] {
		if _, err := PeerSite(ss.Context()); err != nil {
			return err
		}
	}
	return h(srv, ss)
}

// PeerSite returns the common name of the caller's verified client
// certificate, or an Unauthenticated status error.
func PeerSite(ctx context.Context) (string, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return "", status.Error(codes.Unauthenticated, "no peer information")
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return "", status.Error(codes.Unauthenticated, "connection is not TLS")
	}
	name, ok := pki.PeerName(ti.State)
	if !ok {
		return "", status.Error(codes.Unauthenticated, "a client certificate issued by the Rebound CA is required (enroll first)")
	}
	return name, nil
}

// PeerIdentity returns the identity of the caller's verified certificate,
// or an Unauthenticated status error.
func PeerIdentity(ctx context.Context) (pki.Identity, error) {
	if _, err := PeerSite(ctx); err != nil {
		return pki.Identity{}, err
	}
	p, _ := peer.FromContext(ctx)
	ti := p.AuthInfo.(credentials.TLSInfo)
	return pki.IdentityOf(ti.State.VerifiedChains[0][0]), nil
}

// peerSiteOrAgent checks that the caller holds a site or an agent
// certificate (not the server's, not one without a role).
func peerSiteOrAgent(ctx context.Context) (pki.Identity, error) {
	id, err := PeerIdentity(ctx)
	if err != nil {
		return id, err
	}
	if id.Role != pki.RoleSite && id.Role != pki.RoleAgent {
		return id, status.Errorf(codes.PermissionDenied, "%q holds neither a site nor an agent certificate", id.Name)
	}
	return id, nil
}

func checkVersion(what string, v uint32) error {
	if v != ProtocolVersion {
		return status.Errorf(codes.FailedPrecondition, "%s: peer speaks protocol version %d, this side speaks %d; upgrade the older side", what, v, ProtocolVersion)
	}
	return nil
}

var codeToGRPC = map[string]codes.Code{
	rebound.EINVALID:      codes.InvalidArgument,
	rebound.ENOTFOUND:     codes.NotFound,
	rebound.ECONFLICT:     codes.FailedPrecondition,
	rebound.EUNAVAILABLE:  codes.Unavailable,
	rebound.EUNAUTHORIZED: codes.Unauthenticated,
	rebound.EINTERNAL:     codes.Internal,
}

// toStatus turns a rebound error into a gRPC status error.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	if errors.Is(err, context.Canceled) {
		return status.Error(codes.Canceled, err.Error())
	} else if errors.Is(err, context.DeadlineExceeded) {
		return status.Error(codes.DeadlineExceeded, err.Error())
	}
	return status.Error(codeToGRPC[rebound.ErrorCode(err)], rebound.ErrorMessage(err))
}

// fromStatus turns a gRPC error into a rebound error, prefixing what.
func fromStatus(what string, err error) error {
	st, ok := status.FromError(err)
	if !ok || err == nil {
		return err
	}
	code := rebound.EINTERNAL
	switch st.Code() {
	case codes.InvalidArgument, codes.OutOfRange:
		code = rebound.EINVALID
	case codes.NotFound:
		code = rebound.ENOTFOUND
	case codes.FailedPrecondition, codes.AlreadyExists, codes.Aborted:
		code = rebound.ECONFLICT
	case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled:
		code = rebound.EUNAVAILABLE
	case codes.Unauthenticated, codes.PermissionDenied:
		code = rebound.EUNAUTHORIZED
	}
	return &wireError{err: rebound.Errorf(code, "%s: %s", what, st.Message()), st: st}
}

// wireError keeps the gRPC status next to the rebound error so callers can
// use either status.Code or rebound.ErrorCode.
type wireError struct {
	err *rebound.Error
	st  *status.Status
}

func (e *wireError) Error() string              { return e.err.Message }
func (e *wireError) GRPCStatus() *status.Status { return e.st }
func (e *wireError) Unwrap() error              { return e.err }

// backoff returns the wait before reconnect attempt n (0-based): 100 ms
// doubling to max, with jitter so sites do not reconnect in lockstep.
func backoff(n int, max time.Duration) time.Duration {
	d := 100 * time.Millisecond
	for i := 0; i < n && d < max; i++ {
		d *= 2
	}
	d = min(d, max)
	return d/2 + rand.N(d/2+1)
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// helloTimeout bounds the wait for a peer's first message, so a connection
// that never says hello does not hold a handler forever.
var helloTimeout = 10 * time.Second

// recvFirst receives a stream's first message within helloTimeout. On
// timeout the handler must return: that ends the stream and the pending
// Recv with it.
func recvFirst[T any](recv func() (T, error)) (T, error) {
	type result struct {
		m   T
		err error
	}
	ch := make(chan result, 1)
	go func() {
		m, err := recv()
		ch <- result{m, err}
	}()
	t := time.NewTimer(helloTimeout)
	defer t.Stop()
	select {
	case r := <-ch:
		return r.m, r.err
	case <-t.C:
		var zero T
		return zero, status.Errorf(codes.DeadlineExceeded, "no hello within %v", helloTimeout)
	}
}
