package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// REBOUND_CPU_PROFILE: a profile file (gzip, as pprof writes) once the
// returned func runs; a path that cannot be created is reported and the
// process runs on.
func TestCPUProfile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cpu.prof")
	var stderr bytes.Buffer
	stop := startCPUProfile(path, &stderr)
	for i := 0; i < 1e6; i++ {
		_ = strings.Repeat("x", i%7)
	}
	stop()
	b, err := os.ReadFile(path)
	if err != nil || len(b) < 2 || b[0] != 0x1f || b[1] != 0x8b {
		t.Fatalf("profile %s: %d bytes, %v; want a gzipped pprof profile", path, len(b), err)
	}
	stop = startCPUProfile(filepath.Join(t.TempDir(), "no", "such", "dir", "cpu.prof"), &stderr)
	stop()
	if !strings.Contains(stderr.String(), "running without a profile") {
		t.Fatalf("an unwritable profile path was not reported: %q", stderr.String())
	}
}

// --capture takes direct and spool; anything else stops site and up at
// start with a usage error (exit 2) naming both, before any enrolment.
func TestCaptureMode(t *testing.T) {
	r := runCLI(t, nil, "site", "--name", "edge", "--data", t.TempDir(), "--capture", "memory", "--token", "rbd1.x.y")
	if r.code != ExitUsage || !strings.Contains(r.stderr, `--capture "memory"`) || !strings.Contains(r.stderr, "direct") || !strings.Contains(r.stderr, "spool") {
		t.Fatalf("site --capture memory: exit %d\n%s", r.code, r.stderr)
	}
	r = runCLI(t, nil, "up", "--data", t.TempDir(), "--capture", "ring")
	if r.code != ExitUsage || !strings.Contains(r.stderr, `--capture "ring"`) {
		t.Fatalf("up --capture ring: exit %d\n%s", r.code, r.stderr)
	}
}
