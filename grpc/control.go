package grpc

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/grpc/pb"
	"github.com/rebound-dr/rebound/internal/failpoint"
	"github.com/rebound-dr/rebound/pki"
	ggrpc "google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// ControlServer serves the control channels sites open to the server and
// hands out a rebound.SiteService per connected site.
//
// The callbacks run on the site's channel goroutine (calls to other sites
// are not held up) and should return quickly: the site's answers wait
// behind them. Any of them may be nil.
type ControlServer struct {
	// OnReport receives each status a site pushes (its hello included).
	OnReport func(site string, st *rebound.SiteStatus)
	// OnConnect and OnDisconnect fire as a site's channel opens and closes.
	OnConnect, OnDisconnect func(site string)
	// OnEvent receives the events a site reports (e.g. a replication
	// stream it refused), for the server's event log, and the control
	// server's own (site.duplicate).
	OnEvent func(site string, e rebound.Event)
	// StoreEvent, if set, receives the sites' events instead of OnEvent
	// and stores them: nil means the store holds the event (stored now or
	// before, by its EventID), and the site gets an ack for it; an error
	// leaves it unacked, so the site keeps it and sends it again. The
	// welcome tells sites that this server acks.
	StoreEvent func(site string, e rebound.Event) error
	// eventHook, for tests, runs as an event with an ID is received
	// (stage "received") and once it is stored (stage "stored"), before
	// the ack; an error ends the channel there.
	eventHook func(stage string, e rebound.Event) error
	// Admit, if set, decides whether a site's certificate may open its
	// channel (an error refuses it with PermissionDenied), and whether the
	// channel replaces the site's open one (a rotated certificate's first
	// use) instead of being refused as a second connection.
	Admit func(site string, cert *x509.Certificate) (replace bool, err error)
	// Revocations, if set, returns the revocation list each site gets as
	// its channel opens (see PushRevocations).
	Revocations func() []string

	mu       sync.Mutex
	sessions map[string]*session
	refusals map[string]time.Time // site -> last duplicate refusal reported

	pb.UnimplementedControlServer
}

// Register adds the Control service to s.
func (c *ControlServer) Register(s *ggrpc.Server) { pb.RegisterControlServer(s, c) }

