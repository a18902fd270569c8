package postgres

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/secret"
)

// CreateJoinToken creates a one-time token that enrolls site within ttl
// with a certificate of role.
func (db *DB) CreateJoinToken(ctx context.Context, site, role string, rotate bool, ttl time.Duration) (string, error) {
	if site == "" {
		return "", rebound.Errorf(rebound.EINVALID, "site name is empty")
	}
	if ttl <= 0 {
		return "", rebound.Errorf(rebound.EINVALID, "enrollment token lifetime must be positive")
	}
	tok, err := secret.New(secret.EnrollTokenPrefix)
	if err != nil {
		return "", err
	}
	if _, err := db.exec(ctx, `INSERT INTO enroll_tokens (hash, site, expires_at, role, rotate) VALUES ($1, $2, $3, $4, $5)`,
		secret.Hash(tok), site, db.now().Add(ttl).UnixNano(), role, rotate); err != nil {
		return "", fmt.Errorf("create enrollment token: %w", err)
	}
	return tok, nil
}

// useToken consumes a token in tx and returns the role and rotation it
// was minted with.
func (db *DB) useToken(ctx context.Context, tx pgx.Tx, tok, site string) (role string, rotate bool, err error) {
	h := secret.Hash(tok)
	var tokSite string
	var expires int64
	var used *int64
	err = tx.QueryRow(ctx, `SELECT site, expires_at, used_at, role, rotate FROM enroll_tokens WHERE hash = $1`, h).
		Scan(&tokSite, &expires, &used, &role, &rotate)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", false, rebound.Errorf(rebound.EUNAUTHORIZED, "invalid enrollment token")
	} else if err != nil {
		return "", false, err
	}
	now := db.now()
	switch {
	case used != nil:
		return "", false, rebound.Errorf(rebound.EUNAUTHORIZED, "enrollment token was already used at %s", unixNano(*used).Format(time.RFC3339))
	case now.UnixNano() >= expires:
		return "", false, rebound.Errorf(rebound.EUNAUTHORIZED, "enrollment token expired at %s", unixNano(expires).Format(time.RFC3339))
	case tokSite != site:
		return "", false, rebound.Errorf(rebound.EUNAUTHORIZED, "enrollment token is for site %q, not %q", tokSite, site)
	}
	tag, err := tx.Exec(ctx, `UPDATE enroll_tokens SET used_at = $1 WHERE hash = $2 AND used_at IS NULL`, now.UnixNano(), h)
	if err != nil {
		return "", false, err
	}
	if tag.RowsAffected() != 1 {
		return "", false, rebound.Errorf(rebound.EUNAUTHORIZED, "enrollment token was already used")
	}
	if role == "" {
		role = "site"
	}
	return role, rotate, nil
}

// Enroll consumes a join token for site and records the certificate.
func (db *DB) Enroll(ctx context.Context, tok, site, role, serial string) error {
	return db.tx(ctx, func(tx pgx.Tx) error {
		tokRole, rotate, err := db.useToken(ctx, tx, tok, site)
		if err != nil {
			return err
		}
		if tokRole != role {
			next := "rebound site token " + site
			if role == "agent" || role == "nbd" {
				next += " --" + role
			}
			return rebound.Errorf(rebound.EUNAUTHORIZED, "enrollment token for %s was minted for %s: it cannot enroll %s certificate; mint one with %s",
				site, secret.Article(tokRole), secret.Article(role), next)
		}
		if _, err := tx.Exec(ctx, `INSERT INTO certs (serial, site, role, issued_at, rotates) VALUES ($1, $2, $3, $4, $5)`,
			serial, site, role, db.now().UnixNano(), rotate); err != nil {
			return fmt.Errorf("record certificate: %w", err)
		}
		return nil
	})
}

