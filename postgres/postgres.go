// Package postgres is the rebound.Store on PostgreSQL (jackc/pgx), for a
// control plane of several servers sharing one database. It keeps the
// same documents as sqlite/ and passes the same contract suite
// (internal/storetest); docs/design/store.md says how the two differ.
package postgres

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/rebound-dr/rebound"
)

// DB is a Rebound store in a PostgreSQL database.
type DB struct {
	pool *pgxpool.Pool
	dsn  string // without a password, for messages
	now  func() time.Time
}

// migrations are applied in order, each in its own transaction under an
// advisory lock, so that servers starting together apply each once;
// schema_version holds how many ran. Never edit a shipped migration.
var migrations = []string{
	// 1: the schema of sqlite's migrations 1-4.
	`CREATE TABLE sites (
		name TEXT PRIMARY KEY,
		doc  TEXT NOT NULL
	);
	CREATE TABLE machines (
		name       TEXT PRIMARY KEY,
		created_at BIGINT NOT NULL,
		doc        TEXT NOT NULL
	);
	CREATE TABLE policies (
		name TEXT PRIMARY KEY,
		doc  TEXT NOT NULL
	);
	CREATE TABLE jobs (
		seq        BIGSERIAL PRIMARY KEY,
		id         TEXT NOT NULL UNIQUE,
		machine    TEXT NOT NULL DEFAULT '',
		state      TEXT NOT NULL,
		created_at BIGINT NOT NULL,
		doc        TEXT NOT NULL
	);
	CREATE INDEX jobs_machine ON jobs (machine, seq);
	CREATE INDEX jobs_state ON jobs (state);
	CREATE TABLE events (
		id      BIGSERIAL PRIMARY KEY,
		time    BIGINT NOT NULL,
		machine TEXT NOT NULL DEFAULT '',
		site    TEXT NOT NULL DEFAULT '',
		kind    TEXT NOT NULL,
		message TEXT NOT NULL
	);
	CREATE INDEX events_machine ON events (machine, id);
	CREATE TABLE enroll_tokens (
		hash       TEXT PRIMARY KEY,
		site       TEXT NOT NULL,
		expires_at BIGINT NOT NULL,
		used_at    BIGINT,
		role       TEXT NOT NULL DEFAULT '',
		rotate     BOOLEAN NOT NULL DEFAULT false
	);
	CREATE TABLE settings (
		key   TEXT PRIMARY KEY,
		value TEXT NOT NULL
	);
	CREATE TABLE plans (
		name TEXT PRIMARY KEY,
		doc  TEXT NOT NULL
	);
	CREATE TABLE certs (
		serial     TEXT PRIMARY KEY,
		site       TEXT NOT NULL,
		role       TEXT NOT NULL,
		issued_at  BIGINT NOT NULL,
		used_at    BIGINT,
		rotates    BOOLEAN NOT NULL DEFAULT false,
		revoked_at BIGINT,
		reason     TEXT NOT NULL DEFAULT ''
	);
	CREATE INDEX certs_site ON certs (site);
	CREATE TABLE users (
		name       TEXT PRIMARY KEY,
		role       TEXT NOT NULL,
		password   TEXT NOT NULL DEFAULT '',
		created_at BIGINT NOT NULL
	);
	CREATE TABLE api_tokens (
		seq        BIGSERIAL,
		id         TEXT PRIMARY KEY,
		hash       TEXT NOT NULL UNIQUE,
		owner      TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
		name       TEXT NOT NULL,
		created_at BIGINT NOT NULL,
		last_used  BIGINT NOT NULL DEFAULT 0
	);
	CREATE INDEX api_tokens_owner ON api_tokens (owner);
	CREATE TABLE sessions (
		hash       TEXT PRIMARY KEY,
		owner      TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
		ttl        BIGINT NOT NULL,
		expires_at BIGINT NOT NULL
	);
	CREATE INDEX sessions_owner ON sessions (owner);
	CREATE TABLE audit (
		id         BIGSERIAL PRIMARY KEY,
		time       BIGINT NOT NULL,
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
	// 2: job leases and one job per lock key (see jobs.go).
	`ALTER TABLE jobs ADD COLUMN lock_key TEXT NOT NULL DEFAULT '';
	ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT '';
	ALTER TABLE jobs ADD COLUMN lease_until BIGINT NOT NULL DEFAULT 0;
	ALTER TABLE jobs ADD COLUMN fence BIGINT NOT NULL DEFAULT 0;
	CREATE UNIQUE INDEX jobs_lock ON jobs (lock_key)
		WHERE lock_key != '' AND state IN ('queued', 'running', 'suspended');`,
	// 3: a machine's revision, for compare-and-swap (UpdateMachine).
	`ALTER TABLE machines ADD COLUMN revision BIGINT NOT NULL DEFAULT 0;`,
	// 4: a job's cancel request or point of no return (RequestCancel).
	`ALTER TABLE jobs ADD COLUMN cancel TEXT NOT NULL DEFAULT '';`,
	// 5: the ID a site gave its event (AddEvent keeps one row per ID;
	// NULL, for events without one, never collides).
	`ALTER TABLE events ADD COLUMN event_id TEXT;
	CREATE UNIQUE INDEX events_event_id ON events (event_id);`,
}

// migrateLock is the advisory lock key migrations hold ("rebound").
const migrateLock = 0x7265626f756e64

// Open connects to the database at dsn (postgres://USER@HOST/DB, or a
// key=value string), applies pending migrations and makes sure the
// "default" policy exists.
func Open(ctx context.Context, dsn string) (*DB, error) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, rebound.Errorf(rebound.EINVALID, "database address: %v (want postgres://USER@HOST/DB)", err)
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("open PostgreSQL %s: %w", Redact(dsn), err)
	}
	db := &DB{pool: pool, dsn: Redact(dsn), now: time.Now}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, rebound.Errorf(rebound.EUNAVAILABLE, "PostgreSQL at %s does not answer: %v; check the address, that the server runs and that it lets this user in", db.dsn, err)
	}
	if err := db.migrate(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("PostgreSQL %s: %w", db.dsn, err)
	}
	if err := db.ensureDefaultPolicy(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("PostgreSQL %s: %w", db.dsn, err)
	}
	return db, nil
}

// Redact drops a password from dsn: it goes into messages and logs.
func Redact(dsn string) string {
	if u, err := url.Parse(dsn); err == nil && u.User != nil {
		if _, ok := u.User.Password(); ok {
			u.User = url.UserPassword(u.User.Username(), "xxxxx")
			return u.String()
		}
		return dsn
	}
	if strings.Contains(dsn, "password=") {
		return "(key=value address)"
	}
	return dsn
}

// Close closes the connections.
func (db *DB) Close() error { db.pool.Close(); return nil }

// SchemaVersion returns the number of migrations applied.
func (db *DB) SchemaVersion(ctx context.Context) (int, error) {
	var v int
	err := db.pool.QueryRow(ctx, `SELECT version FROM schema_version`).Scan(&v)
	return v, err
}

// Migrations is the number of migrations this binary knows.
func Migrations() int { return len(migrations) }

func (db *DB) migrate(ctx context.Context) error {
	return db.tx(ctx, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(migrateLock)); err != nil {
			return fmt.Errorf("lock for migrations: %w", err)
		}
		if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)`); err != nil {
			return fmt.Errorf("create schema_version: %w", err)
		}
		var v int
		err := tx.QueryRow(ctx, `SELECT version FROM schema_version`).Scan(&v)
		if errors.Is(err, pgx.ErrNoRows) {
			if _, err := tx.Exec(ctx, `INSERT INTO schema_version (version) VALUES (0)`); err != nil {
				return fmt.Errorf("init schema_version: %w", err)
			}
		} else if err != nil {
			return fmt.Errorf("read schema_version: %w", err)
		}
		if v > len(migrations) {
			return fmt.Errorf("database schema version %d is newer than this binary (%d): run the newer rebound server", v, len(migrations))
		}
		for i := v; i < len(migrations); i++ {
			if _, err := tx.Exec(ctx, migrations[i]); err != nil {
				return fmt.Errorf("migration %d: %w", i+1, err)
			}
		}
		if _, err := tx.Exec(ctx, `UPDATE schema_version SET version = $1`, len(migrations)); err != nil {
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
	_, err = db.pool.Exec(ctx, `INSERT INTO policies (name, doc) VALUES ('default', $1) ON CONFLICT (name) DO NOTHING`, doc)
	return err
}

