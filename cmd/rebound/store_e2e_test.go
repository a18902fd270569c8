package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/pgtest"
	"github.com/rebound-dr/rebound/postgres"
	"github.com/rebound-dr/rebound/sqlite"
)

// TestMain stops the PostgreSQL server the store tests start, and has
// every site, in-process or a real binary, check its saved state against
// its units at each save.
func TestMain(m *testing.M) {
	os.Setenv("REBOUND_SITE_CHECK_STATE", "1")
	os.Exit(pgtest.Main(m))
}

// TestRoundTripPostgres: `rebound up --db postgres://...` runs the whole
// loop (failover, commit, reprotect with a delta, failback, reprotect
// forward, test failover) on a real PostgreSQL, bytes checked at every
// step; the server's records are in that database, not in a SQLite file.
func TestRoundTripPostgres(t *testing.T) {
	t.Parallel()
	dsn := pgtest.DSN(t)
	up, svc := fixedUp(t, func(c *UpConfig) { c.DB = dsn })
	roundTrip(t, svc, 1)

	if _, err := os.Stat(filepath.Join(up.Config.DataDir, "server", "rebound.db")); !os.IsNotExist(err) {
		t.Fatalf("a SQLite store was created next to PostgreSQL: %v", err)
	}
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var jobs, machines int
	if err := conn.QueryRow(ctx, `SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM machines WHERE name = 'vm1')`).Scan(&jobs, &machines); err != nil {
		t.Fatal(err)
	}
	if jobs < 6 || machines != 1 {
		t.Fatalf("PostgreSQL holds %d jobs and %d machine vm1", jobs, machines)
	}
}

// TestCheckDB: `rebound server --check-db` reports the schema version
// and the pending migrations of both stores without applying them, and
// refuses a database newer than the binary naming what to run.
func TestCheckDB(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	dsn := pgtest.DSN(t)
	check := func(args ...string) StoreCheck {
		t.Helper()
		r := runCLI(t, nil, append([]string{"server", "--check-db", "--data", dir, "-o", "json"}, args...)...)
		if r.code != 0 {
			t.Fatalf("check-db %v: exit %d\n%s", args, r.code, r.stderr)
		}
		return decode[StoreCheck](t, r.stdout)
	}
	if got := check(); got != (StoreCheck{Kind: "sqlite", Address: filepath.Join(dir, "rebound.db"), Latest: sqlite.Migrations(), Pending: sqlite.Migrations()}) {
		t.Fatalf("new SQLite: %+v", got)
	}
	if _, err := os.Stat(filepath.Join(dir, "rebound.db")); !os.IsNotExist(err) {
		t.Fatal("--check-db created the database")
	}
	if got := check("--db", dsn); got.Kind != "postgres" || got.Version != 0 || got.Pending != postgres.Migrations() {
		t.Fatalf("new PostgreSQL: %+v", got)
	}
	for _, open := range []func() (rebound.Store, error){
		func() (rebound.Store, error) { return sqlite.Open(filepath.Join(dir, "rebound.db")) },
		func() (rebound.Store, error) { return postgres.Open(ctx, dsn) },
	} {
		db, err := open()
		if err != nil {
			t.Fatal(err)
		}
		db.Close()
	}
	if got := check(); got.Version != sqlite.Migrations() || got.Pending != 0 {
		t.Fatalf("opened SQLite: %+v", got)
	}
	if got := check("--db", dsn); got.Version != postgres.Migrations() || got.Pending != 0 {
		t.Fatalf("opened PostgreSQL: %+v", got)
	}
	t.Setenv("REBOUND_DB", dsn)
	if got := check(); got.Kind != "postgres" {
		t.Fatalf("REBOUND_DB: %+v", got)
	}
	t.Setenv("REBOUND_DB", "")

	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, `UPDATE schema_version SET version = 99`); err != nil {
		t.Fatal(err)
	}
	r := runCLI(t, nil, "server", "--check-db", "--data", dir, "--db", dsn)
	if r.code != ExitConflict || !strings.Contains(r.stderr, "newer than this binary") {
		t.Fatalf("newer schema: exit %d\n%s", r.code, r.stderr)
	}
	bad := strings.Replace(dsn, "postgres://postgres@", "postgres://postgres:s3cretpass@", 1)
	bad = bad[:strings.Index(bad, "?")] + "_missing" + bad[strings.Index(bad, "?"):]
	r = runCLI(t, nil, "server", "--check-db", "--data", dir, "--db", bad)
	if r.code != ExitUnavailable || strings.Contains(r.stderr, "s3cretpass") {
		t.Fatalf("unreachable database: exit %d\n%s", r.code, r.stderr)
	}
	r = runCLI(t, nil, "server", "--check-db", "--data", dir, "--db", "mysql://x")
	if r.code != ExitUsage || !strings.Contains(r.stderr, "postgres://USER@HOST/DB") {
		t.Fatalf("unknown store: exit %d\n%s", r.code, r.stderr)
	}
}
