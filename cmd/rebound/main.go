// Command rebound is Rebound's command-line interface: the control-plane
// verbs (this file and cmd_*.go) plus the server, site and up commands the
// lead registers through extraCommands.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/pprof"
	"strings"
	"syscall"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/spf13/cobra"
)

// Version and Commit identify the build. They can be set at build time with
// -ldflags "-X main.Version=v1.2.3 -X main.Commit=abc123"; otherwise Commit
// comes from the build's VCS stamp (debug.ReadBuildInfo) and Version from
// the module version when built with go install.
var (
	Version = "dev"
	Commit  = ""
)

// Exit codes. They are part of the CLI's public contract (docs/cli.md).
const (
	ExitOK           = 0 // success
	ExitFailed       = 1 // the operation failed: job failed or cancelled, preflight check failed, or internal error
	ExitUsage        = 2 // bad flags or arguments, invalid input (rebound.EINVALID)
	ExitNotFound     = 3 // rebound.ENOTFOUND
	ExitConflict     = 4 // rebound.ECONFLICT: the state does not allow it
	ExitUnavailable  = 5 // rebound.EUNAVAILABLE: server or site unreachable
	ExitUnauthorized = 6 // rebound.EUNAUTHORIZED
	ExitNoSpace      = 7 // rebound.ENOSPACE: the server's data disk is full
	ExitForbidden    = 8 // rebound.EFORBIDDEN: the caller's role does not allow it
)

const exitCodesHelp = `Exit codes:
  0  ok
  1  operation failed (job failed or cancelled, a preflight check failed,
     or internal error)
  2  usage error (bad flags or arguments, invalid input)
  3  not found
  4  conflict (the current state does not allow the operation)
  5  unavailable (server or site unreachable)
  6  unauthorized
  7  the server's data disk is full (free space there)
  8  forbidden (your role does not allow the operation)`

// extraCommands are root subcommands registered by other files of this
// package (server.go, site.go, up.go) from their init functions. A command
// whose name matches an existing one (e.g. "site") has its subcommands
// merged into it.
var extraCommands []func(*CLI) *cobra.Command

// DefaultPollInterval is how often --wait polls the job.
const DefaultPollInterval = 300 * time.Millisecond

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	stopProfile := startCPUProfile(os.Getenv("REBOUND_CPU_PROFILE"), os.Stderr)
	code := Run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stopProfile()
	stop()
	os.Exit(code)
}

// startCPUProfile writes a CPU profile of the whole process to path (when
// set) until the returned func runs: how a site's or server's CPU per
// replicated byte is taken apart (docs/benchmarks.md) without a debug
// listener on the network.
func startCPUProfile(path string, stderr io.Writer) func() {
	if path == "" {
		return func() {}
	}
	f, err := os.Create(path)
	if err == nil {
		err = pprof.StartCPUProfile(f)
	}
	if err != nil {
		fmt.Fprintf(stderr, "REBOUND_CPU_PROFILE: %v (running without a profile)\n", err)
		if f != nil {
			f.Close()
		}
		return func() {}
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}
}

// Run runs the CLI with args (without the program name) and returns the
// process exit code.
func Run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	return NewCLI(stdin, stdout, stderr).Run(ctx, args)
}

// CLI holds what the commands share: streams, the Service factory and the
// global flags. Tests build one with a fake NewService and call Run.
type CLI struct {
	Stdin  io.Reader
	Stdout io.Writer
	Stderr io.Writer

	// NewService returns the Service the verbs talk to. The default dials
	// the server over HTTPS with the resolved client config.
	NewService func(cfg *ClientConfig) (rebound.Service, error)
	// PollInterval is how often --wait polls a job.
	PollInterval time.Duration
	// IsTerminal reports whether w is a terminal (progress bars vs lines).
	IsTerminal func(w io.Writer) bool

	// Global flags.
	server, token, caFile, output string
	// tokenFrom says where the resolved token came from (explainAuth).
	tokenFrom string

	svc rebound.Service
	// ran is set once a command's hooks start running: errors before it
	// come from cobra's parsing (usage errors).
	ran bool
}

