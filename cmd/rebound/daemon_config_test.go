package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spf13/cobra"

	"github.com/rebound-dr/rebound"
)

// daemonCommand returns the root's daemon command with args parsed.
func daemonCommand(t *testing.T, args ...string) *cobra.Command {
	t.Helper()
	root := NewCLI(nil, &bytes.Buffer{}, &bytes.Buffer{}).Command()
	cmd, rest, err := root.Find(args)
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.ParseFlags(rest); err != nil {
		t.Fatal(err)
	}
	return cmd
}

func writeConfig(t *testing.T, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "daemon.conf")
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestDaemonConfigPrecedence: the file sets flags; REBOUND_SITE_* beats
// it; the command line beats both; repeated keys repeat a flag.
func TestDaemonConfigPrecedence(t *testing.T) {
	t.Setenv("REBOUND_JOIN_TOKEN", "")
	path := writeConfig(t, `# site primary
name = primary
data = "/var/lib/rebound/site"
nbd-addr = 0.0.0.0:10809
repl_addr = 0.0.0.0:8451
server-addr = vault:8441
network = lan=bridge:br0
network = dmz=tap:tap1

token = rbd1.file
`)
	get := func(cmd *cobra.Command, name string) string {
		v, err := cmd.Flags().GetString(name)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	cmd := daemonCommand(t, "site", "--config", path)
	if err := loadDaemonConfig(cmd, "site"); err != nil {
		t.Fatal(err)
	}
	for k, want := range map[string]string{"name": "primary", "data": "/var/lib/rebound/site", "nbd-addr": "0.0.0.0:10809",
		"repl-addr": "0.0.0.0:8451", "server-addr": "vault:8441", "token": "rbd1.file", "spool-limit": "1GiB"} {
		if got := get(cmd, k); got != want {
			t.Fatalf("%s = %q, want %q", k, got, want)
		}
	}
	if nets, _ := cmd.Flags().GetStringToString("network"); !reflect.DeepEqual(nets, map[string]string{"lan": "bridge:br0", "dmz": "tap:tap1"}) {
		t.Fatalf("network %v", nets)
	}

	// The environment beats the file, the command line beats both.
	t.Setenv("REBOUND_SITE_NBD_ADDR", "10.0.0.1:10809")
	t.Setenv("REBOUND_SITE_SERVER_ADDR", "env-vault:8441")
	t.Setenv("REBOUND_JOIN_TOKEN", "rbd1.env")
	cmd = daemonCommand(t, "site", "--config", path, "--server-addr", "flag-vault:8441")
	if err := loadDaemonConfig(cmd, "site"); err != nil {
		t.Fatal(err)
	}
	for k, want := range map[string]string{"nbd-addr": "10.0.0.1:10809", "server-addr": "flag-vault:8441", "token": "rbd1.env", "name": "primary"} {
		if got := get(cmd, k); got != want {
			t.Fatalf("%s = %q, want %q", k, got, want)
		}
	}
	// REBOUND_SITE_CONFIG names the file when --config is not given.
	t.Setenv("REBOUND_SITE_CONFIG", path)
	cmd = daemonCommand(t, "site")
	if err := loadDaemonConfig(cmd, "site"); err != nil || get(cmd, "name") != "primary" {
		t.Fatalf("from REBOUND_SITE_CONFIG: %q %v", get(cmd, "name"), err)
	}
}

func TestDaemonConfigErrors(t *testing.T) {
	for _, c := range []struct{ daemon, text, want string }{
		{"server", "api-addr = x\nbogus = 1\n", `daemon.conf:2: "bogus" is not a setting of rebound server (settings: admin-token-file, api-addr, ca-dir, data, db, grpc-addr, host, metrics-addr, server-id)`},
		{"site", "name primary\n", `daemon.conf:1: want "flag-name = value", not "name primary"`},
		{"agent", "interval = soon\n", `daemon.conf:1: interval = soon: invalid argument`},
		{"site", "config = other.conf\n", `"config" is not a setting`},
	} {
		cmd := daemonCommand(t, c.daemon, "--config", writeConfig(t, c.text))
		err := loadDaemonConfig(cmd, c.daemon)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Fatalf("%s %q: %v, want %q", c.daemon, c.text, err, c.want)
		}
	}
	cmd := daemonCommand(t, "server", "--config", "/nonexistent/rebound.conf")
	if err := loadDaemonConfig(cmd, "server"); err == nil || !strings.Contains(err.Error(), "/nonexistent/rebound.conf") {
		t.Fatalf("missing file: %v", err)
	}
}

