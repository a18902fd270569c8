package main

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	rhttp "github.com/rebound-dr/rebound/http"
	"github.com/rebound-dr/rebound/internal/pgtest"
	"github.com/rebound-dr/rebound/journal"
)

// benchMachines is how many machines BenchmarkAPIStore's store holds,
// benchPoints how many recovery points each has at the recovery site, and
// dayPoints how many the extra machine "day" has.
const (
	benchMachines = 2000
	benchPoints   = 100
	dayPoints     = 17000 // 23.6 h of the default policy's points, 5 s apart
)

// BenchmarkAPIStore measures the API's machine list and machine show, and
// a machine's recovery point list, over HTTPS with a token, with 2,000
// protected machines in the store and 100 points each (200,000) in the
// recovery site's journals, on SQLite and on PostgreSQL (a real server on
// a unix socket). Both sites are real in-process sites on the server's
// control channel; the points are listed by the recovery site from its
// journals, as every point list is. At that scale it also measures the
// recovery site's start, status report and a target's start and stop,
// and last, with one machine more holding dayPoints points, that
// machine's point list. The fixture's 2,000 targets are made by the site
// through the server, as protect makes them.
func BenchmarkAPIStore(b *testing.B) {
	for _, kind := range []string{"sqlite", "postgres"} {
		b.Run(kind, func(b *testing.B) {
			ctx := context.Background()
			dir := b.TempDir()
			cfg := ServerConfig{DataDir: filepath.Join(dir, "server"), APIAddr: "127.0.0.1:0", GRPCAddr: "127.0.0.1:0"}
			if kind == "postgres" {
				cfg.DB = pgtest.DSN(b)
			}
			m := &ServerMain{Config: cfg, Logger: slog.New(slog.DiscardHandler)}
			if err := m.Run(ctx); err != nil {
				b.Fatal(err)
			}
			defer m.Close()
			fixture := time.Now()
			ts := time.Date(2026, 11, 30, 0, 0, 0, 0, time.UTC)
			names := make([]string, benchMachines)
			for i := range benchMachines {
				name := fmt.Sprintf("vm%04d", i)
				names[i] = name
				if err := m.DB.CreateMachine(ctx, &rebound.Machine{
					Name: name, Driver: "qemu", State: rebound.MachineProtected, ActiveSite: "primary", HomeSite: "primary",
					Disks: []rebound.Disk{{Name: "disk0", Size: 32 << 30, NBD: "nbd://127.0.0.1:10809/" + name + "-disk0"},
						{Name: "disk1", Size: 64 << 30, NBD: "nbd://127.0.0.1:10809/" + name + "-disk1"}},
					VM:         &rebound.VMSpec{MemoryMiB: 2048, CPUs: 2},
					Protection: &rebound.Protection{SourceSite: "primary", TargetSite: "recovery", Policy: "default", ReplState: "streaming", LastPointTime: ts},
				}); err != nil {
					b.Fatal(err)
				}
			}
			storeFilled := time.Since(fixture)
			if _, err := m.DB.EnsureUser(ctx, "admin", rebound.RoleAdmin); err != nil {
				b.Fatal(err)
			}
			tok, err := m.DB.CreateToken(ctx, "admin", "bench")
			if err != nil {
				b.Fatal(err)
			}
			cl, err := rhttp.NewClient(m.APIURL, tok.Secret, m.CA.CertPEM())
			if err != nil {
				b.Fatal(err)
			}
			pts := benchRecoverySite(b, dir, m, cl)
			b.Logf("%s: fixture built in %s (store %s, targets %s, with their journals %s, site start with %d journals %s)", kind,
				time.Since(fixture).Round(time.Millisecond), storeFilled.Round(time.Millisecond), pts.targets.Round(time.Millisecond),
				pts.created.Round(time.Millisecond), benchMachines, pts.opened.Round(time.Millisecond))
			benchReport(b, "| %s | %d targets made at the recovery site through the server, 4 calls at a time | %.1f s |\n", kind, benchMachines, pts.targets.Seconds())
			benchReport(b, "| %s | the recovery site's start, opening %d journals of %d points | %.0f ms |\n", kind, benchMachines, benchPoints, float64(pts.opened.Microseconds())/1000)

			perCall := func(b *testing.B) float64 { return float64(b.Elapsed().Microseconds()) / 1000 / float64(b.N) }
			b.Run("list", func(b *testing.B) {
				for b.Loop() {
					ms, err := cl.ListMachines(ctx)
					if err != nil || len(ms) != benchMachines {
						b.Fatalf("list: %d machines, %v", len(ms), err)
					}
				}
				ms := perCall(b)
				b.ReportMetric(ms, "ms/list")
				benchReport(b, "| %s | list %d machines | %.1f ms |\n", kind, benchMachines, ms)
			})
			b.Run("show", func(b *testing.B) {
				i := 0
				for b.Loop() {
					name := names[i%benchMachines]
					if got, err := cl.GetMachine(ctx, name); err != nil || got.Name != name {
						b.Fatalf("show %s: %v", name, err)
					}
					i++
				}
				ms := perCall(b)
				b.ReportMetric(ms, "ms/show")
				benchReport(b, "| %s | show one of %d machines | %.2f ms |\n", kind, benchMachines, ms)
			})
			// GET /api/v1/machines/NAME/points: the server asks the
			// recovery site over the control channel, the site lists the
			// machine's journal. The default limit (1,000) holds all 100.
			points := func(q rebound.ListQuery, want int, next bool) func(b *testing.B) {
				return func(b *testing.B) {
					// One untimed call first: the first after the
					// fixture costs a one-time warm-up.
					if _, err := cl.QueryPoints(ctx, names[benchMachines-1], q); err != nil {
						b.Fatal(err)
					}
					i := 0
					for b.Loop() {
						name := names[i%benchMachines]
						p, err := cl.QueryPoints(ctx, name, q)
						if err != nil || len(p.Points) != want || p.Points[0].ID != pts.first[name] || (p.Next != "") != next {
							b.Fatalf("points of %s: %+v, %v; want %d from %s", name, p, err, want, pts.first[name])
						}
						i++
					}
				}
			}
			b.Run("points", func(b *testing.B) {
				points(rebound.ListQuery{}, benchPoints, false)(b)
				ms := perCall(b)
				b.ReportMetric(ms, "ms/points")
				benchReport(b, "| %s | list one machine's points (default limit: all %d, one page) | %.2f ms |\n", kind, benchPoints, ms)
			})
			b.Run("points-page10", func(b *testing.B) {
				points(rebound.ListQuery{Limit: 10}, 10, true)(b)
				ms := perCall(b)
				b.ReportMetric(ms, "ms/page")
				benchReport(b, "| %s | first page of 10 of one machine's %d points | %.2f ms |\n", kind, benchPoints, ms)
			})
			// The site's report, every 2 s, holds the site's lock while it
			// reads each journal's points.
			b.Run("site-status", func(b *testing.B) {
				for b.Loop() {
					st, err := pts.site.Site.Status(ctx)
					if err != nil || len(st.Machines) != benchMachines {
						b.Fatalf("status: %v", err)
					}
				}
				ms := perCall(b)
				b.ReportMetric(ms, "ms/status")
				benchReport(b, "| %s | the recovery site's status report (%d journals; sent every 2 s) | %.1f ms |\n", kind, benchMachines, ms)
			})
			// extraTarget is the recovery site and the spec of one more
			// target like the first machine's, named "extra".
			extraTarget := func(b *testing.B) (rebound.SiteService, rebound.ReplicationSpec) {
				dst := benchTargetSite(b, m)
				pol, err := m.DB.GetPolicy(ctx, "default")
				if err != nil {
					b.Fatal(err)
				}
				extra, err := m.DB.GetMachine(ctx, names[0])
				if err != nil {
					b.Fatal(err)
				}
				extra.Name = "extra"
				return dst, benchTargetSpec(*extra, *pol)
			}
			// What protect's "prepare target" costs at a site holding
			// 2,000 targets: the site opens a journal and appends the
			// unit to its state log; stop removes both.
			b.Run("site-add-target", func(b *testing.B) {
				dst, spec := extraTarget(b)
				for b.Loop() {
					if err := dst.StartReplication(ctx, spec); err != nil {
						b.Fatal(err)
					}
					if err := dst.StopReplication(ctx, spec.Machine); err != nil {
						b.Fatal(err)
					}
				}
				ms := perCall(b)
				b.ReportMetric(ms, "ms/start+stop")
				benchReport(b, "| %s | a target's start and stop at the recovery site holding %d (protect's and unprotect's site calls) | %.0f ms |\n", kind, benchMachines, ms)
			})
			// One target's start alone (protect's "prepare target"), its
			// stop outside the measured time.
			b.Run("site-start-target", func(b *testing.B) {
				dst, spec := extraTarget(b)
				var took time.Duration
				n := 0
				for b.Loop() {
					start := time.Now()
					if err := dst.StartReplication(ctx, spec); err != nil {
						b.Fatal(err)
					}
					took += time.Since(start)
					n++
					if err := dst.StopReplication(ctx, spec.Machine); err != nil {
						b.Fatal(err)
					}
				}
				ms := float64(took.Microseconds()) / 1000 / float64(n)
				b.ReportMetric(ms, "ms/start")
				benchReport(b, "| %s | one target's start at the recovery site holding %d units | %.1f ms |\n", kind, benchMachines, ms)
			})
			// One machine more, with a day's points: a page of it costs
			// its whole list at the site.
			dayFirst := benchDayMachine(b, m, pts, dir)
			day := func(b *testing.B, q rebound.ListQuery, want int, next bool) {
				if _, err := cl.QueryPoints(ctx, "day", q); err != nil { // untimed, as above
					b.Fatal(err)
				}
				for b.Loop() {
					p, err := cl.QueryPoints(ctx, "day", q)
					if err != nil || len(p.Points) != want || p.Points[0].ID != dayFirst || (p.Next != "") != next {
						b.Fatalf("points of day: %d, %v; want %d from %s", len(p.Points), err, want, dayFirst)
					}
				}
			}
			b.Run("day-page10", func(b *testing.B) {
				day(b, rebound.ListQuery{Limit: 10}, 10, true)
				ms := perCall(b)
				b.ReportMetric(ms, "ms/page")
				benchReport(b, "| %s | first page of 10 of one machine's %d points | %.1f ms |\n", kind, dayPoints, ms)
			})
			b.Run("day-page", func(b *testing.B) {
				day(b, rebound.ListQuery{}, rebound.DefaultPageSize, true)
				ms := perCall(b)
				b.ReportMetric(ms, "ms/page")
				benchReport(b, "| %s | first page (default limit, %d) of one machine's %d points | %.1f ms |\n", kind, rebound.DefaultPageSize, dayPoints, ms)
			})
			b.Run("day-all", func(b *testing.B) {
				for b.Loop() {
					all, err := cl.ListPoints(ctx, "day")
					if err != nil || len(all) != dayPoints || all[0].ID != dayFirst {
						b.Fatalf("all points of day: %d, %v", len(all), err)
					}
				}
				ms := perCall(b)
				b.ReportMetric(ms, "ms/list")
				benchReport(b, "| %s | all %d points of one machine (the client follows %d pages of %d) | %.1f ms |\n", kind, dayPoints, (dayPoints+rebound.MaxPageSize-1)/rebound.MaxPageSize, rebound.MaxPageSize, ms)
			})
		})
	}
}

