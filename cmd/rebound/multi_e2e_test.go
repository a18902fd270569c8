package main

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	rhttp "github.com/rebound-dr/rebound/http"
	"github.com/rebound-dr/rebound/internal/failpoint"
	"github.com/rebound-dr/rebound/internal/pgtest"
	"github.com/rebound-dr/rebound/pki"
)

// Several servers on one store read each other's revocations quickly in
// tests.
func init() { revocationsEvery = 200 * time.Millisecond }

// TestSeveralServers: two servers on one PostgreSQL with one CA (a copy
// of the first's, --ca-dir; a third with its own CA is told to copy it),
// two sites given both addresses (and a third, removed through server 1,
// is cut off by server 2 too), a machine
// protected through server 1. With server 1 closed, server 2 answers the
// API, gets the sites' reports and calls them; replication goes on (bytes
// written after server 1 closed are in a new point, checked over NBD);
// a CLI given both URLs, server 1 first, works.
func TestSeveralServers(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dsn := pgtest.DSN(t)
	dir := t.TempDir()
	logger := fixedUpLogger()

	s1, s2 := startSharedServers(t, dir, logger, dsn)
	if s1.CA.Fingerprint() != s2.CA.Fingerprint() {
		t.Fatal("the servers hold different CAs")
	}
	// A third server with a CA of its own says so at its start.
	var log3 syncBuffer
	s3 := &ServerMain{Logger: slog.New(slog.NewTextHandler(&log3, nil)), Config: ServerConfig{
		DataDir: filepath.Join(dir, "s3"), APIAddr: freePort(t), GRPCAddr: freePort(t), DB: dsn,
	}}
	if err := s3.Run(ctx); err != nil {
		t.Fatalf("start s3: %v", err)
	}
	s3.Close()
	if !strings.Contains(log3.String(), "is not the one the servers of this database use (fingerprint "+s1.CA.Fingerprint()+")") || !strings.Contains(log3.String(), "--ca-dir") {
		t.Fatalf("a server with its own CA did not say so:\n%s", log3.String())
	}

	token, client := sharedClients(t, dir, s1)
	svc1, svc2 := client(s1.APIURL), client(s2.APIURL)

	// Two sites, each with both servers' addresses; enrolled through
	// server 1 with a token server 2 knows as well (one database).
	sites := startSitesOn(t, dir, logger, s1, s2, "primary", "recovery", "edge")

	// A site removed through server 1 is cut off by server 2 as well: it
	// reads the revocation from the store, closes the site's channel and
	// refuses it from then on.
	if _, err := svc1.RemoveSite(ctx, "edge", false); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 30*time.Second, "server 2 to close the removed site's channel", func() bool {
		_, ok := s2.Control.Site("edge")
		return !ok
	})
	edgeSerial := func() string {
		b, err := os.ReadFile(filepath.Join(dir, "sites", "edge", "tls", "site.crt"))
		if err != nil {
			t.Fatal(err)
		}
		c, err := pki.ParseCert(b)
		if err != nil {
			t.Fatal(err)
		}
		return pki.Serial(c)
	}()
	if !slices.Contains(s2.Service.RevocationList(), edgeSerial) {
		t.Fatalf("server 2's revocation list %v misses the removed site's serial %s", s2.Service.RevocationList(), edgeSerial)
	}
	sites["edge"].Close()

	const size = 8 << 20
	o := newOracle(t, size, 12)
	src := createProtected(t, svc1, "vm1", size, o)
	o.write(src, 20)
	before := o.point(svc1, "vm1", false)

	// Server 1 goes away.
	if err := s1.Close(); err != nil {
		t.Fatalf("close server 1: %v", err)
	}
	closed := time.Now()

	// The API answers through server 2, from the shared store.
	got := getMachine(t, svc2, "vm1")
	if got.State != rebound.MachineProtected || got.Protection == nil || got.Protection.TargetSite != "recovery" {
		t.Fatalf("vm1 through server 2: state %s protection %+v", got.State, got.Protection)
	}
	if ms, err := svc2.ListMachines(ctx); err != nil || len(ms) != 1 {
		t.Fatalf("machine list through server 2: %v %v", ms, err)
	}

	// Replication goes on: bytes written now are in a new point, cut
	// through server 2 (its own channel to the site).
	o.write(src, 40)
	after := o.point(svc2, "vm1", false)
	if after.Seq <= before.Seq {
		t.Fatalf("point after server 1 closed: seq %d, before %d", after.Seq, before.Seq)
	}
	points, err := svc2.ListPoints(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	if !hasPoint(points, before.ID) || !hasPoint(points, after.ID) {
		t.Fatalf("points through server 2 miss %s or %s: %+v", before.ID, after.ID, points)
	}
	// A test failover (a job of server 2) to that point holds its bytes.
	tp, sum := testFailoverSum(t, svc2, "vm1", after.ID)
	if tp.ID != after.ID || sum != o.points[after.ID] {
		t.Fatalf("test failover to %s (got %s): bytes differ from the model", after.ID, tp.ID)
	}

	// The sites' reports reach server 2: seen after server 1 closed, the
	// machine's health kept from them.
	waitUntil(t, 20*time.Second, "reports on server 2 after server 1 closed", func() bool {
		ss, err := svc2.ListSites(ctx)
		if err != nil {
			return false
		}
		seen := 0
		for _, s := range ss {
			if s.Name == "primary" || s.Name == "recovery" {
				if s.Status != rebound.SiteOnline || !s.LastSeen.After(closed) {
					return false
				}
				seen++
			}
		}
		return seen == 2
	})
	waitMachine(t, svc2, "vm1", 20*time.Second, "streaming and normal through server 2", func(m *rebound.Machine) bool {
		return m.Health == rebound.HealthNormal && m.Protection != nil && m.Protection.ReplState == "streaming"
	})

	// A CLI given both URLs, the dead one first, works.
	caFile := filepath.Join(dir, "ca.crt")
	if err := os.WriteFile(caFile, s2.CA.CertPEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	var out, errb bytes.Buffer
	c := NewCLI(strings.NewReader(""), &out, &errb)
	c.IsTerminal = func(io.Writer) bool { return false }
	code := c.Run(ctx, []string{"machine", "show", "vm1", "-o", "json", "--server", s1.APIURL + "," + s2.APIURL, "--token", token, "--ca", caFile})
	if code != 0 {
		t.Fatalf("CLI with both servers: exit %d\n%s", code, errb.String())
	}
	if shown := decode[rebound.Machine](t, out.String()); shown.Name != "vm1" || shown.State != rebound.MachineProtected {
		t.Fatalf("CLI machine show: %+v", shown)
	}
	// And the client kept the server that answered: a second call too.
	both := client(s1.APIURL, s2.APIURL)
	for range 2 {
		if _, err := both.GetMachine(ctx, "vm1"); err != nil {
			t.Fatalf("client with both servers: %v", err)
		}
	}
}

func hasPoint(points []rebound.RecoveryPoint, id string) bool {
	for _, p := range points {
		if p.ID == id {
			return true
		}
	}
	return false
}

// copyDir copies the files of src into dst (a server's CA directory).
func copyDir(t testing.TB, src, dst string) {
	t.Helper()
	if err := os.MkdirAll(dst, 0o700); err != nil {
		t.Fatal(err)
	}
	es, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range es {
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// fixedUpLogger logs as fixedUp does: to stderr with -v, else nowhere.
func fixedUpLogger() *slog.Logger {
	var out io.Writer = io.Discard
	if testing.Verbose() {
		out = os.Stderr
	}
	return slog.New(slog.NewTextHandler(out, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// TestSeveralServersKill is TestSeveralServers with the real binaries:
// `rebound server --db ... --ca-dir` twice (the second with a copy of the
// first's CA), `rebound site --server-addr a,b` twice, a machine protected
// through server 1, then server 1 killed with SIGKILL. A client given
// both URLs, server 1 first, keeps answering through server 2, which cuts
// a point holding the bytes written after the kill, and runs a test
// failover to it.
func TestSeveralServersKill(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	tc := startTwoServers(t, nil)
	dir, srv1, svc1, both, online := tc.dir, tc.srv1, tc.svc1, tc.both, tc.online

	const size = 8 << 20
	o := newOracle(t, size, 13)
	src := createProtected(t, svc1, "vm1", size, o)
	o.write(src, 20)
	before := o.point(both, "vm1", false)

	srv1.kill()
	killed := time.Now()
	if _, err := svc1.GetMachine(ctx, "vm1"); rebound.ErrorCode(err) != rebound.EUNAVAILABLE {
		t.Fatalf("server 1 still answers after SIGKILL: %v", err)
	}

	// Through the client with both URLs, server 1 first.
	if got := getMachine(t, both, "vm1"); got.State != rebound.MachineProtected {
		t.Fatalf("vm1 after server 1 died: %s", got.State)
	}
	waitUntil(t, 30*time.Second, "site reports on server 2 after the kill", online(both, killed))
	o.write(src, 40)
	after := o.point(both, "vm1", false)
	if after.Seq <= before.Seq {
		t.Fatalf("point after the kill: seq %d, before %d", after.Seq, before.Seq)
	}
	tp, sum := testFailoverSum(t, both, "vm1", after.ID)
	if tp.ID != after.ID || sum != o.points[after.ID] {
		t.Fatalf("test failover to %s after the kill: bytes differ from the model", after.ID)
	}
	waitMachine(t, both, "vm1", 20*time.Second, "streaming and normal through server 2", func(m *rebound.Machine) bool {
		return m.Health == rebound.HealthNormal && m.Protection != nil && m.Protection.ReplState == "streaming"
	})
	// Server 2 runs with the shared CA: no complaint about it.
	if b, err := os.ReadFile(filepath.Join(dir, "server2.log")); err != nil || strings.Contains(string(b), "is not the one the servers of this database use") {
		t.Fatalf("server 2 log (%v):\n%s", err, b)
	}
}

// startSiteOn enrolls site name through the first server and runs it with
// every server's address, under dir/sites/name; the test closes it.
func startSiteOn(t testing.TB, dir string, logger *slog.Logger, name string, servers ...*ServerMain) *SiteMain {
	t.Helper()
	ctx := context.Background()
	jt, err := servers[0].JoinToken(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	var addrs []string
	for _, s := range servers {
		addrs = append(addrs, s.GRPCAddr)
	}
	sd := filepath.Join(dir, "sites", name)
	sm := &SiteMain{Logger: logger.With("site", name), Config: SiteConfig{
		Name: name, DataDir: sd, Server: strings.Join(addrs, ","), JoinToken: jt,
		NBDAddr: freePort(t), NBDSocket: filepath.Join(sd, "nbd.sock"), ReplAddr: freePort(t),
	}}
	if err := sm.Run(ctx); err != nil {
		t.Fatalf("site %s: %v", name, err)
	}
	t.Cleanup(func() { sm.Close() })
	return sm
}

// twoServers is two `rebound server` processes on one PostgreSQL with one
// CA (server 1's, copied), and sites primary and recovery given both.
type twoServers struct {
	dir              string
	srv1             *proc
	svc1, svc2, both *rhttp.Client // server 1, server 2, both (server 1 first)
	// online says whether svc sees both sites online with a report after.
	online func(svc rebound.Service, after time.Time) func() bool
}

// startTwoServers starts them, with env1 added to server 1's environment
// (failpoints), server IDs s1 and s2, and waits for the sites on both.
func startTwoServers(t testing.TB, env1 []string) *twoServers {
	t.Helper()
	return startTwoServersEnv(t, env1, nil)
}

// startTwoServersEnv is startTwoServers with siteEnv[name] added to site
// name's environment (site failpoints).
func startTwoServersEnv(t testing.TB, env1 []string, siteEnv map[string][]string) *twoServers {
	t.Helper()
	ctx := context.Background()
	dsn := pgtest.DSN(t)
	dir := t.TempDir()
	api1, grpc1, api2, grpc2 := freePort(t), freePort(t), freePort(t), freePort(t)
	ca1, ca2 := filepath.Join(dir, "ca1"), filepath.Join(dir, "ca2")
	tokenFile := filepath.Join(dir, "admin-token")
	srv1 := startProc(t, dir, "server1", env1, "server", "--db", dsn, "--data", filepath.Join(dir, "s1"), "--ca-dir", ca1,
		"--api-addr", api1, "--grpc-addr", grpc1, "--admin-token-file", tokenFile, "--server-id", "s1")
	var token, caPEM []byte
	waitUntil(t, 60*time.Second, "server 1 to start", func() bool {
		token, _ = os.ReadFile(tokenFile)
		caPEM, _ = os.ReadFile(filepath.Join(ca1, "ca.crt"))
		return len(token) > 0 && len(caPEM) > 0
	})
	copyDir(t, ca1, ca2)
	startProc(t, dir, "server2", nil, "server", "--db", dsn, "--data", filepath.Join(dir, "s2"), "--ca-dir", ca2,
		"--api-addr", api2, "--grpc-addr", grpc2, "--server-id", "s2")
	client := func(urls ...string) *rhttp.Client {
		t.Helper()
		c, err := rhttp.NewClient(strings.Join(urls, ","), strings.TrimSpace(string(token)), caPEM)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	tc := &twoServers{dir: dir, srv1: srv1, svc1: client("https://" + api1), svc2: client("https://" + api2),
		both: client("https://"+api1, "https://"+api2)}
	// Server 2's certificate is from the shared CA: the client trusts it.
	waitUntil(t, 60*time.Second, "server 2 to answer", func() bool { _, err := tc.svc2.ListSites(ctx); return err == nil })

	for _, name := range []string{"primary", "recovery"} {
		tok, err := tc.svc1.CreateEnrollToken(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		startProc(t, dir, name, siteEnv[name], "site", "--name", name, "--data", filepath.Join(dir, name),
			"--server-addr", grpc1+","+grpc2, "--token", tok, "--nbd-addr", freePort(t), "--repl-addr", freePort(t))
	}
	tc.online = func(svc rebound.Service, after time.Time) func() bool {
		return func() bool {
			ss, err := svc.ListSites(ctx)
			if err != nil || len(ss) != 2 {
				return false
			}
			for _, s := range ss {
				if s.Status != rebound.SiteOnline || !s.LastSeen.After(after) {
					return false
				}
			}
			return true
		}
	}
	start := time.Now()
	waitUntil(t, 60*time.Second, "sites online on server 1", tc.online(tc.svc1, start))
	waitUntil(t, 60*time.Second, "sites online on server 2", tc.online(tc.svc2, start))
	return tc
}

// TestSeveralServersKillDuringFailover: the real binaries, two servers on
// one PostgreSQL; server 1 runs an unplanned failover to a point and is
// killed (SIGKILL, by a failpoint) as the job enters its activate step.
// The API answers through server 2 meanwhile; server 2 takes the job over
// under the same ID once the lease expires and finishes it; the failed-over
// disk holds exactly the point's bytes.
func TestSeveralServersKillDuringFailover(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	tc := startTwoServers(t, []string{failpoint.Env + "=server/job/failover/activate=kill"})
	const size = 8 << 20
	o := newOracle(t, size, 19)
	src := createProtected(t, tc.svc1, "vm1", size, o)
	o.write(src, 30)
	p := o.point(tc.both, "vm1", false)
	o.write(src, 20) // after the point: must not be in the failed-over disk

	job, err := tc.svc1.Failover(ctx, rebound.FailoverRequest{Machine: "vm1", Point: p.ID})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-tc.srv1.done:
	case <-time.After(2 * time.Minute):
		t.Fatal("server 1 did not die at the failover's activate step")
	}
	died := time.Now()
	// The API answers through server 2 while the job waits for its lease.
	if got := getMachine(t, tc.both, "vm1"); got.Name != "vm1" {
		t.Fatalf("machine through server 2: %+v", got)
	}
	j := waitJobDone(t, tc.svc2, job, nil)
	t.Logf("server 2 finished job %s %.1fs after server 1 died", j.ID, time.Since(died).Seconds())
	if j.ID != job.ID || j.Owner != "s2" {
		t.Fatalf("job %s owned by %q after the takeover, want %s by s2", j.ID, j.Owner, job.ID)
	}
	got := getMachine(t, tc.both, "vm1")
	if got.ActiveSite != "recovery" || got.State != rebound.MachineFailedOver {
		t.Fatalf("vm1 after the taken-over failover: %s at %s", got.State, got.ActiveSite)
	}
	if sum := diskSum(t, got.Disks[0].NBD); sum != o.points[p.ID] {
		t.Fatalf("the failed-over disk differs from point %s", p.ID)
	}
}

// startSharedServers runs in-process servers s1 and s2 on the database
// dsn: s1 creates the CA under dir, s2 runs with a copy of it.
func startSharedServers(t testing.TB, dir string, logger *slog.Logger, dsn string) (s1, s2 *ServerMain) {
	t.Helper()
	start := func(name, caDir string) *ServerMain {
		t.Helper()
		m := &ServerMain{Logger: logger.With("server", name), Config: ServerConfig{
			DataDir: filepath.Join(dir, name), APIAddr: freePort(t), GRPCAddr: freePort(t), DB: dsn, CADir: caDir,
			ServerID: name,
		}}
		if err := m.Run(context.Background()); err != nil {
			t.Fatalf("start %s: %v", name, err)
		}
		t.Cleanup(func() { m.Close() })
		return m
	}
	s1 = start("s1", filepath.Join(dir, "s1-ca"))
	copyDir(t, filepath.Join(dir, "s1-ca"), filepath.Join(dir, "s2-ca"))
	return s1, start("s2", filepath.Join(dir, "s2-ca"))
}

// sharedClients gives s1's admin token (written under dir) and a client
// factory for any list of the shared servers' URLs, trusting their CA.
func sharedClients(t testing.TB, dir string, s1 *ServerMain) (token string, client func(urls ...string) *rhttp.Client) {
	t.Helper()
	tokenPath := filepath.Join(dir, "admin-token")
	if err := ensureAdminToken(context.Background(), s1.DB, tokenPath); err != nil {
		t.Fatal(err)
	}
	tok, err := os.ReadFile(tokenPath)
	if err != nil {
		t.Fatal(err)
	}
	token = strings.TrimSpace(string(tok))
	return token, func(urls ...string) *rhttp.Client {
		t.Helper()
		c, err := rhttp.NewClient(strings.Join(urls, ","), token, s1.CA.CertPEM())
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
}

// startSitesOn starts the named sites on s1 and s2 (startSiteOn) and
// waits until both servers hold every one's control channel.
func startSitesOn(t testing.TB, dir string, logger *slog.Logger, s1, s2 *ServerMain, names ...string) map[string]*SiteMain {
	t.Helper()
	sites := map[string]*SiteMain{}
	for _, name := range names {
		sites[name] = startSiteOn(t, dir, logger, name, s1, s2)
	}
	for _, s := range []*ServerMain{s1, s2} {
		waitUntil(t, 30*time.Second, "the sites connected to "+s.APIURL, func() bool {
			for _, name := range names {
				if _, ok := s.Control.Site(name); !ok {
					return false
				}
			}
			return true
		})
	}
	return sites
}