// Connected returns the names of the connected sites, sorted.
func (c *ControlServer) Connected() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	names := make([]string, 0, len(c.sessions))
	for n := range c.sessions {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Site returns a SiteService that calls the named site over its control
// channel, and whether the site is connected now. The proxy stays usable:
// each call goes to the site's current channel, and fails with
// EUNAVAILABLE while it has none.
func (c *ControlServer) Site(name string) (rebound.SiteService, bool) {
	c.mu.Lock()
	_, ok := c.sessions[name]
	c.mu.Unlock()
	return &siteProxy{c: c, site: name}, ok
}

func (c *ControlServer) session(name string) *session {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sessions[name]
}

// session is one open control channel.
type session struct {
	site   string
	serial string // of the certificate the channel opened with
	since  time.Time
	kick   chan error // receives why the server closes the channel; cap 1
	// agent is the one machine an agent's channel may speak of; empty for
	// a site.
	agent  string
	stream pb.Control_ConnectServer
	sendMu sync.Mutex
	nextID atomic.Uint64

	mu      sync.Mutex
	pending map[uint64]*pendingCall
	closed  error // set once the channel is gone
}

type pendingCall struct {
	done     chan *pb.SiteMessage // result or error, cap 1
	progress chan *pb.Progress    // latest progress only, cap 1
}

func (s *session) send(m *pb.ServerMessage) error {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	return s.stream.Send(m)
}

// Connect serves one site's control channel until it closes.
func (c *ControlServer) Connect(stream pb.Control_ConnectServer) error {
	id, err := peerSiteOrAgent(stream.Context())
	if err != nil {
		return err
	}
	name := id.Name
	first, err := recvFirst(stream.Recv)
	if err != nil {
		return err
	}
	hello := first.GetHello()
	if hello == nil {
		return status.Error(codes.InvalidArgument, "control: first message must be a hello")
	}
	if err := checkVersion("control", hello.Version); err != nil {
		return err
	}
	if hello.Site != name {
		return status.Errorf(codes.PermissionDenied, "control: certificate is for site %q, hello says %q", name, hello.Site)
	}
	cert, _ := peerCert(stream.Context())
	replace := false
	if c.Admit != nil {
		if replace, err = c.Admit(name, cert); err != nil {
			return status.Errorf(codes.PermissionDenied, "control: %s", rebound.ErrorMessage(err))
		}
	}
	s := &session{site: name, serial: pki.Serial(cert), since: time.Now(), kick: make(chan error, 1),
		agent: id.Machine, stream: stream, pending: make(map[uint64]*pendingCall)}
	st, err := s.decodeStatus(hello.Status)
	if err != nil {
		return err
	}
	// The welcome goes first: calls to the new channel wait for sendMu.
	s.sendMu.Lock()
	if err := c.claim(s, replace); err != nil {
		s.sendMu.Unlock()
		return err
	}
	err = s.stream.Send(&pb.ServerMessage{Body: &pb.ServerMessage_Welcome{Welcome: &pb.Welcome{Version: ProtocolVersion, EventAcks: c.StoreEvent != nil}}})
	s.sendMu.Unlock()
	if err != nil {
		c.release(s)
		return err
	}
	if c.OnConnect != nil {
		c.OnConnect(name)
	}
	if c.OnReport != nil {
		c.OnReport(name, st)
	}
	if c.Revocations != nil {
		// On its own goroutine: the answer comes through serve below. It
		// ends with the call, at the latest when the channel closes.
		list := c.Revocations()
		go func() {
			if err := c.pushRevocations(context.Background(), s, list); err != nil {
				slog.Warn("control: revocation list not delivered", "site", name, "err", err)
			}
		}()
	}

	errc := make(chan error, 1)
	go func() { errc <- c.serve(s) }()
	select {
	case err = <-errc:
	case err = <-s.kick:
		// Returning ends the stream, which ends serve's Recv.
	}

	s.mu.Lock()
	s.closed = rebound.Errorf(rebound.EUNAVAILABLE, "site %s disconnected", name)
	for id, p := range s.pending {
		delete(s.pending, id)
		p.done <- &pb.SiteMessage{Id: id, Body: &pb.SiteMessage_Error{Error: &pb.CallError{Code: rebound.EUNAVAILABLE, Message: s.closed.Error()}}}
	}
	s.mu.Unlock()
	current := c.release(s)
	if current && c.OnDisconnect != nil {
		c.OnDisconnect(name)
	}
	if errors.Is(err, io.EOF) {
		return nil
	}
	return err
}

// duplicateProbe bounds how long a site's open channel has to answer when
// a second one claims the site; a var for tests.
var duplicateProbe = 10 * time.Second

// duplicateEvery bounds how often a refused second channel of the same
// site is reported: a rogue retrying in a loop must not flood the log.
const duplicateEvery = time.Minute

// claim makes s the site's channel. A site already connected keeps its
// channel and s is refused (AlreadyExists, with an event), unless replace
// (a rotated certificate's first use) or the open channel does not answer
// a Status call within duplicateProbe: then it is a dead connection
// keepalive has not caught yet, and s replaces it.
func (c *ControlServer) claim(s *session, replace bool) error {
	c.mu.Lock()
	if c.sessions == nil {
		c.sessions = make(map[string]*session)
	}
	old := c.sessions[s.site]
	if old == nil || replace {
		c.sessions[s.site] = s
		c.mu.Unlock()
		if old != nil {
			old.close(status.Errorf(codes.PermissionDenied, "control: site %s connected with its new certificate", s.site))
		}
		return nil
	}
	c.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), duplicateProbe)
	probe := old.call(ctx, "Status", nil, nil, nil)
	cancel()
	dead := probe != nil && (errors.Is(probe, context.DeadlineExceeded) || rebound.ErrorCode(probe) == rebound.EUNAVAILABLE)
	c.mu.Lock()
	cur := c.sessions[s.site]
	if dead && cur == old {
		c.sessions[s.site] = s
		c.mu.Unlock()
		slog.Warn("control: a site's open channel did not answer; the new one replaces it", "site", s.site, "err", probe)
		old.close(status.Errorf(codes.Unavailable, "control: site %s reconnected", s.site))
		return nil
	}
	now := time.Now()
	if c.refusals == nil {
		c.refusals = make(map[string]time.Time)
	}
	last, seen := c.refusals[s.site]
	report := !seen || now.Sub(last) >= duplicateEvery
	if report {
		c.refusals[s.site] = now
	}
	c.mu.Unlock()

	from := "?"
	if p, ok := peer.FromContext(s.stream.Context()); ok && p.Addr != nil {
		from = p.Addr.String()
	}
	since := old.since.UTC().Format(time.RFC3339)
	if cur != nil && cur != old {
		since = cur.since.UTC().Format(time.RFC3339)
	}
	msg := fmt.Sprintf("refused a second control connection for site %s from %s (certificate serial %s): the site is already connected (since %s, serial %s) and keeps its connection. "+
		"Stop the other process running as %s; to give the site a new certificate use rebound site token %s --rotate",
		s.site, from, s.serial, since, old.serial, s.site, s.site)
	slog.Warn("control: "+msg, "site", s.site)
	if report && c.OnEvent != nil {
		c.OnEvent(s.site, rebound.Event{Time: now.UTC(), Kind: "site.duplicate", Message: msg})
	}
	return status.Errorf(codes.AlreadyExists, "control: site %s is already connected (since %s); this connection is refused: stop the other process running as %s, or replace the site's certificate with rebound site token %s --rotate", s.site, since, s.site, s.site)
}

