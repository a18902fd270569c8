// Command rebound-guest is /init of the test guest that scripts/build-guest.sh
// builds. It checks and mounts the ext4 data disk, verifies the records an
// earlier boot wrote, prints its verdict on the console, runs qemu-ga, then
// appends checksummed records with fsync until it is told to power off.
//
// Every line tests read starts with "REBOUND-GUEST ". Kernel command line:
//
//	rebound.records=K  write at most K records this boot (default: no limit)
//	rebound.rate=R     records per second (default 20)
//	rebound.halt=1     power off cleanly after the K records
//	rebound.disk=PATH  the data disk (default /dev/vda)
//	rebound.probe=1    print "REBOUND-GUEST probe ok" and power off at once
//	rebound.bench=MiB  write MiB sequentially (1 MiB, O_DIRECT) then 4 KiB
//	                   random writes for 3 s to rebound.benchdisk (default
//	                   /dev/vdb), print "REBOUND-GUEST bench ..." and power off
//
// Run on a host, `rebound-guest verify FILE` prints the verdict for a records file.
package main

import (
	"bytes"
	crand "crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/rebound-dr/rebound/internal/guestimage/record"
)

// sysFinitModule is finit_module(2) on amd64; syscall lacks the name.
const sysFinitModule = 313

const (
	mnt         = "/data"
	recordsFile = "/data/records"
	agentPort   = "org.qemu.guest_agent.0"
)

var outMu sync.Mutex

// say prints one console line; lines are whole so tests can match them.
func say(format string, args ...any) {
	outMu.Lock()
	defer outMu.Unlock()
	fmt.Fprintf(os.Stdout, "REBOUND-GUEST "+format+"\n", args...)
}

func main() {
	if len(os.Args) == 3 && os.Args[1] == "verify" {
		os.Exit(verifyCmd(os.Args[2]))
	}
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "rebound-guest runs as /init of the test guest; on a host: rebound-guest verify FILE")
		os.Exit(2)
	}
	g := &guest{stop: make(chan int, 1)}
	g.run()
}

