package qemu

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/guestimage"
)

// guestAppend is the test guest's kernel command line: console on ttyS0,
// where the tests read the guest's lines, and 50 records a second.
var guestAppend = guestimage.KernelArgs(guestimage.BootOptions{Rate: 50})

// guestImage returns the test guest's kernel and initramfs
// (scripts/build-guest.sh, through internal/guestimage).
func guestImage(t *testing.T) (kernel, initrd string) {
	t.Helper()
	return guestimage.Build(t)
}

// serveNBD serves a raw file over NBD with qemu-nbd and returns its URI
// and a func that stops qemu-nbd.
func serveNBD(t *testing.T, path, export string) (string, func()) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	return serveNBDPort(t, path, export, port)
}

// serveNBDPort is serveNBD on a given port.
func serveNBDPort(t *testing.T, path, export string, port int) (string, func()) {
	t.Helper()
	bin, err := exec.LookPath("qemu-nbd")
	if err != nil {
		t.Fatal("qemu-nbd not installed (apt-get install qemu-utils)")
	}
	cmd := exec.Command(bin, "-f", "raw", "-x", export, "-b", "127.0.0.1", "-p", fmt.Sprint(port), "-t", "--cache=writeback", path)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	stop := func() { once.Do(func() { cmd.Process.Kill(); cmd.Wait() }) }
	t.Cleanup(stop)
	for i := 0; ; i++ {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err == nil {
			c.Close()
			break
		}
		if i > 100 {
			t.Fatalf("qemu-nbd not listening: %v: %s", err, stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Sprintf("nbd://127.0.0.1:%d/%s", port, export), stop
}

func hashFile(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// waitChange waits until the file's hash differs from h: the guest wrote.
func waitChange(t *testing.T, path string, h [32]byte, within time.Duration) {
	t.Helper()
	end := time.Now().Add(within)
	for hashFile(t, path) == h {
		if time.Now().After(end) {
			t.Fatalf("%s unchanged for %v: the guest does not write", path, within)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// bootTimeout is generous: TCG on a loaded 2-core machine boots in 2 to 15 s.
const bootTimeout = 60 * time.Second

var verifiedRE = regexp.MustCompile(`REBOUND-GUEST verified (\d+) records, last seq \d+, ok`)

// TestGuest boots the test guest on a data disk served over NBD, freezes
// and thaws it through its agent, and shuts it down; then boots it again
// on the same disk as a plain file, without an agent channel.
func TestGuest(t *testing.T) {
	t.Parallel()
	needQEMU(t)
	kernel, initrd := guestImage(t)
	dir := shortDir(t)
	data := filepath.Join(dir, "data.raw")
	if err := os.WriteFile(data, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(data, 64<<20); err != nil {
		t.Fatal(err)
	}
	uri, stopNBD := serveNBD(t, data, "vm1-disk0")
	d := &Driver{}
	cfg := VMConfig{Name: "vm1", CPUs: 1, MemoryMiB: 256, Disks: []string{uri},
		Kernel: kernel, Initrd: initrd, Append: guestAppend, Dir: filepath.Join(dir, "vm1"),
		NIC: &NICConfig{Mode: NICUser}}
	ctx := context.Background()
	start := time.Now()
	v, err := d.Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Kill()
	bctx, cancel := context.WithTimeout(ctx, bootTimeout)
	defer cancel()
	if err := v.WaitConsole(bctx, "REBOUND-GUEST booted"); err != nil {
		con, _ := v.Console()
		t.Fatalf("%v\n%s", err, con)
	}
	t.Logf("booted in %v (%s)", time.Since(start).Round(time.Millisecond), d.Accel())
	if err := v.WaitConsole(bctx, "REBOUND-GUEST agent started"); err != nil {
		t.Fatal(err)
	}

	// step bounds one agent call: the machine may be loaded, so no call
	// eats another's time.
	step := func() context.Context {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		t.Cleanup(cancel)
		return ctx
	}
	t.Run("FreezeThaw", func(t *testing.T) {
		// A failed check must not leave the guest frozen for the next ones.
		defer func() { v.Thaw(step()) }()
		// qemu-ga opens its port a moment after the guest says it started
		// it: the call's sync is resent until it answers.
		if err := v.Ping(step()); err != nil {
			t.Fatal(err)
		}
		waitChange(t, data, hashFile(t, data), 5*time.Second)
		n, err := v.Freeze(step())
		if err != nil || n < 1 {
			t.Fatalf("freeze: %d %v", n, err)
		}
		if st, err := v.FreezeStatus(step()); err != nil || st != "frozen" {
			t.Fatalf("status %q %v", st, err)
		}
		// Frozen: the guest's fsync'ing writer stalls, so the disk's
		// bytes do not move.
		h := hashFile(t, data)
		time.Sleep(time.Second)
		if hashFile(t, data) != h {
			t.Fatal("disk changed while frozen")
		}
		if n, err := v.Thaw(step()); err != nil || n < 1 {
			t.Fatalf("thaw: %d %v", n, err)
		}
		if st, err := v.FreezeStatus(step()); err != nil || st != "thawed" {
			t.Fatalf("status %q %v", st, err)
		}
		waitChange(t, data, h, 5*time.Second)
	})

	t.Run("FreezeThawCutFails", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		cutErr := errors.New("cut failed")
		var during string
		err := v.FreezeThaw(ctx, func() error {
			during, _ = v.FreezeStatus(ctx)
			return cutErr
		})
		if !errors.Is(err, cutErr) {
			t.Fatalf("FreezeThaw: %v", err)
		}
		if during != "frozen" {
			t.Fatalf("status during cut %q", during)
		}
		if st, err := v.FreezeStatus(step()); err != nil || st != "thawed" {
			t.Fatalf("after: status %q %v", st, err)
		}
	})

	t.Run("FreezeThawTimeout", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(ctx, 1500*time.Millisecond)
		defer cancel()
		release := make(chan struct{})
		defer close(release)
		start := time.Now()
		err := v.FreezeThaw(ctx, func() error { <-release; return nil })
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("FreezeThaw: %v", err)
		}
		if el := time.Since(start); el > 5*time.Second {
			t.Fatalf("took %v", el)
		}
		if st, err := v.FreezeStatus(step()); err != nil || st != "thawed" {
			t.Fatalf("after: status %q %v", st, err)
		}
	})

	t.Run("Attach", func(t *testing.T) {
		a, err := Attach(cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer a.Close()
		if a.PID() != v.PID() {
			t.Fatalf("pid %d, want %d", a.PID(), v.PID())
		}
		if err := a.Ping(step()); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("Shutdown", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		if err := v.Shutdown(ctx); err != nil {
			t.Fatal(err)
		}
		code, err := v.Wait(ctx)
		if err != nil || code != 0 {
			t.Fatalf("exit %d %v", code, err)
		}
		con, _ := v.Console()
		if !bytes.Contains(con, []byte("REBOUND-GUEST poweroff clean")) {
			t.Fatalf("no clean poweroff:\n%s", con)
		}
	})
	if t.Failed() {
		return
	}

	// Second boot: the same disk as a file, no agent channel; the handle is
	// dropped and the VM found again with Attach, then powered off by ACPI.
	stopNBD() // it holds the image's lock
	cfg2 := cfg
	cfg2.Name, cfg2.Dir, cfg2.Disks, cfg2.NoAgent, cfg2.NIC = "vm2", filepath.Join(dir, "vm2"), []string{data}, true, &NICConfig{Isolated: true}
	v2, err := d.Start(ctx, cfg2)
	if err != nil {
		t.Fatal(err)
	}
	defer v2.Kill()
	bctx, cancel = context.WithTimeout(ctx, bootTimeout)
	defer cancel()
	if err := v2.WaitConsole(bctx, "REBOUND-GUEST booted"); err != nil {
		t.Fatal(err)
	}
	con, _ := v2.Console()
	m := verifiedRE.FindSubmatch(con)
	if m == nil || string(m[1]) == "0" {
		t.Fatalf("second boot does not verify the first boot's records:\n%s", con)
	}

	t.Run("NoAgent", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		cut := false
		err := v2.FreezeThaw(ctx, func() error { cut = true; return nil })
		if rebound.ErrorCode(err) != rebound.EUNAVAILABLE || !strings.Contains(err.Error(), "guest agent") || cut {
			t.Fatalf("FreezeThaw: %v (cut ran: %v)", err, cut)
		}
	})

	t.Run("AttachShutdownACPI", func(t *testing.T) {
		pid := v2.PID()
		v2.Close()
		a, err := Attach(cfg2)
		if err != nil {
			t.Fatal(err)
		}
		defer a.Close()
		if a.PID() != pid || !a.Running() {
			t.Fatalf("attach: pid %d running %v", a.PID(), a.Running())
		}
		ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		if err := a.Shutdown(ctx); err != nil {
			t.Fatal(err)
		}
		if a.Running() {
			t.Fatal("still running")
		}
		con, _ := a.Console()
		if !bytes.Contains(con, []byte("REBOUND-GUEST poweroff clean")) {
			t.Fatalf("no clean poweroff:\n%s", con)
		}
	})
}

// TestGuestKill rides out a restart of the NBD server (a site restart:
// guest I/O waits for the reconnect), then stops the guest at once with
// its NBD server gone (the unplanned failover of a fenced source).
func TestGuestKill(t *testing.T) {
	t.Parallel()
	needQEMU(t)
	kernel, initrd := guestImage(t)
	dir := shortDir(t)
	data := filepath.Join(dir, "data.raw")
	if err := os.WriteFile(data, make([]byte, 32<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	uri, stopNBD := serveNBD(t, data, "k-disk0")
	d := &Driver{}
	v, err := d.Start(context.Background(), VMConfig{Name: "k", MemoryMiB: 256, Disks: []string{uri},
		Kernel: kernel, Initrd: initrd, Append: guestAppend, Dir: filepath.Join(dir, "vm")})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Kill()
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	if err := v.WaitConsole(ctx, "REBOUND-GUEST wrote seq"); err != nil {
		t.Fatal(err)
	}

	stopNBD()
	time.Sleep(2 * time.Second)
	h := hashFile(t, data)
	u, _ := url.Parse(uri)
	port, _ := strconv.Atoi(u.Port())
	_, stopNBD = serveNBDPort(t, data, "k-disk0", port)
	waitChange(t, data, h, 15*time.Second)
	if con, _ := v.Console(); bytes.Contains(con, []byte("REBOUND-GUEST write")) || bytes.Contains(con, []byte("REBOUND-GUEST fsync")) {
		t.Fatalf("guest saw an I/O error across the NBD restart:\n%s", con)
	}

	stopNBD()
	start := time.Now()
	if err := v.Kill(); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el > 6*time.Second || v.Running() {
		t.Fatalf("kill took %v, running %v", el, v.Running())
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", v.PID())); err == nil {
		t.Fatalf("pid %d still exists", v.PID())
	}
	con, _ := v.Console()
	if bytes.Contains(con, []byte("poweroff")) {
		t.Fatalf("killed guest powered off:\n%s", con)
	}
}

// bootSector is a 16-bit MBR that prints "REBOUND-BIOS ok" on COM1 and
// halts: enough to show a disk boots through the BIOS.
func bootSector() []byte {
	code := []byte{
		0x31, 0xC0, // xor ax, ax
		0x8E, 0xD8, // mov ds, ax
		0xFC,             // cld
		0xBE, 0x16, 0x7C, // mov si, msg (0x7c16)
		0xBA, 0xF8, 0x03, // mov dx, 0x3f8
		0xAC,       // lodsb
		0x84, 0xC0, // test al, al
		0x74, 0x03, // jz halt
		0xEE,       // out dx, al
		0xEB, 0xF8, // jmp lodsb
		0xF4,       // halt: hlt
		0xEB, 0xFD, // jmp halt
	}
	b := make([]byte, 1<<20)
	copy(b, code)
	copy(b[len(code):], "REBOUND-BIOS ok\r\n\x00")
	b[510], b[511] = 0x55, 0xAA
	return b
}

// TestBIOSBoot boots an imported-style disk (no kernel) from an NBD export.
func TestBIOSBoot(t *testing.T) {
	t.Parallel()
	needQEMU(t)
	dir := shortDir(t)
	img := filepath.Join(dir, "mbr.raw")
	if err := os.WriteFile(img, bootSector(), 0o644); err != nil {
		t.Fatal(err)
	}
	uri, _ := serveNBD(t, img, "bios-disk0")
	v, err := (&Driver{}).Start(context.Background(), VMConfig{Name: "bios", MemoryMiB: 64, Disks: []string{uri}, Dir: filepath.Join(dir, "vm")})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Kill()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := v.WaitConsole(ctx, "REBOUND-BIOS ok"); err != nil {
		con, _ := v.Console()
		t.Fatalf("%v\n%q", err, con)
	}
}
