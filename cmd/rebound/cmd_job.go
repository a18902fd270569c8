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
	cmd := groupCommand("job", "Jobs: list, show, wait for, cancel, resume, retry")
	var machine string
	var retryWait bool
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
	var note string
	resume := &cobra.Command{
		Use:   "resume ID [--note TEXT]",
		Short: "Continue a plan job suspended at a manual step",
		Args:  argNames("ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ps, err := c.Plans()
			if err != nil {
				return err
			}
			j, err := ps.ResumeJob(cmd.Context(), args[0], note)
			if err != nil {
				return err
			}
			return c.print(j, func(w io.Writer) { fmt.Fprintf(w, "job %s resumed\n", j.ID) })
		},
	}
	resume.Flags().StringVar(&note, "note", "", "what was done at the manual step (kept in the job and the event)")
	retry := &cobra.Command{
		Use:   "retry ID [--wait]",
		Short: "Run a failed or cancelled plan job again from its failed member",
		Long: `Run a failed or cancelled plan job again. It continues where it stopped:
members and actions already done are not redone.`,
		Args: argNames("ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ps, err := c.Plans()
			if err != nil {
				return err
			}
			return c.startJob(cmd, retryWait, func(ctx context.Context, svc rebound.Service) (*rebound.Job, error) {
				return ps.RetryJob(ctx, args[0])
			})
		},
	}
	retry.Flags().BoolVar(&retryWait, "wait", false, "wait for the job to end")
	cmd.AddCommand(list, show, wait, cancel, resume, retry)
	return cmd
}

func (c *CLI) eventsCommand() *cobra.Command {
	var machine string
	var l listFlags
	cmd := &cobra.Command{
		Use:   "events [--machine M] [--since T] [--until T] [--kind K] [--limit N [--cursor C]]",
		Short: "Show the audit and health history, newest first",
		Long: `Show events, newest first: the newest 1000, or those the filters keep.
--kind matches a kind or its dotted prefix (job matches job.protect);
--since and --until take RFC 3339 times or a duration ago (90m). With
--limit N, when more follow, the command prints on stderr the command line
(with --cursor) that lists the next ones.`,
		Example: `  rebound events --machine web1 --since 24h --kind health
  rebound events --kind job --limit 50`,
		Args: argNames(),
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.listEvents(cmd, machine, &l)
		},
	}
	cmd.Flags().StringVar(&machine, "machine", "", "only events of this machine")
	l.add(cmd, "only events of this kind or dotted prefix (job, health, policy.changed, ...)")
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
