package site

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/nbd"
	"github.com/rebound-dr/rebound/qemu"
)

// vmDir is where a machine's VM (or its test failover's VM) keeps its
// sockets and console log.
func (s *Site) vmDir(name string, test bool) string {
	if test {
		return filepath.Join(s.machineDir(name), "vm-test")
	}
	return filepath.Join(s.machineDir(name), "vm")
}

// vmConfigLocked describes the VM of a machine on this site's exports.
func (s *Site) vmConfigLocked(m *machine, test bool) qemu.VMConfig {
	spec := m.state.VM
	cfg := qemu.VMConfig{
		Name: m.state.Name, CPUs: spec.CPUs, MemoryMiB: spec.MemoryMiB,
		Kernel: spec.Kernel, Initrd: spec.Initrd, Append: spec.Append,
		Dir: s.vmDir(m.state.Name, test),
	}
	if test {
		cfg.Name += "-test"
	}
	for i := range m.state.Disks {
		export := exportName(m.state.Name, i, test)
		if s.cfg.NBDSocket != "" {
			cfg.Disks = append(cfg.Disks, nbd.URI("unix", s.cfg.NBDSocket, export))
		} else {
			cfg.Disks = append(cfg.Disks, s.nbdURI(export))
			cfg.NBDTLS = s.cfg.NBDTLS // nbds:// then
		}
	}
	if spec.Network != "" {
		nic := s.cfg.Networks[spec.Network]
		if nic.Mode == "" {
			nic.Mode = qemu.NICUser
		}
		nic.Isolated = test
		cfg.NIC = &nic
	}
	return cfg
}

// servedLocked reports whether the machine's exports (or its test
// failover's) are served here, so a VM can run on them.
func servedLocked(m *machine, test bool) bool {
	u := m.unit
	if test {
		return u.test != nil
	}
	switch u.state.Role {
	case RoleActive, RoleSource:
		return !u.state.Fenced
	case RoleTarget:
		return u.act != nil
	}
	return false
}

