package grpc

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/grpc/pb"
	"github.com/rebound-dr/rebound/pki"
	ggrpc "google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// agent returns the client TLS config of an agent certificate for machine
// name, verifying a peer named serverName.
func (e *env) agent(t testing.TB, name, serverName string) *tls.Config {
	t.Helper()
	cert, key, err := e.ca.IssueAs(name, nil, pki.Site, name)
	if err != nil {
		t.Fatal(err)
	}
	client, err := pki.ClientTLS(cert, key, e.ca.CertPEM(), serverName)
	if err != nil {
		t.Fatal(err)
	}
	return client
}

// refusals records a ReplicationServer's refusals.
type refusals struct {
	mu  sync.Mutex
	got []Refusal
}

func (r *refusals) add(f Refusal) { r.mu.Lock(); r.got = append(r.got, f); r.mu.Unlock() }
func (r *refusals) list() []Refusal {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Refusal(nil), r.got...)
}

// TestReplicate_OnlyTheSource: a stream is fed only by the site the server
// made its source, for its generation; every other certified peer (another
// site, an agent, the source claiming another generation or name, the
// server's certificate) is refused with PermissionDenied, the refusal is
// reported, and the sink is untouched. The source is then accepted.
func TestReplicate_OnlyTheSource(t *testing.T) {
	e := newEnv(t)
	sink := newMemSink()
	srvTLS, _ := e.site(t, "site-b", "")
	var refused refusals
	targets := map[string]Target{
		"web.g1":  {Sink: sink, Machine: "web", SourceSite: "site-a", Generation: "g1"},
		"srv1.g7": {Sink: newMemSink(), Machine: "srv1", SourceSite: "srv1", Generation: "g7"},
		// A site named like an agent's machine is the source of another
		// machine: the agent's certificate still may not feed it.
		"db.g2": {Sink: newMemSink(), Machine: "db", SourceSite: "srv1", Generation: "g2"},
	}
	rs := &ReplicationServer{
		Target: func(id string) (Target, error) {
			if t, ok := targets[id]; ok {
				return t, nil
			}
			return Target{}, rebound.Errorf(rebound.ENOTFOUND, "no stream %q", id)
		},
		OnRefuse: refused.add,
	}
	ts := startServer(t, srvTLS, rs.Register)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	_, siteA := e.site(t, "site-a", "site-b")
	_, rogue := e.site(t, "site-c", "site-b")
	agent := e.agent(t, "srv1", "site-b")
	srvCert, srvKey, err := e.ca.Issue("rebound-server", nil, pki.ClientAuth) // no role
	if err != nil {
		t.Fatal(err)
	}
	server, _ := pki.ClientTLS(srvCert, srvKey, e.ca.CertPEM(), "site-b")
	nbdCert, nbdKey, err := e.ca.Issue("site-a", nil, pki.NBDClient) // named like the source
	if err != nil {
		t.Fatal(err)
	}
	nbdClient, _ := pki.ClientTLS(nbdCert, nbdKey, e.ca.CertPEM(), "site-b")

	// hello opens a stream, says hello and tries to append one record.
	hello := func(conf *tls.Config, h *pb.ReplHello) error {
		cc, err := Dial(ts.addr, conf)
		if err != nil {
			t.Fatal(err)
		}
		defer cc.Close()
		st, err := pb.NewReplicationClient(cc).Replicate(ctx)
		if err != nil {
			return err
		}
		h.Version = ProtocolVersion
		if err := st.Send(&pb.ReplicateRequest{Body: &pb.ReplicateRequest_Hello{Hello: h}}); err != nil {
			return recvStatus(st, err)
		}
		m, err := st.Recv()
		if err != nil {
			return err
		}
		if m.GetHelloAck() == nil {
			t.Fatalf("answer %T", m.Body)
		}
		rec := &pb.Record{Seq: m.GetHelloAck().DurableSeq + 1, Kind: uint32(rebound.RecordWrite), Length: 3, Data: []byte("bad")}
		if err := st.Send(&pb.ReplicateRequest{Body: &pb.ReplicateRequest_Batch{Batch: &pb.Batch{Records: []*pb.Record{rec}}}}); err != nil {
			return recvStatus(st, err)
		}
		if _, err := st.Recv(); err != nil {
			return err
		}
		return st.CloseSend()
	}

	for _, c := range []struct {
		name   string
		conf   *tls.Config
		hello  *pb.ReplHello
		reason string
	}{
		{"another site", rogue, &pb.ReplHello{StreamId: "web.g1", SourceSite: "site-c", Generation: "g1"}, `site "site-c" is not the source of stream "web.g1" of machine "web": only "site-a" may feed it`},
		{"another site naming the source", rogue, &pb.ReplHello{StreamId: "web.g1", SourceSite: "site-a", Generation: "g1"}, `certificate is for site "site-c", hello says "site-a"`},
		{"an agent", agent, &pb.ReplHello{StreamId: "web.g1", SourceSite: "srv1", Generation: "g1"}, `site "srv1" is not the source of stream "web.g1"`},
		{"an agent for another machine", agent, &pb.ReplHello{StreamId: "db.g2", SourceSite: "srv1", Generation: "g2"}, `agent "srv1" is bound to machine "srv1" and may not feed stream "db.g2" of machine "db"`},
		{"an NBD client named like the source", nbdClient, &pb.ReplHello{StreamId: "web.g1", SourceSite: "site-a", Generation: "g1"}, `"site-a" holds neither a site nor an agent certificate`},
		{"the source, another generation", siteA, &pb.ReplHello{StreamId: "web.g1", SourceSite: "site-a", Generation: "g0"}, `follows generation "g1", the source sent "g0"`},
		{"the source, no generation", siteA, &pb.ReplHello{StreamId: "web.g1", SourceSite: "site-a"}, `the source sent "none"`},
	} {
		err := hello(c.conf, c.hello)
		if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), c.reason) {
			t.Errorf("%s: got %v, want PermissionDenied with %q", c.name, err, c.reason)
		}
	}
	if err := hello(server, &pb.ReplHello{StreamId: "web.g1", SourceSite: "rebound-server", Generation: "g1"}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("server certificate: %v", err)
	}
	if sink.Durable() != 0 || len(sink.snapshot()) != 0 {
		t.Fatalf("refused peers wrote %d records", len(sink.snapshot()))
	}
	got := refused.list()
	if len(got) != 6 {
		t.Fatalf("%d refusals reported, want 6: %+v", len(got), got)
	}
	if got[0].Peer.Name != "site-c" || got[0].Machine != "web" || got[0].StreamID != "web.g1" {
		t.Errorf("first refusal %+v", got[0])
	}
	if got[2].Peer.Role != pki.RoleAgent || got[2].Peer.Machine != "srv1" {
		t.Errorf("agent refusal %+v", got[2])
	}

	// The source itself, and an agent feeding its own machine, get in.
	if err := hello(siteA, &pb.ReplHello{StreamId: "web.g1", SourceSite: "site-a", Generation: "g1"}); err != nil {
		t.Fatalf("source refused: %v", err)
	}
	if sink.Durable() != 1 {
		t.Fatalf("source's record not appended: durable %d", sink.Durable())
	}
	if err := hello(agent, &pb.ReplHello{StreamId: "srv1.g7", SourceSite: "srv1", Generation: "g7"}); err != nil {
		t.Fatalf("agent refused its own machine: %v", err)
	}
	if n := len(refused.list()); n != 6 {
		t.Fatalf("accepted streams reported as refusals: %d", n)
	}
}

