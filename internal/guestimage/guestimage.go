// Package guestimage builds and boots the test guest (scripts/build-guest.sh,
// cmd/rebound-guest) under QEMU, for tests that need a real machine writing
// to a real disk. Tests read the guest's verdicts from its serial console:
// every guest line starts with "REBOUND-GUEST ".
package guestimage

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rebound-dr/rebound/internal/guestimage/record"
)

var (
	buildOnce    sync.Once
	buildVmlinux string
	buildInitrd  string
	buildErr     error
)

// Root returns the repository root (the directory holding go.mod).
func Root() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", errors.New("guestimage: cannot locate source")
	}
	dir := filepath.Dir(file)
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("guestimage: no go.mod above " + file)
		}
		dir = parent
	}
}

// Build runs scripts/build-guest.sh once per test binary and returns the
// kernel and initramfs paths. The script is fast when .guest/ is up to date.
// It fails t with the script's output when the build fails.
func Build(t testing.TB) (vmlinux, initrd string) {
	t.Helper()
	buildOnce.Do(func() {
		root, err := Root()
		if err != nil {
			buildErr = err
			return
		}
		out := filepath.Join(root, ".guest")
		cmd := exec.Command(filepath.Join(root, "scripts", "build-guest.sh"), out)
		cmd.Dir = root
		b, err := cmd.CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("scripts/build-guest.sh: %v\n%s", err, b)
			return
		}
		buildVmlinux = filepath.Join(out, "vmlinux")
		// Uncompressed: under TCG the kernel's gunzip costs 2-3 s of boot.
		buildInitrd = filepath.Join(out, "initramfs.cpio")
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return buildVmlinux, buildInitrd
}

// BootOptions say how to boot the guest.
type BootOptions struct {
	// Disk is the data disk: a raw image path, or an NBD URI
	// (nbd://host:port/export, nbd+unix:///export?socket=PATH).
	Disk string
	// Records limits how many records the guest writes this boot (0: no limit);
	// with Halt it powers off cleanly after them.
	Records int
	Halt    bool
	// Rate is records per second (0: the guest's default, 20).
	Rate int
	// Append is added to the kernel command line.
	Append string
	// MemoryMB defaults to 256.
	MemoryMB int
	// Accel is "kvm" or "tcg"; empty picks KVM only if it really boots the guest.
	Accel string
	// Dir holds the serial log; default t.TempDir().
	Dir string
}

// VM is a running guest. Its QEMU is killed at test cleanup if still running.
type VM struct {
	Serial  string    // serial console log
	Agent   string    // qemu-guest-agent unix socket
	QMP     string    // QMP unix socket
	Started time.Time // when QEMU was started
	Accel   string

	t      testing.TB
	cmd    *exec.Cmd
	done   chan struct{}
	err    error // QEMU's exit, valid after done
	stderr bytes.Buffer

	mu  sync.Mutex
	off int // WaitLine's cursor into the serial log
}

// KernelArgs returns the kernel command line Boot uses for opts.
func KernelArgs(opts BootOptions) string {
	args := []string{"console=ttyS0", "quiet", "panic=-1"}
	if opts.Records > 0 {
		args = append(args, "rebound.records="+strconv.Itoa(opts.Records))
	}
	if opts.Halt {
		args = append(args, "rebound.halt=1")
	}
	if opts.Rate > 0 {
		args = append(args, "rebound.rate="+strconv.Itoa(opts.Rate))
	}
	if opts.Append != "" {
		args = append(args, opts.Append)
	}
	return strings.Join(args, " ")
}

// DriveArg returns the QEMU -drive value for a disk path or NBD URI.
func DriveArg(disk string) string {
	file := disk
	if !strings.HasPrefix(disk, "nbd:") && !strings.HasPrefix(disk, "nbd+") {
		file = strings.ReplaceAll(disk, ",", ",,")
	}
	return "file=" + file + ",format=raw,if=virtio,cache=writeback"
}

// Boot starts the guest on opts.Disk and returns at once; use WaitLine to
// follow its console. QEMU must be installed: t fails otherwise.
func Boot(t testing.TB, opts BootOptions) *VM {
	t.Helper()
	vmlinux, initrd := Build(t)
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatal("qemu-system-x86_64 not found (install qemu-system-x86)")
	}
	if opts.Disk == "" {
		t.Fatal("guestimage.Boot: no disk")
	}
	dir := opts.Dir
	if dir == "" {
		dir = t.TempDir()
	}
	// Unix socket paths must stay under 108 bytes: keep them in a short dir.
	sockDir, err := os.MkdirTemp("", "rg")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	mem := opts.MemoryMB
	if mem == 0 {
		mem = 256
	}
	accel := opts.Accel
	if accel == "" {
		accel = Accel(t)
	}
	vm := &VM{
		Serial: filepath.Join(dir, "serial.log"),
		Agent:  filepath.Join(sockDir, "qga.sock"),
		QMP:    filepath.Join(sockDir, "qmp.sock"),
		Accel:  accel,
		t:      t,
		done:   make(chan struct{}),
	}
	os.Remove(vm.Serial)
	args := []string{
		"-accel", accel, "-M", "pc", "-m", strconv.Itoa(mem), "-smp", "1",
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-kernel", vmlinux, "-initrd", initrd, "-append", KernelArgs(opts),
		"-chardev", "file,id=ser0,path=" + vm.Serial, "-serial", "chardev:ser0",
		"-qmp", "unix:" + vm.QMP + ",server=on,wait=off",
		"-drive", DriveArg(opts.Disk),
		"-device", "virtio-serial-pci,id=vser0",
		"-chardev", "socket,id=qga0,path=" + vm.Agent + ",server=on,wait=off",
		"-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
	}
	vm.cmd = exec.Command(qemu, args...)
	vm.cmd.Stderr = &vm.stderr
	vm.Started = time.Now()
	if err := vm.cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	go func() {
		vm.err = vm.cmd.Wait()
		close(vm.done)
	}()
	t.Cleanup(func() {
		vm.cmd.Process.Kill()
		<-vm.done
	})
	return vm
}

