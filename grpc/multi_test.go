package grpc

import (
	"context"
	"errors"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/pki"
	ggrpc "google.golang.org/grpc"
)

// multiServer is one server of a control plane, as a site sees it.
type multiServer struct {
	ts  *testServer
	ctl *ControlServer

	mu      sync.Mutex
	reports int
	events  []string // kinds, in arrival order
}

func (m *multiServer) counts() (reports int, events []string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.reports, append([]string(nil), m.events...)
}

func newMultiServer(t *testing.T, e *env) *multiServer {
	m := &multiServer{}
	m.ctl = &ControlServer{
		OnReport: func(string, *rebound.SiteStatus) { m.mu.Lock(); m.reports++; m.mu.Unlock() },
		OnEvent:  func(_ string, ev rebound.Event) { m.mu.Lock(); m.events = append(m.events, ev.Kind); m.mu.Unlock() },
	}
	m.ts = startServer(t, e.serverTLS, m.ctl.Register)
	return m
}

// callable waits until the server's call reaches the site: the site's
// channel is up on both ends (its events may go there).
func (m *multiServer) callable(t *testing.T, what string) {
	t.Helper()
	s, _ := m.ctl.Site("site-a")
	waitFor(t, 10*time.Second, what, func() bool {
		seq, err := s.Replicated(context.Background(), "vm1")
		return err == nil && seq == 77
	})
}

