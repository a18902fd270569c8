// Package pgtest runs a throwaway PostgreSQL server for tests: Debian's
// postgresql package, initdb into a temporary folder, a unix socket in it
// and no TCP port. One server serves a whole test binary (Main); each test
// gets a database of its own (DSN).
package pgtest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

var (
	mu      sync.Mutex
	srv     *server
	srvErr  error
	started bool
	dbSeq   atomic.Int64
)

type server struct {
	bin, dir string
	asUser   string // "postgres" when running as root (initdb refuses root)
}

// Main runs the tests and stops the server they started. Call it from
// TestMain: os.Exit(pgtest.Main(m)).
func Main(m *testing.M) int {
	code := m.Run()
	mu.Lock()
	defer mu.Unlock()
	if srv != nil {
		srv.stop()
	}
	return code
}

// DSN returns the address of a new, empty database on the test server,
// starting the server on first use. A machine without PostgreSQL fails
// the test with the package to install: it is not skipped.
func DSN(t testing.TB) string {
	t.Helper()
	mu.Lock()
	if !started {
		started = true
		srv, srvErr = start()
	}
	s, err := srv, srvErr
	mu.Unlock()
	if err != nil {
		t.Fatalf("PostgreSQL for tests: %v", err)
	}
	name := fmt.Sprintf("t%d_%d", os.Getpid(), dbSeq.Add(1))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, s.dsn("postgres"))
	if err != nil {
		t.Fatalf("connect to the test PostgreSQL: %v", err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatalf("create test database: %v", err)
	}
	return s.dsn(name)
}

func (s *server) dsn(db string) string {
	return "postgres://postgres@/" + db + "?host=" + s.dir + "&sslmode=disable"
}

// binDir finds the newest PostgreSQL under /usr/lib/postgresql (Debian's
// layout), or initdb on PATH.
func binDir() (string, error) {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool {
		vi, _ := strconv.Atoi(filepath.Base(filepath.Dir(dirs[i])))
		vj, _ := strconv.Atoi(filepath.Base(filepath.Dir(dirs[j])))
		return vi < vj
	})
	for i := len(dirs) - 1; i >= 0; i-- {
		if _, err := os.Stat(filepath.Join(dirs[i], "initdb")); err == nil {
			return dirs[i], nil
		}
	}
	if p, err := exec.LookPath("initdb"); err == nil {
		return filepath.Dir(p), nil
	}
	return "", fmt.Errorf("initdb not found: install PostgreSQL (apt-get install -y postgresql; scripts/test.sh does)")
}

func start() (*server, error) {
	bin, err := binDir()
	if err != nil {
		return nil, err
	}
	return startIn(bin, os.TempDir(), os.Getpid())
}

// startIn starts a server for the test binary of PID owner in a new folder
// under root, after stopping the servers of killed test binaries there
// (stale.go).
func startIn(bin, root string, owner int) (*server, error) {
	reapStale(root)
	// Not t.TempDir: the postgres user must reach the folder, and it
	// outlives the first test that asked for it. Its name and "owner"
	// file say which test binary runs it.
	dir, err := os.MkdirTemp(root, fmt.Sprintf("%s%d-", dirPrefix, owner))
	if err != nil {
		return nil, err
	}
	rec, err := ownerOf(owner)
	if err == nil {
		err = os.WriteFile(filepath.Join(dir, "owner"), []byte(rec+"\n"), 0o644)
	}
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	s := &server{bin: bin, dir: dir}
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			return nil, fmt.Errorf("running as root needs the postgres user to run initdb: %w", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if err := os.Chown(dir, uid, gid); err != nil {
			return nil, err
		}
		s.asUser = "postgres"
	}
	data := filepath.Join(dir, "data")
	if out, err := s.run("initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("initdb: %v\n%s", err, out)
	}
	// A unix socket in dir and no TCP port; fsync off: test data need
	// not survive a crash of the machine.
	opts := "-c listen_addresses='' -c unix_socket_directories=" + dir + " -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
	if out, err := s.run("pg_ctl", "-D", data, "-w", "-t", "60", "-l", filepath.Join(dir, "log"), "-o", opts, "start"); err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, "log"))
		os.RemoveAll(dir)
		return nil, fmt.Errorf("pg_ctl start: %v\n%s\n%s", err, out, log)
	}
	return s, nil
}

func (s *server) run(tool string, args ...string) ([]byte, error) {
	path := filepath.Join(s.bin, tool)
	var cmd *exec.Cmd
	if s.asUser != "" {
		cmd = exec.Command("runuser", append([]string{"-u", s.asUser, "--", path}, args...)...)
	} else {
		cmd = exec.Command(path, args...)
	}
	cmd.Dir = s.dir
	return cmd.CombinedOutput()
}

func (s *server) stop() {
	s.run("pg_ctl", "-D", filepath.Join(s.dir, "data"), "-m", "immediate", "-w", "stop")
	os.RemoveAll(s.dir)
}
