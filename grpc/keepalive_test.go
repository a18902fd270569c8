package grpc

import (
	"context"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// freezeProxy forwards TCP connections until freeze, after which existing
// connections go silent (nothing forwarded, nothing closed), like a peer
// whose host died. New connections are forwarded normally.
type freezeProxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	frozen []chan struct{}
	done   chan struct{} // closed at cleanup: frozen pipes exit
}

func newFreezeProxy(t *testing.T, target string) *freezeProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &freezeProxy{ln: ln, target: target, done: make(chan struct{})}
	t.Cleanup(func() { ln.Close(); close(p.done) })
	go p.serve()
	return p
}

func (p *freezeProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		u, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		stop := make(chan struct{})
		p.mu.Lock()
		p.frozen = append(p.frozen, stop)
		p.mu.Unlock()
		pipe := func(dst, src net.Conn) {
			buf := make([]byte, 32<<10)
			for {
				n, err := src.Read(buf)
				select {
				case <-stop:
					<-p.done // silent until the test ends
					src.Close()
					dst.Close()
					return
				default:
				}
				if n > 0 {
					dst.Write(buf[:n])
				}
				if err != nil {
					if err != io.EOF {
						dst.Close()
					}
					return
				}
			}
		}
		go pipe(u, c)
		go pipe(c, u)
	}
}

func (p *freezeProxy) freeze() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, s := range p.frozen {
		close(s)
	}
	p.frozen = nil
}

// A peer that goes silent is dropped by keepalive within ~10 s, and the
// site reconnects.
func TestKeepalive_DeadPeer(t *testing.T) {
	if testing.Short() {
		t.Skip("takes ~10 s")
	}
	e := newEnv(t)
	disc := make(chan time.Time, 4)
	conn := make(chan struct{}, 4)
	ctl := &ControlServer{
		OnConnect:    func(string) { conn <- struct{}{} },
		OnDisconnect: func(string) { disc <- time.Now() },
	}
	ts := startServer(t, e.serverTLS, ctl.Register)
	proxy := newFreezeProxy(t, ts.addr)
	_, cli := e.site(t, "site-a", "127.0.0.1")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go RunControl(ctx, proxy.ln.Addr().String(), cli, &fakeSite{name: "site-a"}, time.Hour)
	<-conn

	frozeAt := time.Now()
	proxy.freeze()
	select {
	case at := <-disc:
		if d := at.Sub(frozeAt); d > 13*time.Second {
			t.Fatalf("dead peer noticed after %v", d)
		} else {
			t.Logf("dead peer noticed after %v", d)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("dead peer not noticed within 20 s")
	}
	select {
	case <-conn:
	case <-time.After(20 * time.Second):
		t.Fatal("site did not reconnect")
	}
}
