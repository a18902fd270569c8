package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/pki"
)

// NBD over TLS (NBD_OPT_STARTTLS, doc/proto.md "TLS support"): the client
// asks for TLS during option haggling, the server acks and both run a TLS
// handshake on the same socket; negotiation then starts over inside TLS.

// repErrTLSReqd refuses an option until TLS is negotiated.
const repErrTLSReqd = repFlagError | 5

// Files a TLS certificate directory holds, named as qemu's tls-creds-x509
// and libnbd's tls-certificates expect them.
const (
	TLSCAFile   = "ca-cert.pem"
	TLSCertFile = "client-cert.pem"
	TLSKeyFile  = "client-key.pem"
)

// tlsRequiredMsg is what a client that skipped TLS is told: it must say
// what to do, and reveal nothing about the exports.
const tlsRequiredMsg = "TLS required: this NBD port serves exports only over TLS; " +
	"connect with nbds://HOST:PORT/EXPORT and a client certificate from the Rebound CA " +
	"(nbdinfo: ?tls-certificates=DIR; qemu: --object tls-creds-x509,dir=DIR,endpoint=client); " +
	"plain NBD is served only on loopback and the site's unix socket"

// tlsRequiredFor is the default policy (Server.RequireTLS nil): with a TLS
// config, a TCP connection whose local address is not loopback must use
// TLS. A connection to a wildcard listener over 127.0.0.1 or ::1 has a
// loopback local address, so local clients stay plain.
func tlsRequiredFor(local net.Addr) bool {
	a, ok := local.(*net.TCPAddr)
	if !ok {
		return false // unix sockets: guarded by file modes
	}
	return !a.IP.IsLoopback()
}

// initTLS decides whether the connection must negotiate TLS before any
// other option.
func (c *conn) initTLS() {
	if c.s.TLSConfig == nil {
		return
	}
	req := c.s.RequireTLS
	if req == nil {
		req = tlsRequiredFor
	}
	c.tlsRequired = req(c.nc.LocalAddr())
}

// tlsOption handles NBD_OPT_STARTTLS and refuses every other option while
// TLS is required and not yet negotiated. It reports whether it answered
// the option (the handshake then reads the next one).
func (c *conn) tlsOption(opt uint32, data []byte) (bool, error) {
	if opt == optStartTLS {
		return true, c.startTLS(data)
	}
	if !c.tlsRequired || c.tlsDone {
		return false, nil
	}
	switch opt {
	case optAbort:
		return false, nil
	case optExportName:
		// It cannot be refused in-band; the spec says to hang up.
		return true, errors.New("client chose an export without TLS on a port that requires it")
	}
	if !c.tlsRefused {
		c.tlsRefused = true
		c.s.badLog.Warn(c.log, "nbd client refused: TLS required off loopback", "option", opt)
	}
	return true, c.optReply(opt, repErrTLSReqd, []byte(tlsRequiredMsg))
}

// startTLS answers NBD_OPT_STARTTLS and, once acked, runs the TLS
// handshake and swaps the connection's reader and writer onto it.
func (c *conn) startTLS(data []byte) error {
	switch {
	case len(data) != 0:
		return c.optReply(optStartTLS, repErrInvalid, []byte("NBD_OPT_STARTTLS takes no data"))
	case c.s.TLSConfig == nil:
		return c.optReply(optStartTLS, repErrUnsup, []byte("TLS is not configured on this NBD server"))
	case c.tlsDone:
		return c.optReply(optStartTLS, repErrInvalid, []byte("TLS is already negotiated"))
	}
	if err := c.optReply(optStartTLS, repAck, nil); err != nil {
		return err
	}
	if c.br.Buffered() != 0 {
		return errors.New("client sent data before the TLS handshake")
	}
	tc := tls.Server(c.nc, c.s.TLSConfig)
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("tls handshake: %w", err)
	}
	// stop() reads c.nc under s.mu (Close, Disconnect).
	cs := tc.ConnectionState()
	c.s.mu.Lock()
	c.nc = tc
	if len(cs.PeerCertificates) > 0 {
		c.tlsPeer = cs.PeerCertificates[0]
	}
	c.s.mu.Unlock()
	c.br.Reset(tc)
	c.out.w = tc
	c.tlsDone = true
	// What was negotiated in plain text does not carry over (doc/proto.md).
	c.resetNegotiation()
	if id := peerIdentity(tc.ConnectionState()); id != "" {
		c.log = c.log.With("peer", id)
	}
	return nil
}

// CloseTLSPeers closes every connection whose TLS client certificate
// matches (one just revoked) once its in-flight requests have finished,
// and waits for that, like Disconnect. It returns how many it closed.
func (s *Server) CloseTLSPeers(match func(*x509.Certificate) bool) int {
	s.mu.Lock()
	var victims []*conn
	for c := range s.conns {
		if c.tlsPeer != nil && match(c.tlsPeer) {
			victims = append(victims, c)
			c.stop()
		}
	}
	s.mu.Unlock()
	for _, c := range victims {
		<-c.done
	}
	return len(victims)
}