// release drops s as its site's channel, and reports whether it was the
// current one.
func (c *ControlServer) release(s *session) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	current := c.sessions[s.site] == s
	if current {
		delete(c.sessions, s.site)
	}
	return current
}

// close ends the channel: Connect returns err to the site.
func (s *session) close(err error) {
	select {
	case s.kick <- err:
	default:
	}
}

// methodSetRevocations carries the revocation list to a site: a call the
// site's control loop answers itself (WithRevocations), not its
// SiteService.
const methodSetRevocations = "SetRevocations"

type revocationArgs struct {
	Serials []string `json:"serials"`
}

func (c *ControlServer) pushRevocations(ctx context.Context, s *session, list []string) error {
	if list == nil {
		list = []string{}
	}
	return s.call(ctx, methodSetRevocations, revocationArgs{Serials: list}, nil, nil)
}

// PushRevocations sends the revocation list (every revoked serial) to the
// connected sites and closes the channels opened with a certificate on it.
// It returns once every site has it, or with the errors of those that did
// not answer (they get the list again when they reconnect).
func (c *ControlServer) PushRevocations(ctx context.Context, list []string) error {
	revoked := make(map[string]bool, len(list))
	for _, s := range list {
		revoked[s] = true
	}
	c.mu.Lock()
	sessions := make([]*session, 0, len(c.sessions))
	for _, s := range c.sessions {
		sessions = append(sessions, s)
	}
	c.mu.Unlock()
	var errs []error
	for _, s := range sessions {
		if revoked[s.serial] {
			s.close(status.Errorf(codes.PermissionDenied, "control: the certificate of site %s (serial %s) is revoked", s.site, s.serial))
			continue
		}
		if err := c.pushRevocations(ctx, s, list); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// peerCert returns the caller's verified leaf certificate.
func peerCert(ctx context.Context) (*x509.Certificate, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil, status.Error(codes.Unauthenticated, "no peer information")
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(ti.State.VerifiedChains) == 0 || len(ti.State.VerifiedChains[0]) == 0 {
		return nil, status.Error(codes.Unauthenticated, "a client certificate issued by the Rebound CA is required (enroll first)")
	}
	return ti.State.VerifiedChains[0][0], nil
}

func (c *ControlServer) serve(s *session) error {
	for {
		m, err := s.stream.Recv()
		if err != nil {
			return err
		}
		switch b := m.Body.(type) {
		case *pb.SiteMessage_Report:
			st, err := s.decodeStatus(b.Report.Status)
			if err != nil {
				return err
			}
			if c.OnReport != nil {
				c.OnReport(s.site, st)
			}
		case *pb.SiteMessage_Event:
			if err := c.siteEvent(s, b.Event); err != nil {
				return err
			}
		case *pb.SiteMessage_Progress:
			s.mu.Lock()
			p := s.pending[m.Id]
			s.mu.Unlock()
			if p != nil {
				// Keep only the latest: a slow callback must not stall
				// the channel. This goroutine is the only sender.
				select {
				case p.progress <- b.Progress:
				default:
					select {
					case <-p.progress:
					default:
					}
					p.progress <- b.Progress
				}
			}
		case *pb.SiteMessage_Result, *pb.SiteMessage_Error:
			s.mu.Lock()
			p := s.pending[m.Id]
			delete(s.pending, m.Id)
			s.mu.Unlock()
			if p != nil {
				p.done <- m
			}
		default:
			return status.Errorf(codes.InvalidArgument, "control: unexpected message %T from site %s", m.Body, s.site)
		}
	}
}

// siteEvent records a site's event and acks it once stored. The store key
// is the channel's authenticated name and the site's ID: a site cannot
// shadow another's events.
func (c *ControlServer) siteEvent(s *session, ev *pb.SiteEvent) error {
	e := rebound.Event{Time: time.Unix(0, ev.Time).UTC(), Machine: ev.Machine, Site: s.site, Kind: ev.Kind, Message: ev.Message}
	if ev.Id != "" {
		e.EventID = s.site + "/" + ev.Id
	}
	ack := func() {
		if ev.Id != "" && c.StoreEvent != nil {
			// A failed send breaks the channel: the site sends it again.
			_ = s.send(&pb.ServerMessage{Body: &pb.ServerMessage_EventAck{EventAck: &pb.EventAck{Ids: []string{ev.Id}}}})
		}
	}
	if s.agent != "" && e.Machine != "" && e.Machine != s.agent {
		slog.Warn("control: agent reported an event of another machine; dropped", "agent", s.site, "machine", e.Machine)
		ack() // refused for good: the agent need not keep it
		return nil
	}
	if e.Kind == "" {
		ack()
		return nil
	}
	if c.StoreEvent == nil {
		if c.OnEvent != nil {
			c.OnEvent(s.site, e)
		}
		return nil
	}
	if err := c.atEvent(s, "received", e); err != nil {
		return err
	}
	if err := c.StoreEvent(s.site, e); err != nil {
		// Not acked: the site keeps the event and sends it again.
		// StoreEvent logs why (at a bounded rate for a full disk).
		return nil
	}
	if err := c.atEvent(s, "stored", e); err != nil {
		return err
	}
	ack()
	return nil
}

// atEvent is where tests stop a server as it handles an event with an ID:
// eventHook, and the failpoint grpc/control/event/STAGE/KIND. An error, or
// the channel ended meanwhile, ends the channel without an ack.
func (c *ControlServer) atEvent(s *session, stage string, e rebound.Event) error {
	if e.EventID == "" {
		return nil
	}
	if c.eventHook != nil {
		if err := c.eventHook(stage, e); err != nil {
			return err
		}
	}
	ctx := s.stream.Context()
	failpoint.Hit(ctx, "grpc/control/event/"+stage+"/"+e.Kind)
	return ctx.Err()
}

// decodeStatus decodes a site's status. An agent speaks only of its own
// machine: others it reports are dropped.
func (s *session) decodeStatus(b []byte) (*rebound.SiteStatus, error) {
	var st rebound.SiteStatus
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "control: bad site status: %v", err)
	}
	onlyMachine(&st, s.agent)
	return &st, nil
}