// headSource is a memSource that knows its head, as capture.Stream does.
type headSource struct{ *memSource }

func (h headSource) Head() uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return uint64(len(h.recs))
}

// TestSender_AckBeyondHead: a target holding records the source never
// wrote (another writer got there first) stops the sender for good with
// the reason in its stats; the source's records are neither acknowledged
// nor dropped, and nothing more is sent.
func TestSender_AckBeyondHead(t *testing.T) {
	e := newEnv(t)
	sink := newMemSink()
	for i := 0; i < 5; i++ { // the injected records
		r := testRecord(i)
		r.Seq = uint64(i + 1)
		if err := sink.Append([]*rebound.Record{r}); err != nil {
			t.Fatal(err)
		}
	}
	ts, _ := newReplServer(t, e, sink)
	_, cli := e.site(t, "site-a", "site-b")
	src := headSource{newMemSource()}
	for i := 0; i < 3; i++ {
		src.add(testRecord(100 + i))
	}
	s := &Sender{Addr: ts.addr, TLS: cli, StreamID: "vm1", SourceSite: "site-a", Source: src}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := s.Run(ctx) // returns on its own: a stop, not ctx's end
	if ctx.Err() != nil {
		t.Fatal("sender kept reconnecting")
	}
	want := "the target holds records up to 5 but this source wrote only up to 3"
	if err == nil || !strings.Contains(err.Error(), want) || rebound.ErrorCode(err) != rebound.ECONFLICT {
		t.Fatalf("Run: %v", err)
	}
	st := s.Stats()
	if !strings.Contains(st.Stopped, want) || !strings.Contains(st.Stopped, "Nothing was skipped") || st.Connected {
		t.Fatalf("stats %+v", st)
	}
	if st.AckedSeq != 0 || src.acked != 0 || st.RecordsSent != 0 {
		t.Fatalf("acked %d (source %d), sent %d: the stop must come first", st.AckedSeq, src.acked, st.RecordsSent)
	}
	if sink.Durable() != 5 {
		t.Fatalf("sink durable %d", sink.Durable())
	}
}

