package main

import (
	"context"
	"fmt"
	"io"

	"github.com/rebound-dr/rebound"
	"github.com/spf13/cobra"
)

// machineJobLister is implemented by Services that filter jobs by machine
// server-side (http.Client); others are filtered here.
type machineJobLister interface {
	ListMachineJobs(ctx context.Context, machine string) ([]rebound.Job, error)
}

func (c *CLI) jobCommand() *cobra.Command {
	cmd := groupCommand("job", "Jobs: list, show, wait for, cancel")
	var machine string
	list := &cobra.Command{
		Use:   "list [--machine M]",
		Short: "List jobs",
		Args:  argNames(),
		RunE: func(cmd *cobra.Command, args []string) error {
			svc, err := c.Service()
			if err != nil {
				return err
			}
			var all []rebound.Job
			if mj, ok := svc.(machineJobLister); ok && machine != "" {
				all, err = mj.ListMachineJobs(cmd.Context(), machine)
			} else {
				all, err = svc.ListJobs(cmd.Context())
			}
			if err != nil {
				return err
			}
			jobs := []rebound.Job{}
			for _, j := range all {
				if machine == "" || j.Machine == machine {
					jobs = append(jobs, j)
				}
			}
			return c.print(jobs, func(w io.Writer) { writeJobs(w, jobs) })
		},
	}
	list.Flags().StringVar(&machine, "machine", "", "only jobs of this machine")

	show := &cobra.Command{
		Use:   "show ID",
		Short: "Show a job with its steps",
		Args:  argNames("ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			svc, err := c.Service()
			if err != nil {
				return err
			}
			j, err := svc.GetJob(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return c.print(j, func(w io.Writer) { writeJob(w, j) })
		},
	}
	wait := &cobra.Command{
		Use:   "wait ID",
		Short: "Wait for a job to end; exit 1 unless it succeeded",
		Args:  argNames("ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			svc, err := c.Service()
			if err != nil {
				return err
			}
			j, err := svc.GetJob(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return c.waitAndPrint(cmd.Context(), svc, j)
		},
	}
	cancel := &cobra.Command{
		Use:   "cancel ID",
		Short: "Ask a running job to stop",
		Args:  argNames("ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			svc, err := c.Service()
			if err != nil {
				return err
			}
			j, err := svc.CancelJob(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return c.print(j, func(w io.Writer) { writeJob(w, j) })
		},
	}
	cmd.AddCommand(list, show, wait, cancel)
	return cmd
}

func (c *CLI) eventsCommand() *cobra.Command {
	var machine string
	cmd := &cobra.Command{
		Use:   "events [--machine M]",
		Short: "Show the audit and health history",
		Args:  argNames(),
		RunE: func(cmd *cobra.Command, args []string) error {
			svc, err := c.Service()
			if err != nil {
				return err
			}
			evs, err := svc.ListEvents(cmd.Context(), machine)
			if err != nil {
				return err
			}
			if evs == nil {
				evs = []rebound.Event{}
			}
			return c.print(evs, func(w io.Writer) {
				row(w, "TIME", "KIND", "MACHINE", "SITE", "MESSAGE")
				for _, e := range evs {
					row(w, fmtTime(e.Time), e.Kind, orDash(e.Machine), orDash(e.Site), e.Message)
				}
			})
		},
	}
	cmd.Flags().StringVar(&machine, "machine", "", "only events of this machine")
	return cmd
}

func (c *CLI) versionCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the build's version and commit",
		Args:  argNames(),
		RunE: func(cmd *cobra.Command, args []string) error {
			v := buildVersion()
			return c.print(v, func(w io.Writer) { fmt.Fprintln(w, v) })
		},
	}
}
