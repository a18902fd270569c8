package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/failpoint"
	"github.com/rebound-dr/rebound/journal"
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
	t.Parallel()
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
	t.Parallel()
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
// waits for the site and completes. Not parallel: its failpoint is
// process-wide.
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

	// The job's readiness loop passes a failpoint at each wait: after
	// three waits it must still be running there, not failed.
	waits := make(chan struct{}, 16)
	defer failpoint.Enable("server/readiness/wait", func(context.Context) {
		select {
		case waits <- struct{}{}:
		default:
		}
	})()
	job, err := loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "vm1", WaitReady: rebound.Duration(time.Minute)})
	if err != nil {
		t.Fatalf("reprotect --wait-ready: %v", err)
	}
	for i := 0; i < 3; i++ {
		select {
		case <-waits:
		case <-time.After(time.Minute):
			j, _ := svc.GetJob(ctx, job.ID)
			t.Fatalf("reprotect --wait-ready did not wait for the site: %+v", j)
		}
	}
	if j, err := svc.GetJob(ctx, job.ID); err != nil || j.State != rebound.JobRunning || j.Step != "readiness" {
		t.Fatalf("reprotect --wait-ready after three waits: %+v (%v), want it waiting at readiness", j, err)
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
	t.Parallel()
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
	t.Parallel()
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
	t.Parallel()
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
	t.Parallel()
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

// clusterCommitted runs the real binaries: vm1 (64 MiB) protected from
// primary to recovery, failed over, 8-16 MiB changed at recovery and
// committed. It returns the 4 KiB blocks changed at recovery. The server
// pauses at the pauseAt job steps (see startCluster).
func clusterCommitted(t *testing.T, pauseAt ...string) (*cluster, *oracle, changeSet) {
	t.Helper()
	c := startCluster(t, pauseAt...)
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		for _, n := range []string{"server", "primary", "recovery"} {
			b, _ := os.ReadFile(filepath.Join(c.dir, n+".log"))
			if len(b) > 6000 {
				b = b[len(b)-6000:]
			}
			t.Logf("--- %s.log (tail) ---\n%s", n, b)
		}
	})
	svc, ctx := c.svc, context.Background()
	const size = 64 << 20
	m, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "primary", Disks: []int64{size}})
	if err != nil {
		t.Fatal(err)
	}
	o := newOracle(t, size, 21)
	o.gen = workload.NewGen(size, workload.Options{Seed: 21, MinLen: 64 << 10, MaxLen: 256 << 10, Align: 4096, ZeroFraction: 0.05, TrimFraction: 0.02})
	o.write(m.Disks[0].NBD, 20)
	waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm1", To: "recovery"}))
	o.write(m.Disks[0].NBD, 10)
	waitJob(t, svc)(svc.Failover(ctx, rebound.FailoverRequest{Machine: "vm1", Point: "latest"}))
	m = getMachine(t, svc, "vm1")
	if got := diskSum(t, m.Disks[0].NBD); got != o.model.Sum() {
		t.Fatalf("failover disk differs from the model")
	}
	changed := changeSet{}
	for changed.bytes() < 10<<20 {
		o.writeTracked(m.Disks[0].NBD, 10, changed)
	}
	waitJob(t, svc)(svc.Commit(ctx, "vm1"))
	return c, o, changed
}

