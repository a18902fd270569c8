package main

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/failpoint"
)

// waitDied waits for server 1 to die at its failpoint.
func waitDied(t *testing.T, p *proc, where string) time.Time {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(2 * time.Minute):
		t.Fatalf("server 1 did not die %s", where)
	}
	return time.Now()
}

// TestSeveralServersKillDuringPlan: the real binaries, two servers on one
// PostgreSQL; server 1 runs a two-stage plan failover (vm1, then vm2) and
// is killed (SIGKILL, by a failpoint) as the plan enters its second stage,
// with vm1 failed over and vm2 not started. The API answers through
// server 2 meanwhile; server 2 takes the plan job over under the same ID,
// skips the stage done and fails vm2 over itself; both failed-over disks
// hold every byte written (the plan goes to the latest state).
func TestSeveralServersKillDuringPlan(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	tc := startTwoServers(t, []string{failpoint.Env + "=server/job/plan-failover/stage second=kill"})
	const size = 8 << 20
	oracles := map[string]*oracle{}
	for i, name := range []string{"vm1", "vm2"} {
		o := newOracle(t, size, int64(31+i))
		src := createProtected(t, tc.svc1, name, size, o)
		o.write(src, 30)
		o.point(tc.svc1, name, false)
		o.write(src, 20) // after the point: in the latest state
		oracles[name] = o
	}
	if _, err := tc.svc1.ApplyPlan(ctx, rebound.Plan{Name: "ha", Stages: []rebound.PlanStage{
		{Name: "first", Machines: []string{"vm1"}},
		{Name: "second", Machines: []string{"vm2"}},
	}}); err != nil {
		t.Fatal(err)
	}
	for name := range oracles {
		waitMachine(t, tc.svc1, name, 30*time.Second, "streaming and normal", func(m *rebound.Machine) bool {
			return m.Health == rebound.HealthNormal && m.Protection != nil && m.Protection.ReplState == "streaming"
		})
	}

	job, err := tc.svc1.RunPlan(ctx, rebound.PlanRequest{Plan: "ha", Verb: rebound.PlanFailover})
	if err != nil {
		t.Fatal(err)
	}
	died := waitDied(t, tc.srv1, "as the plan entered its second stage")

	// Server 2 answers while the job waits for its lease: stage first is
	// done (vm1 failed over), stage second not begun (vm2 protected).
	if m := getMachine(t, tc.both, "vm1"); m.State != rebound.MachineFailedOver || m.ActiveSite != "recovery" {
		t.Fatalf("vm1 at the kill: %s at %s", m.State, m.ActiveSite)
	}
	if m := getMachine(t, tc.svc2, "vm2"); m.State != rebound.MachineProtected || m.ActiveSite != "primary" {
		t.Fatalf("vm2 at the kill: %s at %s", m.State, m.ActiveSite)
	}
	at, err := tc.svc2.GetJob(ctx, job.ID)
	if err != nil {
		t.Fatal(err)
	}
	if at.EndedAt != nil || at.Step != "stage second" || at.Plan == nil || at.Plan.Stages[0].State != rebound.JobSucceeded || at.Plan.Stages[1].State != rebound.JobQueued {
		t.Fatalf("plan job at the kill through server 2: %s at step %q, plan %+v", at.State, at.Step, at.Plan)
	}

	j := waitJobDone(t, tc.svc2, job, nil)
	t.Logf("server 2 finished plan job %s %.1fs after server 1 died", j.ID, time.Since(died).Seconds())
	if j.ID != job.ID || j.Owner != "s2" {
		t.Fatalf("plan job %s owned by %q after the takeover, want %s by s2", j.ID, j.Owner, job.ID)
	}
	for i, st := range j.Plan.Stages {
		mp := st.Members[0]
		if st.State != rebound.JobSucceeded || mp.State != rebound.JobSucceeded || mp.JobID == "" || mp.Point == "" {
			t.Fatalf("stage %s after the takeover: %s, member %+v", st.Name, st.State, mp)
		}
		// vm1's failover ran on server 1 before the kill, vm2's on server 2.
		mj, err := tc.svc2.GetJob(ctx, mp.JobID)
		if err != nil {
			t.Fatal(err)
		}
		if want := []string{"s1", "s2"}[i]; mj.Owner != want || mj.State != rebound.JobSucceeded {
			t.Fatalf("member %s's job %s: %s by %q, want succeeded by %s", mp.Machine, mj.ID, mj.State, mj.Owner, want)
		}
		m := getMachine(t, tc.svc2, mp.Machine)
		if m.State != rebound.MachineFailedOver || m.ActiveSite != "recovery" || m.Failover == nil || m.Failover.Point.ID != mp.Point {
			t.Fatalf("%s after the plan: %s at %s, failover %+v (plan's point %s)", mp.Machine, m.State, m.ActiveSite, m.Failover, mp.Point)
		}
		if sum := diskSum(t, m.Disks[0].NBD); sum != oracles[mp.Machine].model.Sum() {
			t.Fatalf("%s's failed-over disk differs from what was written", mp.Machine)
		}
	}
}

