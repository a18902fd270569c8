package server

import (
	"context"
	"crypto/x509"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/pki"
)

// Enrolment, rotation, removal and the revocation list. The store records
// every certificate the CA issues (sqlite certs); removing a site or
// rotating its certificate revokes them by serial, and the list is checked
// on every handshake by the server's listener (Revocations) and by every
// site's replication listener and dialer (pushed over the control channel).
// See docs/design/security.md, "Removal and revocation".

var _ rebound.SiteAdminService = (*Server)(nil)

// pushTimeout bounds how long a change of the revocation list waits for
// the connected sites to take it.
const pushTimeout = 30 * time.Second

func (s *Server) loadRevocations(ctx context.Context) error {
	if s.Revocations == nil {
		s.Revocations = &pki.Revocations{}
	}
	list, err := s.DB.RevokedSerials(ctx)
	if err != nil {
		return err
	}
	s.Revocations.Set(list)
	return nil
}

// RevocationList returns the revoked serials (what every site gets as it
// connects).
func (s *Server) RevocationList() []string {
	if s.Revocations == nil {
		return []string{}
	}
	return s.Revocations.List()
}

// revoked takes serials revoked in the store into the list and hands it
// to the connected sites; channels opened with a revoked certificate
// close.
func (s *Server) revoked(ctx context.Context, serials []string) {
	if len(serials) == 0 {
		return
	}
	if err := s.loadRevocations(ctx); err != nil {
		s.Logger.Error("reload revocation list", "err", err)
		return
	}
	if s.PushRevocations == nil {
		return
	}
	pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), pushTimeout)
	defer cancel()
	if err := s.PushRevocations(pctx, s.RevocationList()); err != nil {
		s.Logger.Warn("revocation list not delivered to every site; they get it when they reconnect", "err", err)
	}
}

// enrolled reports whether name has a certificate not revoked, or has
// reported (a site enrolled before certificates were recorded).
func (s *Server) enrolled(ctx context.Context, name string) (bool, error) {
	certs, err := s.DB.Certs(ctx, name)
	if err != nil {
		return false, err
	}
	for _, c := range certs {
		if c.RevokedAt.IsZero() {
			return true, nil
		}
	}
	if _, err := s.getSite(ctx, name); err == nil {
		return true, nil
	} else if rebound.ErrorCode(err) != rebound.ENOTFOUND {
		return false, err
	}
	return false, nil
}

// CreateJoinToken returns a one-time token site enrolls with, as a site or
// (req.Agent) as the agent of the machine of that name. A name already
// enrolled needs req.Rotate: its certificate is then revoked once the new
// one connects.
func (s *Server) CreateJoinToken(ctx context.Context, site string, req rebound.JoinTokenRequest) (string, error) {
	if err := validName(site); err != nil {
		return "", err
	}
	role, flag := pki.RoleSite, ""
	switch {
	case req.Agent && req.NBD:
		return "", rebound.Errorf(rebound.EINVALID, "a join token is for an agent or an NBD client, not both: drop --agent or --nbd")
	case req.Agent:
		role, flag = pki.RoleAgent, " --agent"
	case req.NBD:
		role, flag = pki.RoleNBD, " --nbd"
	}
	enrolled, err := s.enrolled(ctx, site)
	if err != nil {
		return "", err
	}
	if enrolled && !req.Rotate {
		return "", rebound.Errorf(rebound.ECONFLICT, "%s is already enrolled: a second certificate would let two processes claim it. "+
			"To replace its certificate (a new host or a lost key), run rebound site token %s%s --rotate; to drop the site, rebound site remove %s", site, site, flag, site)
	}
	secret, err := s.DB.CreateJoinToken(ctx, site, string(role), req.Rotate, time.Hour)
	if err != nil {
		return "", err
	}
	what := "one-time enrollment token created for " + string(role) + " " + site
	if req.Rotate && enrolled {
		what += "; its current certificate is revoked when the new one connects"
	}
	s.event("", site, "site.token", what)
	return pki.FormatJoinToken(secret, s.CAFingerprint), nil
}

// Enroll consumes a join token for site and records the certificate
// (serial) issued to it; a token minted for the other role is refused
// (grpc.EnrollServer's Validate).
func (s *Server) Enroll(ctx context.Context, secret, site string, role pki.Role, serial string) error {
	if err := s.DB.Enroll(ctx, secret, site, string(role), serial); err != nil {
		if rebound.ErrorCode(err) == rebound.EUNAUTHORIZED {
			s.event("", site, "site.enroll-refused", fmt.Sprintf("enrollment of %s %s refused: %s", role, site, rebound.ErrorMessage(err)))
		}
		return err
	}
	s.event("", site, "site.enrolled", fmt.Sprintf("%s %s enrolled (certificate serial %s)", role, site, serial))
	return nil
}