// onlyMachine drops from st every machine but agent's (for an agent).
func onlyMachine(st *rebound.SiteStatus, agent string) {
	if agent == "" {
		return
	}
	own := st.Machines[:0]
	for _, m := range st.Machines {
		if m.Name == agent {
			own = append(own, m)
		}
	}
	st.Machines = own
}

// machineOf returns the machine a call's arguments name.
func machineOf(args any) string {
	switch a := args.(type) {
	case rebound.SiteMachine:
		return a.Name
	case rebound.ReplicationSpec:
		return a.Machine
	case rebound.ActivateSpec:
		return a.Machine
	case machineArgs:
		return a.Machine
	}
	return ""
}

// call runs method on the site with args and decodes the answer into
// result (may be nil). progress, if set, receives Commit progress.
func (c *ControlServer) call(ctx context.Context, site, method string, args, result any, progress func(done, total int64)) error {
	s := c.session(site)
	if s == nil {
		return rebound.Errorf(rebound.EUNAVAILABLE, "site %s is not connected", site)
	}
	if m := machineOf(args); s.agent != "" && m != "" && m != s.agent {
		return rebound.Errorf(rebound.EINVALID, "%s is the agent of machine %s (its certificate is bound to it): it cannot hold machine %s; use a site", site, s.agent, m)
	}
	return s.call(ctx, method, args, result, progress)
}

// call runs method on this channel (see ControlServer.call).
func (s *session) call(ctx context.Context, method string, args, result any, progress func(done, total int64)) error {
	site := s.site
	argb, err := json.Marshal(args)
	if err != nil {
		return fmt.Errorf("%s: encode arguments: %w", method, err)
	}
	id := s.nextID.Add(1)
	p := &pendingCall{done: make(chan *pb.SiteMessage, 1), progress: make(chan *pb.Progress, 1)}
	s.mu.Lock()
	if s.closed != nil {
		s.mu.Unlock()
		return rebound.Errorf(rebound.EUNAVAILABLE, "site %s is not connected", site)
	}
	s.pending[id] = p
	s.mu.Unlock()

	if err := s.send(&pb.ServerMessage{Id: id, Body: &pb.ServerMessage_Call{Call: &pb.Call{Method: method, Args: argb}}}); err != nil {
		s.mu.Lock()
		delete(s.pending, id)
		s.mu.Unlock()
		return rebound.Errorf(rebound.EUNAVAILABLE, "site %s: send %s: %v", site, method, err)
	}
	for {
		select {
		case pr := <-p.progress:
			if progress != nil {
				progress(pr.Done, pr.Total)
			}
		case m := <-p.done:
			// Deliver a progress update that raced the answer first.
			select {
			case pr := <-p.progress:
				if progress != nil {
					progress(pr.Done, pr.Total)
				}
			default:
			}
			if e := m.GetError(); e != nil {
				return rebound.Errorf(e.Code, "site %s: %s", site, e.Message)
			}
			if result != nil {
				if err := json.Unmarshal(m.GetResult(), result); err != nil {
					return rebound.Errorf(rebound.EINTERNAL, "site %s: %s: bad result: %v", site, method, err)
				}
			}
			return nil
		case <-ctx.Done():
			s.mu.Lock()
			_, live := s.pending[id]
			delete(s.pending, id)
			s.mu.Unlock()
			if live {
				// Best effort: the site stops working on it; its late
				// answer is dropped above.
				_ = s.send(&pb.ServerMessage{Id: id, Body: &pb.ServerMessage_Cancel{Cancel: true}})
			}
			return fmt.Errorf("site %s: %s: %w", site, method, ctx.Err())
		}
	}
}

