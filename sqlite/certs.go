package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/secret"
)

// Cert is a certificate the CA issued, as the revocation list sees it.
type Cert = rebound.Cert

// Enroll consumes a join token for site and records the certificate
// (serial) issued to it, in one transaction: a token minted for another
// role is refused (EUNAUTHORIZED) and stays unused.
func (db *DB) Enroll(ctx context.Context, tok, site, role, serial string) error {
	return db.tx(ctx, func(tx *sql.Tx) error {
		tokRole, rotate, err := db.useToken(ctx, tx, tok, site)
		if err != nil {
			return err
		}
		if tokRole != role {
			next := "rebound site token " + site
			if role == "agent" || role == "nbd" {
				next += " --" + role
			}
			return rebound.Errorf(rebound.EUNAUTHORIZED, "enrollment token for %s was minted for %s: it cannot enroll %s certificate; mint one with %s", site, secret.Article(tokRole), secret.Article(role), next)
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO certs (serial, site, role, issued_at, rotates) VALUES (?, ?, ?, ?, ?)`,
			serial, site, role, db.now().UnixNano(), rotate); err != nil {
			return fmt.Errorf("record certificate: %w", err)
		}
		return nil
	})
}

// CertUsed records a connection with the certificate serial of site. A
// certificate the store does not know (issued before certificates were
// recorded) is recorded now, so that removing its site revokes it. On the
// first use of a rotating certificate the site's other certificates are
// revoked; their serials are returned.
func (db *DB) CertUsed(ctx context.Context, serial, site, role string) (revoked []string, err error) {
	err = db.tx(ctx, func(tx *sql.Tx) error {
		now := db.now().UnixNano()
		var used sql.NullInt64
		var rotates bool
		err := tx.QueryRowContext(ctx, `SELECT used_at, rotates FROM certs WHERE serial = ?`, serial).Scan(&used, &rotates)
		if errors.Is(err, sql.ErrNoRows) {
			_, err = tx.ExecContext(ctx, `INSERT INTO certs (serial, site, role, issued_at, used_at) VALUES (?, ?, ?, ?, ?)`,
				serial, site, role, now, now)
			return err
		} else if err != nil {
			return err
		}
		if used.Valid {
			return nil
		}
		if _, err := tx.ExecContext(ctx, `UPDATE certs SET used_at = ? WHERE serial = ?`, now, serial); err != nil {
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
// join tokens; it returns the serials revoked now.
func (db *DB) RevokeSite(ctx context.Context, site, reason string) (revoked []string, err error) {
	err = db.tx(ctx, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, `DELETE FROM enroll_tokens WHERE site = ? AND used_at IS NULL`, site); err != nil {
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

// revokeTx revokes the live certificates of site but keep.
func revokeTx(ctx context.Context, tx *sql.Tx, site, keep, reason string, now int64) ([]string, error) {
	rows, err := tx.QueryContext(ctx, `SELECT serial FROM certs WHERE site = ? AND serial != ? AND revoked_at IS NULL ORDER BY serial`, site, keep)
	if err != nil {
		return nil, err
	}
	var serials []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			rows.Close()
			return nil, err
		}
		serials = append(serials, s)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	for _, s := range serials {
		if _, err := tx.ExecContext(ctx, `UPDATE certs SET revoked_at = ?, reason = ? WHERE serial = ?`, now, reason, s); err != nil {
			return nil, err
		}
	}
	return serials, nil
}

// Certs returns the certificates recorded for site ("" for every site),
// oldest first.
func (db *DB) Certs(ctx context.Context, site string) ([]Cert, error) {
	rows, err := db.db.QueryContext(ctx, `SELECT serial, site, role, issued_at, used_at, rotates, revoked_at, reason
		FROM certs WHERE ? = '' OR site = ? ORDER BY issued_at, serial`, site, site)
	if err != nil {
		return nil, fmt.Errorf("list certificates: %w", err)
	}
	defer rows.Close()
	var out []Cert
	for rows.Next() {
		var c Cert
		var issued int64
		var used, revoked sql.NullInt64
		if err := rows.Scan(&c.Serial, &c.Site, &c.Role, &issued, &used, &c.Rotates, &revoked, &c.Reason); err != nil {
			return nil, fmt.Errorf("list certificates: %w", err)
		}
		c.IssuedAt = unixNano(issued)
		if used.Valid {
			c.UsedAt = unixNano(used.Int64)
		}
		if revoked.Valid {
			c.RevokedAt = unixNano(revoked.Int64)
		}
		out = append(out, c)
	}
	return out, rows.Err()
}

// RevokedSerials returns the serials of every revoked certificate: the
// revocation list.
func (db *DB) RevokedSerials(ctx context.Context) ([]string, error) {
	rows, err := db.db.QueryContext(ctx, `SELECT serial FROM certs WHERE revoked_at IS NOT NULL ORDER BY serial`)
	if err != nil {
		return nil, fmt.Errorf("revocation list: %w", err)
	}
	defer rows.Close()
	out := []string{}
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			return nil, fmt.Errorf("revocation list: %w", err)
		}
		out = append(out, s)
	}
	return out, rows.Err()
}

// PendingTokens returns the sites with a join token neither used nor
// expired.
func (db *DB) PendingTokens(ctx context.Context) ([]string, error) {
	rows, err := db.db.QueryContext(ctx, `SELECT DISTINCT site FROM enroll_tokens WHERE used_at IS NULL AND expires_at > ? ORDER BY site`, db.now().UnixNano())
	if err != nil {
		return nil, fmt.Errorf("pending tokens: %w", err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, rows.Err()
}

// DeleteSite forgets a site's record (its last report). Its certificates
// stay recorded, revoked, for the revocation list.
func (db *DB) DeleteSite(ctx context.Context, name string) error {
	if _, err := db.exec(ctx, `DELETE FROM sites WHERE name = ?`, name); err != nil {
		return fmt.Errorf("delete site %q: %w", name, err)
	}
	return nil
}