// TestServerRunsFromConfig: `rebound server --config FILE` serves with the
// file's data directory and admin token file.
func TestServerRunsFromConfig(t *testing.T) {
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "admin-token")
	path := writeConfig(t, "data = "+filepath.Join(dir, "data")+"\napi-addr = 127.0.0.1:0\ngrpc-addr = 127.0.0.1:0\nmetrics-addr = 127.0.0.1:0\nadmin-token-file = "+tokenFile+"\n")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	var errb bytes.Buffer
	go func() {
		done <- NewCLI(nil, &bytes.Buffer{}, &syncWriter{w: &errb}).Run(ctx, []string{"server", "--config", path})
	}()
	waitUntil(t, 30*time.Second, "the admin token file the config names", func() bool {
		b, err := os.ReadFile(tokenFile)
		return err == nil && strings.HasPrefix(string(b), "rbt_")
	})
	cancel()
	if code := <-done; code != 0 {
		t.Fatalf("server exited %d", code)
	}
	if _, err := os.Stat(filepath.Join(dir, "data", "rebound.db")); err != nil {
		t.Fatalf("database not in the configured data directory: %v", err)
	}
}

// syncWriter serializes writes from a daemon's goroutines.
type syncWriter struct {
	mu sync.Mutex
	w  *bytes.Buffer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

// TestSiteServerAddrs: --server-addr takes one address as before, or
// several comma-separated, from the file, the environment or the flag,
// for sites and agents; a bad one is refused naming the form.
func TestSiteServerAddrs(t *testing.T) {
	for in, want := range map[string][]string{
		"vault:8441":                         {"vault:8441"},
		"vault1:8441,vault2:8441":            {"vault1:8441", "vault2:8441"},
		" vault1:8441 , vault2:8441,":        {"vault1:8441", "vault2:8441"},
		"vault1:8441,vault1:8441,[::1]:8441": {"vault1:8441", "[::1]:8441"},
	} {
		got, err := serverAddrs(in)
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Fatalf("serverAddrs(%q) = %v %v, want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", ",", "vault1:8441,vault2", "vault"} {
		if _, err := serverAddrs(in); rebound.ErrorCode(err) != rebound.EINVALID || !strings.Contains(err.Error(), "HOST:PORT") {
			t.Fatalf("serverAddrs(%q): %v", in, err)
		}
	}
	path := writeConfig(t, "name = primary\nserver-addr = vault1:8441,vault2:8441\n")
	cmd := daemonCommand(t, "site", "--config", path)
	if err := loadDaemonConfig(cmd, "site"); err != nil {
		t.Fatal(err)
	}
	if v, _ := cmd.Flags().GetString("server-addr"); v != "vault1:8441,vault2:8441" {
		t.Fatalf("server-addr from the file: %q", v)
	}
	t.Setenv("REBOUND_AGENT_SERVER_ADDR", "a:8441,b:8441")
	cmd = daemonCommand(t, "agent")
	if err := loadDaemonConfig(cmd, "agent"); err != nil {
		t.Fatal(err)
	}
	if v, _ := cmd.Flags().GetString("server-addr"); v != "a:8441,b:8441" {
		t.Fatalf("agent server-addr from REBOUND_AGENT_SERVER_ADDR: %q", v)
	}
	// A site with a bad list stops before it enrolls or opens anything.
	m := &SiteMain{Config: SiteConfig{Name: "s", DataDir: t.TempDir(), Server: "vault1:8441,vault2"}}
	if err := m.Run(context.Background()); rebound.ErrorCode(err) != rebound.EINVALID || !strings.Contains(err.Error(), "vault2") {
		t.Fatalf("site with a bad --server-addr: %v", err)
	}
}