func verifyCmd(path string) int {
	f, err := os.Open(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	defer f.Close()
	v, err := record.Verify(f)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	fmt.Println(v.Line())
	if !v.OK() {
		return 1
	}
	return 0
}

type config struct {
	records uint64 // 0: no limit
	rate    int
	halt    bool
	disk    string
	probe   bool
	debug   bool // print each step's uptime
	// bench writes benchMiB MiB to benchDisk (a raw second disk) and
	// prints throughput and IOPS, then powers off.
	benchMiB  int
	benchDisk string
}

func parseCmdline(s string) config {
	c := config{rate: 20, disk: "/dev/vda", benchDisk: "/dev/vdb"}
	for _, f := range strings.Fields(s) {
		k, v, _ := strings.Cut(f, "=")
		switch k {
		case "rebound.records":
			if n, err := strconv.ParseUint(v, 10, 64); err == nil {
				c.records = n
			}
		case "rebound.rate":
			if n, err := strconv.Atoi(v); err == nil && n > 0 {
				c.rate = n
			}
		case "rebound.halt":
			c.halt = v == "1" || v == "true"
		case "rebound.disk":
			c.disk = v
		case "rebound.probe":
			c.probe = v == "1"
		case "rebound.bench":
			if n, err := strconv.Atoi(v); err == nil && n > 0 {
				c.benchMiB = n
			}
		case "rebound.benchdisk":
			c.benchDisk = v
		case "rebound.debug":
			c.debug = v == "1"
		}
	}
	return c
}

type guest struct {
	cfg  config
	stop chan int // the reboot command a signal asked for

	mounted bool
	agent   *agent
}

func (g *guest) step(name string) {
	if g.cfg.debug {
		say("debug %s at %s", name, uptime())
	}
}

func (g *guest) run() {
	setupSystem()
	cmdline, _ := os.ReadFile("/proc/cmdline")
	g.cfg = parseCmdline(string(cmdline))
	if g.cfg.probe {
		say("probe ok, uptime %s", uptime())
		g.poweroff(syscall.LINUX_REBOOT_CMD_POWER_OFF)
	}
	g.watchSignals()
	g.step("modules")
	loadModules(g.cfg.debug)
	if g.cfg.benchMiB > 0 {
		bench(g.cfg.benchDisk, g.cfg.benchMiB)
		g.poweroff(syscall.LINUX_REBOOT_CMD_POWER_OFF)
	}
	g.step("disk")

	if err := g.prepareDisk(); err != nil {
		say("CORRUPT %v", err)
		g.idle()
	}
	g.step("verify")
	v, err := verifyFile(recordsFile)
	switch {
	case err != nil:
		say("CORRUPT reading %s: %v", recordsFile, err)
	default:
		outMu.Lock()
		fmt.Println(v.Line())
		outMu.Unlock()
	}
	say("booted, uptime %s", uptime())
	g.agent = startAgent()
	if err != nil || !v.OK() {
		g.idle() // keep the evidence: no writes after corruption
	}
	g.write(v)
	g.idle()
}

// setupSystem mounts the API filesystems and makes sure stdio is the console.
func setupSystem() {
	for _, m := range []struct{ src, dst, typ string }{
		{"proc", "/proc", "proc"},
		{"sysfs", "/sys", "sysfs"},
		{"devtmpfs", "/dev", "devtmpfs"},
		{"tmpfs", "/run", "tmpfs"},
	} {
		os.MkdirAll(m.dst, 0o755)
		if err := syscall.Mount(m.src, m.dst, m.typ, 0, ""); err != nil && err != syscall.EBUSY {
			fmt.Fprintf(os.Stderr, "mount %s: %v\n", m.dst, err)
		}
	}
	// Without /dev/console in the initramfs the kernel gives /init no stdio.
	if _, err := os.Stdout.Write(nil); err != nil || !isatty(1) {
		if f, err := os.OpenFile("/dev/console", os.O_RDWR, 0); err == nil {
			for fd := 0; fd < 3; fd++ {
				syscall.Dup3(int(f.Fd()), fd, 0)
			}
		}
	}
	os.Setenv("PATH", "/sbin:/usr/sbin:/bin:/usr/bin")
}

func isatty(fd int) bool {
	var st syscall.Termios
	_, _, e := syscall.Syscall(syscall.SYS_IOCTL, uintptr(fd), syscall.TCGETS, uintptr(unsafe.Pointer(&st)))
	return e == 0
}

// loadModules inserts /lib/modules/*.ko in the order of load.list, which the
// build script wrote dependencies first. A module the CPU cannot use (e.g.
// crc32c-intel under TCG) fails harmlessly.
func loadModules(debug bool) {
	list, err := os.ReadFile("/lib/modules/load.list")
	if err != nil {
		return
	}
	for _, name := range strings.Fields(string(list)) {
		f, err := os.Open(filepath.Join("/lib/modules", name))
		if err != nil {
			say("module %s: %v", name, err)
			continue
		}
		param := []byte{0}
		t0 := time.Now()
		_, _, e := syscall.Syscall(sysFinitModule, f.Fd(), uintptr(unsafe.Pointer(&param[0])), 0)
		f.Close()
		if debug {
			say("debug module %s: %v (%v)", name, time.Since(t0).Round(time.Millisecond), e)
		}
		if e != 0 && e != syscall.EEXIST && e != syscall.ENODEV {
			say("module %s: %v", name, e)
		}
	}
}

// prepareDisk waits for the disk, makes a filesystem on a blank one, replays
// the journal, checks it read-only (the verdict), repairs if needed, mounts it.
func (g *guest) prepareDisk() error {
	disk := g.cfg.disk
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(disk); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no disk %s", disk)
		}
		time.Sleep(20 * time.Millisecond)
	}
	hasFS, blank, err := probeDisk(disk)
	if err != nil {
		return err
	}
	if !hasFS {
		if !blank {
			return fmt.Errorf("%s holds no ext4 filesystem and is not blank", disk)
		}
		g.step("mkfs")
		// The UUID and hash seed come from /dev/urandom: mke2fs's own
		// getrandom() blocks for seconds until the crng is ready under TCG.
		// The disk is blank, so mke2fs need not zero tables and journal.
		out, err := exec.Command("mke2fs", "-t", "ext4", "-F", "-q", "-b", "4096",
			"-U", uuid(), "-E", "nodiscard,assume_storage_prezeroed=1,hash_seed="+uuid(),
			"-L", "rebound", disk).CombinedOutput()
		if err != nil {
			return fmt.Errorf("mkfs %s: %v: %s", disk, err, bytes.TrimSpace(out))
		}
		say("mkfs %s done", disk)
	}
	// A crash-consistent image has a journal to replay: that is what mounting
	// would do, so replay it first, then judge the filesystem.
	g.step("fsck")
	out, err := exec.Command("e2fsck", "-E", "journal_only", "-p", disk).CombinedOutput()
	if code := exitCode(err); code&^1 != 0 {
		say("fsck journal replay: exit %d: %s", code, oneLine(out))
	} else if len(bytes.TrimSpace(out)) > 0 {
		say("fsck journal: %s", oneLine(out))
	}
	out, err = exec.Command("e2fsck", "-f", "-n", disk).CombinedOutput()
	if code := exitCode(err); code == 0 {
		say("fsck clean")
	} else {
		say("fsck errors: exit %d: %s", code, oneLine(out))
		out, err = exec.Command("e2fsck", "-f", "-y", disk).CombinedOutput()
		say("fsck repair: exit %d: %s", exitCode(err), oneLine(out))
	}
	g.step("mount")
	os.MkdirAll(mnt, 0o755)
	if err := syscall.Mount(disk, mnt, "ext4", 0, ""); err != nil {
		return fmt.Errorf("mount %s: %w", disk, err)
	}
	g.mounted = true
	return nil
}

