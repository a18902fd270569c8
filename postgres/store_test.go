package postgres

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/pgtest"
	"github.com/rebound-dr/rebound/internal/storetest"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

func open(t *testing.T, dsn string) *DB {
	t.Helper()
	db, err := Open(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	return db
}

// TestStoreContract runs the store contract suite on a real PostgreSQL.
func TestStoreContract(t *testing.T) {
	ctx := context.Background()
	dsns := map[rebound.Store]string{}
	storetest.Run(t, storetest.Harness{
		Open: func(t *testing.T) rebound.Store {
			dsn := pgtest.DSN(t)
			db := open(t, dsn)
			dsns[db] = dsn
			return db
		},
		Reopen: func(t *testing.T, s rebound.Store) rebound.Store {
			s.Close()
			db := open(t, dsns[s])
			dsns[db] = dsns[s]
			return db
		},
		SetClock: func(s rebound.Store, now func() time.Time) { s.(*DB).now = now },
		SecretStored: func(t *testing.T, s rebound.Store, secret string) bool {
			var n int
			err := s.(*DB).pool.QueryRow(ctx, `SELECT
				(SELECT count(*) FROM api_tokens WHERE hash = $1 OR name = $1 OR id = $1) +
				(SELECT count(*) FROM sessions WHERE hash = $1 OR owner = $1) +
				(SELECT count(*) FROM enroll_tokens WHERE hash = $1 OR site = $1)`, secret).Scan(&n)
			if err != nil {
				t.Fatal(err)
			}
			return n > 0
		},
		PasswordHash: func(t *testing.T, s rebound.Store, user string) string {
			var h string
			if err := s.(*DB).pool.QueryRow(ctx, `SELECT password FROM users WHERE name = $1`, user).Scan(&h); err != nil {
				t.Fatal(err)
			}
			return h
		},
		Rows: func(t *testing.T, s rebound.Store, table string) int {
			var n int
			if err := s.(*DB).pool.QueryRow(ctx, `SELECT count(*) FROM `+strings.ReplaceAll(table, `"`, ``)).Scan(&n); err != nil {
				t.Fatal(err)
			}
			return n
		},
		Second: func(t *testing.T, s rebound.Store) rebound.Store { return open(t, dsns[s]) },
	})
}

// TestMigrations: servers opening one database together apply each
// migration once; a database from a newer binary is refused with the
// step to take; a password in the address never reaches a message.
func TestMigrations(t *testing.T) {
	ctx := context.Background()
	dsn := pgtest.DSN(t)
	errs := make(chan error, 4)
	dbs := make(chan *DB, 4)
	for range 4 {
		go func() {
			db, err := Open(ctx, dsn)
			errs <- err
			dbs <- db
		}()
	}
	for range 4 {
		if err := <-errs; err != nil {
			t.Fatalf("concurrent open: %v", err)
		}
		db := <-dbs
		if v, err := db.SchemaVersion(ctx); err != nil || v != Migrations() {
			t.Fatalf("schema version %d %v", v, err)
		}
		defer db.Close()
	}
	db := open(t, dsn)
	if _, err := db.pool.Exec(ctx, `UPDATE schema_version SET version = 999`); err != nil {
		t.Fatal(err)
	}
	db.Close()
	if _, err := Open(ctx, dsn); err == nil || !strings.Contains(err.Error(), "newer than this binary") {
		t.Fatalf("newer schema: %v", err)
	}

	bad := strings.Replace(dsn, "postgres://postgres@", "postgres://postgres:hunter2hunter2@", 1)
	bad = strings.Replace(bad, "/"+strings.Split(strings.TrimPrefix(dsn, "postgres://postgres@/"), "?")[0]+"?", "/no_such_db?", 1)
	_, err := Open(ctx, bad)
	if rebound.ErrorCode(err) != rebound.EUNAVAILABLE || strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("unreachable database: %v", err)
	}
}
