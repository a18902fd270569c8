package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	ggrpc "google.golang.org/grpc"

	"github.com/rebound-dr/rebound"
	rgrpc "github.com/rebound-dr/rebound/grpc"
	"github.com/rebound-dr/rebound/internal/fsutil"
	"github.com/rebound-dr/rebound/pki"
	"github.com/rebound-dr/rebound/qemu"
	"github.com/rebound-dr/rebound/site"
)

func init() { extraCommands = append(extraCommands, newSiteCommand) }

// SiteConfig configures a site appliance.
type SiteConfig struct {
	Name      string
	DataDir   string
	Server    string // the servers' gRPC addresses, comma-separated
	JoinToken string // needed only for the first start
	// JoinTokenFile holds the join token when JoinToken is empty (keeps
	// it off the command line and out of the environment).
	JoinTokenFile string
	NBDAddr       string
	NBDSocket     string
	ReplAddr      string
	NBDHost       string
	FreezeHook    string
	ThawHook      string
	SpoolLimit    int64
	// Capture is site.Config.Capture: direct (default) or spool.
	Capture     string
	ReportEvery time.Duration
	// JournalSegment is the journals' wal segment size (0: default).
	JournalSegment int64
	// Networks is the network mapping: logical network -> local NIC.
	Networks map[string]qemu.NICConfig
	// enrollRole is the certificate the site enrolls for: an agent's
	// (pki.RoleAgent) is bound to its machine, named like it.
	enrollRole pki.Role

	// NBDTLS is auto (default), on or off: see siteNBDTLS.
	NBDTLS string
}

// SiteMain runs one site: enrollment, NBD, replication and the control
// channel to the server. Tests run it in-process.
type SiteMain struct {
	Config SiteConfig
	Logger *slog.Logger

	Site     *site.Site
	NBDAddr  string
	ReplAddr string

	grpc   *ggrpc.Server
	cancel context.CancelFunc
	wg     sync.WaitGroup
	close  sync.Once
}

// Run enrolls if needed, opens the site and starts serving; it returns once
// listening.
func (m *SiteMain) Run(ctx context.Context) (err error) {
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
		return rebound.Errorf(rebound.EINVALID, "a site needs a name (--name)")
	}
	if _, err := nbdTLSMode(cfg.NBDTLS); err != nil {
		return err // before enrolment uses the token
	}
	addrs, err := serverAddrs(cfg.Server)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return err
	}
	certPEM, keyPEM, caPEM, err := m.credentials(ctx)
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
	nbdTLS, nbdRequire, nbdCreds, err := siteNBDTLS(cfg, certPEM, keyPEM, caPEM, rev)
	if err != nil {
		return err
	}

	m.Site = site.New(site.Config{
		Name: cfg.Name, DataDir: cfg.DataDir, PeerTLS: peerTLS, NBDHost: cfg.NBDHost,
		FreezeHook: cfg.FreezeHook, ThawHook: cfg.ThawHook, SpoolLimit: cfg.SpoolLimit, Capture: cfg.Capture,
		NBDSocket: cfg.NBDSocket, Networks: cfg.Networks, JournalSegment: cfg.JournalSegment,
		NBDTLS: nbdCreds,
		QEMU:   &qemu.Driver{Logger: m.Logger},
		Logger: m.Logger,
	})
	m.Site.NBD.TLSConfig, m.Site.NBD.RequireTLS = nbdTLS, nbdRequire
	if err := m.Site.Open(); err != nil {
		return fmt.Errorf("open site %s: %w", cfg.Name, err)
	}

	nl, err := net.Listen("tcp", cfg.NBDAddr)
	if err != nil {
		return fmt.Errorf("listen for NBD on %s: %w", cfg.NBDAddr, err)
	}
	m.NBDAddr = nl.Addr().String()
	var ul net.Listener
	if cfg.NBDSocket != "" {
		_ = os.Remove(cfg.NBDSocket)
		if ul, err = net.Listen("unix", cfg.NBDSocket); err != nil {
			nl.Close()
			return fmt.Errorf("listen for NBD on %s: %w", cfg.NBDSocket, err)
		}
	}
	rl, err := net.Listen("tcp", cfg.ReplAddr)
	if err != nil {
		nl.Close()
		return fmt.Errorf("listen for replication on %s: %w", cfg.ReplAddr, err)
	}
	m.ReplAddr = rl.Addr().String()
	m.Site.SetAddrs(m.NBDAddr, m.ReplAddr)
	// Tracks connections by peer: a revoked peer's open streams are cut.
	var creds *rgrpc.RevocableCreds
	m.grpc, creds = rgrpc.NewRevocableServer(serverTLS, m.Logger.With("site", cfg.Name, "port", "replication"), rev)
	m.Site.Repl.Register(m.grpc)

	rctx, cancel := context.WithCancel(context.Background())
	m.cancel = cancel
	serve := func(name string, fn func() error) {
		m.wg.Add(1)
		go func() {
			defer m.wg.Done()
			if err := fn(); err != nil && !errors.Is(err, net.ErrClosed) && !errors.Is(err, ggrpc.ErrServerStopped) && rctx.Err() == nil {
				m.Logger.Error(name+" stopped", "site", cfg.Name, "err", err)
			}
		}()
	}
	serve("nbd", func() error { return m.Site.NBD.Serve(nl) })
	if ul != nil {
		serve("nbd unix", func() error { return m.Site.NBD.Serve(ul) })
	}
	serve("replication", func() error { return m.grpc.Serve(rl) })
	// VMs reach their disks over NBD, which serves now.
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		m.Site.StartVMs(rctx)
	}()
	every := cfg.ReportEvery
	if every == 0 {
		every = 2 * time.Second
	}
	serve("control", func() error {
		err := rgrpc.RunControls(rctx, addrs, controlTLS, m.Site, every, rgrpc.WithEvents(m.Site.Events()), rgrpc.WithRevocations(func(list []string) {
			setRevoked(list)
			if n := creds.CloseRevoked(); n > 0 {
				m.Logger.Warn("closed replication connections of revoked certificates", "count", n)
			}
			if n := m.Site.NBD.CloseTLSPeers(rev.Revoked); n > 0 {
				m.Logger.Warn("closed NBD connections of revoked certificates", "count", n)
			}
		}))
		if errors.Is(err, context.Canceled) {
			return nil
		}
		return err
	})
	m.Logger.Info("site listening", "site", cfg.Name, "nbd", m.NBDAddr, "replication", m.ReplAddr, "server", cfg.Server)
	return nil
}

