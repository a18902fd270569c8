package http

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

func testJobResync() *rebound.Job {
	j := testJob()
	j.Type = "reprotect"
	j.BytesCompared, j.BytesSent, j.BytesTotal, j.ETASeconds = 4<<30, 40<<20, 41<<20+200<<10, 3.25
	return j
}

func TestLoopRoundTrip(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	c, f := e.client, e.fake
	f.job = testJobResync()

	req := rebound.ReprotectRequest{Machine: "web/1", To: "a", Policy: "gold", Verify: true,
		WaitReady: rebound.Duration(15 * time.Minute), Keep: "b"}
	j, err := c.Reprotect(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	same(t, j, f.job)
	check(t, f, "Reprotect", req)

	// Zero values stay zero: WaitReady 0 means "fail at once".
	j, err = c.Reprotect(ctx, rebound.ReprotectRequest{Machine: "web"})
	if err != nil || j.BytesSent != 40<<20 {
		t.Fatal(j, err)
	}
	check(t, f, "Reprotect", rebound.ReprotectRequest{Machine: "web"})

	for _, fr := range []rebound.FailoverRequest{
		{Machine: "web", Planned: true},
		{Machine: "web", Point: "p-9"},
	} {
		j, err = c.Failback(ctx, fr)
		if err != nil {
			t.Fatal(err)
		}
		same(t, j, f.job)
		check(t, f, "Failback", fr)
	}
	for _, ur := range []rebound.UnprotectRequest{{Machine: "web/1", KeepReplica: true}, {Machine: "web"}} {
		j, err = c.Unprotect(ctx, ur)
		if err != nil {
			t.Fatal(err)
		}
		same(t, j, f.job)
		check(t, f, "Unprotect", ur)
	}

	f.report = &rebound.PreflightReport{Machine: "web", Operation: "failback", OK: false, Checks: []rebound.PreflightCheck{
		{Name: "home site online", OK: true, Message: "a is online"},
		{Name: "lag", OK: false, Message: "lag 45s above RPO 30s"},
	}}
	rep, err := c.Preflight(ctx, "web", "failback")
	if err != nil {
		t.Fatal(err)
	}
	same(t, rep, f.report)
	check(t, f, "Preflight", "web", "failback")
	if _, err := c.Preflight(ctx, "web", ""); err != nil {
		t.Fatal(err)
	}
	check(t, f, "Preflight", "web", "")

	// Checks are [] on the wire, never null.
	f.report = &rebound.PreflightReport{Machine: "web", Operation: "reprotect", OK: true}
	_, _, _, body := e.raw(t, "GET", "/api/v1/machines/web/preflight?operation=reprotect", "Bearer "+testToken, "", nil)
	if !strings.Contains(string(body), `"checks":[]`) {
		t.Fatalf("body %s", body)
	}

	// The wire form of the request body.
	st, _, er, _ := e.raw(t, "POST", "/api/v1/machines/web/reprotect", "Bearer "+testToken, "",
		strings.NewReader(`{"to":"a","waitReady":"90s","verify":true}`))
	if st != 202 {
		t.Fatalf("status %d %+v", st, er)
	}
	check(t, f, "Reprotect", rebound.ReprotectRequest{Machine: "web", To: "a", Verify: true, WaitReady: rebound.Duration(90 * time.Second)})

	// Error codes survive.
	for _, code := range []string{rebound.ECONFLICT, rebound.EUNAVAILABLE, rebound.ENOTFOUND} {
		f.err = rebound.Errorf(code, "copies diverged: %s", code)
		if _, err := c.Reprotect(ctx, req); rebound.ErrorCode(err) != code || err.Error() != "copies diverged: "+code {
			t.Fatalf("reprotect %s: %v", code, err)
		}
		if _, err := c.Failback(ctx, rebound.FailoverRequest{Machine: "web"}); rebound.ErrorCode(err) != code {
			t.Fatalf("failback %s: %v", code, err)
		}
		if _, err := c.Preflight(ctx, "web", "failover"); rebound.ErrorCode(err) != code {
			t.Fatalf("preflight %s: %v", code, err)
		}
	}
}

func TestLoopBadRequests(t *testing.T) {
	e := newEnv(t)
	auth := "Bearer " + testToken
	e.fake.job = testJob()
	for _, tc := range []struct {
		name, method, path, body string
		status                   int
		msg                      string
	}{
		{"machine in body", "POST", "/api/v1/machines/web/reprotect", `{"machine":"db"}`, 400, `unknown field "machine"`},
		{"bad duration", "POST", "/api/v1/machines/web/reprotect", `{"waitReady":"soon"}`, 400, `invalid duration "soon"`},
		{"negative duration", "POST", "/api/v1/machines/web/reprotect", `{"waitReady":"-1s"}`, 400, "must not be negative"},
		{"bad verify", "POST", "/api/v1/machines/web/reprotect", `{"verify":"yes"}`, 400, `field "verify"`},
		{"failback field", "POST", "/api/v1/machines/web/failback", `{"to":"a"}`, 400, `unknown field "to"`},
		{"bad operation", "GET", "/api/v1/machines/web/preflight?operation=delete", "", 400, `not "delete"`},
		{"wrong method", "GET", "/api/v1/machines/web/reprotect", "", 405, "method GET is not allowed"},
	} {
		e.fake.call = ""
		st, _, er, body := e.raw(t, tc.method, tc.path, auth, "", strings.NewReader(tc.body))
		if st != tc.status || !strings.Contains(er.Error.Message, tc.msg) {
			t.Errorf("%s: %d %s, want %d containing %q", tc.name, st, body, tc.status, tc.msg)
		}
		if c, _ := e.fake.last(); c != "" {
			t.Errorf("%s: service was called (%s)", tc.name, c)
		}
	}
	// Empty bodies are fine: every field is optional.
	for _, p := range []string{"/api/v1/machines/web/reprotect", "/api/v1/machines/web/failback"} {
		if st, _, er, _ := e.raw(t, "POST", p, auth, "", nil); st != 202 {
			t.Errorf("%s empty body: %d %+v", p, st, er)
		}
	}
	// Unauthenticated requests never reach the LoopService.
	e.fake.call = ""
	if st, _, _, _ := e.raw(t, "POST", "/api/v1/machines/web/reprotect", "", "", nil); st != 401 {
		t.Fatalf("no token: %d", st)
	}
	if c, _ := e.fake.last(); c != "" {
		t.Fatalf("called without auth: %s", c)
	}
}

// TestLoopNotImplemented: a Server without Loop answers 501 with a clear
// message, and the Service routes keep working.
func TestLoopNotImplemented(t *testing.T) {
	f := &fakeService{job: testJob()}
	s := &Server{Service: f, Authenticate: func(context.Context, string) (rebound.Principal, error) {
		return rebound.Principal{User: "admin", Role: rebound.RoleAdmin, Via: "token"}, nil
	}}
	srv := httptest.NewTLSServer(s.Handler())
	defer srv.Close()
	c := &Client{BaseURL: srv.URL, Token: "t", HTTPClient: srv.Client()}
	ctx := context.Background()
	checkErr := func(what string, err error) {
		t.Helper()
		if rebound.ErrorCode(err) != CodeNotImplemented || !strings.Contains(err.Error(), what+" is not implemented by this server") {
			t.Fatalf("%s: %q %v", what, rebound.ErrorCode(err), err)
		}
	}
	_, err := c.Reprotect(ctx, rebound.ReprotectRequest{Machine: "web"})
	checkErr("reprotect", err)
	_, err = c.Failback(ctx, rebound.FailoverRequest{Machine: "web"})
	checkErr("failback", err)
	_, err = c.Preflight(ctx, "web", "failover")
	checkErr("preflight", err)
	req, _ := http.NewRequest("POST", srv.URL+"/api/v1/machines/web/failback", nil)
	req.Header.Set("Authorization", "Bearer t")
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 501 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	if c, _ := f.last(); c != "" {
		t.Fatalf("service called: %s", c)
	}
	if _, err := c.Commit(ctx, "web"); err != nil {
		t.Fatalf("commit without Loop: %v", err)
	}
}