// Method arguments. Struct arguments (SiteMachine, ReplicationSpec,
// ActivateSpec) travel as themselves.
type machineArgs struct {
	Machine   string                   `json:"machine"`
	Kind      rebound.PointKind        `json:"kind,omitempty"`
	Selector  string                   `json:"selector,omitempty"`
	Test      bool                     `json:"test,omitempty"`
	Time      time.Time                `json:"time,omitempty"`
	BlockSize int64                    `json:"blockSize,omitempty"`
	State     string                   `json:"state,omitempty"`
	Tail      int                      `json:"tail,omitempty"`
	Hooks     *rebound.Hooks           `json:"hooks,omitempty"`
	Shutdown  *rebound.ShutdownOptions `json:"shutdown,omitempty"`
	Seq       uint64                   `json:"seq,omitempty"`
	// Page makes ListPoints QueryPoints; a site before it sends all.
	Page *rebound.PointQuery `json:"page,omitempty"`
}

// siteProxy is the server's view of one site's SiteService.
type siteProxy struct {
	c    *ControlServer
	site string
}

func (p *siteProxy) Status(ctx context.Context) (*rebound.SiteStatus, error) {
	var st rebound.SiteStatus
	if err := p.c.call(ctx, p.site, "Status", nil, &st, nil); err != nil {
		return nil, err
	}
	if s := p.c.session(p.site); s != nil {
		onlyMachine(&st, s.agent)
	}
	return &st, nil
}

func (p *siteProxy) CreateMachine(ctx context.Context, m rebound.SiteMachine) error {
	return p.c.call(ctx, p.site, "CreateMachine", m, nil, nil)
}

func (p *siteProxy) DeleteMachine(ctx context.Context, name string) error {
	return p.c.call(ctx, p.site, "DeleteMachine", machineArgs{Machine: name}, nil, nil)
}

func (p *siteProxy) StartReplication(ctx context.Context, spec rebound.ReplicationSpec) error {
	return p.c.call(ctx, p.site, "StartReplication", spec, nil, nil)
}

func (p *siteProxy) StopReplication(ctx context.Context, machine string) error {
	return p.c.call(ctx, p.site, "StopReplication", machineArgs{Machine: machine}, nil, nil)
}

func (p *siteProxy) CutPoint(ctx context.Context, machine string, kind rebound.PointKind) (rebound.RecoveryPoint, error) {
	var rp rebound.RecoveryPoint
	err := p.c.call(ctx, p.site, "CutPoint", machineArgs{Machine: machine, Kind: kind}, &rp, nil)
	return rp, err
}

func (p *siteProxy) ListPoints(ctx context.Context, machine string) (*rebound.PointList, error) {
	var pl rebound.PointList
	if err := p.c.call(ctx, p.site, "ListPoints", machineArgs{Machine: machine}, &pl, nil); err != nil {
		return nil, err
	}
	return &pl, nil
}

func (p *siteProxy) QueryPoints(ctx context.Context, machine string, q rebound.PointQuery) (*rebound.PointList, error) {
	var pl rebound.PointList
	if err := p.c.call(ctx, p.site, "ListPoints", machineArgs{Machine: machine, Page: &q}, &pl, nil); err != nil {
		return nil, err
	}
	return &pl, nil
}

func (p *siteProxy) ResolvePoint(ctx context.Context, machine, selector string) (rebound.RecoveryPoint, error) {
	var rp rebound.RecoveryPoint
	err := p.c.call(ctx, p.site, "ResolvePoint", machineArgs{Machine: machine, Selector: selector}, &rp, nil)
	return rp, err
}

func (p *siteProxy) Fence(ctx context.Context, machine string) (uint64, error) {
	var seq uint64
	err := p.c.call(ctx, p.site, "Fence", machineArgs{Machine: machine}, &seq, nil)
	return seq, err
}

func (p *siteProxy) Unfence(ctx context.Context, machine string) error {
	return p.c.call(ctx, p.site, "Unfence", machineArgs{Machine: machine}, nil, nil)
}

func (p *siteProxy) Replicated(ctx context.Context, machine string) (uint64, error) {
	var seq uint64
	err := p.c.call(ctx, p.site, "Replicated", machineArgs{Machine: machine}, &seq, nil)
	return seq, err
}

func (p *siteProxy) Activate(ctx context.Context, spec rebound.ActivateSpec) ([]rebound.Disk, error) {
	var disks []rebound.Disk
	err := p.c.call(ctx, p.site, "Activate", spec, &disks, nil)
	return disks, err
}

func (p *siteProxy) Deactivate(ctx context.Context, machine string, test bool) error {
	return p.c.call(ctx, p.site, "Deactivate", machineArgs{Machine: machine, Test: test}, nil, nil)
}

func (p *siteProxy) Commit(ctx context.Context, machine string, progress func(done, total int64)) error {
	return p.c.call(ctx, p.site, "Commit", machineArgs{Machine: machine}, nil, progress)
}

func (p *siteProxy) Release(ctx context.Context, machine string, failoverTime time.Time) error {
	return p.c.call(ctx, p.site, "Release", machineArgs{Machine: machine, Time: failoverTime}, nil, nil)
}