// probeDisk reports whether disk has an ext2/3/4 superblock, and whether its
// first MiB is all zeroes (only such a disk is formatted: anything else may be
// damage to report, not to wipe).
func probeDisk(disk string) (hasFS, blank bool, err error) {
	f, err := os.Open(disk)
	if err != nil {
		return false, false, err
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	n, err := f.ReadAt(buf, 0)
	if err != nil && n < 2048 {
		return false, false, fmt.Errorf("read %s: %w", disk, err)
	}
	buf = buf[:n]
	if binary.LittleEndian.Uint16(buf[1024+56:]) == 0xEF53 {
		return true, false, nil
	}
	return false, !bytes.ContainsFunc(buf, func(r rune) bool { return r != 0 }), nil
}

func verifyFile(path string) (record.Verdict, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return record.Verdict{}, nil
	} else if err != nil {
		return record.Verdict{}, err
	}
	defer f.Close()
	return record.Verify(f)
}

// write appends records after the verified ones until the limit, a signal, or
// forever. A record is reported written only after its fsync returned.
func (g *guest) write(v record.Verdict) {
	f, err := os.OpenFile(recordsFile, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		say("write: %v", err)
		return
	}
	defer f.Close()
	// Drop the unsynced tail so record seq stays at (seq-1)*Size.
	if err := f.Truncate(int64(v.Records) * record.Size); err != nil {
		say("write: truncate: %v", err)
		return
	}
	boot := binary.LittleEndian.Uint64(urandom(8))
	buf := make([]byte, record.Size)
	seq := v.Records
	tick := time.NewTicker(time.Second / time.Duration(g.cfg.rate))
	defer tick.Stop()
	lastSay := time.Now()
	for n := uint64(0); g.cfg.records == 0 || n < g.cfg.records; n++ {
		select {
		case cmd := <-g.stop:
			f.Close()
			say("stopping at seq %d", seq)
			g.poweroff(cmd)
		case <-tick.C:
		}
		seq++
		record.Encode(buf, seq, boot, time.Now().UnixNano())
		if _, err := f.WriteAt(buf, int64(seq-1)*record.Size); err != nil {
			say("write seq %d: %v", seq, err)
			return
		}
		if err := f.Sync(); err != nil {
			say("fsync seq %d: %v", seq, err)
			return
		}
		if time.Since(lastSay) >= time.Second {
			say("wrote seq %d", seq)
			lastSay = time.Now()
		}
	}
	say("wrote seq %d, done", seq)
	f.Close()
	if g.cfg.halt {
		g.poweroff(syscall.LINUX_REBOOT_CMD_POWER_OFF)
	}
}