// serverAddrs splits --server-addr: one address, or several (the servers
// of one control plane) separated by commas.
func serverAddrs(s string) ([]string, error) {
	var out []string
	seen := map[string]bool{}
	for _, a := range strings.Split(s, ",") {
		a = strings.TrimSpace(a)
		if a == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(a); err != nil {
			return nil, rebound.Errorf(rebound.EINVALID, "--server-addr %q: %q is not HOST:PORT (give the servers' gRPC addresses, comma-separated, e.g. vault1:8441,vault2:8441)", s, a)
		}
		if !seen[a] {
			seen[a] = true
			out = append(out, a)
		}
	}
	if len(out) == 0 {
		return nil, rebound.Errorf(rebound.EINVALID, "no server address: pass --server-addr HOST:PORT (several: comma-separated)")
	}
	return out, nil
}

// siteTLS returns a site's TLS configs: its replication listener (peers
// must show a site certificate), dialing peers, and dialing the server.
func siteTLS(certPEM, keyPEM, caPEM []byte) (server, peer, control *tls.Config, err error) {
	if server, err = pki.ServerTLS(certPEM, keyPEM, caPEM, true); err != nil {
		return nil, nil, nil, err
	}
	if peer, err = pki.ClientTLS(certPEM, keyPEM, caPEM, ""); err != nil {
		return nil, nil, nil, err
	}
	if control, err = pki.ClientTLS(certPEM, keyPEM, caPEM, serverCertName); err != nil {
		return nil, nil, nil, err
	}
	return server, peer, control, nil
}

// siteRevocations returns the revocation list a site checks its peers
// against, as last pushed by the server (kept in tls/revoked.json so a
// restarted site refuses revoked peers before the server is back), and
// the function that takes a new push. Refusals are reported through the
// site that site returns once it is open. With several servers (merge),
// a push adds to the list instead of replacing it: a server that has not
// yet read a revocation another made must not lift it (the store's list
// only grows).
func siteRevocations(dataDir string, logger *slog.Logger, site func() *site.Site, merge bool) (*pki.Revocations, func([]string)) {
	path := filepath.Join(dataDir, "tls", "revoked.json")
	rev := &pki.Revocations{OnRefuse: func(peer pki.Identity, serial string) {
		if s := site(); s != nil {
			s.Refused(rgrpc.Refusal{Peer: peer, Reason: fmt.Sprintf("its certificate (serial %s) is revoked", serial)})
		}
	}}
	if b, err := os.ReadFile(path); err == nil {
		var list []string
		if err := json.Unmarshal(b, &list); err != nil {
			logger.Warn("revocation list unreadable; waiting for the server's", "path", path, "err", err)
		}
		rev.Set(list)
	}
	var mu sync.Mutex // pushes come from several channels
	set := func(list []string) {
		mu.Lock()
		defer mu.Unlock()
		if merge {
			list = append(rev.List(), list...)
		}
		rev.Set(list)
		b, _ := json.Marshal(rev.List())
		if err := fsutil.WriteFileAtomic(path, b, 0o600); err != nil {
			logger.Warn("keep revocation list", "path", path, "err", err)
		}
	}
	return rev, set
}