var (
	accelOnce sync.Once
	accel     string
)

// Accel returns the accelerator to use: $REBOUND_QEMU_ACCEL if set, else
// "kvm" when a probe boot under KVM reaches the guest's userspace, else "tcg".
// /dev/kvm may exist and still fail to boot guests, so it is tried, once.
func Accel(t testing.TB) string {
	t.Helper()
	accelOnce.Do(func() {
		if a := os.Getenv("REBOUND_QEMU_ACCEL"); a != "" {
			accel = a
			return
		}
		accel = "tcg"
		if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err != nil {
			return
		} else {
			f.Close()
		}
		vmlinux, initrd := Build(t)
		dir, err := os.MkdirTemp("", "rgprobe")
		if err != nil {
			return
		}
		defer os.RemoveAll(dir)
		serial := filepath.Join(dir, "serial.log")
		cmd := exec.Command("qemu-system-x86_64", "-accel", "kvm", "-M", "pc", "-m", "128",
			"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
			"-kernel", vmlinux, "-initrd", initrd, "-append", "console=ttyS0 quiet panic=-1 rebound.probe=1",
			"-chardev", "file,id=ser0,path="+serial, "-serial", "chardev:ser0")
		if err := cmd.Start(); err != nil {
			return
		}
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		if b, _ := os.ReadFile(serial); bytes.Contains(b, []byte("REBOUND-GUEST probe ok")) {
			accel = "kvm"
		}
	})
	return accel
}

// Log returns the serial console so far.
func (vm *VM) Log() string {
	b, _ := os.ReadFile(vm.Serial)
	return string(b)
}

// Exited reports whether QEMU has exited.
func (vm *VM) Exited() bool {
	select {
	case <-vm.done:
		return true
	default:
		return false
	}
}

