package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/nbd"
	"github.com/rebound-dr/rebound/workload"
)

// The reprotect paths the round trip does not take: --verify digest
// compare, lost change maps, split brain, the readiness gate, a reprotect to
// a third site, preflight, and sites killed mid-resync and mid-failback.
// Every check is on bytes read over NBD against the oracle's model.

const loopDisk = 32 << 20

// blocks64 counts the distinct 64 KiB blocks (the digest block size) ops
// touch: the most a digest resync may send for them.
type blocks64 map[int64]bool

func (b blocks64) add(op workload.Op) {
	for i := op.Offset / (64 << 10); i*(64<<10) < op.Offset+op.Length; i++ {
		b[i] = true
	}
}

func (b blocks64) bytes() int64 { return int64(len(b)) * (64 << 10) }

// loopOracle is an oracle whose writes are 4 KiB aligned, as in the round trip.
func loopOracle(t *testing.T, size, seed int64) *oracle {
	o := newOracle(t, size, seed)
	o.gen = workload.NewGen(size, workload.Options{Seed: seed, MinLen: 4096, MaxLen: 64 << 10, Align: 4096, ZeroFraction: 0.1, TrimFraction: 0.05})
	return o
}

// cloneOracle returns an oracle holding a copy of o's model that writes
// its own random data: the other side of a split brain.
func cloneOracle(o *oracle, seed int64) *oracle {
	c := loopOracle(o.t, int64(len(o.model.Data)), seed)
	copy(c.model.Data, o.model.Data)
	return c
}

// failedOverAndCommitted creates vm1 at primary, protects it to recovery,
// fails over to the latest point, writes at recovery and commits. It
// returns the 64 KiB blocks written at recovery.
func failedOverAndCommitted(t *testing.T, svc rebound.Service, o *oracle) blocks64 {
	t.Helper()
	ctx := context.Background()
	m, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "primary", Disks: []int64{loopDisk}})
	if err != nil {
		t.Fatal(err)
	}
	o.write(m.Disks[0].NBD, 100)
	waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm1", To: "recovery"}))
	o.write(m.Disks[0].NBD, 30)
	waitJob(t, svc)(svc.Failover(ctx, rebound.FailoverRequest{Machine: "vm1", Point: "latest"}))
	m = getMachine(t, svc, "vm1")
	if got := diskSum(t, m.Disks[0].NBD); got != o.model.Sum() {
		t.Fatalf("failover disk differs from the model")
	}
	touched := blocks64{}
	o.writeBlocks(m.Disks[0].NBD, 25, touched)
	waitJob(t, svc)(svc.Commit(ctx, "vm1"))
	m = getMachine(t, svc, "vm1")
	if m.State != rebound.MachineUnprotected || m.ActiveSite != "recovery" || m.PreviousSite != "primary" {
		t.Fatalf("after commit: %s at %s (previous %s)", m.State, m.ActiveSite, m.PreviousSite)
	}
	return touched
}

// writeBlocks applies n random ops through uri and records the 64 KiB
// blocks they touch.
func (o *oracle) writeBlocks(uri string, n int, b blocks64) {
	o.t.Helper()
	cl, err := nbd.Dial(context.Background(), uri)
	if err != nil {
		o.t.Fatalf("dial %s: %v", uri, err)
	}
	defer cl.Close()
	for i := 0; i < n; i++ {
		op := o.gen.Next()
		if err := workload.Apply(cl, op); err != nil {
			o.t.Fatalf("write through %s: %v", uri, err)
		}
		o.model.Apply(op)
		b.add(op)
	}
	if err := cl.Flush(); err != nil {
		o.t.Fatal(err)
	}
}

// stepMessage returns the message of a job's step.
func stepMessage(j *rebound.Job, step string) string {
	for _, s := range j.Steps {
		if s.Name == step {
			return s.Message
		}
	}
	return ""
}

// failbackAndCheck runs a planned failback and checks the machine's disk
// at its new active site against want.
func failbackAndCheck(t *testing.T, svc rebound.Service, want, site string) {
	t.Helper()
	loop := svc.(rebound.LoopService)
	waitJob(t, svc)(loop.Failback(context.Background(), rebound.FailoverRequest{Machine: "vm1"}))
	m := getMachine(t, svc, "vm1")
	if m.ActiveSite != site {
		t.Fatalf("failback left the machine at %s, want %s", m.ActiveSite, site)
	}
	if got := diskSum(t, m.Disks[0].NBD); got != want {
		t.Fatalf("disk at %s after failback: hash %s, want %s", site, got, want)
	}
}

