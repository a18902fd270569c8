package main

import (
	"fmt"
	"io"

	"github.com/rebound-dr/rebound"
	"github.com/spf13/cobra"
)

// Deleted is the JSON output of `rebound machine delete`.
type Deleted struct {
	Name    string `json:"name"`
	Deleted bool   `json:"deleted"`
}

func (c *CLI) machineCommand() *cobra.Command {
	cmd := groupCommand("machine", "Machines: create, list, show, delete")
	cmd.AddCommand(c.machineCreateCommand())
	cmd.AddCommand(&cobra.Command{
		Use:   "list",
		Short: "List machines",
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
			return c.print(ms, func(w io.Writer) {
				row(w, "NAME", "STATE", "ACTIVE-SITE", "HEALTH", "LAG", "DISKS")
				for i := range ms {
					m := &ms[i]
					row(w, m.Name, m.State, orDash(m.ActiveSite), orDash(m.Health), fmtLag(m), fmtDisks(m.Disks))
				}
			})
		},
	})
	cmd.AddCommand(&cobra.Command{
		Use:   "show NAME",
		Short: "Show a machine: state, health, protection, disks and their NBD URIs",
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

func (c *CLI) machineCreateCommand() *cobra.Command {
	var (
		site, driver string
		disks        []string
	)
	cmd := &cobra.Command{
		Use:   "create NAME --site S --disk SIZE [--disk SIZE]...",
		Short: "Create a machine with empty disks served over NBD at a site",
		Example: `  rebound machine create web1 --site a --disk 4GiB --disk 512M
  rebound machine create db --site a --disk 10G --driver none`,
		Args: argNames("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if site == "" {
				return usagef("machine create: --site is required")
			}
			if len(disks) == 0 {
				return usagef("machine create: at least one --disk SIZE is required")
			}
			req := rebound.CreateMachineRequest{Name: args[0], Site: site, Driver: driver}
			for _, d := range disks {
				n, err := ParseSize(d)
				if err != nil {
					return err
				}
				req.Disks = append(req.Disks, n)
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
	f.StringArrayVar(&disks, "disk", nil, "disk size, e.g. 4GiB, 512M, 1073741824 (repeat for more disks; suffixes are powers of 1024)")
	f.StringVar(&driver, "driver", "none", "machine driver")
	return cmd
}
