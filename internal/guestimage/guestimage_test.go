package guestimage

import (
	"debug/elf"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound/internal/guestimage/record"
)

const bootTimeout = 90 * time.Second

var (
	reMkfs     = LineMkfs
	reFsck     = LineFsck
	reVerified = LineVerdict
	reBooted   = LineBooted
	reAgent    = LineAgent
	reWrote    = LineWrote
	reDone     = LineDone
	reStopping = LineStopping
	reOff      = LinePoweroff
)

func newDisk(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, 64<<20); err != nil {
		t.Fatal(err)
	}
	return p
}

func atoi(t *testing.T, s string) uint64 {
	t.Helper()
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// expectVerdict waits for the boot verdict lines and returns the record count.
func expectVerdict(t *testing.T, vm *VM, fresh bool) uint64 {
	t.Helper()
	if fresh {
		vm.MustWaitLine(reMkfs, bootTimeout)
	}
	v, err := vm.WaitBooted(bootTimeout)
	if err != nil {
		t.Fatal(err)
	}
	if !v.OK() {
		t.Fatalf("boot verdict: %+v", v)
	}
	t.Logf("booted %.2fs after qemu started (%s), %d records verified", v.Booted.Seconds(), vm.Accel, v.Records)
	return v.Records
}

// TestKernelIsPVH checks the extracted vmlinux is an ELF QEMU can boot
// through PVH: it carries the XEN_ELFNOTE_PHYS32_ENTRY note. A second build
// finds everything up to date.
func TestKernelIsPVH(t *testing.T) {
	vmlinux, initrd := Build(t)
	f, err := elf.Open(vmlinux)
	if err != nil {
		t.Fatalf("vmlinux is not an ELF: %v", err)
	}
	defer f.Close()
	found := false
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		b := make([]byte, p.Filesz)
		if _, err := p.ReadAt(b, 0); err != nil {
			t.Fatal(err)
		}
		for len(b) >= 12 {
			nsz, dsz, typ := f.ByteOrder.Uint32(b), f.ByteOrder.Uint32(b[4:]), f.ByteOrder.Uint32(b[8:])
			name := string(b[12 : 12+nsz])
			if name == "Xen\x00" && typ == 18 { // XEN_ELFNOTE_PHYS32_ENTRY
				found = true
			}
			b = b[12+(nsz+3)&^3+(dsz+3)&^3:]
		}
	}
	if !found {
		t.Fatal("vmlinux has no PVH entry note")
	}
	vi, _ := os.Stat(vmlinux)
	ii, _ := os.Stat(initrd)
	t.Logf("vmlinux %d bytes, initramfs %d bytes", vi.Size(), ii.Size())

	// Up to date: a second run rebuilds nothing.
	root, err := Root()
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(filepath.Join(root, "scripts", "build-guest.sh"), filepath.Dir(vmlinux)).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "up to date") {
		t.Fatalf("second build: %v: %s", err, out)
	}
	if v2, _ := os.Stat(vmlinux); !v2.ModTime().Equal(vi.ModTime()) {
		t.Fatal("an up-to-date build rewrote vmlinux")
	}
	if i2, _ := os.Stat(initrd); !i2.ModTime().Equal(ii.ModTime()) {
		t.Fatal("an up-to-date build rewrote the initramfs")
	}
}