// TestControl_SeveralServers: a site given two servers keeps a channel to
// each; reports reach both, each event reaches one; when one server
// stops the other still gets reports, events and can call the site; when
// it comes back its channel is opened again.
func TestControl_SeveralServers(t *testing.T) {
	e := newEnv(t)
	s1, s2 := newMultiServer(t, e), newMultiServer(t, e)
	_, cli := e.site(t, "site-a", "127.0.0.1")
	events := make(chan rebound.Event)
	// The state of the site's channel to server 1, as its event router
	// sees it.
	chan1 := make(chan bool, 16)
	hook := func(o *controlOpts) {
		o.onChannel = func(i int, up bool) {
			if i == 0 {
				chan1 <- up
			}
		}
	}
	waitChan1 := func(want bool) {
		t.Helper()
		for {
			select {
			case up := <-chan1:
				if up == want {
					return
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("the site's channel to server 1 never went up=%v", want)
			}
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() {
		done <- RunControls(ctx, []string{s1.ts.addr, s2.ts.addr}, cli, &fakeSite{name: "site-a"}, 20*time.Millisecond, WithEvents(events), hook)
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("RunControls: %v", err)
		}
	})
	s1.callable(t, "server 1 to call the site")
	s2.callable(t, "server 2 to call the site")

	// Reports go on both channels.
	r1, _ := s1.counts()
	r2, _ := s2.counts()
	waitFor(t, 10*time.Second, "reports on both channels", func() bool {
		a, _ := s1.counts()
		b, _ := s2.counts()
		return a > r1+2 && b > r2+2
	})

	send := func(kind string) {
		select {
		case events <- rebound.Event{Time: time.Now(), Kind: kind, Message: kind}:
		case <-time.After(10 * time.Second):
			t.Fatalf("event %s not taken", kind)
		}
	}
	// Both up: each event goes to the first server only.
	send("e1")
	send("e2")
	waitFor(t, 10*time.Second, "events on server 1", func() bool { _, ev := s1.counts(); return len(ev) == 2 })
	// A call on channel 2 is answered after anything the site sent on it
	// before: an e1 or e2 sent there would be counted by now.
	s2.callable(t, "server 2 after the events")
	if _, ev := s1.counts(); strings.Join(ev, ",") != "e1,e2" {
		t.Fatalf("server 1 events %v, want e1,e2", ev)
	}
	if _, ev := s2.counts(); len(ev) != 0 {
		t.Fatalf("server 2 got events %v while server 1 was up: an event must reach one server", ev)
	}

	// Server 1 stops: server 2 still gets reports and events, and calls.
	s1.ts.stop()
	waitFor(t, 10*time.Second, "server 1 to drop the site", func() bool { return len(s1.ctl.Connected()) == 0 })
	// The site knows too: e3 below is not sent into the dead connection
	// (an event gRPC accepted there would be lost: docs/design/wire.md).
	waitChan1(false)
	r2, _ = s2.counts()
	waitFor(t, 10*time.Second, "reports on server 2 with server 1 down", func() bool { b, _ := s2.counts(); return b > r2+2 })
	s2.callable(t, "server 2 to call the site with server 1 down")
	send("e3")
	waitFor(t, 10*time.Second, "event e3 on server 2", func() bool { _, ev := s2.counts(); return len(ev) == 1 && ev[0] == "e3" })

	// Server 1 comes back on its address: the site opens its channel again
	// and events go to the first server again.
	s1.ts.start()
	waitChan1(true)
	s1.callable(t, "server 1 to call the site after its restart")
	r1, _ = s1.counts()
	waitFor(t, 10*time.Second, "reports on server 1 after its restart", func() bool { a, _ := s1.counts(); return a > r1+2 })
	send("e4")
	waitFor(t, 10*time.Second, "event e4 on server 1", func() bool { _, ev := s1.counts(); return len(ev) == 3 })
	s2.callable(t, "server 2 after e4")
	if _, ev := s1.counts(); strings.Join(ev, ",") != "e1,e2,e4" {
		t.Fatalf("server 1 events %v, want e1,e2,e4", ev)
	}
	if _, ev := s2.counts(); strings.Join(ev, ",") != "e3" {
		t.Fatalf("server 2 events %v, want e3 only", ev)
	}
}

// TestControl_ForeignCA: a server whose certificate is not from the site's
// CA (its own CA, not a copy of the shared one) is refused at the
// handshake, and the error names the fix.
func TestControl_ForeignCA(t *testing.T) {
	mine, other := newEnv(t), newEnv(t)
	foreign := newMultiServer(t, other)
	_, cli := mine.site(t, "site-a", "127.0.0.1")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err := runControlOnce(ctx, 0, foreign.ts.addr, cli, &fakeSite{name: "site-a"}, time.Second, controlOpts{}, newEventRouter(1))
	err = explainHandshake(foreign.ts.addr, err)
	if err == nil || !strings.Contains(err.Error(), "not issued by this site's CA") || !strings.Contains(err.Error(), "--ca-dir") {
		t.Fatalf("handshake with a server of another CA: %v", err)
	}
	if len(foreign.ctl.Connected()) != 0 {
		t.Fatal("the site connected to a server of another CA")
	}
}

// TestEnrollAny: enrolment moves past a server that cannot be reached, and
// stops at one that answers, even with a refusal.
func TestEnrollAny(t *testing.T) {
	e := newEnv(t)
	tk := &tokens{live: map[string]bool{"good": true}}
	ts := startServer(t, e.serverTLS, func(s *ggrpc.Server) {
		(&EnrollServer{CA: e.ca, Validate: tk.validate}).Register(s)
	})
	// An address nothing listens on.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	token := pki.FormatJoinToken("good", e.ca.Fingerprint())
	certPEM, _, _, err := EnrollAny(ctx, []string{dead, ts.addr}, token, "site-a", pki.RoleSite)
	if err != nil {
		t.Fatalf("enrol past a dead server: %v", err)
	}
	if cert, err := pki.ParseCert(certPEM); err != nil || cert.Subject.CommonName != "site-a" {
		t.Fatalf("certificate: %v", err)
	}
	// The token is used: the answer is final, the next server is not asked.
	second := startServer(t, e.serverTLS, func(s *ggrpc.Server) {
		(&EnrollServer{CA: e.ca, Validate: func(context.Context, string, string, pki.Role, string) error {
			t.Error("the second server was asked after the first answered")
			return nil
		}}).Register(s)
	})
	_, _, _, err = EnrollAny(ctx, []string{ts.addr, second.addr}, token, "site-a", pki.RoleSite)
	if rebound.ErrorCode(err) != rebound.EUNAUTHORIZED {
		t.Fatalf("used token: %v, want unauthorized", err)
	}
}
