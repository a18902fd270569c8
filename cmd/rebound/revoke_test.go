package main

import (
	"context"
	"crypto/tls"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	rgrpc "github.com/rebound-dr/rebound/grpc"
	"github.com/rebound-dr/rebound/grpc/pb"
	"github.com/rebound-dr/rebound/pki"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// serial is the serial of the peer's certificate, as revocation lists
// name it.
func (p *peerClient) serial(t *testing.T) string {
	t.Helper()
	c, err := pki.ParseCert(p.cert)
	if err != nil {
		t.Fatal(err)
	}
	return pki.Serial(c)
}

// control opens a control channel to up's server with the peer's
// certificate and says hello; it returns the server's first answer, the
// stream and a function that closes the connection.
func (p *peerClient) control(ctx context.Context, up *UpMain) (*pb.ServerMessage, pb.Control_ConnectClient, func(), error) {
	conf, err := pki.ClientTLS(p.cert, p.key, p.caPEM, serverCertName)
	if err != nil {
		return nil, nil, func() {}, err
	}
	return dialControl(ctx, up.Server.GRPCAddr, conf, p.name)
}

func dialControl(ctx context.Context, addr string, conf *tls.Config, name string) (*pb.ServerMessage, pb.Control_ConnectClient, func(), error) {
	cc, err := rgrpc.Dial(addr, conf)
	if err != nil {
		return nil, nil, func() {}, err
	}
	cs, err := pb.NewControlClient(cc).Connect(ctx)
	if err != nil {
		cc.Close()
		return nil, nil, func() {}, err
	}
	st := `{"site":"` + name + `","time":"` + time.Now().UTC().Format(time.RFC3339Nano) + `"}`
	if err := cs.Send(&pb.SiteMessage{Body: &pb.SiteMessage_Hello{Hello: &pb.Hello{Version: rgrpc.ProtocolVersion, Site: name, Status: []byte(st)}}}); err != nil {
		cc.Close()
		return nil, nil, func() {}, err
	}
	m, err := cs.Recv()
	return m, cs, func() { cc.Close() }, err
}

// siteCert reads the certificate a running site of up holds, as a copy
// of its tls/ directory would give anyone.
func siteCert(t *testing.T, up *UpMain, name string) *peerClient {
	t.Helper()
	dir := filepath.Join(up.Sites[name].Config.DataDir, "tls")
	read := func(f string) []byte {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	return &peerClient{name: name, cert: read("site.crt"), key: read("site.key"), caPEM: read("ca.crt"), role: pki.RoleSite}
}

// probeRepl opens a replication stream to recovery with the peer's
// certificate for a stream recovery does not hold: NotFound means the
// handshake passed.
func (p *peerClient) probeRepl(ctx context.Context, up *UpMain) error {
	return p.inject(ctx, up.Sites["recovery"].ReplAddr, "recovery", &pb.ReplHello{SourceSite: p.name, StreamId: "no-such-stream"}, nil)
}

// handshakeRefused reports whether err is a connection that never reached
// the service: with TLS 1.3 the client learns that the server refused its
// certificate as an alert ("bad certificate") or a broken connection,
// whichever comes first. The listener's refusal event says why.
func handshakeRefused(err error) bool {
	return err != nil && status.Code(err) == codes.Unavailable
}

// waitSiteEvent waits for an event of kind about site whose message holds
// all of want, and returns it.
func waitSiteEvent(t *testing.T, svc rebound.Service, kind, site string, want ...string) rebound.Event {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		evs, err := svc.ListEvents(context.Background(), "")
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range evs {
			if e.Kind != kind || e.Site != site {
				continue
			}
			ok := true
			for _, w := range want {
				ok = ok && strings.Contains(e.Message, w)
			}
			if ok {
				return e
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s event for %s holding %q; events: %+v", kind, site, want, evs)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// upCLI runs the CLI in-process against up through svc.
func upCLI(t *testing.T, up *UpMain, svc rebound.Service, args ...string) result {
	t.Helper()
	return runWith(t, svc, append(args, "--server", up.Server.APIURL, "--token", up.AdminToken)...)
}

func listSites(t *testing.T, up *UpMain, svc rebound.Service) map[string]rebound.Site {
	t.Helper()
	r := upCLI(t, up, svc, "site", "list", "-o", "json")
	if r.code != 0 {
		t.Fatalf("site list: %d %s", r.code, r.stderr)
	}
	out := map[string]rebound.Site{}
	for _, s := range decode[[]rebound.Site](t, r.stdout) {
		out[s.Name] = s
	}
	return out
}

// TestSiteRemoveRevokes: a removed site's certificate opens neither the
// control channel nor another site's replication port; its open channel
// is closed; each refusal is an event. A site that still holds machines
// is removed only with --force.
func TestSiteRemoveRevokes(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	up, svc := testUp(t, t.TempDir())

	edge := enrollPeer(t, up, "edge", pki.RoleSite)
	if s := listSites(t, up, svc)["edge"]; s.Status != rebound.SiteEnrolled {
		t.Fatalf("enrolled, never connected edge is listed as %+v", s)
	}
	if r := upCLI(t, up, svc, "site", "show", "edge"); r.code != 0 || !strings.Contains(r.stdout, "never connected") {
		t.Fatalf("site show edge: %d %s %s", r.code, r.stdout, r.stderr)
	}
	m, cs, closeCtl, err := edge.control(ctx, up)
	defer closeCtl()
	if err != nil || m.GetWelcome() == nil {
		t.Fatalf("edge's control channel before the removal: %v %v", m, err)
	}
	if err := edge.probeRepl(ctx, up); status.Code(err) != codes.NotFound {
		t.Fatalf("edge at recovery's replication port before the removal: %v", err)
	}

	// A site holding a machine is refused, with the next step.
	if _, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "primary", Disks: []int64{1 << 20}}); err != nil {
		t.Fatal(err)
	}
	r := upCLI(t, up, svc, "site", "remove", "primary")
	if r.code != ExitConflict || !strings.Contains(r.stderr, "vm1 (active)") || !strings.Contains(r.stderr, "rebound site remove primary --force") {
		t.Fatalf("remove a site holding vm1: %d %s", r.code, r.stderr)
	}
	if _, ok := up.Server.Control.Site("primary"); !ok {
		t.Fatal("the refused removal disconnected primary")
	}

	r = upCLI(t, up, svc, "site", "remove", "edge", "-o", "json")
	if r.code != 0 {
		t.Fatalf("site remove edge: %d %s", r.code, r.stderr)
	}
	res := decode[rebound.SiteRemoval](t, r.stdout)
	if res.Site != "edge" || len(res.Revoked) != 1 || res.Revoked[0] != edge.serial(t) {
		t.Fatalf("removal %+v, want edge's serial %s revoked", res, edge.serial(t))
	}
	// The open channel is closed.
	for {
		_, err := cs.Recv()
		if err != nil {
			if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "revoked") {
				t.Fatalf("edge's open channel ended with %v", err)
			}
			break
		}
	}
	// A new one is refused at the handshake, and so is recovery's
	// replication port (the list reached it before the removal answered).
	if _, _, c, err := edge.control(ctx, up); !handshakeRefused(err) {
		c()
		t.Fatalf("edge's control channel after the removal: %v", err)
	}
	if err := edge.probeRepl(ctx, up); !handshakeRefused(err) {
		t.Fatalf("edge at recovery's replication port after the removal: %v", err)
	}
	waitSiteEvent(t, svc, "site.removed", "edge", edge.serial(t))
	waitSiteEvent(t, svc, "site.revoked-refused", "edge", edge.serial(t))
	waitSiteEvent(t, svc, "replication.refused", "recovery", "from site edge", "revoked")
	if _, ok := listSites(t, up, svc)["edge"]; ok {
		t.Fatal("edge is still listed after its removal")
	}
	// The other sites are untouched.
	for _, name := range []string{"primary", "recovery"} {
		if _, ok := up.Server.Control.Site(name); !ok {
			t.Fatalf("%s lost its channel", name)
		}
	}
	if _, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm2", Site: "recovery", Disks: []int64{1 << 20}}); err != nil {
		t.Fatalf("recovery after the removal: %v", err)
	}

	// A removed name can be enrolled again, with a new token.
	if r := upCLI(t, up, svc, "site", "token", "edge"); r.code != 0 {
		t.Fatalf("token for the removed edge: %d %s", r.code, r.stderr)
	}
	if s := listSites(t, up, svc)["edge"]; s.Status != rebound.SiteInvited {
		t.Fatalf("edge with a fresh token is listed as %+v", s)
	}
}

// TestSiteTokenRotate: a token for an enrolled name needs --rotate; the
// old certificate works until the new one connects, then it is revoked
// everywhere and the new one holds the site.
func TestSiteTokenRotate(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	up, svc := testUp(t, t.TempDir())
	old := siteCert(t, up, "primary")

	r := upCLI(t, up, svc, "site", "token", "primary")
	if r.code != ExitConflict || !strings.Contains(r.stderr, "already enrolled") || !strings.Contains(r.stderr, "rebound site token primary --rotate") {
		t.Fatalf("token for the enrolled primary: %d %s", r.code, r.stderr)
	}
	r = upCLI(t, up, svc, "site", "token", "primary", "--rotate", "-o", "json")
	if r.code != 0 {
		t.Fatalf("token --rotate: %d %s", r.code, r.stderr)
	}
	tok := decode[EnrollToken](t, r.stdout).Token
	cert, key, ca, err := rgrpc.EnrollAs(ctx, up.Server.GRPCAddr, tok, "primary", pki.RoleSite)
	if err != nil {
		t.Fatal(err)
	}
	fresh := &peerClient{name: "primary", cert: cert, key: key, caPEM: ca, role: pki.RoleSite}

	// Enrolled, not used yet: the old certificate still works.
	if err := old.probeRepl(ctx, up); status.Code(err) != codes.NotFound {
		t.Fatalf("old certificate before the new one connected: %v", err)
	}
	if _, ok := up.Server.Control.Site("primary"); !ok {
		t.Fatal("primary lost its channel when the new certificate was enrolled")
	}

	// The new certificate's first connection takes the site over.
	m, _, closeCtl, err := fresh.control(ctx, up)
	defer closeCtl()
	if err != nil || m.GetWelcome() == nil {
		t.Fatalf("new certificate's control channel: %v %v", m, err)
	}
	waitSiteEvent(t, svc, "site.rotated", "primary", fresh.serial(t), old.serial(t))
	if _, _, c, err := old.control(ctx, up); !handshakeRefused(err) {
		c()
		t.Fatalf("old certificate's control channel after the rotation: %v", err)
	}
	if err := old.probeRepl(ctx, up); !handshakeRefused(err) {
		t.Fatalf("old certificate at recovery after the rotation: %v", err)
	}
	if err := fresh.probeRepl(ctx, up); status.Code(err) != codes.NotFound {
		t.Fatalf("new certificate at recovery: %v", err)
	}
	waitSiteEvent(t, svc, "site.revoked-refused", "primary", old.serial(t))
}

// TestSecondControlConnectionRefused: a second process with a site's
// certificate is refused while the site is connected, with an event; the
// site keeps its channel and keeps working.
func TestSecondControlConnectionRefused(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	up, svc := testUp(t, t.TempDir())
	copyOfPrimary := siteCert(t, up, "primary")
	_, _, closeCtl, err := copyOfPrimary.control(ctx, up)
	closeCtl()
	if status.Code(err) != codes.AlreadyExists || !strings.Contains(err.Error(), "already connected") {
		t.Fatalf("second channel for primary: %v", err)
	}
	waitSiteEvent(t, svc, "site.duplicate", "primary", "refused a second control connection", "keeps its connection")
	if _, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "primary", Disks: []int64{1 << 20}}); err != nil {
		t.Fatalf("primary after the refused second channel: %v", err)
	}
	if s := listSites(t, up, svc)["primary"]; s.Status != rebound.SiteOnline {
		t.Fatalf("primary is %+v", s)
	}
}

