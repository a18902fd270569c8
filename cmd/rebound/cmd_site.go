package main

import (
	"fmt"
	"io"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/spf13/cobra"
)

// EnrollToken is the JSON output of `rebound site token`.
type EnrollToken struct {
	Site  string `json:"site"`
	Token string `json:"token"`
}

func (c *CLI) siteCommand() *cobra.Command {
	cmd := groupCommand("site", "Sites: list, show, enroll new ones")
	cmd.AddCommand(&cobra.Command{
		Use:   "list",
		Short: "List the sites enrolled with the server",
		Args:  argNames(),
		RunE: func(cmd *cobra.Command, args []string) error {
			svc, err := c.Service()
			if err != nil {
				return err
			}
			sites, err := svc.ListSites(cmd.Context())
			if err != nil {
				return err
			}
			if sites == nil {
				sites = []rebound.Site{}
			}
			return c.print(sites, func(w io.Writer) {
				row(w, "NAME", "STATUS", "NBD", "REPL", "FREE", "LAST-SEEN", "VERSION")
				for _, s := range sites {
					free := "-"
					if s.FreeBytes > 0 {
						free = formatSize(s.FreeBytes)
					}
					row(w, s.Name, s.Status, orDash(s.NBDAddr), orDash(s.ReplAddr), free, fmtTime(s.LastSeen), orDash(s.Version))
				}
			})
		},
	})
	cmd.AddCommand(&cobra.Command{
		Use:   "show NAME",
		Short: "Show a site: health, version, free space, last report, machines and their roles",
		Args:  argNames("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			cs, err := c.Catalog()
			if err != nil {
				return err
			}
			d, err := cs.GetSite(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if d.Machines == nil {
				d.Machines = []rebound.SiteMachineRole{}
			}
			return c.print(d, func(w io.Writer) { writeSite(w, d, time.Now()) })
		},
	})
	var req rebound.JoinTokenRequest
	token := &cobra.Command{
		Use:   "token NAME",
		Short: "Print a one-time token a new site (or, with --agent, an agent; with --nbd, an NBD client) named NAME enrolls with",
		Long: `Print a one-time join token (valid one hour) that enrolls NAME. A token
enrolls a site, with --agent the agent of the server NAME, or with --nbd
an NBD client on another host (rebound nbd-cert NAME); each is refused
for the others. A name already enrolled needs --rotate: the new
certificate replaces the old one, which is revoked when the new one first
connects.`,
		Args: argNames("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			var tok string
			if req == (rebound.JoinTokenRequest{}) {
				svc, err := c.Service()
				if err != nil {
					return err
				}
				if tok, err = svc.CreateEnrollToken(cmd.Context(), args[0]); err != nil {
					return err
				}
			} else {
				a, err := c.SiteAdmin()
				if err != nil {
					return err
				}
				if tok, err = a.CreateJoinToken(cmd.Context(), args[0], req); err != nil {
					return err
				}
			}
			return c.print(EnrollToken{Site: args[0], Token: tok}, func(w io.Writer) {
				fmt.Fprintln(w, tok)
			})
		},
	}
	token.Flags().BoolVar(&req.Agent, "agent", false, "the token enrolls `rebound agent --name NAME` (a certificate bound to machine NAME), not a site")
	token.Flags().BoolVar(&req.NBD, "nbd", false, "the token enrolls `rebound nbd-cert NAME`: a certificate that opens sites' NBD exports over TLS and nothing else")
	token.Flags().BoolVar(&req.Rotate, "rotate", false, "NAME is enrolled: replace its certificate (the old one is revoked when the new one connects)")
	cmd.AddCommand(token)

	var force bool
	remove := &cobra.Command{
		Use:   "remove NAME",
		Short: "Remove a site: revoke its certificates, disconnect it and forget it",
		Long: `Remove a site: its certificates are revoked (the server and every site
refuse them from then on), its control channel is closed and the server
forgets it. A site that still holds machines is refused unless --force.
To bring the site back, enroll it again with a new token.`,
		Args: argNames("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			a, err := c.SiteAdmin()
			if err != nil {
				return err
			}
			res, err := a.RemoveSite(cmd.Context(), args[0], force)
			if err != nil {
				return err
			}
			return c.print(res, func(w io.Writer) {
				fmt.Fprintf(w, "site %s removed; %d certificate(s) revoked\n", res.Site, len(res.Revoked))
				if len(res.Machines) > 0 {
					fmt.Fprintf(w, "machines still naming it: %v\n", res.Machines)
				}
			})
		},
	}
	remove.Flags().BoolVar(&force, "force", false, "remove the site even though machines are still active, protected or replicated there")
	cmd.AddCommand(remove)
	return cmd
}

// SiteAdmin returns the service that enrolls and removes sites.
func (c *CLI) SiteAdmin() (rebound.SiteAdminService, error) {
	svc, err := c.Service()
	if err != nil {
		return nil, err
	}
	a, ok := svc.(rebound.SiteAdminService)
	if !ok {
		return nil, rebound.Errorf(rebound.EINTERNAL, "this client cannot remove sites or mint agent and rotation tokens")
	}
	return a, nil
}

func writeSite(w io.Writer, d *rebound.SiteDetail, now time.Time) {
	row(w, "Name:", d.Name)
	row(w, "Status:", d.Status)
	health := orDash(d.Health)
	if d.HealthReason != "" {
		health += " (" + d.HealthReason + ")"
	}
	row(w, "Health:", health)
	row(w, "Version:", orDash(d.Version))
	free := "-"
	if d.FreeBytes > 0 {
		free = formatSize(d.FreeBytes)
	}
	row(w, "Free space:", free)
	row(w, "NBD:", orDash(d.NBDAddr))
	row(w, "Replication:", orDash(d.ReplAddr))
	last := "never"
	if !d.LastSeen.IsZero() {
		last = fmtTime(d.LastSeen) + " (" + fmtAge(now.Sub(d.LastSeen)) + " ago)"
	}
	row(w, "Last report:", last)
	flush(w)
	if len(d.Machines) == 0 {
		row(w, "Machines:", "none")
		return
	}
	row(w, "Machines:")
	row(w, "  NAME", "ROLE", "STATE", "HEALTH")
	for _, m := range d.Machines {
		row(w, "  "+m.Name, m.Role, m.State, orDash(m.Health))
	}
}