// benchPointsSite is the recovery site of BenchmarkAPIStore.
type benchPointsSite struct {
	site    *SiteMain
	first   map[string]string // machine → its oldest point's ID
	created time.Duration     // the site's targets and journals written
	targets time.Duration     // the site's 2,000 targets made
	opened  time.Duration     // the site's start with them
}

// benchRecoverySite runs sites primary (empty) and recovery on m; the
// recovery site is the target of every machine in m's store, each journal
// holding benchPoints points. The site makes every target itself, through
// the server's control channel (StartReplication, as protect does), four
// calls at a time; with the site closed, every journal gets the records
// of an initial copy and of 100 crash points with the journal package, as
// the replication receiver appends them. The site then starts again and
// opens the 2,000 journals.
func benchRecoverySite(b *testing.B, dir string, m *ServerMain, cl *rhttp.Client) *benchPointsSite {
	b.Helper()
	ctx := context.Background()
	quiet := slog.New(slog.DiscardHandler)
	startSiteOn(b, dir, quiet, "primary", m)
	rs := startSiteOn(b, dir, quiet, "recovery", m)
	dst := benchTargetSite(b, m)
	pol, err := m.DB.GetPolicy(ctx, "default")
	if err != nil {
		b.Fatal(err)
	}
	ms, err := m.DB.ListMachines(ctx)
	if err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	benchParallel(b, len(ms), func(i int) error {
		if err := dst.StartReplication(ctx, benchTargetSpec(ms[i], *pol)); err != nil {
			return fmt.Errorf("target %s: %w", ms[i].Name, err)
		}
		return nil
	})
	targets := time.Since(start)
	if err := rs.Close(); err != nil {
		b.Fatal(err)
	}
	sitePath := filepath.Join(dir, "sites", "recovery")
	// The records: an initial copy (resync begin, a write, resync end),
	// then a 4 KiB write and a crash point every 5 s, the newest a
	// minute ago.
	t0 := time.Now().Add(-time.Minute - benchPoints*5*time.Second)
	first := map[string]string{}
	var mu sync.Mutex
	benchParallel(b, len(ms), func(i int) error {
		id, err := benchJournal(filepath.Join(sitePath, "machines", ms[i].Name, "journal"), ms[i].Disks, t0, benchPoints)
		if err != nil {
			return fmt.Errorf("journal of %s: %w", ms[i].Name, err)
		}
		mu.Lock()
		first[ms[i].Name] = id
		mu.Unlock()
		return nil
	})
	created := time.Since(start)
	rs, opened := benchRestartSite(b, rs)
	// The server has the site's report of every machine: its newest
	// point, health normal.
	newest := t0.Add(benchPoints * 5 * time.Second).UTC()
	waitUntil(b, 2*time.Minute, "the recovery site's report of 2,000 machines", func() bool {
		all, err := cl.ListMachines(ctx)
		if err != nil {
			return false
		}
		for _, mc := range all {
			if mc.Protection == nil || !mc.Protection.LastPointTime.Equal(newest) || mc.Health != rebound.HealthNormal {
				return false
			}
		}
		return true
	})
	return &benchPointsSite{site: rs, first: first, created: created, targets: targets, opened: opened}
}