// WaitLine waits until a console line after the previous match matches re,
// and returns its submatches. It fails fast when QEMU exits first.
func (vm *VM) WaitLine(re *regexp.Regexp, timeout time.Duration) ([]string, error) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	deadline := time.Now().Add(timeout)
	for {
		exited := vm.Exited() // read the log after: a last line is not missed
		b, _ := os.ReadFile(vm.Serial)
		for vm.off < len(b) {
			i := bytes.IndexByte(b[vm.off:], '\n')
			if i < 0 {
				break // an incomplete line: wait for its end
			}
			line := strings.TrimRight(string(b[vm.off:vm.off+i]), "\r")
			vm.off += i + 1
			if m := re.FindStringSubmatch(line); m != nil {
				return m, nil
			}
		}
		if exited {
			return nil, fmt.Errorf("qemu exited (%v) before a line matched %q; stderr: %s; console tail:\n%s",
				vm.err, re, strings.TrimSpace(vm.stderr.String()), tail(string(b), 30))
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("no line matched %q in %v; console tail:\n%s", re, timeout, tail(string(b), 30))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Console lines of the guest, for WaitLine.
var (
	LineMkfs     = regexp.MustCompile(`^REBOUND-GUEST mkfs \S+ done`)
	LineFsck     = regexp.MustCompile(`^REBOUND-GUEST fsck (clean|errors.*)$`)
	LineVerdict  = regexp.MustCompile(`^REBOUND-GUEST (?:verified (\d+) records, last seq \d+, ok.*|CORRUPT .*)$`)
	LineBooted   = regexp.MustCompile(`^REBOUND-GUEST booted`)
	LineAgent    = regexp.MustCompile(`^REBOUND-GUEST agent started`)
	LineWrote    = regexp.MustCompile(`^REBOUND-GUEST wrote seq (\d+)`)
	LineDone     = regexp.MustCompile(`^REBOUND-GUEST wrote seq (\d+), done`)
	LineStopping = regexp.MustCompile(`^REBOUND-GUEST stopping at seq (\d+)`)
	LinePoweroff = regexp.MustCompile(`^REBOUND-GUEST poweroff (clean|unclean)`)
)

// BootVerdict is what the guest reported about its disk at boot.
type BootVerdict struct {
	Fsck    string        // "clean", or "errors: ..." (then repaired)
	Records uint64        // records verified intact
	Corrupt string        // the CORRUPT line; "" when the records are intact
	Booted  time.Duration // from QEMU's start to the "booted" line
}

// OK reports a clean filesystem and intact records.
func (v BootVerdict) OK() bool { return v.Fsck == "clean" && v.Corrupt == "" }

// WaitBooted waits for the fsck and records verdicts and the "booted" line.
func (vm *VM) WaitBooted(timeout time.Duration) (BootVerdict, error) {
	var v BootVerdict
	deadline := time.Now().Add(timeout)
	m, err := vm.WaitLine(LineFsck, time.Until(deadline))
	if err != nil {
		return v, err
	}
	v.Fsck = m[1]
	if m, err = vm.WaitLine(LineVerdict, time.Until(deadline)); err != nil {
		return v, err
	}
	if m[1] == "" {
		v.Corrupt = m[0]
	} else if v.Records, err = strconv.ParseUint(m[1], 10, 64); err != nil {
		return v, err
	}
	if _, err = vm.WaitLine(LineBooted, time.Until(deadline)); err != nil {
		return v, err
	}
	v.Booted = time.Since(vm.Started)
	return v, nil
}

// MustWaitLine is WaitLine that fails the test.
func (vm *VM) MustWaitLine(re *regexp.Regexp, timeout time.Duration) []string {
	vm.t.Helper()
	m, err := vm.WaitLine(re, timeout)
	if err != nil {
		vm.t.Fatal(err)
	}
	return m
}

// Wait waits for QEMU to exit, at most timeout, and returns its exit error.
func (vm *VM) Wait(timeout time.Duration) error {
	select {
	case <-vm.done:
		return vm.err
	case <-time.After(timeout):
		return fmt.Errorf("qemu still running after %v", timeout)
	}
}

// Kill stops QEMU at once, like pulling the plug, and waits for it.
func (vm *VM) Kill() {
	vm.cmd.Process.Kill()
	<-vm.done
}

// Stop shuts the guest down cleanly through its agent (guest-shutdown) and
// waits for QEMU to exit; if that fails within 30 s it kills QEMU and returns
// the error.
func (vm *VM) Stop() error {
	if vm.Exited() {
		return nil
	}
	err := vm.Shutdown(30 * time.Second)
	if err != nil {
		vm.Kill()
	}
	return err
}

// Shutdown asks the guest agent for a powerdown and waits for QEMU to exit.
func (vm *VM) Shutdown(timeout time.Duration) error {
	if _, err := vm.AgentCall("guest-shutdown", map[string]string{"mode": "powerdown"}, 0); err != nil {
		return err
	}
	return vm.Wait(timeout)
}

// Powerdown presses the ACPI power button (QMP system_powerdown) and waits
// for QEMU to exit.
func (vm *VM) Powerdown(timeout time.Duration) error {
	if _, err := vm.QMPCall("system_powerdown", nil); err != nil {
		return err
	}
	return vm.Wait(timeout)
}

// AgentCall runs one qemu-guest-agent command and returns its "return"
// value. A wait of 0 means the command sends no reply (guest-shutdown).
func (vm *VM) AgentCall(command string, args any, wait time.Duration) (json.RawMessage, error) {
	c, err := net.DialTimeout("unix", vm.Agent, 5*time.Second)
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10*time.Second + wait))
	r := bufio.NewReader(c)
	// guest-sync-delimited flushes stale output: the reply follows a 0xFF byte.
	id := time.Now().UnixNano() & 0x7fffffff
	if err := writeJSON(c, "guest-sync-delimited", map[string]int64{"id": id}); err != nil {
		return nil, err
	}
	if _, err := r.ReadBytes(0xFF); err != nil {
		return nil, fmt.Errorf("agent: sync: %w", err)
	}
	for {
		var resp struct {
			Return json.RawMessage `json:"return"`
		}
		line, err := r.ReadBytes('\n')
		if err != nil {
			return nil, fmt.Errorf("agent: sync: %w", err)
		}
		if json.Unmarshal(line, &resp) == nil && string(resp.Return) == strconv.FormatInt(id, 10) {
			break
		}
	}
	if err := writeJSON(c, command, args); err != nil {
		return nil, err
	}
	if wait == 0 {
		return nil, nil
	}
	c.SetDeadline(time.Now().Add(wait))
	return readReply(r, command)
}

