package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rebound-dr/rebound"
)

// nbdSum hashes a whole export as the real NBD client reads it
// (nbdcopy to stdout).
func nbdSum(t *testing.T, uri string) string {
	t.Helper()
	cmd := exec.Command("nbdcopy", uri, "-")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("nbdcopy: %v", err)
	}
	h := sha256.New()
	if _, err := io.Copy(h, out); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("nbdcopy %s -: %v: %s", uri, err, stderr.String())
	}
	return hex.EncodeToString(h.Sum(nil))
}

// nbdWrite copies n random bytes onto an export from offset 0 with nbdcopy.
func nbdWrite(t *testing.T, uri string, n int64) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "data")
	w, err := os.Create(f)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.CopyN(w, rand.Reader, n); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("nbdcopy", f, uri).CombinedOutput(); err != nil {
		t.Fatalf("nbdcopy %s %s: %v: %s", f, uri, err, out)
	}
}

// TestTestFailoverLatestDrains: a test failover to "latest" right after a
// large write over NBD holds exactly the source's bytes at the moment of
// the command (hashed over NBD with nbdcopy), and its job shows the drain.
func TestTestFailoverLatestDrains(t *testing.T) {
	ctx := context.Background()
	up, svc := testUp(t, t.TempDir())
	const size = 512 << 20
	m, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "primary", Disks: []int64{size}})
	if err != nil {
		t.Fatal(err)
	}
	src := m.Disks[0].NBD
	nbdWrite(t, src, 4<<20)
	waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm1", To: "recovery"}))

	nbdWrite(t, src, 384<<20)
	r := runCLI(t, svc, "test-failover", "vm1", "--point", "latest", "--wait", "-o", "json")
	wantCode(t, r, ExitOK)
	j := decode[rebound.Job](t, r.stdout)
	if msg := stepMessage(&j, "drain"); !strings.Contains(msg, "holds everything primary acknowledged") {
		t.Fatalf("drain step says %q", msg)
	}
	want := nbdSum(t, src)
	got := getMachine(t, svc, "vm1")
	if got.TestFailover == nil || len(got.TestFailover.Disks) != 1 {
		t.Fatalf("no test failover: %+v", got.TestFailover)
	}
	if sum := nbdSum(t, got.TestFailover.Disks[0].NBD); sum != want {
		t.Fatalf("test copy at point %s differs from the source: %s, want %s", got.TestFailover.Point.ID, sum, want)
	}
	waitJob(t, svc)(svc.TestFailoverCleanup(ctx, "vm1"))

	// With the source down, "latest" is what the recovery site holds, and
	// the job and the events say so.
	stopSite(t, up, "primary")
	r = runCLI(t, svc, "test-failover", "vm1", "--wait", "-o", "json")
	wantCode(t, r, ExitOK)
	j = decode[rebound.Job](t, r.stdout)
	if msg := stepMessage(&j, "drain"); !strings.Contains(msg, "source site primary unreachable") || !strings.Contains(msg, "may lack") {
		t.Fatalf("drain step with the source down says %q", msg)
	}
	evs, err := svc.ListEvents(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, e := range evs {
		found = found || e.Kind == "test-failover.undrained" && strings.Contains(e.Message, "unreachable")
	}
	if !found {
		t.Fatalf("no test-failover.undrained event in %+v", evs)
	}
	got = getMachine(t, svc, "vm1")
	if sum := nbdSum(t, got.TestFailover.Disks[0].NBD); sum != want {
		t.Fatalf("test copy with the source down differs: %s, want %s", sum, want)
	}
	waitJob(t, svc)(svc.TestFailoverCleanup(ctx, "vm1"))
}