// AdmitSite is called as a site opens its control channel with cert
// (grpc.ControlServer's Admit). A revoked certificate is refused (the
// listener refuses it already; this covers a list changed since the
// handshake). The first use of a rotated certificate revokes the site's
// others, and its channel replaces theirs.
func (s *Server) AdmitSite(name string, cert *x509.Certificate) (replace bool, err error) {
	ctx := s.ctx
	if s.Revocations != nil && s.Revocations.Revoked(cert) {
		return false, rebound.Errorf(rebound.EUNAUTHORIZED, "the certificate of %s (serial %s) is revoked", name, pki.Serial(cert))
	}
	id := pki.IdentityOf(cert)
	revoked, err := s.DB.CertUsed(ctx, pki.Serial(cert), name, string(id.Role))
	if err != nil {
		// The site is let in: its live status must not wait for the
		// store (a full disk). A rotation is finished at its next
		// connection, as its first use was not recorded.
		s.Logger.Warn("record certificate use", "site", name, "serial", pki.Serial(cert), "err", err)
		return false, nil
	}
	s.mu.Lock()
	delete(s.removed, name)
	s.mu.Unlock()
	if len(revoked) > 0 {
		s.event("", name, "site.rotated", fmt.Sprintf("%s connected with its new certificate (serial %s); revoked its old one(s): %s", name, pki.Serial(cert), strings.Join(revoked, ", ")))
		s.revoked(ctx, revoked)
		return true, nil
	}
	return false, nil
}

// RemoveSite revokes the site's certificates, closes its control channel,
// hands the new revocation list to the other sites and forgets the site.
// A site that still holds machines is refused unless force.
func (s *Server) RemoveSite(ctx context.Context, name string, force bool) (*rebound.SiteRemoval, error) {
	if err := validName(name); err != nil {
		return nil, err
	}
	certs, err := s.DB.Certs(ctx, name)
	if err != nil {
		return nil, err
	}
	_, siteErr := s.getSite(ctx, name)
	if siteErr != nil && rebound.ErrorCode(siteErr) != rebound.ENOTFOUND {
		return nil, siteErr
	}
	pending, err := s.DB.PendingTokens(ctx)
	if err != nil {
		return nil, err
	}
	known := siteErr == nil || len(certs) > 0 || contains(pending, name)
	if !known {
		return nil, rebound.Errorf(rebound.ENOTFOUND, "site %q not found; list the sites with rebound site list", name)
	}
	ms, err := s.DB.ListMachines(ctx)
	if err != nil {
		return nil, err
	}
	var held []string
	for i := range ms {
		if roles := siteRoles(&ms[i], name); len(roles) > 0 {
			held = append(held, fmt.Sprintf("%s (%s)", ms[i].Name, strings.Join(roles, ",")))
		}
	}
	if len(held) > 0 && !force {
		return nil, rebound.Errorf(rebound.ECONFLICT, "site %s still holds %s %s: unprotect, fail over or delete them first (rebound unprotect MACHINE, rebound machine delete MACHINE), or remove it anyway with rebound site remove %s --force",
			name, plural(len(held), "machine", "machines"), strings.Join(held, ", "), name)
	}
	s.mu.Lock()
	if s.removed == nil {
		s.removed = map[string]bool{}
	}
	s.removed[name] = true
	s.mu.Unlock()
	revoked, err := s.DB.RevokeSite(ctx, name, "removed")
	if err != nil {
		return nil, err
	}
	s.revoked(ctx, revoked)
	s.live.dropSite(name)
	if err := s.DB.DeleteSite(ctx, name); err != nil {
		return nil, err
	}
	s.metrics.siteUp.DeleteLabelValues(name)
	msg := fmt.Sprintf("site %s removed; certificates revoked: %s", name, noneIfEmpty(revoked))
	if len(held) > 0 {
		msg += "; machines still naming it (forced): " + strings.Join(held, ", ")
	}
	s.event("", name, "site.removed", msg)
	if revoked == nil {
		revoked = []string{}
	}
	out := &rebound.SiteRemoval{Site: name, Revoked: revoked}
	for i := range ms {
		if len(siteRoles(&ms[i], name)) > 0 {
			out.Machines = append(out.Machines, ms[i].Name)
		}
	}
	return out, nil
}

