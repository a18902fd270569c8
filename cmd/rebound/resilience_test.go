package main

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	rhttp "github.com/rebound-dr/rebound/http"
	"github.com/rebound-dr/rebound/internal/failpoint"
	"github.com/rebound-dr/rebound/nbd"
	"github.com/rebound-dr/rebound/sqlite"
	"github.com/rebound-dr/rebound/workload"
)

// fixedUp starts a server and two sites in-process on fixed free ports, so
// a site or the server can be stopped and started again on the same
// addresses. mod adjusts the config before the start.
func fixedUp(t *testing.T, mod func(*UpConfig)) (*UpMain, rebound.Service) {
	t.Helper()
	return fixedUpLog(t, mod, nil)
}

// fixedUpLog is fixedUp that also logs to w (as `up` logs to rebound.log).
func fixedUpLog(t *testing.T, mod func(*UpConfig), w io.Writer) (*UpMain, rebound.Service) {
	t.Helper()
	cfg := UpConfig{
		DataDir: t.TempDir(), APIAddr: freePort(t), GRPCAddr: freePort(t),
		Sites: []UpSite{
			{Name: "primary", NBDAddr: freePort(t), ReplAddr: freePort(t)},
			{Name: "recovery", NBDAddr: freePort(t), ReplAddr: freePort(t)},
		},
	}
	if mod != nil {
		mod(&cfg)
	}
	var out io.Writer = io.Discard
	if testing.Verbose() {
		out = os.Stderr
	}
	if w != nil {
		out = io.MultiWriter(out, w)
	}
	logger := slog.New(slog.NewTextHandler(out, &slog.HandlerOptions{Level: slog.LevelInfo}))
	m := &UpMain{Config: cfg, Logger: logger}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := m.Run(ctx); err != nil {
		t.Fatalf("up: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	cl, err := rhttp.NewClient(m.Server.APIURL, m.AdminToken, m.Server.CA.CertPEM())
	if err != nil {
		t.Fatal(err)
	}
	return m, cl
}

// stopSite closes a site of up and returns its config for startSite.
func stopSite(t *testing.T, up *UpMain, name string) SiteConfig {
	t.Helper()
	sm := up.Sites[name]
	if err := sm.Close(); err != nil {
		t.Fatalf("close site %s: %v", name, err)
	}
	waitUntil(t, 10*time.Second, "site "+name+" disconnected", func() bool {
		_, ok := up.Server.Control.Site(name)
		return !ok
	})
	return sm.Config
}

// startSite starts a site of up again on its old addresses and data and
// waits until it has connected and reported.
func startSite(t *testing.T, up *UpMain, cfg SiteConfig) {
	t.Helper()
	sm := &SiteMain{Config: cfg, Logger: up.Logger}
	if err := sm.Run(context.Background()); err != nil {
		t.Fatalf("restart site %s: %v", cfg.Name, err)
	}
	up.Sites[cfg.Name] = sm
	since := time.Now()
	waitUntil(t, 20*time.Second, "site "+cfg.Name+" reconnected", func() bool {
		_, ok := up.Server.Control.Site(cfg.Name)
		s, err := up.Server.Service.GetSite(context.Background(), cfg.Name) // live status
		return ok && err == nil && s.LastSeen.After(since) && s.Status == rebound.SiteOnline
	})
}

func waitUntil(t testing.TB, d time.Duration, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitMachine polls the machine until ok holds and returns it.
func waitMachine(t *testing.T, svc rebound.Service, name string, d time.Duration, what string, ok func(m *rebound.Machine) bool) *rebound.Machine {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		m, err := svc.GetMachine(context.Background(), name)
		if err == nil && ok(m) {
			return m
		}
		if time.Now().After(deadline) {
			b, _ := json.Marshal(m)
			t.Fatalf("timed out after %s waiting for %s: machine %s (err %v)", d, what, b, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// wantErr fails unless err has the code and its message holds every part.
func wantErr(t *testing.T, what string, err error, code string, parts ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: no error, want %s", what, code)
	}
	if got := rebound.ErrorCode(err); got != code {
		t.Fatalf("%s: error code %s (%v), want %s", what, got, err, code)
	}
	msg := rebound.ErrorMessage(err)
	for _, p := range parts {
		if !strings.Contains(msg, p) {
			t.Fatalf("%s: error %q does not mention %q", what, msg, p)
		}
	}
}

// createProtected creates vm at primary, writes some data and protects it
// to recovery.
func createProtected(t *testing.T, svc rebound.Service, name string, size int64, o *oracle) string {
	t.Helper()
	ctx := context.Background()
	m, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: name, Site: "primary", Disks: []int64{size}})
	if err != nil {
		t.Fatal(err)
	}
	o.write(m.Disks[0].NBD, 50)
	waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: name, To: "recovery"}))
	return m.Disks[0].NBD
}

// testFailoverSum runs a test failover to sel, hashes its disk, cleans up.
func testFailoverSum(t *testing.T, svc rebound.Service, name, sel string) (rebound.RecoveryPoint, string) {
	t.Helper()
	ctx := context.Background()
	waitJob(t, svc)(svc.TestFailover(ctx, name, sel))
	m := getMachine(t, svc, name)
	if m.TestFailover == nil || len(m.TestFailover.Disks) != 1 {
		t.Fatalf("test failover %s: no disks in %+v", sel, m.TestFailover)
	}
	sum := diskSum(t, m.TestFailover.Disks[0].NBD)
	waitJob(t, svc)(svc.TestFailoverCleanup(ctx, name))
	return m.TestFailover.Point, sum
}

