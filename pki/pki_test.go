package pki_test

import (
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/pki"
)

func TestCA_LoadOrCreate(t *testing.T) {
	dir := t.TempDir()
	ca, err := pki.LoadOrCreateCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, "ca.key"))
	if err != nil {
		t.Fatal(err)
	} else if fi.Mode().Perm() != 0o600 {
		t.Fatalf("ca.key mode %v, want 0600", fi.Mode().Perm())
	}
	again, err := pki.LoadOrCreateCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	if ca.Fingerprint() != again.Fingerprint() {
		t.Fatal("reloaded CA has another fingerprint")
	}
	if fp, _ := pki.Fingerprint(ca.CertPEM()); fp != ca.Fingerprint() || len(fp) != 64 {
		t.Fatalf("fingerprint %q", fp)
	}
	other, err := pki.LoadOrCreateCA(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if other.Fingerprint() == ca.Fingerprint() {
		t.Fatal("two CAs share a fingerprint")
	}

	// A key that does not belong to the certificate is refused.
	otherDir := t.TempDir()
	if _, err := pki.LoadOrCreateCA(otherDir); err != nil {
		t.Fatal(err)
	}
	key, _ := os.ReadFile(filepath.Join(otherDir, "ca.key"))
	os.WriteFile(filepath.Join(dir, "ca.key"), key, 0o600)
	if _, err := pki.LoadOrCreateCA(dir); err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Fatalf("mismatched key: %v", err)
	}
	os.Remove(filepath.Join(dir, "ca.key"))
	if _, err := pki.LoadOrCreateCA(dir); err == nil {
		t.Fatal("loaded a CA without its key")
	}
}

func TestCA_IssueVerify(t *testing.T) {
	ca := newCA(t)
	other := newCA(t)
	certPEM, _, err := ca.Issue("site-a", []string{"127.0.0.1", "site-a.example"}, pki.Site)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := pki.ParseCert(certPEM)
	if err != nil {
		t.Fatal(err)
	}
	for _, u := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := cert.Verify(x509.VerifyOptions{Roots: ca.Pool(), DNSName: "site-a", KeyUsages: []x509.ExtKeyUsage{u}}); err != nil {
			t.Fatalf("verify usage %v: %v", u, err)
		}
	}
	if err := cert.VerifyHostname("127.0.0.1"); err != nil {
		t.Fatal(err)
	}
	if !pki.IsSite(cert) {
		t.Fatal("site cert not marked as site")
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: other.Pool()}); err == nil {
		t.Fatal("verified against another CA")
	}

	srvPEM, _, err := ca.Issue("server", nil, pki.ServerAuth)
	if err != nil {
		t.Fatal(err)
	}
	srv, _ := pki.ParseCert(srvPEM)
	if pki.IsSite(srv) {
		t.Fatal("server cert marked as site")
	}
	if _, err := srv.Verify(x509.VerifyOptions{Roots: ca.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err == nil {
		t.Fatal("server-only cert verified for client auth")
	}
}

func TestCA_SignCSRForcesCN(t *testing.T) {
	ca := newCA(t)
	_, csr, err := pki.NewKeyAndCSR("evil-admin")
	if err != nil {
		t.Fatal(err)
	}
	certPEM, err := ca.SignCSR(csr, "site-b", pki.Site)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := pki.ParseCert(certPEM)
	if cert.Subject.CommonName != "site-b" || len(cert.DNSNames) != 1 || cert.DNSNames[0] != "site-b" {
		t.Fatalf("CN %q DNS %v, want site-b", cert.Subject.CommonName, cert.DNSNames)
	}
	if _, err := ca.SignCSR([]byte("garbage"), "x", pki.Site); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("garbage CSR: %v", err)
	}
}

func TestJoinToken(t *testing.T) {
	ca := newCA(t)
	tok := pki.FormatJoinToken("s3cret", ca.Fingerprint())
	if !strings.HasPrefix(tok, "rbd1.") {
		t.Fatal(tok)
	}
	secret, fp, err := pki.ParseJoinToken(tok)
	if err != nil || secret != "s3cret" || fp != ca.Fingerprint() {
		t.Fatalf("%q %q %v", secret, fp, err)
	}
	for _, bad := range []string{"", "rbd1.x", "rbd2.s." + ca.Fingerprint(), "rbd1..x" + ca.Fingerprint(), "rbd1.s.abcd", "rbd1.s." + ca.Fingerprint() + ".x"} {
		if _, _, err := pki.ParseJoinToken(bad); rebound.ErrorCode(err) != rebound.EINVALID {
			t.Errorf("%q: %v", bad, err)
		}
	}
}

