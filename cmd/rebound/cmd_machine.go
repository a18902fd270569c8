package main

import (
	"context"
	"fmt"
	"io"
	"math"
	"path/filepath"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/spf13/cobra"
)

// Deleted is the JSON output of `rebound machine delete`.
type Deleted struct {
	Name    string `json:"name"`
	Deleted bool   `json:"deleted"`
}

func (c *CLI) machineCommand() *cobra.Command {
	cmd := groupCommand("machine", "Machines: create, list, show, set, delete, start, stop, console")
	cmd.AddCommand(c.machineCreateCommand())
	cmd.AddCommand(c.machineStartCommand(), c.machineStopCommand(), c.machineConsoleCommand())
	cmd.AddCommand(c.machineSetCommand())
	cmd.AddCommand(&cobra.Command{
		Use:   "list",
		Short: "List machines: state, direction, health, lag against the RPO, last point, home",
		Args:  argNames(),
		RunE: func(cmd *cobra.Command, args []string) error {
			svc, err := c.Service()
			if err != nil {
				return err
			}
			ms, err := svc.ListMachines(cmd.Context())
			if err != nil {
				return err
			}
			if ms == nil {
				ms = []rebound.Machine{}
			}
			rpo := c.rpoThresholds(cmd.Context(), svc, ms)
			now := time.Now()
			// A GROUP column only when some machine is in a replication group.
			grouped := false
			for _, m := range ms {
				grouped = grouped || m.Group != ""
			}
			return c.print(ms, func(w io.Writer) {
				head := []any{"NAME", "STATE", "DIRECTION", "HEALTH", "LAG/RPO", "LAST-POINT", "HOME", "DISKS"}
				if grouped {
					head = append(head[:1:1], append([]any{"GROUP"}, head[1:]...)...)
				}
				row(w, head...)
				for i := range ms {
					m := &ms[i]
					var th time.Duration
					if m.Protection != nil {
						th = rpo[m.Protection.Policy]
					}
					cells := []any{m.Name, m.State, fmtDirection(m), orDash(m.Health), fmtLagRPO(m, th), fmtPointAge(m, now), fmtHome(m), fmtDisks(m.Disks)}
					if grouped {
						cells = append(cells[:1:1], append([]any{orDash(m.Group)}, cells[1:]...)...)
					}
					row(w, cells...)
				}
			})
		},
	})
	cmd.AddCommand(&cobra.Command{
		Use:   "show NAME",
		Short: "Show a machine: state, health, protection, VM, disks and their NBD URIs",
		Args:  argNames("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			svc, err := c.Service()
			if err != nil {
				return err
			}
			m, err := svc.GetMachine(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return c.print(m, func(w io.Writer) { writeMachine(w, m) })
		},
	})
	cmd.AddCommand(&cobra.Command{
		Use:   "delete NAME",
		Short: "Delete a machine and everything every site holds for it",
		Args:  argNames("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			svc, err := c.Service()
			if err != nil {
				return err
			}
			if err := svc.DeleteMachine(cmd.Context(), args[0]); err != nil {
				return err
			}
			return c.print(Deleted{Name: args[0], Deleted: true}, func(w io.Writer) {
				fmt.Fprintf(w, "deleted machine %s\n", args[0])
			})
		},
	})
	return cmd
}

// Machine create defaults for the qemu driver.
const (
	DefaultCPUs   = 1
	DefaultMemory = 256 << 20
)

// Flags of `machine create` that only the qemu driver takes.
var qemuFlags = []string{"cpus", "memory", "kernel", "initrd", "append", "network"}

func (c *CLI) machineCreateCommand() *cobra.Command {
	var (
		site, driver, memory  string
		kernel, initrd, appnd string
		network               string
		cpus                  int
		disks, imports        []string
	)
	cmd := &cobra.Command{
		Use:   "create NAME --site S [--driver none|qemu] [--cpus N] [--memory SIZE] [--disk SIZE]... [--import FILE]... [--kernel FILE --initrd FILE --append ARGS] [--network NAME]",
		Short: "Create a machine: disks served over NBD at a site, and with --driver qemu a VM on them",
		Long: `Create a machine at a site. Its disks are served over NBD there and every
write to them is captured. --disk SIZE adds an empty disk; --import FILE adds
a disk converted from a raw or qcow2 image (sized like the image). Imported
disks come first, in the order given, then the empty ones: with
"--disk 1G --import a.qcow2" disk0 is a.qcow2's and disk1 the empty 1GiB.

With --driver qemu the machine is also a QEMU virtual machine that runs at
its active site on those disks (start it with 'rebound machine start'). It
boots disk0 through the BIOS, or with --kernel (and optionally --initrd and
--append) the given kernel directly. --network NAME gives it a NIC on the
logical network NAME, which each site maps to one of its own; without it the
VM has no NIC.

--import, --kernel and --initrd are paths at the site, not on this computer:
the site reads them from its own file system. Relative paths are made
absolute against this command's working directory, which is right when the
site runs on this computer (as with 'rebound up').`,
		Example: `  rebound machine create web1 --site a --disk 4GiB --disk 512M
  rebound machine create db --site a --disk 10G --driver none
  rebound machine create vm1 --site a --driver qemu --cpus 2 --memory 1G --import debian.qcow2 --network lan
  rebound machine create guest --site a --driver qemu --disk 256M \
      --kernel .guest/vmlinux --initrd .guest/initramfs.cpio.gz --append "console=ttyS0"`,
		Args: argNames("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			fl := cmd.Flags()
			if site == "" {
				return usagef("machine create: --site is required")
			}
			if len(disks)+len(imports) == 0 {
				return usagef("machine create: at least one --disk SIZE or --import FILE is required")
			}
			if driver != rebound.DriverNone && driver != rebound.DriverQEMU {
				return usagef("machine create: --driver must be none or qemu, not %q", driver)
			}
			req := rebound.CreateMachineRequest{Name: args[0], Site: site, Driver: driver}
			for _, f := range imports {
				abs, err := sitePath("--import", f)
				if err != nil {
					return err
				}
				req.Disks = append(req.Disks, 0) // the image's size
				req.Import = append(req.Import, abs)
			}
			for _, d := range disks {
				n, err := ParseSize(d)
				if err != nil {
					return err
				}
				req.Disks = append(req.Disks, n)
				if len(imports) > 0 {
					req.Import = append(req.Import, "")
				}
			}
			if driver != rebound.DriverQEMU {
				for _, f := range qemuFlags {
					if fl.Changed(f) {
						return usagef("machine create: --%s needs --driver qemu", f)
					}
				}
			} else {
				vm, err := vmSpec(fl.Changed, cpus, memory, kernel, initrd, appnd, network)
				if err != nil {
					return err
				}
				req.VM = vm
			}
			svc, err := c.Service()
			if err != nil {
				return err
			}
			m, err := svc.CreateMachine(cmd.Context(), req)
			if err != nil {
				return err
			}
			return c.print(m, func(w io.Writer) { writeMachine(w, m) })
		},
	}
	f := cmd.Flags()
	f.StringVar(&site, "site", "", "site the machine is created and active at (required)")
	f.StringArrayVar(&disks, "disk", nil, "empty disk of SIZE, e.g. 4GiB, 512M, 1073741824 (repeat for more disks; suffixes are powers of 1024)")
	f.StringArrayVar(&imports, "import", nil, "disk converted from a raw or qcow2 image FILE at the site (repeat for more; imported disks come first)")
	f.StringVar(&driver, "driver", rebound.DriverNone, "machine driver: none (NBD exports only) or qemu (a VM on them)")
	f.IntVar(&cpus, "cpus", DefaultCPUs, "qemu: virtual CPUs")
	f.StringVar(&memory, "memory", formatSize(DefaultMemory), "qemu: memory SIZE, a whole number of MiB")
	f.StringVar(&kernel, "kernel", "", "qemu: boot this kernel FILE at the site directly instead of disk0 through the BIOS")
	f.StringVar(&initrd, "initrd", "", "qemu: initrd FILE at the site (needs --kernel)")
	f.StringVar(&appnd, "append", "", "qemu: kernel command line (needs --kernel)")
	f.StringVar(&network, "network", "", "qemu: logical network of the VM's NIC (default: no NIC)")
	return cmd
}

// vmSpec checks the qemu flags and builds the VM settings.
func vmSpec(changed func(string) bool, cpus int, memory, kernel, initrd, appnd, network string) (*rebound.VMSpec, error) {
	if cpus < 1 {
		return nil, usagef("machine create: --cpus must be at least 1, not %d", cpus)
	}
	mem, err := ParseSize(memory)
	if err != nil {
		return nil, usagef("machine create: --memory: %s", rebound.ErrorMessage(err))
	}
	if mem%(1<<20) != 0 {
		return nil, usagef("machine create: --memory must be a whole number of MiB, not %s", memory)
	}
	if mem>>20 > math.MaxInt32 {
		return nil, usagef("machine create: --memory %s is too large", memory)
	}
	vm := &rebound.VMSpec{CPUs: cpus, MemoryMiB: int(mem >> 20), Append: appnd, Network: network}
	for _, f := range []struct{ name, v string }{{"kernel", kernel}, {"initrd", initrd}, {"network", network}} {
		if changed(f.name) && f.v == "" {
			return nil, usagef("machine create: --%s must not be empty", f.name)
		}
	}
	if kernel == "" {
		for _, f := range []string{"initrd", "append"} {
			if changed(f) {
				return nil, usagef("machine create: --%s needs --kernel", f)
			}
		}
		return vm, nil
	}
	if vm.Kernel, err = sitePath("--kernel", kernel); err != nil {
		return nil, err
	}
	if initrd != "" {
		if vm.Initrd, err = sitePath("--initrd", initrd); err != nil {
			return nil, err
		}
	}
	return vm, nil
}

// sitePath makes a path the site will read absolute; the site resolves
// nothing against the CLI's directory.
func sitePath(flag, p string) (string, error) {
	if p == "" {
		return "", usagef("machine create: %s must not be empty", flag)
	}
	abs, err := filepath.Abs(p)
	if err != nil {
		return "", usagef("machine create: %s %s: %v", flag, p, err)
	}
	return abs, nil
}

// rpoThresholds maps policy names to RPO thresholds for the machine list;
// without the policies (an old server, an error) the list shows lag alone.
func (c *CLI) rpoThresholds(ctx context.Context, svc rebound.Service, ms []rebound.Machine) map[string]time.Duration {
	out := map[string]time.Duration{}
	protected := false
	for _, m := range ms {
		protected = protected || m.Protection != nil
	}
	if !protected {
		return out
	}
	ps, err := svc.ListPolicies(ctx)
	if err != nil {
		return out
	}
	for _, p := range ps {
		out[p.Name] = time.Duration(p.RPOThreshold)
	}
	return out
}