// credentials loads the site's certificate, enrolling first if it has none.
func (m *SiteMain) credentials(ctx context.Context) (certPEM, keyPEM, caPEM []byte, err error) {
	dir := filepath.Join(m.Config.DataDir, "tls")
	certPath, keyPath, caPath := filepath.Join(dir, "site.crt"), filepath.Join(dir, "site.key"), filepath.Join(dir, "ca.crt")
	if certPEM, err = os.ReadFile(certPath); err == nil {
		if keyPEM, err = os.ReadFile(keyPath); err != nil {
			return nil, nil, nil, err
		}
		if caPEM, err = os.ReadFile(caPath); err != nil {
			return nil, nil, nil, err
		}
		return certPEM, keyPEM, caPEM, nil
	}
	role := m.Config.enrollRole
	if role == "" {
		role = pki.RoleSite
	}
	tokenCmd := "rebound site token " + m.Config.Name
	if role == pki.RoleAgent {
		tokenCmd += " --agent"
	}
	joinToken := m.Config.JoinToken
	if joinToken == "" && m.Config.JoinTokenFile != "" {
		b, err := os.ReadFile(m.Config.JoinTokenFile)
		if err != nil {
			return nil, nil, nil, rebound.Errorf(rebound.EINVALID, "%s %s is not enrolled and its join token file cannot be read: %v; write the token from `%s` there", role, m.Config.Name, err, tokenCmd)
		}
		if joinToken = strings.TrimSpace(string(b)); joinToken == "" {
			return nil, nil, nil, rebound.Errorf(rebound.EINVALID, "join token file %s is empty; write the token from `%s` there", m.Config.JoinTokenFile, tokenCmd)
		}
	}
	if joinToken == "" {
		return nil, nil, nil, rebound.Errorf(rebound.EINVALID, "%s %s is not enrolled: pass a one-time token from `%s` with --token-file FILE, REBOUND_JOIN_TOKEN or --token", role, m.Config.Name, tokenCmd)
	}
	ectx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	addrs, err := serverAddrs(m.Config.Server)
	if err != nil {
		return nil, nil, nil, err
	}
	certPEM, keyPEM, caPEM, err = rgrpc.EnrollAny(ectx, addrs, joinToken, m.Config.Name, role)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("enroll site %s with %s: %w", m.Config.Name, m.Config.Server, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, nil, err
	}
	for _, f := range []struct {
		path string
		b    []byte
	}{{keyPath, keyPEM}, {caPath, caPEM}, {certPath, certPEM}} {
		if err := os.WriteFile(f.path, f.b, 0o600); err != nil {
			return nil, nil, nil, err
		}
	}
	m.Logger.Info("site enrolled", "site", m.Config.Name)
	return certPEM, keyPEM, caPEM, nil
}

// Close stops serving and closes the site.
func (m *SiteMain) Close() error {
	var err error
	m.close.Do(func() {
		if m.cancel != nil {
			m.cancel()
		}
		if m.grpc != nil {
			m.grpc.Stop()
		}
		if m.Site != nil {
			m.Site.NBD.Close()
		}
		m.wg.Wait()
		if m.Site != nil {
			err = m.Site.Close()
		}
	})
	return err
}

