package main

import (
	"context"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/guestimage"
)

var (
	verifiedRE = regexp.MustCompile(`REBOUND-GUEST verified (\d+) records, last seq (\d+), ok`)
	wroteRE    = regexp.MustCompile(`REBOUND-GUEST wrote seq (\d+)`)
)

// waitConsole polls the machine's console (at its active site) until re
// matches, and returns the last match.
func waitConsole(t testing.TB, power rebound.PowerService, name string, re *regexp.Regexp, timeout time.Duration) []string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last []byte
	for time.Now().Before(deadline) {
		b, err := power.Console(context.Background(), name, 1<<20)
		if err == nil {
			last = b
			if ms := re.FindAllStringSubmatch(string(b), -1); len(ms) > 0 {
				return ms[len(ms)-1]
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("console of %s: no %q within %s; console:\n%s", name, re, timeout, tailString(string(last), 3000))
	return nil
}

func tailString(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

func atoi(t *testing.T, s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestVMRoundTrip runs a real QEMU guest (TCG) through the loop. Every
// check reads the guest's own verdict from its console: its records are
// intact and its filesystem clean after an unplanned failover to an
// app-consistent point and after a planned failback.
func TestVMRoundTrip(t *testing.T) {
	vmlinux, initrd := guestimage.Build(t)
	ctx := context.Background()
	_, svc := testUp(t, t.TempDir())
	power := svc.(rebound.PowerService)
	loop := svc.(rebound.LoopService)

	spec := &rebound.VMSpec{CPUs: 1, MemoryMiB: 256, Kernel: vmlinux, Initrd: initrd,
		Append: guestimage.KernelArgs(guestimage.BootOptions{Rate: 40})}
	if _, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "primary", Driver: rebound.DriverQEMU, Disks: []int64{64 << 20}, VM: spec}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	waitJob(t, svc)(power.StartMachine(ctx, "vm1"))
	waitConsole(t, power, "vm1", regexp.MustCompile(`REBOUND-GUEST booted`), time.Minute)
	t.Logf("first boot: %s to booted", time.Since(start).Round(time.Millisecond))
	waitConsole(t, power, "vm1", wroteRE, 30*time.Second)

	// 1. Protect and cut an app-consistent point through the guest agent.
	waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm1", To: "recovery"}))
	atPoint := atoi(t, waitConsole(t, power, "vm1", wroteRE, 10*time.Second)[1])
	p, err := svc.CreatePoint(ctx, "vm1", true)
	if err != nil {
		t.Fatalf("app-consistent point: %v", err)
	}
	if p.Kind != rebound.PointApp {
		t.Fatalf("point kind %s", p.Kind)
	}
	// The guest writes on after the point; failover must not bring those back.
	waitUntil(t, 30*time.Second, "the guest writing past the point", func() bool {
		b, err := power.Console(ctx, "vm1", 1<<20)
		ms := wroteRE.FindAllStringSubmatch(string(b), -1)
		return err == nil && len(ms) > 0 && atoi(t, ms[len(ms)-1][1]) > atPoint
	})

	// 2. Unplanned failover to latest-app-consistent: the guest boots at
	// recovery, finds every record up to the point intact, fsck clean.
	start = time.Now()
	waitJob(t, svc)(svc.Failover(ctx, rebound.FailoverRequest{Machine: "vm1", Point: rebound.PointLatestAppConsistent}))
	m := getMachine(t, svc, "vm1")
	if m.ActiveSite != "recovery" {
		t.Fatalf("after failover active at %s", m.ActiveSite)
	}
	waitConsole(t, power, "vm1", regexp.MustCompile(`REBOUND-GUEST booted`), time.Minute)
	t.Logf("RTO: failover command to booted at recovery: %s", time.Since(start).Round(time.Millisecond))
	cons, _ := power.Console(ctx, "vm1", 1<<20)
	if !regexp.MustCompile(`REBOUND-GUEST fsck clean`).Match(cons) {
		t.Fatalf("guest at recovery: filesystem not clean:\n%s", tailString(string(cons), 3000))
	}
	v := verifiedRE.FindStringSubmatch(string(cons))
	if v == nil {
		t.Fatalf("guest at recovery: no ok verdict:\n%s", tailString(string(cons), 3000))
	}
	if n := atoi(t, v[1]); n < atPoint {
		t.Fatalf("guest at recovery verified %d records; %d were written before the point", n, atPoint)
	}

	// 3. Commit, reprotect; the guest writes more at recovery.
	waitJob(t, svc)(svc.Commit(ctx, "vm1"))
	waitJob(t, svc)(loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "vm1"}))
	atRecovery := atoi(t, waitConsole(t, power, "vm1", wroteRE, 30*time.Second)[1])

	// 4. Planned failback: the guest shuts down cleanly at recovery and
	// boots at primary with every record.
	waitJob(t, svc)(loop.Failback(ctx, rebound.FailoverRequest{Machine: "vm1"}))
	if m := getMachine(t, svc, "vm1"); m.ActiveSite != "primary" {
		t.Fatalf("after failback active at %s", m.ActiveSite)
	}
	waitConsole(t, power, "vm1", regexp.MustCompile(`REBOUND-GUEST booted`), time.Minute)
	cons, _ = power.Console(ctx, "vm1", 1<<20)
	v = verifiedRE.FindStringSubmatch(string(cons))
	if v == nil || !regexp.MustCompile(`REBOUND-GUEST fsck clean`).Match(cons) {
		t.Fatalf("guest at primary after failback:\n%s", tailString(string(cons), 3000))
	}
	if n := atoi(t, v[1]); n < atRecovery {
		t.Fatalf("guest at primary verified %d records; %d were written at recovery", n, atRecovery)
	}

	// 5. Commit, then reprotect.
	waitJob(t, svc)(svc.Commit(ctx, "vm1"))
	waitJob(t, svc)(loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "vm1"}))
	if m := getMachine(t, svc, "vm1"); m.State != rebound.MachineProtected || m.Protection.TargetSite != "recovery" {
		t.Fatalf("after the loop: %s %+v", m.State, m.Protection)
	}
	waitJob(t, svc)(power.StopMachine(ctx, "vm1"))
	waitConsole(t, power, "vm1", regexp.MustCompile(`REBOUND-GUEST poweroff clean`), 30*time.Second)
}
