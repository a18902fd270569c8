package server

import (
	"context"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/sqlite"
)

// TestSiteEventStoredOnce: a site's event that reaches two servers (sent
// on its channel to each: the first died before acking) is stored once,
// whichever server stores it first, even at the same moment; the same
// site-local ID from another site is another event. On SQLite (two
// handles on one file) and on PostgreSQL.
func TestSiteEventStoredOnce(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) {
			f := newHA(t, kind, 10*time.Second, nil, nil)
			at := time.Date(2026, 5, 6, 7, 8, 9, 10, time.UTC)
			ev := func(site string) rebound.Event {
				// grpc.ControlServer puts the channel's site name in
				// front of the site's own ID.
				return rebound.Event{Time: at, Machine: "vm1", Kind: "replication.refused", Message: "refused a stream", EventID: site + "/p1-1"}
			}
			start := make(chan struct{})
			var wg sync.WaitGroup
			errs := make(chan error, 8)
			for range 4 {
				for _, s := range []*Server{f.s1, f.s2} {
					wg.Add(1)
					go func() {
						defer wg.Done()
						<-start
						errs <- s.StoreSiteEvent("a", ev("a"))
					}()
				}
			}
			close(start)
			wg.Wait()
			close(errs)
			for err := range errs {
				if err != nil {
					t.Fatalf("store a site's event: %v", err)
				}
			}
			if err := f.s2.StoreSiteEvent("b", ev("b")); err != nil {
				t.Fatal(err)
			}
			evs, err := f.db.ListEvents(context.Background(), "vm1", 0)
			if err != nil {
				t.Fatal(err)
			}
			per := map[string]int{}
			for _, e := range evs {
				if e.Kind == "replication.refused" {
					per[e.Site]++
					if !e.Time.Equal(at) {
						t.Fatalf("event time %v, want the site's %v", e.Time, at)
					}
				}
			}
			if per["a"] != 1 || per["b"] != 1 || len(per) != 2 {
				t.Fatalf("events stored per site %v, want a:1 b:1 (%+v)", per, evs)
			}
		})
	}
}

// fullStore refuses events for want of space while full.
type fullStore struct {
	rebound.Store
	mu   sync.Mutex
	full bool
}

func (f *fullStore) setFull(v bool) { f.mu.Lock(); f.full = v; f.mu.Unlock() }

func (f *fullStore) AddEvent(ctx context.Context, e rebound.Event) error {
	f.mu.Lock()
	full := f.full
	f.mu.Unlock()
	if full {
		return rebound.Errorf(rebound.ENOSPACE, "no space left on device")
	}
	return f.Store.AddEvent(ctx, e)
}

// TestSiteEventNotAckedWhileFull: while the store refuses writes for want
// of space, a site's event with an ID is refused (the site keeps it,
// unacked) and not kept in the server's memory, where a death would lose
// it; an older site's event without an ID waits in memory as before. Once
// space returns, the site's resend is stored.
func TestSiteEventNotAckedWhileFull(t *testing.T) {
	db, err := sqlite.Open(filepath.Join(t.TempDir(), "rebound.db"))
	if err != nil {
		t.Fatal(err)
	}
	fs := &fullStore{Store: db}
	s := &Server{DB: fs, ID: "s1"}
	if err := s.Open(prometheus.NewRegistry()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close(); db.Close() })
	e := rebound.Event{Time: time.Now().UTC(), Machine: "vm1", Kind: "journal.damaged", Message: "m", EventID: "a/p-7"}
	fs.setFull(true)
	if err := s.StoreSiteEvent("a", e); rebound.ErrorCode(err) != rebound.ENOSPACE {
		t.Fatalf("event stored into a full store: %v, want no_space (not acked)", err)
	}
	if err := s.StoreSiteEvent("a", rebound.Event{Kind: "old.site", Message: "no id"}); err != nil {
		t.Fatalf("an event without an ID: %v", err)
	}
	s.store.mu.Lock()
	pending := append([]rebound.Event(nil), s.store.pending...)
	s.store.mu.Unlock()
	if len(pending) != 1 || pending[0].EventID != "" || pending[0].Kind != "old.site" {
		t.Fatalf("in memory while full: %+v, want only the event without an ID", pending)
	}
	fs.setFull(false)
	if err := s.StoreSiteEvent("a", e); err != nil {
		t.Fatalf("resent once space returned: %v", err)
	}
	evs, err := db.ListEvents(context.Background(), "vm1", 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(evs) != 1 || evs[0].Kind != "journal.damaged" {
		t.Fatalf("stored %+v", evs)
	}
}
