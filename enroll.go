package rebound

import "context"

// Site statuses of sites that never reported (ListSites): a join token
// was minted and not used yet, or the site enrolled and never connected.
const (
	SiteInvited  = "invited"
	SiteEnrolled = "enrolled"
)

// JoinTokenRequest says what a join token may enroll.
type JoinTokenRequest struct {
	// Agent: the token enrolls `rebound agent` (a certificate bound to the
	// machine named like the site), not a site; each role's token is
	// refused for the other.
	Agent bool `json:"agent,omitempty"`
	// NBD: the token enrolls `rebound nbd-cert`, an NBD client on another
	// host: a certificate sites' NBD exports take and nothing else does.
	NBD bool `json:"nbd,omitempty"`
	// Rotate replaces an enrolled site's certificate: the old one is
	// revoked when the new one first connects. Without it a token for an
	// enrolled name is refused.
	Rotate bool `json:"rotate,omitempty"`
}

// SiteRemoval is what removing a site did.
type SiteRemoval struct {
	Site string `json:"site"`
	// Revoked are the serials of the certificates revoked.
	Revoked []string `json:"revoked"`
	// Machines still naming the site (a forced removal).
	Machines []string `json:"machines,omitempty"`
}

// SiteAdminService enrolls and removes sites: the verbs that came after
// Service. The server and http.Client implement it next to Service.
type SiteAdminService interface {
	// CreateJoinToken returns a one-time token site enrolls with.
	CreateJoinToken(ctx context.Context, site string, req JoinTokenRequest) (string, error)
	// RemoveSite revokes the site's certificates and forgets it. A site
	// that still holds machines is refused (ECONFLICT) unless force.
	RemoveSite(ctx context.Context, name string, force bool) (*SiteRemoval, error)
}