func lastPoint(t *testing.T, svc rebound.Service, name string) rebound.RecoveryPoint {
	t.Helper()
	pl, err := svc.ListPoints(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	if len(pl) == 0 {
		return rebound.RecoveryPoint{}
	}
	return pl[len(pl)-1]
}

// TestSpoolOverflowAndResync: with the recovery site down, writes go on;
// the machine shows spooling (warning), then overflow (critical) once the
// spool bound is passed; when the site returns the dirty regions resync,
// health returns to normal, points appear again and hold the right bytes.
func TestSpoolOverflowAndResync(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	const spool = 2 << 20
	up, svc := fixedUp(t, func(c *UpConfig) { c.SpoolLimit = spool })
	const size = 16 << 20
	o := newOracle(t, size, 11)
	src := createProtected(t, svc, "vm1", size, o)
	before := o.point(svc, "vm1", false)

	rcfg := stopSite(t, up, "recovery")
	// Below the spool bound: spooling, warning.
	o.write(src, 3)
	m := waitMachine(t, svc, "vm1", 15*time.Second, "spooling with a warning", func(m *rebound.Machine) bool {
		p := m.Protection
		return p != nil && p.ReplState == "spooling" && p.BacklogBytes > 0 && m.Health == rebound.HealthWarning
	})
	if !strings.Contains(m.HealthReason, "recovery") {
		t.Fatalf("warning reason %q does not name the recovery site", m.HealthReason)
	}
	// Past the bound: overflow, critical. The writes complete.
	start := time.Now()
	o.write(src, 120)
	if d := time.Since(start); d > 20*time.Second {
		t.Fatalf("writes during the outage took %s", d)
	}
	m = waitMachine(t, svc, "vm1", 15*time.Second, "overflow, critical", func(m *rebound.Machine) bool {
		p := m.Protection
		return p != nil && p.ReplState == "overflow" && p.BacklogBytes > 0 && p.DirtyBytes > 0 && m.Health == rebound.HealthCritical
	})
	if !strings.Contains(m.HealthReason, "spool full") {
		t.Fatalf("critical reason %q does not say the spool is full", m.HealthReason)
	}
	if m.Protection.BacklogBytes > spool {
		t.Fatalf("backlog %d above the spool bound %d", m.Protection.BacklogBytes, spool)
	}
	if got := diskSum(t, src); got != o.model.Sum() {
		t.Fatalf("source disk during overflow: hash %s, want %s", got, o.model.Sum())
	}
	_, err := svc.CreatePoint(ctx, "vm1", false)
	wantErr(t, "a point with the recovery site down", err, rebound.EUNAVAILABLE, `"recovery"`)

	startSite(t, up, rcfg)
	waitMachine(t, svc, "vm1", 30*time.Second, "streaming, normal", func(m *rebound.Machine) bool {
		p := m.Protection
		return p != nil && p.ReplState == "streaming" && p.DirtyBytes == 0 && p.BacklogBytes == 0 && m.Health == rebound.HealthNormal
	})
	// The source cuts points on its own again.
	waitUntil(t, 15*time.Second, "a new point after the resync", func() bool {
		return lastPoint(t, svc, "vm1").Seq > before.Seq
	})
	p := o.point(svc, "vm1", false)
	got, sum := testFailoverSum(t, svc, "vm1", rebound.PointLatestProcessed)
	if got.ID != p.ID || sum != o.points[p.ID] {
		t.Fatalf("test failover to latest-processed after resync: point %s hash %s, want %s hash %s", got.ID, sum, p.ID, o.points[p.ID])
	}
}

// hookScripts writes freeze and thaw hooks that log to dir/hooks.log; the
// freeze hook fails while dir/fail-freeze exists.
func hookScripts(t *testing.T, dir string) (freeze, thaw, log string) {
	t.Helper()
	log = filepath.Join(dir, "hooks.log")
	freeze, thaw = filepath.Join(dir, "freeze.sh"), filepath.Join(dir, "thaw.sh")
	fs := "#!/bin/sh\nif [ -e " + filepath.Join(dir, "fail-freeze") + " ]; then echo \"freeze-failed $1\" >> " + log + "; echo 'database refused to freeze' >&2; exit 3; fi\necho \"freeze $1\" >> " + log + "\n"
	ts := "#!/bin/sh\necho \"thaw $1\" >> " + log + "\n"
	for path, body := range map[string]string{freeze: fs, thaw: ts} {
		if err := os.WriteFile(path, []byte(body), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return freeze, thaw, log
}

func readLines(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return strings.Fields(strings.ReplaceAll(strings.TrimSpace(string(b)), " ", "_"))
}

// TestAppConsistentPoints: app points run freeze, cut, thaw; they resolve
// as latest-app-consistent and hold the model's bytes; a failing freeze is
// a conflict and still thaws; a site without hooks refuses app points and
// keeps cutting crash points.
func TestAppConsistentPoints(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	hooks := t.TempDir()
	freeze, thaw, log := hookScripts(t, hooks)
	up, svc := fixedUp(t, func(c *UpConfig) { c.FreezeHook, c.ThawHook = freeze, thaw })
	const size = 8 << 20
	o := newOracle(t, size, 21)
	src := createProtected(t, svc, "vm1", size, o)
	o.write(src, 30)

	app := o.point(svc, "vm1", true)
	if app.Kind != rebound.PointApp {
		t.Fatalf("app point kind %q", app.Kind)
	}
	if got := readLines(t, log); strings.Join(got, ",") != "freeze_vm1,thaw_vm1" {
		t.Fatalf("hook log %v, want freeze then thaw", got)
	}
	o.write(src, 30)
	o.point(svc, "vm1", false)
	for _, p := range mustPoints(t, svc, "vm1") {
		if p.ID == app.ID && p.Kind != rebound.PointApp {
			t.Fatalf("listed point %s has kind %q", p.ID, p.Kind)
		}
	}
	got, sum := testFailoverSum(t, svc, "vm1", rebound.PointLatestAppConsistent)
	if got.ID != app.ID || sum != o.points[app.ID] {
		t.Fatalf("latest-app-consistent: point %s hash %s, want %s hash %s", got.ID, sum, app.ID, o.points[app.ID])
	}

	// A failing freeze: conflict with the hook's output, and thaw still ran.
	if err := os.WriteFile(filepath.Join(hooks, "fail-freeze"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := svc.CreatePoint(ctx, "vm1", true)
	wantErr(t, "app point with a failing freeze", err, rebound.ECONFLICT, "freeze", "database refused to freeze")
	if got := readLines(t, log); strings.Join(got[2:], ",") != "freeze-failed_vm1,thaw_vm1" {
		t.Fatalf("hook log after a failed freeze %v, want freeze-failed then thaw", got)
	}
	if p := lastPoint(t, svc, "vm1"); p.Kind == rebound.PointApp && p.ID != app.ID {
		t.Fatalf("a failed freeze left app point %s", p.ID)
	}

	// The same site without hooks: app points are refused, crash points go on.
	pcfg := stopSite(t, up, "primary")
	pcfg.FreezeHook, pcfg.ThawHook = "", ""
	startSite(t, up, pcfg)
	_, err = svc.CreatePoint(ctx, "vm1", true)
	wantErr(t, "app point without hooks", err, rebound.ECONFLICT, "primary", "freeze hook")
	o.write(src, 20)
	p := o.point(svc, "vm1", false)
	if p.Kind != rebound.PointCrash {
		t.Fatalf("crash point kind %q", p.Kind)
	}
	if got, sum := testFailoverSum(t, svc, "vm1", p.ID); got.ID != p.ID || sum != o.points[p.ID] {
		t.Fatalf("crash point %s after the refused app point: hash %s, want %s", p.ID, sum, o.points[p.ID])
	}
}

func mustPoints(t *testing.T, svc rebound.Service, name string) []rebound.RecoveryPoint {
	t.Helper()
	pl, err := svc.ListPoints(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	return pl
}

// waitReplicatedAll waits until the recovery site holds every record the
// primary's stream has.
func waitReplicatedAll(t *testing.T, up *UpMain, name string) {
	t.Helper()
	ctx := context.Background()
	waitUntil(t, 20*time.Second, "recovery holds the whole stream", func() bool {
		st, err := up.Sites["primary"].Site.Status(ctx)
		if err != nil {
			return false
		}
		for _, ms := range st.Machines {
			if ms.Name == name {
				got, err := up.Sites["recovery"].Site.Replicated(ctx, name)
				return err == nil && got >= ms.HeadSeq && ms.HeadSeq > 0
			}
		}
		return false
	})
}

// TestFailoverSourceDown: with the primary down a planned failover is
// refused, unplanned ones to latest-processed and latest hold the right
// bytes, the returning primary stays fenced, cancel waits for it and then
// resumes it with nothing lost.
func TestFailoverSourceDown(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	up, svc := fixedUp(t, nil)
	const size = 8 << 20
	o := newOracle(t, size, 31)
	src := createProtected(t, svc, "vm1", size, o)
	o.write(src, 30)
	p := o.point(svc, "vm1", false)
	o.write(src, 30) // after the last point, replicated but not marked
	full := o.model.Sum()
	waitReplicatedAll(t, up, "vm1")

	for round, sel := range []string{rebound.PointLatestProcessed, rebound.PointLatest} {
		pcfg := stopSite(t, up, "primary")
		m := waitMachine(t, svc, "vm1", 15*time.Second, "critical health with the source down", func(m *rebound.Machine) bool {
			return m.Health == rebound.HealthCritical
		})
		if !strings.Contains(m.HealthReason, "primary is offline") {
			t.Fatalf("critical reason %q does not say the source is offline", m.HealthReason)
		}
		start := time.Now()
		_, err := svc.Failover(ctx, rebound.FailoverRequest{Machine: "vm1", Planned: true})
		wantErr(t, "planned failover with the source down", err, rebound.EUNAVAILABLE, `"primary"`)
		if d := time.Since(start); d > 3*time.Second {
			t.Fatalf("planned failover took %s to be refused", d)
		}

		waitJob(t, svc)(svc.Failover(ctx, rebound.FailoverRequest{Machine: "vm1", Point: sel}))
		m = getMachine(t, svc, "vm1")
		if m.State != rebound.MachineFailedOver || m.ActiveSite != "recovery" || m.Failover == nil {
			t.Fatalf("round %d: after failover to %s: state %s at %s", round, sel, m.State, m.ActiveSite)
		}
		want := full
		if sel == rebound.PointLatestProcessed {
			want = o.points[p.ID]
			if m.Failover.Point.ID != p.ID {
				t.Fatalf("latest-processed resolved to %s, want %s", m.Failover.Point.ID, p.ID)
			}
		}
		if got := diskSum(t, m.Disks[0].NBD); got != want {
			t.Fatalf("failover to %s with the source down: hash %s, want %s", sel, got, want)
		}
		if sel == rebound.PointLatest {
			// Writes at recovery survive a restart of the recovery site.
			scratch := newOracle(t, size, 32)
			scratch.model = &workload.Model{Data: append([]byte(nil), o.model.Data...)}
			scratch.write(m.Disks[0].NBD, 30)
			startSite(t, up, stopSite(t, up, "recovery"))
			if got := diskSum(t, m.Disks[0].NBD); got != scratch.model.Sum() {
				t.Fatalf("failed-over disk after a recovery site restart: hash %s, want %s", got, scratch.model.Sum())
			}
		}

		_, err = svc.CancelFailover(ctx, "vm1")
		wantErr(t, "cancel with the source down", err, rebound.EUNAVAILABLE, `"primary"`)
		if m := getMachine(t, svc, "vm1"); m.State != rebound.MachineFailedOver {
			t.Fatalf("refused cancel changed the state to %s", m.State)
		}

		startSite(t, up, pcfg)
		// The returning source is fenced: the machine runs at recovery.
		waitUntil(t, 10*time.Second, "the returning primary fences vm1", func() bool {
			cl, err := nbd.Dial(ctx, src)
			if err == nil {
				cl.Close()
			}
			return err != nil
		})
		waitJob(t, svc)(svc.CancelFailover(ctx, "vm1"))
		m = getMachine(t, svc, "vm1")
		if m.State != rebound.MachineProtected || m.ActiveSite != "primary" || m.Disks[0].NBD != src {
			t.Fatalf("after cancel: state %s at %s, disk %s", m.State, m.ActiveSite, m.Disks[0].NBD)
		}
		if got := diskSum(t, src); got != full {
			t.Fatalf("primary after cancel: hash %s, want the full model %s", got, full)
		}
	}
	// Replication goes on after all that.
	o.write(src, 10)
	q := o.point(svc, "vm1", false)
	if got, sum := testFailoverSum(t, svc, "vm1", q.ID); got.ID != q.ID || sum != o.points[q.ID] {
		t.Fatalf("point %s after the cancels: hash %s, want %s", q.ID, sum, o.points[q.ID])
	}

	// Commit with the source down: the source is released when it returns.
	pcfg := stopSite(t, up, "primary")
	waitJob(t, svc)(svc.Failover(ctx, rebound.FailoverRequest{Machine: "vm1", Point: q.ID}))
	j := waitJob(t, svc)(svc.Commit(ctx, "vm1"))
	if msg := j.Steps[len(j.Steps)-1].Message; !strings.Contains(msg, "released when it reconnects") {
		t.Fatalf("commit with the source down: last step message %q", msg)
	}
	m := getMachine(t, svc, "vm1")
	if m.State != rebound.MachineUnprotected || m.ActiveSite != "recovery" || m.Protection != nil {
		t.Fatalf("after commit: %s at %s", m.State, m.ActiveSite)
	}
	startSite(t, up, pcfg)
	waitUntil(t, 10*time.Second, "the returning primary is released", func() bool {
		st, err := up.Sites["primary"].Site.Status(ctx)
		if err != nil {
			return false
		}
		for _, ms := range st.Machines {
			if ms.Name == "vm1" {
				return ms.Role == "released"
			}
		}
		return false
	})
	if _, err := nbd.Dial(ctx, src); err == nil {
		t.Fatalf("released source export %s still served", src)
	}
	if got := diskSum(t, m.Disks[0].NBD); got != o.points[q.ID] {
		t.Fatalf("committed disk: hash %s, want %s", got, o.points[q.ID])
	}
}

// TestInvalidAPICalls sends bad requests through the REST client: each gets
// the right code and a message that says what is wrong, and the service
// keeps working.
func TestInvalidAPICalls(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	up, svc := fixedUp(t, nil)
	const size = 4 << 20
	o := newOracle(t, size, 41)
	createProtected(t, svc, "vm1", size, o)
	p := o.point(svc, "vm1", false)
	if _, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm0", Site: "primary", Disks: []int64{size}}); err != nil {
		t.Fatal(err)
	}

	_, err := svc.Protect(ctx, rebound.ProtectRequest{Machine: "ghost", To: "recovery"})
	wantErr(t, "protect an unknown machine", err, rebound.ENOTFOUND, "ghost")
	_, err = svc.Failover(ctx, rebound.FailoverRequest{Machine: "vm0"})
	wantErr(t, "failover an unprotected machine", err, rebound.ECONFLICT, "vm0", "not protected")
	_, err = svc.TestFailover(ctx, "vm0", "")
	wantErr(t, "test failover an unprotected machine", err, rebound.ECONFLICT, "vm0", "not protected")

	before := time.Now().Add(-time.Hour).UTC().Format(time.RFC3339Nano)
	selectors := []struct{ sel, code, part string }{
		{"p999999", rebound.ENOTFOUND, "p999999"},
		{"yesterday", rebound.EINVALID, "yesterday"},
		{before, rebound.ENOTFOUND, "recoverable window"},
	}
	for _, c := range selectors {
		_, err = svc.TestFailover(ctx, "vm1", c.sel)
		wantErr(t, "test failover to "+c.sel, err, c.code, c.part)
		_, err = svc.Failover(ctx, rebound.FailoverRequest{Machine: "vm1", Point: c.sel})
		wantErr(t, "failover to "+c.sel, err, c.code, c.part)
	}
	if m := getMachine(t, svc, "vm1"); m.State != rebound.MachineProtected || m.TestFailover != nil || m.ActiveSite != "primary" {
		t.Fatalf("bad selectors changed the machine: %s at %s, test %+v", m.State, m.ActiveSite, m.TestFailover)
	}
	// The source was not fenced by a refused failover.
	if got := diskSum(t, getMachine(t, svc, "vm1").Disks[0].NBD); got != o.model.Sum() {
		t.Fatalf("source after refused failovers: hash %s, want %s", got, o.model.Sum())
	}

	for _, name := range []string{"VM1", "-vm", "vm 1", "a--b", strings.Repeat("x", 64), ""} {
		_, err = svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: name, Site: "primary", Disks: []int64{size}})
		wantErr(t, "create machine "+name, err, rebound.EINVALID, "name")
	}
	_, err = svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm2", Site: "primary", Disks: []int64{1000}})
	wantErr(t, "create machine of 1000 bytes", err, rebound.EINVALID, "1000", "512")
	_, err = svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm2", Site: "nowhere", Disks: []int64{size}})
	wantErr(t, "create machine at an unknown site", err, rebound.EUNAVAILABLE, "nowhere")
	if _, err := svc.GetMachine(ctx, "vm2"); rebound.ErrorCode(err) != rebound.ENOTFOUND {
		t.Fatalf("refused create left machine vm2: %v", err)
	}

	_, err = svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm0", To: "primary"})
	wantErr(t, "protect to its own site", err, rebound.EINVALID, "primary")
	_, err = svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm0", To: "nowhere"})
	wantErr(t, "protect to an unknown site", err, rebound.EUNAVAILABLE, "nowhere")
	_, err = svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm0", To: "recovery", Policy: "nope"})
	wantErr(t, "protect with an unknown policy", err, rebound.ENOTFOUND, "nope")
	_, err = svc.ChangePoint(ctx, "vm1", p.ID)
	wantErr(t, "change-point without a failover", err, rebound.ECONFLICT, "vm1")
	_, err = svc.Commit(ctx, "vm1")
	wantErr(t, "commit without a failover", err, rebound.ECONFLICT, "vm1")
	err = svc.DeleteMachine(ctx, "vm1")
	wantErr(t, "delete a protected machine", err, rebound.ECONFLICT, "vm1")
	_, err = svc.GetJob(ctx, "j-nope")
	wantErr(t, "an unknown job", err, rebound.ENOTFOUND)
	_, err = svc.PutPolicy(ctx, rebound.Policy{Name: "fast", CrashInterval: rebound.Duration(10 * time.Millisecond)})
	wantErr(t, "a policy cutting points every 10ms", err, rebound.EINVALID, "crashInterval")
	_, err = svc.CreateEnrollToken(ctx, "Bad Site")
	wantErr(t, "a token for a bad site name", err, rebound.EINVALID, "Bad Site")

	bad, err := rhttp.NewClient(up.Server.APIURL, "not-a-token", up.Server.CA.CertPEM())
	if err != nil {
		t.Fatal(err)
	}
	_, err = bad.ListMachines(ctx)
	wantErr(t, "a bad token", err, rebound.EUNAUTHORIZED)

	// A second verb while a job runs: the conflict names the job. A policy
	// whose first point comes late keeps the protect job running.
	if _, err := svc.PutPolicy(ctx, rebound.Policy{Name: "slow", CrashInterval: rebound.Duration(10 * time.Minute)}); err != nil {
		t.Fatal(err)
	}
	job, err := svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm0", To: "recovery", Policy: "slow"})
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "the protect job reaches the initial copy", func() bool {
		j, err := svc.GetJob(ctx, job.ID)
		return err == nil && j.Step == "initial copy"
	})
	_, err = svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm0", To: "recovery", Policy: "slow"})
	wantErr(t, "a second protect while one runs", err, rebound.ECONFLICT, job.ID)
	_, err = svc.Failover(ctx, rebound.FailoverRequest{Machine: "vm0"})
	wantErr(t, "failover while protect runs", err, rebound.ECONFLICT, job.ID)
	j, err := svc.CancelJob(ctx, job.ID)
	if err != nil {
		t.Fatal(err)
	}
	if j.State != rebound.JobCancelled {
		t.Fatalf("cancelled job is %s", j.State)
	}

	// The service still works.
	o.write(getMachine(t, svc, "vm1").Disks[0].NBD, 10)
	q := o.point(svc, "vm1", false)
	if got, sum := testFailoverSum(t, svc, "vm1", q.ID); got.ID != q.ID || sum != o.points[q.ID] {
		t.Fatalf("point %s after the bad calls: hash %s, want %s", q.ID, sum, o.points[q.ID])
	}
	if got, sum := testFailoverSum(t, svc, "vm1", p.ID); sum != o.points[p.ID] {
		t.Fatalf("point %s after the bad calls: hash %s, want %s", got.ID, sum, o.points[p.ID])
	}
}

// TestServerRestartFailsRunningJobs: a job of a type no server continues
// (protect; see server/lease.go's registry and the two tests below for the
// ones continued) running when the server stops is failed with the
// interrupted message after the restart, nothing stays
// running, and running the command again finishes the work. Not parallel:
// its failpoint is process-wide.
func TestServerRestartFailsRunningJobs(t *testing.T) {
	ctx := context.Background()
	up, svc := fixedUp(t, nil)
	const size = 4 << 20
	if _, err := svc.PutPolicy(ctx, rebound.Policy{Name: "late", CrashInterval: rebound.Duration(8 * time.Second)}); err != nil {
		t.Fatal(err)
	}
	m, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "primary", Disks: []int64{size}})
	if err != nil {
		t.Fatal(err)
	}
	o := newOracle(t, size, 51)
	o.write(m.Disks[0].NBD, 40)
	// The job holds at the start of its initial copy until the server
	// closes: it is surely running when the restart comes.
	reached := make(chan struct{})
	var once sync.Once
	release := failpoint.Enable("server/job/protect/initial copy", func(ctx context.Context) {
		once.Do(func() { close(reached) })
		<-ctx.Done()
	})
	job, err := svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm1", To: "recovery", Policy: "late"})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-reached:
	case <-time.After(time.Minute):
		t.Fatal("the protect job never reached its initial copy")
	}
	if j, err := svc.GetJob(ctx, job.ID); err != nil || j.Step != "initial copy" || j.State != rebound.JobRunning {
		t.Fatalf("protect job at the failpoint: %+v (%v)", j, err)
	}

	restartServer(t, up, nil)
	release()
	j, err := svc.GetJob(ctx, job.ID)
	if err != nil {
		t.Fatal(err)
	}
	if j.State != rebound.JobFailed || !strings.Contains(j.Error, "interrupted") || !strings.Contains(j.Error, "run the command again") {
		t.Fatalf("job after restart: %s %q, want failed with the interrupted message", j.State, j.Error)
	}
	for _, s := range j.Steps {
		if s.State == rebound.JobRunning || s.State == rebound.JobQueued && s.Name == j.Step {
			t.Fatalf("step %q still %s after restart", s.Name, s.State)
		}
	}
	jobs, err := svc.ListJobs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, x := range jobs {
		if x.State == rebound.JobRunning || x.State == rebound.JobQueued {
			t.Fatalf("job %s (%s) is %s after the restart", x.ID, x.Type, x.State)
		}
	}

	// Running the command again finishes the protection.
	waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm1", To: "recovery", Policy: "late"}))
	if m := getMachine(t, svc, "vm1"); m.State != rebound.MachineProtected {
		t.Fatalf("after protecting again: %s", m.State)
	}
	p := o.point(svc, "vm1", false)
	if got, sum := testFailoverSum(t, svc, "vm1", p.ID); sum != o.points[p.ID] {
		t.Fatalf("point %s after the restart: hash %s, want %s", got.ID, sum, o.points[p.ID])
	}
}

