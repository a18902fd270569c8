package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rebound-dr/rebound"
)

// clearEnv isolates a test from the caller's Rebound environment.
func clearEnv(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	t.Setenv("XDG_CONFIG_HOME", dir)
	t.Setenv(EnvServer, "")
	t.Setenv(EnvToken, "")
	t.Setenv(EnvCA, "")
	return dir
}

func TestWriteClientConfig(t *testing.T) {
	dir := clearEnv(t)
	path, err := WriteClientConfig(ClientConfig{Server: "https://127.0.0.1:8440", Token: "secret", CAPEM: []byte("PEM")})
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(dir, "rebound", "config"); path != want {
		t.Fatalf("path %s, want %s", path, want)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, %v", fi.Mode(), err)
	}
	var onDisk map[string]string
	b, _ := os.ReadFile(path)
	if err := json.Unmarshal(b, &onDisk); err != nil {
		t.Fatal(err)
	}
	ca := filepath.Join(dir, "rebound", "ca.crt")
	if onDisk["server"] != "https://127.0.0.1:8440" || onDisk["token"] != "secret" || onDisk["caFile"] != ca || len(onDisk) != 3 {
		t.Fatalf("file %s", b)
	}
	cfg, err := LoadClientConfig()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Server != "https://127.0.0.1:8440" || cfg.Token != "secret" || cfg.CAFile != ca || string(cfg.CAPEM) != "PEM" {
		t.Fatalf("loaded %+v", cfg)
	}
	// Rewriting replaces it and leaves no temp files behind.
	if _, err := WriteClientConfig(ClientConfig{Server: "https://other", CAFile: ca}); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(filepath.Join(dir, "rebound"))
	if len(ents) != 2 {
		t.Fatalf("dir holds %d files", len(ents))
	}
	if cfg, _ := LoadClientConfig(); cfg.Server != "https://other" || cfg.Token != "" {
		t.Fatalf("reloaded %+v", cfg)
	}
}

func TestClientConfigDefaultPath(t *testing.T) {
	clearEnv(t)
	home := t.TempDir()
	t.Setenv("XDG_CONFIG_HOME", "")
	t.Setenv("HOME", home)
	path, err := ClientConfigPath()
	if err != nil || path != filepath.Join(home, ".config", "rebound", "config") {
		t.Fatalf("path %s, %v", path, err)
	}
}

func TestNoConfig(t *testing.T) {
	clearEnv(t)
	if _, err := LoadClientConfig(); rebound.ErrorCode(err) != rebound.EINVALID || !strings.Contains(err.Error(), "run `rebound up`") {
		t.Fatalf("err %v", err)
	}
	f := &fakeService{}
	r := runWith(t, f, "machine", "list")
	wantCode(t, r, ExitUsage)
	if r.stderr != "rebound: no Rebound server configured: run `rebound up`, or set REBOUND_SERVER and REBOUND_TOKEN\n" {
		t.Fatalf("stderr %q", r.stderr)
	}
	wantCalls(t, f)
}

func TestBadConfig(t *testing.T) {
	dir := clearEnv(t)
	os.MkdirAll(filepath.Join(dir, "rebound"), 0o700)
	os.WriteFile(filepath.Join(dir, "rebound", "config"), []byte("{server:"), 0o600)
	if _, err := LoadClientConfig(); rebound.ErrorCode(err) != rebound.EINVALID || !strings.Contains(err.Error(), "client config") {
		t.Fatalf("err %v", err)
	}
	// A CA file that cannot be read is an error, not an insecure connection.
	t.Setenv(EnvServer, "https://x")
	t.Setenv(EnvCA, filepath.Join(dir, "missing.crt"))
	os.WriteFile(filepath.Join(dir, "rebound", "config"), []byte(`{"server":"https://y"}`), 0o600)
	if _, err := LoadClientConfig(); err == nil || !strings.Contains(err.Error(), "CA file") {
		t.Fatalf("err %v", err)
	}
}

// TestConfigPrecedence: file < environment < flags, field by field.
func TestConfigPrecedence(t *testing.T) {
	dir := clearEnv(t)
	caFile := filepath.Join(dir, "file-ca.crt")
	envCA := filepath.Join(dir, "env-ca.crt")
	flagCA := filepath.Join(dir, "flag-ca.crt")
	for p, s := range map[string]string{caFile: "FILE-CA", envCA: "ENV-CA", flagCA: "FLAG-CA"} {
		os.WriteFile(p, []byte(s), 0o644)
	}
	if _, err := WriteClientConfig(ClientConfig{Server: "https://file", Token: "file-token", CAFile: caFile}); err != nil {
		t.Fatal(err)
	}
	resolve := func(args ...string) ClientConfig {
		t.Helper()
		var got *ClientConfig
		var out, errb bytes.Buffer
		c := NewCLI(nil, &out, &errb)
		c.NewService = func(cfg *ClientConfig) (rebound.Service, error) {
			got = cfg
			return &fakeService{ListMachinesFn: func() ([]rebound.Machine, error) { return nil, nil }}, nil
		}
		if code := c.Run(context.Background(), append([]string{"machine", "list"}, args...)); code != 0 {
			t.Fatalf("code %d: %s", code, errb.String())
		}
		return *got
	}
	check := func(cfg ClientConfig, server, token, ca string) {
		t.Helper()
		if cfg.Server != server || cfg.Token != token || string(cfg.CAPEM) != ca {
			t.Fatalf("got server=%s token=%s ca=%s; want %s %s %s", cfg.Server, cfg.Token, cfg.CAPEM, server, token, ca)
		}
	}
	check(resolve(), "https://file", "file-token", "FILE-CA")
	t.Setenv(EnvToken, "env-token")
	check(resolve(), "https://file", "env-token", "FILE-CA")
	t.Setenv(EnvServer, "https://env")
	t.Setenv(EnvCA, envCA)
	check(resolve(), "https://env", "env-token", "ENV-CA")
	check(resolve("--token", "flag-token"), "https://env", "flag-token", "ENV-CA")
	check(resolve("--server=https://flag", "--ca", flagCA), "https://flag", "env-token", "FLAG-CA")
}
