package sqlite

import (
	"context"
	"database/sql"
	"testing"

	_ "modernc.org/sqlite"
)

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
