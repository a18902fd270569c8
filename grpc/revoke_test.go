package grpc

import (
	"context"
	"crypto/tls"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/grpc/pb"
	"github.com/rebound-dr/rebound/pki"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// events collects what a ControlServer reports through OnEvent.
type events struct {
	mu  sync.Mutex
	all []rebound.Event
}

func (e *events) add(site string, ev rebound.Event) {
	e.mu.Lock()
	defer e.mu.Unlock()
	ev.Site = site
	e.all = append(e.all, ev)
}

func (e *events) kind(kind string) []rebound.Event {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []rebound.Event
	for _, ev := range e.all {
		if ev.Kind == kind {
			out = append(out, ev)
		}
	}
	return out
}

// runSite keeps a control channel of site open with conf until the test
// ends; set receives the revocation lists the server pushes.
func runSite(t *testing.T, addr string, conf *tls.Config, site *fakeSite, set func([]string)) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- RunControl(ctx, addr, conf, site, time.Hour, WithRevocations(set))
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("RunControl: %v", err)
		}
	})
}

// hello opens a control channel with conf and says hello as site; it
// returns the server's first answer.
func hello(ctx context.Context, addr string, conf *tls.Config, site string) (*pb.ServerMessage, pb.Control_ConnectClient, func(), error) {
	cc, err := Dial(addr, conf)
	if err != nil {
		return nil, nil, func() {}, err
	}
	cs, err := pb.NewControlClient(cc).Connect(ctx)
	if err != nil {
		cc.Close()
		return nil, nil, func() {}, err
	}
	if err := cs.Send(&pb.SiteMessage{Body: &pb.SiteMessage_Hello{Hello: &pb.Hello{Version: ProtocolVersion, Site: site, Status: []byte(`{"site":"` + site + `"}`)}}}); err != nil {
		cc.Close()
		return nil, nil, func() {}, err
	}
	m, err := cs.Recv()
	return m, cs, func() { cc.Close() }, err
}

// A second control channel claiming a connected site is refused with an
// event; the first keeps the site and keeps answering.
func TestControl_SecondConnectionRefused(t *testing.T) {
	e := newEnv(t)
	ev := &events{}
	ctl := &ControlServer{OnEvent: ev.add}
	ts := startServer(t, e.serverTLS, ctl.Register)
	_, first := e.site(t, "site-a", "127.0.0.1")
	site := &fakeSite{name: "site-a"}
	runSite(t, ts.addr, first, site, func([]string) {})
	waitFor(t, 10*time.Second, "site to connect", func() bool { return len(ctl.Connected()) == 1 })

	// Another certificate for the same name (a second enrolment), and the
	// same certificate from a second process: both refused.
	_, rogue := e.site(t, "site-a", "127.0.0.1")
	for i, conf := range []*tls.Config{rogue, first} {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		_, _, closeConn, err := hello(ctx, ts.addr, conf, "site-a")
		closeConn()
		cancel()
		if status.Code(err) != codes.AlreadyExists || !strings.Contains(err.Error(), "already connected") || !strings.Contains(err.Error(), "--rotate") {
			t.Fatalf("connection %d: got %v, want AlreadyExists naming --rotate", i, err)
		}
	}
	dups := ev.kind("site.duplicate")
	// The same site refused twice within a minute is reported once.
	if len(dups) != 1 || dups[0].Site != "site-a" || !strings.Contains(dups[0].Message, "keeps its connection") {
		t.Fatalf("duplicate events: %+v", ev.all)
	}
	// The original still holds the site: calls reach it.
	s, ok := ctl.Site("site-a")
	if !ok {
		t.Fatal("site-a lost its channel")
	}
	if seq, err := s.Replicated(context.Background(), "vm1"); err != nil || seq != 77 {
		t.Fatalf("original channel after the refusals: %d %v", seq, err)
	}
	site.mu.Lock()
	got := append([]string(nil), site.calls...)
	site.mu.Unlock()
	if !slices.Contains(got, "Replicated:vm1") {
		t.Fatalf("the call did not reach the original site: %v", got)
	}
}