func peerIdentity(cs tls.ConnectionState) string {
	if len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return ""
	}
	return cs.VerifiedChains[0][0].Subject.CommonName
}

// ServerTLSConfig is the NBD server's TLS config for a site: its own
// certificate, and clients must show a certificate the same CA issued for
// client authentication (a site's, an agent's, or one issued for an NBD
// client). Apply revocations to it like to the replication listener.
func ServerTLSConfig(certPEM, keyPEM, caPEM []byte) (*tls.Config, error) {
	return pki.ServerTLS(certPEM, keyPEM, caPEM, true)
}

// LoadClientTLS reads a certificate directory (ca-cert.pem, client-cert.pem,
// client-key.pem) into a client config. serverName is the name the
// server's certificate must carry (empty: the dialed host).
func LoadClientTLS(dir, serverName string) (*tls.Config, error) {
	var b [3][]byte
	for i, f := range []string{TLSCAFile, TLSCertFile, TLSKeyFile} {
		var err error
		if b[i], err = os.ReadFile(filepath.Join(dir, f)); err != nil {
			return nil, rebound.Errorf(rebound.EINVALID, "NBD TLS certificates: %v (the directory needs %s, %s and %s)", err, TLSCAFile, TLSCertFile, TLSKeyFile)
		}
	}
	return pki.ClientTLS(b[1], b[2], b[0], serverName)
}

// WriteClientDir writes a certificate directory for NBD clients (qemu's
// tls-creds-x509 dir=, libnbd's tls-certificates=) from PEM files, 0600 in
// a 0700 directory. It rewrites only files whose content changed.
func WriteClientDir(dir string, certPEM, keyPEM, caPEM []byte) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	for name, b := range map[string][]byte{TLSCAFile: caPEM, TLSCertFile: certPEM, TLSKeyFile: keyPEM} {
		p := filepath.Join(dir, name)
		if old, err := os.ReadFile(p); err == nil && string(old) == string(b) {
			continue
		}
		if err := os.WriteFile(p, b, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// DialTLS is Dial over TLS with conf, whatever the URI's scheme (nbds://
// or nbd://): the client sends NBD_OPT_STARTTLS first and fails if the
// server does not support it.
func DialTLS(ctx context.Context, uri string, conf *tls.Config) (*Client, error) {
	return dial(ctx, uri, conf)
}

// startTLS sends NBD_OPT_STARTTLS after the client flags and runs the TLS
// handshake; it returns the reader for the rest of the negotiation.
func (c *Client) startTLS(br *bufio.Reader, cflags []byte) (*bufio.Reader, error) {
	if _, err := c.nc.Write(appendOpt(cflags, optStartTLS, nil)); err != nil {
		return nil, err
	}
	var rh [20]byte
	if _, err := io.ReadFull(br, rh[:]); err != nil {
		return nil, err
	}
	if binary.BigEndian.Uint64(rh[0:]) != optReplyMagic || binary.BigEndian.Uint32(rh[8:]) != optStartTLS {
		return nil, errors.New("bad reply to NBD_OPT_STARTTLS")
	}
	typ := binary.BigEndian.Uint32(rh[12:])
	n := binary.BigEndian.Uint32(rh[16:])
	if n > 64<<10 {
		return nil, fmt.Errorf("option reply too long (%d bytes)", n)
	}
	p := make([]byte, n)
	if _, err := io.ReadFull(br, p); err != nil {
		return nil, err
	}
	if typ != repAck {
		msg := string(p)
		if msg == "" {
			msg = fmt.Sprintf("error %#x", typ)
		}
		return nil, rebound.Errorf(rebound.EUNAVAILABLE, "server refused TLS (NBD_OPT_STARTTLS): %s", msg)
	}
	if br.Buffered() != 0 {
		return nil, errors.New("server sent data before the TLS handshake")
	}
	tc := tls.Client(c.nc, c.tlsConf)
	if err := tc.Handshake(); err != nil {
		return nil, rebound.Errorf(rebound.EUNAUTHORIZED, "tls handshake: %v", err)
	}
	c.nc = tc
	return bufio.NewReader(tc), nil
}

// dialTLSConfig is the TLS config a URI asks for: nbds:// needs one, from
// conf or from the URI's tls-certificates=DIR.
func dialTLSConfig(uri string, useTLS bool, certDir, serverName string, conf *tls.Config) (*tls.Config, error) {
	if conf != nil {
		return conf, nil
	}
	if certDir != "" {
		return LoadClientTLS(certDir, serverName)
	}
	if useTLS {
		return nil, rebound.Errorf(rebound.EINVALID, "NBD URI %q asks for TLS: add ?tls-certificates=DIR (a directory with %s, %s and %s)", uri, TLSCAFile, TLSCertFile, TLSKeyFile)
	}
	return nil, nil
}
