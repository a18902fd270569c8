package postgres

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/secret"
)

// lastUsedEvery throttles the writes that record a token's use and slide a
// session's expiry: a read-only call writes at most once a minute per
// credential.
const lastUsedEvery = time.Minute

func noUser(name string) error {
	return rebound.Errorf(rebound.ENOTFOUND, "no user %q: list them with rebound user list", name)
}

// CreateUser creates a user (see rebound.UserService).
func (db *DB) CreateUser(ctx context.Context, req rebound.CreateUserRequest) (*rebound.CreateUserResult, error) {
	hash, generated, err := secret.NewUser(req)
	if err != nil {
		return nil, err
	}
	res := &rebound.CreateUserResult{Password: generated}
	tag, err := db.exec(ctx, `INSERT INTO users (name, role, password, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING`,
		req.Name, string(req.Role), hash, db.now().UnixNano())
	if err != nil {
		return nil, fmt.Errorf("create user: %w", err)
	}
	if tag.RowsAffected() != 1 {
		return nil, secret.UserExists(req.Name)
	}
	u, err := db.GetUser(ctx, req.Name)
	if err != nil {
		return nil, err
	}
	res.User = *u
	return res, nil
}

// EnsureUser creates name with role and no password unless it exists.
func (db *DB) EnsureUser(ctx context.Context, name string, role rebound.Role) (bool, error) {
	if err := secret.ValidUserName(name); err != nil {
		return false, err
	}
	tag, err := db.exec(ctx, `INSERT INTO users (name, role, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING`,
		name, string(role), db.now().UnixNano())
	if err != nil {
		return false, fmt.Errorf("create user: %w", err)
	}
	return tag.RowsAffected() == 1, nil
}

const userCols = `name, role, password != '', created_at`

func scanUser(row pgx.Row) (*rebound.User, error) {
	var u rebound.User
	var role string
	var created int64
	if err := row.Scan(&u.Name, &role, &u.PasswordSet, &created); err != nil {
		return nil, err
	}
	u.Role, u.CreatedAt = rebound.Role(role), unixNano(created)
	return &u, nil
}

// GetUser returns the user name, or ENOTFOUND.
func (db *DB) GetUser(ctx context.Context, name string) (*rebound.User, error) {
	u, err := scanUser(db.pool.QueryRow(ctx, `SELECT `+userCols+` FROM users WHERE name = $1`, name))
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, noUser(name)
	} else if err != nil {
		return nil, fmt.Errorf("get user: %w", translate(err))
	}
	return u, nil
}

// ListUsers lists the users by name.
func (db *DB) ListUsers(ctx context.Context) ([]rebound.User, error) {
	rows, err := db.pool.Query(ctx, `SELECT `+userCols+` FROM users ORDER BY name COLLATE "C"`)
	if err != nil {
		return nil, fmt.Errorf("list users: %w", translate(err))
	}
	defer rows.Close()
	out := []rebound.User{}
	for rows.Next() {
		u, err := scanUser(rows)
		if err != nil {
			return nil, fmt.Errorf("list users: %w", err)
		}
		out = append(out, *u)
	}
	return out, translate(rows.Err())
}

// lastAdmin refuses, inside tx, to take the admin role from name if it is
// the only admin.
func lastAdmin(ctx context.Context, tx pgx.Tx, name, doing string) error {
	var role string
	err := tx.QueryRow(ctx, `SELECT role FROM users WHERE name = $1`, name).Scan(&role)
	if errors.Is(err, pgx.ErrNoRows) {
		return noUser(name)
	} else if err != nil {
		return err
	}
	if rebound.Role(role) != rebound.RoleAdmin {
		return nil
	}
	var n int
	if err := tx.QueryRow(ctx, `SELECT count(*) FROM users WHERE role = 'admin'`).Scan(&n); err != nil {
		return err
	}
	if n <= 1 {
		return rebound.Errorf(rebound.ECONFLICT, "cannot %s user %q: it is the last admin; make another user admin first (rebound user set-role NAME admin)", doing, name)
	}
	return nil
}

// DeleteUser deletes a user with its tokens and sessions.
func (db *DB) DeleteUser(ctx context.Context, name string) error {
	return db.tx(ctx, func(tx pgx.Tx) error {
		if err := lastAdmin(ctx, tx, name, "delete"); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `DELETE FROM users WHERE name = $1`, name); err != nil { // cascades
			return fmt.Errorf("delete user: %w", err)
		}
		return nil
	})
}

// SetRole changes a user's role.
func (db *DB) SetRole(ctx context.Context, name string, role rebound.Role) error {
	if _, err := rebound.ParseRole(string(role)); err != nil {
		return err
	}
	return db.tx(ctx, func(tx pgx.Tx) error {
		if role != rebound.RoleAdmin {
			if err := lastAdmin(ctx, tx, name, "take the admin role from"); err != nil {
				return err
			}
		}
		tag, err := tx.Exec(ctx, `UPDATE users SET role = $1 WHERE name = $2`, string(role), name)
		if err != nil {
			return fmt.Errorf("set role: %w", err)
		}
		if tag.RowsAffected() != 1 {
			return noUser(name)
		}
		return nil
	})
}

