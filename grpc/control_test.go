package grpc

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/grpc/pb"
	ggrpc "google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// fakeSite is a SiteService that records its calls and answers from
// fixed values; machine "missing" is ENOTFOUND everywhere.
type fakeSite struct {
	name      string
	mu        sync.Mutex
	calls     []string
	cancelled atomic.Int32
	blocking  chan struct{} // closed when a "slow" call starts
}

func (f *fakeSite) rec(s string, machine string) error {
	f.mu.Lock()
	f.calls = append(f.calls, s)
	f.mu.Unlock()
	if machine == "missing" {
		return rebound.Errorf(rebound.ENOTFOUND, "no machine %q here", machine)
	}
	return nil
}

func (f *fakeSite) Status(context.Context) (*rebound.SiteStatus, error) {
	return &rebound.SiteStatus{Site: f.name, NBDAddr: "10.0.0.1:10809", FreeBytes: 1 << 40, Machines: []rebound.MachineStatus{{Name: "vm1", Role: "source", HeadSeq: 7}}}, nil
}
func (f *fakeSite) CreateMachine(_ context.Context, m rebound.SiteMachine) error {
	if len(m.Disks) == 0 {
		return rebound.Errorf(rebound.EINVALID, "machine %q has no disks", m.Name)
	}
	return f.rec("CreateMachine:"+m.Name+":"+m.Disks[0].Name, m.Name)
}
func (f *fakeSite) DeleteMachine(_ context.Context, name string) error {
	return f.rec("DeleteMachine:"+name, name)
}
func (f *fakeSite) StartReplication(_ context.Context, s rebound.ReplicationSpec) error {
	return f.rec("StartReplication:"+s.Machine+":"+s.Role+":"+s.Policy.Name, s.Machine)
}
func (f *fakeSite) StopReplication(_ context.Context, m string) error {
	return f.rec("StopReplication:"+m, m)
}
func (f *fakeSite) CutPoint(_ context.Context, m string, k rebound.PointKind) (rebound.RecoveryPoint, error) {
	return rebound.RecoveryPoint{ID: "p1", Kind: k, Seq: 9, Time: time.Unix(100, 0).UTC()}, f.rec("CutPoint:"+m, m)
}
func (f *fakeSite) ListPoints(_ context.Context, m string) (*rebound.PointList, error) {
	if err := f.rec("ListPoints:"+m, m); err != nil {
		return nil, err
	}
	return &rebound.PointList{Points: []rebound.RecoveryPoint{{ID: "p1", Seq: 9, Kind: rebound.PointCrash}}, Oldest: time.Unix(50, 0).UTC()}, nil
}
func (f *fakeSite) QueryPoints(_ context.Context, m string, q rebound.PointQuery) (*rebound.PointList, error) {
	if err := f.rec(fmt.Sprintf("QueryPoints:%s:%d:%d:%s:%s:%s", m, q.After, q.Limit, q.Kind, q.Since.Format(time.RFC3339), q.Until.Format(time.RFC3339)), m); err != nil {
		return nil, err
	}
	return &rebound.PointList{Points: []rebound.RecoveryPoint{{ID: "p12", Seq: 12, Kind: q.Kind}}, Next: 12}, nil
}
func (f *fakeSite) ResolvePoint(_ context.Context, m, sel string) (rebound.RecoveryPoint, error) {
	return rebound.RecoveryPoint{ID: sel, Seq: 3}, f.rec("ResolvePoint:"+m, m)
}
func (f *fakeSite) Fence(_ context.Context, m string) (uint64, error) {
	return 1<<53 + 1, f.rec("Fence:"+m, m)
}
func (f *fakeSite) Unfence(_ context.Context, m string) error { return f.rec("Unfence:"+m, m) }
func (f *fakeSite) Replicated(_ context.Context, m string) (uint64, error) {
	return 77, f.rec("Replicated:"+m, m)
}
func (f *fakeSite) Activate(_ context.Context, s rebound.ActivateSpec) ([]rebound.Disk, error) {
	return []rebound.Disk{{Name: "d0", Size: 1 << 30, NBD: "nbd://x/" + s.PointID}}, f.rec("Activate:"+s.Machine, s.Machine)
}
func (f *fakeSite) Deactivate(_ context.Context, m string, test bool) error {
	if test {
		return f.rec("Deactivate:test:"+m, m)
	}
	return f.rec("Deactivate:"+m, m)
}
func (f *fakeSite) Commit(_ context.Context, m string, progress func(done, total int64)) error {
	for i := int64(1); i <= 3; i++ {
		progress(i, 3)
	}
	return f.rec("Commit:"+m, m)
}

