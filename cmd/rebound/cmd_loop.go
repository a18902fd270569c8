package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/spf13/cobra"
)

// DefaultWaitReady is what a bare --wait-ready waits for the capture side.
const DefaultWaitReady = 15 * time.Minute

// Preflight operations.
var preflightOps = []string{"failover", "failback", "reprotect", "commit", "protect"}

// Loop returns the Service's LoopService (reprotect, failback, preflight).
func (c *CLI) Loop() (rebound.LoopService, error) {
	svc, err := c.Service()
	if err != nil {
		return nil, err
	}
	l, ok := svc.(rebound.LoopService)
	if !ok {
		return nil, rebound.Errorf(rebound.EINTERNAL, "this client cannot reprotect, fail back or run preflight checks")
	}
	return l, nil
}

// startLoopJob is startJob for the LoopService verbs.
func (c *CLI) startLoopJob(cmd *cobra.Command, wait bool, start func(ctx context.Context, l rebound.LoopService) (*rebound.Job, error)) error {
	l, err := c.Loop()
	if err != nil {
		return err
	}
	return c.startJob(cmd, wait, func(ctx context.Context, svc rebound.Service) (*rebound.Job, error) {
		return start(ctx, l)
	})
}

func (c *CLI) reprotectCommand() *cobra.Command {
	var (
		req  rebound.ReprotectRequest
		wr   time.Duration
		wait bool
		tgt  *target
	)
	cmd := &cobra.Command{
		Use:   "reprotect NAME|--group G [--to SITE] [--policy P] [--verify] [--wait-ready[=DURATION]] [--keep SITE] [--wait]",
		Short: "Replicate a failed-over, committed machine back to the site it came from",
		Long: `Start replicating a committed, failed-over machine from its active site back to
the site it came from (or --to another). The target keeps the disks it holds:
only the regions that differ are sent (a delta resync). --verify compares
block digests of both copies instead of trusting change tracking.

When the copies diverged (both sides were written after the failover point,
a split brain) the reprotect is refused unless --keep names the site whose
copy wins; the other copy's divergent writes are overwritten.

Without --wait-ready the reprotect fails at once when the active site's
capture side is not ready; --wait-ready waits up to 15m for it, and
--wait-ready=DURATION up to DURATION (the = is required).`,
		Example: `  rebound reprotect web1 --wait
  rebound reprotect web1 --to a --verify --wait-ready=5m --wait
  rebound reprotect web1 --keep b   # after a split brain: b's copy wins
  rebound reprotect --group db --wait`,
		RunE: func(cmd *cobra.Command, args []string) error {
			for _, f := range []string{"to", "policy", "keep"} {
				if cmd.Flags().Changed(f) && cmd.Flags().Lookup(f).Value.String() == "" {
					return usagef("reprotect: --%s must not be empty", f)
				}
			}
			if wr < 0 {
				return usagef("reprotect: --wait-ready must not be negative, not %s", wr)
			}
			req.Machine, req.WaitReady = tgt.name(args), rebound.Duration(wr)
			return c.startLoopJob(cmd, wait, func(ctx context.Context, l rebound.LoopService) (*rebound.Job, error) {
				return l.Reprotect(ctx, req)
			})
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&req.To, "to", "", "target site (default: the site the machine came from)")
	fl.StringVar(&req.Policy, "policy", "", "policy name (default \"default\")")
	fl.BoolVar(&req.Verify, "verify", false, "compare block digests of both copies instead of trusting change tracking")
	fl.DurationVar(&wr, "wait-ready", 0, "wait up to DURATION for the active site's capture side (bare: 15m; absent: fail at once)")
	fl.Lookup("wait-ready").NoOptDefVal = DefaultWaitReady.String()
	fl.StringVar(&req.Keep, "keep", "", "after a split brain, the site whose copy wins")
	addWaitFlag(cmd, &wait)
	tgt = addTarget(cmd)
	return cmd
}

func (c *CLI) failbackCommand() *cobra.Command {
	var (
		point         string
		planned, wait bool
		shutdownFlags func() (rebound.ShutdownOptions, error)
		tgt           *target
	)
	cmd := &cobra.Command{
		Use:   "failback NAME|--group G [--planned | --point P] [--shutdown graceful|force] [--shutdown-timeout D] [--wait]",
		Short: "Fail a reprotected machine over back to the site it came from",
		Long: `Fail a reprotected machine over back to the site it came from. By default the
failback is planned: the active site is fenced and everything it wrote is
replicated first, so nothing is lost; a qemu machine's guest is shut down
first (--shutdown, --shutdown-timeout; defaults from rebound machine set).
--point fails back to a recovery point instead (unplanned). Then commit it,
as after a failover.`,
		Example: `  rebound failback web1 --wait
  rebound failback web1 --point latest-app-consistent
  rebound failback web1 --shutdown force --shutdown-timeout 30s
  rebound failback --group db --wait`,
		RunE: func(cmd *cobra.Command, args []string) error {
			pointSet := cmd.Flags().Changed("point")
			if pointSet && cmd.Flags().Changed("planned") {
				return usagef("failback: --planned and --point exclude each other (a planned failback replicates everything)")
			}
			if pointSet && point == "" {
				return usagef("failback: --point must not be empty")
			}
			sh, err := shutdownFlags()
			if err != nil {
				return err
			}
			if pointSet && sh != (rebound.ShutdownOptions{}) {
				return usagef("failback: --shutdown and --shutdown-timeout are for a planned failback; --point makes it unplanned")
			}
			req := rebound.FailoverRequest{Machine: tgt.name(args), Point: point, Planned: !pointSet, Shutdown: sh}
			return c.startLoopJob(cmd, wait, func(ctx context.Context, l rebound.LoopService) (*rebound.Job, error) {
				return l.Failback(ctx, req)
			})
		},
	}
	cmd.Flags().BoolVar(&planned, "planned", false, "fence the active site and replicate everything first (the default)")
	cmd.Flags().StringVar(&point, "point", "", pointHelp+" (unplanned)")
	shutdownFlags = addShutdownFlags(cmd)
	addWaitFlag(cmd, &wait)
	tgt = addTarget(cmd)
	return cmd
}

// checksFailed is returned when preflight checks failed (exit 1); the
// report has already been printed, so only msg goes to stderr.
type checksFailed struct{ msg string }

func (e *checksFailed) Error() string { return e.msg }

// machineChecksFailed summarises a machine's failed preflight.
func machineChecksFailed(rep *rebound.PreflightReport) *checksFailed {
	n := 0
	for _, ch := range rep.Checks {
		if !ch.OK {
			n++
		}
	}
	return &checksFailed{fmt.Sprintf("preflight %s %s: %d of %d checks failed", rep.Operation, rep.Machine, n, len(rep.Checks))}
}

func (c *CLI) preflightCommand() *cobra.Command {
	var op string
	var tgt *target
	cmd := &cobra.Command{
		Use:   "preflight NAME|--group G [--operation protect|failover|commit|reprotect|failback]",
		Short: "Check whether the machine's next operation would succeed now; exit 1 if not",
		Long: `Run the checks an operation makes before it starts, without starting it.
Without --operation the server checks the next operation the machine's state
allows: protect for a machine never protected, failover for a protected one
(failback once it is protected back to where it came from), commit for a
failed-over one, reprotect for a committed one. Exit code 0 when every check
passed, 1 when any failed.`,
		Example: `  rebound preflight web1
  rebound preflight web1 --operation failback -o json
  rebound preflight --group db --operation failover`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if cmd.Flags().Changed("operation") && !contains(preflightOps, op) {
				return usagef("preflight: --operation must be protect, failover, failback, commit or reprotect, not %q", op)
			}
			l, err := c.Loop()
			if err != nil {
				return err
			}
			rep, err := l.Preflight(cmd.Context(), tgt.name(args), op)
			if err != nil {
				return err
			}
			if rep.Checks == nil {
				rep.Checks = []rebound.PreflightCheck{}
			}
			if err := c.print(rep, func(w io.Writer) { writePreflight(w, rep) }); err != nil {
				return err
			}
			if !rep.OK {
				return machineChecksFailed(rep)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&op, "operation", "", "protect, failover, failback, commit or reprotect (default: the next one the machine's state allows)")
	tgt = addTarget(cmd)
	return cmd
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

func writePreflight(w io.Writer, r *rebound.PreflightReport) {
	result := "ok"
	if !r.OK {
		result = "FAILED"
	}
	row(w, "Machine:", r.Machine)
	row(w, "Operation:", orDash(r.Operation))
	row(w, "Result:", result)
	flush(w)
	row(w, "NAME", "OK", "MESSAGE")
	for _, ch := range r.Checks {
		ok := "ok"
		if !ch.OK {
			ok = "FAIL"
		}
		row(w, ch.Name, ok, ch.Message)
	}
}
