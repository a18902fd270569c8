package main

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	nethttp "net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	ggrpc "google.golang.org/grpc"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/console"
	rgrpc "github.com/rebound-dr/rebound/grpc"
	rhttp "github.com/rebound-dr/rebound/http"
	"github.com/rebound-dr/rebound/internal/lograte"
	"github.com/rebound-dr/rebound/internal/secret"
	"github.com/rebound-dr/rebound/pki"
	"github.com/rebound-dr/rebound/postgres"
	"github.com/rebound-dr/rebound/server"
	"github.com/rebound-dr/rebound/sqlite"
)

func init() { extraCommands = append(extraCommands, newServerCommand) }

// ServerConfig configures the control plane.
type ServerConfig struct {
	DataDir  string
	APIAddr  string // HTTPS REST API
	GRPCAddr string // enrollment and control channel for sites
	// Hosts are extra names and IPs the server certificate covers.
	Hosts []string
	// MetricsAddr, when set, serves /metrics over plain HTTP without
	// authentication, for a Prometheus that cannot send a bearer token.
	// The API serves /metrics with a token either way.
	MetricsAddr string
	// API connection timeouts; zero takes DefaultAPITimeouts.
	APITimeouts APITimeouts
	// DB is the store: "" for SQLite in DataDir, or a PostgreSQL address
	// (postgres://USER@HOST/DB) that several servers share.
	DB string
	// CADir holds the CA (ca.crt, ca.key); "" is DataDir/ca. The servers
	// of one control plane share it: a copy of the first server's.
	CADir string
	// ServerID names this server in job leases; Run sets "" to
	// newServerID's, which the Config keeps for a restart in the process.
	ServerID string
}

// newServerID is the default server ID: the host name and a random
// suffix. Each process (and each ServerMain in one) is another server,
// whose jobs others take over when their leases expire; a ServerMain
// started again with the same Config (an in-process restart) keeps its ID
// and takes its own jobs back at once.
func newServerID() string {
	host, _ := os.Hostname()
	if host == "" {
		host = "server"
	}
	var b [3]byte
	_, _ = rand.Read(b[:])
	return host + "-" + hex.EncodeToString(b[:])
}

// openStore opens the store dsn names: SQLite in dataDir for "", else
// PostgreSQL.
func openStore(ctx context.Context, dataDir, dsn string) (rebound.Store, error) {
	switch {
	case dsn == "":
		return sqlite.Open(filepath.Join(dataDir, "rebound.db"))
	case strings.HasPrefix(dsn, "postgres://"), strings.HasPrefix(dsn, "postgresql://"):
		return postgres.Open(ctx, dsn)
	}
	return nil, rebound.Errorf(rebound.EINVALID, "--db %q: give a PostgreSQL address (postgres://USER@HOST/DB), or leave it out for SQLite in the data directory", dsn)
}

// APITimeouts bound how long the API waits on a client, authenticated or
// not, so that idle and slow connections are closed.
type APITimeouts struct {
	ReadHeader time.Duration // TLS handshake and request headers
	Read       time.Duration // a whole request, body included
	Idle       time.Duration // between requests on a keep-alive connection
}

// DefaultAPITimeouts are the API's timeouts.
var DefaultAPITimeouts = APITimeouts{ReadHeader: 10 * time.Second, Read: time.Minute, Idle: 2 * time.Minute}

func (t APITimeouts) orDefault() APITimeouts {
	d := DefaultAPITimeouts
	if t.ReadHeader > 0 {
		d.ReadHeader = t.ReadHeader
	}
	if t.Read > 0 {
		d.Read = t.Read
	}
	if t.Idle > 0 {
		d.Idle = t.Idle
	}
	return d
}

// ServerMain runs the control plane: store, CA, job engine, REST API and
// the sites' control channel. Tests run it in-process.
type ServerMain struct {
	Config ServerConfig
	Logger *slog.Logger

	DB       rebound.Store
	CA       *pki.CA
	Service  *server.Server
	Control  *rgrpc.ControlServer
	Console  *console.Console // the web console at APIURL
	APIURL   string           // https://host:port after Run
	GRPCAddr string           // host:port after Run
	// MetricsURL is http://host:port/metrics after Run when
	// Config.MetricsAddr is set.
	MetricsURL string

	http    *nethttp.Server
	metrics *nethttp.Server
	grpc    *ggrpc.Server
	wg      sync.WaitGroup
	close   sync.Once
	// stopFollow ends followRevocations (several servers on one store).
	stopFollow context.CancelFunc
}

