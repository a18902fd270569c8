package main

import (
	"fmt"
	"io"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/spf13/cobra"
)

func (c *CLI) machineSetCommand() *cobra.Command {
	var (
		freeze, thaw, shutdown string
		timeout                time.Duration
	)
	cmd := &cobra.Command{
		Use:   "set NAME [--freeze-hook CMD] [--thaw-hook CMD] [--shutdown graceful|force] [--shutdown-timeout D]",
		Short: "Change a machine's hooks and planned-shutdown defaults",
		Long: `Change a machine's settings; only the flags given change, and an empty value
clears a setting.

--freeze-hook and --thaw-hook are executables at the machine's source site,
run with the machine's name as their argument around every app-consistent
point (rebound point create NAME --app-consistent, and the policy's app
interval): freeze before the point is cut, thaw after it, always. They win
over the site's own --freeze-hook and --thaw-hook and over the guest agent.
The hooks must exist at every site the machine may replicate from.

--shutdown and --shutdown-timeout are the defaults of planned failovers and
failbacks (their own flags win): graceful (the default) waits the timeout
(default 1m) for the guest to shut down and fails, leaving it running, if it
does not; force powers the VM off after the timeout, then drains.`,
		Example: `  rebound machine set db1 --freeze-hook /etc/rebound/freeze --thaw-hook /etc/rebound/thaw
  rebound machine set vm1 --shutdown force --shutdown-timeout 30s
  rebound machine set db1 --freeze-hook "" --thaw-hook ""`,
		Args: argNames("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := rebound.SetMachineRequest{Name: args[0]}
			fl := cmd.Flags()
			if fl.Changed("freeze-hook") {
				req.FreezeHook = &freeze
			}
			if fl.Changed("thaw-hook") {
				req.ThawHook = &thaw
			}
			if fl.Changed("shutdown") {
				if shutdown != "" && shutdown != rebound.ShutdownGraceful && shutdown != rebound.ShutdownForce {
					return usagef("--shutdown must be graceful or force, not %q", shutdown)
				}
				req.Shutdown = &shutdown
			}
			if fl.Changed("shutdown-timeout") {
				if timeout < 0 || (timeout > 0 && timeout < time.Second) || timeout > 24*time.Hour {
					return usagef("--shutdown-timeout must be 1s to 24h (0 for the default), not %s", timeout)
				}
				d := rebound.Duration(timeout)
				req.ShutdownTimeout = &d
			}
			if req == (rebound.SetMachineRequest{Name: args[0]}) {
				return usagef("machine set: nothing to set: give --freeze-hook, --thaw-hook, --shutdown or --shutdown-timeout")
			}
			svc, err := c.Service()
			if err != nil {
				return err
			}
			m, err := svc.SetMachine(cmd.Context(), req)
			if err != nil {
				return err
			}
			return c.print(m, func(w io.Writer) { writeSettings(w, m) })
		},
	}
	cmd.Flags().StringVar(&freeze, "freeze-hook", "", "executable run at the source site before an app-consistent point (argument: machine name)")
	cmd.Flags().StringVar(&thaw, "thaw-hook", "", "executable run after an app-consistent point, always")
	cmd.Flags().StringVar(&shutdown, "shutdown", "", "default shutdown of planned failovers and failbacks: graceful or force")
	cmd.Flags().DurationVar(&timeout, "shutdown-timeout", 0, "default time a planned failover or failback waits for the guest to shut down (default 1m)")
	return cmd
}

// writeSettings prints a machine's settings.
func writeSettings(w io.Writer, m *rebound.Machine) {
	row(w, "Name:", m.Name)
	st := m.Settings
	row(w, "Freeze hook:", orDash(st.FreezeHook))
	row(w, "Thaw hook:", orDash(st.ThawHook))
	row(w, "Shutdown:", fmtShutdown(st))
}

// fmtShutdown describes the planned-shutdown defaults: "graceful, 1m0s".
func fmtShutdown(st rebound.MachineSettings) string {
	mode, timeout := st.Shutdown, time.Duration(st.ShutdownTimeout)
	if mode == "" {
		mode = rebound.ShutdownGraceful
	}
	if timeout == 0 {
		timeout = rebound.DefaultShutdownTimeout
	}
	return fmt.Sprintf("%s, %s", mode, timeout)
}

// addShutdownFlags adds --shutdown and --shutdown-timeout to a planned verb;
// the returned func reads them (zero: the machine's settings).
func addShutdownFlags(cmd *cobra.Command) func() (rebound.ShutdownOptions, error) {
	var (
		mode    string
		timeout time.Duration
	)
	cmd.Flags().StringVar(&mode, "shutdown", "", "planned only: graceful (wait for the guest, fail if it does not stop in time) or force (power the VM off after the timeout); default: the machine's setting, else graceful")
	cmd.Flags().DurationVar(&timeout, "shutdown-timeout", 0, "planned only: how long to wait for the guest to shut down; default: the machine's setting, else 1m")
	return func() (rebound.ShutdownOptions, error) {
		if cmd.Flags().Changed("shutdown") && mode != rebound.ShutdownGraceful && mode != rebound.ShutdownForce {
			return rebound.ShutdownOptions{}, usagef("--shutdown must be graceful or force, not %q", mode)
		}
		if cmd.Flags().Changed("shutdown-timeout") && timeout <= 0 {
			return rebound.ShutdownOptions{}, usagef("--shutdown-timeout must be positive, not %s", timeout)
		}
		return rebound.ShutdownOptions{Mode: mode, Timeout: rebound.Duration(timeout)}, nil
	}
}
