package main

import (
	"context"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/guestimage"
)

// TestPlanVMs: two QEMU guests in two stages. The plan failover starts the
// second stage only once the first stage's guest reports booted on its
// console at the recovery site, and both guests boot there.
func TestPlanVMs(t *testing.T) {
	vmlinux, initrd := guestimage.Build(t)
	ctx := context.Background()
	_, svc := testUp(t, t.TempDir())
	power := svc.(rebound.PowerService)
	ps := svc.(rebound.PlanService)
	spec := &rebound.VMSpec{CPUs: 1, MemoryMiB: 256, Kernel: vmlinux, Initrd: initrd,
		Append: guestimage.KernelArgs(guestimage.BootOptions{Rate: 20})}
	booted := regexp.MustCompile(`REBOUND-GUEST booted`)
	for _, name := range []string{"vma", "vmb"} {
		if _, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: name, Site: "primary", Driver: rebound.DriverQEMU, Disks: []int64{64 << 20}, VM: spec}); err != nil {
			t.Fatal(err)
		}
		waitJob(t, svc)(power.StartMachine(ctx, name))
		waitConsole(t, power, name, booted, time.Minute)
		waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: name, To: "recovery"}))
	}
	boot := &rebound.BootCheck{Pattern: "REBOUND-GUEST booted", Timeout: rebound.Duration(2 * time.Minute)}
	if _, err := ps.ApplyPlan(ctx, rebound.Plan{Name: "vms", Stages: []rebound.PlanStage{
		{Name: "first", Machines: []string{"vma"}, Boot: boot},
		{Name: "second", Machines: []string{"vmb"}, Boot: boot},
	}}); err != nil {
		t.Fatal(err)
	}
	j := waitJob(t, svc)(ps.RunPlan(ctx, rebound.PlanRequest{Plan: "vms", Verb: rebound.PlanFailover}))
	for _, name := range []string{"vma", "vmb"} {
		m := getMachine(t, svc, name)
		if m.ActiveSite != "recovery" || m.VMStatus == nil || !m.VMStatus.Running {
			t.Fatalf("%s after the plan failover: at %s, VM %+v", name, m.ActiveSite, m.VMStatus)
		}
		if out, err := power.Console(ctx, name, 1<<20); err != nil || !booted.Match(out) {
			t.Fatalf("%s's console at recovery: %v\n%s", name, err, tailString(string(out), 2000))
		}
	}
	// Order, from the event history (IDs grow): vma booted before vmb's
	// failover job started.
	evs, err := svc.ListEvents(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	var bootedA, startB int64
	vmbJob := j.Plan.Stages[1].Members[0].JobID
	for _, e := range evs {
		switch {
		case e.Kind == "plan.booted" && e.Machine == "vma":
			bootedA = e.ID
		case e.Machine == "vmb" && strings.Contains(e.Message, "job "+vmbJob+" (failover) started"):
			startB = e.ID
		}
	}
	if bootedA == 0 || startB == 0 || bootedA > startB {
		t.Fatalf("events: vma booted #%d, vmb's failover (%s) started #%d; want vma booted first", bootedA, vmbJob, startB)
	}
}