// Run opens everything and starts serving; it returns once listening.
func (m *ServerMain) Run(ctx context.Context) (err error) {
	if m.Logger == nil {
		m.Logger = slog.Default()
	}
	defer func() {
		if err != nil {
			m.Close()
		}
	}()
	cfg := m.Config
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return err
	}
	if m.DB, err = openStore(ctx, cfg.DataDir, cfg.DB); err != nil {
		return fmt.Errorf("open database: %w", err)
	}
	caDir := cfg.CADir
	if caDir == "" {
		caDir = filepath.Join(cfg.DataDir, "ca")
	}
	if m.CA, err = pki.LoadOrCreateCA(caDir); err != nil {
		return fmt.Errorf("load CA from %s: %w", caDir, err)
	}
	if cfg.DB != "" {
		m.checkSharedCA(ctx, caDir)
	}
	hosts := append([]string{"127.0.0.1", "::1", "localhost"}, cfg.Hosts...)
	for _, a := range []string{cfg.APIAddr, cfg.GRPCAddr} {
		if h, _, err := net.SplitHostPort(a); err == nil && h != "" {
			hosts = append(hosts, h)
		}
	}
	certPEM, keyPEM, err := m.CA.Issue(serverCertName, hosts, pki.ServerAuth)
	if err != nil {
		return err
	}
	tlsConf, err := pki.ServerTLS(certPEM, keyPEM, m.CA.CertPEM(), false)
	if err != nil {
		return err
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m.Control = &rgrpc.ControlServer{}
	if m.Config.ServerID == "" {
		m.Config.ServerID = newServerID()
	}
	m.Service = &server.Server{DB: m.DB, Site: m.Control.Site, Logger: m.Logger, CAFingerprint: m.CA.Fingerprint(), ID: m.Config.ServerID}
	m.Control.OnReport = m.Service.SiteReport
	m.Control.OnConnect = m.Service.SiteConnected // runs its work in a goroutine the server owns
	m.Control.OnDisconnect = m.Service.SiteDisconnected
	m.Control.OnEvent = m.Service.SiteEvent
	m.Control.StoreEvent = m.Service.StoreSiteEvent
	// Removed and rotated certificates: refused at the handshake, their
	// channels closed, the list pushed to every site (docs/design/security.md).
	m.Service.Revocations = &pki.Revocations{OnRefuse: m.Service.RevokedRefused}
	m.Service.Revocations.Apply(tlsConf)
	m.Service.PushRevocations = m.Control.PushRevocations
	m.Control.Admit = m.Service.AdmitSite
	m.Control.Revocations = m.Service.RevocationList
	if cfg.DB != "" {
		// Another server may have revoked a certificate: a channel opening
		// here is judged on the store's list, not on this server's copy.
		m.Control.Admit = func(site string, cert *x509.Certificate) (bool, error) {
			rctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			m.reloadRevocations(rctx)
			cancel()
			return m.Service.AdmitSite(site, cert)
		}
	}
	if err := m.Service.Open(reg); err != nil {
		return err
	}

	gl, err := net.Listen("tcp", cfg.GRPCAddr)
	if err != nil {
		return fmt.Errorf("listen for sites on %s: %w", cfg.GRPCAddr, err)
	}
	m.GRPCAddr = gl.Addr().String()
	m.grpc = rgrpc.NewServer(tlsConf, m.Logger.With("port", "control"))
	m.Control.Register(m.grpc)
	(&rgrpc.EnrollServer{CA: m.CA, Validate: m.Service.Enroll}).Register(m.grpc)

	al, err := net.Listen("tcp", cfg.APIAddr)
	if err != nil {
		gl.Close()
		return fmt.Errorf("listen for the API on %s: %w", cfg.APIAddr, err)
	}
	m.APIURL = "https://" + al.Addr().String()
	metrics := promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
	api := &rhttp.Server{
		Service: m.Service,
		// A token carries its user's role, read at every call; roles are
		// enforced and mutating calls audited by the API itself.
		Authenticate: m.DB.CheckToken,
		Users:        m.DB,
		Audit:        m.DB,
		Logger:       m.Logger,
		Metrics:      metrics,
		Loop:         m.Service,
		Plans:        m.Service,
		Power:        m.Service,
		Catalog:      m.Service,
		Groups:       m.Service,
		Healthy:      m.Service.StoreError,
	}
	// Timeouts close slow and idle connections, authenticated or not;
	// failed TLS handshakes are logged at a bounded rate.
	to := cfg.APITimeouts.orDefault()
	// The console calls the API handler, which serves the console: make
	// both, then close the loop (docs/console.md).
	m.Console = &console.Console{Users: m.DB, Audit: m.DB, Logger: m.Logger}
	api.Console = m.Console.Handler()
	m.Console.API = api.Handler()
	m.http = &nethttp.Server{Handler: m.Console.API, TLSConfig: tlsConf.Clone(),
		ReadHeaderTimeout: to.ReadHeader, ReadTimeout: to.Read, IdleTimeout: to.Idle,
		ErrorLog: log.New(lograte.Writer{Limiter: &lograte.Limiter{}, Logger: m.Logger, Msg: "api connection error"}, "", 0)}
	m.http.TLSConfig.ClientAuth = 0            // the API authenticates with bearer tokens
	m.http.RegisterOnShutdown(m.Console.Close) // its live streams end, so Shutdown need not wait for them

	var ml net.Listener
	if cfg.MetricsAddr != "" {
		if ml, err = net.Listen("tcp", cfg.MetricsAddr); err != nil {
			gl.Close()
			al.Close()
			return fmt.Errorf("listen for metrics on %s: %w", cfg.MetricsAddr, err)
		}
		m.MetricsURL = "http://" + ml.Addr().String() + "/metrics"
		mux := nethttp.NewServeMux()
		mux.Handle("GET /metrics", metrics)
		m.metrics = &nethttp.Server{Handler: mux,
			ReadHeaderTimeout: to.ReadHeader, ReadTimeout: to.Read, IdleTimeout: to.Idle,
			ErrorLog: log.New(lograte.Writer{Limiter: &lograte.Limiter{}, Logger: m.Logger, Msg: "metrics connection error"}, "", 0)}
		m.wg.Add(1)
		go func() {
			defer m.wg.Done()
			if err := m.metrics.Serve(ml); err != nil && !errors.Is(err, nethttp.ErrServerClosed) {
				m.Logger.Error("metrics server", "err", err)
			}
		}()
	}

	if cfg.DB != "" {
		fctx, stop := context.WithCancel(context.Background())
		m.stopFollow = stop
		m.wg.Add(1)
		go func() {
			defer m.wg.Done()
			m.followRevocations(fctx)
		}()
	}
	m.wg.Add(2)
	go func() {
		defer m.wg.Done()
		if err := m.grpc.Serve(gl); err != nil && !errors.Is(err, ggrpc.ErrServerStopped) {
			m.Logger.Error("grpc server", "err", err)
		}
	}()
	go func() {
		defer m.wg.Done()
		if err := m.http.ServeTLS(al, "", ""); err != nil && !errors.Is(err, nethttp.ErrServerClosed) {
			m.Logger.Error("api server", "err", err)
		}
	}()
	m.Logger.Info("server listening", "api", m.APIURL, "sites", m.GRPCAddr, "data", cfg.DataDir)
	if m.MetricsURL != "" {
		m.Logger.Warn("serving /metrics without authentication", "url", m.MetricsURL)
	}
	return nil
}

