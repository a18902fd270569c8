package http

import (
	"crypto/rand"
	"net/http"
	"strconv"

	"github.com/rebound-dr/rebound"
)

// Users, API tokens, the caller's identity and the audit log
// (rebound.UserService, rebound.AuditService).

type (
	setRoleBody struct {
		Role rebound.Role `json:"role"`
	}
	// setPasswordBody without a password asks the server to generate one.
	setPasswordBody struct {
		Password string `json:"password,omitempty"`
	}
	// setPasswordResult carries the generated password, shown this once.
	setPasswordResult struct {
		Password string `json:"password,omitempty"`
	}
	// createTokenBody: user is the caller when empty; another user's
	// token needs the admin role.
	createTokenBody struct {
		Name string `json:"name"`
		User string `json:"user,omitempty"`
	}
)

// userRoutes are the routes of users, tokens, whoami and the audit log.
// The password and token routes are open to every role: their handlers
// let a user act on their own, and only an admin on another's.
func (s *Server) userRoutes() []route {
	return []route{
		{"GET", "/api/v1/whoami", viewer, s.whoami},
		{"GET", "/api/v1/users", admin, s.listUsers},
		{"POST", "/api/v1/users", admin, s.createUser},
		{"DELETE", "/api/v1/users/{name}", admin, s.deleteUser},
		{"PATCH", "/api/v1/users/{name}", admin, s.setRole},
		{"PUT", "/api/v1/users/{name}/password", viewer, s.setPassword},
		{"GET", "/api/v1/tokens", viewer, s.listTokens},
		{"POST", "/api/v1/tokens", viewer, s.createToken},
		{"DELETE", "/api/v1/tokens/{id}", viewer, s.revokeToken},
		{"GET", "/api/v1/audit", viewer, s.listAudit},
	}
}

func (s *Server) users(what string) (rebound.UserService, error) {
	if s.Users == nil {
		return nil, &errNotImplemented{what, "it keeps no users"}
	}
	return s.Users, nil
}

func principal(r *http.Request) rebound.Principal {
	p, _ := rebound.PrincipalFrom(r.Context())
	return p
}

// selfOrAdmin lets the caller act on user's own things, and an admin on
// anyone's.
func selfOrAdmin(r *http.Request, user, what string) error {
	p := principal(r)
	if p.User == user || p.Role.Allows(rebound.RoleAdmin) {
		return nil
	}
	return forbidden(p, what, rebound.RoleAdmin)
}

func (s *Server) whoami(w http.ResponseWriter, r *http.Request) error {
	writeJSON(w, http.StatusOK, principal(r))
	return nil
}

func (s *Server) listUsers(w http.ResponseWriter, r *http.Request) error {
	u, err := s.users("user list")
	if err != nil {
		return err
	}
	v, err := u.ListUsers(r.Context())
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, nonNil(v))
	return nil
}

func (s *Server) createUser(w http.ResponseWriter, r *http.Request) error {
	u, err := s.users("user create")
	if err != nil {
		return err
	}
	var req rebound.CreateUserRequest
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	auditTarget(r, req.Name)
	res, err := u.CreateUser(r.Context(), req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, res)
	return nil
}

