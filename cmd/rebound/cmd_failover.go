package main

import (
	"context"

	"github.com/rebound-dr/rebound"
	"github.com/spf13/cobra"
)

const pointHelp = `point: latest, latest-processed, latest-app-consistent, a point ID or an RFC 3339 time`

func (c *CLI) failoverCommand() *cobra.Command {
	var (
		point         string
		planned, wait bool
		shutdownFlags func() (rebound.ShutdownOptions, error)
		tgt           *target
	)
	cmd := &cobra.Command{
		Use:   "failover NAME|--group G [--point P] [--planned [--shutdown graceful|force] [--shutdown-timeout D]] [--wait]",
		Short: "Fail a machine over to its recovery site at a point",
		Long: `Fail a machine over to its protection's recovery site: the point's state is
exported over NBD there at once. A planned failover first fences the source
and waits until every write is replicated, so nothing is lost; a qemu
machine's guest is shut down first (--shutdown, --shutdown-timeout; defaults
from rebound machine set). Then commit, change the point, or cancel.
With --group G the whole replication group fails over at one shared point.`,
		Example: `  rebound failover web1 --wait
  rebound failover web1 --point latest-app-consistent
  rebound failover web1 --point 2026-11-27T13:00:00Z
  rebound failover web1 --planned --wait
  rebound failover web1 --planned --shutdown force --shutdown-timeout 30s
  rebound failover --group db --planned --wait`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if point == "" {
				return usagef("failover: --point must not be empty")
			}
			sh, err := shutdownFlags()
			if err != nil {
				return err
			}
			if !planned && sh != (rebound.ShutdownOptions{}) {
				return usagef("failover: --shutdown and --shutdown-timeout need --planned (an unplanned failover stops the VM at once)")
			}
			return c.startJob(cmd, wait, func(ctx context.Context, svc rebound.Service) (*rebound.Job, error) {
				return svc.Failover(ctx, rebound.FailoverRequest{Machine: tgt.name(args), Point: point, Planned: planned, Shutdown: sh})
			})
		},
	}
	cmd.Flags().StringVar(&point, "point", rebound.PointLatest, pointHelp)
	cmd.Flags().BoolVar(&planned, "planned", false, "fence the source and replicate everything first (no data loss)")
	shutdownFlags = addShutdownFlags(cmd)
	addWaitFlag(cmd, &wait)
	tgt = addTarget(cmd)

	var cpPoint string
	var cpWait bool
	var cpTgt *target
	cp := &cobra.Command{
		Use:   "change-point NAME|--group G --point P [--wait]",
		Short: "Export another point of an uncommitted failover (drops writes made since)",
		RunE: func(cmd *cobra.Command, args []string) error {
			if cpPoint == "" {
				return usagef("failover change-point: --point is required")
			}
			return c.startJob(cmd, cpWait, func(ctx context.Context, svc rebound.Service) (*rebound.Job, error) {
				return svc.ChangePoint(ctx, cpTgt.name(args), cpPoint)
			})
		},
	}
	cp.Flags().StringVar(&cpPoint, "point", "", pointHelp+" (required)")
	addWaitFlag(cp, &cpWait)
	cpTgt = addTarget(cp)

	var cancelWait bool
	var cancelTgt *target
	cancel := &cobra.Command{
		Use:   "cancel NAME|--group G [--wait]",
		Short: "Cancel an uncommitted failover: the machine is active at its source again",
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.startJob(cmd, cancelWait, func(ctx context.Context, svc rebound.Service) (*rebound.Job, error) {
				return svc.CancelFailover(ctx, cancelTgt.name(args))
			})
		},
	}
	addWaitFlag(cancel, &cancelWait)
	cancelTgt = addTarget(cancel)
	cmd.AddCommand(cp, cancel)
	return cmd
}

func (c *CLI) commitCommand() *cobra.Command {
	var wait bool
	var tgt *target
	cmd := &cobra.Command{
		Use:   "commit NAME|--group G [--wait]",
		Short: "Commit a failover: the recovery site's disks become the machine's disks",
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.startJob(cmd, wait, func(ctx context.Context, svc rebound.Service) (*rebound.Job, error) {
				return svc.Commit(ctx, tgt.name(args))
			})
		},
	}
	addWaitFlag(cmd, &wait)
	tgt = addTarget(cmd)
	return cmd
}

func (c *CLI) testFailoverCommand() *cobra.Command {
	var (
		point string
		wait  bool
		tgt   *target
	)
	cmd := &cobra.Command{
		Use:   "test-failover NAME|--group G [--point P] [--wait]",
		Short: "Export a point at the recovery site on test exports; replication keeps running",
		Example: `  rebound test-failover web1 --wait
  rebound machine show web1 -o json   # testFailover.disks[].nbd
  rebound test-failover cleanup web1 --wait
  rebound test-failover --group db --wait`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if point == "" {
				return usagef("test-failover: --point must not be empty")
			}
			return c.startJob(cmd, wait, func(ctx context.Context, svc rebound.Service) (*rebound.Job, error) {
				return svc.TestFailover(ctx, tgt.name(args), point)
			})
		},
	}
	cmd.Flags().StringVar(&point, "point", rebound.PointLatest, pointHelp)
	addWaitFlag(cmd, &wait)
	tgt = addTarget(cmd)

	var cleanupWait bool
	var cleanupTgt *target
	cleanup := &cobra.Command{
		Use:   "cleanup NAME|--group G [--wait]",
		Short: "Drop a test failover and everything written to it",
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.startJob(cmd, cleanupWait, func(ctx context.Context, svc rebound.Service) (*rebound.Job, error) {
				return svc.TestFailoverCleanup(ctx, cleanupTgt.name(args))
			})
		},
	}
	addWaitFlag(cleanup, &cleanupWait)
	cleanupTgt = addTarget(cleanup)
	cmd.AddCommand(cleanup)
	return cmd
}
