package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/nbd"
	"github.com/rebound-dr/rebound/site"
	"github.com/rebound-dr/rebound/workload"
)

func init() { extraCommands = append(extraCommands, newUpCommand) }

// UpConfig configures `rebound up`: a server and two sites in one process.
type UpConfig struct {
	DataDir  string
	APIAddr  string
	GRPCAddr string
	// MetricsAddr is the server's ServerConfig.MetricsAddr.
	MetricsAddr string
	// DB is the server's ServerConfig.DB: "" for SQLite.
	DB string
	// Sites maps a site name to its NBD and replication addresses.
	Sites      []UpSite
	SpoolLimit int64
	// Capture is every site's SiteConfig.Capture.
	Capture string
	// FreezeHook and ThawHook are given to every site (app-consistent points).
	FreezeHook, ThawHook string
	// WriteConfig writes the CLI's connection settings.
	WriteConfig bool
}

// UpSite is one site of `up`.
type UpSite struct {
	Name, NBDAddr, ReplAddr string
	NBDTLS                  string // --nbd-tls; empty: auto
}

// DefaultUpConfig is what `rebound up` runs on.
func DefaultUpConfig() UpConfig {
	return UpConfig{
		DataDir: "./rebound-data", APIAddr: "127.0.0.1:8440", GRPCAddr: "127.0.0.1:8441",
		Sites: []UpSite{
			{Name: "primary", NBDAddr: "127.0.0.1:10809", ReplAddr: "127.0.0.1:8451"},
			{Name: "recovery", NBDAddr: "127.0.0.1:10810", ReplAddr: "127.0.0.1:8452"},
		},
		WriteConfig: true,
	}
}

// UpMain runs the server and the sites in one process.
type UpMain struct {
	Config UpConfig
	Logger *slog.Logger

	Server     *ServerMain
	Sites      map[string]*SiteMain
	AdminToken string
	// AdminPassword is the console password of user "admin": generated
	// when the user had none, or the one in the CLI config that still
	// works; "" when someone set another (up leaves it alone).
	AdminPassword string
	ConfigPath    string
}

// Run starts the server and the sites, and waits until every site has
// connected and reported.
func (m *UpMain) Run(ctx context.Context) (err error) {
	if m.Logger == nil {
		m.Logger = slog.Default()
	}
	defer func() {
		if err != nil {
			m.Close()
		}
	}()
	cfg := m.Config
	m.Server = &ServerMain{Logger: m.Logger, Config: ServerConfig{
		DataDir: filepath.Join(cfg.DataDir, "server"), APIAddr: cfg.APIAddr, GRPCAddr: cfg.GRPCAddr,
		MetricsAddr: cfg.MetricsAddr, DB: cfg.DB,
	}}
	if err := m.Server.Run(ctx); err != nil {
		return err
	}
	tokenPath := filepath.Join(cfg.DataDir, "server", "admin-token")
	if err := ensureAdminToken(ctx, m.Server.DB, tokenPath); err != nil {
		return err
	}
	b, err := os.ReadFile(tokenPath)
	if err != nil {
		return err
	}
	m.AdminToken = string(trimSpace(b))
	var known string
	if cfg.WriteConfig {
		if old, err := readClientConfigFile(); err == nil {
			known = old.ConsolePassword
		}
	}
	if m.AdminPassword, err = ensureAdminPassword(ctx, m.Server.DB, known); err != nil {
		return err
	}

	m.Sites = map[string]*SiteMain{}
	for _, s := range cfg.Sites {
		dir := filepath.Join(cfg.DataDir, "sites", s.Name)
		sc := SiteConfig{
			Name: s.Name, DataDir: dir, Server: m.Server.GRPCAddr, NBDAddr: s.NBDAddr,
			NBDSocket: filepath.Join(dir, "nbd.sock"), ReplAddr: s.ReplAddr, SpoolLimit: cfg.SpoolLimit, Capture: cfg.Capture,
			FreezeHook: cfg.FreezeHook, ThawHook: cfg.ThawHook, NBDTLS: s.NBDTLS,
		}
		if _, err := os.Stat(filepath.Join(dir, "tls", "site.crt")); err != nil {
			if sc.JoinToken, err = m.Server.JoinToken(ctx, s.Name); err != nil {
				return err
			}
		}
		sm := &SiteMain{Config: sc, Logger: m.Logger}
		m.Sites[s.Name] = sm
		if err := sm.Run(ctx); err != nil {
			return err
		}
	}
	if err := m.waitSites(ctx); err != nil {
		return err
	}
	if cfg.WriteConfig {
		cc := ClientConfig{Server: m.Server.APIURL, Token: m.AdminToken, CAPEM: m.Server.CA.CertPEM()}
		if m.AdminPassword != "" {
			cc.ConsoleUser, cc.ConsolePassword = adminUser, m.AdminPassword
		}
		m.ConfigPath, err = WriteClientConfig(cc)
		if err != nil {
			return fmt.Errorf("write CLI config: %w", err)
		}
	}
	return nil
}