// caSetting records in a shared store the fingerprint of the CA its
// servers use.
const caSetting = "ca-fingerprint"

// checkSharedCA records this server's CA in a shared store, or warns when
// the store names another: sites and the CLI trust one CA, so a server
// started with a CA of its own cannot serve them. A warning, not a refusal:
// the server still answers the API for clients given its CA.
func (m *ServerMain) checkSharedCA(ctx context.Context, caDir string) {
	mine := m.CA.Fingerprint()
	theirs, ok, err := m.DB.GetSetting(ctx, caSetting)
	if err == nil && !ok {
		if err = m.DB.PutSetting(ctx, caSetting, mine); err == nil {
			theirs, ok, err = m.DB.GetSetting(ctx, caSetting) // a server started at the same time may have won
		}
	}
	switch {
	case err != nil:
		m.Logger.Warn("cannot compare this server's CA with the other servers'", "err", err)
	case ok && theirs != mine:
		m.Logger.Error(fmt.Sprintf("this server's CA (%s, fingerprint %s) is not the one the servers of this database use (fingerprint %s): sites will refuse its handshake and the CLI its certificate. "+
			"Stop it, copy the first server's ca directory (DATA/ca) to this host and start it with --ca-dir DIR", caDir, mine, theirs))
	}
}

// revocationsEvery is how often a server on a shared store reloads the
// revocation list; a var for tests.
var revocationsEvery = 5 * time.Second

