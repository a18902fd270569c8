package server

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	"github.com/rebound-dr/rebound"
)

var _ rebound.PowerService = (*Server)(nil)

// newMachine validates a create request and returns the machine to store.
func newMachine(req rebound.CreateMachineRequest) (*rebound.Machine, error) {
	if err := validName(req.Name); err != nil {
		return nil, err
	}
	if req.Driver == "" {
		req.Driver = rebound.DriverNone
	}
	switch req.Driver {
	case rebound.DriverNone:
		if req.VM != nil {
			return nil, rebound.Errorf(rebound.EINVALID, "VM settings need --driver qemu")
		}
	case rebound.DriverQEMU:
		vm := rebound.VMSpec{CPUs: 1, MemoryMiB: 256}
		if req.VM != nil {
			vm = *req.VM
		}
		if vm.CPUs == 0 {
			vm.CPUs = 1
		}
		if vm.MemoryMiB == 0 {
			vm.MemoryMiB = 256
		}
		switch {
		case vm.CPUs < 1 || vm.CPUs > 64:
			return nil, rebound.Errorf(rebound.EINVALID, "cpus must be 1 to 64")
		case vm.MemoryMiB < 64 || vm.MemoryMiB > 1<<20:
			return nil, rebound.Errorf(rebound.EINVALID, "memory must be 64 MiB to 1 TiB")
		case vm.Kernel == "" && (vm.Initrd != "" || vm.Append != ""):
			return nil, rebound.Errorf(rebound.EINVALID, "--initrd and --append need --kernel")
		case vm.Kernel != "" && !filepath.IsAbs(vm.Kernel), vm.Initrd != "" && !filepath.IsAbs(vm.Initrd):
			return nil, rebound.Errorf(rebound.EINVALID, "kernel and initrd must be absolute paths at the site")
		}
		req.VM = &vm
	default:
		return nil, rebound.Errorf(rebound.EINVALID, "unknown driver %q: use none or qemu", req.Driver)
	}
	if len(req.Disks) == 0 || len(req.Disks) > 16 {
		return nil, rebound.Errorf(rebound.EINVALID, "a machine needs 1 to 16 disks")
	}
	if len(req.Import) > len(req.Disks) {
		return nil, rebound.Errorf(rebound.EINVALID, "%d images to import for %d disks", len(req.Import), len(req.Disks))
	}
	m := &rebound.Machine{
		Name: req.Name, Driver: req.Driver, VM: req.VM, State: rebound.MachineUnprotected,
		ActiveSite: req.Site, HomeSite: req.Site, Health: rebound.HealthNormal,
		CreatedAt: time.Now().UTC(),
	}
	for i, size := range req.Disks {
		imported := i < len(req.Import) && req.Import[i] != ""
		if imported && !filepath.IsAbs(req.Import[i]) {
			return nil, rebound.Errorf(rebound.EINVALID, "disk %d: image %q must be an absolute path at the site", i, req.Import[i])
		}
		if !(imported && size == 0) && (size <= 0 || size%512 != 0 || size > 1<<44) {
			return nil, rebound.Errorf(rebound.EINVALID, "disk %d: size %d must be a positive multiple of 512 bytes up to 16 TiB", i, size)
		}
		m.Disks = append(m.Disks, rebound.Disk{Name: fmt.Sprintf("disk%d", i), Size: size})
	}
	return m, nil
}

// vmMachine returns a machine that has a VM and the site it is active at.
func (s *Server) vmMachine(ctx context.Context, name string) (*rebound.Machine, rebound.SiteService, error) {
	m, err := s.DB.GetMachine(ctx, name)
	if err != nil {
		return nil, nil, err
	}
	if m.VM == nil {
		return nil, nil, rebound.Errorf(rebound.ECONFLICT, "machine %q has no VM (driver %s); only qemu machines start and stop", name, m.Driver)
	}
	site, err := s.site(m.ActiveSite)
	if err != nil {
		return nil, nil, err
	}
	return m, site, nil
}

// StartMachine starts a machine's VM at its active site.
func (s *Server) StartMachine(ctx context.Context, name string) (*rebound.Job, error) {
	return s.power(ctx, name, rebound.PowerOn, "start")
}

// StopMachine shuts a machine's VM down cleanly.
func (s *Server) StopMachine(ctx context.Context, name string) (*rebound.Job, error) {
	return s.power(ctx, name, rebound.PowerOff, "stop")
}

func (s *Server) power(ctx context.Context, name, state, typ string) (*rebound.Job, error) {
	m, site, err := s.vmMachine(ctx, name)
	if err != nil {
		return nil, err
	}
	if err := s.checkIdle(ctx, name); err != nil {
		return nil, err
	}
	if st := m.VMStatus; st != nil && st.Running == (state == rebound.PowerOn) {
		return s.doneJob(ctx, typ, name, fmt.Sprintf("machine %s is already %s at %s", name, map[bool]string{true: "running", false: "stopped"}[st.Running], m.ActiveSite))
	}
	return s.startJob(ctx, typ, name, []string{typ}, func(ctx context.Context, r *jobRun) error {
		r.Step(typ)
		if err := site.Power(ctx, name, state, false); err != nil {
			return err
		}
		s.event(name, m.ActiveSite, "machine."+typ, fmt.Sprintf("machine %s %sed at %s", name, typ, m.ActiveSite))
		return nil
	})
}

// Console returns the end of the VM's serial console at its active site.
func (s *Server) Console(ctx context.Context, name string, tail int) ([]byte, error) {
	m, site, err := s.vmMachine(ctx, name)
	if err != nil {
		return nil, err
	}
	if tail <= 0 {
		tail = 64 << 10
	}
	return site.Console(ctx, m.Name, tail, false)
}

// powerOn starts a qemu machine's VM at a site after its disks became
// active there (failover, change-point, cancel, test failover). The disks
// stay active if the VM does not start; the error says how to retry.
func (s *Server) powerOn(ctx context.Context, r *jobRun, m *rebound.Machine, site rebound.SiteService, at string, test bool) error {
	for _, vm := range s.vmMachines(ctx, m) {
		r.Message("starting the VM of %s at %s", vm.Name, at)
		if err := site.Power(ctx, vm.Name, rebound.PowerOn, test); err != nil {
			return fmt.Errorf("the disks are active at %s but the VM of %s did not start: %w (retry with rebound machine start %s)", at, vm.Name, err, vm.Name)
		}
		s.event(vm.Name, at, "machine.start", "VM started at "+at)
	}
	return nil
}
