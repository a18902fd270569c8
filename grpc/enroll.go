package grpc

import (
	"context"
	"errors"
	"fmt"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/grpc/pb"
	"github.com/rebound-dr/rebound/pki"
	ggrpc "google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// EnrollFunc validates and consumes the one-time token secret a site
// enrolls with as name, for a certificate of role whose serial
// (pki.Serial) it records. It returns a rebound error (EUNAUTHORIZED for a
// bad, used or expired token, or one minted for another role) the site's
// operator will read; the certificate is then never handed out.
type EnrollFunc func(ctx context.Context, secret, name string, role pki.Role, serial string) error

// EnrollServer signs the certificate requests of enrolling sites.
type EnrollServer struct {
	CA       *pki.CA
	Validate EnrollFunc

	pb.UnimplementedEnrollmentServer
}

// Register adds the Enrollment service to s.
func (e *EnrollServer) Register(s *ggrpc.Server) { pb.RegisterEnrollmentServer(s, e) }

func (e *EnrollServer) Enroll(ctx context.Context, req *pb.EnrollRequest) (*pb.EnrollResponse, error) {
	if err := checkVersion("enroll", req.Version); err != nil {
		return nil, err
	}
	if req.SiteName == "" {
		return nil, status.Error(codes.InvalidArgument, "enroll: site name is empty")
	}
	// An agent's certificate is bound to its one machine, named like it.
	agent, role, usage := "", pki.RoleSite, pki.Site
	switch pki.Role(req.Role) {
	case "", pki.RoleSite:
	case pki.RoleAgent:
		agent, role = req.SiteName, pki.RoleAgent
	case pki.RoleNBD:
		role, usage = pki.RoleNBD, pki.NBDClient
	default:
		return nil, status.Errorf(codes.InvalidArgument, "enroll: unknown role %q (site, agent or nbd)", req.Role)
	}
	// Signed first so the token's use and the serial are recorded
	// together; a refused token leaves the certificate unsent.
	certPEM, err := e.CA.SignCSRAs(req.CsrPem, req.SiteName, usage, agent)
	if err != nil {
		return nil, toStatus(err)
	}
	cert, err := pki.ParseCert(certPEM)
	if err != nil {
		return nil, toStatus(err)
	}
	if err := e.Validate(ctx, req.TokenSecret, req.SiteName, role, pki.Serial(cert)); err != nil {
		return nil, toStatus(err)
	}
	return &pb.EnrollResponse{CertPem: certPEM, CaPem: e.CA.CertPEM()}, nil
}

// Enroll enrolls this site as siteName with the server at addr using a join
// token (rbd1.<secret>.<ca-fingerprint>). The server is trusted through the
// token's CA fingerprint. It returns the site's certificate, its new private
// key and the CA certificate.
func Enroll(ctx context.Context, addr, joinToken, siteName string) (certPEM, keyPEM, caPEM []byte, err error) {
	return EnrollAs(ctx, addr, joinToken, siteName, pki.RoleSite)
}

// EnrollAs is Enroll with a role: pki.RoleAgent for `rebound agent`, whose
// certificate the server binds to its machine (named siteName).
func EnrollAs(ctx context.Context, addr, joinToken, siteName string, role pki.Role) (certPEM, keyPEM, caPEM []byte, err error) {
	secret, fp, err := pki.ParseJoinToken(joinToken)
	if err != nil {
		return nil, nil, nil, err
	}
	keyPEM, csrPEM, err := pki.NewKeyAndCSR(siteName)
	if err != nil {
		return nil, nil, nil, err
	}
	cc, err := Dial(addr, pki.PinnedTLS(fp))
	if err != nil {
		return nil, nil, nil, rebound.Errorf(rebound.EINVALID, "enroll: server address %q: %v", addr, err)
	}
	defer cc.Close()
	resp, err := pb.NewEnrollmentClient(cc).Enroll(ctx, &pb.EnrollRequest{
		Version:     ProtocolVersion,
		SiteName:    siteName,
		TokenSecret: secret,
		CsrPem:      csrPEM,
		Role:        string(role),
	})
	if err != nil {
		return nil, nil, nil, fromStatus("enroll at "+addr, err)
	}
	// The pinned handshake already proved the server holds the CA; check the
	// answer is consistent with it before storing anything.
	if got, err := pki.Fingerprint(resp.CaPem); err != nil || got != fp {
		return nil, nil, nil, rebound.Errorf(rebound.EINTERNAL, "enroll: server returned a CA that does not match the join token")
	}
	cert, err := pki.ParseCert(resp.CertPem)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("enroll: certificate: %w", err)
	}
	ca, _ := pki.ParseCert(resp.CaPem)
	if err := cert.CheckSignatureFrom(ca); err != nil || cert.Subject.CommonName != siteName {
		return nil, nil, nil, rebound.Errorf(rebound.EINTERNAL, "enroll: server returned a certificate for %q not signed by its CA", cert.Subject.CommonName)
	}
	if got := pki.IdentityOf(cert).Role; got != role {
		return nil, nil, nil, rebound.Errorf(rebound.EINTERNAL, "enroll: asked for a %s certificate, the server issued one with role %q; upgrade the server", role, got)
	}
	return resp.CertPem, keyPEM, resp.CaPem, nil
}

// EnrollAny is EnrollAs with the servers of one control plane: it enrolls
// with the first in addrs that answers, and moves to the next only when
// one cannot be reached (refused, timed out, TLS handshake failed). An
// answer (a refused token) is final: the servers share the token store.
func EnrollAny(ctx context.Context, addrs []string, joinToken, siteName string, role pki.Role) (certPEM, keyPEM, caPEM []byte, err error) {
	if len(addrs) == 0 {
		return nil, nil, nil, rebound.Errorf(rebound.EINVALID, "enroll: no server address (--server-addr)")
	}
	var errs []error
	for _, addr := range addrs {
		certPEM, keyPEM, caPEM, err = EnrollAs(ctx, addr, joinToken, siteName, role)
		if err == nil || rebound.ErrorCode(err) != rebound.EUNAVAILABLE || ctx.Err() != nil {
			return certPEM, keyPEM, caPEM, err
		}
		errs = append(errs, err)
	}
	if len(errs) == 1 {
		return nil, nil, nil, errs[0]
	}
	return nil, nil, nil, rebound.Errorf(rebound.EUNAVAILABLE, "enroll: no server answered: %v", errors.Join(errs...))
}