// SetPassword replaces a user's password and ends its sessions.
func (db *DB) SetPassword(ctx context.Context, name, password string) error {
	if err := secret.ValidPassword(password); err != nil {
		return err
	}
	hash, err := secret.HashPassword(password)
	if err != nil {
		return err
	}
	return db.tx(ctx, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `UPDATE users SET password = $1 WHERE name = $2`, hash, name)
		if err != nil {
			return fmt.Errorf("set password: %w", err)
		}
		if tag.RowsAffected() != 1 {
			return noUser(name)
		}
		if _, err := tx.Exec(ctx, `DELETE FROM sessions WHERE owner = $1`, name); err != nil {
			return fmt.Errorf("set password: %w", err)
		}
		return nil
	})
}

// CheckPassword returns the user if password is theirs.
func (db *DB) CheckPassword(ctx context.Context, name, password string) (*rebound.User, error) {
	var hash string
	err := db.pool.QueryRow(ctx, `SELECT password FROM users WHERE name = $1`, name).Scan(&hash)
	if err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("check password: %w", translate(err))
	}
	if !secret.CheckPassword(hash, password) {
		return nil, secret.ErrBadLogin
	}
	return db.GetUser(ctx, name)
}

// CreateToken creates an API token of user.
func (db *DB) CreateToken(ctx context.Context, user, name string) (*rebound.CreateTokenResult, error) {
	name, err := secret.TokenName(name)
	if err != nil {
		return nil, err
	}
	sec, err := secret.New(secret.APITokenPrefix)
	if err != nil {
		return nil, err
	}
	id, err := secret.ID()
	if err != nil {
		return nil, err
	}
	now := db.now().UTC()
	_, err = db.pool.Exec(ctx, `INSERT INTO api_tokens (id, hash, owner, name, created_at) VALUES ($1, $2, $3, $4, $5)`,
		id, secret.Hash(sec), user, name, now.UnixNano())
	if pgCode(err) == "23503" { // foreign key: no such user
		return nil, noUser(user)
	} else if err != nil {
		return nil, fmt.Errorf("create token: %w", translate(err))
	}
	return &rebound.CreateTokenResult{
		Token:  rebound.APIToken{ID: id, User: user, Name: name, CreatedAt: unixNano(now.UnixNano())},
		Secret: sec,
	}, nil
}

// ListTokens lists user's tokens, or every token for "", oldest first.
func (db *DB) ListTokens(ctx context.Context, user string) ([]rebound.APIToken, error) {
	q := `SELECT id, owner, name, created_at, last_used FROM api_tokens`
	var args []any
	if user != "" {
		if _, err := db.GetUser(ctx, user); err != nil {
			return nil, err
		}
		q += ` WHERE owner = $1`
		args = append(args, user)
	}
	rows, err := db.pool.Query(ctx, q+` ORDER BY created_at, seq`, args...)
	if err != nil {
		return nil, fmt.Errorf("list tokens: %w", translate(err))
	}
	defer rows.Close()
	out := []rebound.APIToken{}
	for rows.Next() {
		var t rebound.APIToken
		var created, used int64
		if err := rows.Scan(&t.ID, &t.User, &t.Name, &created, &used); err != nil {
			return nil, fmt.Errorf("list tokens: %w", err)
		}
		t.CreatedAt = unixNano(created)
		if used != 0 {
			t.LastUsed = unixNano(used)
		}
		out = append(out, t)
	}
	return out, translate(rows.Err())
}

// RevokeToken deletes the token with id.
func (db *DB) RevokeToken(ctx context.Context, id string) error {
	tag, err := db.exec(ctx, `DELETE FROM api_tokens WHERE id = $1`, id)
	if err != nil {
		return fmt.Errorf("revoke token: %w", err)
	}
	if tag.RowsAffected() != 1 {
		return rebound.Errorf(rebound.ENOTFOUND, "no API token %q: list them with rebound token list", id)
	}
	return nil
}

// CheckToken returns who holds the API token, with its owner's current
// role, and notes its use (at most once a minute, best effort).
func (db *DB) CheckToken(ctx context.Context, tok string) (rebound.Principal, error) {
	var p rebound.Principal
	var role string
	var used int64
	err := db.pool.QueryRow(ctx, `SELECT t.id, t.owner, u.role, t.last_used FROM api_tokens t JOIN users u ON u.name = t.owner WHERE t.hash = $1`,
		secret.Hash(tok)).Scan(&p.TokenID, &p.User, &role, &used)
	if errors.Is(err, pgx.ErrNoRows) {
		return rebound.Principal{}, rebound.Errorf(rebound.EUNAUTHORIZED, "invalid API token")
	} else if err != nil {
		return rebound.Principal{}, fmt.Errorf("check API token: %w", translate(err))
	}
	p.Role, p.Via = rebound.Role(role), "token"
	if now := db.now(); now.Sub(unixNano(used)) >= lastUsedEvery {
		db.pool.Exec(ctx, `UPDATE api_tokens SET last_used = $1 WHERE id = $2`, now.UnixNano(), p.TokenID) // best effort
	}
	return p, nil
}

