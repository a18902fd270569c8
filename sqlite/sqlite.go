// Package sqlite persists the control plane's state (sites, machines,
// policies, jobs, events, users, tokens, settings, the audit log) in one
// SQLite file.
//
// Objects are stored as a JSON document column next to the key columns that
// queries filter and sort on, so adding a field to a domain type needs no
// migration. The schema itself is versioned (see migrations).
package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/rebound-dr/rebound"
	_ "modernc.org/sqlite" // driver "sqlite"
)

// DB is the control plane's store. It is safe for concurrent use.
type DB struct {
	db   *sql.DB
	path string
	full chan struct{} // see DiskFull

	// now is the clock; tests replace it.
	now func() time.Time
}

// migrations are applied in order; schema_version holds how many ran.
// Never edit a shipped migration: append a new one.
var migrations = []string{
	// 1: initial schema.
	`CREATE TABLE sites (
		name TEXT PRIMARY KEY,
		doc  TEXT NOT NULL
	);
	CREATE TABLE machines (
		name       TEXT PRIMARY KEY,
		created_at INTEGER NOT NULL,
		doc        TEXT NOT NULL
	);
	CREATE TABLE policies (
		name TEXT PRIMARY KEY,
		doc  TEXT NOT NULL
	);
	CREATE TABLE jobs (
		seq        INTEGER PRIMARY KEY AUTOINCREMENT,
		id         TEXT NOT NULL UNIQUE,
		machine    TEXT NOT NULL DEFAULT '',
		state      TEXT NOT NULL,
		created_at INTEGER NOT NULL,
		doc        TEXT NOT NULL
	);
	CREATE INDEX jobs_machine ON jobs (machine, seq);
	CREATE INDEX jobs_state ON jobs (state);
	CREATE TABLE events (
		id      INTEGER PRIMARY KEY AUTOINCREMENT,
		time    INTEGER NOT NULL,
		machine TEXT NOT NULL DEFAULT '',
		site    TEXT NOT NULL DEFAULT '',
		kind    TEXT NOT NULL,
		message TEXT NOT NULL
	);
	CREATE INDEX events_machine ON events (machine, id);
	CREATE TABLE api_tokens (
		hash       TEXT PRIMARY KEY,
		name       TEXT NOT NULL,
		created_at INTEGER NOT NULL
	);
	CREATE TABLE enroll_tokens (
		hash       TEXT PRIMARY KEY,
		site       TEXT NOT NULL,
		expires_at INTEGER NOT NULL,
		used_at    INTEGER
	);
	CREATE TABLE settings (
		key   TEXT PRIMARY KEY,
		value TEXT NOT NULL
	);`,
	// 2: recovery plans.
	`CREATE TABLE plans (
		name TEXT PRIMARY KEY,
		doc  TEXT NOT NULL
	);`,
	// 3: role-bound and rotating join tokens; the certificates the CA
	// issued, for revocation (see certs.go).
	`ALTER TABLE enroll_tokens ADD COLUMN role TEXT NOT NULL DEFAULT '';
	ALTER TABLE enroll_tokens ADD COLUMN rotate INTEGER NOT NULL DEFAULT 0;
	CREATE TABLE certs (
		serial     TEXT PRIMARY KEY,
		site       TEXT NOT NULL,
		role       TEXT NOT NULL,
		issued_at  INTEGER NOT NULL,
		used_at    INTEGER,
		rotates    INTEGER NOT NULL DEFAULT 0,
		revoked_at INTEGER,
		reason     TEXT NOT NULL DEFAULT ''
	);
	CREATE INDEX certs_site ON certs (site);`,
	// 4: users, API tokens owned by users (the old ones move to user
	// "admin", created without a password), console sessions, the audit
	// log (see users.go).
	`CREATE TABLE users (
		name       TEXT PRIMARY KEY,
		role       TEXT NOT NULL,
		password   TEXT NOT NULL DEFAULT '',
		created_at INTEGER NOT NULL
	);
	INSERT INTO users (name, role, created_at)
		SELECT 'admin', 'admin', (SELECT min(created_at) FROM api_tokens)
		WHERE EXISTS (SELECT 1 FROM api_tokens);
	CREATE TABLE api_tokens_4 (
		id         TEXT PRIMARY KEY,
		hash       TEXT NOT NULL UNIQUE,
		owner      TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
		name       TEXT NOT NULL,
		created_at INTEGER NOT NULL,
		last_used  INTEGER NOT NULL DEFAULT 0
	);
	INSERT INTO api_tokens_4 (id, hash, owner, name, created_at)
		SELECT lower(hex(randomblob(6))), hash, 'admin', name, created_at FROM api_tokens;
	DROP TABLE api_tokens;
	ALTER TABLE api_tokens_4 RENAME TO api_tokens;
	CREATE INDEX api_tokens_owner ON api_tokens (owner);
	CREATE TABLE sessions (
		hash       TEXT PRIMARY KEY,
		owner      TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
		ttl        INTEGER NOT NULL,
		expires_at INTEGER NOT NULL
	);
	CREATE INDEX sessions_owner ON sessions (owner);
	CREATE TABLE audit (
		id         INTEGER PRIMARY KEY AUTOINCREMENT,
		time       INTEGER NOT NULL,
		username   TEXT NOT NULL,
		role       TEXT NOT NULL,
		via        TEXT NOT NULL,
		remote     TEXT NOT NULL,
		action     TEXT NOT NULL,
		target     TEXT NOT NULL,
		status     INTEGER NOT NULL,
		error      TEXT NOT NULL,
		request_id TEXT NOT NULL
	);
	CREATE INDEX audit_time ON audit (time);
	CREATE INDEX audit_user ON audit (username, id);`,
	// 5: job leases and one job per lock key (see jobs.go). Jobs of
	// older versions keep an empty key: only this process's map guards
	// them, as before.
	`ALTER TABLE jobs ADD COLUMN lock_key TEXT NOT NULL DEFAULT '';
	ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT '';
	ALTER TABLE jobs ADD COLUMN lease_until INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE jobs ADD COLUMN fence INTEGER NOT NULL DEFAULT 0;
	CREATE UNIQUE INDEX jobs_lock ON jobs (lock_key)
		WHERE lock_key != '' AND state IN ('queued', 'running', 'suspended');`,
	// 6: a machine's revision, for compare-and-swap (UpdateMachine).
	`ALTER TABLE machines ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;`,
	// 7: a job's cancel request or point of no return (RequestCancel).
	`ALTER TABLE jobs ADD COLUMN cancel TEXT NOT NULL DEFAULT '';`,
	// 8: the ID a site gave its event (AddEvent keeps one row per ID;
	// NULL, for events without one, never collides).
	`ALTER TABLE events ADD COLUMN event_id TEXT;
	CREATE UNIQUE INDEX events_event_id ON events (event_id);`,
}