// TestServerRestartContinuesFailover: a failover job running when the
// server stops is continued by the restarted server (the same server ID)
// under the same job ID, from its last completed step, and the recovery
// site's disk holds every write the source acknowledged. Not parallel:
// its failpoint is process-wide.
func TestServerRestartContinuesFailover(t *testing.T) {
	ctx := context.Background()
	up, svc := fixedUp(t, nil)
	const size = 8 << 20
	o := newOracle(t, size, 83)
	src := createProtected(t, svc, "vm1", size, o)
	o.write(src, 40)
	full := o.model.Sum()
	waitReplicatedAll(t, up, "vm1")

	// The first time the job enters activate it holds there until the
	// server closes; the continued job passes.
	reached := make(chan struct{})
	var hits atomic.Int32
	release := failpoint.Enable("server/job/failover/activate", func(ctx context.Context) {
		if hits.Add(1) == 1 {
			close(reached)
			<-ctx.Done()
		}
	})
	defer release()
	job, err := svc.Failover(ctx, rebound.FailoverRequest{Machine: "vm1", Planned: true})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-reached:
	case <-time.After(time.Minute):
		t.Fatal("the failover job never reached its activate step")
	}
	restartServer(t, up, nil)

	j := waitJob(t, svc)(job, nil)
	if j.ID != job.ID || hits.Load() != 2 {
		t.Fatalf("job %s after the restart, activate entered %d times", j.ID, hits.Load())
	}
	for _, st := range j.Steps {
		if st.State != rebound.JobSucceeded {
			t.Fatalf("step %s is %s", st.Name, st.State)
		}
	}
	m := getMachine(t, svc, "vm1")
	if m.State != rebound.MachineFailedOver || m.ActiveSite != "recovery" || m.Failover == nil {
		t.Fatalf("after the continued failover: %s at %s", m.State, m.ActiveSite)
	}
	if got := diskSum(t, m.Disks[0].NBD); got != full {
		t.Fatalf("recovery disk after the continued failover: hash %s, want %s", got, full)
	}
}