// killAt SIGKILLs site while the job is held at step (a failpoint of the
// cluster's server), lets the job go on against the dead site and returns
// the job as it was at the step.
func killAt(t *testing.T, c *cluster, id, site, step string) *rebound.Job {
	t.Helper()
	var seen *rebound.Job
	c.atStep(step, func() {
		j, err := c.svc.GetJob(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		if j.State != rebound.JobRunning || j.Type+"/"+j.Step != step {
			t.Fatalf("job %s is %s at %s/%s, want it running at %s", id, j.State, j.Type, j.Step, step)
		}
		c.sites[site].kill()
		seen = j
	})
	return seen
}

// jobWithin waits up to d for a job; a job still running then is
// cancelled. It returns the job and its error.
func jobWithin(t *testing.T, svc rebound.Service, id string, d time.Duration) (*rebound.Job, error) {
	t.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(d)
	for {
		j, err := svc.GetJob(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		switch j.State {
		case rebound.JobSucceeded:
			return j, nil
		case rebound.JobFailed, rebound.JobCancelled:
			return j, rebound.Errorf(rebound.EINTERNAL, "job %s %s: %s", j.ID, j.State, j.Error)
		}
		if time.Now().After(deadline) {
			if c, err := svc.CancelJob(ctx, id); err == nil {
				j = c // a job past its point of no return refuses it
			}
			return j, rebound.Errorf(rebound.EINTERNAL, "job %s still running after %s at step %q: cancelled", id, d, j.Step)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// reprotectUntilDone retries a reprotect until a job succeeds.
func reprotectUntilDone(t *testing.T, svc rebound.Service) *rebound.Job {
	t.Helper()
	loop := svc.(rebound.LoopService)
	var done *rebound.Job
	retry(t, "reprotect retry", func() error {
		j, err := loop.Reprotect(context.Background(), rebound.ReprotectRequest{Machine: "vm1"})
		if err != nil {
			return err
		}
		j, err = jobWithin(t, svc, j.ID, 40*time.Second)
		done = j
		return err
	})
	return done
}

// killMidReprotect SIGKILLs site as the reprotect enters step, restarts
// it, and checks the reprotect completes (on its own or by a retry), sends
// about the changed bytes, and leaves primary's copy equal to the model (a
// planned failback reads it over NBD). The site restarts right after the
// job goes on: whether the job's next call finds it dead or back, the
// outcome must be the same.
func killMidReprotect(t *testing.T, site, step string) {
	c, o, changed := clusterCommitted(t, "reprotect/"+step)
	svc, ctx := c.svc, context.Background()
	loop := svc.(rebound.LoopService)
	j, err := loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "vm1"})
	if err != nil {
		t.Fatal(err)
	}
	seen := killAt(t, c, j.ID, site, "reprotect/"+step)
	t.Logf("killed %s at step %s (sent %d of %d)", site, seen.Step, seen.BytesSent, seen.BytesTotal)
	restarted := time.Now()
	c.sites[site].start()
	waitReported(c, restarted)
	final, err := jobWithin(t, svc, j.ID, 45*time.Second)
	if err != nil {
		t.Logf("reprotect after the kill: %v; retrying", err)
		final = reprotectUntilDone(t, svc)
	}
	m := getMachine(t, svc, "vm1")
	if m.State != rebound.MachineProtected || m.Protection.SourceSite != "recovery" || m.Protection.TargetSite != "primary" {
		t.Fatalf("after the reprotect: %s %+v", m.State, m.Protection)
	}
	if limit := int64(float64(changed.bytes())*1.05) + (64<<20)/1000; final.BytesSent > limit {
		t.Fatalf("reprotect with a kill sent %d bytes for %d changed (limit %d)", final.BytesSent, changed.bytes(), limit)
	}
	t.Logf("reprotect sent %d bytes for %d changed", final.BytesSent, changed.bytes())
	o.write(m.Disks[0].NBD, 5)
	failbackAndCheck(t, svc, o.model.Sum(), "primary")
}

// TestReprotectKillTarget: primary, the reprotect's target, is killed after
// it was prepared and before the source starts sending: the resync stalls.
func TestReprotectKillTarget(t *testing.T) {
	t.Parallel()
	killMidReprotect(t, "primary", "start source")
}

// TestReprotectKillSource: recovery, the reprotect's source, is killed
// once it has started its resync.
func TestReprotectKillSource(t *testing.T) {
	t.Parallel()
	killMidReprotect(t, "recovery", "resync")
}

// TestReprotectRetryKeepsAdoptedDisks: the target dies before the first
// point and the reprotect is given up (cancelled); the disks it adopted
// are still there, and a retry completes sending only the delta.
func TestReprotectRetryKeepsAdoptedDisks(t *testing.T) {
	t.Parallel()
	c, o, changed := clusterCommitted(t, "reprotect/start source")
	svc, ctx := c.svc, context.Background()
	loop := svc.(rebound.LoopService)
	j, err := loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "vm1"})
	if err != nil {
		t.Fatal(err)
	}
	killAt(t, c, j.ID, "primary", "reprotect/start source")
	j, err = jobWithin(t, svc, j.ID, 3*time.Second)
	if err == nil {
		t.Logf("the resync finished before the kill took effect: %+v", j)
	}
	base := filepath.Join(c.dir, "primary", "machines", "vm1", "journal", "base-000.img")
	if fi, err := os.Stat(base); err != nil || fi.Size() != 64<<20 {
		t.Fatalf("adopted disk at primary after the failed reprotect: %v", err)
	}
	restarted := time.Now()
	c.sites["primary"].start()
	waitReported(c, restarted)
	final := reprotectUntilDone(t, svc)
	if limit := int64(float64(changed.bytes())*1.05) + (64<<20)/1000; final.BytesSent > limit || final.BytesSent < changed.bytes()/2 {
		t.Fatalf("retried reprotect sent %d bytes for %d changed (limit %d)", final.BytesSent, changed.bytes(), limit)
	}
	m := getMachine(t, svc, "vm1")
	o.write(m.Disks[0].NBD, 5)
	failbackAndCheck(t, svc, o.model.Sum(), "primary")
}

// TestFailbackKillSource: the source of a planned failback (recovery) is
// killed as the failback starts its drain, before it is fenced.
func TestFailbackKillSource(t *testing.T) {
	t.Parallel()
	killMidFailback(t, "recovery", "drain")
}

// TestFailbackKillTarget: the target of a planned failback (primary) is
// killed as the failback starts.
func TestFailbackKillTarget(t *testing.T) {
	t.Parallel()
	killMidFailback(t, "primary", "preflight")
}

// TestFailbackKillTargetAtActivate: the target (primary) is killed after
// the drain fenced the source and before it activates the machine: the
// source must serve again.
func TestFailbackKillTargetAtActivate(t *testing.T) {
	t.Parallel()
	killMidFailback(t, "primary", "activate")
}

// killMidFailback kills site as a planned failback enters step. The
// failback completes (or is retried) and nothing written is lost;
// cancelling it resumes recovery with every byte, and a second failback and
// commit leave primary equal to the model.
func killMidFailback(t *testing.T, site, step string) {
	c, o, _ := clusterCommitted(t, "failback/"+step)
	svc, ctx := c.svc, context.Background()
	loop := svc.(rebound.LoopService)
	waitJob(t, svc)(loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "vm1"}))
	m := getMachine(t, svc, "vm1")
	o.write(m.Disks[0].NBD, 30)

	j, err := loop.Failback(ctx, rebound.FailoverRequest{Machine: "vm1"})
	if err != nil {
		t.Fatal(err)
	}
	seen := killAt(t, c, j.ID, site, "failback/"+step)
	t.Logf("killed %s at failback step %s", site, seen.Step)
	restarted := time.Now()
	c.sites[site].start()
	waitReported(c, restarted)
	if _, err := jobWithin(t, svc, j.ID, 45*time.Second); err != nil {
		t.Logf("failback after the kill: %v; retrying", err)
		// Failing cleanly: the machine runs on at recovery, served, with
		// every byte written there.
		m = getMachine(t, svc, "vm1")
		if m.State != rebound.MachineProtected || m.ActiveSite != "recovery" {
			t.Fatalf("after the failed failback: %s at %s", m.State, m.ActiveSite)
		}
		waitUntil(t, 15*time.Second, "recovery serving vm1 again", func() bool {
			cl, err := nbd.Dial(ctx, m.Disks[0].NBD)
			if err == nil {
				cl.Close()
			}
			return err == nil
		})
		if got := diskSum(t, m.Disks[0].NBD); got != o.model.Sum() {
			t.Fatalf("recovery after the failed failback differs from the model")
		}
		retry(t, "failback retry", func() error {
			j, err := loop.Failback(ctx, rebound.FailoverRequest{Machine: "vm1"})
			if err != nil {
				return err
			}
			_, err = jobWithin(t, svc, j.ID, 40*time.Second)
			return err
		})
	}
	m = getMachine(t, svc, "vm1")
	if m.State != rebound.MachineFailedOver || m.ActiveSite != "primary" {
		t.Fatalf("after the failback: %s at %s", m.State, m.ActiveSite)
	}
	if got := diskSum(t, m.Disks[0].NBD); got != o.model.Sum() {
		t.Fatalf("primary after a failback with a kill differs from the model")
	}
	// Cancel: recovery resumes with every byte it had.
	waitJob(t, svc)(svc.CancelFailover(ctx, "vm1"))
	m = getMachine(t, svc, "vm1")
	if m.ActiveSite != "recovery" || m.State != rebound.MachineProtected {
		t.Fatalf("after cancel: %s at %s", m.State, m.ActiveSite)
	}
	if got := diskSum(t, m.Disks[0].NBD); got != o.model.Sum() {
		t.Fatalf("recovery after the cancelled failback differs from the model")
	}
	o.write(m.Disks[0].NBD, 5)
	failbackAndCheck(t, svc, o.model.Sum(), "primary")
	waitJob(t, svc)(svc.Commit(ctx, "vm1"))
	m = getMachine(t, svc, "vm1")
	if got := diskSum(t, m.Disks[0].NBD); got != o.model.Sum() {
		t.Fatalf("primary after commit differs from the model")
	}
}

