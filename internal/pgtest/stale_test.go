package pgtest

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
)

// TestReapStale: a real server whose test binary is gone (its owner, a
// child process here, killed) is stopped and its folder removed by the
// next start's reaping; a folder whose owner's PID now belongs to another
// process (its start time differs) is removed too; the server of a live
// owner is left running.
func TestReapStale(t *testing.T) {
	bin, err := binDir()
	if err != nil {
		t.Fatal(err)
	}
	// Not t.TempDir: the postgres user must reach the folders.
	root, err := os.MkdirTemp("", "pgtest-reap-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}

	owner := exec.Command("sleep", "600")
	if err := owner.Start(); err != nil {
		t.Fatal(err)
	}
	stale, err := startIn(bin, root, owner.Process.Pid)
	if err != nil {
		owner.Process.Kill()
		t.Fatal(err)
	}
	t.Cleanup(stale.stop) // if the reaping fails
	mine, err := startIn(bin, root, os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(mine.stop)
	b, err := os.ReadFile(filepath.Join(stale.dir, "data", "postmaster.pid"))
	if err != nil {
		t.Fatal(err)
	}
	postmaster, err := strconv.Atoi(strings.TrimSpace(strings.SplitN(string(b), "\n", 2)[0]))
	if err != nil {
		t.Fatal(err)
	}
	// A folder whose owner's PID is this process, with another start time:
	// the PID was reused.
	reused := filepath.Join(root, dirPrefix+strconv.Itoa(os.Getpid())+"-reused")
	if err := os.MkdirAll(filepath.Join(reused, "data"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(reused, "owner"), []byte(strconv.Itoa(os.Getpid())+" 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}

	if got := reapStale(root); !slices.Equal(got, []string{reused}) {
		t.Fatalf("reaped %v, want only %s: the other owners run", got, reused)
	}
	if _, err := startTime(postmaster); err != nil {
		t.Fatalf("the server of a live owner was stopped: %v", err)
	}
	// The owner of stale is killed, as a test binary would be.
	owner.Process.Kill()
	owner.Wait()

	if got := reapStale(root); !slices.Equal(got, []string{stale.dir}) {
		t.Fatalf("reaped %v, want %s", got, stale.dir)
	}
	if _, err := startTime(postmaster); err == nil {
		t.Fatalf("the stale server (PID %d) still runs", postmaster)
	}
	if _, err := os.Stat(stale.dir); !os.IsNotExist(err) {
		t.Fatalf("the stale folder is still there: %v", err)
	}
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, mine.dsn("postgres"))
	if err != nil {
		t.Fatalf("the live owner's server was touched: %v", err)
	}
	conn.Close(ctx)
}