// Release blocks until its context ends: it is the cancel probe.
func (f *fakeSite) CopyInfo(_ context.Context, m string) (*rebound.CopyInfo, error) {
	return &rebound.CopyInfo{Machine: m, Generation: "g1", Changed: [][]rebound.Region{{{Offset: 4096, Length: 512}}}}, f.rec("CopyInfo:"+m, m)
}
func (f *fakeSite) Digests(_ context.Context, m string, bs int64) ([]rebound.BlockDigests, error) {
	return []rebound.BlockDigests{{BlockSize: bs, Size: bs, Sums: [][]byte{{1, 2, 3}}}}, f.rec("Digests:"+m, m)
}
func (f *fakeSite) Reactivate(_ context.Context, m string) error {
	return f.rec("Reactivate:"+m, m)
}
func (f *fakeSite) SetHooks(_ context.Context, m string, h rebound.Hooks) error {
	return f.rec(fmt.Sprintf("SetHooks:%s:%s:%s", m, h.Freeze, h.Thaw), m)
}
func (f *fakeSite) Shutdown(_ context.Context, m string, o rebound.ShutdownOptions) error {
	return f.rec(fmt.Sprintf("Shutdown:%s:%s:%s", m, o.Mode, o.Timeout), m)
}
func (f *fakeSite) Detach(_ context.Context, m string, seq uint64) ([]string, error) {
	return []string{fmt.Sprintf("/%s/%d", m, seq)}, f.rec("Detach:"+m, m)
}
func (f *fakeSite) Power(_ context.Context, m, state string, test bool) error {
	return f.rec(fmt.Sprintf("Power:%s:%s:%v", m, state, test), m)
}
func (f *fakeSite) Console(_ context.Context, m string, tail int, test bool) ([]byte, error) {
	return []byte(fmt.Sprintf("console of %s tail %d test %v", m, tail, test)), f.rec("Console:"+m, m)
}

func (f *fakeSite) SetPolicy(_ context.Context, m string, p rebound.Policy) error {
	return f.rec("SetPolicy:"+m+":"+p.Name+":"+p.CrashInterval.String(), m)
}

func (f *fakeSite) Release(ctx context.Context, m string, _ time.Time) error {
	if f.blocking != nil {
		close(f.blocking)
	}
	<-ctx.Done()
	f.cancelled.Add(1)
	return ctx.Err()
}

type controlHarness struct {
	ts      *testServer
	ctl     *ControlServer
	site    *fakeSite
	mu      sync.Mutex
	reports int
	connect int
	discon  int
	seen    *compressionSeen
}

func newControlHarness(t *testing.T) *controlHarness {
	e := newEnv(t)
	h := &controlHarness{site: &fakeSite{name: "site-a"}, seen: &compressionSeen{}}
	h.ctl = &ControlServer{
		OnReport: func(site string, st *rebound.SiteStatus) {
			if site == "site-a" && st.NBDAddr == "10.0.0.1:10809" {
				h.mu.Lock()
				h.reports++
				h.mu.Unlock()
			}
		},
		OnConnect:    func(string) { h.mu.Lock(); h.connect++; h.mu.Unlock() },
		OnDisconnect: func(string) { h.mu.Lock(); h.discon++; h.mu.Unlock() },
	}
	h.ts = startServer(t, e.serverTLS, h.ctl.Register, ggrpc.StatsHandler(h.seen))
	_, cli := e.site(t, "site-a", "127.0.0.1")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- RunControl(ctx, h.ts.addr, cli, h.site, 50*time.Millisecond) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("RunControl: %v", err)
		}
	})
	waitFor(t, 10*time.Second, "site to connect", func() bool { return len(h.ctl.Connected()) == 1 })
	return h
}

