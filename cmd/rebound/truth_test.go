package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

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

// metricsText scrapes the server's /metrics.
func metricsText(t *testing.T, up *UpMain) string {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(up.Server.CA.CertPEM())
	cl := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	req, _ := http.NewRequest("GET", up.Server.APIURL+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+up.AdminToken)
	resp, err := cl.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 {
		t.Fatalf("/metrics: %s: %s", resp.Status, b)
	}
	return string(b)
}

// copyRole is the role a site holds a machine's copy in ("" for none).
func copyRole(t *testing.T, up *UpMain, site, name string) string {
	t.Helper()
	ci, err := up.Sites[site].Site.CopyInfo(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	return ci.Role
}

func hasEvent(t *testing.T, svc rebound.Service, name, kind string, parts ...string) {
	t.Helper()
	evs, err := svc.ListEvents(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range evs {
		ok := e.Kind == kind
		for _, p := range parts {
			ok = ok && strings.Contains(e.Message, p)
		}
		if ok {
			return
		}
	}
	t.Fatalf("no %s event mentioning %q among %+v", kind, parts, evs)
}

// wantStderr fails unless the CLI exited with code and its error holds
// every part.
func wantStderr(t *testing.T, r result, code int, parts ...string) {
	t.Helper()
	wantCode(t, r, code)
	for _, p := range parts {
		if !strings.Contains(r.stderr, p) {
			t.Fatalf("stderr %q does not mention %q", r.stderr, p)
		}
	}
}

// TestCancelProtect: a protect job blocked inside its initial copy (a step
// hook, no timing window) is cancelled. A CancelJob whose own context is
// done returns at once with the job still running (the hook holds it); then
// rebound job cancel waits for its end. The job ends cancelled, replication is stopped at both sites (the source serves
// the machine as an active copy, the target holds nothing), the machine is
// unprotected, an event says so, and protect then works again.
func TestCancelProtect(t *testing.T) {
	ctx := context.Background()
	up, svc := testUp(t, t.TempDir())
	var block atomic.Bool
	block.Store(true)
	entered, release := make(chan string, 1), make(chan struct{})
	up.Server.Service.StepHook = func(ctx context.Context, j *rebound.Job, step string) {
		if j.Type == "protect" && step == "initial copy" && block.Load() {
			entered <- j.ID
			<-release // deaf to ctx: the job cannot end before the test says
		}
	}
	m, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "primary", Disks: []int64{64 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	nbdWrite(t, m.Disks[0].NBD, 8<<20)
	want := nbdSum(t, m.Disks[0].NBD)
	if _, err := svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm1", To: "recovery"}); err != nil {
		t.Fatal(err)
	}
	var id string
	select {
	case id = <-entered:
	case <-time.After(time.Minute):
		t.Fatal("the protect job never reached its initial copy")
	}
	if m := getMachine(t, svc, "vm1"); m.State != rebound.MachineSyncing || copyRole(t, up, "recovery", "vm1") != "target" {
		t.Fatalf("before the cancel: state %s, recovery holds %q", m.State, copyRole(t, up, "recovery", "vm1"))
	}

	done, stop := context.WithCancel(ctx)
	stop()
	j0, err := up.Server.Service.CancelJob(done, id)
	if err != nil || j0.State != rebound.JobRunning {
		t.Fatalf("CancelJob with a done context: %+v, %v; want the job, still running", j0, err)
	}
	close(release)
	r := runCLI(t, svc, "job", "cancel", id, "-o", "json")
	j := decode[rebound.Job](t, r.stdout)
	if j.State != rebound.JobCancelled {
		t.Fatalf("job after cancel: %s (%s), exit %d", j.State, j.Error, r.code)
	}
	if msg := stepMessage(&j, "initial copy"); !strings.Contains(msg, "replication stopped at both sites") {
		t.Fatalf("initial copy step says %q", msg)
	}
	m = getMachine(t, svc, "vm1")
	if m.State != rebound.MachineUnprotected || m.Protection != nil {
		t.Fatalf("after the cancel: state %s, protection %+v", m.State, m.Protection)
	}
	if p, r := copyRole(t, up, "primary", "vm1"), copyRole(t, up, "recovery", "vm1"); p != "active" || r != "" {
		t.Fatalf("after the cancel primary holds vm1 as %q, recovery as %q; want active and nothing", p, r)
	}
	hasEvent(t, svc, "vm1", "protection.cancelled", "stopped", "unprotected")
	if got := nbdSum(t, m.Disks[0].NBD); got != want {
		t.Fatalf("the source's disk changed across the cancel: %s, want %s", got, want)
	}

	block.Store(false)
	waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm1", To: "recovery"}))
	if _, sum := testFailoverSum(t, svc, "vm1", "latest"); sum != want {
		t.Fatalf("replica after protecting again: %s, want %s", sum, want)
	}
}

// TestUnprotectAndStatus: the status and errors along failover, cancel,
// unprotect and delete, and along failover and commit.
func TestUnprotectAndStatus(t *testing.T) {
	ctx := context.Background()
	up, svc := testUp(t, t.TempDir())
	loop := svc.(rebound.LoopService)
	for _, name := range []string{"vm1", "vm2", "vm3"} {
		m, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: name, Site: "primary", Disks: []int64{32 << 20}})
		if err != nil {
			t.Fatal(err)
		}
		nbdWrite(t, m.Disks[0].NBD, 4<<20)
	}

	// Never protected: errors and the preflight name protect.
	wantStderr(t, runCLI(t, svc, "failover", "vm3"), ExitConflict, "machine vm3 is not protected", "rebound protect vm3 --to SITE")
	wantStderr(t, runCLI(t, svc, "points", "vm3"), ExitConflict, "rebound protect vm3 --to SITE")
	if rep, err := loop.Preflight(ctx, "vm3", ""); err != nil || rep.Operation != "protect" || !rep.OK {
		t.Fatalf("preflight of a machine never protected: %+v %v", rep, err)
	}

	for _, name := range []string{"vm1", "vm2"} {
		waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: name, To: "recovery"}))
	}
	want := nbdSum(t, getMachine(t, svc, "vm1").Disks[0].NBD)
	if !strings.Contains(metricsText(t, up), `rebound_replication_lag_seconds{machine="vm1"}`) {
		waitUntil(t, 30*time.Second, "vm1's lag series", func() bool {
			return strings.Contains(metricsText(t, up), `rebound_replication_lag_seconds{machine="vm1"}`)
		})
	}
	wantStderr(t, runCLI(t, svc, "machine", "delete", "vm1"), ExitConflict, "rebound unprotect vm1")
	wantStderr(t, runCLI(t, svc, "failback", "vm1"), ExitConflict, "has not failed over", "rebound failover vm1")
	wantStderr(t, runCLI(t, svc, "failover", "vm1", "--point", "p999999"), ExitNotFound, "not retained", "rebound points vm1 lists")

	// Failed over: replication stopped, and the verbs that do not apply
	// name commit and cancel.
	waitJob(t, svc)(svc.Failover(ctx, rebound.FailoverRequest{Machine: "vm1"}))
	m := getMachine(t, svc, "vm1")
	if m.State != rebound.MachineFailedOver || m.Protection == nil || m.Protection.ReplState != "stopped" ||
		m.Health != rebound.HealthWarning || !strings.Contains(m.HealthReason, "replication stopped") || !strings.Contains(m.HealthReason, "rebound commit vm1") {
		t.Fatalf("after failover: state %s, protection %+v, health %s %q", m.State, m.Protection, m.Health, m.HealthReason)
	}
	for _, args := range [][]string{{"failback", "vm1"}, {"unprotect", "vm1"}, {"reprotect", "vm1"}} {
		wantStderr(t, runCLI(t, svc, args...), ExitConflict, "rebound commit vm1", "rebound failover cancel vm1")
	}
	if rep, err := loop.Preflight(ctx, "vm1", ""); err != nil || rep.Operation != "commit" || !rep.OK {
		t.Fatalf("preflight of a failed-over machine: %+v %v", rep, err)
	}
	waitJob(t, svc)(svc.CancelFailover(ctx, "vm1"))

	// Unprotect: both sites stop, the replica goes, the series go, and
	// the machine can be deleted.
	r := runCLI(t, svc, "unprotect", "vm1", "--wait", "-o", "json")
	wantCode(t, r, ExitOK)
	if j := decode[rebound.Job](t, r.stdout); j.Type != "unprotect" || j.State != rebound.JobSucceeded {
		t.Fatalf("unprotect job %+v", j)
	}
	m = getMachine(t, svc, "vm1")
	if m.State != rebound.MachineUnprotected || m.Protection != nil || m.Health != rebound.HealthNormal {
		t.Fatalf("after unprotect: state %s, protection %+v, health %s", m.State, m.Protection, m.Health)
	}
	if p, r := copyRole(t, up, "primary", "vm1"), copyRole(t, up, "recovery", "vm1"); p != "active" || r != "" {
		t.Fatalf("after unprotect primary holds vm1 as %q, recovery as %q; want active and nothing", p, r)
	}
	if got := nbdSum(t, m.Disks[0].NBD); got != want {
		t.Fatalf("vm1's disk changed across unprotect: %s, want %s", got, want)
	}
	hasEvent(t, svc, "vm1", "protection.stopped", "replica at recovery is removed")
	if strings.Contains(metricsText(t, up), `rebound_replication_lag_seconds{machine="vm1"}`) {
		t.Fatal("vm1's lag series survived unprotect")
	}
	wantCode(t, runCLI(t, svc, "unprotect", "vm1"), ExitOK) // nothing to do
	wantCode(t, runCLI(t, svc, "machine", "delete", "vm1"), ExitOK)
	if strings.Contains(metricsText(t, up), `machine="vm1"`) {
		t.Fatal("vm1's series survived its deletion")
	}

	// Committed: unprotected at recovery, and health and hints say reprotect.
	waitJob(t, svc)(svc.Failover(ctx, rebound.FailoverRequest{Machine: "vm2"}))
	waitJob(t, svc)(svc.Commit(ctx, "vm2"))
	m = getMachine(t, svc, "vm2")
	if m.State != rebound.MachineUnprotected || m.ActiveSite != "recovery" || m.Health != rebound.HealthWarning ||
		m.HealthReason != "unprotected: run rebound reprotect vm2" {
		t.Fatalf("after commit: state %s at %s, health %s %q", m.State, m.ActiveSite, m.Health, m.HealthReason)
	}
	if strings.Contains(metricsText(t, up), `rebound_replication_lag_seconds{machine="vm2"}`) {
		t.Fatal("vm2's lag series survived the commit")
	}
	for _, args := range [][]string{{"failover", "vm2"}, {"failback", "vm2"}, {"test-failover", "vm2"}} {
		wantStderr(t, runCLI(t, svc, args...), ExitConflict, "rebound reprotect vm2")
	}
	if rep, err := loop.Preflight(ctx, "vm2", ""); err != nil || rep.Operation != "reprotect" {
		t.Fatalf("preflight of a committed machine: %+v %v", rep, err)
	}
}