// TestGuestFile boots on a fresh raw file: mkfs, records, a clean poweroff
// after K records; the host reads K intact records from the image. A second
// boot verifies them, freezes and thaws through the agent, writes more, and is
// shut down through the agent; the host then reads exactly the records the
// guest said it had synced.
func TestGuestFile(t *testing.T) {
	t.Parallel()
	disk := newDisk(t)
	const k = 30
	vm := Boot(t, BootOptions{Disk: disk, Records: k, Halt: true, Rate: 50})
	if n := expectVerdict(t, vm, true); n != 0 {
		t.Fatalf("fresh disk: verified %d records", n)
	}
	vm.MustWaitLine(reAgent, bootTimeout)
	if m := vm.MustWaitLine(reDone, bootTimeout); atoi(t, m[1]) != k {
		t.Fatalf("first boot: %s", m[0])
	}
	if m := vm.MustWaitLine(reOff, bootTimeout); m[1] != "clean" {
		t.Fatalf("first boot: %s", m[0])
	}
	if err := vm.Wait(30 * time.Second); err != nil {
		t.Fatal(err)
	}
	if v := ImageRecords(t, disk); !v.OK() || v.Records != k {
		t.Fatalf("host read of the image after boot 1: %s", v.Line())
	}

	vm = Boot(t, BootOptions{Disk: disk, Rate: 50})
	if n := expectVerdict(t, vm, false); n != k {
		t.Fatalf("second boot verified %d records, want %d", n, k)
	}
	vm.MustWaitLine(reAgent, bootTimeout)
	// App-consistent point: freeze, the guest's writes block, thaw.
	var frozen int
	if r, err := vm.AgentCall("guest-fsfreeze-freeze", nil, 20*time.Second); err != nil {
		t.Fatal(err)
	} else if err := json.Unmarshal(r, &frozen); err != nil || frozen != 1 {
		t.Fatalf("guest-fsfreeze-freeze returned %s, want 1 filesystem", r)
	}
	var status string
	r, err := vm.AgentCall("guest-fsfreeze-status", nil, 10*time.Second)
	if err != nil || json.Unmarshal(r, &status) != nil || status != "frozen" {
		t.Fatalf("guest-fsfreeze-status: %s %v", r, err)
	}
	frozenAt, _ := os.Stat(disk)
	time.Sleep(time.Second)
	if st, _ := os.Stat(disk); !st.ModTime().Equal(frozenAt.ModTime()) {
		t.Fatal("the disk image changed while the guest's filesystem was frozen")
	}
	if r, err := vm.AgentCall("guest-fsfreeze-thaw", nil, 20*time.Second); err != nil {
		t.Fatal(err)
	} else if json.Unmarshal(r, &frozen); frozen != 1 {
		t.Fatalf("guest-fsfreeze-thaw returned %s", r)
	}
	for {
		m := vm.MustWaitLine(reWrote, bootTimeout)
		if atoi(t, m[1]) > k+10 {
			break
		}
	}
	if err := vm.Shutdown(60 * time.Second); err != nil {
		t.Fatalf("agent shutdown: %v\n%s", err, vm.Log())
	}
	last := atoi(t, vm.MustWaitLine(reStopping, time.Second)[1])
	if m := vm.MustWaitLine(reOff, time.Second); m[1] != "clean" {
		t.Fatalf("second boot: %s", m[0])
	}
	if v := ImageRecords(t, disk); !v.OK() || v.Records != last {
		t.Fatalf("host read after boot 2: %s, guest stopped at seq %d", v.Line(), last)
	}
	t.Logf("second boot wrote up to seq %d", last)
}

// TestGuestNBDCrash boots with the data disk served by qemu-nbd over a unix
// socket, pulls the plug while the guest writes, then boots on the file
// behind the export: the journal replays, fsck is clean, and every record
// the guest reported synced is there.
func TestGuestNBDCrash(t *testing.T) {
	t.Parallel()
	qemuNBD, err := exec.LookPath("qemu-nbd")
	if err != nil {
		t.Fatal("qemu-nbd not found (install qemu-utils)")
	}
	disk := newDisk(t)
	sockDir, err := os.MkdirTemp("", "rgnbd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sockDir)
	sock := filepath.Join(sockDir, "nbd.sock")
	srv := exec.Command(qemuNBD, "-f", "raw", "-x", "d", "--socket", sock, "--persistent", disk)
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { srv.Process.Kill(); srv.Wait() }()
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		} else if i > 100 {
			t.Fatal("qemu-nbd did not create its socket")
		}
		time.Sleep(50 * time.Millisecond)
	}
	vm := Boot(t, BootOptions{Disk: "nbd+unix:///d?socket=" + sock, Rate: 50})
	if n := expectVerdict(t, vm, true); n != 0 {
		t.Fatalf("fresh NBD disk: verified %d records", n)
	}
	var synced uint64
	for synced < 30 {
		synced = atoi(t, vm.MustWaitLine(reWrote, bootTimeout)[1])
	}
	vm.Kill()
	srv.Process.Kill()
	srv.Wait()

	vm = Boot(t, BootOptions{Disk: disk, Records: 5, Halt: true, Rate: 50})
	if n := expectVerdict(t, vm, false); n < synced {
		t.Fatalf("after the crash: verified %d records, the guest had synced %d", n, synced)
	}
	if m := vm.MustWaitLine(reOff, bootTimeout); m[1] != "clean" {
		t.Fatalf("%s", m[0])
	}
	t.Logf("crashed after seq %d was synced:\n%s", synced, grepGuest(vm.Log()))
}

