package main

import (
	"fmt"
	"io"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/spf13/cobra"
)

func (c *CLI) policyCommand() *cobra.Command {
	cmd := groupCommand("policy", "Replication policies: list, set, delete")
	cmd.AddCommand(&cobra.Command{
		Use:   "list",
		Short: "List policies",
		Args:  argNames(),
		RunE: func(cmd *cobra.Command, args []string) error {
			svc, err := c.Service()
			if err != nil {
				return err
			}
			ps, err := svc.ListPolicies(cmd.Context())
			if err != nil {
				return err
			}
			if ps == nil {
				ps = []rebound.Policy{}
			}
			return c.print(ps, func(w io.Writer) { writePolicies(w, ps) })
		},
	})
	cmd.AddCommand(c.policySetCommand(), &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete a policy no machine uses",
		Long: `Delete a policy. A policy that machines use is refused, naming them: move
them to another policy first with 'rebound protect NAME --to SITE --policy P'.
The default policy cannot be deleted.`,
		Args: argNames("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			cs, err := c.Catalog()
			if err != nil {
				return err
			}
			if err := cs.DeletePolicy(cmd.Context(), args[0]); err != nil {
				return err
			}
			return c.print(Deleted{Name: args[0], Deleted: true}, func(w io.Writer) {
				fmt.Fprintf(w, "deleted policy %s\n", args[0])
			})
		},
	})
	return cmd
}

func (c *CLI) policySetCommand() *cobra.Command {
	var rpo, retention, crash, app time.Duration
	var congestion string
	cmd := &cobra.Command{
		Use:   "set NAME [--rpo D] [--retention D] [--crash-interval D] [--app-interval D] [--congestion throttle|track]",
		Short: "Create or update a policy",
		Long: `Create or update a policy. Flags not given keep the policy's current
values, or the defaults (rpo 30s, retention 24h, crash-interval 5s,
app-interval 0 = never) for a new policy. The crash interval is at least 1s,
retention at least the crash interval, the RPO positive, the app interval 0
(never) or at least 1s; other values are refused.

--congestion says what a protected machine's writes do when the target falls
behind and the source's spool fills: track (the default) lets them go on at
full speed and switches to dirty-region tracking plus a resync (no recovery
point is cut until it ends); throttle makes them wait before they are
acknowledged while the spool is above 3/4 of its limit, so the lag stays
bounded and points keep coming (a target that acks nothing for 5s releases
them and the stream tracks as above).

A changed policy takes effect on every machine that uses it: the source site
cuts points at the new intervals and the recovery site keeps the new
retention (a site that is offline gets it when it reconnects).`,
		Example: `  rebound policy set gold --rpo 10s --retention 72h --crash-interval 2s --app-interval 15m`,
		Args:    argNames("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			svc, err := c.Service()
			if err != nil {
				return err
			}
			ps, err := svc.ListPolicies(cmd.Context())
			if err != nil {
				return err
			}
			p := rebound.DefaultPolicy()
			p.Name = args[0]
			for _, q := range ps {
				if q.Name == args[0] {
					p = q
				}
			}
			f := cmd.Flags()
			for _, o := range []struct {
				flag string
				v    time.Duration
				dst  *rebound.Duration
			}{
				{"rpo", rpo, &p.RPOThreshold},
				{"retention", retention, &p.Retention},
				{"crash-interval", crash, &p.CrashInterval},
				{"app-interval", app, &p.AppInterval},
			} {
				if !f.Changed(o.flag) {
					continue
				}
				if o.v < 0 || o.v == 0 && o.flag != "app-interval" {
					return usagef("policy set: --%s must be positive, not %s", o.flag, o.v)
				}
				*o.dst = rebound.Duration(o.v)
			}
			if f.Changed("congestion") {
				p.Congestion = congestion
			}
			if err := rebound.ValidatePolicy(p); err != nil {
				return usagef("policy set: %s", rebound.ErrorMessage(err))
			}
			out, err := svc.PutPolicy(cmd.Context(), p)
			if err != nil {
				return err
			}
			return c.print(out, func(w io.Writer) { writePolicies(w, []rebound.Policy{*out}) })
		},
	}
	f := cmd.Flags()
	f.DurationVar(&rpo, "rpo", 30*time.Second, "lag above which health turns warning")
	f.DurationVar(&retention, "retention", 24*time.Hour, "how far back points are kept")
	f.DurationVar(&crash, "crash-interval", 5*time.Second, "how often a crash-consistent point is cut")
	f.DurationVar(&app, "app-interval", 0, "how often an app-consistent point is cut (0: never)")
	f.StringVar(&congestion, "congestion", rebound.CongestionTrack, "when the target falls behind: throttle (writes wait) or track (dirty regions, then a resync)")
	return cmd
}
