package sqlite

import (
	"context"
	"database/sql"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	_ "modernc.org/sqlite"
)

// Tokens bind a role; enrolment records the certificate; a rotating
// certificate's first use revokes the name's others; removal revokes all
// and drops unused tokens.
func TestCertsAndRevocation(t *testing.T) {
	ctx := context.Background()
	db, _ := open(t)

	agentTok, err := db.CreateJoinToken(ctx, "srv1", "agent", false, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Enroll(ctx, agentTok, "srv1", "site", "s0")
	wantCode(t, err, rebound.EUNAUTHORIZED)
	if !strings.Contains(err.Error(), "minted for an agent") || !strings.Contains(err.Error(), "rebound site token srv1") {
		t.Fatalf("message %q", err)
	}
	if p, _ := db.PendingTokens(ctx); !slices.Equal(p, []string{"srv1"}) {
		t.Fatalf("the refused attempt used the token: pending %v", p)
	}
	if err := db.Enroll(ctx, agentTok, "srv1", "agent", "a1"); err != nil {
		t.Fatal(err)
	}
	wantCode(t, db.Enroll(ctx, agentTok, "srv1", "agent", "a2"), rebound.EUNAUTHORIZED)

	siteTok, _ := db.CreateEnrollToken(ctx, "primary", time.Hour)
	err = db.Enroll(ctx, siteTok, "primary", "agent", "x")
	wantCode(t, err, rebound.EUNAUTHORIZED)
	if !strings.Contains(err.Error(), "minted for a site") || !strings.Contains(err.Error(), "--agent") {
		t.Fatalf("message %q", err)
	}
	if err := db.Enroll(ctx, siteTok, "primary", "site", "p1"); err != nil {
		t.Fatal(err)
	}
	// A certificate the store never saw (issued before it recorded them)
	// is recorded at its first use.
	if rev, err := db.CertUsed(ctx, "p0", "primary", "site"); err != nil || rev != nil {
		t.Fatalf("unknown certificate: %v %v", rev, err)
	}
	if rev, err := db.CertUsed(ctx, "p1", "primary", "site"); err != nil || rev != nil {
		t.Fatalf("plain certificate's first use revoked %v (%v)", rev, err)
	}

	rotTok, _ := db.CreateJoinToken(ctx, "primary", "site", true, time.Hour)
	if err := db.Enroll(ctx, rotTok, "primary", "site", "p2"); err != nil {
		t.Fatal(err)
	}
	if l, _ := db.RevokedSerials(ctx); len(l) != 0 {
		t.Fatalf("enrolling the rotation revoked %v before its first use", l)
	}
	rev, err := db.CertUsed(ctx, "p2", "primary", "site")
	if err != nil || !slices.Equal(rev, []string{"p0", "p1"}) {
		t.Fatalf("rotation's first use revoked %v (%v), want p0 p1", rev, err)
	}
	if rev, _ := db.CertUsed(ctx, "p2", "primary", "site"); rev != nil {
		t.Fatalf("second use revoked %v", rev)
	}

	db.CreateEnrollToken(ctx, "srv1", time.Hour) // unused, dropped by the removal
	rev, err = db.RevokeSite(ctx, "srv1", "removed")
	if err != nil || !slices.Equal(rev, []string{"a1"}) {
		t.Fatalf("removal revoked %v (%v)", rev, err)
	}
	if l, _ := db.RevokedSerials(ctx); !slices.Equal(l, []string{"a1", "p0", "p1"}) {
		t.Fatalf("revocation list %v", l)
	}
	if p, _ := db.PendingTokens(ctx); len(p) != 0 {
		t.Fatalf("pending after the removal: %v", p)
	}
	certs, _ := db.Certs(ctx, "primary")
	var live []string
	for _, c := range certs {
		if c.RevokedAt.IsZero() {
			live = append(live, c.Serial)
		} else if c.Reason != "rotated" {
			t.Fatalf("%s revoked as %q", c.Serial, c.Reason)
		}
	}
	if !slices.Equal(live, []string{"p2"}) {
		t.Fatalf("primary's live certificates %v", live)
	}
}

// A database of schema 1 (tokens without roles) migrates; its unused
// token enrolls a site.
func TestMigrationToCerts(t *testing.T) {
	ctx := context.Background()
	path := t.TempDir() + "/old.db"
	raw, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{
		`CREATE TABLE schema_version (version INTEGER NOT NULL)`,
		`INSERT INTO schema_version (version) VALUES (1)`,
		migrations[0],
		`INSERT INTO enroll_tokens (hash, site, expires_at) VALUES ('` + hashToken("rbe_old") + `', 'b', ` + "9000000000000000000" + `)`,
	} {
		if _, err := raw.Exec(q); err != nil {
			t.Fatal(err)
		}
	}
	raw.Close()
	db, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.Enroll(ctx, "rbe_old", "b", "site", "b1"); err != nil {
		t.Fatalf("old token after the migration: %v", err)
	}
}