// benchParallel runs fn(0..n-1), four at a time, and fails b on an error.
func benchParallel(b *testing.B, n int, fn func(i int) error) {
	b.Helper()
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				if err := fn(i); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
}

// benchRestartSite starts the closed site rs again (it is enrolled) and
// returns it and how long its start took.
func benchRestartSite(b testing.TB, rs *SiteMain) (*SiteMain, time.Duration) {
	b.Helper()
	rs = &SiteMain{Logger: rs.Logger, Config: rs.Config}
	rs.Config.JoinToken = ""
	start := time.Now()
	if err := rs.Run(context.Background()); err != nil {
		b.Fatal(err)
	}
	took := time.Since(start)
	b.Cleanup(func() { rs.Close() })
	return rs, took
}

// benchDayMachine adds machine "day" to the store, a target at the
// recovery site like the others but with dayPoints points, 5 s apart (the
// default policy's crash interval, within its 24 h retention), and
// returns its oldest point's ID. The site restarts for it.
func benchDayMachine(b *testing.B, m *ServerMain, pts *benchPointsSite, dir string) string {
	b.Helper()
	ctx := context.Background()
	mc, err := m.DB.GetMachine(ctx, "vm0000")
	if err != nil {
		b.Fatal(err)
	}
	mc.Name = "day"
	for i := range mc.Disks {
		mc.Disks[i].NBD = strings.Replace(mc.Disks[i].NBD, "vm0000", "day", 1)
	}
	if err := m.DB.CreateMachine(ctx, mc); err != nil {
		b.Fatal(err)
	}
	pol, err := m.DB.GetPolicy(ctx, "default")
	if err != nil {
		b.Fatal(err)
	}
	if err := benchTargetSite(b, m).StartReplication(ctx, benchTargetSpec(*mc, *pol)); err != nil {
		b.Fatal(err)
	}
	if err := pts.site.Close(); err != nil {
		b.Fatal(err)
	}
	t0 := time.Now().Add(-time.Minute - dayPoints*5*time.Second)
	first, err := benchJournal(filepath.Join(dir, "sites", "recovery", "machines", "day", "journal"), mc.Disks, t0, dayPoints)
	if err != nil {
		b.Fatal(err)
	}
	pts.site, _ = benchRestartSite(b, pts.site)
	benchTargetSite(b, m)
	return first
}

