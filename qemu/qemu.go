// Package qemu is Rebound's QEMU driver: it runs a machine as a
// qemu-system-x86_64 virtual machine whose disks are the site's NBD exports,
// so every guest write goes through the site and is captured. It talks QMP
// (through github.com/digitalocean/go-qemu) to stop the VM and
// qemu-guest-agent (over a virtio-serial channel) to shut the guest down and
// freeze its filesystems for app-consistent points.
//
// A VM's runtime state lives in one directory (VMConfig.Dir): the QMP and
// agent sockets, the pid file, the serial console log and QEMU's own log. The
// QEMU process is its own session leader, so it outlives the site process;
// Attach finds it again from that directory.
package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rebound-dr/rebound"
)

// Files in a VM's runtime directory.
const (
	QMPSocket   = "qmp.sock"
	AgentSocket = "qga.sock"
	ConsoleLog  = "console.log"
	PIDFile     = "pid"
	QEMULog     = "qemu.log" // QEMU's stdout and stderr
)

// AgentChannel is the virtio-serial port name qemu-guest-agent opens.
const AgentChannel = "org.qemu.guest_agent.0"

// VMConfig describes a virtual machine.
type VMConfig struct {
	Name      string
	CPUs      int // default 1
	MemoryMiB int // default 512
	// Disks are attached as virtio disks in order: NBD URIs
	// (nbd://host[:port]/export, nbds://... with NBDTLS, or
	// nbd+unix:///export?socket=PATH) or, for
	// tests and imports, raw image file paths.
	Disks []string
	// Direct kernel boot. An empty Kernel boots disk 0 through the BIOS.
	Kernel, Initrd, Append string
	// NIC is the VM's network card; nil means none.
	NIC *NICConfig
	// Dir is the runtime directory: sockets, pid, console log.
	Dir string
	// NoAgent leaves out the guest agent channel: agent calls then fail at
	// once instead of timing out.
	NoAgent bool
	// ReconnectDelay is how long QEMU holds guest I/O while an NBD export
	// is unreachable (a site restart) before failing it; default 30 s.
	ReconnectDelay time.Duration
	// NBDTLS is how QEMU reaches nbds:// disks (NBD over TLS); required
	// when a disk is nbds://.
	NBDTLS *NBDTLS
}

// NBDTLS are QEMU's credentials for NBD over TLS: an x509 directory for
// tls-creds-x509 (ca-cert.pem, client-cert.pem, client-key.pem, see
// nbd.WriteClientDir) and the name the server's certificate must carry
// (tls-hostname; a site's certificate names the site). Empty Hostname
// checks the URI's host.
type NBDTLS struct {
	Dir, Hostname string
}

// nbdTLSObject is the id of the tls-creds-x509 object nbds:// disks use.
const nbdTLSObject = "nbdtls0"

// NIC modes.
const (
	NICUser   = "user"   // QEMU user-mode networking (slirp)
	NICTap    = "tap"    // an existing tap device
	NICBridge = "bridge" // a tap on a host bridge, through qemu-bridge-helper
)

// NICConfig is a VM's network card, as the site's network mapping gives it.
type NICConfig struct {
	Mode   string // NICUser, NICTap or NICBridge
	Ifname string // tap device name (NICTap)
	Bridge string // bridge name (NICBridge)
	MAC    string // optional; keep it across failover so the guest sees the same card
	// Isolated puts the card on a user-mode network with no route out
	// (restrict=on), whatever Mode says: test failovers use it.
	Isolated bool
}

// Driver starts QEMU virtual machines.
type Driver struct {
	// QEMU is the emulator binary; default qemu-system-x86_64.
	QEMU   string
	Logger *slog.Logger

	accelOnce sync.Once
	mu        sync.Mutex
	accel     string // set by the probe, or by a fallback to tcg
}

func (d *Driver) binary() string {
	if d.QEMU != "" {
		return d.QEMU
	}
	return "qemu-system-x86_64"
}

func (d *Driver) logger() *slog.Logger {
	if d.Logger != nil {
		return d.Logger
	}
	return slog.Default()
}