// followRevocations keeps this server's revocation list up to date with a
// shared store: a site removed or rotated through another server is then
// refused here too, its channels to this server close, and the sites get
// the new list from this server as well.
func (m *ServerMain) followRevocations(ctx context.Context) {
	t := time.NewTicker(revocationsEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		list, changed := m.reloadRevocations(ctx)
		if !changed {
			continue
		}
		pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		if err := m.Control.PushRevocations(pctx, list); err != nil {
			m.Logger.Warn("revocation list from the store not delivered to every site; they get it when they reconnect", "err", err)
		}
		cancel()
	}
}

// reloadRevocations takes the store's revocation list, and reports
// whether it differs from the one the server held. A store error keeps
// the old list (the store's health is reported elsewhere).
func (m *ServerMain) reloadRevocations(ctx context.Context) ([]string, bool) {
	list, err := m.DB.RevokedSerials(ctx)
	if err != nil {
		return nil, false
	}
	old := m.Service.Revocations.List()
	list = slices.Clone(list)
	slices.Sort(list)
	slices.Sort(old)
	if slices.Equal(list, old) {
		return list, false
	}
	m.Service.Revocations.Set(list)
	return list, true
}

// serverCertName is the name sites verify the server's certificate for.
const serverCertName = "rebound-server"

// JoinToken creates a one-time enrollment token for a site.
func (m *ServerMain) JoinToken(ctx context.Context, site string) (string, error) {
	return m.Service.CreateEnrollToken(ctx, site)
}

// JoinTokenAs creates a one-time enrollment token for a site or an agent.
func (m *ServerMain) JoinTokenAs(ctx context.Context, name string, role pki.Role, rotate bool) (string, error) {
	return m.Service.CreateJoinToken(ctx, name, rebound.JoinTokenRequest{Agent: role == pki.RoleAgent, Rotate: rotate})
}

// Close stops serving and closes the store.
func (m *ServerMain) Close() error {
	var errs []error
	m.close.Do(func() {
		if m.http != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			errs = append(errs, m.http.Shutdown(ctx))
			cancel()
		}
		if m.metrics != nil {
			errs = append(errs, m.metrics.Close())
		}
		if m.grpc != nil {
			m.grpc.Stop()
		}
		if m.stopFollow != nil {
			m.stopFollow()
		}
		m.wg.Wait()
		if m.Service != nil {
			errs = append(errs, m.Service.Close())
		}
		if m.DB != nil {
			errs = append(errs, m.DB.Close())
		}
	})
	return errors.Join(errs...)
}

func newServerCommand(c *CLI) *cobra.Command {
	cfg := ServerConfig{}
	var tokenFile string
	var checkDB bool
	cmd := &cobra.Command{
		Use:   "server",
		Short: "Run the control plane (the vault): REST API, job engine, site enrollment",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := loadDaemonConfig(cmd, "server"); err != nil {
				return err
			}
			ctx, stop := signalContext(cmd.Context())
			defer stop()
			if checkDB {
				st, err := checkStore(ctx, cfg)
				if err != nil {
					return err
				}
				return c.print(st, func(w io.Writer) {
					fmt.Fprintf(w, "store:            %s (%s)\nschema version:   %d of %d\npending:          %d migration(s)\n", st.Kind, st.Address, st.Version, st.Latest, st.Pending)
				})
			}
			m := &ServerMain{Config: cfg, Logger: newLogger(c.Stderr)}
			if err := m.Run(ctx); err != nil {
				return err
			}
			defer m.Close()
			if tokenFile != "" {
				if err := ensureAdminToken(ctx, m.DB, tokenFile); err != nil {
					return err
				}
			}
			<-ctx.Done()
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.DataDir, "data", "./rebound-data/server", "data directory (database, CA)")
	f.StringVar(&cfg.APIAddr, "api-addr", "127.0.0.1:8440", "HTTPS REST API listen address")
	f.StringVar(&cfg.GRPCAddr, "grpc-addr", "127.0.0.1:8441", "listen address for sites (enrollment and control)")
	f.StringSliceVar(&cfg.Hosts, "host", nil, "extra host names or IPs for the server certificate")
	f.StringVar(&cfg.MetricsAddr, "metrics-addr", "", "also serve /metrics over plain HTTP without authentication at this address, for Prometheus (the API serves it with a token either way)")
	f.StringVar(&cfg.DB, "db", "", "store: a PostgreSQL address (postgres://USER@HOST/DB; also $REBOUND_DB) shared by several servers; default SQLite in --data")
	f.StringVar(&cfg.CADir, "ca-dir", "", "the CA's directory (ca.crt, ca.key; created at the first start if empty); default DATA/ca. Several servers of one control plane use copies of the first server's (docs/ha.md)")
	f.StringVar(&cfg.ServerID, "server-id", "", "this server's name in job leases, unique among the servers on one --db (default: host name and a random suffix)")
	f.BoolVar(&checkDB, "check-db", false, "report the store's schema version, pending migrations and connectivity, and exit (applies nothing)")
	f.StringVar(&tokenFile, "admin-token-file", "", "create an API token of user admin (role admin; the user too, if missing) if this file does not hold a valid token, and write it there (0600)")
	addConfigFlag(cmd, "server")
	return cmd
}

