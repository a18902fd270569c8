package sqlite

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/storetest"
)

// TestStoreContract runs the store contract suite on SQLite.
func TestStoreContract(t *testing.T) {
	storetest.Run(t, storetest.Harness{
		Open: func(t *testing.T) rebound.Store {
			db, err := Open(filepath.Join(t.TempDir(), "rebound.db"))
			if err != nil {
				t.Fatal(err)
			}
			return db
		},
		Reopen: func(t *testing.T, s rebound.Store) rebound.Store {
			path := s.(*DB).path
			s.Close()
			db, err := Open(path)
			if err != nil {
				t.Fatal(err)
			}
			return db
		},
		SetClock: func(s rebound.Store, now func() time.Time) { s.(*DB).now = now },
		SecretStored: func(t *testing.T, s rebound.Store, secret string) bool {
			n := 0
			for _, q := range []string{
				`SELECT count(*) FROM api_tokens WHERE hash = ? OR name = ? OR id = ?`,
				`SELECT count(*) FROM sessions WHERE hash = ? OR owner = ? OR owner = ?`,
				`SELECT count(*) FROM enroll_tokens WHERE hash = ? OR site = ? OR site = ?`,
			} {
				var c int
				if err := s.(*DB).db.QueryRow(q, secret, secret, secret).Scan(&c); err != nil {
					t.Fatal(err)
				}
				n += c
			}
			return n > 0
		},
		PasswordHash: func(t *testing.T, s rebound.Store, user string) string {
			var h string
			if err := s.(*DB).db.QueryRow(`SELECT password FROM users WHERE name = ?`, user).Scan(&h); err != nil {
				t.Fatal(err)
			}
			return h
		},
		Rows: func(t *testing.T, s rebound.Store, table string) int {
			var n int
			if err := s.(*DB).db.QueryRow(`SELECT count(*) FROM ` + strings.ReplaceAll(table, `"`, ``)).Scan(&n); err != nil {
				t.Fatal(err)
			}
			return n
		},
		Second: func(t *testing.T, s rebound.Store) rebound.Store {
			db, err := Open(s.(*DB).path)
			if err != nil {
				t.Fatal(err)
			}
			return db
		},
	})
}