// NewCLI returns a CLI with the default Service factory.
func NewCLI(stdin io.Reader, stdout, stderr io.Writer) *CLI {
	return &CLI{
		Stdin:        stdin,
		Stdout:       stdout,
		Stderr:       stderr,
		NewService:   defaultNewService,
		PollInterval: DefaultPollInterval,
		IsTerminal:   isTerminal,
	}
}

// Run executes the command line and returns the exit code. Errors are
// printed as "rebound: <message>" on stderr and, with -o json, as
// {"error":{"code":..., "message":...}} on stdout.
func (c *CLI) Run(ctx context.Context, args []string) int {
	root := c.Command()
	root.SetArgs(args)
	root.SetIn(c.Stdin)
	root.SetOut(c.Stdout)
	root.SetErr(c.Stderr)
	cmd, err := root.ExecuteContextC(ctx)
	if err == nil {
		return ExitOK
	}
	err = c.explainAuth(err)
	code := c.exitCode(err)
	var je *jobError
	var cf *checksFailed
	if errors.As(err, &je) || errors.As(err, &cf) {
		// The job or report was already printed; its JSON carries the failure.
		msg := err.Error()
		if je != nil {
			msg = je.Error()
		} else {
			msg = cf.Error()
		}
		fmt.Fprintf(c.Stderr, "rebound: %s\n", msg)
		return code
	}
	msg := rebound.ErrorMessage(err)
	fmt.Fprintf(c.Stderr, "rebound: %s\n", msg)
	if code == ExitUsage && !c.ran {
		path := "rebound"
		if cmd != nil {
			path = cmd.CommandPath()
		}
		fmt.Fprintf(c.Stderr, "Run '%s --help' for usage.\n", path)
	}
	if c.JSON() || !c.ran && wantsJSON(args) {
		errCode := rebound.ErrorCode(err)
		if !c.ran {
			errCode = rebound.EINVALID
		}
		b, _ := json.Marshal(map[string]any{"error": map[string]string{"code": errCode, "message": msg}})
		fmt.Fprintf(c.Stdout, "%s\n", b)
	}
	return code
}

// wantsJSON spots -o json in args cobra could not parse.
func wantsJSON(args []string) bool {
	for i, a := range args {
		switch a = strings.ToLower(a); a {
		case "-ojson", "-o=json", "--output=json":
			return true
		case "-o", "--output":
			if i+1 < len(args) && strings.EqualFold(args[i+1], "json") {
				return true
			}
		}
	}
	return false
}

func (c *CLI) exitCode(err error) int {
	var je *jobError
	var cf *checksFailed
	if errors.As(err, &je) || errors.As(err, &cf) {
		return ExitFailed
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return ExitFailed
	}
	var re *rebound.Error
	if !c.ran && !errors.As(err, &re) {
		return ExitUsage // cobra: unknown command, bad flag, wrong args
	}
	if !errors.As(err, &re) && strings.HasPrefix(err.Error(), "required flag") {
		return ExitUsage
	}
	return ExitCode(err)
}

// ExitCode maps an error's rebound code to the CLI exit code.
func ExitCode(err error) int {
	switch rebound.ErrorCode(err) {
	case "":
		return ExitOK
	case rebound.EINVALID:
		return ExitUsage
	case rebound.ENOTFOUND:
		return ExitNotFound
	case rebound.ECONFLICT:
		return ExitConflict
	case rebound.EUNAVAILABLE:
		return ExitUnavailable
	case rebound.EUNAUTHORIZED:
		return ExitUnauthorized
	case rebound.ENOSPACE:
		return ExitNoSpace
	case rebound.EFORBIDDEN:
		return ExitForbidden
	}
	return ExitFailed
}

