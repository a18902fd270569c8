package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

// jobEnd waits for a job to end and returns it, failed or not.
func jobEnd(t testing.TB, svc rebound.Service, job *rebound.Job, err error) *rebound.Job {
	t.Helper()
	if err != nil {
		t.Fatalf("start job: %v", err)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		j, err := svc.GetJob(context.Background(), job.ID)
		if err != nil {
			t.Fatalf("get job: %v", err)
		}
		switch j.State {
		case rebound.JobSucceeded, rebound.JobFailed, rebound.JobCancelled:
			return j
		}
		if time.Now().After(deadline) {
			t.Fatalf("job %s (%s) still %s at step %q", j.ID, j.Type, j.State, j.Step)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// vmRunning asks the site itself whether the machine's VM runs there.
func vmRunning(t *testing.T, up *UpMain, site, name string) bool {
	t.Helper()
	st, err := up.Sites[site].Site.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range st.Machines {
		if m.Name == name {
			return m.VM != nil && m.VM.Running
		}
	}
	t.Fatalf("site %s does not hold %s", site, name)
	return false
}

// TestPlannedShutdownForce: a guest that ignores ACPI and runs no agent
// (SeaBIOS finding nothing to boot on an empty disk). A graceful planned
// failover fails after its timeout with the hint to use force, and the
// machine stays: protected, active at primary, VM running, disk served.
// With the machine's default set to force (rebound machine set), the
// planned failover powers the VM off after the timeout, drains, and the
// recovery site's disk holds every byte written at primary.
func TestPlannedShutdownForce(t *testing.T) {
	ctx := context.Background()
	up, svc := testUp(t, t.TempDir())
	const size = 4 << 20
	m, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "primary", Driver: rebound.DriverQEMU,
		Disks: []int64{size}, VM: &rebound.VMSpec{CPUs: 1, MemoryMiB: 64}})
	if err != nil {
		t.Fatal(err)
	}
	src := m.Disks[0].NBD
	o := newOracle(t, size, 11)
	o.write(src, 20)
	waitJob(t, svc)(svc.(rebound.PowerService).StartMachine(ctx, "vm1"))
	waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm1", To: "recovery"}))
	o.write(src, 20)

	short := rebound.ShutdownOptions{Mode: rebound.ShutdownGraceful, Timeout: rebound.Duration(2 * time.Second)}
	job, err := svc.Failover(ctx, rebound.FailoverRequest{Machine: "vm1", Planned: true, Shutdown: short})
	j := jobEnd(t, svc, job, err)
	if j.State != rebound.JobFailed || !strings.Contains(j.Error, "did not shut down within 2s") || !strings.Contains(j.Error, "rerun with --shutdown force") {
		t.Fatalf("graceful planned failover: %s: %q, want a failure naming --shutdown force", j.State, j.Error)
	}
	if m := getMachine(t, svc, "vm1"); m.State != rebound.MachineProtected || m.ActiveSite != "primary" {
		t.Fatalf("after the failed graceful failover: %s at %s, want protected at primary", m.State, m.ActiveSite)
	}
	if !vmRunning(t, up, "primary", "vm1") {
		t.Fatal("graceful: the VM was stopped; it should still run at primary")
	}
	o.write(src, 20) // still served: the source was not fenced

	r := runCLI(t, svc, "machine", "set", "vm1", "--shutdown", "force", "--shutdown-timeout", "2s")
	wantCode(t, r, 0)
	waitJob(t, svc)(svc.Failover(ctx, rebound.FailoverRequest{Machine: "vm1", Planned: true}))
	if vmRunning(t, up, "primary", "vm1") {
		t.Fatal("force: the VM still runs at primary")
	}
	m = getMachine(t, svc, "vm1")
	if m.State != rebound.MachineFailedOver || m.ActiveSite != "recovery" || !m.Failover.Planned {
		t.Fatalf("after the forced failover: %s at %s", m.State, m.ActiveSite)
	}
	if got, want := diskSum(t, m.Disks[0].NBD), o.model.Sum(); got != want {
		t.Fatalf("recovery disk hash %s, want the source's %s: acknowledged writes lost", got, want)
	}
}
