package main

import (
	"context"
	"testing"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/workload"
)

// changeSet counts the distinct 4 KiB blocks written since a moment: the
// bytes a delta resync has to send.
type changeSet map[int64]bool

func (c changeSet) add(op workload.Op) {
	for b := op.Offset / 4096; b*4096 < op.Offset+op.Length; b++ {
		c[b] = true
	}
}

func (c changeSet) bytes() int64 { return int64(len(c)) * 4096 }

// writeTracked writes n ops through uri and records their blocks in cs.
func (o *oracle) writeTracked(uri string, n int, cs changeSet) {
	o.t.Helper()
	o.track = cs
	defer func() { o.track = nil }()
	o.write(uri, n)
}

// checkDelta asserts a reprotect job sent close to the changed bytes.
func checkDelta(t *testing.T, j *rebound.Job, changed, disk int64) {
	t.Helper()
	limit := int64(float64(changed)*1.05) + disk/1000
	if j.BytesSent > limit {
		t.Fatalf("reprotect sent %d bytes for %d changed (limit %d): %+v", j.BytesSent, changed, limit, j)
	}
	if changed > 0 && j.BytesSent < changed/2 {
		t.Fatalf("reprotect sent %d bytes for %d changed: too few to be right", j.BytesSent, changed)
	}
	t.Logf("reprotect sent %d bytes for %d changed bytes (disk %d)", j.BytesSent, changed, disk)
}

// TestRoundTrip runs the whole loop three times: failover, commit,
// reprotect with a delta resync, planned failback, commit, reprotect
// forward; the bytes are checked over NBD at every step and the bytes sent
// stay close to the bytes changed.
func TestRoundTrip(t *testing.T) {
	t.Parallel()
	_, svc := testUp(t, t.TempDir())
	roundTrip(t, svc, 3)
}

// roundTrip runs TestRoundTrip's loop rounds times on a new machine vm1.
func roundTrip(t *testing.T, svc rebound.Service, rounds int) {
	t.Helper()
	ctx := context.Background()
	loop := svc.(rebound.LoopService)
	const size = 32 << 20
	m, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "primary", Disks: []int64{size}})
	if err != nil {
		t.Fatal(err)
	}
	o := newOracle(t, size, 3)
	o.gen = workload.NewGen(size, workload.Options{Seed: 3, MinLen: 4096, MaxLen: 64 << 10, Align: 4096, ZeroFraction: 0.1, TrimFraction: 0.05})
	o.write(m.Disks[0].NBD, 100)
	waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm1", To: "recovery"}))

	for round := 0; round < rounds; round++ {
		// Forward: write, fail over, write at recovery, commit.
		m = getMachine(t, svc, "vm1")
		if m.ActiveSite != "primary" || m.State != rebound.MachineProtected {
			t.Fatalf("round %d: machine %s at %s", round, m.State, m.ActiveSite)
		}
		o.write(m.Disks[0].NBD, 30)
		waitJob(t, svc)(svc.Failover(ctx, rebound.FailoverRequest{Machine: "vm1", Point: "latest"}))
		m = getMachine(t, svc, "vm1")
		if got := diskSum(t, m.Disks[0].NBD); got != o.model.Sum() {
			t.Fatalf("round %d: failover disk differs", round)
		}
		changed := changeSet{}
		o.writeTracked(m.Disks[0].NBD, 25, changed)
		waitJob(t, svc)(svc.Commit(ctx, "vm1"))

		// Reprotect back to primary: only the changes travel.
		j := waitJob(t, svc)(loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "vm1"}))
		checkDelta(t, j, changed.bytes(), size)
		m = getMachine(t, svc, "vm1")
		if m.State != rebound.MachineProtected || m.Protection.SourceSite != "recovery" || m.Protection.TargetSite != "primary" {
			t.Fatalf("round %d: after reprotect %s %+v", round, m.State, m.Protection)
		}
		// Repeating it reports that it is done.
		again := waitJob(t, svc)(loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "vm1"}))
		if len(again.Steps) != 1 {
			t.Fatalf("repeated reprotect did work: %+v", again)
		}

		// Write, then a planned failback: primary holds recovery's last state.
		o.write(m.Disks[0].NBD, 20)
		waitJob(t, svc)(loop.Failback(ctx, rebound.FailoverRequest{Machine: "vm1"}))
		m = getMachine(t, svc, "vm1")
		if m.ActiveSite != "primary" {
			t.Fatalf("round %d: failback left the machine at %s", round, m.ActiveSite)
		}
		if got := diskSum(t, m.Disks[0].NBD); got != o.model.Sum() {
			t.Fatalf("round %d: primary after failback differs from recovery's last state", round)
		}
		back := changeSet{}
		o.writeTracked(m.Disks[0].NBD, 10, back)
		waitJob(t, svc)(svc.Commit(ctx, "vm1"))

		// Reprotect forward, again with a delta.
		j = waitJob(t, svc)(loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "vm1"}))
		checkDelta(t, j, back.bytes(), size)
		m = getMachine(t, svc, "vm1")
		if m.Protection == nil || m.Protection.TargetSite != "recovery" {
			t.Fatalf("round %d: reprotect forward: %+v", round, m.Protection)
		}
		// The recovery site's copy equals the source: fail over a test copy.
		o.point(svc, "vm1", false)
		last := o.order[len(o.order)-1]
		waitJob(t, svc)(svc.TestFailover(ctx, "vm1", last))
		tf := getMachine(t, svc, "vm1").TestFailover
		if got := diskSum(t, tf.Disks[0].NBD); got != o.points[last] {
			t.Fatalf("round %d: recovery copy after reprotect forward differs", round)
		}
		waitJob(t, svc)(svc.TestFailoverCleanup(ctx, "vm1"))
	}
}
