package journal

import (
	"fmt"
	"reflect"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

// pageAll follows PointsPage's pages of q (q.Limit each) to the end and
// checks each page: at most the limit, Next the last point's sequence
// exactly when another page follows.
func pageAll(t *testing.T, j *Journal, q rebound.PointQuery) []rebound.RecoveryPoint {
	t.Helper()
	var all []rebound.RecoveryPoint
	for range 100000 {
		pl := j.PointsPage(q)
		if len(pl.Points) > q.Limit {
			t.Fatalf("page after %d: %d points, limit %d", q.After, len(pl.Points), q.Limit)
		}
		all = append(all, pl.Points...)
		if pl.Next == 0 {
			return all
		}
		if len(pl.Points) != q.Limit || pl.Next != pl.Points[len(pl.Points)-1].Seq {
			t.Fatalf("page after %d: %d points, next %d", q.After, len(pl.Points), pl.Next)
		}
		q.After = pl.Next
	}
	t.Fatal("pages do not end")
	return nil
}

// TestPointsPage: PointsPage's pages, followed by their Next, are exactly
// Points (with the query's filters applied), split: in sequence order, no
// gap, no duplicate; for every page size, kind and time bounds, with a
// mark folded into the base, and a mark inside a resync (no point).
func TestPointsPage(t *testing.T) {
	m := newModel(11, 64<<10)
	j := openJ(t, t.TempDir(), m)
	defer j.Close()
	if pl := j.PointsPage(rebound.PointQuery{Limit: 10}); len(pl.Points) != 0 || pl.Next != 0 {
		t.Fatalf("empty journal's page: %+v", pl)
	}
	m.add(&rebound.Record{Kind: rebound.RecordResyncBegin})
	m.add(&rebound.Record{Kind: rebound.RecordWrite, Length: 3, Data: []byte{1, 2, 3}})
	m.add(&rebound.Record{Kind: rebound.RecordResyncEnd})
	for i := range 300 {
		k := rebound.PointCrash
		if i%7 == 3 {
			k = rebound.PointApp
		}
		if i == 150 { // a resync: its mark is no point
			m.add(&rebound.Record{Kind: rebound.RecordResyncBegin})
			m.add(&rebound.Record{Kind: rebound.RecordMark, PointKind: k})
			m.add(&rebound.Record{Kind: rebound.RecordResyncEnd})
			continue
		}
		m.add(&rebound.Record{Kind: rebound.RecordWrite, Offset: int64(i), Length: 1, Data: []byte{byte(i)}})
		m.add(&rebound.Record{Kind: rebound.RecordMark, PointKind: k})
	}
	m.feed(t, j, 1, m.seq)
	check := func(stage string) {
		t.Helper()
		full := j.Points()
		mid := full.Points[len(full.Points)/2].Time
		for _, f := range []rebound.PointQuery{{}, {Kind: rebound.PointApp}, {Kind: rebound.PointCrash}, {Since: mid}, {Until: mid},
			{Kind: rebound.PointApp, Since: full.Points[3].Time, Until: mid}} {
			var want []rebound.RecoveryPoint
			for _, p := range full.Points {
				if f.Match(p) {
					want = append(want, p)
				}
			}
			for _, limit := range []int{1, 2, 7, 10, len(want) - 1, len(want), len(want) + 1, 1000} {
				if limit < 1 {
					continue
				}
				q := f
				q.Limit = limit
				t.Run(fmt.Sprintf("%s/%s-%v-%v/limit%d", stage, f.Kind, !f.Since.IsZero(), !f.Until.IsZero(), limit), func(t *testing.T) {
					if got := pageAll(t, j, q); !reflect.DeepEqual(got, want) {
						t.Fatalf("pages hold %d points, the filtered list %d:\n%v\nwant\n%v", len(got), len(want), got, want)
					}
				})
			}
			// No limit: all of them in one page.
			if pl := j.PointsPage(f); !reflect.DeepEqual(pl.Points, append([]rebound.RecoveryPoint{}, want...)) || pl.Next != 0 ||
				!pl.Oldest.Equal(full.Oldest) || !pl.Newest.Equal(full.Newest) {
				t.Fatalf("%s: one page without a limit: %d points, next %d; want %d", stage, len(pl.Points), pl.Next, len(want))
			}
		}
	}
	check("marks")
	if n := len(j.Points().Points); n != 299 {
		t.Fatalf("%d points, want 299 (the resync's mark is none)", n)
	}
	// A fold of the oldest third: its newest mark becomes the base's.
	if n, err := j.Expire(j.Points().Points[100].Time.Add(time.Nanosecond)); err != nil || n == 0 {
		t.Fatalf("expire: %d %v", n, err)
	}
	if pl := j.Points(); pl.Points[0].Seq != j.base {
		t.Fatalf("after the fold the first point is p%d, the base %d", pl.Points[0].Seq, j.base)
	}
	check("folded")
}
