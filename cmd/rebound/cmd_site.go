package main

import (
	"fmt"
	"io"

	"github.com/rebound-dr/rebound"
	"github.com/spf13/cobra"
)

// EnrollToken is the JSON output of `rebound site token`.
type EnrollToken struct {
	Site  string `json:"site"`
	Token string `json:"token"`
}

func (c *CLI) siteCommand() *cobra.Command {
	cmd := groupCommand("site", "Sites: list them, enroll new ones")
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
