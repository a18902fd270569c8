package main

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	rhttp "github.com/rebound-dr/rebound/http"
)

// TestPointsPagedBySite: a machine whose journal at a real recovery site
// holds 2,500 points, listed through the API (HTTPS, the server asking
// the site over the control channel) in pages of several sizes and with
// filters: the pages followed by their cursor are exactly the site's
// whole list (filtered) split, in sequence order, no gap, no duplicate,
// a next cursor on every page but the last; and the site answers a page
// itself (its page holds the limit, not every point).
func TestPointsPagedBySite(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	m := &ServerMain{Config: ServerConfig{DataDir: filepath.Join(dir, "server"), APIAddr: "127.0.0.1:0", GRPCAddr: "127.0.0.1:0"}, Logger: slog.New(slog.DiscardHandler)}
	if err := m.Run(ctx); err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	mc := &rebound.Machine{Name: "vm1", Driver: "qemu", State: rebound.MachineProtected, ActiveSite: "primary", HomeSite: "primary",
		Disks:      []rebound.Disk{{Name: "disk0", Size: 4 << 30}, {Name: "disk1", Size: 4 << 30}},
		VM:         &rebound.VMSpec{MemoryMiB: 512, CPUs: 1},
		Protection: &rebound.Protection{SourceSite: "primary", TargetSite: "recovery", Policy: "default", ReplState: "streaming"}}
	if err := m.DB.CreateMachine(ctx, mc); err != nil {
		t.Fatal(err)
	}
	if _, err := m.DB.EnsureUser(ctx, "admin", rebound.RoleAdmin); err != nil {
		t.Fatal(err)
	}
	tok, err := m.DB.CreateToken(ctx, "admin", "test")
	if err != nil {
		t.Fatal(err)
	}
	cl, err := rhttp.NewClient(m.APIURL, tok.Secret, m.CA.CertPEM())
	if err != nil {
		t.Fatal(err)
	}
	quiet := slog.New(slog.DiscardHandler)
	startSiteOn(t, dir, quiet, "primary", m)
	rs := startSiteOn(t, dir, quiet, "recovery", m)
	pol, err := m.DB.GetPolicy(ctx, "default")
	if err != nil {
		t.Fatal(err)
	}
	if err := benchTargetSite(t, m).StartReplication(ctx, benchTargetSpec(*mc, *pol)); err != nil {
		t.Fatal(err)
	}
	if err := rs.Close(); err != nil {
		t.Fatal(err)
	}
	const n = 2500
	t0 := time.Now().Add(-time.Minute - n*5*time.Second)
	if _, err := benchJournal(filepath.Join(dir, "sites", "recovery", "machines", "vm1", "journal"), mc.Disks, t0, n); err != nil {
		t.Fatal(err)
	}
	rs, _ = benchRestartSite(t, rs)
	benchTargetSite(t, m)
	full, err := rs.Site.ListPoints(ctx, "vm1")
	if err != nil || len(full.Points) != n {
		t.Fatalf("the site's list: %v", err)
	}
	// The site's own page: the limit, and where the next goes on.
	pl, err := rs.Site.QueryPoints(ctx, "vm1", rebound.PointQuery{After: full.Points[99].Seq, Limit: 10})
	if err != nil || !reflect.DeepEqual(pl.Points, full.Points[100:110]) || pl.Next != full.Points[109].Seq {
		t.Fatalf("the site's page of 10 after the 100th point: %+v, %v", pl, err)
	}
	mid := full.Points[n/2].Time
	for _, f := range []rebound.ListQuery{{}, {Kind: "crash"}, {Kind: "app"}, {Since: mid}, {Until: mid}, {Since: full.Points[10].Time, Until: mid}} {
		pq := rebound.PointQuery{Kind: rebound.PointKind(f.Kind), Since: f.Since, Until: f.Until}
		want := []rebound.RecoveryPoint{}
		for _, p := range full.Points {
			if pq.Match(p) {
				want = append(want, p)
			}
		}
		for _, limit := range []int{1, 10, 999, 1250, rebound.MaxPageSize} {
			if limit == 1 && len(want) > 100 {
				continue // 2,500 calls of one point add nothing to 10's
			}
			t.Run(fmt.Sprintf("%s-%v-%v/limit%d", f.Kind, !f.Since.IsZero(), !f.Until.IsZero(), limit), func(t *testing.T) {
				q := f
				q.Limit = limit
				got := []rebound.RecoveryPoint{}
				for pages := 1; ; pages++ {
					page, err := cl.QueryPoints(ctx, "vm1", q)
					if err != nil {
						t.Fatal(err)
					}
					got = append(got, page.Points...)
					last := len(got) == len(want)
					if len(page.Points) != min(limit, len(want)-(pages-1)*limit) || (page.Next == "") != last {
						t.Fatalf("page %d: %d points, next %q; %d of %d so far", pages, len(page.Points), page.Next, len(got), len(want))
					}
					if last {
						break
					}
					if w := fmt.Sprint(page.Points[len(page.Points)-1].Seq); page.Next != w {
						t.Fatalf("page %d: next %q, want its last point's sequence %s", pages, page.Next, w)
					}
					q.Cursor = page.Next
				}
				if !reflect.DeepEqual(got, want) {
					t.Fatalf("the pages hold %d points, the site's list %d", len(got), len(want))
				}
			})
		}
	}
	// The client's whole list follows the pages.
	if all, err := cl.ListPoints(ctx, "vm1"); err != nil || !reflect.DeepEqual(all, full.Points) {
		t.Fatalf("all points: %d, %v", len(all), err)
	}
}