// QMPCall runs one QMP command and returns its "return" value.
func (vm *VM) QMPCall(command string, args any) (json.RawMessage, error) {
	c, err := net.DialTimeout("unix", vm.QMP, 5*time.Second)
	if err != nil {
		return nil, fmt.Errorf("qmp: %w", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(c)
	if _, err := r.ReadBytes('\n'); err != nil { // greeting
		return nil, fmt.Errorf("qmp: %w", err)
	}
	if err := writeJSON(c, "qmp_capabilities", nil); err != nil {
		return nil, err
	}
	if _, err := readReply(r, "qmp_capabilities"); err != nil {
		return nil, err
	}
	if err := writeJSON(c, command, args); err != nil {
		return nil, err
	}
	return readReply(r, command)
}

func writeJSON(c net.Conn, command string, args any) error {
	m := map[string]any{"execute": command}
	if args != nil {
		m["arguments"] = args
	}
	b, _ := json.Marshal(m)
	_, err := c.Write(append(b, '\n'))
	return err
}

// readReply returns the next reply's "return", skipping QMP events.
func readReply(r *bufio.Reader, command string) (json.RawMessage, error) {
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			return nil, fmt.Errorf("%s: %w", command, err)
		}
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := json.Unmarshal(bytes.TrimLeft(line, "\xff"), &resp); err != nil {
			continue
		}
		if resp.Event != "" {
			continue
		}
		if resp.Error != nil {
			return nil, fmt.Errorf("%s: %s: %s", command, resp.Error.Class, resp.Error.Desc)
		}
		return resp.Return, nil
	}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// ImageRecords reads /records out of the ext4 filesystem in a raw image with
// debugfs, on the host, and verifies it. debugfs does not replay the journal:
// use it on an image the guest shut down cleanly.
func ImageRecords(t testing.TB, image string) record.Verdict {
	t.Helper()
	debugfs, err := exec.LookPath("debugfs")
	if err != nil {
		t.Fatal("debugfs not found (install e2fsprogs)")
	}
	out := filepath.Join(t.TempDir(), "records")
	if b, err := exec.Command(debugfs, "-R", "dump /records "+out, image).CombinedOutput(); err != nil {
		t.Fatalf("debugfs dump: %v: %s", err, b)
	}
	f, err := os.Open(out)
	if err != nil {
		t.Fatalf("debugfs did not dump /records: %v", err)
	}
	defer f.Close()
	v, err := record.Verify(f)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// RecordBlock returns the byte offset in a raw image of the records file's
// record k (1-based), so tests can damage it on purpose.
func RecordBlock(t testing.TB, image string, k int) int64 {
	t.Helper()
	b, err := exec.Command("debugfs", "-R", fmt.Sprintf("bmap /records %d", k-1), image).CombinedOutput()
	if err != nil {
		t.Fatalf("debugfs bmap: %v: %s", err, b)
	}
	fields := strings.Fields(string(b))
	blk, err := strconv.ParseInt(fields[len(fields)-1], 10, 64)
	if err != nil || blk == 0 {
		t.Fatalf("debugfs bmap: %q", b)
	}
	return blk * record.Size // the guest makes 4 KiB-block filesystems
}