// txRetries bounds the retries of a transaction PostgreSQL aborted to keep
// it serializable.
const txRetries = 10

// tx runs fn in a serializable transaction, committing if fn returns nil
// and running it again when PostgreSQL reports a serialization failure or
// a deadlock: fn must not have effects outside the transaction.
func (db *DB) tx(ctx context.Context, fn func(tx pgx.Tx) error) error {
	var err error
	for range txRetries {
		err = db.tryTx(ctx, fn)
		if !retryable(err) {
			return translate(err)
		}
	}
	return translate(err)
}

func (db *DB) tryTx(ctx context.Context, fn func(tx pgx.Tx) error) error {
	tx, err := db.pool.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.Serializable})
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		tx.Rollback(ctx)
		return err
	}
	return tx.Commit(ctx)
}

func pgCode(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

func retryable(err error) bool {
	c := pgCode(err)
	return c == "40001" || c == "40P01"
}

func isUniqueViolation(err error) bool { return pgCode(err) == "23505" }

// constraint names the constraint or index a violation is of.
func constraint(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.ConstraintName
	}
	return ""
}

// translate gives codes to the errors an operator can act on: a full disk
// at the database server, and a database that cannot be reached.
func translate(err error) error {
	if err == nil || rebound.ErrorCode(err) != rebound.EINTERNAL {
		return err
	}
	switch c := pgCode(err); {
	case c == "53100":
		return rebound.Errorf(rebound.ENOSPACE, "the PostgreSQL server's disk is full (%v): free space there; nothing was changed", err)
	case c == "" && pgconn.SafeToRetry(err), c == "" && isConnErr(err):
		return rebound.Errorf(rebound.EUNAVAILABLE, "PostgreSQL does not answer: %v; check that it runs and is reachable", err)
	}
	return err
}

func isConnErr(err error) bool {
	var ce *pgconn.ConnectError
	return errors.As(err, &ce)
}

// exec runs one statement outside a transaction.
func (db *DB) exec(ctx context.Context, q string, args ...any) (pgconn.CommandTag, error) {
	tag, err := db.pool.Exec(ctx, q, args...)
	return tag, translate(err)
}

func unixNano(n int64) time.Time { return time.Unix(0, n).UTC() }

var _ rebound.Store = (*DB)(nil)

// Check connects to dsn and reads its schema version without changing
// anything: 0 for a database Rebound never opened.
func Check(ctx context.Context, dsn string) (version int, err error) {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return 0, rebound.Errorf(rebound.EUNAVAILABLE, "PostgreSQL at %s does not answer: %v; check the address, that the server runs and that it lets this user in", Redact(dsn), err)
	}
	defer conn.Close(ctx)
	var exists bool
	if err := conn.QueryRow(ctx, `SELECT to_regclass('schema_version') IS NOT NULL`).Scan(&exists); err != nil {
		return 0, translate(err)
	}
	if !exists {
		return 0, nil
	}
	if err := conn.QueryRow(ctx, `SELECT version FROM schema_version`).Scan(&version); err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return 0, translate(err)
	}
	return version, nil
}
