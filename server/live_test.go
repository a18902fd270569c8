package server

import (
	"context"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/sqlite"
)

// countingStore counts the writes of machines and sites (a decorator).
type countingStore struct {
	rebound.Store
	machines, sites atomic.Int64
}

func (c *countingStore) UpdateMachine(ctx context.Context, m *rebound.Machine) error {
	c.machines.Add(1)
	return c.Store.UpdateMachine(ctx, m)
}

func (c *countingStore) PutSite(ctx context.Context, s rebound.Site) error {
	c.sites.Add(1)
	return c.Store.PutSite(ctx, s)
}

// TestReportsKeepTelemetryOutOfTheStore: sites report every 2 s; reports
// that change only telemetry (lag, backlog, throughput, last point, a
// site's last-seen time) are served from memory and do not rewrite the
// machine's or the site's record; a change of replication state or of a
// site's address is written.
func TestReportsKeepTelemetryOutOfTheStore(t *testing.T) {
	ctx := context.Background()
	db, err := sqlite.Open(filepath.Join(t.TempDir(), "rebound.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.CreateMachine(ctx, &rebound.Machine{Name: "vm1", Driver: "none", State: rebound.MachineProtected,
		ActiveSite: "a", HomeSite: "a", Disks: []rebound.Disk{{Name: "d0", Size: 1 << 20}},
		Protection: &rebound.Protection{SourceSite: "a", TargetSite: "b", Policy: "default"}}); err != nil {
		t.Fatal(err)
	}
	cs := &countingStore{Store: db}
	// Both sites count as connected: health follows the reports.
	s := &Server{DB: cs, Site: func(string) (rebound.SiteService, bool) { return nil, true }}
	if err := s.Open(prometheus.NewRegistry()); err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	t0 := time.Now().UTC()
	report := func(i int, state, nbd string) {
		s.SiteReport("a", &rebound.SiteStatus{Site: "a", NBDAddr: nbd, ReplAddr: "a:8451", FreeBytes: int64(1000 - i), Time: t0,
			Machines: []rebound.MachineStatus{{Name: "vm1", Role: "source", ReplState: state, LagSeconds: float64(i) / 10,
				BacklogBytes: int64(i) << 20, ThroughputBps: float64(i) * 1e6}}})
		s.SiteReport("b", &rebound.SiteStatus{Site: "b", NBDAddr: "b:10809", ReplAddr: "b:8451", Time: t0,
			Machines: []rebound.MachineStatus{{Name: "vm1", Role: "target", LastPointTime: t0.Add(time.Duration(i) * time.Second)}}})
	}
	report(1, "streaming", "a:10809")
	m0, s0 := cs.machines.Load(), cs.sites.Load()
	if m0 == 0 || s0 != 2 {
		t.Fatalf("first report: %d machine writes, %d site writes", m0, s0)
	}
	for i := 2; i <= 20; i++ {
		report(i, "streaming", "a:10809")
	}
	if m, st := cs.machines.Load()-m0, cs.sites.Load()-s0; m != 0 || st != 0 {
		t.Fatalf("19 telemetry-only reports wrote the machine %d times and the site %d times", m, st)
	}
	// The API serves the newest figures all the same.
	m, err := s.GetMachine(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	if p := m.Protection; p.LagSeconds != 2 || p.BacklogBytes != 20<<20 || !p.LastPointTime.Equal(t0.Add(20*time.Second)) {
		t.Fatalf("served protection %+v", p)
	}
	sites, err := s.ListSites(ctx)
	if err != nil || len(sites) != 2 || sites[0].FreeBytes != 980 {
		t.Fatalf("served sites %+v %v", sites, err)
	}

	report(21, "spooling", "a:10809")
	if n := cs.machines.Load() - m0; n != 1 {
		t.Fatalf("a change of replication state: %d machine writes, want 1", n)
	}
	stored, _ := db.GetMachine(ctx, "vm1")
	if stored.Protection.ReplState != "spooling" {
		t.Fatalf("stored replication state %q", stored.Protection.ReplState)
	}
	report(22, "spooling", "a:10810")
	if n := cs.sites.Load() - s0; n != 1 {
		t.Fatalf("a new NBD address: %d site writes, want 1", n)
	}
}
