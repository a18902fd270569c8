package main

import (
	"context"
	"io"

	"github.com/rebound-dr/rebound"
	"github.com/spf13/cobra"
)

func (c *CLI) protectCommand() *cobra.Command {
	var (
		to, policy, group string
		wait              bool
	)
	cmd := &cobra.Command{
		Use:   "protect NAME --to SITE [--policy P] [--group G] [--wait]",
		Short: "Start replicating a machine to a recovery site, or change its policy",
		Long: `Start replicating a machine to a recovery site under a policy (default
"default"). Run on a machine already protected to that site with another
--policy, it moves the machine to that policy: the sites apply it at once.

With --group G the machine replicates in replication group G, which is
created by its first machine; every point of a group is crash-consistent
across its machines. Adding a protected machine moves it into the group's
stream without a full copy. Its lifecycle verbs then take --group G.`,
		Example: `  rebound protect web1 --to b --wait
  rebound protect db --to b --policy gold
  rebound protect db1 --to b --group db --wait`,
		Args: argNames("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if to == "" {
				return usagef("protect: --to SITE is required")
			}
			if cmd.Flags().Changed("group") && group == "" {
				return usagef("protect: --group must not be empty")
			}
			return c.startJob(cmd, wait, func(ctx context.Context, svc rebound.Service) (*rebound.Job, error) {
				return svc.Protect(ctx, rebound.ProtectRequest{Machine: args[0], To: to, Policy: policy, Group: group})
			})
		},
	}
	cmd.Flags().StringVar(&to, "to", "", "recovery site (required)")
	cmd.Flags().StringVar(&policy, "policy", "", "policy name (default \"default\")")
	cmd.Flags().StringVar(&group, "group", "", "replicate in this replication group (created by its first machine)")
	addWaitFlag(cmd, &wait)
	return cmd
}

func addWaitFlag(cmd *cobra.Command, wait *bool) {
	cmd.Flags().BoolVar(wait, "wait", false, "follow the job until it ends; exit 1 unless it succeeded")
}

func (c *CLI) pointsCommand() *cobra.Command {
	var l listFlags
	var tgt *target
	cmd := &cobra.Command{
		Use:   "points NAME|--group G [--since T] [--until T] [--kind crash|app] [--limit N [--cursor C]]",
		Short: "List a protected machine's recovery points, oldest first",
		Long: `List the recovery points the machine's recovery site holds, oldest first.
A 5-second policy makes about 17,000 points a day: --since and --until bound
the times (RFC 3339, or a duration ago such as 90m), --kind keeps crash or app
points, and --limit N prints the first N; when more follow, the command
prints on stderr the command line (with --cursor) that lists the next ones.
--group G lists a replication group's points: each holds every member.`,
		Example: `  rebound points web1 --since 1h --kind app
  rebound points web1 --since 2026-11-27T14:00:00Z --until 2026-11-27T14:05:00Z
  rebound points web1 --limit 100
  rebound points --group db -o json`,
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.listPoints(cmd, tgt.name(args), tgt.positional(args), &l)
		},
	}
	l.add(cmd, "only points of this kind: crash or app")
	tgt = addTarget(cmd)
	return cmd
}

func (c *CLI) pointCommand() *cobra.Command {
	cmd := groupCommand("point", "Recovery points: cut one now")
	var app bool
	var tgt *target
	create := &cobra.Command{
		Use:   "create NAME|--group G [--app-consistent]",
		Short: "Cut a recovery point now; returns once the recovery site holds it",
		RunE: func(cmd *cobra.Command, args []string) error {
			svc, err := c.Service()
			if err != nil {
				return err
			}
			p, err := svc.CreatePoint(cmd.Context(), tgt.name(args), app)
			if err != nil {
				return err
			}
			return c.print(p, func(w io.Writer) { writePoints(w, []rebound.RecoveryPoint{*p}) })
		},
	}
	create.Flags().BoolVar(&app, "app-consistent", false, "run the freeze/thaw hooks around the point (with --group: every member's, one point)")
	tgt = addTarget(create)
	cmd.AddCommand(create)
	return cmd
}

func init() { extraCommands = append(extraCommands, (*CLI).unprotectCommand) }

func (c *CLI) unprotectCommand() *cobra.Command {
	var wait, keep bool
	var tgt *target
	cmd := &cobra.Command{
		Use:   "unprotect NAME|--group G [--keep-replica] [--wait]",
		Short: "Stop replicating a machine and remove (or keep) its replica at the recovery site",
		Long: `Stop a protected (or still syncing) machine's replication at both sites and
remove the replica the recovery site holds (its journal and disks). The
machine stays active where it is, unprotected: it can then be deleted
(rebound machine delete) or protected again. Refused during a failover:
commit or cancel it first.

With --keep-replica the recovery site keeps the replica as a detached copy:
a point is cut at the source and the job waits until the recovery site
holds it (a drain, as --point latest does), then the replica as of that
point is written out as plain raw disk files and the journal is dropped.
The copy is neither replicated nor served; rebound machine show lists it
with its files at the site. rebound machine delete removes it, and a
later protect to that site replaces it with a full copy. Refused while
the machine is still syncing (there is no consistent point to keep).`,
		Example: `  rebound unprotect web1 --wait
  rebound unprotect web1 --keep-replica --wait
  rebound unprotect web1 --wait && rebound machine delete web1
  rebound unprotect --group db --wait`,
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.startLoopJob(cmd, wait, func(ctx context.Context, l rebound.LoopService) (*rebound.Job, error) {
				return l.Unprotect(ctx, rebound.UnprotectRequest{Machine: tgt.name(args), KeepReplica: keep})
			})
		},
	}
	cmd.Flags().BoolVar(&keep, "keep-replica", false, "keep the replica at the recovery site as a detached copy (plain disks as of a point cut now)")
	addWaitFlag(cmd, &wait)
	tgt = addTarget(cmd)
	return cmd
}