func newSiteCommand(c *CLI) *cobra.Command {
	cfg := SiteConfig{}
	var spool string
	var networks map[string]string
	cmd := &cobra.Command{
		Use:   "site",
		Short: "Run a site appliance, or manage sites",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := loadDaemonConfig(cmd, "site"); err != nil {
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
			if err := checkCapture(cfg.Capture); err != nil {
				return err
			}
			if cfg.Networks, err = parseNetworks(networks); err != nil {
				return err
			}
			if cfg.DataDir == "" {
				cfg.DataDir = filepath.Join("rebound-data", "sites", cfg.Name)
			}
			if cfg.NBDSocket == "" {
				cfg.NBDSocket = filepath.Join(cfg.DataDir, "nbd.sock")
			}
			ctx, stop := signalContext(cmd.Context())
			defer stop()
			m := &SiteMain{Config: cfg, Logger: newLogger(c.Stderr)}
			if err := m.Run(ctx); err != nil {
				return err
			}
			defer m.Close()
			<-ctx.Done()
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.Name, "name", "", "site name (runs the appliance)")
	f.StringVar(&cfg.DataDir, "data", "", "data directory (default ./rebound-data/sites/NAME)")
	f.StringVar(&cfg.Server, "server-addr", "127.0.0.1:8441", "the servers' addresses for sites, comma-separated (a control channel to each; enrolment with the first that answers)")
	f.StringVar(&cfg.JoinToken, "token", os.Getenv("REBOUND_JOIN_TOKEN"), "one-time enrollment token (first start only; default $REBOUND_JOIN_TOKEN; --token-file keeps it out of ps)")
	f.StringVar(&cfg.JoinTokenFile, "token-file", "", "read the one-time enrollment token from FILE (first start only)")
	f.StringVar(&cfg.NBDAddr, "nbd-addr", "127.0.0.1:10809", "NBD listen address")
	f.StringVar(&cfg.NBDSocket, "nbd-socket", "", "NBD unix socket (default DATA/nbd.sock)")
	f.StringVar(&cfg.ReplAddr, "repl-addr", "127.0.0.1:8451", "replication listen address (peer sites connect here)")
	f.StringVar(&cfg.NBDHost, "nbd-host", "", "host written into NBD URIs (default: the listen address)")
	f.StringVar(&cfg.NBDTLS, "nbd-tls", nbdTLSAuto, "NBD over TLS: auto (required off loopback, URIs nbds://), on (required on every TCP connection) or off (plain NBD)")
	f.StringVar(&cfg.FreezeHook, "freeze-hook", "", "script run before an app-consistent point (argument: machine name)")
	f.StringVar(&cfg.ThawHook, "thaw-hook", "", "script run after an app-consistent point, always")
	f.StringVar(&spool, "spool-limit", "1GiB", "local spool bound per machine before only a dirty-region map is kept")
	f.StringVar(&cfg.Capture, "capture", site.CaptureDirect, "how a source keeps what the peer has not acked: direct (in memory, the spool only when the peer falls behind) or spool (every write appended to the spool first)")
	f.StringToStringVar(&networks, "network", nil, "network mapping LOGICAL=user|tap:IFNAME|bridge:BRIDGE for VM NICs (repeatable)")
	addConfigFlag(cmd, "site")
	return cmd
}

// tokenSource settles where a daemon's join token comes from: --token on
// the command line and --token-file together are refused; a token file
// wins over REBOUND_JOIN_TOKEN (the --token default), which is cleared.
func tokenSource(cmd *cobra.Command, token *string, file string) error {
	if file == "" {
		return nil
	}
	if cmd.Flags().Changed("token") && *token != "" {
		return usagef("give the join token with --token or --token-file, not both")
	}
	*token = ""
	return nil
}

// signalContext is cancelled on SIGINT or SIGTERM.
func signalContext(parent context.Context) (context.Context, context.CancelFunc) {
	if parent == nil {
		parent = context.Background()
	}
	return signal.NotifyContext(parent, os.Interrupt, syscall.SIGTERM)
}

func newLogger(w interface{ Write([]byte) (int, error) }) *slog.Logger {
	level := slog.LevelInfo
	if os.Getenv("REBOUND_DEBUG") != "" {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
}

// parseNetworks reads a site's network mapping: LOGICAL=user, tap:IFNAME
// or bridge:BRIDGE.
func parseNetworks(in map[string]string) (map[string]qemu.NICConfig, error) {
	out := map[string]qemu.NICConfig{}
	for name, v := range in {
		mode, arg, _ := strings.Cut(v, ":")
		switch {
		case mode == qemu.NICUser && arg == "":
			out[name] = qemu.NICConfig{Mode: qemu.NICUser}
		case mode == qemu.NICTap && arg != "":
			out[name] = qemu.NICConfig{Mode: qemu.NICTap, Ifname: arg}
		case mode == qemu.NICBridge && arg != "":
			out[name] = qemu.NICConfig{Mode: qemu.NICBridge, Bridge: arg}
		default:
			return nil, rebound.Errorf(rebound.EINVALID, "--network %s=%s: use user, tap:IFNAME or bridge:BRIDGE", name, v)
		}
	}
	return out, nil
}

// checkCapture refuses a --capture value other than the two modes.
func checkCapture(mode string) error {
	switch mode {
	case "", site.CaptureDirect, site.CaptureSpool:
		return nil
	}
	return usagef("--capture %q: use direct (the default) or spool", mode)
}