// TestSender_AckBeyondHeadMidStream: the same when the ack beyond the head
// arrives on a stream that was flowing (a second writer appended between
// the source's batches).
func TestSender_AckBeyondHeadMidStream(t *testing.T) {
	e := newEnv(t)
	inner := newMemSink()
	sink := &injectingSink{memSink: inner, at: 3, extra: 4}
	ts, _ := newReplServer(t, e, sink)
	_, cli := e.site(t, "site-a", "site-b")
	src := headSource{newMemSource()}
	for i := 0; i < 3; i++ {
		src.add(testRecord(i))
	}
	s := &Sender{Addr: ts.addr, TLS: cli, StreamID: "vm1", SourceSite: "site-a", Source: src}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := s.Run(ctx)
	if ctx.Err() != nil || err == nil || !strings.Contains(err.Error(), "the target holds records up to 7 but this source wrote only up to 3") {
		t.Fatalf("Run: %v (ctx %v)", err, ctx.Err())
	}
	if src.acked > 3 {
		t.Fatalf("source acked %d beyond its head", src.acked)
	}
}

// injectingSink appends extra records of another writer once it holds at.
type injectingSink struct {
	*memSink
	at    uint64
	extra int
}

func (s *injectingSink) Append(recs []*rebound.Record) error {
	if err := s.memSink.Append(recs); err != nil {
		return err
	}
	if d := s.memSink.Durable(); d >= s.at && s.extra > 0 {
		var more []*rebound.Record
		for i := 0; i < s.extra; i++ {
			r := testRecord(200 + i)
			r.Seq = d + uint64(i) + 1
			more = append(more, r)
		}
		s.extra = 0
		return s.memSink.Append(more)
	}
	return nil
}

// twoMachines is a fakeSite that reports its own machine vm1 and web.
type twoMachines struct{ *fakeSite }

func (f twoMachines) Status(ctx context.Context) (*rebound.SiteStatus, error) {
	st, _ := f.fakeSite.Status(ctx)
	st.Machines = append(st.Machines, rebound.MachineStatus{Name: "web", Role: "target", DurableSeq: 99})
	return st, nil
}

