package server

import (
	"context"
	"fmt"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/sqlite"
)

// pointsSite holds a target's points. old answers a query with every
// point, as a site from before QueryPoints does (it reads ListPoints'
// arguments without the page); otherwise it pages them as site.Site does.
type pointsSite struct {
	rebound.SiteService
	points  []rebound.RecoveryPoint
	old     bool
	queries int
}

func (p *pointsSite) ListPoints(ctx context.Context, m string) (*rebound.PointList, error) {
	return &rebound.PointList{Points: p.points}, nil
}

func (p *pointsSite) QueryPoints(ctx context.Context, m string, q rebound.PointQuery) (*rebound.PointList, error) {
	p.queries++
	if p.old {
		return p.ListPoints(ctx, m)
	}
	pl := &rebound.PointList{Points: []rebound.RecoveryPoint{}}
	for _, pt := range p.points {
		if pt.Seq <= q.After || !q.Match(pt) {
			continue
		}
		if q.Limit > 0 && len(pl.Points) == q.Limit {
			pl.Next = pl.Points[q.Limit-1].Seq
			break
		}
		pl.Points = append(pl.Points, pt)
	}
	return pl, nil
}

// TestQueryPointsPages: the API's pages of a machine's points, followed
// by their cursor, are exactly its point list (filtered) split: in
// sequence order, no gap, no duplicate, the next cursor on every page but
// the last; from a site that pages and from one that sends every point.
func TestQueryPointsPages(t *testing.T) {
	ctx := context.Background()
	db, err := sqlite.Open(filepath.Join(t.TempDir(), "rebound.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	if err := db.CreateMachine(ctx, &rebound.Machine{Name: "vm1", Driver: rebound.DriverNone, State: rebound.MachineProtected, ActiveSite: "a", HomeSite: "a",
		Disks:      []rebound.Disk{{Name: "d0", Size: 1 << 20}},
		Protection: &rebound.Protection{SourceSite: "a", TargetSite: "b", Policy: "default", ReplState: "streaming"}}); err != nil {
		t.Fatal(err)
	}
	site := &pointsSite{}
	for i := range 2500 {
		k := rebound.PointCrash
		if i%5 == 2 {
			k = rebound.PointApp
		}
		seq := uint64(10 + 2*i)
		site.points = append(site.points, rebound.RecoveryPoint{ID: fmt.Sprintf("p%d", seq), Seq: seq, Kind: k, Time: time.Date(2026, 11, 30, 0, 0, 0, 0, time.UTC).Add(time.Duration(i) * 5 * time.Second)})
	}
	s := &Server{DB: db, Site: func(name string) (rebound.SiteService, bool) { return site, name == "b" }, ID: "s1"}
	if err := s.Open(prometheus.NewRegistry()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	mid := site.points[1200].Time
	for _, old := range []bool{false, true} {
		site.old = old
		for _, f := range []rebound.ListQuery{{}, {Kind: "app"}, {Since: mid}, {Until: mid}, {Kind: "crash", Since: site.points[7].Time, Until: mid}} {
			var want []rebound.RecoveryPoint
			pq := rebound.PointQuery{Kind: rebound.PointKind(f.Kind), Since: f.Since, Until: f.Until}
			for _, p := range site.points {
				if pq.Match(p) {
					want = append(want, p)
				}
			}
			for _, limit := range []int{0, 1, 10, 999, len(want), rebound.MaxPageSize} {
				t.Run(fmt.Sprintf("old=%v/%s-%v-%v/limit%d", old, f.Kind, !f.Since.IsZero(), !f.Until.IsZero(), limit), func(t *testing.T) {
					q := f
					q.Limit = limit
					size := limit
					if size == 0 {
						size = rebound.DefaultPageSize
					}
					var got []rebound.RecoveryPoint
					site.queries = 0
					for {
						page, err := s.QueryPoints(ctx, "vm1", q)
						if err != nil {
							t.Fatal(err)
						}
						got = append(got, page.Points...)
						more := len(got) < len(want)
						if len(page.Points) != min(size, len(want)-len(got)+len(page.Points)) || (page.Next != "") != more {
							t.Fatalf("page after %q: %d points, next %q; %d of %d so far", q.Cursor, len(page.Points), page.Next, len(got), len(want))
						}
						if !more {
							break
						}
						if want := fmt.Sprint(page.Points[len(page.Points)-1].Seq); page.Next != want {
							t.Fatalf("next %q, want the page's last point's sequence %s", page.Next, want)
						}
						q.Cursor = page.Next
					}
					if !reflect.DeepEqual(got, want) {
						t.Fatalf("pages hold %d points, the list %d", len(got), len(want))
					}
					if n := (len(want) + size - 1) / size; site.queries != max(n, 1) {
						t.Fatalf("%d queries to the site for %d pages", site.queries, n)
					}
				})
			}
		}
	}
}