func (p *siteProxy) CopyInfo(ctx context.Context, machine string) (*rebound.CopyInfo, error) {
	var ci rebound.CopyInfo
	if err := p.c.call(ctx, p.site, "CopyInfo", machineArgs{Machine: machine}, &ci, nil); err != nil {
		return nil, err
	}
	return &ci, nil
}

func (p *siteProxy) Digests(ctx context.Context, machine string, blockSize int64) ([]rebound.BlockDigests, error) {
	var d []rebound.BlockDigests
	err := p.c.call(ctx, p.site, "Digests", machineArgs{Machine: machine, BlockSize: blockSize}, &d, nil)
	return d, err
}

func (p *siteProxy) Reactivate(ctx context.Context, machine string) error {
	return p.c.call(ctx, p.site, "Reactivate", machineArgs{Machine: machine}, nil, nil)
}

func (p *siteProxy) Power(ctx context.Context, machine, state string, test bool) error {
	return p.c.call(ctx, p.site, "Power", machineArgs{Machine: machine, State: state, Test: test}, nil, nil)
}

func (p *siteProxy) Console(ctx context.Context, machine string, tail int, test bool) ([]byte, error) {
	var b []byte
	err := p.c.call(ctx, p.site, "Console", machineArgs{Machine: machine, Tail: tail, Test: test}, &b, nil)
	return b, err
}

// policyArgs are SetPolicy's arguments.
type policyArgs struct {
	Machine string         `json:"machine"`
	Policy  rebound.Policy `json:"policy"`
}

func (p *siteProxy) SetPolicy(ctx context.Context, machine string, pol rebound.Policy) error {
	return p.c.call(ctx, p.site, "SetPolicy", policyArgs{Machine: machine, Policy: pol}, nil, nil)
}

func (p *siteProxy) SetHooks(ctx context.Context, machine string, hooks rebound.Hooks) error {
	return p.c.call(ctx, p.site, "SetHooks", machineArgs{Machine: machine, Hooks: &hooks}, nil, nil)
}

func (p *siteProxy) Shutdown(ctx context.Context, machine string, opts rebound.ShutdownOptions) error {
	return p.c.call(ctx, p.site, "Shutdown", machineArgs{Machine: machine, Shutdown: &opts}, nil, nil)
}

func (p *siteProxy) Detach(ctx context.Context, machine string, seq uint64) ([]string, error) {
	var paths []string
	err := p.c.call(ctx, p.site, "Detach", machineArgs{Machine: machine, Seq: seq}, &paths, nil)
	return paths, err
}

var _ rebound.SiteService = (*siteProxy)(nil)

// dispatch runs one call on the site's local SiteService and returns its
// JSON result. send delivers progress messages.
func dispatch(ctx context.Context, local rebound.SiteService, method string, args []byte, progress func(done, total int64)) (any, error) {
	decode := func(v any) error {
		if err := json.Unmarshal(args, v); err != nil {
			return rebound.Errorf(rebound.EINVALID, "%s: bad arguments: %v", method, err)
		}
		return nil
	}
	var a machineArgs
	switch method {
	case "Status":
		return local.Status(ctx)
	case "CreateMachine":
		var m rebound.SiteMachine
		if err := decode(&m); err != nil {
			return nil, err
		}
		return nil, local.CreateMachine(ctx, m)
	case "StartReplication":
		var spec rebound.ReplicationSpec
		if err := decode(&spec); err != nil {
			return nil, err
		}
		return nil, local.StartReplication(ctx, spec)
	case "Activate":
		var spec rebound.ActivateSpec
		if err := decode(&spec); err != nil {
			return nil, err
		}
		return local.Activate(ctx, spec)
	case "SetPolicy":
		var pa policyArgs
		if err := decode(&pa); err != nil {
			return nil, err
		}
		return nil, local.SetPolicy(ctx, pa.Machine, pa.Policy)
	}
	if err := decode(&a); err != nil {
		return nil, err
	}
	switch method {
	case "DeleteMachine":
		return nil, local.DeleteMachine(ctx, a.Machine)
	case "StopReplication":
		return nil, local.StopReplication(ctx, a.Machine)
	case "CutPoint":
		return local.CutPoint(ctx, a.Machine, a.Kind)
	case "ListPoints":
		if a.Page != nil {
			return local.QueryPoints(ctx, a.Machine, *a.Page)
		}
		return local.ListPoints(ctx, a.Machine)
	case "ResolvePoint":
		return local.ResolvePoint(ctx, a.Machine, a.Selector)
	case "Fence":
		return local.Fence(ctx, a.Machine)
	case "Unfence":
		return nil, local.Unfence(ctx, a.Machine)
	case "Replicated":
		return local.Replicated(ctx, a.Machine)
	case "Deactivate":
		return nil, local.Deactivate(ctx, a.Machine, a.Test)
	case "Commit":
		return nil, local.Commit(ctx, a.Machine, progress)
	case "Release":
		return nil, local.Release(ctx, a.Machine, a.Time)
	case "CopyInfo":
		return local.CopyInfo(ctx, a.Machine)
	case "Digests":
		return local.Digests(ctx, a.Machine, a.BlockSize)
	case "Reactivate":
		return nil, local.Reactivate(ctx, a.Machine)
	case "Power":
		return nil, local.Power(ctx, a.Machine, a.State, a.Test)
	case "Console":
		return local.Console(ctx, a.Machine, a.Tail, a.Test)
	case "SetHooks":
		if a.Hooks == nil {
			a.Hooks = &rebound.Hooks{}
		}
		return nil, local.SetHooks(ctx, a.Machine, *a.Hooks)
	case "Shutdown":
		if a.Shutdown == nil {
			a.Shutdown = &rebound.ShutdownOptions{}
		}
		return nil, local.Shutdown(ctx, a.Machine, *a.Shutdown)
	case "Detach":
		return local.Detach(ctx, a.Machine, a.Seq)
	}
	return nil, rebound.Errorf(rebound.EINVALID, "unknown site method %q (site speaks protocol %d)", method, ProtocolVersion)
}

