package http

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

// TestPointsPaging: the client follows X-Next-Cursor pages to the end;
// one page carries the cursor and a Link to the next; filters reach the
// service as a ListQuery.
func TestPointsPaging(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	for i := 1; i <= 7; i++ {
		e.fake.points = append(e.fake.points, rebound.RecoveryPoint{ID: "p" + string(rune('0'+i)), Seq: uint64(i * 10), Time: ts(i), Kind: rebound.PointCrash})
	}
	e.fake.pageSize = 3
	all, err := e.client.ListPoints(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	same(t, all, e.fake.points)
	// The last call asked for the page after the 6th point.
	check(t, e.fake, "QueryPoints", "web", rebound.ListQuery{Limit: rebound.MaxPageSize, Cursor: "60"})

	status, h, _, body := e.raw(t, "GET", "/api/v1/machines/web/points?limit=2&kind=crash&since=2026-05-06T07:08:00Z&until=2026-05-06T08:00:00Z", "Bearer "+testToken, "", nil)
	if status != 200 || h.Get(NextCursorHeader) != "20" {
		t.Fatalf("status %d next %q: %s", status, h.Get(NextCursorHeader), body)
	}
	if l := h.Get("Link"); !strings.HasPrefix(l, "</api/v1/machines/web/points?") || !strings.Contains(l, "cursor=20") || !strings.Contains(l, "limit=2") || !strings.HasSuffix(l, `>; rel="next"`) {
		t.Fatalf("Link %q", l)
	}
	var pts []rebound.RecoveryPoint
	if err := json.Unmarshal(body, &pts); err != nil || len(pts) != 2 || pts[1].Seq != 20 {
		t.Fatalf("page %s %v", body, err)
	}
	check(t, e.fake, "QueryPoints", "web", rebound.ListQuery{Limit: 2, Kind: "crash",
		Since: time.Date(2026, 5, 6, 7, 8, 0, 0, time.UTC), Until: time.Date(2026, 5, 6, 8, 0, 0, 0, time.UTC)})

	// The last page has no cursor.
	status, h, _, _ = e.raw(t, "GET", "/api/v1/machines/web/points?cursor=60", "Bearer "+testToken, "", nil)
	if status != 200 || h.Get(NextCursorHeader) != "" || h.Get("Link") != "" {
		t.Fatalf("last page: %d %v", status, h)
	}

	p, err := e.client.QueryPoints(ctx, "web", rebound.ListQuery{Limit: 2, Cursor: "20"})
	if err != nil || len(p.Points) != 2 || p.Points[0].Seq != 30 || p.Next != "40" {
		t.Fatalf("QueryPoints %+v %v", p, err)
	}
}

// TestListQueryErrors: bad filters are 400 with the rule, before the
// service is called.
func TestListQueryErrors(t *testing.T) {
	e := newEnv(t)
	for _, c := range []struct{ query, want string }{
		{"limit=0", "limit must be a number from 1 to 10000"},
		{"limit=10001", "limit must be a number from 1 to 10000"},
		{"limit=x", "limit must be"},
		{"since=yesterday", "since must be an RFC 3339 time"},
		{"until=1h", "until must be an RFC 3339 time"},
		{"since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z", "until (2026-01-01T00:00:00Z) must be after since"},
	} {
		for _, path := range []string{"/api/v1/machines/web/points?", "/api/v1/events?"} {
			e.fake.call = ""
			status, _, er, _ := e.raw(t, "GET", path+c.query, "Bearer "+testToken, "", nil)
			if status != 400 || er.Error.Code != rebound.EINVALID || !strings.Contains(er.Error.Message, c.want) {
				t.Fatalf("%s%s: %d %+v", path, c.query, status, er)
			}
			if call, _ := e.fake.last(); call != "" {
				t.Fatalf("%s%s reached the service: %s", path, c.query, call)
			}
		}
	}
}

func TestEventsPaging(t *testing.T) {
	e := newEnv(t)
	e.fake.events = []rebound.Event{{ID: 9, Time: ts(1), Kind: "job.protect", Message: "m"}}
	e.fake.next = "9"
	p, err := e.client.QueryEvents(context.Background(), rebound.ListQuery{Machine: "web", Kind: "job", Limit: 1, Until: ts(5)})
	if err != nil {
		t.Fatal(err)
	}
	same(t, p, &rebound.EventPage{Events: e.fake.events, Next: "9"})
	check(t, e.fake, "QueryEvents", rebound.ListQuery{Machine: "web", Kind: "job", Limit: 1, Until: ts(5)})
}

// TestCatalogNotImplemented: a server without a CatalogService answers 501
// for the new routes but still lists points and events without filters.
func TestCatalogNotImplemented(t *testing.T) {
	e := newEnv(t)
	s := &Server{Service: e.fake, Authenticate: func(context.Context, string) (rebound.Principal, error) {
		return rebound.Principal{User: "admin", Role: rebound.RoleAdmin, Via: "token"}, nil
	}}
	h := s.Handler()
	for _, c := range []struct {
		method, path string
		status       int
	}{
		{"GET", "/api/v1/sites/a", 501}, {"DELETE", "/api/v1/policies/gold", 501},
		{"GET", "/api/v1/machines/web/points?limit=5", 501}, {"GET", "/api/v1/events?kind=job", 501},
		{"GET", "/api/v1/machines/web/points", 200}, {"GET", "/api/v1/events", 200},
	} {
		req, _ := http.NewRequest(c.method, c.path, nil)
		req.Header.Set("Authorization", "Bearer x")
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != c.status {
			t.Fatalf("%s %s: %d, want %d: %s", c.method, c.path, rec.Code, c.status, rec.Body.String())
		}
	}
}

func TestSiteDetailAndDeletePolicy(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.fake.siteDetail = &rebound.SiteDetail{Site: rebound.Site{Name: "a", Status: rebound.SiteOnline, NBDAddr: "a:10809", ReplAddr: "a:8451", FreeBytes: 5, LastSeen: ts(3), Version: "v1"},
		Health: rebound.HealthNormal, Machines: []rebound.SiteMachineRole{{Name: "web", Role: "source", State: "protected", Health: "normal"}}}
	d, err := e.client.GetSite(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	same(t, d, e.fake.siteDetail)
	check(t, e.fake, "GetSite", "a")
	// The JSON flattens the site's fields next to health and machines, as
	// the OpenAPI schema SiteDetail says.
	_, _, _, body := e.raw(t, "GET", "/api/v1/sites/a", "Bearer "+testToken, "", nil)
	var m map[string]any
	json.Unmarshal(body, &m)
	doc := loadOpenAPI(t)
	var got, want []string
	for k := range m {
		got = append(got, k)
	}
	for k := range doc.Components.Schemas["SiteDetail"].Properties {
		want = append(want, k)
	}
	sort.Strings(got)
	sort.Strings(want)
	// healthReason is omitted when empty.
	want = slicesDelete(want, "healthReason")
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("site JSON keys %v, schema %v", got, want)
	}

	if err := e.client.DeletePolicy(ctx, "gold"); err != nil {
		t.Fatal(err)
	}
	check(t, e.fake, "DeletePolicy", "gold")
	e.fake.err = rebound.Errorf(rebound.ECONFLICT, "policy \"gold\" is used by machine web")
	if err := e.client.DeletePolicy(ctx, "gold"); rebound.ErrorCode(err) != rebound.ECONFLICT || !strings.Contains(err.Error(), "used by machine web") {
		t.Fatalf("in use: %v", err)
	}
}

func slicesDelete(s []string, v string) []string {
	out := s[:0]
	for _, x := range s {
		if x != v {
			out = append(out, x)
		}
	}
	return out
}

// TestPutPolicyExplicitZero: an explicit zero duration is refused with
// what to do; omitted ones reach the service as zero (the default).
func TestPutPolicyExplicitZero(t *testing.T) {
	e := newEnv(t)
	for _, f := range []string{"crashInterval", "retention", "rpoThreshold"} {
		e.fake.call = ""
		status, _, er, _ := e.raw(t, "PUT", "/api/v1/policies/gold", "Bearer "+testToken, "application/json", strings.NewReader(`{"`+f+`":"0s"}`))
		if status != 400 || !strings.Contains(er.Error.Message, f+" must not be 0: give a positive duration, or omit it for the default") {
			t.Fatalf("%s 0: %d %+v", f, status, er)
		}
		if call, _ := e.fake.last(); call != "" {
			t.Fatalf("%s 0 reached the service", f)
		}
	}
	status, _, er, _ := e.raw(t, "PUT", "/api/v1/policies/gold", "Bearer "+testToken, "application/json", strings.NewReader(`{"crashInterval":"2s","appInterval":"0s"}`))
	if status != 200 {
		t.Fatalf("app 0: %d %+v", status, er)
	}
	check(t, e.fake, "PutPolicy", rebound.Policy{Name: "gold", CrashInterval: rebound.Duration(2 * time.Second)})
}

// TestClientPutPolicyDefaults: the Go client's zero durations mean "the
// default", as for Service.PutPolicy in-process: they are left out of the
// body, not sent as an explicit 0s the edge refuses.
func TestClientPutPolicyDefaults(t *testing.T) {
	e := newEnv(t)
	p, err := e.client.PutPolicy(context.Background(), rebound.Policy{Name: "late", CrashInterval: rebound.Duration(8 * time.Second)})
	if err != nil {
		t.Fatal(err)
	}
	check(t, e.fake, "PutPolicy", rebound.Policy{Name: "late", CrashInterval: rebound.Duration(8 * time.Second)})
	same(t, *p, rebound.Policy{Name: "late", CrashInterval: rebound.Duration(8 * time.Second)})
}
