package main

import (
	"context"
	"regexp"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/guestimage"
)

// BenchmarkVMFailoverRTO measures the time from the failover command to the
// guest's "booted" line at the recovery site (unplanned failover of a
// running test guest to latest-processed, QEMU under TCG here).
func BenchmarkVMFailoverRTO(b *testing.B) {
	vmlinux, initrd := guestimage.Build(b)
	ctx := context.Background()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		_, svc := testUp(b, b.TempDir())
		power := svc.(rebound.PowerService)
		spec := &rebound.VMSpec{CPUs: 1, MemoryMiB: 256, Kernel: vmlinux, Initrd: initrd,
			Append: guestimage.KernelArgs(guestimage.BootOptions{Rate: 20})}
		if _, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "primary", Driver: rebound.DriverQEMU, Disks: []int64{64 << 20}, VM: spec}); err != nil {
			b.Fatal(err)
		}
		waitJob(b, svc)(power.StartMachine(ctx, "vm1"))
		bootStart := time.Now()
		waitConsole(b, power, "vm1", regexp.MustCompile(`REBOUND-GUEST booted`), 2*time.Minute)
		firstBoot := time.Since(bootStart)
		waitJob(b, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm1", To: "recovery"}))
		waitConsole(b, power, "vm1", wroteRE, time.Minute)

		b.StartTimer()
		start := time.Now()
		waitJob(b, svc)(svc.Failover(ctx, rebound.FailoverRequest{Machine: "vm1", Point: rebound.PointLatestProcessed}))
		activated := time.Since(start)
		waitConsole(b, power, "vm1", regexp.MustCompile(`REBOUND-GUEST booted`), 2*time.Minute)
		rto := time.Since(start)
		b.StopTimer()
		b.ReportMetric(rto.Seconds(), "s-to-booted")
		b.ReportMetric(activated.Seconds(), "s-to-activated")
		benchReport(b, "| VM failover RTO: failover command to the guest's `booted` line at recovery (unplanned, latest-processed, TCG) | %.1f s (disks exported after %.1f s; a cold boot of the same guest at primary took %.1f s) | minutes (Zerto), 5–20 min (DRS) |\n",
			rto.Seconds(), activated.Seconds(), firstBoot.Seconds())
	}
}