// controlMaxBackoff bounds the wait between reconnects; a var for tests.
var controlMaxBackoff = 5 * time.Second

// ControlOption configures RunControl.
type ControlOption func(*controlOpts)

type controlOpts struct {
	events  <-chan rebound.Event
	revoked func(serials []string)
	// onChannel, for tests, hears the i-th server's channel go up and
	// down for events.
	onChannel func(i int, up bool)
	// onAck, for tests, hears the event IDs servers acked.
	onAck func(ids []string)
}

// WithRevocations hands the revocation lists the server pushes to set
// (e.g. pki.Revocations.Set, and a copy kept on disk for the next start).
func WithRevocations(set func(serials []string)) ControlOption {
	return func(o *controlOpts) { o.revoked = set }
}

// WithEvents forwards the events read from ch to the servers, exactly
// once: each gets an ID and waits in a bounded outbox until a server acks
// that its store holds it (events.go).
func WithEvents(ch <-chan rebound.Event) ControlOption {
	return func(o *controlOpts) { o.events = ch }
}

// RunControl keeps this site's control channel to the server at addr open
// until ctx is done, reconnecting with backoff. It serves the server's
// calls concurrently on local and pushes local.Status every reportEvery.
// It returns ctx's error.
func RunControl(ctx context.Context, addr string, tlsConf *tls.Config, local rebound.SiteService, reportEvery time.Duration, opts ...ControlOption) error {
	return RunControls(ctx, []string{addr}, tlsConf, local, reportEvery, opts...)
}

// RunControls keeps one control channel open to each server in addrs (the
// servers of one control plane, sharing a CA and a database), each
// reconnecting on its own as RunControl does, so any of them can call the
// site. Status reports go on every channel; each event goes on one live
// channel (the first in addrs' order) and again on another when that one
// goes down before the server acked it; the store keeps one event per ID.
// It returns ctx's error.
func RunControls(ctx context.Context, addrs []string, tlsConf *tls.Config, local rebound.SiteService, reportEvery time.Duration, opts ...ControlOption) error {
	if len(addrs) == 0 {
		return rebound.Errorf(rebound.EINVALID, "no server address to open a control channel to (--server-addr)")
	}
	var o controlOpts
	for _, f := range opts {
		f(&o)
	}
	r := newEventRouter(len(addrs))
	r.onChange, r.onAck = o.onChannel, o.onAck
	var wg sync.WaitGroup
	if o.events != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.run(ctx, o.events)
		}()
	}
	for i, addr := range addrs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runControlLoop(ctx, i, addr, tlsConf, local, reportEvery, o, r)
		}()
	}
	wg.Wait()
	return ctx.Err()
}

// runControlLoop keeps the channel to addr (the i-th server) open until ctx
// is done.
func runControlLoop(ctx context.Context, i int, addr string, tlsConf *tls.Config, local rebound.SiteService, reportEvery time.Duration, o controlOpts, r *eventRouter) {
	for attempt := 0; ; attempt++ {
		welcomed, err := runControlOnce(ctx, i, addr, tlsConf, local, reportEvery, o, r)
		if ctx.Err() != nil {
			return
		}
		if welcomed {
			attempt = 0
		}
		slog.Warn("control channel to server closed; reconnecting", "addr", addr, "err", explainHandshake(addr, err))
		if sleepCtx(ctx, backoff(attempt, controlMaxBackoff)) != nil {
			return
		}
	}
}