// Accel returns the accelerator new VMs start with: "kvm" if a probe VM
// really runs guest code under KVM the way VMs start (-cpu host), and "tcg"
// otherwise, or once a VM died at start under KVM (see Start). /dev/kvm
// can exist and still fail to run a guest (nested virtualisation without
// the needed features, an MSR the host refuses), so the probe boots
// SeaBIOS and waits for its debug output. The answer is cached.
func (d *Driver) Accel() string {
	d.accelOnce.Do(func() {
		accel := "tcg"
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := d.probe(ctx, "kvm"); err != nil {
			d.logger().Info("qemu: kvm unusable, using tcg", "err", err)
		} else {
			accel = "kvm"
		}
		d.mu.Lock()
		if d.accel == "" {
			d.accel = accel
		}
		d.mu.Unlock()
	})
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.accel
}

// accelArgs are the options that pick the accelerator, the same for the
// probe and for VMs so the probe fails where VMs would.
func accelArgs(accel string) []string {
	a := []string{"-accel", accel}
	if accel == "kvm" {
		a = append(a, "-cpu", "host")
	}
	return a
}

// probeMarks are SeaBIOS debug lines printed only after it ran real code.
var probeMarks = [][]byte{[]byte("Relocating init"), []byte("Booting from"), []byte("No bootable device")}

// probe boots a diskless VM with accel and returns nil once SeaBIOS shows
// it executes; the VM is killed either way.
func (d *Driver) probe(ctx context.Context, accel string) error {
	args := append([]string{"-machine", "q35"}, accelArgs(accel)...)
	args = append(args, "-nodefaults", "-no-user-config", "-display", "none", "-m", "64",
		"-chardev", "stdio,id=dbg", "-device", "isa-debugcon,iobase=0x402,chardev=dbg")
	cmd := exec.CommandContext(ctx, d.binary(), args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	var seen []byte
	buf := make([]byte, 4096)
	for {
		n, err := out.Read(buf)
		seen = append(seen, buf[:n]...)
		for _, m := range probeMarks {
			if bytes.Contains(seen, m) {
				cmd.Process.Kill()
				cmd.Wait()
				return nil
			}
		}
		if err != nil {
			cmd.Process.Kill()
			cmd.Wait() // stderr is complete only after Wait
			if ctx.Err() != nil {
				return fmt.Errorf("probe %s: no guest progress in time", accel)
			}
			return fmt.Errorf("probe %s: %s", accel, strings.TrimSpace(stderr.String()))
		}
	}
}

// Start starts a VM and returns once QEMU answers on its QMP socket. The
// guest is booting then; read Console for its progress. A VM already
// running in cfg.Dir is a conflict.
//
// A VM that dies at start under KVM though the probe passed is started
// again under TCG; if it runs there, the driver keeps TCG for every later
// VM (KVM cannot run this host's guests) and says so in its log.
func (d *Driver) Start(ctx context.Context, cfg VMConfig) (*VM, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, err
	}
	if v, err := Attach(cfg); err == nil {
		v.Close()
		return nil, rebound.Errorf(rebound.ECONFLICT, "vm %s is already running (pid %d)", cfg.Name, v.pid)
	}
	accel := d.Accel()
	v, exited, err := d.start(ctx, cfg, accel)
	if err == nil || !exited || accel != "kvm" {
		return v, err
	}
	d.logger().Warn("qemu: vm died at start under kvm; trying tcg", "vm", cfg.Name, "err", err)
	v, _, terr := d.start(ctx, cfg, "tcg")
	if terr != nil {
		// Not KVM's fault: it fails under TCG too.
		return nil, err
	}
	d.mu.Lock()
	d.accel = "tcg"
	d.mu.Unlock()
	d.logger().Warn("qemu: kvm cannot run guests here; using tcg from now on", "vm", cfg.Name)
	return v, nil
}