// TestReprotectKillBothInResync: the target dies as the source starts, so
// the resync stalls; then the source is killed inside that resync too.
// Both restart and the reprotect completes (on its own or by a retry) with
// about the changed bytes sent and primary's copy exact.
func TestReprotectKillBothInResync(t *testing.T) {
	t.Parallel()
	c, o, changed := clusterCommitted(t, "reprotect/start source", "reprotect/resync")
	svc, ctx := c.svc, context.Background()
	loop := svc.(rebound.LoopService)
	j, err := loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "vm1"})
	if err != nil {
		t.Fatal(err)
	}
	killAt(t, c, j.ID, "primary", "reprotect/start source")
	// The source starts its resync with the target gone, and the job then
	// waits in the resync step, where the source is killed too.
	seen := killAt(t, c, j.ID, "recovery", "reprotect/resync")
	t.Logf("killed recovery in the resync (sent %d of %d)", seen.BytesSent, seen.BytesTotal)
	c.sites["recovery"].start()
	restarted := time.Now()
	c.sites["primary"].start()
	waitReported(c, restarted)
	final, err := jobWithin(t, svc, j.ID, 45*time.Second)
	if err != nil {
		t.Logf("reprotect after the kills: %v; retrying", err)
		final = reprotectUntilDone(t, svc)
	}
	if limit := int64(float64(changed.bytes())*1.05) + (64<<20)/1000; final.BytesSent > limit {
		t.Fatalf("reprotect with kills sent %d bytes for %d changed (limit %d)", final.BytesSent, changed.bytes(), limit)
	}
	m := getMachine(t, svc, "vm1")
	o.write(m.Disks[0].NBD, 5)
	failbackAndCheck(t, svc, o.model.Sum(), "primary")
}

