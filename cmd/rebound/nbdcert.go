package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/rebound-dr/rebound"
	rgrpc "github.com/rebound-dr/rebound/grpc"
	"github.com/rebound-dr/rebound/nbd"
	"github.com/rebound-dr/rebound/pki"
)

func init() { extraCommands = append(extraCommands, newNBDCertCommand) }

// NBDCert is what `rebound nbd-cert` wrote.
type NBDCert struct {
	Name   string `json:"name"`
	Dir    string `json:"dir"`
	Serial string `json:"serial"`
}

// newNBDCertCommand enrolls a certificate for an NBD client on another host
// (qemu, nbdinfo, nbdcopy) with a site join token, and writes it where
// those clients read it. The certificate has the NBD client role: sites'
// exports take it, the control and replication channels refuse it. The
// server records it, and `rebound site remove NAME` revokes it.
func newNBDCertCommand(c *CLI) *cobra.Command {
	var server, token, tokenFile, out string
	cmd := &cobra.Command{
		Use:   "nbd-cert NAME --out DIR --token-file FILE [--server-addr ADDR]",
		Short: "Enroll a client certificate for NBD over TLS (qemu, nbdinfo) on this host",
		Long: `Enroll NAME with a one-time token from ` + "`rebound site token NAME --nbd`" + ` and write
DIR/ca-cert.pem, DIR/client-cert.pem and DIR/client-key.pem (0600, DIR 0700):
the credentials qemu's tls-creds-x509 (dir=DIR,endpoint=client) and libnbd's
nbds://...?tls-certificates=DIR read to open a site's exports over TLS. The
certificate, named NAME, opens NBD exports and nothing else (it cannot
pose as a site): revoke it with rebound site remove NAME.`,
		Example: `  rebound site token hv1 --nbd > hv1.token    # on the CLI computer
  rebound nbd-cert hv1 --server-addr vault:8441 --token-file hv1.token --out /etc/rebound/nbd
  nbdinfo 'nbds://primary:10809/vm1-disk0?tls-certificates=/etc/rebound/nbd'`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if out == "" {
				return usagef("nbd-cert: --out DIR is required")
			}
			if err := tokenSource(cmd, &token, tokenFile); err != nil {
				return err
			}
			if token == "" && tokenFile != "" {
				b, err := os.ReadFile(tokenFile)
				if err != nil {
					return rebound.Errorf(rebound.EINVALID, "read join token file: %v; write the token from `rebound site token %s --nbd` there", err, name)
				}
				token = strings.TrimSpace(string(b))
			}
			if token == "" {
				return rebound.Errorf(rebound.EINVALID, "nbd-cert %s needs a one-time token from `rebound site token %s --nbd`: pass it with --token-file FILE, REBOUND_JOIN_TOKEN or --token", name, name)
			}
			if _, err := os.Stat(out + "/" + nbd.TLSKeyFile); err == nil {
				return rebound.Errorf(rebound.ECONFLICT, "%s already holds a client key: remove it first, or choose another --out", out)
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 30*time.Second)
			defer cancel()
			addrs, err := serverAddrs(server)
			if err != nil {
				return err
			}
			certPEM, keyPEM, caPEM, err := rgrpc.EnrollAny(ctx, addrs, token, name, pki.RoleNBD)
			if err != nil {
				return fmt.Errorf("enroll %s with %s: %w", name, server, err)
			}
			if err := nbd.WriteClientDir(out, certPEM, keyPEM, caPEM); err != nil {
				return err
			}
			cert, err := pki.ParseCert(certPEM)
			if err != nil {
				return err
			}
			res := NBDCert{Name: name, Dir: out, Serial: pki.Serial(cert)}
			return c.print(res, func(w io.Writer) {
				fmt.Fprintf(w, "%s: NBD client certificate (serial %s) in %s\n", name, res.Serial, out)
				fmt.Fprintf(w, "use: nbds://SITE:10809/EXPORT?tls-certificates=%s, or qemu --object tls-creds-x509,id=tls0,dir=%s,endpoint=client\n", out, out)
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&server, "server-addr", "127.0.0.1:8441", "the server's address for sites (enrolment); several: comma-separated, the first that answers")
	f.StringVar(&token, "token", os.Getenv("REBOUND_JOIN_TOKEN"), "one-time enrollment token (default $REBOUND_JOIN_TOKEN; --token-file keeps it out of ps)")
	f.StringVar(&tokenFile, "token-file", "", "read the one-time enrollment token from FILE")
	f.StringVar(&out, "out", "", "directory to write ca-cert.pem, client-cert.pem and client-key.pem to")
	return cmd
}
