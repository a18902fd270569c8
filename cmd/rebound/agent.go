package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/spf13/cobra"
	ggrpc "google.golang.org/grpc"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/agent"
	rgrpc "github.com/rebound-dr/rebound/grpc"
	"github.com/rebound-dr/rebound/pki"
	"github.com/rebound-dr/rebound/site"
)

func init() { extraCommands = append(extraCommands, newAgentCommand) }

// AgentConfig configures `rebound agent`.
type AgentConfig struct {
	Name      string // the server's name: the agent's site and its machine
	DataDir   string
	Server    string // the server's gRPC address for sites
	JoinToken string
	// JoinTokenFile holds the join token when JoinToken is empty.
	JoinTokenFile string
	ReplAddr      string
	Disks         []string
	FreezeMount   string
	Interval      time.Duration
	SpoolLimit    int64
	ReportEvery   time.Duration
	// OnFrozen and OnPoint are agent.Config's test hooks.
	OnFrozen func()
	OnPoint  func(rebound.RecoveryPoint)
}

// AgentMain runs the agent of a Linux server: a site appliance named after
// the server, holding one machine whose disks are the server's devices.
type AgentMain struct {
	Config AgentConfig
	Logger *slog.Logger

	Agent    *agent.Agent
	Site     *site.Site
	ReplAddr string

	grpc   *ggrpc.Server
	cancel context.CancelFunc
	wg     sync.WaitGroup
	close  sync.Once
}

// Run enrolls if needed, opens the agent's site, keeps its machine and
// connects to the server; it returns once running.
func (m *AgentMain) Run(ctx context.Context) (err error) {
	if m.Logger == nil {
		m.Logger = slog.Default()
	}
	defer func() {
		if err != nil {
			m.Close()
		}
	}()
	cfg := m.Config
	if cfg.Name == "" {
		return rebound.Errorf(rebound.EINVALID, "the agent needs a name (--name): the server's name")
	}
	if cfg.DataDir == "" {
		return rebound.Errorf(rebound.EINVALID, "the agent needs a data directory (--data)")
	}
	addrs, err := serverAddrs(cfg.Server)
	if err != nil {
		return err
	}
	if m.Agent, err = agent.New(agent.Config{
		Machine: cfg.Name, Disks: cfg.Disks, FreezeMount: cfg.FreezeMount, Interval: cfg.Interval,
		StateDir: filepath.Join(cfg.DataDir, "agent"), Logger: m.Logger,
		OnFrozen: cfg.OnFrozen, OnPoint: cfg.OnPoint,
	}); err != nil {
		return err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return err
	}
	// Enrollment and certificates are a site's.
	enroll := &SiteMain{Config: SiteConfig{Name: cfg.Name, DataDir: cfg.DataDir, Server: cfg.Server, JoinToken: cfg.JoinToken, JoinTokenFile: cfg.JoinTokenFile, enrollRole: pki.RoleAgent}, Logger: m.Logger}
	certPEM, keyPEM, caPEM, err := enroll.credentials(ctx)
	if err != nil {
		return err
	}
	serverTLS, peerTLS, controlTLS, err := siteTLS(certPEM, keyPEM, caPEM)
	if err != nil {
		return err
	}
	rev, setRevoked := siteRevocations(cfg.DataDir, m.Logger, func() *site.Site { return m.Site }, len(addrs) > 1)
	rev.Apply(serverTLS)
	rev.Apply(peerTLS)
	m.Site = site.New(site.Config{
		Name: cfg.Name, DataDir: cfg.DataDir, PeerTLS: peerTLS, SpoolLimit: cfg.SpoolLimit,
		External: m.Agent.External(), Scan: m.Agent.Scan, ReadExternal: m.Agent.ReadDisk, Logger: m.Logger,
	})
	if err := m.Site.Open(); err != nil {
		return fmt.Errorf("open agent %s: %w", cfg.Name, err)
	}
	// The machine is kept across restarts; the same disks are a no-op.
	if err := m.Site.CreateMachine(ctx, rebound.SiteMachine{Name: cfg.Name, Disks: m.Agent.Disks()}); err != nil {
		return fmt.Errorf("agent %s: keep machine: %w", cfg.Name, err)
	}
	svc, err := m.Agent.Service(ctx, m.Site)
	if err != nil {
		return err
	}
	replAddr := cfg.ReplAddr
	if replAddr == "" {
		replAddr = "127.0.0.1:0"
	}
	rl, err := net.Listen("tcp", replAddr)
	if err != nil {
		return fmt.Errorf("listen for replication on %s: %w", replAddr, err)
	}
	m.ReplAddr = rl.Addr().String()
	// The server's devices are not served over NBD: its own OS writes them.
	m.Site.SetAddrs("", m.ReplAddr)
	// Tracks connections by peer: a revoked peer's open streams are cut.
	var creds *rgrpc.RevocableCreds
	m.grpc, creds = rgrpc.NewRevocableServer(serverTLS, m.Logger.With("agent", cfg.Name, "port", "replication"), rev)
	m.Site.Repl.Register(m.grpc)

	rctx, cancel := context.WithCancel(context.Background())
	m.cancel = cancel
	serve := func(name string, fn func() error) {
		m.wg.Add(1)
		go func() {
			defer m.wg.Done()
			if err := fn(); err != nil && !errors.Is(err, net.ErrClosed) && !errors.Is(err, ggrpc.ErrServerStopped) && rctx.Err() == nil {
				m.Logger.Error(name+" stopped", "agent", cfg.Name, "err", err)
			}
		}()
	}
	serve("replication", func() error { return m.grpc.Serve(rl) })
	every := cfg.ReportEvery
	if every == 0 {
		every = 2 * time.Second
	}
	serve("control", func() error {
		err := rgrpc.RunControls(rctx, addrs, controlTLS, svc, every, rgrpc.WithEvents(m.Site.Events()), rgrpc.WithRevocations(func(list []string) {
			setRevoked(list)
			if n := creds.CloseRevoked(); n > 0 {
				m.Logger.Warn("closed replication connections of revoked certificates", "count", n)
			}
		}))
		if errors.Is(err, context.Canceled) {
			return nil
		}
		return err
	})
	var sizes []string
	for i, d := range m.Agent.Disks() {
		sizes = append(sizes, fmt.Sprintf("%s=%d", cfg.Disks[i], d.Size))
	}
	m.Logger.Info("agent running", "agent", cfg.Name, "disks", sizes, "server", cfg.Server,
		"register", fmt.Sprintf("rebound machine create %s --site %s %s", cfg.Name, cfg.Name, diskFlags(m.Agent.Disks())))
	return nil
}

