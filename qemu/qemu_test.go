package qemu

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

// needQEMU fails the test when qemu-system-x86_64 is missing: CI installs it.
func needQEMU(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Fatal("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
	}
}

// shortDir is a runtime directory short enough for unix sockets.
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "rbq")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func TestAccel(t *testing.T) {
	needQEMU(t)
	d := &Driver{}
	// The probe sees a guest run under TCG, and does not under KVM here
	// (/dev/kvm is absent, or present but unable to run guests).
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := d.probe(ctx, "tcg"); err != nil {
		t.Fatalf("tcg probe: %v", err)
	}
	want := "tcg"
	if d.probe(ctx, "kvm") == nil {
		want = "kvm"
	}
	if _, err := os.Stat("/dev/kvm"); err != nil && want != "tcg" {
		t.Fatal("kvm probe succeeded without /dev/kvm")
	}
	if got := d.Accel(); got != want {
		t.Fatalf("Accel() = %q, want %q", got, want)
	}
	if got := d.Accel(); got != want {
		t.Fatalf("cached Accel() = %q", got)
	}
}

// fakeQEMU puts a qemu-system-x86_64 on PATH that fails the way a host
// whose /dev/kvm cannot run guests fails (QEMU's MSR assertion) when given
// -cpu host, in the cases failIf (a shell test on "$*") selects, and runs
// the real QEMU otherwise; with tcgProbe, a diskless probe asking for KVM
// runs under TCG instead, so the probe passes on any host.
func fakeQEMU(t *testing.T, failIf string, tcgProbe bool) {
	t.Helper()
	real, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatal("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
	}
	bin := t.TempDir()
	script := `#!/bin/sh
case "$*" in *"-cpu host"*)
	if ` + failIf + `; then
		echo "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69" >&2
		echo "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion 'ret == cpu->kvm_msr_buf->nmsrs' failed." >&2
		kill -ABRT $$
	fi
	if ` + map[bool]string{true: "true", false: "false"}[tcgProbe] + `; then
		exec ` + real + ` -accel tcg $(echo "$*" | sed 's/-accel kvm -cpu host//')
	fi;;
esac
exec ` + real + ` "$@"
`
	if err := os.WriteFile(filepath.Join(bin, "qemu-system-x86_64"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+":"+os.Getenv("PATH"))
}

// TestAccelUnusableKVM: on a host where -cpu host guests abort under KVM,
// the probe fails as VMs would, and VMs run under TCG.
func TestAccelUnusableKVM(t *testing.T) {
	fakeQEMU(t, "true", false)
	d := &Driver{}
	if got := d.Accel(); got != "tcg" {
		t.Fatalf("Accel() = %q, want tcg: the probe must start QEMU the way VMs start", got)
	}
	dir := shortDir(t)
	img := filepath.Join(dir, "blank.raw")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	v, err := d.Start(context.Background(), VMConfig{Name: "blank", Dir: filepath.Join(dir, "vm"), Disks: []string{img}, MemoryMiB: 64, NoAgent: true})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Kill()
	if v.Accel() != "tcg" {
		t.Fatalf("vm accel %q", v.Accel())
	}
}

// TestStartFallsBackToTCG: the probe passes but a VM dies at start under
// KVM: Start runs it under TCG, and the driver keeps TCG for later VMs; an
// attached handle reports the accelerator too.
func TestStartFallsBackToTCG(t *testing.T) {
	// The probe (no -qmp) passes; real VMs (with -qmp) abort under KVM.
	fakeQEMU(t, `case "$*" in *-qmp*) true;; *) false;; esac`, true)
	d := &Driver{}
	if got := d.Accel(); got != "kvm" {
		t.Fatalf("Accel() = %q before any VM, want the probe's kvm", got)
	}
	dir := shortDir(t)
	img := filepath.Join(dir, "blank.raw")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := VMConfig{Name: "blank", Dir: filepath.Join(dir, "vm"), Disks: []string{img}, MemoryMiB: 64, NoAgent: true}
	v, err := d.Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Kill()
	if v.Accel() != "tcg" || d.Accel() != "tcg" {
		t.Fatalf("after the fallback: vm accel %q, driver accel %q, want tcg", v.Accel(), d.Accel())
	}
	a, err := Attach(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if a.Accel() != "tcg" {
		t.Fatalf("attached vm accel %q", a.Accel())
	}
	// The next VM starts under TCG at once: one QEMU run, no retry.
	cfg2 := VMConfig{Name: "blank2", Dir: filepath.Join(dir, "vm2"), Disks: []string{img}, MemoryMiB: 64, NoAgent: true}
	if args, _ := d.args(cfg2, d.Accel()); strings.Contains(strings.Join(args, " "), "kvm") {
		t.Fatalf("later VM args ask for kvm: %v", args)
	}

	// A VM that fails under TCG too was not KVM's fault: the error is
	// the KVM start's, and the driver is not switched.
	d2 := &Driver{}
	if d2.Accel() != "kvm" {
		t.Fatal("probe")
	}
	_, err = d2.Start(context.Background(), VMConfig{Name: "x", Dir: filepath.Join(dir, "vm3"), MemoryMiB: 64,
		Disks: []string{"nbd://127.0.0.1:1/none"}})
	if err == nil || !strings.Contains(err.Error(), "MSR") {
		t.Fatalf("start: %v", err)
	}
	if d2.Accel() != "kvm" {
		t.Fatalf("driver switched to %s by a failure TCG shares", d2.Accel())
	}
}

func TestArgs(t *testing.T) {
	dir := shortDir(t)
	img := filepath.Join(dir, "a,b.raw")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	d := &Driver{accel: "tcg"}
	d.accelOnce.Do(func() {})
	args, err := d.args(VMConfig{Name: "vm1", Dir: dir,
		Disks: []string{"nbd://127.0.0.1:10811/vm1-disk0", "nbd+unix:///vm1-disk1?socket=/run/n.sock", img},
		NIC:   &NICConfig{Mode: NICTap, Ifname: "tap0", Isolated: true, MAC: "52:54:00:12:34:56"}}, "tcg")
	if err != nil {
		t.Fatal(err)
	}
	var blockdevs []map[string]any
	var devices []string
	for i := 0; i < len(args)-1; i++ {
		switch args[i] {
		case "-blockdev":
			var m map[string]any
			if err := json.Unmarshal([]byte(args[i+1]), &m); err != nil {
				t.Fatal(err)
			}
			blockdevs = append(blockdevs, m)
		case "-device", "-netdev":
			devices = append(devices, args[i+1])
		}
	}
	if len(blockdevs) != 3 {
		t.Fatalf("blockdevs %v", blockdevs)
	}
	srv := blockdevs[0]["server"].(map[string]any)
	if blockdevs[0]["driver"] != "nbd" || blockdevs[0]["export"] != "vm1-disk0" || srv["host"] != "127.0.0.1" || srv["port"] != "10811" {
		t.Fatalf("nbd tcp: %v", blockdevs[0])
	}
	if blockdevs[1]["server"].(map[string]any)["path"] != "/run/n.sock" || blockdevs[1]["export"] != "vm1-disk1" {
		t.Fatalf("nbd unix: %v", blockdevs[1])
	}
	if blockdevs[2]["file"].(map[string]any)["filename"] != img {
		t.Fatalf("file: %v", blockdevs[2])
	}
	all := strings.Join(devices, " ")
	// Isolated wins over the tap: a test failover has no route out.
	for _, want := range []string{"drive=disk0", "bootindex=0", "user,id=net0,restrict=on", "mac=52:54:00:12:34:56", "name=" + AgentChannel} {
		if !strings.Contains(all, want) {
			t.Errorf("args lack %q: %s", want, all)
		}
	}

	for _, bad := range []VMConfig{
		{Name: "x", Dir: dir, Disks: []string{"nbd:///noexport"}},
		{Name: "x", Dir: dir, Disks: []string{"nbd+unix:///e"}},
		{Name: "x", Dir: dir, Disks: []string{"/no/such/file"}},
		{Name: "x", Dir: dir, Disks: []string{img}, NIC: &NICConfig{Mode: "wifi"}},
	} {
		if _, err := d.args(bad, "tcg"); rebound.ErrorCode(err) != rebound.EINVALID {
			t.Errorf("%v: err %v", bad, err)
		}
	}
	for _, bad := range []VMConfig{
		{Dir: dir, Disks: []string{img}},
		{Name: "x", Disks: []string{img}},
		{Name: "x", Dir: dir},
		{Name: "x", Dir: dir, Disks: []string{img}, Append: "console=ttyS0"},
		{Name: "x", Dir: strings.Repeat("/d", 60), Disks: []string{img}},
	} {
		if _, err := (&Driver{}).Start(context.Background(), bad); rebound.ErrorCode(err) != rebound.EINVALID {
			t.Errorf("%+v: err %v", bad, err)
		}
	}
}

// TestNoGuest runs a VM whose disk boots nothing: SeaBIOS spins, no agent
// ever answers and ACPI is not heard.
func TestNoGuest(t *testing.T) {
	needQEMU(t)
	dir := shortDir(t)
	img := filepath.Join(dir, "blank.raw")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	d := &Driver{}
	ctx := context.Background()
	cfg := VMConfig{Name: "blank", Dir: filepath.Join(dir, "vm"), Disks: []string{img}, MemoryMiB: 64}
	v, err := d.Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Kill()
	if !v.Running() {
		t.Fatal("not running")
	}
	if _, err := d.Start(ctx, cfg); rebound.ErrorCode(err) != rebound.ECONFLICT {
		t.Fatalf("second start: %v", err)
	}

	t.Run("FreezeTimesOut", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		start := time.Now()
		_, err := v.Freeze(ctx)
		if rebound.ErrorCode(err) != rebound.EUNAVAILABLE || !strings.Contains(err.Error(), "guest agent not responding") {
			t.Fatalf("freeze: %v", err)
		}
		if el := time.Since(start); el > 2*time.Second {
			t.Fatalf("freeze took %v", el)
		}
		ctx2, cancel2 := context.WithTimeout(context.Background(), time.Second)
		defer cancel2()
		cut := false
		err = v.FreezeThaw(ctx2, func() error { cut = true; return nil })
		if err == nil || cut {
			t.Fatalf("FreezeThaw without agent: err %v, cut ran %v", err, cut)
		}
	})

	t.Run("Attach", func(t *testing.T) {
		a, err := Attach(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if a.PID() != v.PID() || !a.Running() {
			t.Fatalf("attached pid %d running %v, want %d", a.PID(), a.Running(), v.PID())
		}
		st, err := a.Status(ctx)
		if err != nil || st != "running" {
			t.Fatalf("status %q %v", st, err)
		}
		a.Close()
		if !v.Running() {
			t.Fatal("Close stopped the VM")
		}
	})

	t.Run("ShutdownFallsBackToKill", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		start := time.Now()
		err := v.Shutdown(ctx)
		if err == nil || !strings.Contains(err.Error(), "killed") {
			t.Fatalf("shutdown: %v", err)
		}
		if el := time.Since(start); el > 5*time.Second {
			t.Fatalf("shutdown took %v", el)
		}
		if v.Running() {
			t.Fatal("still running")
		}
		if _, err := Attach(cfg); rebound.ErrorCode(err) != rebound.ENOTFOUND {
			t.Fatalf("attach after exit: %v", err)
		}
	})
}

func TestStartFails(t *testing.T) {
	needQEMU(t)
	dir := shortDir(t)
	// Nothing serves this export: QEMU exits and Start says why.
	_, err := (&Driver{}).Start(context.Background(), VMConfig{Name: "x", Dir: dir, MemoryMiB: 64,
		Disks: []string{"nbd://127.0.0.1:1/none"}})
	if err == nil || !strings.Contains(err.Error(), "qemu exited") || !strings.Contains(err.Error(), "127.0.0.1") {
		t.Fatalf("start: %v", err)
	}
	t.Log(err)
}