// start runs QEMU once with accel. exited says QEMU exited before it
// answered on QMP.
func (d *Driver) start(ctx context.Context, cfg VMConfig, accel string) (v *VM, exited bool, err error) {
	args, err := d.args(cfg, accel)
	if err != nil {
		return nil, false, err
	}
	for _, f := range []string{QMPSocket, AgentSocket, PIDFile} {
		os.Remove(filepath.Join(cfg.Dir, f))
	}
	// Keep the previous boot's console; the new one starts empty so
	// readers do not see an old boot's lines.
	os.Rename(filepath.Join(cfg.Dir, ConsoleLog), filepath.Join(cfg.Dir, ConsoleLog+".1"))
	logf, err := os.OpenFile(filepath.Join(cfg.Dir, QEMULog), os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, false, err
	}
	defer logf.Close()

	cmd := exec.Command(d.binary(), args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Own session: QEMU is not killed with the site's process group and
	// has no terminal to lose.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	d.logger().Info("qemu: start", "vm", cfg.Name, "accel", accel, "args", strings.Join(args, " "))
	if err := cmd.Start(); err != nil {
		return nil, false, fmt.Errorf("start %s: %w", d.binary(), err)
	}
	v = newVM(cfg, cmd.Process.Pid)
	v.accel = accel
	v.logger = d.logger().With("vm", cfg.Name)
	go func() {
		err := cmd.Wait()
		code := -1
		if cmd.ProcessState != nil {
			code = cmd.ProcessState.ExitCode()
		}
		v.exit(code, err)
	}()
	if err := v.waitQMP(ctx); err != nil {
		exited = !v.Running()
		v.Kill()
		return nil, exited, fmt.Errorf("start vm %s: %w: %s", cfg.Name, err, v.qemuLog())
	}
	return v, false, nil
}

func (cfg *VMConfig) validate() error {
	switch {
	case cfg.Name == "":
		return rebound.Errorf(rebound.EINVALID, "vm: name required")
	case cfg.Dir == "":
		return rebound.Errorf(rebound.EINVALID, "vm %s: runtime directory required", cfg.Name)
	case len(cfg.Disks) == 0 && cfg.Kernel == "":
		return rebound.Errorf(rebound.EINVALID, "vm %s: nothing to boot: no disk and no kernel", cfg.Name)
	case cfg.Kernel == "" && (cfg.Initrd != "" || cfg.Append != ""):
		return rebound.Errorf(rebound.EINVALID, "vm %s: initrd and append need a kernel", cfg.Name)
	case cfg.CPUs < 0 || cfg.MemoryMiB < 0:
		return rebound.Errorf(rebound.EINVALID, "vm %s: bad cpus or memory", cfg.Name)
	}
	// Unix socket paths are limited to 107 bytes.
	if p := filepath.Join(cfg.Dir, AgentSocket); len(p) > 100 {
		return rebound.Errorf(rebound.EINVALID, "vm %s: runtime directory path too long for sockets: %s", cfg.Name, cfg.Dir)
	}
	return nil
}

// args builds QEMU's command line.
func (d *Driver) args(cfg VMConfig, accel string) ([]string, error) {
	cpus, mem := cfg.CPUs, cfg.MemoryMiB
	if cpus == 0 {
		cpus = 1
	}
	if mem == 0 {
		mem = 512
	}
	a := []string{"-name", cfg.Name, "-machine", "q35"}
	a = append(a, accelArgs(accel)...)
	a = append(a,
		"-smp", strconv.Itoa(cpus), "-m", strconv.Itoa(mem),
		"-nodefaults", "-no-user-config", "-display", "none",
		"-pidfile", filepath.Join(cfg.Dir, PIDFile),
		"-qmp", "unix:"+opt(filepath.Join(cfg.Dir, QMPSocket))+",server=on,wait=off",
		"-chardev", "file,id=con0,path="+opt(filepath.Join(cfg.Dir, ConsoleLog)),
		"-serial", "chardev:con0",
	)
	if cfg.Kernel != "" {
		a = append(a, "-kernel", cfg.Kernel)
		if cfg.Initrd != "" {
			a = append(a, "-initrd", cfg.Initrd)
		}
		if cfg.Append != "" {
			a = append(a, "-append", cfg.Append)
		}
	}
	delay := cfg.ReconnectDelay
	if delay == 0 {
		delay = 30 * time.Second
	}
	tlsAdded := false
	for i, disk := range cfg.Disks {
		node := fmt.Sprintf("disk%d", i)
		if strings.HasPrefix(disk, "nbds") && !tlsAdded {
			if cfg.NBDTLS == nil || cfg.NBDTLS.Dir == "" {
				return nil, rebound.Errorf(rebound.EINVALID, "vm %s: disk %d is %s (NBD over TLS) but the VM has no TLS credentials", cfg.Name, i, disk)
			}
			a = append(a, "-object", "tls-creds-x509,id="+nbdTLSObject+",dir="+opt(cfg.NBDTLS.Dir)+",endpoint=client")
			tlsAdded = true
		}
		bd, err := blockdev(node, disk, delay, cfg.NBDTLS)
		if err != nil {
			return nil, rebound.Errorf(rebound.EINVALID, "vm %s: disk %d: %v", cfg.Name, i, err)
		}
		dev := "virtio-blk-pci,drive=" + node + ",id=" + node + "-dev,write-cache=on"
		if i == 0 && cfg.Kernel == "" {
			dev += ",bootindex=0"
		}
		a = append(a, "-blockdev", bd, "-device", dev)
	}
	if !cfg.NoAgent {
		a = append(a,
			"-chardev", "socket,id=qga0,path="+opt(filepath.Join(cfg.Dir, AgentSocket))+",server=on,wait=off",
			"-device", "virtio-serial-pci,id=vser0",
			"-device", "virtserialport,chardev=qga0,name="+AgentChannel)
	}
	if n := cfg.NIC; n != nil {
		nd, err := netdev(*n)
		if err != nil {
			return nil, rebound.Errorf(rebound.EINVALID, "vm %s: nic: %v", cfg.Name, err)
		}
		dev := "virtio-net-pci,netdev=net0"
		if n.MAC != "" {
			dev += ",mac=" + opt(n.MAC)
		}
		a = append(a, "-netdev", nd, "-device", dev)
	}
	return a, nil
}

// opt escapes a value inside a QEMU option string (commas are doubled).
func opt(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// blockdev returns the -blockdev option for a disk: an NBD client that
// reconnects for delay while the export is unreachable, or a raw file.
// JSON syntax avoids escaping paths and export names.
func blockdev(node, disk string, delay time.Duration, tls *NBDTLS) (string, error) {
	var spec map[string]any
	if strings.HasPrefix(disk, "nbd") {
		u, err := url.Parse(disk)
		if err != nil {
			return "", err
		}
		export := strings.TrimPrefix(u.Path, "/")
		spec = map[string]any{"driver": "nbd", "node-name": node, "export": export,
			"reconnect-delay": int(delay / time.Second)}
		switch u.Scheme {
		case "nbd", "nbds":
			if u.Scheme == "nbds" {
				spec["tls-creds"] = nbdTLSObject
				if tls.Hostname != "" {
					spec["tls-hostname"] = tls.Hostname
				}
			}
			port := u.Port()
			if port == "" {
				port = "10809"
			}
			if u.Hostname() == "" {
				return "", fmt.Errorf("%s: no host", disk)
			}
			spec["server"] = map[string]any{"type": "inet", "host": u.Hostname(), "port": port}
		case "nbd+unix":
			sock := u.Query().Get("socket")
			if sock == "" {
				return "", fmt.Errorf("%s: no socket", disk)
			}
			spec["server"] = map[string]any{"type": "unix", "path": sock}
		default:
			return "", fmt.Errorf("%s: unsupported scheme %q", disk, u.Scheme)
		}
	} else {
		if _, err := os.Stat(disk); err != nil {
			return "", err
		}
		spec = map[string]any{"driver": "raw", "node-name": node,
			"file": map[string]any{"driver": "file", "filename": disk}}
	}
	return jsonString(spec)
}

func netdev(n NICConfig) (string, error) {
	if n.Isolated {
		return "user,id=net0,restrict=on", nil
	}
	switch n.Mode {
	case NICUser, "":
		return "user,id=net0", nil
	case NICTap:
		if n.Ifname == "" {
			return "", errors.New("tap needs a device name")
		}
		return "tap,id=net0,ifname=" + opt(n.Ifname) + ",script=no,downscript=no", nil
	case NICBridge:
		if n.Bridge == "" {
			return "", errors.New("bridge needs a bridge name")
		}
		return "bridge,id=net0,br=" + opt(n.Bridge), nil
	}
	return "", fmt.Errorf("unknown mode %q", n.Mode)
}

func jsonString(v any) (string, error) {
	b, err := json.Marshal(v)
	return string(b), err
}