// TestReprotectVerify: --verify compares the digests of the whole disk and
// sends only blocks that differ; the copy at primary then equals recovery's.
func TestReprotectVerify(t *testing.T) {
	ctx := context.Background()
	_, svc := testUp(t, t.TempDir())
	loop := svc.(rebound.LoopService)
	o := loopOracle(t, loopDisk, 11)
	touched := failedOverAndCommitted(t, svc, o)

	j := waitJob(t, svc)(loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "vm1", Verify: true}))
	if j.BytesCompared != loopDisk {
		t.Fatalf("verify compared %d bytes, want the disk's %d", j.BytesCompared, loopDisk)
	}
	if j.BytesSent <= 0 || j.BytesSent > touched.bytes() {
		t.Fatalf("verify sent %d bytes; the writes touched %d bytes of 64 KiB blocks", j.BytesSent, touched.bytes())
	}
	if msg := stepMessage(j, "preflight"); !strings.Contains(msg, "--verify") {
		t.Fatalf("preflight step says %q, want the --verify digest compare named", msg)
	}
	t.Logf("verify: compared %d, sent %d, touched %d", j.BytesCompared, j.BytesSent, touched.bytes())
	failbackAndCheck(t, svc, o.model.Sum(), "primary")
}

// TestReprotectUntrustedTracking: the active copy's change maps are lost
// while its site is down; reprotect falls back to a digest compare and the
// result is byte-exact.
func TestReprotectUntrustedTracking(t *testing.T) {
	ctx := context.Background()
	up, svc := fixedUp(t, nil)
	loop := svc.(rebound.LoopService)
	o := loopOracle(t, loopDisk, 12)
	touched := failedOverAndCommitted(t, svc, o)

	cfg := stopSite(t, up, "recovery")
	maps, _ := filepath.Glob(filepath.Join(cfg.DataDir, "machines", "vm1", "changed-*.map"))
	if len(maps) == 0 {
		t.Fatalf("no change maps under %s", cfg.DataDir)
	}
	for _, p := range maps {
		if err := os.Remove(p); err != nil {
			t.Fatal(err)
		}
	}
	startSite(t, up, cfg)

	j := waitJob(t, svc)(loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "vm1"}))
	if msg := stepMessage(j, "preflight"); !strings.Contains(msg, "block digests are compared") {
		t.Fatalf("preflight step says %q, want a digest compare", msg)
	}
	if j.BytesCompared != loopDisk || j.BytesSent <= 0 || j.BytesSent > touched.bytes() {
		t.Fatalf("digest fallback compared %d, sent %d (touched %d)", j.BytesCompared, j.BytesSent, touched.bytes())
	}
	failbackAndCheck(t, svc, o.model.Sum(), "primary")
}

// TestReprotectReadinessGate: with the active site down, reprotect fails
// at once naming the site, the fix and --wait-ready; with --wait-ready it
// waits for the site and completes.
func TestReprotectReadinessGate(t *testing.T) {
	ctx := context.Background()
	up, svc := fixedUp(t, nil)
	loop := svc.(rebound.LoopService)
	o := loopOracle(t, loopDisk, 13)
	failedOverAndCommitted(t, svc, o)

	cfg := stopSite(t, up, "recovery")
	start := time.Now()
	_, err := loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "vm1"})
	wantErr(t, "reprotect with the capture side down", err, rebound.EUNAVAILABLE, `"recovery"`, "start it", "--wait-ready", "retry")
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("reprotect took %s to refuse; it must fail at once", d)
	}

	job, err := loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "vm1", WaitReady: rebound.Duration(20 * time.Second)})
	if err != nil {
		t.Fatalf("reprotect --wait-ready: %v", err)
	}
	time.Sleep(3 * time.Second)
	if j, err := svc.GetJob(ctx, job.ID); err != nil || j.State != rebound.JobRunning || j.Step != "readiness" {
		t.Fatalf("reprotect --wait-ready after 3s: %+v (%v), want it waiting at readiness", j, err)
	}
	startSite(t, up, cfg)
	waitJob(t, svc)(job, nil)
	m := getMachine(t, svc, "vm1")
	if m.State != rebound.MachineProtected || m.Protection.SourceSite != "recovery" || m.Protection.TargetSite != "primary" {
		t.Fatalf("after reprotect: %s %+v", m.State, m.Protection)
	}
	p := o.point(svc, "vm1", false)
	if _, sum := testFailoverSum(t, svc, "vm1", p.ID); sum != o.points[p.ID] {
		t.Fatalf("primary's copy after the waited reprotect differs from the model")
	}
}