// TestJoinTokenRoleAndFile: a token binds the role it was minted for; a
// site enrolls with a token read from a file.
func TestJoinTokenRoleAndFile(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	up, svc := testUp(t, t.TempDir())

	r := upCLI(t, up, svc, "site", "token", "srv9", "--agent", "-o", "json")
	if r.code != 0 {
		t.Fatalf("agent token: %d %s", r.code, r.stderr)
	}
	agentTok := decode[EnrollToken](t, r.stdout).Token
	if s := listSites(t, up, svc)["srv9"]; s.Status != rebound.SiteInvited {
		t.Fatalf("srv9 with an unused token is listed as %+v", s)
	}
	_, _, _, err := rgrpc.EnrollAs(ctx, up.Server.GRPCAddr, agentTok, "srv9", pki.RoleSite)
	if rebound.ErrorCode(err) != rebound.EUNAUTHORIZED || !strings.Contains(err.Error(), "minted for an agent") {
		t.Fatalf("site enrolment with an agent's token: %v", err)
	}
	waitSiteEvent(t, svc, "site.enroll-refused", "srv9", "minted for an agent")
	// The refused attempt did not use the token up.
	cert, _, _, err := rgrpc.EnrollAs(ctx, up.Server.GRPCAddr, agentTok, "srv9", pki.RoleAgent)
	if err != nil {
		t.Fatalf("agent enrolment with its token after the refusal: %v", err)
	}
	if c, _ := pki.ParseCert(cert); pki.IdentityOf(c).Role != pki.RoleAgent {
		t.Fatalf("agent certificate has role %q", pki.IdentityOf(c).Role)
	}

	siteTok, err := svc.CreateEnrollToken(ctx, "edge")
	if err != nil {
		t.Fatal(err)
	}
	_, _, _, err = rgrpc.EnrollAs(ctx, up.Server.GRPCAddr, siteTok, "edge", pki.RoleAgent)
	if rebound.ErrorCode(err) != rebound.EUNAUTHORIZED || !strings.Contains(err.Error(), "minted for a site") || !strings.Contains(err.Error(), "--agent") {
		t.Fatalf("agent enrolment with a site's token: %v", err)
	}

	// The site token, from a file.
	dir := t.TempDir()
	file := filepath.Join(dir, "join-token")
	if err := os.WriteFile(file, []byte(siteTok+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	r = upCLI(t, up, svc, "site", "--name", "edge", "--token", siteTok, "--token-file", file)
	if r.code != ExitUsage || !strings.Contains(r.stderr, "not both") {
		t.Fatalf("--token with --token-file: %d %s", r.code, r.stderr)
	}
	empty := filepath.Join(dir, "empty")
	os.WriteFile(empty, nil, 0o600)
	bad := &SiteMain{Config: SiteConfig{Name: "edge", DataDir: filepath.Join(dir, "bad"), Server: up.Server.GRPCAddr,
		JoinTokenFile: empty, NBDAddr: "127.0.0.1:0", ReplAddr: "127.0.0.1:0"}, Logger: up.Logger}
	if err := bad.Run(ctx); rebound.ErrorCode(err) != rebound.EINVALID || !strings.Contains(err.Error(), "is empty") {
		t.Fatalf("empty token file: %v", err)
	}
	sm := &SiteMain{Config: SiteConfig{Name: "edge", DataDir: filepath.Join(dir, "edge"), Server: up.Server.GRPCAddr,
		JoinTokenFile: file, NBDAddr: "127.0.0.1:0", ReplAddr: "127.0.0.1:0", ReportEvery: 100 * time.Millisecond}, Logger: up.Logger}
	if err := sm.Run(ctx); err != nil {
		t.Fatalf("site enrolled from a token file: %v", err)
	}
	defer sm.Close()
	deadline := time.Now().Add(30 * time.Second)
	for listSites(t, up, svc)["edge"].Status != rebound.SiteOnline {
		if time.Now().After(deadline) {
			t.Fatalf("edge never came online: %+v", listSites(t, up, svc)["edge"])
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// localRepl is the replication state a site itself reports for machine.
func localRepl(t *testing.T, up *UpMain, site, machine string) string {
	t.Helper()
	st, err := up.Sites[site].Site.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range st.Machines {
		if m.Name == machine {
			return m.ReplState
		}
	}
	return ""
}

// TestSiteRemoveForceCutsStreams: removing a source site with --force
// cuts its open replication stream at the target, and the stream cannot
// reopen: the source spools.
func TestSiteRemoveForceCutsStreams(t *testing.T) {
	t.Parallel()
	up, svc := testUp(t, t.TempDir())
	const size = 8 << 20
	o := newOracle(t, size, 7)
	src := protectQuiet(t, up, svc, o, size)
	o.write(src, 5)
	waitState := func(want string) {
		t.Helper()
		deadline := time.Now().Add(time.Minute)
		for localRepl(t, up, "primary", "vm1") != want {
			if time.Now().After(deadline) {
				t.Fatalf("primary's vm1 is %q, want %q", localRepl(t, up, "primary", "vm1"), want)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	waitState("streaming")

	r := upCLI(t, up, svc, "site", "remove", "primary")
	if r.code != ExitConflict || !strings.Contains(r.stderr, "vm1 (source)") {
		t.Fatalf("remove primary holding vm1: %d %s", r.code, r.stderr)
	}
	r = upCLI(t, up, svc, "site", "remove", "primary", "--force", "-o", "json")
	if r.code != 0 {
		t.Fatalf("remove --force: %d %s", r.code, r.stderr)
	}
	if res := decode[rebound.SiteRemoval](t, r.stdout); len(res.Machines) != 1 || res.Machines[0] != "vm1" || len(res.Revoked) != 1 {
		t.Fatalf("forced removal: %+v", res)
	}
	// The open stream was cut and the sender cannot get back in.
	o.write(src, 5)
	waitState("spooling")
	waitSiteEvent(t, svc, "replication.refused", "recovery", "from site primary", "revoked")
	waitSiteEvent(t, svc, "site.removed", "primary", "forced", "vm1")
}