func (h *controlHarness) counts() (reports, connect, discon int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.reports, h.connect, h.discon
}

func TestControl_AllMethods(t *testing.T) {
	h := newControlHarness(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, ok := h.ctl.Site("site-a")
	if !ok {
		t.Fatal("site-a not connected")
	}
	if got := h.ctl.Connected(); !reflect.DeepEqual(got, []string{"site-a"}) {
		t.Fatalf("Connected %v", got)
	}

	st, err := s.Status(ctx)
	if err != nil || st.Site != "site-a" || st.FreeBytes != 1<<40 || st.Machines[0].HeadSeq != 7 {
		t.Fatalf("Status %+v %v", st, err)
	}
	disks := []rebound.Disk{{Name: "d0", Size: 1 << 30}}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(s.CreateMachine(ctx, rebound.SiteMachine{Name: "vm1", Disks: disks}))
	must(s.StartReplication(ctx, rebound.ReplicationSpec{Machine: "vm1", Role: "source", Policy: rebound.DefaultPolicy()}))
	rp, err := s.CutPoint(ctx, "vm1", rebound.PointApp)
	if err != nil || rp.ID != "p1" || rp.Kind != rebound.PointApp || rp.Seq != 9 || !rp.Time.Equal(time.Unix(100, 0)) {
		t.Fatalf("CutPoint %+v %v", rp, err)
	}
	pl, err := s.ListPoints(ctx, "vm1")
	if err != nil || len(pl.Points) != 1 || pl.Points[0].Seq != 9 || !pl.Oldest.Equal(time.Unix(50, 0)) {
		t.Fatalf("ListPoints %+v %v", pl, err)
	}
	// A page's query travels in ListPoints' arguments.
	pl, err = s.QueryPoints(ctx, "vm1", rebound.PointQuery{After: 9, Limit: 1, Kind: rebound.PointApp, Since: time.Unix(60, 0), Until: time.Unix(70, 0)})
	if err != nil || len(pl.Points) != 1 || pl.Points[0].Seq != 12 || pl.Next != 12 {
		t.Fatalf("QueryPoints %+v %v", pl, err)
	}
	rp, err = s.ResolvePoint(ctx, "vm1", "latest")
	if err != nil || rp.ID != "latest" || rp.Seq != 3 {
		t.Fatalf("ResolvePoint %+v %v", rp, err)
	}
	if seq, err := s.Fence(ctx, "vm1"); err != nil || seq != 1<<53+1 {
		t.Fatalf("Fence %d %v", seq, err)
	}
	must(s.Unfence(ctx, "vm1"))
	if seq, err := s.Replicated(ctx, "vm1"); err != nil || seq != 77 {
		t.Fatalf("Replicated %d %v", seq, err)
	}
	ds, err := s.Activate(ctx, rebound.ActivateSpec{Machine: "vm1", PointID: "p1", Seq: 9})
	if err != nil || len(ds) != 1 || ds[0].NBD != "nbd://x/p1" {
		t.Fatalf("Activate %+v %v", ds, err)
	}
	must(s.Deactivate(ctx, "vm1", true))
	var prog [][2]int64
	must(s.Commit(ctx, "vm1", func(d, tot int64) { prog = append(prog, [2]int64{d, tot}) }))
	if len(prog) == 0 || prog[len(prog)-1] != [2]int64{3, 3} {
		t.Fatalf("progress %v, want ending at 3/3", prog)
	}
	ci, err := s.CopyInfo(ctx, "vm1")
	must(err)
	if ci.Generation != "g1" || len(ci.Changed) != 1 || ci.Changed[0][0] != (rebound.Region{Offset: 4096, Length: 512}) {
		t.Fatalf("CopyInfo = %+v", ci)
	}
	dg, err := s.Digests(ctx, "vm1", 65536)
	must(err)
	if len(dg) != 1 || dg[0].BlockSize != 65536 || string(dg[0].Sums[0]) != "\x01\x02\x03" {
		t.Fatalf("Digests = %+v", dg)
	}
	must(s.Reactivate(ctx, "vm1"))
	if paths, err := s.Detach(ctx, "vm1", 42); err != nil || len(paths) != 1 || paths[0] != "/vm1/42" {
		t.Fatalf("Detach = %v, %v", paths, err)
	}
	must(s.Power(ctx, "vm1", rebound.PowerOff, true))
	con, err := s.Console(ctx, "vm1", 4096, true)
	must(err)
	if string(con) != "console of vm1 tail 4096 test true" {
		t.Fatalf("Console = %q", con)
	}
	gold := rebound.DefaultPolicy()
	gold.Name, gold.CrashInterval = "gold", rebound.Duration(2*time.Second)
	must(s.SetPolicy(ctx, "vm1", gold))
	must(s.SetHooks(ctx, "vm1", rebound.Hooks{Freeze: "/f", Thaw: "/t"}))
	must(s.Shutdown(ctx, "vm1", rebound.ShutdownOptions{Mode: rebound.ShutdownForce, Timeout: rebound.Duration(30 * time.Second)}))
	must(s.StopReplication(ctx, "vm1"))
	must(s.DeleteMachine(ctx, "vm1"))

	want := []string{"CreateMachine:vm1:d0", "StartReplication:vm1:source:default", "CutPoint:vm1", "ListPoints:vm1",
		"QueryPoints:vm1:9:1:app:" + time.Unix(60, 0).Format(time.RFC3339) + ":" + time.Unix(70, 0).Format(time.RFC3339),
		"ResolvePoint:vm1", "Fence:vm1", "Unfence:vm1", "Replicated:vm1", "Activate:vm1", "Deactivate:test:vm1",
		"Commit:vm1", "CopyInfo:vm1", "Digests:vm1", "Reactivate:vm1", "Detach:vm1", "Power:vm1:off:true", "Console:vm1", "SetPolicy:vm1:gold:2s", "SetHooks:vm1:/f:/t", "Shutdown:vm1:force:30s", "StopReplication:vm1", "DeleteMachine:vm1"}
	h.site.mu.Lock()
	got := append([]string(nil), h.site.calls...)
	h.site.mu.Unlock()
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("site saw\n%v\nwant\n%v", got, want)
	}

	// Error codes survive the wire.
	err = s.DeleteMachine(ctx, "missing")
	if rebound.ErrorCode(err) != rebound.ENOTFOUND || !strings.Contains(err.Error(), `no machine "missing" here`) {
		t.Fatalf("missing: %v", err)
	}
	if _, err := s.ListPoints(ctx, "missing"); rebound.ErrorCode(err) != rebound.ENOTFOUND {
		t.Fatalf("ListPoints missing: %v", err)
	}
	err = s.CreateMachine(ctx, rebound.SiteMachine{Name: "vm2"})
	if rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("CreateMachine without disks: %v", err)
	}

	// Reports arrive.
	waitFor(t, 5*time.Second, "reports", func() bool { r, _, _ := h.counts(); return r >= 3 })

	// An unknown site.
	other, ok := h.ctl.Site("site-z")
	if ok {
		t.Fatal("site-z connected")
	}
	err = other.Unfence(ctx, "vm1")
	if rebound.ErrorCode(err) != rebound.EUNAVAILABLE || err.Error() != "site site-z is not connected" {
		t.Fatalf("unknown site: %v", err)
	}
	if got := h.seen.get(pb.Control_Connect_FullMethodName); got != Compressor {
		t.Fatalf("control channel compression %q", got)
	}
}

