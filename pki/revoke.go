package pki

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"sort"
	"sync"
)

// Serial is how revocation lists name a certificate: its serial number in
// lowercase hex.
func Serial(cert *x509.Certificate) string { return cert.SerialNumber.Text(16) }

// Revocations is a set of revoked certificate serials, checked on every
// handshake of the TLS configs it is applied to (Apply). The server keeps
// the list in its store and pushes it to the sites over the control
// channel; Set replaces it as a push arrives, and connections opened after
// that are checked against the new list.
type Revocations struct {
	// OnRefuse, if set, hears of every handshake refused because the peer's
	// certificate is revoked (called on the handshake's goroutine).
	OnRefuse func(peer Identity, serial string)

	mu      sync.RWMutex
	serials map[string]bool
}

// Set replaces the list.
func (r *Revocations) Set(serials []string) {
	m := make(map[string]bool, len(serials))
	for _, s := range serials {
		m[s] = true
	}
	r.mu.Lock()
	r.serials = m
	r.mu.Unlock()
}

// List returns the revoked serials, sorted.
func (r *Revocations) List() []string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make([]string, 0, len(r.serials))
	for s := range r.serials {
		out = append(out, s)
	}
	sort.Strings(out)
	return out
}

// Revoked reports whether cert is on the list.
func (r *Revocations) Revoked(cert *x509.Certificate) bool {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.serials[Serial(cert)]
}

// Check refuses a connection whose peer shows a revoked certificate.
// A peer without a certificate passes (the config decides whether one is
// needed).
func (r *Revocations) Check(cs tls.ConnectionState) error {
	if len(cs.PeerCertificates) == 0 {
		return nil
	}
	leaf := cs.PeerCertificates[0]
	if !r.Revoked(leaf) {
		return nil
	}
	id := IdentityOf(leaf)
	if r.OnRefuse != nil {
		r.OnRefuse(id, Serial(leaf))
	}
	return fmt.Errorf("certificate of %q (serial %s) is revoked", id.Name, Serial(leaf))
}

// Apply makes conf check r on every handshake, after the chain is verified
// and after any VerifyConnection conf already has.
func (r *Revocations) Apply(conf *tls.Config) {
	prev := conf.VerifyConnection
	conf.VerifyConnection = func(cs tls.ConnectionState) error {
		if prev != nil {
			if err := prev(cs); err != nil {
				return err
			}
		}
		return r.Check(cs)
	}
}
