package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/secret"
)

// APITokenPrefix and EnrollTokenPrefix mark Rebound's secrets (see
// internal/secret).
const (
	APITokenPrefix    = secret.APITokenPrefix
	EnrollTokenPrefix = secret.EnrollTokenPrefix
)

// newSecret and hashToken are internal/secret's, named for this package.
var (
	newSecret = secret.New
	hashToken = secret.Hash
)

func unixNano(n int64) time.Time { return time.Unix(0, n).UTC() }

// CreateJoinToken creates a one-time token that enrolls site within ttl
// with a certificate of role ("site" or "agent"). A rotate token's
// certificate replaces the site's others once it is used (CertUsed).
func (db *DB) CreateJoinToken(ctx context.Context, site, role string, rotate bool, ttl time.Duration) (string, error) {
	if site == "" {
		return "", rebound.Errorf(rebound.EINVALID, "site name is empty")
	}
	if ttl <= 0 {
		return "", rebound.Errorf(rebound.EINVALID, "enrollment token lifetime must be positive")
	}
	tok, err := newSecret(EnrollTokenPrefix)
	if err != nil {
		return "", err
	}
	if _, err := db.exec(ctx, `INSERT INTO enroll_tokens (hash, site, expires_at, role, rotate) VALUES (?, ?, ?, ?, ?)`,
		hashToken(tok), site, db.now().Add(ttl).UnixNano(), role, rotate); err != nil {
		return "", fmt.Errorf("create enrollment token: %w", err)
	}
	return tok, nil
}

// useToken consumes a token in tx and returns the role and rotation it
// was minted with.
func (db *DB) useToken(ctx context.Context, tx *sql.Tx, tok, site string) (role string, rotate bool, err error) {
	h := hashToken(tok)
	var tokSite string
	var expires int64
	var used sql.NullInt64
	err = tx.QueryRowContext(ctx, `SELECT site, expires_at, used_at, role, rotate FROM enroll_tokens WHERE hash = ?`, h).
		Scan(&tokSite, &expires, &used, &role, &rotate)
	if errors.Is(err, sql.ErrNoRows) {
		return "", false, rebound.Errorf(rebound.EUNAUTHORIZED, "invalid enrollment token")
	} else if err != nil {
		return "", false, fmt.Errorf("use enrollment token: %w", err)
	}
	now := db.now()
	switch {
	case used.Valid:
		return "", false, rebound.Errorf(rebound.EUNAUTHORIZED, "enrollment token was already used at %s", unixNano(used.Int64).Format(time.RFC3339))
	case now.UnixNano() >= expires:
		return "", false, rebound.Errorf(rebound.EUNAUTHORIZED, "enrollment token expired at %s", unixNano(expires).Format(time.RFC3339))
	case tokSite != site:
		return "", false, rebound.Errorf(rebound.EUNAUTHORIZED, "enrollment token is for site %q, not %q", tokSite, site)
	}
	// The used_at guard keeps this one-time even without the
	// transaction's write lock.
	res, err := tx.ExecContext(ctx, `UPDATE enroll_tokens SET used_at = ? WHERE hash = ? AND used_at IS NULL`, now.UnixNano(), h)
	if err != nil {
		return "", false, fmt.Errorf("use enrollment token: %w", err)
	}
	if n, err := res.RowsAffected(); err != nil {
		return "", false, fmt.Errorf("use enrollment token: %w", err)
	} else if n != 1 {
		return "", false, rebound.Errorf(rebound.EUNAUTHORIZED, "enrollment token was already used")
	}
	if role == "" {
		role = "site" // tokens minted before roles
	}
	return role, rotate, nil
}
