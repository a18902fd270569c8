package main

import (
	"io"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/spf13/cobra"
)

func (c *CLI) policyCommand() *cobra.Command {
	cmd := groupCommand("policy", "Replication policies: RPO threshold, retention, point intervals")
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
	cmd.AddCommand(c.policySetCommand())
	return cmd
}

func (c *CLI) policySetCommand() *cobra.Command {
	var rpo, retention, crash, app time.Duration
	cmd := &cobra.Command{
		Use:   "set NAME [--rpo D] [--retention D] [--crash-interval D] [--app-interval D]",
		Short: "Create or update a policy",
		Long: `Create or update a policy. Flags not given keep the policy's current
values, or the defaults (rpo 30s, retention 24h, crash-interval 5s,
app-interval 0 = never) for a new policy.`,
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
				if o.v < 0 {
					return usagef("policy set: --%s must not be negative", o.flag)
				}
				*o.dst = rebound.Duration(o.v)
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
	return cmd
}
