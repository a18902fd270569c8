package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/peer"

	rgrpc "github.com/rebound-dr/rebound/grpc"
	rhttp "github.com/rebound-dr/rebound/http"
	"github.com/rebound-dr/rebound/internal/failpoint"
	"github.com/rebound-dr/rebound/internal/pgtest"
	"github.com/rebound-dr/rebound/pki"
)

// TestSeveralServersEventExactlyOnce: two in-process servers on one
// PostgreSQL, a site given both. A site event goes to server 1 (the first
// address), which dies (closed, at failpoint grpc/control/event/STAGE/...)
// before acking it: as it receives the event (nothing stored), or once it
// stored it. The site sends the event again on its channel to server 2,
// which stores it (or finds it stored: it acks it all the same): the
// event list shows it exactly once, through server 2, and a later event
// too.
func TestSeveralServersEventExactlyOnce(t *testing.T) {
	t.Parallel()
	for _, stage := range []string{"received", "stored"} {
		// One after the other: a failpoint is the process's.
		t.Run("died-after-"+stage, func(t *testing.T) { testEventExactlyOnce(t, stage) })
	}
}

func testEventExactlyOnce(t *testing.T, stage string) {
	ctx := context.Background()
	dsn := pgtest.DSN(t)
	dir := t.TempDir()
	logger := fixedUpLogger()
	s1, s2 := startSharedServers(t, dir, logger, dsn)
	sm := startSitesOn(t, dir, logger, s1, s2, "primary")["primary"]

	// Server 1 dies as the event reaches STAGE there; server 2 passing
	// the same point is recorded. Only this test's servers: other tests
	// of the package may run alongside.
	var once sync.Once
	killed := make(chan struct{})
	var mu sync.Mutex
	at2 := 0
	disable := failpoint.Enable("grpc/control/event/"+stage+"/replication.refused", func(ctx context.Context) {
		p, ok := peer.FromContext(ctx)
		if !ok || p.LocalAddr == nil {
			return
		}
		switch p.LocalAddr.String() {
		case s2.GRPCAddr:
			mu.Lock()
			at2++
			mu.Unlock()
		case s1.GRPCAddr:
			once.Do(func() {
				go func() {
					s1.Close()
					close(killed)
				}()
				<-ctx.Done() // the channel ends with the server: no ack
			})
		}
	})
	defer disable()

	sm.Site.Refused(rgrpc.Refusal{StreamID: "s-ev", Machine: "vm-ev", Peer: pki.Identity{Name: "intruder", Role: pki.RoleSite},
		Reason: "test event one"})
	select {
	case <-killed:
	case <-time.After(60 * time.Second):
		t.Fatal("server 1 never received the event")
	}

	tokenPath := filepath.Join(dir, "admin-token")
	if err := ensureAdminToken(ctx, s2.DB, tokenPath); err != nil {
		t.Fatal(err)
	}
	tok, err := os.ReadFile(tokenPath)
	if err != nil {
		t.Fatal(err)
	}
	svc2, err := rhttp.NewClient(s2.APIURL, strings.TrimSpace(string(tok)), s2.CA.CertPEM())
	if err != nil {
		t.Fatal(err)
	}
	count := func(reason string) int {
		evs, err := svc2.ListEvents(ctx, "vm-ev")
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, e := range evs {
			if e.Kind == "replication.refused" && e.Site == "primary" && strings.Contains(e.Message, reason) {
				n++
			}
		}
		return n
	}
	waitUntil(t, 60*time.Second, "the event through server 2", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return at2 > 0
	})
	// A later event from the same site: stored after the first in the
	// site's order.
	sm.Site.Refused(rgrpc.Refusal{StreamID: "s-ev2", Machine: "vm-ev", Peer: pki.Identity{Name: "intruder", Role: pki.RoleSite},
		Reason: "test event two"})
	waitUntil(t, 60*time.Second, "the second event through server 2", func() bool { return count("test event two") > 0 })
	if n, m := count("test event one"), count("test event two"); n != 1 || m != 1 {
		t.Fatalf("events listed %d and %d times, want once each", n, m)
	}
}
