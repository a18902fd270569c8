// Package pki is Rebound's small private CA: the server holds it, sites get
// their certificates from it at enrollment, and every gRPC connection is
// mutual TLS rooted in it.
package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/fsutil"
)

// Usage says what a certificate may be used for.
type Usage int

const (
	ServerAuth Usage = 1 << iota
	ClientAuth
	nbdOnly
)

// NBDClient is the usage of a certificate for an NBD client on another
// host (qemu, nbdinfo): it authenticates to sites' NBD exports and to
// nothing else, so a hypervisor's key cannot pose as a site.
const NBDClient = ClientAuth | nbdOnly

// Site is the usage of a site certificate: sites serve replication and
// connect to the server and to other sites. Certificates issued with both
// usages are marked as site certificates (see IsSite).
const Site = ServerAuth | ClientAuth

// siteOU marks site certificates so a site can tell a peer site from the
// server or an agent; agentOU marks agent certificates, whose machine is
// bound by a URI SAN rebound:machine=NAME (machineURIPrefix).
const (
	siteOU           = "rebound-site"
	agentOU          = "rebound-agent"
	nbdOU            = "rebound-nbd"
	machineURIPrefix = "rebound:machine="
)

// Role is what a certificate's holder is to the other parties.
type Role string

const (
	// RoleSite is a site appliance: it may hold any machine the server
	// assigns to it.
	RoleSite Role = "site"
	// RoleAgent is the agent of one Linux server: it may hold and feed only
	// its own machine (Identity.Machine).
	RoleAgent Role = "agent"
	// RoleNBD is an NBD client on another host: sites' NBD exports take
	// it, the control and replication channels refuse it.
	RoleNBD Role = "nbd"
)

// Identity is who a verified certificate names.
type Identity struct {
	Name string // the common name: the site's (or agent's) name
	Role Role   // "" for a certificate that is neither (the server's)
	// Machine is the one machine an agent certificate is bound to.
	Machine string
}

// IdentityOf reads a certificate's identity. An agent certificate without
// exactly one machine binding has no role: it is refused everywhere.
func IdentityOf(cert *x509.Certificate) Identity {
	id := Identity{Name: cert.Subject.CommonName}
	var machines []string
	for _, u := range cert.URIs {
		if s := u.String(); strings.HasPrefix(s, machineURIPrefix) {
			machines = append(machines, strings.TrimPrefix(s, machineURIPrefix))
		}
	}
	// Exactly one mark: a certificate claiming both roles gets neither.
	if ous := cert.Subject.OrganizationalUnit; len(ous) == 1 {
		switch {
		case ous[0] == siteOU && len(machines) == 0:
			id.Role = RoleSite
		case ous[0] == agentOU && len(machines) == 1 && machines[0] != "":
			id.Role, id.Machine = RoleAgent, machines[0]
		case ous[0] == nbdOU && len(machines) == 0:
			id.Role = RoleNBD
		}
	}
	return id
}

const (
	caValidity   = 10 * 365 * 24 * time.Hour
	leafValidity = 5 * 365 * 24 * time.Hour
)

// CA is a certificate authority held in a directory as ca.crt and ca.key.
type CA struct {
	cert    *x509.Certificate
	certPEM []byte
	key     *ecdsa.PrivateKey
}