// adminUser is the user `rebound server --admin-token-file` and `rebound
// up` make sure exists, with the admin role.
const adminUser = "admin"

// ensureAdminToken writes a new token of user "admin" to path unless path
// holds a valid token. A missing user "admin" is created (role admin, no
// password): whoever holds the server's files can always get back in.
func ensureAdminToken(ctx context.Context, db rebound.Store, path string) error {
	if b, err := os.ReadFile(path); err == nil {
		if _, err := db.CheckToken(ctx, string(trimSpace(b))); err == nil {
			return nil
		}
	}
	if _, err := db.EnsureUser(ctx, adminUser, rebound.RoleAdmin); err != nil {
		return err
	}
	res, err := db.CreateToken(ctx, adminUser, "admin-token-file")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return os.WriteFile(path, []byte(res.Secret+"\n"), 0o600)
}

// ensureAdminPassword returns the console password of user "admin": known
// (it still works) if given, else a new generated one when the user has no
// password yet. It returns "" when the user has a password it does not
// know (someone set it): that one is left alone.
func ensureAdminPassword(ctx context.Context, db rebound.Store, known string) (string, error) {
	if known != "" {
		if _, err := db.CheckPassword(ctx, adminUser, known); err == nil {
			return known, nil
		}
	}
	u, err := db.GetUser(ctx, adminUser)
	if err != nil {
		return "", err
	}
	if u.PasswordSet {
		return "", nil
	}
	pw := secret.GeneratePassword()
	if err := db.SetPassword(ctx, adminUser, pw); err != nil {
		return "", err
	}
	return pw, nil
}

func trimSpace(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == ' ' || b[len(b)-1] == '\r') {
		b = b[:len(b)-1]
	}
	return b
}

var _ rebound.Service = (*server.Server)(nil)

// StoreCheck is what `rebound server --check-db` reports.
type StoreCheck struct {
	Kind    string `json:"kind"`    // sqlite or postgres
	Address string `json:"address"` // the file, or the address without a password
	Version int    `json:"version"` // migrations applied
	Latest  int    `json:"latest"`  // migrations this binary knows
	Pending int    `json:"pending"`
}

// checkStore reads the store's schema version without applying anything.
// A database newer than this binary is an error naming what to run.
func checkStore(ctx context.Context, cfg ServerConfig) (*StoreCheck, error) {
	st := &StoreCheck{}
	var err error
	switch {
	case cfg.DB == "":
		st.Kind, st.Address, st.Latest = "sqlite", filepath.Join(cfg.DataDir, "rebound.db"), sqlite.Migrations()
		st.Version, err = sqlite.Check(st.Address)
	case strings.HasPrefix(cfg.DB, "postgres://"), strings.HasPrefix(cfg.DB, "postgresql://"):
		st.Kind, st.Address, st.Latest = "postgres", postgres.Redact(cfg.DB), postgres.Migrations()
		st.Version, err = postgres.Check(ctx, cfg.DB)
	default:
		_, err = openStore(ctx, cfg.DataDir, cfg.DB)
	}
	if err != nil {
		return nil, err
	}
	if st.Version > st.Latest {
		return nil, rebound.Errorf(rebound.ECONFLICT, "the %s store at %s has schema version %d, newer than this binary's %d: run the newer rebound server", st.Kind, st.Address, st.Version, st.Latest)
	}
	st.Pending = st.Latest - st.Version
	return st, nil
}