// TestServerRestartContinuesReprotect: a reprotect whose resync is in
// flight when the server stops is continued by the restarted server under
// the same job ID, which follows the resync to its end; the machine then
// fails back with every byte. Not parallel: its failpoint is process-wide.
func TestServerRestartContinuesReprotect(t *testing.T) {
	ctx := context.Background()
	up, svc := fixedUp(t, nil)
	o := loopOracle(t, loopDisk, 29)
	failedOverAndCommitted(t, svc, o)
	want := o.model.Sum()

	reached := make(chan struct{})
	var hits atomic.Int32
	release := failpoint.Enable("server/job/reprotect/resync", func(ctx context.Context) {
		if hits.Add(1) == 1 {
			close(reached)
			<-ctx.Done()
		}
	})
	defer release()
	job, err := svc.(rebound.LoopService).Reprotect(ctx, rebound.ReprotectRequest{Machine: "vm1"})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-reached:
	case <-time.After(time.Minute):
		t.Fatal("the reprotect job never reached its resync")
	}
	restartServer(t, up, nil)

	j := waitJob(t, svc)(job, nil)
	if j.ID != job.ID || hits.Load() != 2 {
		t.Fatalf("job %s after the restart, resync entered %d times", j.ID, hits.Load())
	}
	for _, st := range j.Steps {
		if st.State != rebound.JobSucceeded {
			t.Fatalf("step %s is %s", st.Name, st.State)
		}
	}
	if m := getMachine(t, svc, "vm1"); m.State != rebound.MachineProtected || m.Protection.SourceSite != "recovery" {
		t.Fatalf("after the continued reprotect: %s", m.State)
	}
	failbackAndCheck(t, svc, want, "primary")
}