// idle waits for a signal to power off; it never returns (PID 1 must not exit).
func (g *guest) idle() {
	g.poweroff(<-g.stop)
}

// watchSignals maps the signals busybox's poweroff/halt/reboot and our
// /sbin/shutdown send to PID 1, and the ACPI power button, to g.stop.
func (g *guest) watchSignals() {
	ch := make(chan os.Signal, 4)
	signal.Notify(ch, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGTERM, syscall.SIGINT, syscall.SIGPWR)
	go func() {
		for s := range ch {
			cmd := syscall.LINUX_REBOOT_CMD_POWER_OFF
			switch s {
			case syscall.SIGUSR1:
				cmd = syscall.LINUX_REBOOT_CMD_HALT
			case syscall.SIGTERM, syscall.SIGINT:
				cmd = syscall.LINUX_REBOOT_CMD_RESTART
			}
			select {
			case g.stop <- cmd:
			default:
			}
		}
	}()
	go g.watchPowerButton()
}

// watchPowerButton reads the ACPI power button's input device (QMP
// system_powerdown) and asks for a poweroff on KEY_POWER.
func (g *guest) watchPowerButton() {
	var dev string
	for i := 0; i < 50 && dev == ""; i++ {
		names, _ := filepath.Glob("/sys/class/input/event*/device/name")
		for _, n := range names {
			b, _ := os.ReadFile(n)
			if strings.TrimSpace(string(b)) == "Power Button" {
				dev = "/dev/input/" + filepath.Base(filepath.Dir(filepath.Dir(n)))
			}
		}
		if dev == "" {
			time.Sleep(100 * time.Millisecond)
		}
	}
	if dev == "" {
		return
	}
	f, err := os.Open(dev)
	if err != nil {
		return
	}
	ev := make([]byte, 24) // struct input_event on 64-bit
	for {
		if _, err := f.Read(ev); err != nil {
			return
		}
		typ := binary.LittleEndian.Uint16(ev[16:])
		code := binary.LittleEndian.Uint16(ev[18:])
		val := int32(binary.LittleEndian.Uint32(ev[20:]))
		if typ == 1 && code == 116 && val == 1 { // EV_KEY, KEY_POWER, press
			select {
			case g.stop <- syscall.LINUX_REBOOT_CMD_POWER_OFF:
			default:
			}
		}
	}
}