// Command returns the root command with every verb.
func (c *CLI) Command() *cobra.Command {
	cobra.EnableTraverseRunHooks = true
	root := &cobra.Command{
		Use:   "rebound",
		Short: "Rebound site recovery",
		Long: `Rebound replicates machines' disks between sites and fails them over.

The verbs talk to the Rebound server configured by 'rebound up'
($XDG_CONFIG_HOME/rebound/config), by REBOUND_SERVER, REBOUND_TOKEN and
REBOUND_CA, or by --server, --token and --ca (later ones win).

` + exitCodesHelp,
		SilenceErrors: true,
		SilenceUsage:  true,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			// -o JSON is -o json: the format is case-insensitive.
			c.output = strings.ToLower(c.output)
			if c.output != "table" && c.output != "json" {
				return usagef("-o must be json or table, not %q", c.output)
			}
			c.ran = true
			return nil
		},
	}
	root.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error {
		return usagef("%s", err)
	})
	pf := root.PersistentFlags()
	pf.StringVarP(&c.output, "output", "o", "table", "output format: table or json")
	pf.StringVar(&c.server, "server", "", "server URL; several servers of one control plane: comma-separated, the first that answers is used (overrides REBOUND_SERVER and the config file)")
	pf.StringVar(&c.token, "token", "", "API token (overrides REBOUND_TOKEN and the config file)")
	pf.StringVar(&c.caFile, "ca", "", "CA certificate file (overrides REBOUND_CA and the config file)")

	root.AddCommand(
		c.siteCommand(),
		c.machineCommand(),
		c.policyCommand(),
		c.protectCommand(),
		c.pointsCommand(),
		c.pointCommand(),
		c.failoverCommand(),
		c.commitCommand(),
		c.reprotectCommand(),
		c.failbackCommand(),
		c.preflightCommand(),
		c.testFailoverCommand(),
		c.jobCommand(),
		c.eventsCommand(),
		c.versionCommand(),
	)
	for _, fn := range extraCommands {
		addOrMerge(root, fn(c))
	}
	c.addCompletions(root)
	return root
}

// addOrMerge adds cmd to parent. If parent already has a command of that
// name, the two are merged: a runnable cmd replaces a group command of ours
// and adopts its subcommands (so "rebound site --name a" runs the lead's
// site appliance while "rebound site list" stays); otherwise cmd's
// subcommands move into the existing command.
func addOrMerge(parent, cmd *cobra.Command) {
	for _, existing := range parent.Commands() {
		if existing.Name() != cmd.Name() {
			continue
		}
		if existing.Annotations[groupAnnotation] != "" && cmd.Runnable() {
			existing, cmd = cmd, existing
			parent.RemoveCommand(cmd)
			parent.AddCommand(existing)
		}
		for _, sub := range cmd.Commands() {
			cmd.RemoveCommand(sub)
			addOrMerge(existing, sub)
		}
		return
	}
	parent.AddCommand(cmd)
}

// Service returns the Service for the resolved client config, creating it
// on first use.
func (c *CLI) Service() (rebound.Service, error) {
	if c.svc != nil {
		return c.svc, nil
	}
	cfg, err := c.Config()
	if err != nil {
		return nil, err
	}
	svc, err := c.NewService(&cfg)
	if err != nil {
		return nil, err
	}
	c.svc = svc
	return svc, nil
}

// JSON reports whether -o json was given.
func (c *CLI) JSON() bool { return strings.EqualFold(c.output, "json") }

// groupCommand is a command that only holds subcommands: bare it prints
// help, with an unknown subcommand it is a usage error.
func groupCommand(use, short string) *cobra.Command {
	return &cobra.Command{
		Use:         use,
		Short:       short,
		Annotations: map[string]string{groupAnnotation: "true"},
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usagef("unknown command %q for %q", args[0], cmd.CommandPath())
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error { return cmd.Help() },
	}
}

// groupAnnotation marks a command that only groups subcommands.
const groupAnnotation = "rebound-group"

// usagef returns an EINVALID error (exit code 2).
func usagef(format string, args ...any) error {
	return rebound.Errorf(rebound.EINVALID, format, args...)
}

// argNames returns an Args validator that wants exactly the named args.
func argNames(names ...string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) < len(names) {
			return usagef("%s: missing %s", cmdPath(cmd), strings.Join(names[len(args):], " "))
		} else if len(args) > len(names) {
			return usagef("%s: unexpected argument %q", cmdPath(cmd), args[len(names)])
		}
		for i, a := range args {
			if a == "" {
				return usagef("%s: %s must not be empty", cmdPath(cmd), names[i])
			}
		}
		return nil
	}
}

// cmdPath is the command's path without the program name.
func cmdPath(cmd *cobra.Command) string {
	return strings.TrimPrefix(cmd.CommandPath(), cmd.Root().Name()+" ")
}

// isTerminal reports whether w is a character device (a TTY).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}
