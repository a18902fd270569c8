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
	cmd.AddCommand(&cobra.Command{
		Use:   "token NAME",
		Short: "Print a one-time token a new site named NAME enrolls with",
		Args:  argNames("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			svc, err := c.Service()
			if err != nil {
				return err
			}
			tok, err := svc.CreateEnrollToken(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return c.print(EnrollToken{Site: args[0], Token: tok}, func(w io.Writer) {
				fmt.Fprintln(w, tok)
			})
		},
	})
	return cmd
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