// Open opens (creating if needed) the database at path, applies pending
// migrations and makes sure the "default" policy exists.
func Open(path string) (*DB, error) {
	if path == "" {
		return nil, rebound.Errorf(rebound.EINVALID, "database path is empty")
	}
	if abs, err := filepath.Abs(path); err == nil {
		path = abs // error messages name the directory to free space in
	}
	// WAL lets readers run while one writer commits; busy_timeout makes a
	// second writer wait instead of failing; BEGIN IMMEDIATE takes the write
	// lock up front so read-then-write transactions cannot deadlock.
	q := url.Values{}
	q.Add("_pragma", "busy_timeout(10000)")
	q.Add("_pragma", "journal_mode(WAL)")
	q.Add("_pragma", "foreign_keys(1)")
	q.Add("_pragma", "synchronous(NORMAL)")
	q.Set("_txlock", "immediate")
	dsn := "file:" + (&url.URL{Path: path}).EscapedPath() + "?" + q.Encode()

	// The store holds token hashes and the CA's records: owner only. SQLite
	// gives its -wal and -shm files the database file's mode.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open database %s: %w", path, err)
	}
	err = f.Chmod(0o600)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("open database %s: %w", path, err)
	}

	sqldb, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("open database %s: %w", path, err)
	}
	db := &DB{db: sqldb, path: path, full: make(chan struct{}, 1), now: time.Now}
	if err := db.migrate(context.Background()); err != nil {
		sqldb.Close()
		return nil, fmt.Errorf("open database %s: %w", path, err)
	}
	if err := db.ensureDefaultPolicy(context.Background()); err != nil {
		sqldb.Close()
		return nil, fmt.Errorf("open database %s: %w", path, err)
	}
	return db, nil
}