// A channel that holds a site but no longer answers (a dead connection
// keepalive has not caught yet) gives way to a new one.
func TestControl_DeadChannelReplaced(t *testing.T) {
	old := duplicateProbe
	duplicateProbe = 300 * time.Millisecond
	t.Cleanup(func() { duplicateProbe = old })
	e := newEnv(t)
	ctl := &ControlServer{}
	ts := startServer(t, e.serverTLS, ctl.Register)
	_, conf := e.site(t, "site-a", "127.0.0.1")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// Says hello, then never reads nor answers.
	m, _, closeDead, err := hello(ctx, ts.addr, conf, "site-a")
	defer closeDead()
	if err != nil || m.GetWelcome() == nil {
		t.Fatalf("first channel: %v %v", m, err)
	}
	runSite(t, ts.addr, conf, &fakeSite{name: "site-a"}, func([]string) {})
	s, _ := ctl.Site("site-a")
	waitFor(t, 30*time.Second, "the live channel to take the site", func() bool {
		seq, err := s.Replicated(context.Background(), "vm1")
		return err == nil && seq == 77
	})
}

// The revocation list reaches connected sites; a channel opened with a
// revoked certificate is closed, and a listener with the list refuses the
// certificate at the handshake.
func TestRevocations_PushAndRefuse(t *testing.T) {
	e := newEnv(t)
	rev := &pki.Revocations{}
	var refusedMu sync.Mutex
	var refused []string
	rev.OnRefuse = func(id pki.Identity, serial string) {
		refusedMu.Lock()
		refused = append(refused, id.Name+"/"+serial)
		refusedMu.Unlock()
	}
	serverTLS := e.serverTLS.Clone()
	rev.Apply(serverTLS)
	ctl := &ControlServer{Revocations: rev.List}
	ts := startServer(t, serverTLS, ctl.Register)

	certA, keyA, _ := e.ca.Issue("site-a", []string{"127.0.0.1"}, pki.Site)
	confA, _ := pki.ClientTLS(certA, keyA, e.ca.CertPEM(), "127.0.0.1")
	cA, _ := pki.ParseCert(certA)
	_, confB := e.site(t, "site-b", "127.0.0.1")

	var mu sync.Mutex
	got := map[string][]string{}
	setter := func(name string) func([]string) {
		return func(l []string) { mu.Lock(); got[name] = l; mu.Unlock() }
	}
	runSite(t, ts.addr, confA, &fakeSite{name: "site-a"}, setter("site-a"))
	runSite(t, ts.addr, confB, &fakeSite{name: "site-b"}, setter("site-b"))
	waitFor(t, 10*time.Second, "sites to connect", func() bool { return len(ctl.Connected()) == 2 })
	// Each site gets the (empty) list as it connects.
	waitFor(t, 10*time.Second, "the first lists", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return got["site-a"] != nil && got["site-b"] != nil
	})

	list := []string{pki.Serial(cA)}
	rev.Set(list)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := ctl.PushRevocations(ctx, list); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	b := got["site-b"]
	mu.Unlock()
	if !slices.Equal(b, list) {
		t.Fatalf("site-b holds %v after the push, want %v", b, list)
	}
	// site-a's channel is closed, and it cannot open a new one.
	waitFor(t, 10*time.Second, "site-a's channel to close", func() bool { return !slices.Contains(ctl.Connected(), "site-a") })
	_, _, closeConn, err := hello(ctx, ts.addr, confA, "site-a")
	closeConn()
	if err == nil || status.Code(err) == codes.OK {
		t.Fatal("a revoked certificate opened a control channel")
	}
	refusedMu.Lock()
	n := len(refused)
	first := ""
	if n > 0 {
		first = refused[0]
	}
	refusedMu.Unlock()
	if n == 0 || first != "site-a/"+pki.Serial(cA) {
		t.Fatalf("refusals reported: %d, first %q", n, first)
	}
	if !slices.Equal(ctl.Connected(), []string{"site-b"}) {
		t.Fatalf("connected: %v", ctl.Connected())
	}
}