// LoadOrCreateCA loads the CA from dir, creating a new ECDSA P-256 CA valid
// for 10 years when dir holds none. The key file is written 0600.
func LoadOrCreateCA(dir string) (*CA, error) {
	certPath, keyPath := filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key")
	certPEM, err := os.ReadFile(certPath)
	if err == nil {
		keyPEM, err := os.ReadFile(keyPath)
		if err != nil {
			return nil, fmt.Errorf("read CA key: %w", err)
		}
		return parseCA(certPEM, keyPEM)
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("read CA certificate: %w", err)
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "Rebound CA", Organization: []string{"Rebound"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(caValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("create CA: %w", err)
	}
	keyPEM, err := encodeKey(key)
	if err != nil {
		return nil, err
	}
	certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	// Key first: a crash between the two writes leaves no ca.crt, so the
	// next start creates a fresh CA instead of loading half of one.
	if err := fsutil.WriteFileAtomic(keyPath, keyPEM, 0o600); err != nil {
		return nil, err
	}
	if err := fsutil.WriteFileAtomic(certPath, certPEM, 0o644); err != nil {
		return nil, err
	}
	return parseCA(certPEM, keyPEM)
}

func parseCA(certPEM, keyPEM []byte) (*CA, error) {
	cert, err := ParseCert(certPEM)
	if err != nil {
		return nil, fmt.Errorf("CA certificate: %w", err)
	}
	if !cert.IsCA {
		return nil, rebound.Errorf(rebound.EINVALID, "CA certificate %q is not a CA", cert.Subject.CommonName)
	}
	key, err := parseKey(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("CA key: %w", err)
	}
	if !key.PublicKey.Equal(cert.PublicKey) {
		return nil, rebound.Errorf(rebound.EINVALID, "CA key does not match CA certificate")
	}
	return &CA{cert: cert, certPEM: certPEM, key: key}, nil
}

// CertPEM returns the CA certificate.
func (ca *CA) CertPEM() []byte { return ca.certPEM }

// Pool returns a pool holding only the CA.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.cert)
	return p
}

// Fingerprint is the hex SHA-256 of the CA certificate's DER; join tokens
// carry it so a site can trust the server before it has the CA.
func (ca *CA) Fingerprint() string { return fingerprint(ca.cert.Raw) }

func fingerprint(der []byte) string {
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}

// Fingerprint returns the hex SHA-256 of a PEM certificate's DER.
func Fingerprint(certPEM []byte) (string, error) {
	c, err := ParseCert(certPEM)
	if err != nil {
		return "", err
	}
	return fingerprint(c.Raw), nil
}

// Issue creates a key and a certificate for commonName. hosts are IP
// addresses or DNS names for the SAN; commonName is added as a DNS name too
// so peers can verify a site by its name.
func (ca *CA) Issue(commonName string, hosts []string, usage Usage) (certPEM, keyPEM []byte, err error) {
	return ca.IssueAs(commonName, hosts, usage, "")
}

// IssueAs is Issue for an agent's certificate: agent binds it to that
// machine (see SignCSRAs). Tests use it; enrolment signs requests.
func (ca *CA) IssueAs(commonName string, hosts []string, usage Usage, agent string) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	certPEM, err = ca.sign(&key.PublicKey, commonName, hosts, usage, agent)
	if err != nil {
		return nil, nil, err
	}
	keyPEM, err = encodeKey(key)
	return certPEM, keyPEM, err
}

// SignCSR signs a PEM certificate request. The subject is forced to
// commonName whatever the request asks for, and so are the SANs: a site
// cannot obtain a name it was not enrolled as.
func (ca *CA) SignCSR(csrPEM []byte, commonName string, usage Usage) ([]byte, error) {
	return ca.SignCSRAs(csrPEM, commonName, usage, "")
}

// SignCSRAs is SignCSR for an agent when agent (its machine) is not empty:
// the certificate carries the agent role (OU rebound-agent) and the URI SAN
// rebound:machine=agent instead of the site role, so it can feed and hold
// only that machine.
func (ca *CA) SignCSRAs(csrPEM []byte, commonName string, usage Usage, agent string) ([]byte, error) {
	block, _ := pem.Decode(csrPEM)
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		return nil, rebound.Errorf(rebound.EINVALID, "certificate request is not PEM")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, rebound.Errorf(rebound.EINVALID, "parse certificate request: %v", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, rebound.Errorf(rebound.EINVALID, "certificate request signature: %v", err)
	}
	return ca.sign(csr.PublicKey, commonName, nil, usage, agent)
}

func (ca *CA) sign(pub any, commonName string, hosts []string, usage Usage, agent string) ([]byte, error) {
	if commonName == "" {
		return nil, rebound.Errorf(rebound.EINVALID, "certificate common name is empty")
	}
	if usage&(ServerAuth|ClientAuth) == 0 {
		return nil, rebound.Errorf(rebound.EINVALID, "certificate usage is empty")
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: commonName, Organization: []string{"Rebound"}},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(leafValidity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		DNSNames:     []string{commonName},
	}
	if usage&ServerAuth != 0 {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
	}
	if usage&ClientAuth != 0 {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
	}
	switch {
	case agent != "":
		u, err := url.Parse(machineURIPrefix + agent)
		if err != nil || u.String() != machineURIPrefix+agent || strings.ContainsAny(agent, " /?#%") {
			return nil, rebound.Errorf(rebound.EINVALID, "agent machine name %q cannot be bound into a certificate", agent)
		}
		tmpl.Subject.OrganizationalUnit = []string{agentOU}
		tmpl.URIs = []*url.URL{u}
	case usage&nbdOnly != 0:
		if usage != NBDClient {
			return nil, rebound.Errorf(rebound.EINVALID, "an NBD client certificate is for client authentication only")
		}
		tmpl.Subject.OrganizationalUnit = []string{nbdOU}
	case usage&Site == Site:
		tmpl.Subject.OrganizationalUnit = []string{siteOU}
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if h != "" && h != commonName {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	if err != nil {
		return nil, fmt.Errorf("sign certificate for %q: %w", commonName, err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), nil
}

// NewKeyAndCSR creates a key and a certificate request for commonName.
func NewKeyAndCSR(commonName string) (keyPEM, csrPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: commonName},
	}, key)
	if err != nil {
		return nil, nil, err
	}
	keyPEM, err = encodeKey(key)
	if err != nil {
		return nil, nil, err
	}
	return keyPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

// IsSite reports whether cert was issued to a site (not to an agent).
func IsSite(cert *x509.Certificate) bool { return IdentityOf(cert).Role == RoleSite }

// PeerName returns the common name of the peer's verified certificate, and
// false when the peer presented none or it was not verified against the CA.
func PeerName(cs tls.ConnectionState) (string, bool) {
	if len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return "", false
	}
	return cs.VerifiedChains[0][0].Subject.CommonName, true
}