func diskFlags(disks []rebound.Disk) string {
	s := ""
	for i, d := range disks {
		if i > 0 {
			s += " "
		}
		s += fmt.Sprintf("--disk %d", d.Size)
	}
	return s
}

// Close stops the agent.
func (m *AgentMain) Close() error {
	var err error
	m.close.Do(func() {
		if m.cancel != nil {
			m.cancel()
		}
		if m.grpc != nil {
			m.grpc.Stop()
		}
		m.wg.Wait()
		if m.Site != nil {
			err = m.Site.Close()
		}
		if m.Agent != nil {
			err = errors.Join(err, m.Agent.Close())
		}
	})
	return err
}

func newAgentCommand(c *CLI) *cobra.Command {
	cfg := AgentConfig{}
	var spool string
	cmd := &cobra.Command{
		Use:   "agent --name NAME --server-addr ADDR[,ADDR...] --token-file FILE --disk PATH...",
		Short: "Protect this Linux server's block devices or files (no kernel module)",
		Long: `Run on a Linux server: the agent enrolls like a site named after the server
and holds one machine of that name whose disks are the given devices, used
in place. Each cycle hashes the disks in 64 KiB blocks, sends the blocks
that changed since the last cycle and cuts a recovery point; with
--freeze-mount the filesystem is frozen while the cycle reads it, and the
point is app-consistent.

Register the machine once on the server (the agent logs the command), then
protect it like any machine:
  rebound machine create srv1 --site srv1 --disk SIZE
  rebound protect srv1 --to recovery --wait`,
		Example: `  rebound agent --name srv1 --server-addr 10.0.0.5:8441 --token JOIN --disk /dev/sdb --freeze-mount /data`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := loadDaemonConfig(cmd, "agent"); err != nil {
				return err
			}
			if cfg.Name == "" {
				return cmd.Help()
			}
			if err := tokenSource(cmd, &cfg.JoinToken, cfg.JoinTokenFile); err != nil {
				return err
			}
			n, err := ParseSize(spool)
			if err != nil {
				return err
			}
			cfg.SpoolLimit = n
			if cfg.DataDir == "" {
				cfg.DataDir = filepath.Join("rebound-data", "agents", cfg.Name)
			}
			ctx, stop := signalContext(cmd.Context())
			defer stop()
			m := &AgentMain{Config: cfg, Logger: newLogger(c.Stderr)}
			if err := m.Run(ctx); err != nil {
				return err
			}
			defer m.Close()
			<-ctx.Done()
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.Name, "name", "", "the server's name: the agent's site and machine (runs the agent)")
	f.StringVar(&cfg.DataDir, "data", "", "data directory (default ./rebound-data/agents/NAME)")
	f.StringVar(&cfg.Server, "server-addr", "127.0.0.1:8441", "the servers' addresses, comma-separated (a control channel to each; enrolment with the first that answers)")
	f.StringVar(&cfg.JoinToken, "token", os.Getenv("REBOUND_JOIN_TOKEN"), "one-time enrollment token from `rebound site token NAME --agent` (first start only; default $REBOUND_JOIN_TOKEN; --token-file keeps it out of ps)")
	f.StringVar(&cfg.JoinTokenFile, "token-file", "", "read the one-time enrollment token from FILE (first start only)")
	f.StringVar(&cfg.ReplAddr, "repl-addr", "127.0.0.1:0", "replication listen address")
	f.StringArrayVar(&cfg.Disks, "disk", nil, "block device or file to protect, by absolute path (repeatable, in disk order)")
	f.StringVar(&cfg.FreezeMount, "freeze-mount", "", "mount point frozen (fsfreeze) while a cycle reads the disks: app-consistent points")
	f.DurationVar(&cfg.Interval, "interval", agent.DefaultInterval, "least time between two cycles")
	f.StringVar(&spool, "spool-limit", "1GiB", "local spool bound; a cycle's copy waits for the link past half of it, while frozen")
	addConfigFlag(cmd, "agent")
	cmd.AddCommand(newAgentRestoreCommand(c))
	return cmd
}