// TestReprotectToThirdSite: reprotect --to a site that never held the
// machine makes a full copy and says why; failback to it is byte-exact.
func TestReprotectToThirdSite(t *testing.T) {
	ctx := context.Background()
	_, svc := fixedUp(t, func(c *UpConfig) {
		c.Sites = append(c.Sites, UpSite{Name: "dr2", NBDAddr: freePort(t), ReplAddr: freePort(t)})
	})
	loop := svc.(rebound.LoopService)
	o := loopOracle(t, loopDisk, 14)
	failedOverAndCommitted(t, svc, o)

	j := waitJob(t, svc)(loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "vm1", To: "dr2"}))
	if msg := stepMessage(j, "preflight"); !strings.Contains(msg, "full copy") || !strings.Contains(msg, "dr2") || !strings.Contains(msg, "holds no copy") {
		t.Fatalf("reprotect to dr2 says %q, want a full copy and why", msg)
	}
	m := getMachine(t, svc, "vm1")
	if m.State != rebound.MachineProtected || m.Protection.SourceSite != "recovery" || m.Protection.TargetSite != "dr2" {
		t.Fatalf("after reprotect to dr2: %s %+v", m.State, m.Protection)
	}
	m = getMachine(t, svc, "vm1")
	o.write(m.Disks[0].NBD, 10)
	failbackAndCheck(t, svc, o.model.Sum(), "dr2")
}

// checkNames fails unless the report holds every named check with ok.
func checkNames(t *testing.T, rep *rebound.PreflightReport, ok bool, names ...string) {
	t.Helper()
	for _, n := range names {
		found := false
		for _, c := range rep.Checks {
			if c.Name == n {
				found = true
				if c.OK != ok {
					t.Fatalf("preflight %s: check %q ok=%v (%s), want %v", rep.Operation, n, c.OK, c.Message, ok)
				}
			}
		}
		if !found {
			t.Fatalf("preflight %s: no check %q in %+v", rep.Operation, n, rep.Checks)
		}
	}
}

// TestPreflightChecks: the checks of a failover and of a reprotect, all passing
// with both sites up; with the target down the failing check is named, and
// a reprotect to it fails with the preflight's message.
func TestPreflightChecks(t *testing.T) {
	ctx := context.Background()
	up, svc := fixedUp(t, nil)
	loop := svc.(rebound.LoopService)
	o := loopOracle(t, loopDisk, 15)
	createProtected(t, svc, "vm1", loopDisk, o)

	rep, err := loop.Preflight(ctx, "vm1", "")
	if err != nil {
		t.Fatal(err)
	}
	if rep.Operation != "failover" || !rep.OK {
		t.Fatalf("preflight of a protected machine: %+v", rep)
	}
	checkNames(t, rep, true, "recovery points", "peer reachable", "target space", "generations")

	cfg := stopSite(t, up, "recovery")
	rep, err = loop.Preflight(ctx, "vm1", "failover")
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK {
		t.Fatalf("preflight with the recovery site down passed: %+v", rep)
	}
	checkNames(t, rep, false, "peer reachable")
	startSite(t, up, cfg)

	// Fail over, commit: the reprotect preflight.
	waitJob(t, svc)(svc.Failover(ctx, rebound.FailoverRequest{Machine: "vm1", Point: "latest"}))
	waitJob(t, svc)(svc.Commit(ctx, "vm1"))
	rep, err = loop.Preflight(ctx, "vm1", "")
	if err != nil {
		t.Fatal(err)
	}
	if rep.Operation != "reprotect" || !rep.OK {
		t.Fatalf("preflight of a committed machine: %+v", rep)
	}
	checkNames(t, rep, true, "capture side", "peer reachable", "generations", "target space")

	stopSite(t, up, "primary")
	rep, err = loop.Preflight(ctx, "vm1", "reprotect")
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK {
		t.Fatalf("reprotect preflight with primary down passed: %+v", rep)
	}
	checkNames(t, rep, false, "peer reachable")
	_, err = loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "vm1"})
	wantErr(t, "reprotect to a closed site", err, rebound.EUNAVAILABLE, "preflight", "peer reachable", "primary")
}