// poweroff stops the agent, thaws and unmounts the data disk, syncs and
// issues cmd. It never returns.
func (g *guest) poweroff(cmd int) {
	g.agent.stop()
	clean := true
	if g.mounted {
		if d, err := os.Open(mnt); err == nil {
			const fithaw = 0xC0045878
			syscall.Syscall(syscall.SYS_IOCTL, d.Fd(), fithaw, 0)
			d.Close()
		}
		syscall.Sync()
		var err error
		for i := 0; i < 20; i++ {
			if err = syscall.Unmount(mnt, 0); err == nil {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if err != nil {
			clean = false
			say("unmount %s: %v", mnt, err)
			syscall.Mount("", mnt, "", syscall.MS_REMOUNT|syscall.MS_RDONLY, "")
		}
	}
	syscall.Sync()
	if clean {
		say("poweroff clean")
	} else {
		say("poweroff unclean")
	}
	for {
		syscall.Reboot(cmd)
		time.Sleep(time.Second)
	}
}

// agent runs qemu-ga on its virtio-serial port, restarting it if it exits.
type agent struct {
	mu      sync.Mutex
	cmd     *exec.Cmd
	stopped bool
	done    chan struct{}
}

func startAgent() *agent {
	port := findAgentPort()
	if port == "" {
		say("agent: no %s port", agentPort)
		return nil
	}
	a := &agent{done: make(chan struct{})}
	go a.loop(port)
	say("agent started on %s", port)
	return a
}

// findAgentPort makes the /dev/virtio-ports link that udev would make.
func findAgentPort() string {
	for i := 0; i < 50; i++ {
		names, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
		for _, n := range names {
			b, _ := os.ReadFile(n)
			if strings.TrimSpace(string(b)) == agentPort {
				link := "/dev/virtio-ports/" + agentPort
				os.MkdirAll("/dev/virtio-ports", 0o755)
				os.Remove(link)
				os.Symlink("../"+filepath.Base(filepath.Dir(n)), link)
				return link
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return ""
}

func (a *agent) loop(port string) {
	defer close(a.done)
	for {
		a.mu.Lock()
		if a.stopped {
			a.mu.Unlock()
			return
		}
		cmd := exec.Command("qemu-ga", "-m", "virtio-serial", "-p", port, "-t", "/run", "-f", "/run/qemu-ga.pid")
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stdout
		err := cmd.Start()
		if err == nil {
			a.cmd = cmd
		}
		a.mu.Unlock()
		if err != nil {
			say("agent: %v", err)
			return
		}
		err = cmd.Wait()
		a.mu.Lock()
		stopped := a.stopped
		a.mu.Unlock()
		if stopped {
			return
		}
		say("agent exited: %v; restarting", err)
		time.Sleep(time.Second)
	}
}

func (a *agent) stop() {
	if a == nil {
		return
	}
	a.mu.Lock()
	a.stopped = true
	if a.cmd != nil {
		a.cmd.Process.Signal(syscall.SIGTERM)
	}
	a.mu.Unlock()
	select {
	case <-a.done:
	case <-time.After(3 * time.Second):
		a.mu.Lock()
		if a.cmd != nil {
			a.cmd.Process.Kill()
		}
		a.mu.Unlock()
	}
}

// urandom reads n bytes from /dev/urandom, which does not wait for the
// crng to be initialized (getrandom and crypto/rand do).
func urandom(n int) []byte {
	b := make([]byte, n)
	if f, err := os.Open("/dev/urandom"); err == nil {
		io.ReadFull(f, b)
		f.Close()
	}
	return b
}

func uuid() string {
	b := urandom(16)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

func exitCode(err error) int {
	var ee *exec.ExitError
	if err == nil {
		return 0
	} else if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	return -1
}

func oneLine(b []byte) string {
	s := strings.Join(strings.Fields(string(b)), " ")
	if len(s) > 400 {
		s = s[:400] + "..."
	}
	return s
}

func uptime() string {
	b, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return "?"
	}
	return f[0] + "s"
}

// bench measures the guest's view of a raw disk: sequential 1 MiB writes
// and 4 KiB random writes with O_DIRECT, each ended by an fdatasync.
func bench(disk string, mib int) {
	f, err := os.OpenFile(disk, os.O_WRONLY|syscall.O_DIRECT, 0)
	if err != nil {
		say("bench: %v", err)
		return
	}
	defer f.Close()
	size, _ := f.Seek(0, 2)
	raw := make([]byte, 1<<20+4096)
	off := 4096 - int(uintptr(unsafe.Pointer(&raw[0]))%4096)
	buf := raw[off : off+1<<20] // O_DIRECT wants aligned memory
	crand.Read(buf)
	mib = min(mib, int(size>>20))
	start := time.Now()
	for i := 0; i < mib; i++ {
		if _, err := f.WriteAt(buf, int64(i)<<20); err != nil {
			say("bench: write: %v", err)
			return
		}
	}
	syscall.Fdatasync(int(f.Fd()))
	el := time.Since(start).Seconds()
	say("bench seq write %d MiB in %.2f s: %.1f MB/s", mib, el, float64(mib)*1.048576/el)
	blocks := size / 4096
	var n int
	var x uint64 = 0x9e3779b97f4a7c15
	start = time.Now()
	for time.Since(start) < 3*time.Second {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		if _, err := f.WriteAt(buf[:4096], int64(x%uint64(blocks))*4096); err != nil {
			say("bench: write: %v", err)
			return
		}
		n++
	}
	syscall.Fdatasync(int(f.Fd()))
	say("bench rand write 4k: %d writes in %.2f s: %.0f IOPS", n, time.Since(start).Seconds(), float64(n)/time.Since(start).Seconds())
}