// Power sets the VM of a qemu machine at this site.
func (s *Site) Power(ctx context.Context, name, state string, test bool) error {
	switch state {
	case rebound.PowerOn, rebound.PowerOff, rebound.PowerKill:
	default:
		return rebound.Errorf(rebound.EINVALID, "unknown power state %q: use on, off or kill", state)
	}
	s.mu.Lock()
	m, err := s.getLocked(name)
	if err != nil || m.state.VM == nil {
		s.mu.Unlock()
		return err // a machine without a VM has nothing to power
	}
	cur := m.vm
	if test {
		cur = m.testVM
	}
	if state == rebound.PowerOn {
		if cur != nil && cur.Running() {
			s.mu.Unlock()
			return nil
		}
		if s.cfg.QEMU == nil {
			s.mu.Unlock()
			return rebound.Errorf(rebound.EUNAVAILABLE, "site %s runs no virtual machines (no QEMU driver configured)", s.cfg.Name)
		}
		if !servedLocked(m, test) {
			s.mu.Unlock()
			return rebound.Errorf(rebound.ECONFLICT, "machine %q is %s at site %s: its disks are not served here, so its VM cannot run here", name, m.unit.state.Role, s.cfg.Name)
		}
		cfg := s.vmConfigLocked(m, test)
		s.mu.Unlock()
		vm, err := s.cfg.QEMU.Start(ctx, cfg)
		if err != nil {
			return err
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if test {
			m.testVM, m.state.TestPower = vm, rebound.PowerOn
		} else {
			m.vm, m.state.Power = vm, rebound.PowerOn
		}
		s.logger.Info("vm started", "machine", name, "test", test, "pid", vm.PID(), "accel", vm.Accel())
		return s.saveLocked(m.unit)
	}
	if test {
		m.state.TestPower = rebound.PowerOff
	} else {
		m.state.Power = rebound.PowerOff
	}
	err = s.saveLocked(m.unit)
	s.mu.Unlock()
	if err != nil || cur == nil {
		return err
	}
	return stopVM(ctx, cur, state)
}

// Shutdown stops a machine's VM for a planned failover or failback.
func (s *Site) Shutdown(ctx context.Context, name string, opts rebound.ShutdownOptions) error {
	switch opts.Mode {
	case "":
		opts.Mode = rebound.ShutdownGraceful
	case rebound.ShutdownGraceful, rebound.ShutdownForce:
	default:
		return rebound.Errorf(rebound.EINVALID, "unknown shutdown mode %q: use graceful or force", opts.Mode)
	}
	timeout := time.Duration(opts.Timeout)
	if timeout <= 0 {
		timeout = rebound.DefaultShutdownTimeout
	}
	s.mu.Lock()
	m, err := s.getLocked(name)
	if err != nil || m.state.VM == nil {
		s.mu.Unlock()
		return err
	}
	vm := m.vm
	// Off first: a site restart while the guest shuts down does not
	// start it again.
	m.state.Power = rebound.PowerOff
	err = s.saveLocked(m.unit)
	s.mu.Unlock()
	if err != nil || vm == nil || !vm.Running() {
		return err
	}
	sctx, cancel := context.WithTimeout(ctx, timeout)
	how, err := vm.PowerDown(sctx)
	cancel()
	if err == nil {
		return vm.Close()
	}
	if opts.Mode == rebound.ShutdownForce && ctx.Err() == nil {
		s.logger.Warn("vm did not shut down in time; powering it off", "machine", name, "timeout", timeout, "tried", how)
		defer vm.Close()
		return vm.Kill()
	}
	// Graceful: the guest keeps running here and the machine stays.
	s.mu.Lock()
	if m.vm == vm {
		m.state.Power = rebound.PowerOn
		if serr := s.saveLocked(m.unit); serr != nil {
			s.logger.Warn("save state", "err", serr)
		}
	}
	s.mu.Unlock()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return rebound.Errorf(rebound.EUNAVAILABLE, "the guest of %s did not shut down within %s (tried %s) and still runs at site %s: rerun with --shutdown force to power it off after the timeout, or shut the guest down from inside", name, timeout, how, s.cfg.Name)
}

// stopVM shuts a VM down cleanly (PowerOff, within a minute) or kills it.
func stopVM(ctx context.Context, vm *qemu.VM, state string) error {
	defer vm.Close()
	if state == rebound.PowerKill {
		return vm.Kill()
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	return vm.Shutdown(ctx)
}

// killVMsLocked stops the VMs of a machine at once (its disks are going
// away: deactivation, release, deletion).
func (s *Site) killVMLocked(m *machine, test bool) {
	vm := m.vm
	if test {
		vm, m.testVM, m.state.TestPower = m.testVM, nil, ""
	} else {
		m.vm, m.state.Power = nil, ""
	}
	if vm != nil {
		if err := vm.Kill(); err != nil {
			s.logger.Warn("kill vm", "machine", m.state.Name, "test", test, "err", err)
		}
		vm.Close()
	}
}

// StartVMs attaches to the VMs that survived a restart of the site and
// starts those that should run. Call it once the NBD listeners serve.
func (s *Site) StartVMs(ctx context.Context) {
	s.mu.Lock()
	type want struct {
		name string
		test bool
	}
	var todo []want
	for _, m := range s.machines {
		if m.state.VM == nil {
			continue
		}
		for _, test := range []bool{false, true} {
			power := m.state.Power
			if test {
				power = m.state.TestPower
			}
			if power != rebound.PowerOn {
				continue
			}
			if vm, err := qemu.Attach(s.vmConfigLocked(m, test)); err == nil {
				if test {
					m.testVM = vm
				} else {
					m.vm = vm
				}
				continue
			}
			todo = append(todo, want{m.state.Name, test})
		}
	}
	s.mu.Unlock()
	for _, w := range todo {
		s.mu.Lock()
		if m, ok := s.machines[w.name]; ok {
			if w.test {
				m.state.TestPower = ""
			} else {
				m.state.Power = ""
			}
		}
		s.mu.Unlock()
		if err := s.Power(ctx, w.name, rebound.PowerOn, w.test); err != nil {
			s.logger.Warn("restart vm after site restart", "machine", w.name, "test", w.test, "err", err)
		}
	}
}

// vmStatusLocked reports a VM.
func (s *Site) vmStatusLocked(m *machine, test bool) *rebound.VMStatus {
	if m.state.VM == nil {
		return nil
	}
	vm := m.vm
	if test {
		vm = m.testVM
	}
	st := &rebound.VMStatus{}
	if vm != nil && vm.Running() {
		st.Running, st.PID, st.Accel = true, vm.PID(), vm.Accel()
		if cfg := vm.Config(); cfg.NIC != nil {
			st.Network = cfg.NIC.Mode
			if cfg.NIC.Isolated {
				st.Network = "isolated"
			}
		}
	}
	return st
}

// Console returns the end of the VM's serial console log, kept at the site
// after the VM stops.
func (s *Site) Console(ctx context.Context, name string, tail int, test bool) ([]byte, error) {
	s.mu.Lock()
	m, err := s.getLocked(name)
	var dir string
	if err == nil {
		if m.state.VM == nil {
			err = rebound.Errorf(rebound.ENOTFOUND, "machine %q has no VM at site %s", name, s.cfg.Name)
		}
		dir = s.vmDir(name, test)
	}
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	f, err := os.Open(filepath.Join(dir, qemu.ConsoleLog))
	if errors.Is(err, os.ErrNotExist) {
		return []byte{}, nil
	} else if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	off := max(0, fi.Size()-int64(tail))
	b := make([]byte, fi.Size()-off)
	n, err := f.ReadAt(b, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return b[:n], nil
}

// importDisks converts the images a machine is created from into its disk
// files and returns the disks with their sizes (an imported disk of size 0
// takes the image's virtual size).
func (s *Site) importDisks(ctx context.Context, req rebound.SiteMachine) ([]rebound.Disk, error) {
	disks := append([]rebound.Disk(nil), req.Disks...)
	for i, img := range req.Import {
		if img == "" {
			continue
		}
		if i >= len(disks) {
			return nil, rebound.Errorf(rebound.EINVALID, "image %q has no disk to go to", img)
		}
		out, err := exec.CommandContext(ctx, "qemu-img", "info", "--output=json", img).Output()
		if err != nil {
			return nil, rebound.Errorf(rebound.EINVALID, "cannot read image %q at site %s: %v", img, s.cfg.Name, exitText(err))
		}
		var info struct {
			Format      string `json:"format"`
			VirtualSize int64  `json:"virtual-size"`
		}
		if err := json.Unmarshal(out, &info); err != nil {
			return nil, fmt.Errorf("qemu-img info %s: %w", img, err)
		}
		if info.Format != "raw" && info.Format != "qcow2" {
			return nil, rebound.Errorf(rebound.EINVALID, "image %q is %s; import takes raw or qcow2", img, info.Format)
		}
		size := max(disks[i].Size, (info.VirtualSize+511)/512*512)
		dst := s.diskPath(req.Name, i)
		// -S 4k keeps zero runs as holes; -n would need a pre-created file.
		cmd := exec.CommandContext(ctx, "qemu-img", "convert", "-f", info.Format, "-O", "raw", "-S", "4k", img, dst)
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, rebound.Errorf(rebound.EINTERNAL, "import %q into disk %d: %v: %s", img, i, err, strings.TrimSpace(string(out)))
		}
		if err := os.Truncate(dst, size); err != nil {
			return nil, err
		}
		disks[i].Size = size
		s.logger.Info("disk imported", "machine", req.Name, "disk", i, "image", img, "format", info.Format, "size", size)
	}
	return disks, nil
}

// exitText returns an exec error with the command's stderr.
func exitText(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) && len(ee.Stderr) > 0 {
		return strings.TrimSpace(string(ee.Stderr))
	}
	return err.Error()
}

// KillVMs stops every VM of this site at once. A site's VMs outlive its
// process on purpose (a restarted site re-attaches); an embedded site that
// goes away for good (tests, `rebound up`) kills them instead.
func (s *Site) KillVMs() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range s.machines {
		for _, vm := range []*qemu.VM{m.vm, m.testVM} {
			if vm != nil {
				if err := vm.Kill(); err != nil {
					s.logger.Warn("kill vm", "machine", m.state.Name, "err", err)
				}
			}
		}
	}
}
