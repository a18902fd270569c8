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
)

func init() {
	extraCommands = append(extraCommands,
		func(c *CLI) *cobra.Command { return c.userCommand() },
		func(c *CLI) *cobra.Command { return c.tokenCommand() },
		func(c *CLI) *cobra.Command { return c.auditCommand() },
		func(c *CLI) *cobra.Command { return c.whoamiCommand() },
	)
}

// userClient is what the user, token, audit and whoami verbs need of the
// server (http.Client has it).
type userClient interface {
	WhoAmI(ctx context.Context) (*rebound.Principal, error)
	ListUsers(ctx context.Context) ([]rebound.User, error)
	CreateUser(ctx context.Context, req rebound.CreateUserRequest) (*rebound.CreateUserResult, error)
	DeleteUser(ctx context.Context, name string) error
	SetRole(ctx context.Context, name string, role rebound.Role) (*rebound.User, error)
	SetPassword(ctx context.Context, name, password string) (string, error)
	ListTokens(ctx context.Context, user string, all bool) ([]rebound.APIToken, error)
	CreateToken(ctx context.Context, user, name string) (*rebound.CreateTokenResult, error)
	RevokeToken(ctx context.Context, id string) error
	ListAudit(ctx context.Context, f rebound.AuditFilter) ([]rebound.AuditEntry, error)
}

// Users returns the client of the user, token and audit verbs.
func (c *CLI) Users() (userClient, error) {
	svc, err := c.Service()
	if err != nil {
		return nil, err
	}
	u, ok := svc.(userClient)
	if !ok {
		return nil, rebound.Errorf(rebound.EINTERNAL, "this client cannot manage users, tokens or the audit log")
	}
	return u, nil
}

// readPasswordFile reads a password from path ("-": standard input),
// without its trailing newline.
func (c *CLI) readPasswordFile(path string) (string, error) {
	var b []byte
	var err error
	if path == "-" {
		b, err = io.ReadAll(io.LimitReader(c.Stdin, 4096))
	} else {
		b, err = os.ReadFile(path)
	}
	if err != nil {
		return "", rebound.Errorf(rebound.EINVALID, "read --password-file: %v", err)
	}
	pw := strings.TrimRight(string(b), "\r\n")
	if pw == "" {
		return "", rebound.Errorf(rebound.EINVALID, "--password-file %s is empty", path)
	}
	return pw, nil
}

// PasswordSet is the output of user passwd.
type PasswordSet struct {
	Name string `json:"name"`
	// Password is the generated password, when none was given.
	Password string `json:"password,omitempty"`
}

// TokenRevoked is the output of token revoke.
type TokenRevoked struct {
	ID      string `json:"id"`
	Revoked bool   `json:"revoked"`
}