func newAgentRestoreCommand(c *CLI) *cobra.Command {
	var machine, point string
	var disks, from []string
	cmd := &cobra.Command{
		Use:   "restore --machine NAME --point P --disk PATH... | --from NBD-URI... --disk PATH...",
		Short: "Write a recovery point back onto this server's own devices",
		Long: `Write a point back onto the server's devices (unmounted): the point is read
over NBD at the recovery site, from a test failover the command starts and
cleans up (or from the failed-over disks when the machine is failed over at
that point), or from the exports given with --from. Only the chunks that
differ are written; the devices are synced at the end.`,
		Example: `  rebound agent restore --machine srv1 --point p1234 --disk /dev/sdb`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(disks) == 0 {
				return usagef("agent restore: --disk is required")
			}
			ctx := cmd.Context()
			uris := from
			if len(uris) == 0 {
				if machine == "" || point == "" {
					return usagef("agent restore: give --machine and --point, or --from")
				}
				svc, err := c.Service()
				if err != nil {
					return err
				}
				var cleanup func()
				uris, cleanup, err = c.pointExports(ctx, svc, machine, point)
				if err != nil {
					return err
				}
				defer cleanup()
			}
			if len(uris) != len(disks) {
				return usagef("agent restore: the point has %d disk(s); give as many --disk", len(uris))
			}
			var results []agent.RestoreResult
			for i, u := range uris {
				res, err := agent.Restore(ctx, u, disks[i], nil)
				if err != nil {
					return err
				}
				results = append(results, res)
			}
			return c.print(results, func(w io.Writer) {
				for i, r := range results {
					fmt.Fprintf(w, "%s: %d bytes restored, %d written\n", disks[i], r.Size, r.Written)
				}
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&machine, "machine", "", "machine (the server's name)")
	f.StringVar(&point, "point", "", pointHelp)
	f.StringArrayVar(&disks, "disk", nil, "device or file to write, in disk order (repeatable)")
	f.StringArrayVar(&from, "from", nil, "NBD URI of a point's export to read instead (repeatable)")
	return cmd
}

// pointExports returns NBD URIs of a point's disks at the recovery site:
// the failed-over disks if the machine is failed over at that point, else
// a test failover's, which cleanup removes when this call started it.
func (c *CLI) pointExports(ctx context.Context, svc rebound.Service, machine, point string) ([]string, func(), error) {
	none := func() {}
	m, err := svc.GetMachine(ctx, machine)
	if err != nil {
		return nil, none, err
	}
	uris := func(ds []rebound.Disk) []string {
		var out []string
		for _, d := range ds {
			out = append(out, d.NBD)
		}
		return out
	}
	if m.State == rebound.MachineFailedOver && m.Failover != nil && m.Failover.Point.ID == point {
		return uris(m.Disks), none, nil
	}
	if m.TestFailover != nil {
		if m.TestFailover.Point.ID == point {
			return uris(m.TestFailover.Disks), none, nil
		}
		return nil, none, rebound.Errorf(rebound.ECONFLICT, "machine %s has a test failover at point %s: clean it up first (rebound test-failover cleanup %s)", machine, m.TestFailover.Point.ID, machine)
	}
	job, err := svc.TestFailover(ctx, machine, point)
	if err != nil {
		return nil, none, err
	}
	if job, err = c.WaitJob(ctx, svc, job); err != nil {
		return nil, none, err
	} else if job.State != rebound.JobSucceeded {
		return nil, none, &jobError{job}
	}
	cleanup := func() {
		cctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if j, err := svc.TestFailoverCleanup(cctx, machine); err == nil {
			_, _ = c.WaitJob(cctx, svc, j)
		}
	}
	if m, err = svc.GetMachine(ctx, machine); err != nil || m.TestFailover == nil {
		cleanup()
		if err == nil {
			err = rebound.Errorf(rebound.EINTERNAL, "test failover of %s reports no disks", machine)
		}
		return nil, none, err
	}
	return uris(m.TestFailover.Disks), cleanup, nil
}
