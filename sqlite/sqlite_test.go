package sqlite

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rebound-dr/rebound"
)

func open(t *testing.T) (*DB, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "rebound.db")
	db, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db, path
}

func wantCode(t *testing.T, err error, code string) {
	t.Helper()
	if got := rebound.ErrorCode(err); got != code {
		t.Fatalf("error %v: code %q, want %q", err, got, code)
	}
}

func TestMigrationIdempotent(t *testing.T) {
	ctx := context.Background()
	db, path := open(t)
	db.PutSetting(ctx, "k", "v")
	for range 3 {
		db.Close()
		var err error
		if db, err = Open(path); err != nil {
			t.Fatal(err)
		}
		v, err := db.SchemaVersion(ctx)
		if err != nil || v != len(migrations) {
			t.Fatalf("version %d %v", v, err)
		}
		if err := db.migrate(ctx); err != nil {
			t.Fatal(err)
		}
	}
	defer db.Close()
	if v, ok, _ := db.GetSetting(ctx, "k"); !ok || v != "v" {
		t.Fatal("data lost over migrations")
	}
	var mode string
	if err := db.db.QueryRow(`PRAGMA journal_mode`).Scan(&mode); err != nil || mode != "wal" {
		t.Fatalf("journal_mode %q %v", mode, err)
	}
	var fk int
	if err := db.db.QueryRow(`PRAGMA foreign_keys`).Scan(&fk); err != nil || fk != 1 {
		t.Fatalf("foreign_keys %d %v", fk, err)
	}

	// A database from a newer binary is refused, not silently used.
	db.db.Exec(`UPDATE schema_version SET version = 999`)
	db.Close()
	if _, err := Open(path); err == nil || !strings.Contains(err.Error(), "newer") {
		t.Fatalf("newer schema: %v", err)
	}
}

func TestOddPath(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "data dir #1?x=y")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "rebound.db")
	db, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	db.PutSetting(ctx, "k", "v")
	db.Close()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("database not at %s: %v", path, err)
	}
	db, err = Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if v, ok, _ := db.GetSetting(ctx, "k"); !ok || v != "v" {
		t.Fatal("data lost")
	}
}