// CertUsed records a connection with the certificate serial of site.
func (db *DB) CertUsed(ctx context.Context, serial, site, role string) (revoked []string, err error) {
	err = db.tx(ctx, func(tx pgx.Tx) error {
		revoked = nil
		now := db.now().UnixNano()
		var used *int64
		var rotates bool
		err := tx.QueryRow(ctx, `SELECT used_at, rotates FROM certs WHERE serial = $1`, serial).Scan(&used, &rotates)
		if errors.Is(err, pgx.ErrNoRows) {
			_, err = tx.Exec(ctx, `INSERT INTO certs (serial, site, role, issued_at, used_at) VALUES ($1, $2, $3, $4, $5)`,
				serial, site, role, now, now)
			return err
		} else if err != nil {
			return err
		}
		if used != nil {
			return nil
		}
		if _, err := tx.Exec(ctx, `UPDATE certs SET used_at = $1 WHERE serial = $2`, now, serial); err != nil {
			return err
		}
		if !rotates {
			return nil
		}
		revoked, err = revokeTx(ctx, tx, site, serial, "rotated", now)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("record certificate use: %w", err)
	}
	return revoked, nil
}

// RevokeSite revokes every live certificate of site and drops its unused
// join tokens.
func (db *DB) RevokeSite(ctx context.Context, site, reason string) (revoked []string, err error) {
	err = db.tx(ctx, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `DELETE FROM enroll_tokens WHERE site = $1 AND used_at IS NULL`, site); err != nil {
			return err
		}
		revoked, err = revokeTx(ctx, tx, site, "", reason, db.now().UnixNano())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("revoke site %s: %w", site, err)
	}
	return revoked, nil
}

func revokeTx(ctx context.Context, tx pgx.Tx, site, keep, reason string, now int64) ([]string, error) {
	rows, err := tx.Query(ctx, `UPDATE certs SET revoked_at = $1, reason = $2
		WHERE site = $3 AND serial != $4 AND revoked_at IS NULL RETURNING serial`, now, reason, site, keep)
	if err != nil {
		return nil, err
	}
	serials, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, err
	}
	if len(serials) == 0 {
		return nil, nil
	}
	slices.Sort(serials)
	return serials, nil
}

// Certs returns the certificates recorded for site ("" for every site).
func (db *DB) Certs(ctx context.Context, site string) ([]rebound.Cert, error) {
	rows, err := db.pool.Query(ctx, `SELECT serial, site, role, issued_at, used_at, rotates, revoked_at, reason
		FROM certs WHERE $1 = '' OR site = $1 ORDER BY issued_at, serial COLLATE "C"`, site)
	if err != nil {
		return nil, fmt.Errorf("list certificates: %w", translate(err))
	}
	defer rows.Close()
	var out []rebound.Cert
	for rows.Next() {
		var c rebound.Cert
		var issued int64
		var used, revoked *int64
		if err := rows.Scan(&c.Serial, &c.Site, &c.Role, &issued, &used, &c.Rotates, &revoked, &c.Reason); err != nil {
			return nil, fmt.Errorf("list certificates: %w", err)
		}
		c.IssuedAt = unixNano(issued)
		if used != nil {
			c.UsedAt = unixNano(*used)
		}
		if revoked != nil {
			c.RevokedAt = unixNano(*revoked)
		}
		out = append(out, c)
	}
	return out, translate(rows.Err())
}

func (db *DB) strings(ctx context.Context, what, q string, args ...any) ([]string, error) {
	rows, err := db.pool.Query(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, translate(err))
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, translate(err))
	}
	return out, nil
}

// RevokedSerials returns the revocation list.
func (db *DB) RevokedSerials(ctx context.Context) ([]string, error) {
	out, err := db.strings(ctx, "revocation list", `SELECT serial FROM certs WHERE revoked_at IS NOT NULL ORDER BY serial COLLATE "C"`)
	if out == nil && err == nil {
		out = []string{}
	}
	return out, err
}

// PendingTokens returns the sites with a join token neither used nor
// expired.
func (db *DB) PendingTokens(ctx context.Context) ([]string, error) {
	out, err := db.strings(ctx, "pending tokens", `SELECT DISTINCT site COLLATE "C" FROM enroll_tokens WHERE used_at IS NULL AND expires_at > $1 ORDER BY 1`, db.now().UnixNano())
	if len(out) == 0 {
		out = nil
	}
	return out, err
}