// forgetRemovedSites drops what this server holds in memory of the sites
// removed through another server (rebound site remove): a site whose row
// this server stored is gone from the store, or every certificate it was
// issued is revoked. From then on its late reports are dropped, as on the
// server that removed it, and a row such a report stored again meanwhile
// is deleted. The watchdog calls it every 5 s with the stored sites, and
// returns those left.
func (s *Server) forgetRemovedSites(ctx context.Context, stored []rebound.Site) []rebound.Site {
	inStore := map[string]bool{}
	for _, st := range stored {
		inStore[st.Name] = true
	}
	var gone map[string]bool
	for name, wasStored := range s.live.siteNames() {
		removed := !inStore[name] && wasStored
		if !removed {
			certs, err := s.DB.Certs(ctx, name)
			if err != nil {
				continue
			}
			removed = len(certs) > 0
			for _, c := range certs {
				if c.RevokedAt.IsZero() {
					removed = false
				}
			}
		}
		if !removed {
			continue
		}
		s.mu.Lock()
		if s.removed == nil {
			s.removed = map[string]bool{}
		}
		s.removed[name] = true
		s.mu.Unlock()
		s.live.dropSite(name)
		s.metrics.siteUp.DeleteLabelValues(name)
		if inStore[name] {
			// A report raced the removal and stored the site again.
			if err := s.DB.DeleteSite(ctx, name); err != nil && rebound.ErrorCode(err) != rebound.ENOTFOUND {
				s.Logger.Warn("delete removed site", "site", name, "err", err)
			}
		}
		if gone == nil {
			gone = map[string]bool{}
		}
		gone[name] = true
		s.Logger.Info("site removed through another server: forgotten", "site", name)
	}
	if gone == nil {
		return stored
	}
	out := stored[:0:0]
	for _, st := range stored {
		if !gone[st.Name] {
			out = append(out, st)
		}
	}
	return out
}

// listEnrolledSites returns the sites that reported, then those that
// never did: enrolled (a certificate not revoked) or invited (a join token
// not used yet).
func (s *Server) listEnrolledSites(ctx context.Context) ([]rebound.Site, error) {
	sites, err := s.listSites(ctx)
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	for _, st := range sites {
		seen[st.Name] = true
	}
	certs, err := s.DB.Certs(ctx, "")
	if err != nil {
		return nil, err
	}
	for _, c := range certs {
		if !seen[c.Site] && c.RevokedAt.IsZero() {
			seen[c.Site] = true
			sites = append(sites, rebound.Site{Name: c.Site, Status: rebound.SiteEnrolled})
		}
	}
	pending, err := s.DB.PendingTokens(ctx)
	if err != nil {
		return nil, err
	}
	for _, name := range pending {
		if !seen[name] {
			seen[name] = true
			sites = append(sites, rebound.Site{Name: name, Status: rebound.SiteInvited})
		}
	}
	sort.SliceStable(sites, func(i, j int) bool { return sites[i].Name < sites[j].Name })
	return sites, nil
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

func noneIfEmpty(list []string) string {
	if len(list) == 0 {
		return "none"
	}
	return strings.Join(list, ", ")
}

// refusedEvery bounds how often handshakes refused for the same revoked
// certificate are reported.
const refusedEvery = time.Minute

// RevokedRefused reports a handshake the server's listener refused
// because the peer's certificate is revoked (pki.Revocations.OnRefuse).
func (s *Server) RevokedRefused(peer pki.Identity, serial string) {
	now := time.Now()
	s.mu.Lock()
	if s.refusedAt == nil {
		s.refusedAt = map[string]time.Time{}
	}
	last, seen := s.refusedAt[serial]
	report := !seen || now.Sub(last) >= refusedEvery
	if report {
		s.refusedAt[serial] = now
	}
	s.mu.Unlock()
	s.Logger.Warn("refused a connection with a revoked certificate", "site", peer.Name, "serial", serial)
	if report {
		s.event("", peer.Name, "site.revoked-refused", fmt.Sprintf("refused a connection from %s: its certificate (serial %s) is revoked (the site was removed, or its certificate replaced with --rotate)", peer.Name, serial))
	}
}

// dropSite forgets a removed site's live status.
func (l *live) dropSite(name string) {
	l.mu.Lock()
	delete(l.sites, name)
	delete(l.siteAt, name)
	l.mu.Unlock()
}

// unreportedSite is the detail of a site that never reported (enrolled or
// invited), or nil.
func (s *Server) unreportedSite(ctx context.Context, name string) *rebound.SiteDetail {
	sites, err := s.listEnrolledSites(ctx)
	if err != nil {
		return nil
	}
	for _, st := range sites {
		if st.Name == name && (st.Status == rebound.SiteEnrolled || st.Status == rebound.SiteInvited) {
			reason := "enrolled, it has never connected: start it (rebound site --name " + name + " ...)"
			if st.Status == rebound.SiteInvited {
				reason = "a join token was minted and not used yet: start the site with it"
			}
			return &rebound.SiteDetail{Site: st, Health: rebound.HealthWarning, HealthReason: reason, Machines: []rebound.SiteMachineRole{}}
		}
	}
	return nil
}
