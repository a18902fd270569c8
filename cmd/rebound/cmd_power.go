package main

import (
	"context"
	"fmt"

	"github.com/rebound-dr/rebound"
	rhttp "github.com/rebound-dr/rebound/http"
	"github.com/spf13/cobra"
)

// Console is the JSON output of `rebound machine console`. Bytes that are
// not UTF-8 become U+FFFD in it; the table (raw) output keeps them.
type Console struct {
	Machine string `json:"machine"`
	Console string `json:"console"`
}

// Power returns the Service's PowerService (machine start, stop, console).
func (c *CLI) Power() (rebound.PowerService, error) {
	svc, err := c.Service()
	if err != nil {
		return nil, err
	}
	p, ok := svc.(rebound.PowerService)
	if !ok {
		return nil, rebound.Errorf(rebound.EINTERNAL, "this client cannot start or stop machines or read their consoles")
	}
	return p, nil
}

func (c *CLI) machineStartCommand() *cobra.Command {
	var wait bool
	cmd := &cobra.Command{
		Use:   "start NAME [--wait]",
		Short: "Start a qemu machine's VM at its active site",
		Long: `Start the machine's virtual machine at the site where the machine is active,
on that site's NBD exports of its disks, so every guest write is captured.
The job ends when QEMU runs; follow the boot with 'rebound machine console'.`,
		Example: `  rebound machine start guest --wait
  rebound machine console guest`,
		Args: argNames("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.startPowerJob(cmd, wait, func(ctx context.Context, p rebound.PowerService) (*rebound.Job, error) {
				return p.StartMachine(ctx, args[0])
			})
		},
	}
	addWaitFlag(cmd, &wait)
	return cmd
}

func (c *CLI) machineStopCommand() *cobra.Command {
	var wait bool
	cmd := &cobra.Command{
		Use:   "stop NAME [--wait]",
		Short: "Shut a qemu machine's VM down",
		Long: `Shut the machine's virtual machine down cleanly: through the guest agent when
the guest runs one, else by ACPI.`,
		Example: `  rebound machine stop guest --wait`,
		Args:    argNames("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.startPowerJob(cmd, wait, func(ctx context.Context, p rebound.PowerService) (*rebound.Job, error) {
				return p.StopMachine(ctx, args[0])
			})
		},
	}
	addWaitFlag(cmd, &wait)
	return cmd
}

// startPowerJob is startJob for the PowerService verbs.
func (c *CLI) startPowerJob(cmd *cobra.Command, wait bool, start func(ctx context.Context, p rebound.PowerService) (*rebound.Job, error)) error {
	p, err := c.Power()
	if err != nil {
		return err
	}
	return c.startJob(cmd, wait, func(ctx context.Context, svc rebound.Service) (*rebound.Job, error) {
		return start(ctx, p)
	})
}

func (c *CLI) machineConsoleCommand() *cobra.Command {
	var tail string
	cmd := &cobra.Command{
		Use:   "console NAME [--tail SIZE]",
		Short: "Print the end of a machine's serial console log",
		Long: fmt.Sprintf(`Print the end of the machine's serial console log, which the site where the
VM runs keeps. The bytes are printed as the guest wrote them. --tail SIZE
prints at most SIZE bytes (default %s, at most %s). With -o json the
output is {"machine", "console"}, where bytes that are not UTF-8 become
U+FFFD.`, formatSize(rhttp.DefaultConsoleTail), formatSize(rhttp.MaxConsoleTail)),
		Example: `  rebound machine console guest
  rebound machine console guest --tail 1M | grep verdict`,
		Args: argNames("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			n, err := ParseSize(tail)
			if err != nil {
				return usagef("machine console: --tail: %s", rebound.ErrorMessage(err))
			}
			if n > rhttp.MaxConsoleTail {
				return usagef("machine console: --tail must be at most %s, not %s", formatSize(rhttp.MaxConsoleTail), tail)
			}
			p, err := c.Power()
			if err != nil {
				return err
			}
			b, err := p.Console(cmd.Context(), args[0], int(n))
			if err != nil {
				return err
			}
			if c.JSON() {
				return c.print(Console{Machine: args[0], Console: string(b)}, nil)
			}
			_, err = c.Stdout.Write(b)
			return err
		},
	}
	cmd.Flags().StringVar(&tail, "tail", formatSize(rhttp.DefaultConsoleTail), "print at most SIZE bytes of the end of the log, e.g. 4K, 1MiB")
	return cmd
}
