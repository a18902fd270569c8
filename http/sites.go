package http

import (
	"context"
	"net/http"
	"strconv"

	"github.com/rebound-dr/rebound"
)

// Site enrolment and removal (rebound.SiteAdminService), served when the
// Service implements it.

func (s *Server) siteAdmin(what string) (rebound.SiteAdminService, error) {
	a, ok := s.Service.(rebound.SiteAdminService)
	if !ok {
		return nil, &errNotImplemented{what, "it serves no site removal, agent or NBD client tokens or certificate rotation"}
	}
	return a, nil
}

// createJoinToken mints a join token; the optional body asks for an
// agent's token or a rotation (rebound.JoinTokenRequest).
func (s *Server) createJoinToken(w http.ResponseWriter, r *http.Request) error {
	var req rebound.JoinTokenRequest
	if err := decode(w, r, &req, true); err != nil {
		return err
	}
	var tok string
	var err error
	if req == (rebound.JoinTokenRequest{}) {
		tok, err = s.Service.CreateEnrollToken(r.Context(), r.PathValue("name"))
	} else {
		a, aerr := s.siteAdmin("site token --agent/--nbd/--rotate")
		if aerr != nil {
			return aerr
		}
		tok, err = a.CreateJoinToken(r.Context(), r.PathValue("name"), req)
	}
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, tokenBody{Token: tok})
	return nil
}

// removeSite revokes a site's certificates and forgets it; ?force=true
// removes a site that still holds machines.
func (s *Server) removeSite(w http.ResponseWriter, r *http.Request) error {
	a, err := s.siteAdmin("site remove")
	if err != nil {
		return err
	}
	force := false
	if v := r.URL.Query().Get("force"); v != "" {
		if force, err = strconv.ParseBool(v); err != nil {
			return rebound.Errorf(rebound.EINVALID, "force must be true or false, not %q", v)
		}
	}
	res, err := a.RemoveSite(r.Context(), r.PathValue("name"), force)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, res)
	return nil
}

// CreateJoinToken mints a join token for an agent or a rotation.
func (c *Client) CreateJoinToken(ctx context.Context, site string, req rebound.JoinTokenRequest) (string, error) {
	var v tokenBody
	err := c.do(ctx, "POST", "/api/v1/sites/"+seg(site)+"/enroll-tokens", req, &v)
	return v.Token, err
}

// RemoveSite removes a site and revokes its certificates.
func (c *Client) RemoveSite(ctx context.Context, name string, force bool) (*rebound.SiteRemoval, error) {
	path := "/api/v1/sites/" + seg(name)
	if force {
		path += "?force=true"
	}
	var v rebound.SiteRemoval
	if err := c.do(ctx, "DELETE", path, nil, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

var _ rebound.SiteAdminService = (*Client)(nil)