// explainHandshake names the fix when a server's certificate is not from
// the site's CA: a server of another control plane, or one started with
// its own CA instead of a copy of the shared one.
func explainHandshake(addr string, err error) error {
	if err == nil || !strings.Contains(err.Error(), "certificate signed by unknown authority") {
		return err
	}
	return rebound.Errorf(rebound.EUNAVAILABLE, "the server at %s shows a certificate not issued by this site's CA (tls/ca.crt in its data directory): "+
		"every server of one control plane must run with the same CA: copy the first server's ca directory (DATA/ca) to that server and start it with --ca-dir DIR, or remove %s from --server-addr (%v)", addr, addr, err)
}

// runControlOnce serves one channel to the i-th server; welcomed reports
// whether the server accepted the hello.
func runControlOnce(ctx context.Context, i int, addr string, tlsConf *tls.Config, local rebound.SiteService, reportEvery time.Duration, o controlOpts, r *eventRouter) (welcomed bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	st, err := local.Status(ctx)
	if err != nil {
		return false, fmt.Errorf("local status: %w", err)
	}
	stb, err := json.Marshal(st)
	if err != nil {
		return false, err
	}
	cc, err := Dial(addr, tlsConf)
	if err != nil {
		return false, err
	}
	defer cc.Close()
	stream, err := pb.NewControlClient(cc).Connect(ctx)
	if err != nil {
		return false, fromStatus("control", err)
	}
	var sendMu sync.Mutex
	send := func(m *pb.SiteMessage) error {
		sendMu.Lock()
		defer sendMu.Unlock()
		return stream.Send(m)
	}
	if err := send(&pb.SiteMessage{Body: &pb.SiteMessage_Hello{Hello: &pb.Hello{Version: ProtocolVersion, Site: st.Site, Status: stb}}}); err != nil {
		return false, fromStatus("control", err)
	}
	m, err := stream.Recv()
	if err != nil {
		return false, fromStatus("control", err)
	}
	if m.GetWelcome() == nil {
		return false, fmt.Errorf("control: server answered the hello with %T", m.Body)
	}
	if err := checkVersion("control", m.GetWelcome().Version); err != nil {
		return false, err
	}
	// Events may go on this channel until it ends.
	sender := &channelSender{idx: i, send: send, acks: m.GetWelcome().EventAcks}
	r.set(i, nil, sender)
	defer r.set(i, sender, nil)

	var wg sync.WaitGroup
	defer wg.Wait() // after cancel (deferred earlier, runs later): calls stop
	defer cancel()

	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(reportEvery)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			st, err := local.Status(ctx)
			if err != nil {
				slog.Warn("site status for report", "err", err)
				continue
			}
			b, _ := json.Marshal(st)
			if err := send(&pb.SiteMessage{Body: &pb.SiteMessage_Report{Report: &pb.Report{Status: b}}}); err != nil {
				return // Recv below sees the broken stream
			}
		}
	}()

	var mu sync.Mutex
	calls := make(map[uint64]context.CancelFunc)
	for {
		m, err := stream.Recv()
		if err != nil {
			return true, fromStatus("control", err)
		}
		switch b := m.Body.(type) {
		case *pb.ServerMessage_EventAck:
			r.ack(b.EventAck.Ids)
		case *pb.ServerMessage_Cancel:
			mu.Lock()
			if cancelCall := calls[m.Id]; cancelCall != nil {
				cancelCall()
			}
			mu.Unlock()
		case *pb.ServerMessage_Call:
			cctx, cancelCall := context.WithCancel(ctx)
			mu.Lock()
			calls[m.Id] = cancelCall
			mu.Unlock()
			wg.Add(1)
			go func(id uint64, call *pb.Call) {
				defer wg.Done()
				defer func() {
					mu.Lock()
					delete(calls, id)
					mu.Unlock()
					cancelCall()
				}()
				progress := func(done, total int64) {
					_ = send(&pb.SiteMessage{Id: id, Body: &pb.SiteMessage_Progress{Progress: &pb.Progress{Done: done, Total: total}}})
				}
				var res any
				var err error
				if call.Method == methodSetRevocations && o.revoked != nil {
					var a revocationArgs
					if err = json.Unmarshal(call.Args, &a); err == nil {
						o.revoked(a.Serials)
					}
				} else {
					res, err = dispatch(cctx, local, call.Method, call.Args, progress)
				}
				var reply *pb.SiteMessage
				if err != nil {
					reply = &pb.SiteMessage{Id: id, Body: &pb.SiteMessage_Error{Error: &pb.CallError{Code: rebound.ErrorCode(err), Message: rebound.ErrorMessage(err)}}}
				} else if b, err := json.Marshal(res); err != nil {
					reply = &pb.SiteMessage{Id: id, Body: &pb.SiteMessage_Error{Error: &pb.CallError{Code: rebound.EINTERNAL, Message: "encode result: " + err.Error()}}}
				} else {
					reply = &pb.SiteMessage{Id: id, Body: &pb.SiteMessage_Result{Result: b}}
				}
				_ = send(reply)
			}(m.Id, b.Call)
		default:
			slog.Warn("control: unexpected message from server", "type", fmt.Sprintf("%T", m.Body))
		}
	}
}