// TestControl_Agent: a certificate enrolled as an agent is bound to its
// machine; its control channel speaks only of that machine: its reports
// and events about others are dropped, and the server's calls naming
// another machine fail before reaching it. A site's channel is unchanged.
func TestControl_Agent(t *testing.T) {
	e := newEnv(t)
	tk := &tokens{live: map[string]bool{"a1": true, "s1": true, "bad": true, "n1": true}}
	var (
		mu      sync.Mutex
		reports = map[string][]string{}
		events  []rebound.Event
	)
	ctl := &ControlServer{
		OnReport: func(site string, st *rebound.SiteStatus) {
			mu.Lock()
			defer mu.Unlock()
			var names []string
			for _, m := range st.Machines {
				names = append(names, m.Name)
			}
			reports[site] = append(reports[site], strings.Join(names, ","))
		},
		OnEvent: func(site string, ev rebound.Event) {
			mu.Lock()
			events = append(events, ev)
			mu.Unlock()
		},
	}
	ts := startServer(t, e.serverTLS, func(s *ggrpc.Server) {
		(&EnrollServer{CA: e.ca, Validate: tk.validate}).Register(s)
		ctl.Register(s)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	if _, _, _, err := EnrollAs(ctx, ts.addr, pki.FormatJoinToken("bad", e.ca.Fingerprint()), "vm1", "admin"); rebound.ErrorCode(err) != rebound.EINVALID || !strings.Contains(err.Error(), `unknown role "admin"`) {
		t.Fatalf("unknown role: %v", err)
	}
	// An NBD client's certificate has its role and client auth only, and
	// the control channel refuses it: it cannot pose as a site.
	nCert, nKey, nCA, err := EnrollAs(ctx, ts.addr, pki.FormatJoinToken("n1", e.ca.Fingerprint()), "hv1", pki.RoleNBD)
	if err != nil {
		t.Fatal(err)
	}
	nc, _ := pki.ParseCert(nCert)
	if id := pki.IdentityOf(nc); id != (pki.Identity{Name: "hv1", Role: pki.RoleNBD}) || len(nc.ExtKeyUsage) != 1 || nc.ExtKeyUsage[0] != x509.ExtKeyUsageClientAuth {
		t.Fatalf("NBD client enrolled as %+v, usages %v", id, nc.ExtKeyUsage)
	}
	ncli, err := pki.ClientTLS(nCert, nKey, nCA, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	ncc, err := Dial(ts.addr, ncli)
	if err != nil {
		t.Fatal(err)
	}
	defer ncc.Close()
	cs, err := pb.NewControlClient(ncc).Connect(ctx)
	if err == nil {
		// The server may refuse before the hello is sent: Send then
		// answers EOF and Recv the status.
		cs.Send(&pb.SiteMessage{Body: &pb.SiteMessage_Hello{Hello: &pb.Hello{Version: ProtocolVersion, Site: "hv1", Status: []byte("{}")}}})
		_, err = cs.Recv()
	}
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "neither a site nor an agent") {
		t.Fatalf("NBD client on the control channel: %v", err)
	}
	certPEM, keyPEM, caPEM, err := EnrollAs(ctx, ts.addr, pki.FormatJoinToken("a1", e.ca.Fingerprint()), "vm1", pki.RoleAgent)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := pki.ParseCert(certPEM)
	if id := pki.IdentityOf(cert); id != (pki.Identity{Name: "vm1", Role: pki.RoleAgent, Machine: "vm1"}) {
		t.Fatalf("agent enrolled as %+v", id)
	}
	cli, err := pki.ClientTLS(certPEM, keyPEM, caPEM, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	site := twoMachines{&fakeSite{name: "vm1"}}
	evs := make(chan rebound.Event, 4)
	evs <- rebound.Event{Time: time.Unix(5, 0), Machine: "web", Kind: "replication.refused", Message: "forged"}
	evs <- rebound.Event{Time: time.Unix(6, 0), Machine: "vm1", Kind: "replication.refused", Message: "own"}
	done := make(chan error, 1)
	go func() { done <- RunControl(ctx, ts.addr, cli, site, 20*time.Millisecond, WithEvents(evs)) }()
	waitFor(t, 10*time.Second, "agent's event and reports", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(events) == 1 && len(reports["vm1"]) >= 2
	})
	mu.Lock()
	for _, r := range reports["vm1"] {
		if r != "vm1" {
			t.Errorf("agent's report reached the server with machines %q", r)
		}
	}
	if ev := events[0]; ev.Machine != "vm1" || ev.Site != "vm1" || ev.Message != "own" || !ev.Time.Equal(time.Unix(6, 0)) {
		t.Errorf("event %+v", ev)
	}
	mu.Unlock()

	proxy, _ := ctl.Site("vm1")
	st, err := proxy.Status(ctx)
	if err != nil || len(st.Machines) != 1 || st.Machines[0].Name != "vm1" {
		t.Fatalf("agent's Status: %+v %v", st, err)
	}
	err = proxy.StartReplication(ctx, rebound.ReplicationSpec{Machine: "web", Role: "target", PeerSite: "site-a"})
	if rebound.ErrorCode(err) != rebound.EINVALID || !strings.Contains(err.Error(), "agent of machine vm1") {
		t.Fatalf("another machine's stream at an agent: %v", err)
	}
	if err := proxy.CreateMachine(ctx, rebound.SiteMachine{Name: "web", Disks: []rebound.Disk{{Name: "d", Size: 1}}}); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("another machine at an agent: %v", err)
	}
	if _, err := proxy.Activate(ctx, rebound.ActivateSpec{Machine: "web"}); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("activate another machine at an agent: %v", err)
	}
	if err := proxy.StartReplication(ctx, rebound.ReplicationSpec{Machine: "vm1", Role: "source"}); err != nil {
		t.Fatalf("agent's own machine: %v", err)
	}
	site.mu.Lock()
	calls := strings.Join(site.calls, " ")
	site.mu.Unlock()
	if calls != "StartReplication:vm1:source:" {
		t.Fatalf("calls reaching the agent: %q", calls)
	}
	cancel()
	<-done

	// A site's channel still reports and is called for every machine.
	ctx2, cancel2 := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel2()
	certPEM, keyPEM, caPEM, err = Enroll(ctx2, ts.addr, pki.FormatJoinToken("s1", e.ca.Fingerprint()), "site-a")
	if err != nil {
		t.Fatal(err)
	}
	scli, _ := pki.ClientTLS(certPEM, keyPEM, caPEM, "127.0.0.1")
	ssite := twoMachines{&fakeSite{name: "site-a"}}
	go RunControl(ctx2, ts.addr, scli, ssite, time.Hour)
	waitFor(t, 10*time.Second, "site report", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(reports["site-a"]) >= 1
	})
	mu.Lock()
	if r := reports["site-a"][0]; r != "vm1,web" {
		t.Errorf("site's report %q", r)
	}
	mu.Unlock()
	sp, _ := ctl.Site("site-a")
	if err := sp.StartReplication(ctx2, rebound.ReplicationSpec{Machine: "web", Role: "target"}); err != nil {
		t.Fatalf("site: %v", err)
	}
}
