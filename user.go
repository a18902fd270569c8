package rebound

import (
	"context"
	"time"
)

// Role is what a user may do. Roles are ordered: each allows what the
// ones before it allow.
type Role string

const (
	// RoleViewer sees everything and changes nothing.
	RoleViewer Role = "viewer"
	// RoleOperator also runs the recovery loop: protect, points, failover,
	// test failover, commit, reprotect, failback, plans, jobs, power.
	RoleOperator Role = "operator"
	// RoleAdmin also manages sites, policies, settings, users and tokens.
	RoleAdmin Role = "admin"
)

// Roles lists the roles from the least to the most privileged.
var Roles = []Role{RoleViewer, RoleOperator, RoleAdmin}

func (r Role) rank() int {
	for i, x := range Roles {
		if x == r {
			return i + 1
		}
	}
	return 0 // unknown: allows nothing
}

// Allows says whether r may do what needs need.
func (r Role) Allows(need Role) bool { return r.rank() > 0 && r.rank() >= need.rank() }

// Valid says whether r is one of Roles.
func (r Role) Valid() bool { return r.rank() > 0 }

// ParseRole returns the role named s, or EINVALID naming the roles.
func ParseRole(s string) (Role, error) {
	if r := Role(s); r.Valid() {
		return r, nil
	}
	return "", Errorf(EINVALID, "unknown role %q: use viewer, operator or admin", s)
}

// Principal is who makes a call: a user, with the role the call carries.
// Via says how it authenticated: "token" (an API token, ID in TokenID),
// "session" (the console) or "local" (a process of the server itself).
type Principal struct {
	User    string `json:"user"`
	Role    Role   `json:"role"`
	Via     string `json:"via"`
	TokenID string `json:"tokenId,omitempty"`
}

type principalKey struct{}

// WithPrincipal returns ctx carrying p.
func WithPrincipal(ctx context.Context, p Principal) context.Context {
	return context.WithValue(ctx, principalKey{}, p)
}

// PrincipalFrom returns the principal ctx carries, if any.
func PrincipalFrom(ctx context.Context) (Principal, bool) {
	p, ok := ctx.Value(principalKey{}).(Principal)
	return p, ok
}

// User is a person or a robot that calls the API or logs in to the console.
type User struct {
	Name      string    `json:"name"`
	Role      Role      `json:"role"`
	CreatedAt time.Time `json:"createdAt"`
	// PasswordSet is false until the user's first password is set: such a
	// user can only use API tokens.
	PasswordSet bool `json:"passwordSet"`
}

// APIToken describes an API token. The secret itself is shown only once,
// when it is created; the store keeps its hash.
type APIToken struct {
	ID        string    `json:"id"`
	User      string    `json:"user"`
	Name      string    `json:"name"`
	CreatedAt time.Time `json:"createdAt"`
	// LastUsed is the zero time for a token never used.
	LastUsed time.Time `json:"lastUsed,omitzero"`
}

// CreateUserRequest creates a user. An empty Password makes the store
// generate a one-time password, returned once in CreateUserResult.
type CreateUserRequest struct {
	Name     string `json:"name"`
	Role     Role   `json:"role"`
	Password string `json:"password,omitempty"`
}

// CreateUserResult is a new user and, when the caller gave none, the
// generated password (shown this once).
type CreateUserResult struct {
	User     User   `json:"user"`
	Password string `json:"password,omitempty"`
}

// CreateTokenResult is a new token and its secret (shown this once).
type CreateTokenResult struct {
	Token  APIToken `json:"token"`
	Secret string   `json:"secret"`
}

// UserService keeps users, their API tokens and their console sessions.
// Passwords are stored with a slow salted hash (bcrypt or argon2id), token
// and session secrets as hashes: the store never holds a usable secret.
type UserService interface {
	// CreateUser fails with ECONFLICT if the name is taken and EINVALID on
	// a bad name, role or a password shorter than 12 characters.
	CreateUser(ctx context.Context, req CreateUserRequest) (*CreateUserResult, error)
	ListUsers(ctx context.Context) ([]User, error)
	// DeleteUser also revokes the user's tokens and sessions. Deleting the
	// last admin is refused (ECONFLICT).
	DeleteUser(ctx context.Context, name string) error
	// SetRole changes name's role; its tokens and sessions carry the new
	// role from their next call. Taking the admin role from the last admin
	// is refused (ECONFLICT).
	SetRole(ctx context.Context, name string, role Role) error
	// SetPassword replaces name's password and ends its sessions.
	SetPassword(ctx context.Context, name, password string) error
	// CheckPassword returns the user, or EUNAUTHORIZED with one message
	// for an unknown user and a wrong password alike.
	CheckPassword(ctx context.Context, name, password string) (*User, error)

	// CreateToken creates an API token of user; it carries the user's role.
	CreateToken(ctx context.Context, user, name string) (*CreateTokenResult, error)
	// ListTokens lists user's tokens, or every token for "".
	ListTokens(ctx context.Context, user string) ([]APIToken, error)
	// RevokeToken deletes the token with id (ENOTFOUND if none).
	RevokeToken(ctx context.Context, id string) error
	// CheckToken returns who holds secret (Via "token"), or EUNAUTHORIZED.
	CheckToken(ctx context.Context, secret string) (Principal, error)

	// CreateSession starts a console session of user that expires after
	// ttl of inactivity and returns its secret (the cookie's value).
	CreateSession(ctx context.Context, user string, ttl time.Duration) (string, error)
	// CheckSession returns who holds the session (Via "session") and
	// extends it, or EUNAUTHORIZED if it is unknown or expired.
	CheckSession(ctx context.Context, secret string) (Principal, error)
	// DeleteSession ends a session (logout); unknown secrets are ignored.
	DeleteSession(ctx context.Context, secret string) error
}

// AuditEntry records one mutating call: who, when, from where, what, and
// the result. Entries are never changed or deleted by the API.
type AuditEntry struct {
	ID     int64     `json:"id"`
	Time   time.Time `json:"time"`
	User   string    `json:"user"`
	Role   Role      `json:"role"`
	Via    string    `json:"via"`    // token, session or local
	Remote string    `json:"remote"` // the client's address
	// Action is the API operation, "METHOD /api/v1/route/pattern"; Target
	// the object it named (a machine, group, plan, site, user or job).
	Action string `json:"action"`
	Target string `json:"target,omitempty"`
	// Status is the HTTP status answered; Error the error code and
	// message when it failed ("" on success).
	Status    int    `json:"status"`
	Error     string `json:"error,omitempty"`
	RequestID string `json:"requestId,omitempty"`
}

// AuditFilter selects audit entries, newest first.
type AuditFilter struct {
	Since time.Time // zero: from the start
	User  string    // "": every user
	Limit int       // 0: a default page (100)
}

// AuditService keeps the audit log.
type AuditService interface {
	RecordAudit(ctx context.Context, e AuditEntry) error
	ListAudit(ctx context.Context, f AuditFilter) ([]AuditEntry, error)
}