func TestTLS_PinnedAndMutual(t *testing.T) {
	ca := newCA(t)
	other := newCA(t)
	srvCert, srvKey, _ := ca.Issue("server", []string{"127.0.0.1"}, pki.ServerAuth)
	srvConf, err := pki.ServerTLS(srvCert, srvKey, ca.CertPEM(), false)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", srvConf)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	names := make(chan string, 10)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			tc := c.(*tls.Conn)
			if tc.Handshake() == nil {
				n, _ := pki.PeerName(tc.ConnectionState())
				names <- n
			}
			tc.Close()
		}
	}()
	dial := func(conf *tls.Config) error {
		c, err := tls.Dial("tcp", ln.Addr().String(), conf)
		if err != nil {
			return err
		}
		defer c.Close()
		return c.Handshake()
	}

	if err := dial(pki.PinnedTLS(ca.Fingerprint())); err != nil {
		t.Fatalf("pinned to the right CA: %v", err)
	}
	if n := <-names; n != "" {
		t.Fatalf("anonymous peer name %q", n)
	}
	if err := dial(pki.PinnedTLS(other.Fingerprint())); err == nil {
		t.Fatal("pinned to another CA: handshake succeeded")
	}

	siteCert, siteKey, _ := ca.Issue("site-a", nil, pki.Site)
	cli, err := pki.ClientTLS(siteCert, siteKey, ca.CertPEM(), "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	if err := dial(cli); err != nil {
		t.Fatal(err)
	}
	if n := <-names; n != "site-a" {
		t.Fatalf("peer name %q, want site-a", n)
	}
	// A server requiring client certs refuses a client without one.
	reqConf, _ := pki.ServerTLS(srvCert, srvKey, ca.CertPEM(), true)
	ln2, err := tls.Listen("tcp", "127.0.0.1:0", reqConf)
	if err != nil {
		t.Fatal(err)
	}
	defer ln2.Close()
	go func() {
		for {
			c, err := ln2.Accept()
			if err != nil {
				return
			}
			c.(*tls.Conn).Handshake()
			c.Close()
		}
	}()
	anon, _ := pki.ClientTLS(nil, nil, ca.CertPEM(), "127.0.0.1")
	c, err := tls.Dial("tcp", ln2.Addr().String(), anon)
	if err == nil {
		// TLS 1.3: the client learns of the refusal on its first read.
		_, err = c.Read(make([]byte, 1))
		c.Close()
	}
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("anonymous client to a cert-requiring server: %v", err)
	}

	// A client trusting another CA refuses the server.
	cli2, _ := pki.ClientTLS(nil, nil, other.CertPEM(), "127.0.0.1")
	if err := dial(cli2); err == nil {
		t.Fatal("client trusting another CA connected")
	}
}

func newCA(t *testing.T) *pki.CA {
	t.Helper()
	ca, err := pki.LoadOrCreateCA(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func TestCA_AgentIdentity(t *testing.T) {
	ca := newCA(t)
	keyPEM, csrPEM, err := pki.NewKeyAndCSR("srv1")
	if err != nil || keyPEM == nil {
		t.Fatal(err)
	}
	agentPEM, err := ca.SignCSRAs(csrPEM, "srv1", pki.Site, "srv1")
	if err != nil {
		t.Fatal(err)
	}
	agent, _ := pki.ParseCert(agentPEM)
	if id := pki.IdentityOf(agent); id != (pki.Identity{Name: "srv1", Role: pki.RoleAgent, Machine: "srv1"}) {
		t.Fatalf("agent identity %+v", id)
	}
	if pki.IsSite(agent) {
		t.Fatal("agent certificate passes as a site's")
	}
	// An agent still serves (a failback lands at its site) and dials.
	for _, u := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := agent.Verify(x509.VerifyOptions{Roots: ca.Pool(), DNSName: "srv1", KeyUsages: []x509.ExtKeyUsage{u}}); err != nil {
			t.Fatalf("verify usage %v: %v", u, err)
		}
	}
	sitePEM, err := ca.SignCSR(csrPEM, "site-a", pki.Site)
	if err != nil {
		t.Fatal(err)
	}
	site, _ := pki.ParseCert(sitePEM)
	if id := pki.IdentityOf(site); id != (pki.Identity{Name: "site-a", Role: pki.RoleSite}) {
		t.Fatalf("site identity %+v", id)
	}
	srvPEM, _, err := ca.Issue("server", nil, pki.ServerAuth)
	if err != nil {
		t.Fatal(err)
	}
	srv, _ := pki.ParseCert(srvPEM)
	if id := pki.IdentityOf(srv); id.Role != "" {
		t.Fatalf("server certificate has role %q", id.Role)
	}
	if _, err := ca.SignCSRAs(csrPEM, "x", pki.Site, "bad name/with space"); err == nil {
		t.Fatal("machine name that does not survive a URI was bound")
	}
}

// TestCA_NBDClientIdentity: an NBD client certificate carries its own role
// and client authentication only; it cannot also be a server.
func TestCA_NBDClientIdentity(t *testing.T) {
	ca, err := pki.LoadOrCreateCA(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	certPEM, _, err := ca.Issue("hv1", nil, pki.NBDClient)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := pki.ParseCert(certPEM)
	if err != nil {
		t.Fatal(err)
	}
	if id := pki.IdentityOf(cert); id != (pki.Identity{Name: "hv1", Role: pki.RoleNBD}) {
		t.Fatalf("identity %+v", id)
	}
	if pki.IsSite(cert) {
		t.Fatal("an NBD client certificate passes as a site's")
	}
	if len(cert.ExtKeyUsage) != 1 || cert.ExtKeyUsage[0] != x509.ExtKeyUsageClientAuth {
		t.Fatalf("usages %v", cert.ExtKeyUsage)
	}
	if _, _, err := ca.Issue("hv1", nil, pki.NBDClient|pki.ServerAuth); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("NBD client with server auth: %v", err)
	}
}