// TestReprotectAfterCrashedAdopt: primary crashed in the middle of
// preparing a reprotect target, after its released disks moved into the
// new journal and before its state recorded that. The retry must keep
// those disks (the only seed) and complete with a delta, byte-exact.
func TestReprotectAfterCrashedAdopt(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	up, svc := fixedUp(t, nil)
	loop := svc.(rebound.LoopService)
	o := loopOracle(t, loopDisk, 18)
	touched := failedOverAndCommitted(t, svc, o)
	waitUntil(t, 10*time.Second, "primary released", func() bool {
		ci, err := up.Sites["primary"].Site.CopyInfo(ctx, "vm1")
		return err == nil && ci.Role == "released"
	})

	cfg := stopSite(t, up, "primary")
	mdir := filepath.Join(cfg.DataDir, "machines", "vm1")
	disks := []rebound.Disk{{Name: "disk0", Size: loopDisk}}
	if err := journal.Adopt(filepath.Join(mdir, "journal"), disks, []string{filepath.Join(mdir, "disk0.raw")}); err != nil {
		t.Fatalf("simulate the crashed adopt: %v", err)
	}
	startSite(t, up, cfg)

	j := waitJob(t, svc)(loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "vm1"}))
	if j.BytesSent <= 0 || j.BytesSent > touched.bytes() {
		t.Fatalf("reprotect after a crashed adopt sent %d bytes; the writes touched %d", j.BytesSent, touched.bytes())
	}
	failbackAndCheck(t, svc, o.model.Sum(), "primary")
}

// TestFencedSourceServedAfterReconnect: a failback job fenced recovery
// (its source) and then lost it, so it could not unfence it; the machine
// is still protected at recovery. When recovery reconnects it serves the
// machine again, with every byte.
func TestFencedSourceServedAfterReconnect(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	up, svc := fixedUp(t, nil)
	loop := svc.(rebound.LoopService)
	o := loopOracle(t, loopDisk, 19)
	failedOverAndCommitted(t, svc, o)
	waitJob(t, svc)(loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "vm1"}))
	m := getMachine(t, svc, "vm1")

	// What the failed job left: the source fenced, the machine protected.
	if _, err := up.Sites["recovery"].Site.Fence(ctx, "vm1"); err != nil {
		t.Fatal(err)
	}
	startSite(t, up, stopSite(t, up, "recovery"))
	waitUntil(t, 15*time.Second, "recovery serving vm1 again", func() bool {
		cl, err := nbd.Dial(ctx, m.Disks[0].NBD)
		if err == nil {
			cl.Close()
		}
		return err == nil
	})
	if got := diskSum(t, m.Disks[0].NBD); got != o.model.Sum() {
		t.Fatalf("recovery after the reconnect differs from the model")
	}
	o.write(m.Disks[0].NBD, 5)
	failbackAndCheck(t, svc, o.model.Sum(), "primary")
}

// waitReported waits until both sites reported after since: a killed
// site's last report can still look fresh, so waitOnline alone may pass
// before the restarted process has connected.
func waitReported(c *cluster, since time.Time) {
	c.t.Helper()
	waitUntil(c.t, 60*time.Second, "sites reporting after the restart", func() bool {
		sites, err := c.svc.ListSites(context.Background())
		n := 0
		for _, s := range sites {
			if (s.Name == "primary" || s.Name == "recovery") && s.Status == rebound.SiteOnline && s.LastSeen.After(since) {
				n++
			}
		}
		return err == nil && n == 2
	})
}
