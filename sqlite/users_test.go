package sqlite

import (
	"context"
	"database/sql"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	_ "modernc.org/sqlite"
)

// A database of schema 3 (tokens without users) migrates: its tokens keep
// working, owned by a new user "admin" with role admin and no password.
func TestMigrationToUsers(t *testing.T) {
	ctx := context.Background()
	path := t.TempDir() + "/old.db"
	raw, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{
		`CREATE TABLE schema_version (version INTEGER NOT NULL)`,
		`INSERT INTO schema_version (version) VALUES (3)`,
		migrations[0], migrations[1], migrations[2],
		`INSERT INTO api_tokens (hash, name, created_at) VALUES ('` + hashToken("rbt_old") + `', 'admin', 1000000000000000000)`,
		`INSERT INTO api_tokens (hash, name, created_at) VALUES ('` + hashToken("rbt_prom") + `', 'prom', 1100000000000000000)`,
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
	for _, s := range []string{"rbt_old", "rbt_prom"} {
		p, err := db.CheckToken(ctx, s)
		if err != nil || p.User != "admin" || p.Role != rebound.RoleAdmin || p.TokenID == "" {
			t.Fatalf("old token %s after the migration: %+v %v", s, p, err)
		}
	}
	if us, err := db.ListUsers(ctx); err != nil || len(us) != 1 || us[0].Name != "admin" || us[0].Role != rebound.RoleAdmin || us[0].PasswordSet {
		t.Fatalf("users %+v %v", us, err)
	}
	ts, _ := db.ListTokens(ctx, "admin")
	if len(ts) != 2 || ts[0].Name != "admin" || ts[1].Name != "prom" || ts[0].ID == ts[1].ID || ts[0].CreatedAt != time.Unix(1e9, 0).UTC() {
		t.Fatalf("tokens %+v", ts)
	}
	if err := db.RevokeToken(ctx, ts[1].ID); err != nil {
		t.Fatal(err)
	}
	_, err = db.CheckToken(ctx, "rbt_prom")
	wantCode(t, err, rebound.EUNAUTHORIZED)

	// A database without tokens gets no user.
	fresh, _ := open(t)
	if us, _ := fresh.ListUsers(ctx); len(us) != 0 {
		t.Fatalf("fresh store has users %v", us)
	}
}