// benchTargetSite waits for the recovery site on m's control channel.
func benchTargetSite(b testing.TB, m *ServerMain) rebound.SiteService {
	b.Helper()
	var dst rebound.SiteService
	waitUntil(b, 30*time.Second, "the recovery site on the server", func() bool {
		var ok bool
		dst, ok = m.Control.Site("recovery")
		return ok
	})
	return dst
}

// benchTargetSpec is the spec protect gives the target of mc.
func benchTargetSpec(mc rebound.Machine, pol rebound.Policy) rebound.ReplicationSpec {
	var disks []rebound.Disk
	for _, d := range mc.Disks {
		disks = append(disks, rebound.Disk{Name: d.Name, Size: d.Size})
	}
	return rebound.ReplicationSpec{Machine: mc.Name, Role: "target", StreamID: mc.Name + ".bench", Disks: disks, VM: mc.VM,
		PeerSite: "primary", Policy: pol, Generation: "g-bench-" + mc.Name}
}

// benchJournal writes a journal of an initial copy and n crash points
// into dir, and returns its oldest point's ID.
func benchJournal(dir string, disks []rebound.Disk, t0 time.Time, n int) (string, error) {
	shapes := make([]rebound.Disk, len(disks))
	for i, d := range disks {
		shapes[i] = rebound.Disk{Name: d.Name, Size: d.Size}
	}
	j, err := journal.Open(dir, shapes, journal.Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return "", err
	}
	data := make([]byte, 4096)
	copy(data, dir)
	at := t0.UnixNano()
	recs := []*rebound.Record{
		{Seq: 1, Time: at, Kind: rebound.RecordResyncBegin},
		{Seq: 2, Time: at, Kind: rebound.RecordWrite, Offset: 0, Length: 4096, Data: data},
		{Seq: 3, Time: at, Kind: rebound.RecordResyncEnd},
	}
	for i := range n {
		at := t0.Add(time.Duration(i+1) * 5 * time.Second).UnixNano()
		seq := uint64(len(recs) + 1)
		recs = append(recs,
			&rebound.Record{Seq: seq, Time: at, Kind: rebound.RecordWrite, Disk: uint32(i % len(shapes)), Offset: int64(i+1) << 20, Length: 4096, Data: data},
			&rebound.Record{Seq: seq + 1, Time: at, Kind: rebound.RecordMark, PointKind: rebound.PointCrash})
	}
	if err := j.Append(recs); err != nil {
		j.Close()
		return "", err
	}
	pl := j.Points()
	if err := j.Close(); err != nil {
		return "", err
	}
	if len(pl.Points) != n {
		return "", fmt.Errorf("%d points, want %d", len(pl.Points), n)
	}
	return pl.Points[0].ID, nil
}