func (s *Server) deleteUser(w http.ResponseWriter, r *http.Request) error {
	u, err := s.users("user delete")
	if err != nil {
		return err
	}
	if err := u.DeleteUser(r.Context(), r.PathValue("name")); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// setRole serves PATCH /api/v1/users/{name} {"role"}: the user, changed.
func (s *Server) setRole(w http.ResponseWriter, r *http.Request) error {
	u, err := s.users("user set-role")
	if err != nil {
		return err
	}
	var b setRoleBody
	if err := decode(w, r, &b, false); err != nil {
		return err
	}
	name := r.PathValue("name")
	if err := u.SetRole(r.Context(), name, b.Role); err != nil {
		return err
	}
	all, err := u.ListUsers(r.Context())
	if err != nil {
		return err
	}
	for _, x := range all {
		if x.Name == name {
			writeJSON(w, http.StatusOK, x)
			return nil
		}
	}
	return rebound.Errorf(rebound.ENOTFOUND, "no user %q", name)
}

// setPassword serves PUT /api/v1/users/{name}/password: a user sets their
// own, an admin anyone's. Without a password in the body the server
// generates one and answers it, once.
func (s *Server) setPassword(w http.ResponseWriter, r *http.Request) error {
	u, err := s.users("user passwd")
	if err != nil {
		return err
	}
	name := r.PathValue("name")
	if err := selfOrAdmin(r, name, "setting the password of user "+strconv.Quote(name)); err != nil {
		return err
	}
	var b setPasswordBody
	if err := decode(w, r, &b, true); err != nil {
		return err
	}
	var res setPasswordResult
	if b.Password == "" {
		b.Password = rand.Text()
		res.Password = b.Password
	}
	if err := u.SetPassword(r.Context(), name, b.Password); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, res)
	return nil
}

// listTokens serves GET /api/v1/tokens[?user=U|?all=true]: the caller's
// tokens; another user's or everyone's need the admin role.
func (s *Server) listTokens(w http.ResponseWriter, r *http.Request) error {
	u, err := s.users("token list")
	if err != nil {
		return err
	}
	q := r.URL.Query()
	for k := range q {
		if k != "user" && k != "all" {
			return rebound.Errorf(rebound.EINVALID, "unknown query parameter %q: use user or all", k)
		}
	}
	user := q.Get("user")
	all := false
	if v := q.Get("all"); v != "" {
		if all, err = strconv.ParseBool(v); err != nil {
			return rebound.Errorf(rebound.EINVALID, "all must be true or false, not %q", v)
		}
	}
	switch {
	case all && user != "":
		return rebound.Errorf(rebound.EINVALID, "give user or all, not both")
	case all:
		if p := principal(r); !p.Role.Allows(rebound.RoleAdmin) {
			return forbidden(p, "listing every user's tokens", rebound.RoleAdmin)
		}
	case user == "":
		user = principal(r).User
		fallthrough
	default:
		if err := selfOrAdmin(r, user, "listing the tokens of user "+strconv.Quote(user)); err != nil {
			return err
		}
	}
	v, err := u.ListTokens(r.Context(), user)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, nonNil(v))
	return nil
}

// createToken serves POST /api/v1/tokens {"name","user"}: a token of the
// caller, or (admin) of user. The answer holds the secret, this once.
func (s *Server) createToken(w http.ResponseWriter, r *http.Request) error {
	u, err := s.users("token create")
	if err != nil {
		return err
	}
	var b createTokenBody
	if err := decode(w, r, &b, false); err != nil {
		return err
	}
	if b.User == "" {
		b.User = principal(r).User
	}
	auditTarget(r, b.User)
	if err := selfOrAdmin(r, b.User, "creating a token of user "+strconv.Quote(b.User)); err != nil {
		return err
	}
	res, err := u.CreateToken(r.Context(), b.User, b.Name)
	if err != nil {
		return err
	}
	auditTarget(r, b.User+"/"+res.Token.ID)
	writeJSON(w, http.StatusCreated, res)
	return nil
}

// revokeToken serves DELETE /api/v1/tokens/{id}: the caller's own token,
// or (admin) anyone's.
func (s *Server) revokeToken(w http.ResponseWriter, r *http.Request) error {
	u, err := s.users("token revoke")
	if err != nil {
		return err
	}
	id := r.PathValue("id")
	all, err := u.ListTokens(r.Context(), "")
	if err != nil {
		return err
	}
	p := principal(r)
	for _, t := range all {
		// Another user's token is not found for a non-admin: its ID does
		// not tell them whose it is.
		if t.ID != id || t.User != p.User && !p.Role.Allows(rebound.RoleAdmin) {
			continue
		}
		if err := u.RevokeToken(r.Context(), id); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
	return rebound.Errorf(rebound.ENOTFOUND, "no API token %q: list them with rebound token list", id)
}