// TestTestFailoverIsolation: a test failover neither sees later source
// writes nor leaks its own writes to the source or the journal.
func TestTestFailoverIsolation(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	up, svc := fixedUp(t, nil)
	const size = 8 << 20
	o := newOracle(t, size, 61)
	src := createProtected(t, svc, "vm1", size, o)
	o.write(src, 30)
	p1 := o.point(svc, "vm1", false)
	atP1 := append([]byte(nil), o.model.Data...)

	waitJob(t, svc)(svc.TestFailover(ctx, "vm1", p1.ID))
	m := getMachine(t, svc, "vm1")
	test := m.TestFailover.Disks[0].NBD
	if !strings.HasSuffix(test, "-test") {
		t.Fatalf("test disk %s is not a -test export", test)
	}
	if got := diskSum(t, test); got != o.points[p1.ID] {
		t.Fatalf("test disk: hash %s, want %s", got, o.points[p1.ID])
	}

	// The source keeps writing and new points arrive at recovery.
	o.write(src, 40)
	p2 := o.point(svc, "vm1", false)
	o.write(src, 40)
	p3 := o.point(svc, "vm1", false)
	ids := map[string]bool{}
	for _, p := range mustPoints(t, svc, "vm1") {
		ids[p.ID] = true
	}
	if !ids[p2.ID] || !ids[p3.ID] {
		t.Fatalf("points %s, %s missing during the test failover", p2.ID, p3.ID)
	}
	if got := diskSum(t, test); got != o.points[p1.ID] {
		t.Fatalf("test disk changed with source writes: hash %s, want %s", got, o.points[p1.ID])
	}

	// Writes to the test disk stay there.
	scratch := newOracle(t, size, 62)
	scratch.model = &workload.Model{Data: atP1}
	scratch.write(test, 40)
	if got := diskSum(t, test); got != scratch.model.Sum() {
		t.Fatalf("test disk after test writes: hash %s, want %s", got, scratch.model.Sum())
	}
	if got := diskSum(t, src); got != o.model.Sum() {
		t.Fatalf("source after test writes: hash %s, want %s", got, o.model.Sum())
	}
	if m := getMachine(t, svc, "vm1"); m.State != rebound.MachineProtected || m.ActiveSite != "primary" {
		t.Fatalf("machine during the test failover: %s at %s", m.State, m.ActiveSite)
	}
	// A restart of the recovery site keeps the test disk and its writes.
	startSite(t, up, stopSite(t, up, "recovery"))
	if got := diskSum(t, test); got != scratch.model.Sum() {
		t.Fatalf("test disk after a recovery site restart: hash %s, want %s", got, scratch.model.Sum())
	}
	o.write(src, 10)
	p3 = o.point(svc, "vm1", false)
	waitJob(t, svc)(svc.TestFailoverCleanup(ctx, "vm1"))
	if _, err := nbd.Dial(ctx, test); err == nil {
		t.Fatalf("test export %s still served after cleanup", test)
	}

	o.write(src, 20)
	p4 := o.point(svc, "vm1", false)
	for _, p := range []rebound.RecoveryPoint{p1, p3, p4} {
		if got, sum := testFailoverSum(t, svc, "vm1", p.ID); got.ID != p.ID || sum != o.points[p.ID] {
			t.Fatalf("test failover to %s after cleanup: hash %s, want %s", p.ID, sum, o.points[p.ID])
		}
	}
}

