package main

import (
	"context"
	"fmt"
	"io"
	"strings"

	"github.com/rebound-dr/rebound"
	"github.com/spf13/cobra"
)

func init() { extraCommands = append(extraCommands, (*CLI).replicationGroupCommand) }

// Groups returns the Service's GroupService.
func (c *CLI) Groups() (rebound.GroupService, error) {
	svc, err := c.Service()
	if err != nil {
		return nil, err
	}
	g, ok := svc.(rebound.GroupService)
	if !ok {
		return nil, rebound.Errorf(rebound.EINTERNAL, "this client cannot manage replication groups")
	}
	return g, nil
}

// target is a lifecycle verb's subject: the machine NAME argument or
// --group G, exactly one. The server takes a group's name wherever a
// machine verb takes a machine's, so the verb calls the same method.
type target struct{ group string }

// addTarget adds --group to a lifecycle verb and sets its Args: NAME or
// --group G (a usage error otherwise, exit 2).
func addTarget(cmd *cobra.Command) *target {
	t := &target{}
	cmd.Flags().StringVar(&t.group, "group", "", "act on this replication group's machines at one shared point, in place of NAME")
	cmd.Args = func(cmd *cobra.Command, args []string) error {
		grouped := cmd.Flags().Changed("group")
		switch {
		case grouped && t.group == "":
			return usagef("%s: --group must not be empty", cmdPath(cmd))
		case len(args) > 1:
			return usagef("%s: unexpected argument %q", cmdPath(cmd), args[1])
		case grouped && len(args) == 1:
			return usagef("%s: give a machine NAME or --group G, not both (a group's members are named by the group)", cmdPath(cmd))
		case !grouped && len(args) == 0:
			return usagef("%s: missing NAME (or --group G for a replication group)", cmdPath(cmd))
		case !grouped && args[0] == "":
			return usagef("%s: NAME must not be empty", cmdPath(cmd))
		}
		return nil
	}
	return t
}

// name is the machine or group the verb acts on; Args has checked there
// is exactly one.
func (t *target) name(args []string) string {
	if t.group != "" {
		return t.group
	}
	return args[0]
}

// positional is what a repeated command line (morePages) puts before its
// flags: NAME, or nothing when --group carries the name.
func (t *target) positional(args []string) []string {
	if t.group != "" {
		return nil
	}
	return args
}

func (c *CLI) replicationGroupCommand() *cobra.Command {
	cmd := groupCommand("group", "Replication groups: list, show, remove-machine")
	cmd.Long = `A replication group is a set of machines active at one site and protected to
one target through one ordered stream: every point of the group is
crash-consistent across all of its machines. 'rebound protect NAME --to SITE
--group G' creates G or adds NAME to it; the lifecycle verbs take --group G in
place of a machine NAME and act on the whole group at one shared point.`
	cmd.AddCommand(&cobra.Command{
		Use:   "list",
		Short: "List replication groups: machines, state, direction, health, lag",
		Args:  argNames(),
		RunE: func(cmd *cobra.Command, args []string) error {
			g, err := c.Groups()
			if err != nil {
				return err
			}
			gs, err := g.ListGroups(cmd.Context())
			if err != nil {
				return err
			}
			if gs == nil {
				gs = []rebound.Group{}
			}
			for i := range gs {
				gs[i].Machines = nonNilStrings(gs[i].Machines)
			}
			return c.print(gs, func(w io.Writer) {
				row(w, "NAME", "MACHINES", "STATE", "SOURCE", "TARGET", "HEALTH", "LAG")
				for i := range gs {
					g := &gs[i]
					row(w, g.Name, orDash(strings.Join(g.Machines, ",")), g.State, orDash(g.SourceSite), orDash(g.TargetSite),
						orDash(g.Health), fmtGroupLag(g))
				}
			})
		},
	})
	cmd.AddCommand(&cobra.Command{
		Use:   "show G",
		Short: "Show a replication group: machines, state, protection, failover",
		Args:  argNames("G"),
		RunE: func(cmd *cobra.Command, args []string) error {
			g, err := c.Groups()
			if err != nil {
				return err
			}
			v, err := g.GetGroup(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			v.Machines = nonNilStrings(v.Machines)
			return c.print(v, func(w io.Writer) { writeGroup(w, v) })
		},
	})
	var wait bool
	rm := &cobra.Command{
		Use:   "remove-machine G NAME [--wait]",
		Short: "Take a machine out of a group without a full copy; it goes on replicating alone",
		Long: `Take machine NAME out of replication group G without a full copy: it goes on
replicating alone to the same target. The last machine of a group cannot be
removed: unprotect the group instead (rebound unprotect --group G).`,
		Example: `  rebound group remove-machine db db2 --wait`,
		Args:    argNames("G", "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			g, err := c.Groups()
			if err != nil {
				return err
			}
			return c.startJob(cmd, wait, func(ctx context.Context, svc rebound.Service) (*rebound.Job, error) {
				return g.RemoveGroupMember(ctx, args[0], args[1])
			})
		},
	}
	addWaitFlag(rm, &wait)
	cmd.AddCommand(rm)
	return cmd
}

func nonNilStrings(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// fmtGroupLag is a protected group's lag, "-" for one not replicating.
func fmtGroupLag(g *rebound.Group) string {
	if g.Protection == nil && g.TargetSite == "" {
		return "-"
	}
	return fmtSeconds(g.LagSeconds)
}

func writeGroup(w io.Writer, g *rebound.Group) {
	row(w, "Name:", g.Name)
	row(w, "Machines:", orDash(strings.Join(g.Machines, ", ")))
	row(w, "State:", g.State)
	row(w, "Active site:", orDash(g.ActiveSite))
	health := orDash(g.Health)
	if g.HealthReason != "" {
		health += " (" + g.HealthReason + ")"
	}
	row(w, "Health:", health)
	if g.SourceSite != "" || g.TargetSite != "" {
		row(w, "Protection:", fmt.Sprintf("%s -> %s, policy %s", orDash(g.SourceSite), orDash(g.TargetSite), orDash(g.Policy)))
	}
	if p := g.Protection; p != nil {
		row(w, "Replication:", fmt.Sprintf("%s, lag %s, backlog %s, %s/s", orDash(p.ReplState),
			fmtSeconds(p.LagSeconds), formatSize(p.BacklogBytes), formatSize(int64(p.ThroughputBps))))
		row(w, "Last point:", fmtTime(p.LastPointTime))
	} else if g.TargetSite != "" {
		row(w, "Lag:", fmtSeconds(g.LagSeconds))
	}
	if f := g.Failover; f != nil {
		kind := "unplanned"
		if f.Planned {
			kind = "planned"
		}
		row(w, "Failover:", fmt.Sprintf("%s -> %s, %s, point %s", f.FromSite, f.ToSite, kind, fmtPoint(f.Point)))
	}
	if t := g.TestFailover; t != nil {
		row(w, "Test failover:", fmt.Sprintf("at %s, point %s", t.Site, fmtPoint(t.Point)))
	}
	row(w, "Created:", orDash(g.CreatedAt))
}