func (c *CLI) userCommand() *cobra.Command {
	cmd := groupCommand("user", "Users and their roles: create, list, delete, set-role, passwd")
	var role, pwFile string
	create := &cobra.Command{
		Use:   "create NAME --role viewer|operator|admin [--password-file F]",
		Short: "Create a user (admin)",
		Long: `Create a user who logs in to the console with a password and calls the
API with tokens (rebound token create --user NAME). Roles: a viewer sees
everything and changes nothing; an operator also runs the recovery loop
(protect, points, failover, test failover, commit, reprotect, failback,
plans, jobs, power, machines); an admin also manages sites, policies, users
and tokens.

Without --password-file the server generates a password, printed this once:
pass it on to the user, who can change it with 'rebound user passwd NAME'.
Passwords are at least 12 characters. --password-file - reads standard input.`,
		Example: `  rebound user create alice --role operator
  rebound user create bob --role viewer --password-file bob.pw`,
		Args: argNames("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if role == "" {
				return usagef("user create: --role is required: viewer, operator or admin")
			}
			r, err := rebound.ParseRole(role)
			if err != nil {
				return usagef("user create: --role: %s", rebound.ErrorMessage(err))
			}
			req := rebound.CreateUserRequest{Name: args[0], Role: r}
			if pwFile != "" {
				if req.Password, err = c.readPasswordFile(pwFile); err != nil {
					return err
				}
			}
			u, err := c.Users()
			if err != nil {
				return err
			}
			res, err := u.CreateUser(cmd.Context(), req)
			if err != nil {
				return err
			}
			return c.print(res, func(w io.Writer) {
				fmt.Fprintf(w, "created user %s (role %s)\n", res.User.Name, res.User.Role)
				if res.Password != "" {
					fmt.Fprintf(w, "password: %s\n(shown this once; the user changes it with: rebound user passwd %s)\n", res.Password, res.User.Name)
				}
			})
		},
	}
	create.Flags().StringVar(&role, "role", "", "viewer, operator or admin (required)")
	create.Flags().StringVar(&pwFile, "password-file", "", "read the password from FILE (- for standard input) instead of generating one")

	var passwdFile string
	passwd := &cobra.Command{
		Use:   "passwd NAME [--password-file F]",
		Short: "Set a user's password: your own, or (admin) anyone's",
		Long: `Set a user's password and end the user's console sessions. Without
--password-file the server generates one, printed this once.`,
		Args: argNames("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			var pw string
			if passwdFile != "" {
				var err error
				if pw, err = c.readPasswordFile(passwdFile); err != nil {
					return err
				}
			}
			u, err := c.Users()
			if err != nil {
				return err
			}
			gen, err := u.SetPassword(cmd.Context(), args[0], pw)
			if err != nil {
				return err
			}
			res := PasswordSet{Name: args[0], Password: gen}
			return c.print(res, func(w io.Writer) {
				fmt.Fprintf(w, "password of %s set\n", args[0])
				if gen != "" {
					fmt.Fprintf(w, "password: %s\n(shown this once)\n", gen)
				}
			})
		},
	}
	passwd.Flags().StringVar(&passwdFile, "password-file", "", "read the password from FILE (- for standard input) instead of generating one")

	cmd.AddCommand(create, passwd,
		&cobra.Command{
			Use:   "list",
			Short: "List users and their roles (admin)",
			Args:  argNames(),
			RunE: func(cmd *cobra.Command, args []string) error {
				u, err := c.Users()
				if err != nil {
					return err
				}
				us, err := u.ListUsers(cmd.Context())
				if err != nil {
					return err
				}
				if us == nil {
					us = []rebound.User{}
				}
				return c.print(us, func(w io.Writer) {
					row(w, "NAME", "ROLE", "PASSWORD", "CREATED")
					for _, x := range us {
						pw := "set"
						if !x.PasswordSet {
							pw = "none (tokens only)"
						}
						row(w, x.Name, x.Role, pw, fmtTime(x.CreatedAt))
					}
				})
			},
		},
		&cobra.Command{
			Use:   "delete NAME",
			Short: "Delete a user and revoke its tokens and sessions (admin)",
			Long:  `Delete a user; its API tokens stop working and its console sessions end. The last admin cannot be deleted.`,
			Args:  argNames("NAME"),
			RunE: func(cmd *cobra.Command, args []string) error {
				u, err := c.Users()
				if err != nil {
					return err
				}
				if err := u.DeleteUser(cmd.Context(), args[0]); err != nil {
					return err
				}
				return c.print(Deleted{Name: args[0], Deleted: true}, func(w io.Writer) {
					fmt.Fprintf(w, "deleted user %s; its tokens and sessions are revoked\n", args[0])
				})
			},
		},
		&cobra.Command{
			Use:   "set-role NAME viewer|operator|admin",
			Short: "Change a user's role (admin)",
			Long:  `Change a user's role; its tokens and console sessions carry the new role from their next call. The last admin keeps the admin role.`,
			Args:  argNames("NAME", "ROLE"),
			RunE: func(cmd *cobra.Command, args []string) error {
				r, err := rebound.ParseRole(args[1])
				if err != nil {
					return usagef("user set-role: %s", rebound.ErrorMessage(err))
				}
				u, err := c.Users()
				if err != nil {
					return err
				}
				x, err := u.SetRole(cmd.Context(), args[0], r)
				if err != nil {
					return err
				}
				return c.print(x, func(w io.Writer) { fmt.Fprintf(w, "user %s now has role %s\n", x.Name, x.Role) })
			},
		},
	)
	return cmd
}