// CreateSession starts a console session of user.
func (db *DB) CreateSession(ctx context.Context, user string, ttl time.Duration) (string, error) {
	if ttl <= 0 {
		return "", rebound.Errorf(rebound.EINVALID, "session lifetime must be positive")
	}
	sec, err := secret.New(secret.SessionPrefix)
	if err != nil {
		return "", err
	}
	now := db.now()
	err = db.tx(ctx, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `DELETE FROM sessions WHERE expires_at <= $1`, now.UnixNano()); err != nil {
			return fmt.Errorf("create session: %w", err)
		}
		_, err := tx.Exec(ctx, `INSERT INTO sessions (hash, owner, ttl, expires_at) VALUES ($1, $2, $3, $4)`,
			secret.Hash(sec), user, int64(ttl), now.Add(ttl).UnixNano())
		if pgCode(err) == "23503" {
			return noUser(user)
		} else if err != nil {
			return fmt.Errorf("create session: %w", err)
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	return sec, nil
}

// CheckSession returns who holds the session and slides its expiry.
func (db *DB) CheckSession(ctx context.Context, sec string) (rebound.Principal, error) {
	var p rebound.Principal
	var role string
	var ttl, expires int64
	h := secret.Hash(sec)
	err := db.pool.QueryRow(ctx, `SELECT s.owner, u.role, s.ttl, s.expires_at FROM sessions s JOIN users u ON u.name = s.owner WHERE s.hash = $1`, h).
		Scan(&p.User, &role, &ttl, &expires)
	if errors.Is(err, pgx.ErrNoRows) {
		return rebound.Principal{}, rebound.Errorf(rebound.EUNAUTHORIZED, "no such session: log in again")
	} else if err != nil {
		return rebound.Principal{}, fmt.Errorf("check session: %w", translate(err))
	}
	now := db.now()
	if now.UnixNano() >= expires {
		return rebound.Principal{}, rebound.Errorf(rebound.EUNAUTHORIZED, "session expired: log in again")
	}
	if next := now.Add(time.Duration(ttl)); next.Sub(unixNano(expires)) >= lastUsedEvery {
		db.pool.Exec(ctx, `UPDATE sessions SET expires_at = $1 WHERE hash = $2`, next.UnixNano(), h) // best effort
	}
	p.Role, p.Via = rebound.Role(role), "session"
	return p, nil
}

// DeleteSession ends a session; an unknown secret is not an error.
func (db *DB) DeleteSession(ctx context.Context, sec string) error {
	if _, err := db.exec(ctx, `DELETE FROM sessions WHERE hash = $1`, secret.Hash(sec)); err != nil {
		return fmt.Errorf("delete session: %w", err)
	}
	return nil
}

// DefaultAuditLimit and MaxAuditLimit bound a page of the audit log.
const (
	DefaultAuditLimit = 100
	MaxAuditLimit     = 10000
)

// RecordAudit appends e to the audit log.
func (db *DB) RecordAudit(ctx context.Context, e rebound.AuditEntry) error {
	if e.Time.IsZero() {
		e.Time = db.now()
	}
	_, err := db.exec(ctx, `INSERT INTO audit (time, username, role, via, remote, action, target, status, error, request_id)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)`,
		e.Time.UnixNano(), e.User, string(e.Role), e.Via, e.Remote, e.Action, e.Target, e.Status, e.Error, e.RequestID)
	if err != nil {
		return fmt.Errorf("record audit: %w", err)
	}
	return nil
}

// ListAudit returns the entries f selects, newest first.
func (db *DB) ListAudit(ctx context.Context, f rebound.AuditFilter) ([]rebound.AuditEntry, error) {
	limit := f.Limit
	if limit <= 0 {
		limit = DefaultAuditLimit
	}
	limit = min(limit, MaxAuditLimit)
	q := `SELECT id, time, username, role, via, remote, action, target, status, error, request_id FROM audit WHERE true`
	var args []any
	arg := func(v any) string {
		args = append(args, v)
		return "$" + strconv.Itoa(len(args))
	}
	if !f.Since.IsZero() {
		q += ` AND time >= ` + arg(f.Since.UnixNano())
	}
	if f.User != "" {
		q += ` AND username = ` + arg(f.User)
	}
	rows, err := db.pool.Query(ctx, q+` ORDER BY id DESC LIMIT `+arg(limit), args...)
	if err != nil {
		return nil, fmt.Errorf("list audit: %w", translate(err))
	}
	defer rows.Close()
	out := []rebound.AuditEntry{}
	for rows.Next() {
		var e rebound.AuditEntry
		var t int64
		var role string
		if err := rows.Scan(&e.ID, &t, &e.User, &role, &e.Via, &e.Remote, &e.Action, &e.Target, &e.Status, &e.Error, &e.RequestID); err != nil {
			return nil, fmt.Errorf("list audit: %w", err)
		}
		e.Time, e.Role = unixNano(t), rebound.Role(role)
		out = append(out, e)
	}
	return out, translate(rows.Err())
}