// splitBrain fails vm1 over to recovery while primary is down, commits,
// then lets primary take writes while it cannot reach the server (a
// partition: the server cannot fence or release it). When primary
// reconnects it is released and finds it diverged. It returns recovery's
// and primary's oracles.
func splitBrain(t *testing.T) (*UpMain, rebound.Service, *oracle, *oracle) {
	t.Helper()
	ctx := context.Background()
	up, svc := fixedUp(t, nil)
	o := loopOracle(t, loopDisk, 16)
	primURI := createProtected(t, svc, "vm1", loopDisk, o)
	o.write(primURI, 20)
	o.point(svc, "vm1", false)
	cfg := stopSite(t, up, "primary")

	waitJob(t, svc)(svc.Failover(ctx, rebound.FailoverRequest{Machine: "vm1", Point: "latest"}))
	m := getMachine(t, svc, "vm1")
	if got := diskSum(t, m.Disks[0].NBD); got != o.model.Sum() {
		t.Fatalf("unplanned failover disk differs from the model")
	}
	po := cloneOracle(o, 17)
	o.write(m.Disks[0].NBD, 20)
	waitJob(t, svc)(svc.Commit(ctx, "vm1"))

	// Primary comes back cut off from the server and takes writes.
	part := cfg
	part.Server = freePort(t)
	sm := &SiteMain{Config: part, Logger: up.Logger}
	if err := sm.Run(ctx); err != nil {
		t.Fatalf("start partitioned primary: %v", err)
	}
	po.write(primURI, 20)
	if err := sm.Close(); err != nil {
		t.Fatal(err)
	}
	startSite(t, up, cfg)
	waitUntil(t, 10*time.Second, "primary released", func() bool {
		ci, err := up.Sites["primary"].Site.CopyInfo(ctx, "vm1")
		return err == nil && ci.Role == "released"
	})
	return up, svc, o, po
}

// TestSplitBrainKeepRecovery: reprotect refuses the diverged copies and
// names --keep; --keep recovery overwrites primary's writes with a digest
// compare and primary ends equal to recovery.
func TestSplitBrainKeepRecovery(t *testing.T) {
	ctx := context.Background()
	_, svc, o, _ := splitBrain(t)
	loop := svc.(rebound.LoopService)

	j, err := loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "vm1"})
	if err == nil {
		err = jobErr(svc, j)
	}
	if err == nil || !strings.Contains(err.Error(), "split brain") || !strings.Contains(err.Error(), "--keep recovery") || !strings.Contains(err.Error(), "--keep primary") {
		t.Fatalf("reprotect of diverged copies: %v, want a split brain refusal naming --keep", err)
	}
	if m := getMachine(t, svc, "vm1"); m.State != rebound.MachineUnprotected || m.ActiveSite != "recovery" {
		t.Fatalf("refused reprotect changed the machine: %s at %s", m.State, m.ActiveSite)
	}
	j = waitJob(t, svc)(loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "vm1", Keep: "recovery"}))
	if j.BytesCompared != loopDisk {
		t.Fatalf("--keep recovery compared %d bytes, want %d", j.BytesCompared, loopDisk)
	}
	failbackAndCheck(t, svc, o.model.Sum(), "primary")
}

// TestSplitBrainKeepPrimary: --keep primary makes primary's copy, with its
// writes, the active one and resyncs recovery to it.
func TestSplitBrainKeepPrimary(t *testing.T) {
	ctx := context.Background()
	_, svc, _, po := splitBrain(t)
	loop := svc.(rebound.LoopService)

	waitJob(t, svc)(loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "vm1", Keep: "primary"}))
	m := getMachine(t, svc, "vm1")
	if m.ActiveSite != "primary" || m.State != rebound.MachineProtected || m.Protection.SourceSite != "primary" || m.Protection.TargetSite != "recovery" {
		t.Fatalf("after --keep primary: %s at %s %+v", m.State, m.ActiveSite, m.Protection)
	}
	if got := diskSum(t, m.Disks[0].NBD); got != po.model.Sum() {
		t.Fatalf("primary's disk after --keep primary differs from its own writes")
	}
	po.write(m.Disks[0].NBD, 10)
	failbackAndCheck(t, svc, po.model.Sum(), "recovery")
}