// Close closes the database.
func (db *DB) Close() error { return db.db.Close() }

// SchemaVersion returns the number of migrations applied.
func (db *DB) SchemaVersion(ctx context.Context) (int, error) {
	var v int
	err := db.db.QueryRowContext(ctx, `SELECT version FROM schema_version`).Scan(&v)
	return v, err
}

func (db *DB) migrate(ctx context.Context) error {
	return db.tx(ctx, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)`); err != nil {
			return fmt.Errorf("create schema_version: %w", err)
		}
		var v int
		err := tx.QueryRowContext(ctx, `SELECT version FROM schema_version`).Scan(&v)
		if errors.Is(err, sql.ErrNoRows) {
			if _, err := tx.ExecContext(ctx, `INSERT INTO schema_version (version) VALUES (0)`); err != nil {
				return fmt.Errorf("init schema_version: %w", err)
			}
		} else if err != nil {
			return fmt.Errorf("read schema_version: %w", err)
		}
		if v > len(migrations) {
			return fmt.Errorf("database schema version %d is newer than this binary (%d)", v, len(migrations))
		}
		for i := v; i < len(migrations); i++ {
			if _, err := tx.ExecContext(ctx, migrations[i]); err != nil {
				return fmt.Errorf("migration %d: %w", i+1, err)
			}
		}
		if _, err := tx.ExecContext(ctx, `UPDATE schema_version SET version = ?`, len(migrations)); err != nil {
			return fmt.Errorf("update schema_version: %w", err)
		}
		return nil
	})
}

func (db *DB) ensureDefaultPolicy(ctx context.Context) error {
	doc, err := marshal(rebound.DefaultPolicy())
	if err != nil {
		return err
	}
	_, err = db.exec(ctx, `INSERT OR IGNORE INTO policies (name, doc) VALUES ('default', ?)`, doc)
	return err
}

// tx runs fn in a write transaction, committing if fn returns nil.
func (db *DB) tx(ctx context.Context, fn func(tx *sql.Tx) error) error {
	tx, err := db.db.BeginTx(ctx, nil)
	if err != nil {
		return db.note(err)
	}
	if err := fn(tx); err != nil {
		tx.Rollback()
		return db.note(err)
	}
	return db.note(tx.Commit())
}

var _ rebound.Store = (*DB)(nil)

// Migrations is the number of migrations this binary knows.
func Migrations() int { return len(migrations) }

// Check reads the schema version of the database at path without
// changing anything: 0 for a database not created yet.
func Check(path string) (version int, err error) {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	sqldb, err := sql.Open("sqlite", "file:"+(&url.URL{Path: path}).EscapedPath()+"?mode=ro")
	if err != nil {
		return 0, fmt.Errorf("open database %s: %w", path, err)
	}
	defer sqldb.Close()
	err = sqldb.QueryRow(`SELECT version FROM schema_version`).Scan(&version)
	if err != nil && strings.Contains(err.Error(), "no such table") {
		return 0, nil
	} else if err != nil {
		return 0, fmt.Errorf("read the schema version of %s: %w", path, err)
	}
	return version, nil
}