// TestSeveralServersKillDuringReprotect: the real binaries, two servers on
// one PostgreSQL; vm1 failed over to recovery, written there and
// committed, then reprotected back to primary through server 1. The
// recovery site holds the resync's sending (a site failpoint) so the
// resync is in flight when server 1 is killed (SIGKILL, by a failpoint)
// as the job enters its resync step. Server 2 answers meanwhile (vm1
// syncing, no point at primary yet), takes the job over under the same
// ID; the resync is let go only then, and server 2 follows it to its end.
// vm1 is then protected from recovery to primary, and a failback through
// server 2 brings back every byte written.
func TestSeveralServersKillDuringReprotect(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	hold := filepath.Join(dir, "resync-held")
	tc := startTwoServersEnv(t, []string{failpoint.Env + "=server/job/reprotect/resync=kill"},
		map[string][]string{"recovery": {failpoint.Env + "=site/sender/start=pause(" + hold + ")"}})
	o := loopOracle(t, loopDisk, 37)
	touched := failedOverAndCommitted(t, tc.svc1, o)

	job, err := tc.svc1.Reprotect(ctx, rebound.ReprotectRequest{Machine: "vm1"})
	if err != nil {
		t.Fatal(err)
	}
	died := waitDied(t, tc.srv1, "as the reprotect entered its resync")
	// The recovery site started the stream before server 1 reached the
	// resync step; nothing of it is sent before the failpoint, which
	// holds it until the file is removed.
	waitUntil(t, 30*time.Second, "the recovery site to hold the resync", func() bool {
		_, err := os.Stat(hold)
		return err == nil
	})

	// Server 2 answers: the resync is in flight (vm1 syncing to primary,
	// which holds no point of the new stream yet).
	m := getMachine(t, tc.both, "vm1")
	if m.State != rebound.MachineSyncing || m.Protection == nil || m.Protection.SourceSite != "recovery" || m.Protection.TargetSite != "primary" {
		t.Fatalf("vm1 at the kill through server 2: %s, protection %+v", m.State, m.Protection)
	}
	if ps, err := tc.svc2.ListPoints(ctx, "vm1"); err != nil || len(ps) != 0 {
		t.Fatalf("points of vm1 at the kill (the resync has not ended): %d, %v", len(ps), err)
	}
	// Server 2 takes the job over while the resync is still held.
	var owned *rebound.Job
	waitUntil(t, time.Minute, "server 2 to take the reprotect over", func() bool {
		j, err := tc.svc2.GetJob(ctx, job.ID)
		if err != nil || j.EndedAt != nil {
			t.Fatalf("reprotect job %s before the resync was let go: %+v, %v", job.ID, j, err)
		}
		owned = j
		return j.Owner == "s2" && j.Step == "resync"
	})
	took := time.Since(died)
	if err := os.Remove(hold); err != nil {
		t.Fatal(err)
	}
	j := waitJobDone(t, tc.svc2, job, nil)
	t.Logf("server 2 took reprotect job %s over %.1fs after server 1 died (fence %d) and finished it %.1fs after; %d bytes resent of %d touched",
		j.ID, took.Seconds(), owned.Fence, time.Since(died).Seconds(), j.BytesSent, touched.bytes())
	if j.ID != job.ID || j.Owner != "s2" {
		t.Fatalf("reprotect job %s owned by %q after the takeover, want %s by s2", j.ID, j.Owner, job.ID)
	}
	for _, st := range j.Steps {
		if st.State != rebound.JobSucceeded {
			t.Fatalf("step %s is %s", st.Name, st.State)
		}
	}
	// A delta resync: about the blocks written at recovery, not the disk.
	if limit := int64(float64(touched.bytes())*1.05) + loopDisk/1000; j.BytesSent <= 0 || j.BytesSent > limit {
		t.Fatalf("the reprotect sent %d bytes; the writes at recovery touched %d (limit %d)", j.BytesSent, touched.bytes(), limit)
	}
	m = getMachine(t, tc.svc2, "vm1")
	if m.State != rebound.MachineProtected || m.Protection == nil || m.Protection.SourceSite != "recovery" || m.Protection.TargetSite != "primary" {
		t.Fatalf("vm1 after the taken-over reprotect: %s, protection %+v", m.State, m.Protection)
	}
	// Primary's copy is the active one: more writes, then a failback
	// (a job of server 2) lands every byte at primary.
	o.write(m.Disks[0].NBD, 20)
	failbackAndCheck(t, tc.svc2, o.model.Sum(), "primary")
}