// ServerTLS returns a server config. The CA certificate is sent after the
// leaf so an enrolling client can pin it (PinnedTLS). Without
// requireClientCert a client certificate is still verified when given, and
// handlers decide per method (the server's Enroll method needs none).
func ServerTLS(certPEM, keyPEM, caPEM []byte, requireClientCert bool) (*tls.Config, error) {
	pool, caDER, err := caPool(caPEM)
	if err != nil {
		return nil, err
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, rebound.Errorf(rebound.EINVALID, "server key pair: %v", err)
	}
	cert.Certificate = append(cert.Certificate, caDER)
	conf := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientCAs:    pool,
		ClientAuth:   tls.VerifyClientCertIfGiven,
	}
	if requireClientCert {
		conf.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return conf, nil
}

// ClientTLS returns a client config that trusts only the CA and checks the
// server's certificate names serverName (empty: the dialed host). certPEM
// and keyPEM may be nil for a client without a certificate.
func ClientTLS(certPEM, keyPEM, caPEM []byte, serverName string) (*tls.Config, error) {
	pool, _, err := caPool(caPEM)
	if err != nil {
		return nil, err
	}
	conf := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool, ServerName: serverName}
	if certPEM != nil {
		cert, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			return nil, rebound.Errorf(rebound.EINVALID, "client key pair: %v", err)
		}
		conf.Certificates = []tls.Certificate{cert}
	}
	return conf, nil
}

// PinnedTLS returns a client config for enrollment: the server is trusted
// when its chain verifies against the certificate it sent whose SHA-256 is
// caFingerprint. Host names are not checked; the pin replaces them.
func PinnedTLS(caFingerprint string) *tls.Config {
	want := strings.ToLower(caFingerprint)
	return &tls.Config{
		MinVersion:         tls.VersionTLS13,
		InsecureSkipVerify: true, // replaced by VerifyConnection below
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("server sent no certificate")
			}
			var root *x509.Certificate
			for _, c := range cs.PeerCertificates {
				if fingerprint(c.Raw) == want {
					root = c
				}
			}
			if root == nil {
				return fmt.Errorf("server's CA does not match the join token's fingerprint %.16s…", want)
			}
			pool := x509.NewCertPool()
			pool.AddCert(root)
			_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{
				Roots:     pool,
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			})
			if err != nil {
				return fmt.Errorf("server certificate does not chain to the pinned CA: %w", err)
			}
			return nil
		},
	}
}

// ParseCert parses one PEM certificate.
func ParseCert(certPEM []byte) (*x509.Certificate, error) {
	block, _ := pem.Decode(certPEM)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, rebound.Errorf(rebound.EINVALID, "certificate is not PEM")
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, rebound.Errorf(rebound.EINVALID, "parse certificate: %v", err)
	}
	return c, nil
}

func caPool(caPEM []byte) (*x509.CertPool, []byte, error) {
	c, err := ParseCert(caPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("CA: %w", err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(c)
	return pool, c.Raw, nil
}

func encodeKey(key *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

func parseKey(keyPEM []byte) (*ecdsa.PrivateKey, error) {
	block, _ := pem.Decode(keyPEM)
	if block == nil {
		return nil, rebound.Errorf(rebound.EINVALID, "key is not PEM")
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, rebound.Errorf(rebound.EINVALID, "parse key: %v", err)
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, rebound.Errorf(rebound.EINVALID, "key is %T, want ECDSA", k)
	}
	return ek, nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail on supported platforms
	}
	return n
}

// tokenPrefix versions the join token format.
const tokenPrefix = "rbd1"

// FormatJoinToken returns "rbd1.<secret>.<ca-fingerprint>".
func FormatJoinToken(secret, caFingerprint string) string {
	return tokenPrefix + "." + secret + "." + caFingerprint
}

// ParseJoinToken splits a join token into its secret and CA fingerprint.
func ParseJoinToken(s string) (secret, caFingerprint string, err error) {
	parts := strings.Split(strings.TrimSpace(s), ".")
	if len(parts) != 3 || parts[0] != tokenPrefix {
		return "", "", rebound.Errorf(rebound.EINVALID, "join token is not of the form %s.<secret>.<ca-fingerprint>", tokenPrefix)
	}
	if parts[1] == "" {
		return "", "", rebound.Errorf(rebound.EINVALID, "join token has an empty secret")
	}
	fp := strings.ToLower(parts[2])
	if b, err := hex.DecodeString(fp); err != nil || len(b) != sha256.Size {
		return "", "", rebound.Errorf(rebound.EINVALID, "join token's CA fingerprint is not a hex SHA-256")
	}
	return parts[1], fp, nil
}