func TestControl_Cancel(t *testing.T) {
	h := newControlHarness(t)
	s, _ := h.ctl.Site("site-a")
	h.site.blocking = make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error)
	go func() { errc <- s.Release(ctx, "vm1", time.Time{}) }()
	<-h.site.blocking
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled call: %v", err)
	}
	waitFor(t, 5*time.Second, "site to see the cancel", func() bool { return h.site.cancelled.Load() == 1 })

	// A deadline cancels too.
	h.site.blocking = make(chan struct{})
	ctx, cancel = context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := s.Release(ctx, "vm1", time.Time{}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("deadline: %v", err)
	}
	waitFor(t, 5*time.Second, "site to see the deadline", func() bool { return h.site.cancelled.Load() == 2 })

	// The channel still works.
	if _, err := s.Replicated(context.Background(), "vm1"); err != nil {
		t.Fatal(err)
	}
}

func TestControl_Reconnect(t *testing.T) {
	h := newControlHarness(t)
	s, _ := h.ctl.Site("site-a")
	_, c, _ := h.counts()
	if c != 1 {
		t.Fatalf("OnConnect fired %d times", c)
	}
	h.ts.stop()
	waitFor(t, 5*time.Second, "disconnect", func() bool { _, _, d := h.counts(); return d == 1 })
	if err := s.Unfence(context.Background(), "vm1"); rebound.ErrorCode(err) != rebound.EUNAVAILABLE {
		t.Fatalf("call while disconnected: %v", err)
	}
	h.ts.start()
	waitFor(t, 10*time.Second, "reconnect", func() bool { _, c, _ := h.counts(); return c == 2 })
	if seq, err := s.Replicated(context.Background(), "vm1"); err != nil || seq != 77 {
		t.Fatalf("after reconnect: %d %v", seq, err)
	}
}

