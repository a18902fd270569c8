package sqlite

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

func TestDeletePolicy(t *testing.T) {
	ctx := context.Background()
	db, _ := open(t)
	gold := rebound.DefaultPolicy()
	gold.Name = "gold"
	if err := db.PutPolicy(ctx, gold); err != nil {
		t.Fatal(err)
	}
	if err := db.DeletePolicy(ctx, "gold"); err != nil {
		t.Fatal(err)
	}
	_, err := db.GetPolicy(ctx, "gold")
	wantCode(t, err, rebound.ENOTFOUND)
	wantCode(t, db.DeletePolicy(ctx, "gold"), rebound.ENOTFOUND)
	if ps, _ := db.ListPolicies(ctx); len(ps) != 1 || ps[0].Name != "default" {
		t.Fatalf("policies %+v", ps)
	}
}

// TestQueryEvents: filters by machine, kind (exact or dotted prefix) and
// time, pages newest first with a cursor that events added meanwhile do
// not shift.
func TestQueryEvents(t *testing.T) {
	ctx := context.Background()
	db, _ := open(t)
	base := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	kinds := []string{"job.protect", "health.changed", "jobless"}
	for i := 0; i < 30; i++ {
		e := rebound.Event{Time: base.Add(time.Duration(i) * time.Minute), Machine: fmt.Sprintf("vm%d", i%2),
			Kind: kinds[i%3], Message: fmt.Sprint(i)}
		if err := db.AddEvent(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
	msgs := func(p *rebound.EventPage) (s []string) {
		for _, e := range p.Events {
			s = append(s, e.Message)
		}
		return s
	}
	q := rebound.ListQuery{Limit: 4}
	p, err := db.QueryEvents(ctx, q)
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(msgs(p)); got != "[29 28 27 26]" || p.Next == "" {
		t.Fatalf("first page %s next %q", got, p.Next)
	}
	// An event added between pages shows on no later page.
	if err := db.AddEvent(ctx, rebound.Event{Time: base.Add(time.Hour), Kind: "job.x", Message: "late"}); err != nil {
		t.Fatal(err)
	}
	q.Cursor = p.Next
	if p, err = db.QueryEvents(ctx, q); err != nil || fmt.Sprint(msgs(p)) != "[25 24 23 22]" {
		t.Fatalf("second page %v %v", msgs(p), err)
	}
	// Filters: vm1's job.* events from minute 10 to before 25.
	q = rebound.ListQuery{Limit: 100, Machine: "vm1", Kind: "job", Since: base.Add(10 * time.Minute), Until: base.Add(25 * time.Minute)}
	if p, err = db.QueryEvents(ctx, q); err != nil || fmt.Sprint(msgs(p)) != "[21 15]" || p.Next != "" {
		t.Fatalf("filtered %v next %q %v", msgs(p), p.Next, err)
	}
	// "job" is a dotted prefix: "jobless" is not a job event.
	q = rebound.ListQuery{Limit: 100, Kind: "job", Since: base, Until: base.Add(6 * time.Minute)}
	if p, err = db.QueryEvents(ctx, q); err != nil || fmt.Sprint(msgs(p)) != "[3 0]" {
		t.Fatalf("kind prefix %v %v", msgs(p), err)
	}
	q.Kind = "jobless"
	if p, err = db.QueryEvents(ctx, q); err != nil || fmt.Sprint(msgs(p)) != "[5 2]" {
		t.Fatalf("exact kind %v %v", msgs(p), err)
	}
	// The last page has no next; a page exactly at the end neither.
	q = rebound.ListQuery{Limit: 31}
	if p, err = db.QueryEvents(ctx, q); err != nil || len(p.Events) != 31 || p.Next != "" {
		t.Fatalf("whole list %d next %q %v", len(p.Events), p.Next, err)
	}
	_, err = db.QueryEvents(ctx, rebound.ListQuery{Limit: 5, Cursor: "x1"})
	wantCode(t, err, rebound.EINVALID)
	_, err = db.QueryEvents(ctx, rebound.ListQuery{})
	wantCode(t, err, rebound.EINVALID)
}