func (c *CLI) tokenCommand() *cobra.Command {
	cmd := groupCommand("token", "API tokens: create, list, revoke")
	var user, name string
	create := &cobra.Command{
		Use:   "create --name N [--user U]",
		Short: "Create an API token: your own, or (admin) another user's",
		Long: `Create an API token. It carries its user's role, whatever that becomes.
The secret is printed this once (the server keeps only a hash): store it in a
0600 file or a secret store and pass it with REBOUND_TOKEN or --token.`,
		Example: `  rebound token create --name laptop
  rebound token create --user ci-bot --name github-actions -o json`,
		Args: argNames(),
		RunE: func(cmd *cobra.Command, args []string) error {
			if name == "" {
				return usagef("token create: --name is required: say what the token is for (--name laptop)")
			}
			u, err := c.Users()
			if err != nil {
				return err
			}
			res, err := u.CreateToken(cmd.Context(), user, name)
			if err != nil {
				return err
			}
			return c.print(res, func(w io.Writer) {
				fmt.Fprintf(w, "created token %s (%s) of user %s\n%s\n(shown this once)\n", res.Token.ID, res.Token.Name, res.Token.User, res.Secret)
			})
		},
	}
	create.Flags().StringVar(&name, "name", "", "what the token is for: laptop, ci, grafana (required)")
	create.Flags().StringVar(&user, "user", "", "the token's user (default: you; another user needs the admin role)")

	var listUser string
	var all bool
	list := &cobra.Command{
		Use:   "list [--user U | --all]",
		Short: "List API tokens: yours, or (admin) a user's or everyone's",
		Args:  argNames(),
		RunE: func(cmd *cobra.Command, args []string) error {
			if all && listUser != "" {
				return usagef("token list: give --user or --all, not both")
			}
			u, err := c.Users()
			if err != nil {
				return err
			}
			ts, err := u.ListTokens(cmd.Context(), listUser, all)
			if err != nil {
				return err
			}
			if ts == nil {
				ts = []rebound.APIToken{}
			}
			return c.print(ts, func(w io.Writer) {
				row(w, "ID", "USER", "NAME", "CREATED", "LAST USED")
				for _, t := range ts {
					row(w, t.ID, t.User, t.Name, fmtTime(t.CreatedAt), fmtTime(t.LastUsed))
				}
			})
		},
	}
	list.Flags().StringVar(&listUser, "user", "", "this user's tokens (admin, unless it is you)")
	list.Flags().BoolVar(&all, "all", false, "every user's tokens (admin)")

	cmd.AddCommand(create, list, &cobra.Command{
		Use:   "revoke ID",
		Short: "Revoke an API token: yours, or (admin) anyone's",
		Long:  `Revoke an API token (its ID is in rebound token list): the server refuses it from the next call on.`,
		Args:  argNames("ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			u, err := c.Users()
			if err != nil {
				return err
			}
			if err := u.RevokeToken(cmd.Context(), args[0]); err != nil {
				return err
			}
			return c.print(TokenRevoked{ID: args[0], Revoked: true}, func(w io.Writer) {
				fmt.Fprintf(w, "revoked token %s\n", args[0])
			})
		},
	})
	return cmd
}

func (c *CLI) auditCommand() *cobra.Command {
	var since, user string
	var limit int
	cmd := &cobra.Command{
		Use:   "audit [--since DURATION|TIME] [--user U] [--limit N]",
		Short: "Show the audit log: every change made through the API, who, when, from where, and the result",
		Long: `Show the audit log, newest first: every call that changes something (any
method but GET), refused ones included: time, user, role, how they
authenticated (token or console session), the client's address, the action
(METHOD and route), its target, the HTTP status and the error. Calls with a
bad or missing token are recorded with an empty user (at most 60 a minute).
Request bodies, passwords and tokens are never recorded. Any role may read it.`,
		Example: `  rebound audit --since 1h
  rebound audit --user alice --limit 20 -o json`,
		Args: argNames(),
		RunE: func(cmd *cobra.Command, args []string) error {
			when, err := parseWhen("audit", "--since", since, time.Now())
			if err != nil {
				return err
			}
			if limit < 0 || limit > rebound.MaxPageSize {
				return usagef("audit: --limit must be from 1 to %d, not %d", rebound.MaxPageSize, limit)
			}
			u, err := c.Users()
			if err != nil {
				return err
			}
			es, err := u.ListAudit(cmd.Context(), rebound.AuditFilter{Since: when, User: user, Limit: limit})
			if err != nil {
				return err
			}
			if es == nil {
				es = []rebound.AuditEntry{}
			}
			return c.print(es, func(w io.Writer) {
				row(w, "TIME", "USER", "ROLE", "VIA", "REMOTE", "ACTION", "TARGET", "STATUS", "ERROR")
				for _, e := range es {
					row(w, fmtTime(e.Time), dash(e.User), dash(string(e.Role)), dash(e.Via), dash(e.Remote), e.Action, dash(e.Target), e.Status, dash(e.Error))
				}
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&since, "since", "", "only entries at or after this time: RFC 3339 (2026-11-27T14:00:00Z) or a duration ago (90m)")
	f.StringVar(&user, "user", "", "only this user's entries")
	f.IntVar(&limit, "limit", 0, fmt.Sprintf("at most N entries (1 to %d; default 100)", rebound.MaxPageSize))
	return cmd
}

func (c *CLI) whoamiCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "whoami",
		Short: "Show who your token authenticates as, and its role",
		Args:  argNames(),
		RunE: func(cmd *cobra.Command, args []string) error {
			u, err := c.Users()
			if err != nil {
				return err
			}
			p, err := u.WhoAmI(cmd.Context())
			if err != nil {
				return err
			}
			return c.print(p, func(w io.Writer) {
				fmt.Fprintf(w, "user %s, role %s (via %s", p.User, p.Role, p.Via)
				if p.TokenID != "" {
					fmt.Fprintf(w, ", token %s", p.TokenID)
				}
				fmt.Fprintln(w, ")")
			})
		},
	}
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