// consoleLogin says how to log in to the console, never with the
// password itself: it is in the CLI config file (0600).
func (m *UpMain) consoleLogin() string {
	if m.AdminPassword != "" && m.ConfigPath != "" {
		return "user " + adminUser + ", password in " + m.ConfigPath
	}
	return "user " + adminUser + ", password set earlier; set a new one with: rebound user passwd " + adminUser
}

// waitSites waits until every site is connected and has reported its
// addresses.
func (m *UpMain) waitSites(ctx context.Context) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		ready := true
		for name := range m.Sites {
			s, err := m.Server.DB.GetSite(ctx, name)
			if _, ok := m.Server.Control.Site(name); !ok || err != nil || s.ReplAddr == "" || s.Status != rebound.SiteOnline {
				ready = false
			}
		}
		if ready {
			return nil
		}
		if time.Now().After(deadline) {
			return rebound.Errorf(rebound.EUNAVAILABLE, "sites did not connect to the server within 30s")
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Close stops the sites, then the server. The sites' VMs go too: nothing
// would re-attach to them.
func (m *UpMain) Close() error {
	var errs []error
	for _, s := range m.Sites {
		if s.Site != nil {
			s.Site.KillVMs()
		}
		errs = append(errs, s.Close())
	}
	if m.Server != nil {
		errs = append(errs, m.Server.Close())
	}
	return errors.Join(errs...)
}

func newUpCommand(c *CLI) *cobra.Command {
	cfg := DefaultUpConfig()
	var demo bool
	var spool string
	cmd := &cobra.Command{
		Use:   "up",
		Short: "Run a server and two sites, primary and recovery, in one process on embedded defaults",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			n, err := ParseSize(spool)
			if err != nil {
				return err
			}
			cfg.SpoolLimit = n
			if err := checkCapture(cfg.Capture); err != nil {
				return err
			}
			ctx, stop := signalContext(cmd.Context())
			defer stop()
			logf, err := openUpLog(cfg.DataDir)
			if err != nil {
				return err
			}
			defer logf.Close()
			m := &UpMain{Config: cfg, Logger: newLogger(&spillWriter{f: logf, spill: c.Stderr})}
			if err := m.Run(ctx); err != nil {
				return err
			}
			defer m.Close()
			out := c.Stdout
			fmt.Fprintf(out, "Rebound is up.\n  API:      %s\n  console:  %s/ (%s)\n  sites:    primary (NBD %s), recovery (NBD %s)\n  data:     %s\n  log:      %s\n  CLI config written to %s\n\n",
				m.Server.APIURL, m.Server.APIURL, m.consoleLogin(), m.Sites["primary"].NBDAddr, m.Sites["recovery"].NBDAddr, cfg.DataDir, logf.Name(), m.ConfigPath)
			if demo {
				if err := c.runDemo(ctx, m); err != nil && ctx.Err() == nil {
					return err
				}
			} else {
				fmt.Fprintf(out, "Try: rebound machine create vm1 --site primary --disk 1G && rebound protect vm1 --to recovery --wait\n")
				<-ctx.Done()
			}
			fmt.Fprintln(out, "\nshutting down")
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.DataDir, "data", cfg.DataDir, "data directory")
	f.BoolVar(&demo, "demo", false, "create a demo machine with a steady workload and protect it to recovery")
	f.StringVar(&cfg.APIAddr, "api-addr", cfg.APIAddr, "HTTPS REST API listen address")
	f.StringVar(&cfg.GRPCAddr, "grpc-addr", cfg.GRPCAddr, "listen address for sites")
	f.StringVar(&cfg.MetricsAddr, "metrics-addr", "", "also serve /metrics over plain HTTP without authentication at this address, for Prometheus")
	f.StringVar(&spool, "spool-limit", "1GiB", "spool bound per machine")
	f.StringVar(&cfg.Capture, "capture", site.CaptureDirect, "the sites' capture mode: direct (the spool only when the peer falls behind) or spool (every write spooled first)")
	f.StringVar(&cfg.DB, "db", os.Getenv("REBOUND_DB"), "the server's store: a PostgreSQL address (postgres://USER@HOST/DB; default $REBOUND_DB); default SQLite in --data")
	f.StringVar(&cfg.Sites[0].NBDAddr, "primary-nbd-addr", cfg.Sites[0].NBDAddr, "primary site's NBD listen address")
	f.StringVar(&cfg.Sites[0].ReplAddr, "primary-repl-addr", cfg.Sites[0].ReplAddr, "primary site's replication listen address")
	f.StringVar(&cfg.Sites[1].NBDAddr, "recovery-nbd-addr", cfg.Sites[1].NBDAddr, "recovery site's NBD listen address")
	f.StringVar(&cfg.Sites[1].ReplAddr, "recovery-repl-addr", cfg.Sites[1].ReplAddr, "recovery site's replication listen address")
	return cmd
}

func openUpLog(dir string) (*os.File, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	return os.OpenFile(filepath.Join(dir, "rebound.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
}

// spillWriter writes the log to its file and, while the file cannot be
// written (its disk is full, often the data disk of the server up runs),
// to spill (the terminal) instead. Once the file takes writes again, its
// next line says how many lines went to spill meanwhile.
type spillWriter struct {
	mu      sync.Mutex
	f       io.Writer
	spill   io.Writer
	spilled int   // lines written to spill since the file last took one
	err     error // why the file refused the first of them
}

func (w *spillWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	line := p
	if w.spilled > 0 {
		// One write with the line: a note alone may fit where the line
		// does not. The leading newline ends a line the disk cut short.
		line = fmt.Appendf(nil, "\ntime=%s level=WARN msg=\"this log could not be written: lines went to stderr\" lines=%d err=%q\n%s",
			time.Now().Format(time.RFC3339Nano), w.spilled, w.err.Error(), p)
	}
	_, err := w.f.Write(line)
	if err == nil {
		w.spilled, w.err = 0, nil
		return len(p), nil
	}
	if w.spilled == 0 {
		w.err = err
	}
	w.spilled++
	w.spill.Write(p)
	return len(p), nil
}

// DemoMachine is the machine `up --demo` creates.
const DemoMachine = "demo"

// runDemo creates and protects the demo machine, keeps a workload writing
// to it, and shows replication progress and lag until ctx is done.
func (c *CLI) runDemo(ctx context.Context, m *UpMain) error {
	svc := m.Server.Service
	out := c.Stdout
	mach, err := svc.GetMachine(ctx, DemoMachine)
	if rebound.ErrorCode(err) == rebound.ENOTFOUND {
		fmt.Fprintf(out, "creating machine %q at primary with one 1 GiB disk\n", DemoMachine)
		mach, err = svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: DemoMachine, Site: "primary", Disks: []int64{1 << 30}})
	}
	if err != nil {
		return err
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if mach.ActiveSite == "primary" && len(mach.Disks) > 0 && mach.State != rebound.MachineFailedOver {
		wg.Add(1)
		go func() {
			defer wg.Done()
			demoWorkload(wctx, mach.Disks[0].NBD, m.Logger)
		}()
		fmt.Fprintf(out, "workload: writing about 1 MB/s of random 4-64 KiB writes to %s\n", mach.Disks[0].NBD)
	}
	if mach.State == rebound.MachineUnprotected && mach.ActiveSite == "primary" {
		fmt.Fprintln(out, "protecting demo to recovery: initial replication")
		job, err := svc.Protect(ctx, rebound.ProtectRequest{Machine: DemoMachine, To: "recovery"})
		if err != nil {
			return err
		}
		if _, err := c.WaitJob(ctx, svc, job); err != nil {
			return err
		}
	}
	fmt.Fprintf(out, `
The demo machine is protected. In another terminal:
  rebound machine show demo
  rebound points demo
  rebound test-failover demo --point latest-processed --wait
  rebound failover demo --point latest --wait
  rebound failover change-point demo --point <ID or RFC 3339 time> --wait
  rebound commit demo --wait

Replication status every 10 s (Ctrl-C stops):
`)
	t := time.NewTicker(10 * time.Second)
	defer t.Stop()
	for {
		if mach, err := svc.GetMachine(ctx, DemoMachine); err == nil {
			line := fmt.Sprintf("%s  %s  state=%s health=%s", time.Now().Format("15:04:05"), mach.Name, mach.State, mach.Health)
			if p := mach.Protection; p != nil {
				line += fmt.Sprintf(" repl=%s lag=%.1fs backlog=%s throughput=%s/s", p.ReplState, p.LagSeconds, formatSize(p.BacklogBytes), formatSize(int64(p.ThroughputBps)))
				if !p.LastPointTime.IsZero() {
					line += fmt.Sprintf(" last-point=%s ago", time.Since(p.LastPointTime).Round(time.Second))
				}
			}
			fmt.Fprintln(out, line)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// demoWorkload writes to the demo disk, reconnecting while the export is
// away (failover, fencing).
func demoWorkload(ctx context.Context, uri string, logger *slog.Logger) {
	for ctx.Err() == nil {
		cl, err := nbd.Dial(ctx, uri)
		if err == nil {
			_, err = workload.Run(ctx, cl, workload.Options{Seed: time.Now().UnixNano(), MinLen: 4 << 10, MaxLen: 64 << 10, Align: 4096, Compressible: true}, 1<<20)
			cl.Close()
		}
		if err != nil && ctx.Err() == nil {
			logger.Info("demo workload paused", "err", err)
		}
		select {
		case <-ctx.Done():
		case <-time.After(2 * time.Second):
		}
	}
}
