package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/guestimage"
	"github.com/rebound-dr/rebound/qemu"
)

var (
	benchSeqRE  = regexp.MustCompile(`REBOUND-GUEST bench seq write \d+ MiB in [0-9.]+ s: ([0-9.]+) MB/s`)
	benchRandRE = regexp.MustCompile(`REBOUND-GUEST bench rand write 4k: \d+ writes in [0-9.]+ s: ([0-9.]+) IOPS`)
)

// guestBenchResult parses the guest's bench lines from a console log.
func guestBenchResult(tb testing.TB, console []byte) (mbps, iops float64, ok bool) {
	s, r := benchSeqRE.FindSubmatch(console), benchRandRE.FindSubmatch(console)
	if s == nil || r == nil {
		return 0, 0, false
	}
	mbps, _ = strconv.ParseFloat(string(s[1]), 64)
	iops, _ = strconv.ParseFloat(string(r[1]), 64)
	return mbps, iops, true
}

// BenchmarkGuestDisk runs the same guest disk benchmark (sequential 1 MiB
// and random 4 KiB O_DIRECT writes inside the guest) on a disk served by a
// protected Rebound machine and on the same kind of raw file served by
// qemu-nbd.
func BenchmarkGuestDisk(b *testing.B) {
	vmlinux, initrd := guestimage.Build(b)
	const benchMiB = 256
	appendArgs := guestimage.KernelArgs(guestimage.BootOptions{Append: fmt.Sprintf("rebound.bench=%d", benchMiB)})
	ctx := context.Background()
	for i := 0; i < b.N; i++ {
		// Rebound: the VM's disks are a protected machine's exports.
		_, svc := testUp(b, b.TempDir())
		power := svc.(rebound.PowerService)
		spec := &rebound.VMSpec{CPUs: 1, MemoryMiB: 256, Kernel: vmlinux, Initrd: initrd, Append: appendArgs}
		if _, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "g", Site: "primary", Driver: rebound.DriverQEMU, Disks: []int64{64 << 20, 512 << 20}, VM: spec}); err != nil {
			b.Fatal(err)
		}
		waitJob(b, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "g", To: "recovery"}))
		waitJob(b, svc)(power.StartMachine(ctx, "g"))
		waitConsole(b, power, "g", benchRandRE, 5*time.Minute)
		con, _ := power.Console(ctx, "g", 1<<20)
		rMBps, rIOPS, ok := guestBenchResult(b, con)
		if !ok {
			b.Fatalf("no bench result on the console:\n%s", con)
		}

		// qemu-nbd on the same kind of raw file, same guest.
		dir := b.TempDir()
		data, disk, sock := filepath.Join(dir, "data.raw"), filepath.Join(dir, "bench.raw"), filepath.Join(dir, "nbd.sock")
		for _, f := range []struct {
			p string
			n int64
		}{{data, 64 << 20}, {disk, 512 << 20}} {
			if err := os.WriteFile(f.p, nil, 0o644); err != nil {
				b.Fatal(err)
			}
			if err := os.Truncate(f.p, f.n); err != nil {
				b.Fatal(err)
			}
		}
		nbd := exec.Command("qemu-nbd", "-f", "raw", "-x", "bench", "-t", "--cache=writeback", "--socket", sock, disk)
		if err := nbd.Start(); err != nil {
			b.Fatal(err)
		}
		defer func() { nbd.Process.Kill(); nbd.Wait() }()
		for j := 0; j < 100; j++ {
			if _, err := os.Stat(sock); err == nil {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		drv := &qemu.Driver{}
		vm, err := drv.Start(ctx, qemu.VMConfig{Name: "qnbd", CPUs: 1, MemoryMiB: 256, Kernel: vmlinux, Initrd: initrd, Append: appendArgs,
			Disks: []string{data, "nbd+unix:///bench?socket=" + sock}, Dir: filepath.Join(dir, "vm"), NoAgent: true})
		if err != nil {
			b.Fatal(err)
		}
		wctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
		err = vm.WaitConsole(wctx, "REBOUND-GUEST bench rand write")
		cancel()
		con, _ = vm.Console()
		vm.Kill()
		vm.Close()
		if err != nil {
			b.Fatalf("qemu-nbd guest: %v:\n%s", err, con)
		}
		qMBps, qIOPS, ok := guestBenchResult(b, con)
		if !ok {
			b.Fatalf("no bench result on the qemu-nbd guest's console:\n%s", con)
		}
		b.ReportMetric(rMBps, "rebound-MB/s")
		b.ReportMetric(qMBps, "qemu-nbd-MB/s")
		b.ReportMetric(rIOPS, "rebound-IOPS")
		b.ReportMetric(qIOPS, "qemu-nbd-IOPS")
		benchReport(b, "| guest disk, sequential 1 MiB O_DIRECT writes inside the VM (%d MiB) | Rebound (protected, replicating): %.1f MB/s; qemu-nbd: %.1f MB/s (%.0f%%) | |\n", benchMiB, rMBps, qMBps, 100*rMBps/qMBps)
		benchReport(b, "| guest disk, random 4 KiB O_DIRECT writes inside the VM (3 s) | Rebound: %.0f IOPS; qemu-nbd: %.0f IOPS (%.0f%%) | |\n", rIOPS, qIOPS, 100*rIOPS/qIOPS)
	}
}