// restartServer closes the server of up, lets edit change its store while
// it is down (nil: no change), and starts it again on the same addresses.
func restartServer(t *testing.T, up *UpMain, edit func(db *sqlite.DB)) {
	t.Helper()
	ctx := context.Background()
	cfg := up.Server.Config
	if err := up.Server.Close(); err != nil {
		t.Fatalf("close server: %v", err)
	}
	if edit != nil {
		db, err := sqlite.Open(filepath.Join(cfg.DataDir, "rebound.db"))
		if err != nil {
			t.Fatal(err)
		}
		edit(db)
		if err := db.Close(); err != nil {
			t.Fatal(err)
		}
	}
	up.Server = &ServerMain{Config: cfg, Logger: up.Logger}
	if err := up.Server.Run(ctx); err != nil {
		t.Fatalf("restart server: %v", err)
	}
	waitUntil(t, 20*time.Second, "sites reconnect", func() bool {
		_, a := up.Server.Control.Site("primary")
		_, b := up.Server.Control.Site("recovery")
		return a && b
	})
}

// TestServerKilledDuringFailover: the store a server killed in the middle
// of a failover leaves behind (machine failing-over, job running, source
// fenced, maybe the target activated) is not a dead end: after the restart
// the job is failed as interrupted, cancel resumes the source with nothing
// lost, and running the failover again completes it.
func TestServerKilledDuringFailover(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	up, svc := fixedUp(t, nil)
	const size = 8 << 20
	o := newOracle(t, size, 71)
	src := createProtected(t, svc, "vm1", size, o)
	o.write(src, 30)
	p := o.point(svc, "vm1", false)
	o.write(src, 20)
	full := o.model.Sum()
	waitReplicatedAll(t, up, "vm1")

	// killMidFailover leaves what a failover job does up to its drain (and,
	// with activate, its activation) and a store as a kill leaves it.
	killMidFailover := func(activate bool) string {
		t.Helper()
		if _, err := up.Sites["primary"].Site.Fence(ctx, "vm1"); err != nil {
			t.Fatal(err)
		}
		if activate {
			if _, err := up.Sites["recovery"].Site.Activate(ctx, rebound.ActivateSpec{Machine: "vm1", PointID: p.ID, Seq: p.Seq}); err != nil {
				t.Fatal(err)
			}
		}
		var id string
		restartServer(t, up, func(db *sqlite.DB) {
			m, err := db.GetMachine(ctx, "vm1")
			if err != nil {
				t.Fatal(err)
			}
			m.State = rebound.MachineFailingOver
			if err := db.UpdateMachine(ctx, m); err != nil {
				t.Fatal(err)
			}
			now := time.Now().UTC()
			j := rebound.Job{Type: "failover", Machine: "vm1", State: rebound.JobRunning, Step: "drain", CreatedAt: now, UpdatedAt: now,
				Steps: []rebound.JobStep{{Name: "preflight", State: rebound.JobSucceeded}, {Name: "drain", State: rebound.JobRunning}, {Name: "activate", State: rebound.JobQueued}}}
			if err := db.CreateJob(ctx, &j); err != nil {
				t.Fatal(err)
			}
			id = j.ID
		})
		j, err := svc.GetJob(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if j.State != rebound.JobFailed || !strings.Contains(j.Error, "interrupted") {
			t.Fatalf("failover job after restart: %s %q", j.State, j.Error)
		}
		return id
	}

	// Cancel: the source serves again with every write.
	killMidFailover(false)
	if _, err := nbd.Dial(ctx, src); err == nil {
		t.Fatal("source export served while fenced")
	}
	waitJob(t, svc)(svc.CancelFailover(ctx, "vm1"))
	m := getMachine(t, svc, "vm1")
	if m.State != rebound.MachineProtected || m.ActiveSite != "primary" || m.Failover != nil {
		t.Fatalf("after cancelling the interrupted failover: %s at %s", m.State, m.ActiveSite)
	}
	if got := diskSum(t, src); got != full {
		t.Fatalf("source after cancel: hash %s, want %s", got, full)
	}

	// Failover again: it completes on the point.
	killMidFailover(true)
	waitJob(t, svc)(svc.Failover(ctx, rebound.FailoverRequest{Machine: "vm1", Point: p.ID}))
	m = getMachine(t, svc, "vm1")
	if m.State != rebound.MachineFailedOver || m.ActiveSite != "recovery" || m.Failover == nil || m.Failover.Point.ID != p.ID {
		t.Fatalf("after running the failover again: %s at %s (%+v)", m.State, m.ActiveSite, m.Failover)
	}
	if got := diskSum(t, m.Disks[0].NBD); got != o.points[p.ID] {
		t.Fatalf("failover disk: hash %s, want %s", got, o.points[p.ID])
	}
	waitJob(t, svc)(svc.CancelFailover(ctx, "vm1"))
	if got := diskSum(t, src); got != full {
		t.Fatalf("source after the second cancel: hash %s, want %s", got, full)
	}
}