func TestControl_BadHello(t *testing.T) {
	e := newEnv(t)
	ctl := &ControlServer{}
	ts := startServer(t, e.serverTLS, func(s *ggrpc.Server) {
		ctl.Register(s)
		(&ReplicationServer{Target: func(string) (Target, error) { return Target{Sink: newMemSink(), SourceSite: "site-a"}, nil }}).Register(s)
	})
	_, cli := e.site(t, "site-a", "127.0.0.1")
	cc, err := Dial(ts.addr, cli)
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	try := func(m *pb.SiteMessage) error {
		cs, err := pb.NewControlClient(cc).Connect(ctx)
		if err != nil {
			return err
		}
		if err := cs.Send(m); err != nil {
			return err
		}
		_, err = cs.Recv()
		return err
	}
	err = try(&pb.SiteMessage{Body: &pb.SiteMessage_Hello{Hello: &pb.Hello{Version: 2, Site: "site-a", Status: []byte("{}")}}})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "version 2") || !strings.Contains(err.Error(), "speaks 1") {
		t.Fatalf("wrong version: %v", err)
	}
	err = try(&pb.SiteMessage{Body: &pb.SiteMessage_Hello{Hello: &pb.Hello{Version: 1, Site: "site-b", Status: []byte("{}")}}})
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("impersonation: %v", err)
	}
	err = try(&pb.SiteMessage{Body: &pb.SiteMessage_Report{Report: &pb.Report{}}})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("no hello: %v", err)
	}
	err = try(&pb.SiteMessage{Body: &pb.SiteMessage_Hello{Hello: &pb.Hello{Version: 1, Site: "site-a", Status: []byte("{bad")}}})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("bad status json: %v", err)
	}
	// Silence: the server gives up waiting for the hello.
	cs, err := pb.NewControlClient(cc).Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cs.Recv(); status.Code(err) != codes.DeadlineExceeded || !strings.Contains(err.Error(), "no hello") {
		t.Fatalf("silent client: %v", err)
	}
	rs, err := pb.NewReplicationClient(cc).Replicate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rs.Recv(); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("silent replication client: %v", err)
	}
	if len(ctl.Connected()) != 0 {
		t.Fatalf("connected: %v", ctl.Connected())
	}
}