func grepGuest(log string) string {
	var out []string
	for _, l := range strings.Split(log, "\n") {
		if strings.HasPrefix(l, "REBOUND-GUEST ") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestGuestCorrupt boots on an image made on the host (mke2fs -d) whose
// records file has one damaged record and whose block bitmap is wrong: the
// guest reports fsck errors and repairs them, reports the record as corrupt
// and writes nothing. The ACPI power button then shuts it down cleanly.
func TestGuestCorrupt(t *testing.T) {
	t.Parallel()
	mke2fs, err := exec.LookPath("mke2fs")
	if err != nil {
		t.Fatal("mke2fs not found (install e2fsprogs)")
	}
	root := t.TempDir()
	const n, bad = 12, 7
	data := make([]byte, n*record.Size)
	for k := 1; k <= n; k++ {
		record.Encode(data[(k-1)*record.Size:k*record.Size], uint64(k), 1, 0)
	}
	data[(bad-1)*record.Size+100] ^= 0x01
	if err := os.WriteFile(filepath.Join(root, "records"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	disk := newDisk(t)
	if out, err := exec.Command(mke2fs, "-q", "-F", "-t", "ext4", "-b", "4096", "-d", root, disk).CombinedOutput(); err != nil {
		t.Fatalf("mke2fs -d: %v: %s", err, out)
	}
	before := ImageRecords(t, disk)
	if before.OK() || before.Records != bad-1 {
		t.Fatalf("host verdict on the damaged image: %s", before.Line())
	}
	// Damage the filesystem too: mark the first record's block free.
	blk := RecordBlock(t, disk, 1) / record.Size
	if out, err := exec.Command("debugfs", "-w", "-R", fmt.Sprintf("freeb %d", blk), disk).CombinedOutput(); err != nil {
		t.Fatalf("debugfs freeb: %v: %s", err, out)
	}
	if exec.Command("e2fsck", "-fn", disk).Run() == nil {
		t.Fatal("e2fsck finds the damaged filesystem clean")
	}

	vm := Boot(t, BootOptions{Disk: disk, Rate: 50})
	v, err := vm.WaitBooted(bootTimeout)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(v.Fsck, "errors: exit 4") {
		t.Fatalf("fsck verdict %q, want errors: exit 4", v.Fsck)
	}
	if !regexp.MustCompile(`(?m)^REBOUND-GUEST fsck repair: exit 1`).MatchString(vm.Log()) {
		t.Fatalf("no repair:\n%s", vm.Log())
	}
	if want := fmt.Sprintf("REBOUND-GUEST CORRUPT at record %d: checksum mismatch", bad); v.Corrupt != want || v.OK() {
		t.Fatalf("verdict %+v, want %q", v, want)
	}
	vm.MustWaitLine(reAgent, bootTimeout)
	if err := vm.Powerdown(60 * time.Second); err != nil {
		t.Fatalf("ACPI powerdown: %v\n%s", err, vm.Log())
	}
	if m := vm.MustWaitLine(reOff, time.Second); m[1] != "clean" {
		t.Fatalf("%s", m[0])
	}
	if strings.Contains(vm.Log(), "REBOUND-GUEST wrote seq") {
		t.Fatal("the guest wrote records after finding corruption")
	}
	// The filesystem was repaired; the records' evidence is kept.
	if out, err := exec.Command("e2fsck", "-fn", disk).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck after the guest's repair: %v: %s", err, out)
	}
	if after := ImageRecords(t, disk); after.Line() != before.Line() {
		t.Fatalf("verdict changed from %s to %s", before.Line(), after.Line())
	}
}
