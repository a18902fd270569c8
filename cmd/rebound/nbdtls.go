package main

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"path/filepath"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/nbd"
	"github.com/rebound-dr/rebound/pki"
	"github.com/rebound-dr/rebound/qemu"
)

// NBD over TLS modes of a site (--nbd-tls).
const (
	nbdTLSAuto = "auto" // offered on TCP, required off loopback
	nbdTLSOn   = "on"   // required on TCP, loopback included
	nbdTLSOff  = "off"  // plain everywhere
)

// siteNBDTLS is a site's NBD over TLS setup: the server's config (nil:
// plain only), which connections must use it (nil: the default, TCP off
// loopback), and, when the site's URIs are nbds://, the credentials its
// VMs and tools use (the site's own certificate, in DATA/tls/nbd-client,
// checked against the site's name).
func siteNBDTLS(cfg SiteConfig, certPEM, keyPEM, caPEM []byte, rev *pki.Revocations) (conf *tls.Config, require func(net.Addr) bool, creds *qemu.NBDTLS, err error) {
	mode, err := nbdTLSMode(cfg.NBDTLS)
	if err != nil || mode == nbdTLSOff {
		return nil, nil, nil, err
	}
	if conf, err = nbd.ServerTLSConfig(certPEM, keyPEM, caPEM); err != nil {
		return nil, nil, nil, err
	}
	// Sites' and NBD clients' certificates: an agent's is bound to one
	// machine and the server's authenticates no client.
	conf.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("no client certificate")
		}
		leaf := cs.PeerCertificates[0]
		id := pki.IdentityOf(leaf)
		if id.Role != pki.RoleSite && id.Role != pki.RoleNBD {
			return fmt.Errorf("certificate of %q (role %q) may not open NBD exports: only site and NBD client certificates may (rebound site token NAME --nbd, then rebound nbd-cert NAME)", id.Name, id.Role)
		}
		if rev != nil && rev.Revoked(leaf) {
			return fmt.Errorf("certificate of %q (serial %s) is revoked", id.Name, pki.Serial(leaf))
		}
		return nil
	}
	if mode == nbdTLSOn {
		require = func(a net.Addr) bool { _, ok := a.(*net.TCPAddr); return ok }
	}
	if mode == nbdTLSOn || !loopbackAddr(cfg.NBDAddr) {
		dir := filepath.Join(cfg.DataDir, "tls", "nbd-client")
		if err := nbd.WriteClientDir(dir, certPEM, keyPEM, caPEM); err != nil {
			return nil, nil, nil, fmt.Errorf("write NBD TLS credentials: %w", err)
		}
		creds = &qemu.NBDTLS{Dir: dir, Hostname: cfg.Name}
	}
	return conf, require, creds, nil
}

// nbdTLSMode checks a --nbd-tls value; empty is auto.
func nbdTLSMode(mode string) (string, error) {
	switch mode {
	case "":
		return nbdTLSAuto, nil
	case nbdTLSAuto, nbdTLSOn, nbdTLSOff:
		return mode, nil
	}
	return "", rebound.Errorf(rebound.EINVALID, "--nbd-tls %q: use auto (TLS required off loopback), on (required on every TCP connection) or off (plain NBD)", mode)
}

// loopbackAddr reports whether a listen address is on loopback only (a
// wildcard or an interface address is not).
func loopbackAddr(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
