package http

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/syncbuf"
)

const testToken = "rbt_s3cret-Token-value-0123456789"

// syncBuffer is a log sink safe for concurrent writers.
type syncBuffer = syncbuf.Buffer

type env struct {
	fake   *fakeService
	srv    *httptest.Server
	client *Client
	logs   *syncBuffer
}

// newEnv serves a fake service over TLS and returns a client trusting the
// test server's certificate. The test fails if the token reaches the logs.
func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{fake: &fakeService{}, logs: &syncBuffer{}}
	s := &Server{
		Service: e.fake,
		Loop:    e.fake,
		Power:   e.fake,
		Catalog: e.fake,
		Groups:  e.fake,
		Authenticate: func(ctx context.Context, tok string) (rebound.Principal, error) {
			if tok != testToken {
				return rebound.Principal{}, rebound.Errorf(rebound.EUNAUTHORIZED, "invalid API token")
			}
			return rebound.Principal{User: "admin", Role: rebound.RoleAdmin, Via: "token"}, nil
		},
		Logger:  slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Metrics: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "rebound_up 1\n") }),
	}
	e.srv = httptest.NewTLSServer(s.Handler())
	t.Cleanup(e.srv.Close)
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: e.srv.Certificate().Raw})
	c, err := NewClient(e.srv.URL+"/", testToken, caPEM)
	if err != nil {
		t.Fatal(err)
	}
	e.client = c
	t.Cleanup(func() {
		if strings.Contains(e.logs.String(), "s3cret") {
			t.Errorf("token leaked into logs:\n%s", e.logs)
		}
	})
	return e
}

// raw sends a request with the test server's TLS client.
func (e *env) raw(t *testing.T, method, path, token, ctype string, body io.Reader) (int, http.Header, errorResponse, []byte) {
	t.Helper()
	req, _ := http.NewRequest(method, e.srv.URL+path, body)
	if token != "" {
		req.Header.Set("Authorization", token)
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	resp, err := e.srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var er errorResponse
	json.Unmarshal(b, &er)
	return resp.StatusCode, resp.Header, er, b
}

func ts(s int) time.Time { return time.Date(2026, 5, 6, 7, 8, s, 123456789, time.UTC) }

func testJob() *rebound.Job {
	end := ts(9)
	return &rebound.Job{ID: "j-0123abcd", Type: "failover", Machine: "web", State: rebound.JobRunning,
		Progress: 0.5, Step: "activate", Error: "",
		Steps:  []rebound.JobStep{{Name: "fence", State: rebound.JobSucceeded, Message: "ok"}, {Name: "activate", State: rebound.JobRunning}},
		Result: map[string]any{"point": "p-1"}, CreatedAt: ts(1), UpdatedAt: ts(2), EndedAt: &end}
}

func testMachine() *rebound.Machine {
	pt := rebound.RecoveryPoint{ID: "p-1", Time: ts(3), Kind: rebound.PointApp, Seq: 1 << 40}
	return &rebound.Machine{Name: "web", Driver: "none", State: rebound.MachineFailedOver, ActiveSite: "b", HomeSite: "a",
		Health: rebound.HealthCritical, HealthReason: "overflow",
		Disks: []rebound.Disk{{Name: "d0", Size: 10 << 30, NBD: "nbd://b:10809/web-d0"}},
		Protection: &rebound.Protection{SourceSite: "a", TargetSite: "b", Policy: "gold", ReplState: "overflow",
			SyncProgress: 0.25, LagSeconds: 3.5, BacklogBytes: 10, DirtyBytes: 20, ThroughputBps: 1e6, LastPointTime: ts(4), ReportedAt: ts(5)},
		Failover:     &rebound.FailoverInfo{FromSite: "a", ToSite: "b", Point: pt, Planned: true},
		TestFailover: &rebound.TestFailover{Site: "b", Point: pt, Disks: []rebound.Disk{{Name: "d0", Size: 1, NBD: "nbd://x"}}},
		CreatedAt:    ts(6)}
}

func check(t *testing.T, f *fakeService, call string, args ...any) {
	t.Helper()
	gotCall, gotArgs := f.last()
	if gotCall != call || !reflect.DeepEqual(gotArgs, args) {
		t.Fatalf("service got %s%v, want %s%v", gotCall, gotArgs, call, args)
	}
}

func same(t *testing.T, got, want any) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("round trip:\n got %#v\nwant %#v", got, want)
	}
}

func TestRoundTrip(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	c, f := e.client, e.fake

	f.sites = []rebound.Site{{Name: "a", Status: rebound.SiteOnline, NBDAddr: "a:1", ReplAddr: "a:2", FreeBytes: 5, LastSeen: ts(1), Version: "v"}}
	sites, err := c.ListSites(ctx)
	if err != nil {
		t.Fatal(err)
	}
	same(t, sites, f.sites)

	f.token = "rbe_tok"
	tok, err := c.CreateEnrollToken(ctx, "site b")
	if err != nil || tok != "rbe_tok" {
		t.Fatalf("%q %v", tok, err)
	}
	check(t, f, "CreateEnrollToken", "site b")

	f.machine = testMachine()
	req := rebound.CreateMachineRequest{Name: "web", Site: "a", Driver: "none", Disks: []int64{1 << 30, 2 << 30}}
	m, err := c.CreateMachine(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	same(t, m, f.machine)
	check(t, f, "CreateMachine", req)

	// A name that needs escaping reaches the service intact.
	m, err = c.GetMachine(ctx, "web/1 ?x")
	if err != nil {
		t.Fatal(err)
	}
	same(t, m, f.machine)
	check(t, f, "GetMachine", "web/1 ?x")

	f.machines = []rebound.Machine{*testMachine(), {Name: "db", Disks: []rebound.Disk{}, CreatedAt: ts(0)}}
	ms, err := c.ListMachines(ctx)
	if err != nil {
		t.Fatal(err)
	}
	same(t, ms, f.machines)

	if err := c.DeleteMachine(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	check(t, f, "DeleteMachine", "web")

	f.policies = []rebound.Policy{rebound.DefaultPolicy()}
	ps, err := c.ListPolicies(ctx)
	if err != nil {
		t.Fatal(err)
	}
	same(t, ps, f.policies)
	gold := rebound.Policy{Name: "gold", RPOThreshold: rebound.Duration(time.Second), Retention: rebound.Duration(time.Hour),
		CrashInterval: rebound.Duration(2 * time.Second), AppInterval: rebound.Duration(time.Minute)}
	p, err := c.PutPolicy(ctx, gold)
	if err != nil {
		t.Fatal(err)
	}
	same(t, *p, gold)
	check(t, f, "PutPolicy", gold)

	f.job = testJob()
	jobCalls := []struct {
		name string
		do   func() (*rebound.Job, error)
		args []any
	}{
		{"Protect", func() (*rebound.Job, error) {
			return c.Protect(ctx, rebound.ProtectRequest{Machine: "web", To: "b", Policy: "gold"})
		}, []any{rebound.ProtectRequest{Machine: "web", To: "b", Policy: "gold"}}},
		{"Failover", func() (*rebound.Job, error) {
			return c.Failover(ctx, rebound.FailoverRequest{Machine: "web", Point: "latest-app-consistent", Planned: true})
		}, []any{rebound.FailoverRequest{Machine: "web", Point: "latest-app-consistent", Planned: true}}},
		{"ChangePoint", func() (*rebound.Job, error) { return c.ChangePoint(ctx, "web", "p-7") }, []any{"web", "p-7"}},
		{"CancelFailover", func() (*rebound.Job, error) { return c.CancelFailover(ctx, "web") }, []any{"web"}},
		{"Commit", func() (*rebound.Job, error) { return c.Commit(ctx, "web") }, []any{"web"}},
		{"TestFailover", func() (*rebound.Job, error) { return c.TestFailover(ctx, "web", "2026-01-01T00:00:00Z") }, []any{"web", "2026-01-01T00:00:00Z"}},
		{"TestFailoverCleanup", func() (*rebound.Job, error) { return c.TestFailoverCleanup(ctx, "web") }, []any{"web"}},
		{"GetJob", func() (*rebound.Job, error) { return c.GetJob(ctx, "j-1") }, []any{"j-1"}},
		{"CancelJob", func() (*rebound.Job, error) { return c.CancelJob(ctx, "j-1") }, []any{"j-1"}},
	}
	for _, jc := range jobCalls {
		j, err := jc.do()
		if err != nil {
			t.Fatalf("%s: %v", jc.name, err)
		}
		same(t, j, f.job)
		check(t, f, jc.name, jc.args...)
	}

	f.points = []rebound.RecoveryPoint{{ID: "p-1", Time: ts(1), Kind: rebound.PointCrash, Seq: 7}, {ID: "p-2", Time: ts(2), Kind: rebound.PointApp, Seq: 9}}
	pts, err := c.ListPoints(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	same(t, pts, f.points)
	check(t, f, "QueryPoints", "web", rebound.ListQuery{Limit: rebound.MaxPageSize})
	f.point = &f.points[1]
	pt, err := c.CreatePoint(ctx, "web", true)
	if err != nil {
		t.Fatal(err)
	}
	same(t, pt, f.point)
	check(t, f, "CreatePoint", "web", true)

	f.jobs = []rebound.Job{*testJob(), {ID: "j-2", Type: "protect", Machine: "db", State: rebound.JobQueued, Steps: []rebound.JobStep{}, CreatedAt: ts(1), UpdatedAt: ts(1)}}
	js, err := c.ListJobs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	same(t, js, f.jobs)
	js, err = c.ListMachineJobs(ctx, "db")
	if err != nil {
		t.Fatal(err)
	}
	same(t, js, f.jobs[1:])

	f.events = []rebound.Event{{ID: 3, Time: ts(1), Machine: "web", Site: "a", Kind: "health", Message: "critical"}}
	evs, err := c.ListEvents(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	same(t, evs, f.events)
	check(t, f, "QueryEvents", rebound.ListQuery{Machine: "web"})

	// Empty lists are [] on the wire, not null.
	f.sites = nil
	_, _, _, body := e.raw(t, "GET", "/api/v1/sites", "Bearer "+testToken, "", nil)
	if strings.TrimSpace(string(body)) != "[]" {
		t.Fatalf("empty list body %q", body)
	}
}

func TestStatusCodes(t *testing.T) {
	e := newEnv(t)
	auth := "Bearer " + testToken
	e.fake.machine, e.fake.job, e.fake.point = testMachine(), testJob(), &rebound.RecoveryPoint{ID: "p"}
	for _, tc := range []struct {
		method, path, body string
		status             int
	}{
		{"POST", "/api/v1/machines", `{"name":"x","site":"a","disks":[1]}`, 201},
		{"DELETE", "/api/v1/machines/x", "", 204},
		{"POST", "/api/v1/machines/x/protect", `{"to":"b"}`, 202},
		{"POST", "/api/v1/machines/x/points", "", 201}, // body optional
		{"POST", "/api/v1/machines/x/failover", "", 202},
		{"POST", "/api/v1/machines/x/commit", "", 202},
		{"POST", "/api/v1/sites/b/enroll-tokens", "", 201},
		{"POST", "/api/v1/jobs/j-1/cancel", "", 200},
	} {
		st, _, er, _ := e.raw(t, tc.method, tc.path, auth, "", strings.NewReader(tc.body))
		if st != tc.status {
			t.Errorf("%s %s: status %d (%+v), want %d", tc.method, tc.path, st, er, tc.status)
		}
	}
}

func TestErrorCodesSurvive(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	for code, status := range map[string]int{
		rebound.EINVALID: 400, rebound.ENOTFOUND: 404, rebound.ECONFLICT: 409,
		rebound.EUNAVAILABLE: 503, rebound.EUNAUTHORIZED: 401, rebound.ENOSPACE: 507,
	} {
		e.fake.err = rebound.Errorf(code, "machine %q says %s", "web", code)
		_, err := e.client.Commit(ctx, "web")
		if rebound.ErrorCode(err) != code || err.Error() != `machine "web" says `+code {
			t.Fatalf("%s: got %q code %q", code, err, rebound.ErrorCode(err))
		}
		// Wrapped errors keep their code too.
		e.fake.err = errors.Join(errors.New("ctx"), rebound.Errorf(code, "x"))
		if _, err := e.client.GetJob(ctx, "j"); rebound.ErrorCode(err) != code {
			t.Fatalf("wrapped %s: %v", code, err)
		}
		st, _, _, _ := e.raw(t, "GET", "/api/v1/machines", "Bearer "+testToken, "", nil)
		if st != status {
			t.Fatalf("%s: status %d want %d", code, st, status)
		}
	}

	// Internal errors: logged in full, answered without the text.
	e.fake.err = errors.New("open /var/lib/rebound/secret.db: disk I/O error")
	_, err := e.client.ListMachines(ctx)
	if rebound.ErrorCode(err) != rebound.EINTERNAL || strings.Contains(err.Error(), "secret.db") ||
		!strings.HasPrefix(err.Error(), "internal error (request ID ") {
		t.Fatalf("internal: %q %q", rebound.ErrorCode(err), err)
	}
	id := strings.TrimSuffix(strings.TrimPrefix(err.Error(), "internal error (request ID "), ")")
	if logs := e.logs.String(); !strings.Contains(logs, "secret.db") || !strings.Contains(logs, id) {
		t.Fatalf("internal error not logged with request ID %s:\n%s", id, logs)
	}

	// A panic is a 500 and the server keeps serving.
	e.fake.err, e.fake.panicky = nil, true
	if _, err := e.client.ListSites(ctx); rebound.ErrorCode(err) != rebound.EINTERNAL {
		t.Fatalf("panic: %v", err)
	}
	e.fake.panicky = false
	if _, err := e.client.ListSites(ctx); err != nil {
		t.Fatalf("after panic: %v", err)
	}
}

func TestAuth(t *testing.T) {
	e := newEnv(t)
	for _, tc := range []struct{ header, msg string }{
		{"", "missing bearer token"},
		{"Bearer ", "missing bearer token"},
		{"Bearer rbt_wrong", "invalid API token"},
		{"Basic " + testToken, `authorization header must be "Bearer <token>"`},
		{testToken, `authorization header must be "Bearer <token>"`},
	} {
		st, _, er, body := e.raw(t, "GET", "/api/v1/machines", tc.header, "", nil)
		if st != 401 || er.Error.Code != rebound.EUNAUTHORIZED || er.Error.Message != tc.msg {
			t.Fatalf("header %q: %d %s", tc.header, st, body)
		}
	}
	if c, _ := e.fake.last(); c != "" {
		t.Fatalf("service called without auth: %s", c)
	}
	// Lower-case scheme is fine.
	if st, _, _, body := e.raw(t, "GET", "/api/v1/machines", "bearer "+testToken, "", nil); st != 200 {
		t.Fatalf("bearer: %d %s", st, body)
	}

	// The client with a bad token gets EUNAUTHORIZED.
	bad := *e.client
	bad.Token = "rbt_nope"
	if _, err := bad.ListSites(context.Background()); rebound.ErrorCode(err) != rebound.EUNAUTHORIZED || err.Error() != "invalid API token" {
		t.Fatalf("bad token: %v", err)
	}
	bad.Token = ""
	if _, err := bad.ListSites(context.Background()); rebound.ErrorCode(err) != rebound.EUNAUTHORIZED || err.Error() != "missing bearer token" {
		t.Fatalf("no token: %v", err)
	}

	if err := bad.Health(context.Background()); err != nil {
		t.Fatalf("health without token: %v", err)
	}

	// Public routes need no token.
	for _, p := range []string{"/healthz", "/api/v1/openapi.json"} {
		if st, _, _, body := e.raw(t, "GET", p, "", "", nil); st != 200 || len(body) == 0 {
			t.Fatalf("%s: %d", p, st)
		}
	}
	// Metrics name machines and sites: a token is needed, like any read.
	if st, _, er, _ := e.raw(t, "GET", "/metrics", "", "", nil); st != 401 || er.Error.Message != "missing bearer token" {
		t.Fatalf("/metrics without token: %d %+v", st, er)
	}
	if st, _, _, _ := e.raw(t, "GET", "/metrics", "Bearer wrong", "", nil); st != 401 {
		t.Fatalf("/metrics with a bad token: %d", st)
	}
	if st, _, _, body := e.raw(t, "GET", "/metrics", "Bearer "+testToken, "", nil); st != 200 || len(body) == 0 {
		t.Fatalf("/metrics with token: %d", st)
	}

	// A server without Authenticate refuses, rather than allowing all.
	srv := httptest.NewServer((&Server{Service: e.fake}).Handler())
	defer srv.Close()
	c, _ := NewClient(srv.URL, testToken, nil)
	if _, err := c.ListSites(context.Background()); rebound.ErrorCode(err) != rebound.EUNAUTHORIZED {
		t.Fatalf("nil Authenticate: %v", err)
	}
}

func TestBadRequests(t *testing.T) {
	e := newEnv(t)
	auth := "Bearer " + testToken
	e.fake.machine = testMachine()
	for _, tc := range []struct {
		name, method, path, ctype, body string
		status                          int
		msg                             string
	}{
		{"syntax", "POST", "/api/v1/machines", "application/json", `{"name":`, 400, "body ends early"},
		{"syntax2", "POST", "/api/v1/machines", "", `{"name" "x"}`, 400, "invalid JSON at byte"},
		{"unknown field", "POST", "/api/v1/machines", "", `{"name":"x","sites":"a"}`, 400, `unknown field "sites"`},
		{"unknown field in verb", "POST", "/api/v1/machines/web/protect", "", `{"to":"b","machine":"other"}`, 400, `unknown field "machine"`},
		{"type", "POST", "/api/v1/machines", "", `{"name":"x","disks":["big"]}`, 400, `field "disks`},
		{"duration", "PUT", "/api/v1/policies/gold", "", `{"retention":"forever"}`, 400, `invalid duration "forever"`},
		{"policy name mismatch", "PUT", "/api/v1/policies/gold", "", `{"name":"silver"}`, 400, `does not match`},
		{"two values", "POST", "/api/v1/machines", "", `{"name":"x"} {"name":"y"}`, 400, "single JSON value"},
		{"empty", "POST", "/api/v1/machines", "", ``, 400, "body is empty"},
		{"content type", "POST", "/api/v1/machines", "text/plain", `{"name":"x"}`, 400, "Content-Type must be application/json"},
		{"huge", "POST", "/api/v1/machines", "", `{"name":"` + strings.Repeat("x", MaxBodyBytes) + `"}`, 413, "larger than 1048576 bytes"},
		{"huge trailing", "POST", "/api/v1/machines", "", `{"name":"x"}` + strings.Repeat(" ", MaxBodyBytes), 413, "larger than"},
		{"unknown route", "GET", "/api/v1/nope", "", "", 404, "no route GET /api/v1/nope"},
		{"unknown root", "GET", "/", "", "", 404, "no route GET /"},
		{"wrong method", "PATCH", "/api/v1/machines", "", "", 405, "method PATCH is not allowed"},
	} {
		e.fake.call = ""
		st, _, er, body := e.raw(t, tc.method, tc.path, auth, tc.ctype, strings.NewReader(tc.body))
		if st != tc.status || er.Error.Code == "" || !strings.Contains(er.Error.Message, tc.msg) {
			if len(body) > 300 {
				body = body[:300]
			}
			t.Errorf("%s: %d %s, want %d containing %q", tc.name, st, body, tc.status, tc.msg)
		}
		if c, _ := e.fake.last(); c != "" && st >= 400 {
			t.Errorf("%s: service was called (%s)", tc.name, c)
		}
	}
	// Still serving.
	if _, err := e.client.ListSites(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestClientNetworkErrors(t *testing.T) {
	ctx := context.Background()
	// Nothing listening.
	srv := httptest.NewServer(http.NotFoundHandler())
	url := srv.URL
	srv.Close()
	c, err := NewClient(url, testToken, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.ListMachines(ctx)
	if rebound.ErrorCode(err) != rebound.EUNAVAILABLE || !strings.HasPrefix(err.Error(), "cannot reach the Rebound server at "+url+": ") {
		t.Fatalf("got %q %v", rebound.ErrorCode(err), err)
	}

	// TLS server whose certificate the given CA does not sign.
	e := newEnv(t)
	wrongCA := selfSigned(t)
	c, _ = NewClient(e.srv.URL, testToken, wrongCA)
	if _, err := c.ListSites(ctx); rebound.ErrorCode(err) != rebound.EUNAVAILABLE || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("wrong CA: %v", err)
	}

	// An answer that is not ours (a proxy's 502) maps by status.
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "bad gateway", http.StatusBadGateway)
	}))
	defer proxy.Close()
	c, _ = NewClient(proxy.URL, testToken, nil)
	if _, err := c.ListSites(ctx); rebound.ErrorCode(err) != rebound.EUNAVAILABLE {
		t.Fatalf("proxy: %v", err)
	}

	// Bad arguments fail before the network.
	for _, u := range []string{"", "host:1", "ftp://x", "https://"} {
		if _, err := NewClient(u, "", nil); rebound.ErrorCode(err) != rebound.EINVALID {
			t.Fatalf("NewClient(%q): %v", u, err)
		}
	}
	if _, err := NewClient("https://x", "", []byte("not pem")); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("bad PEM: %v", err)
	}
	if _, err := c.GetMachine(ctx, ""); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("empty name: %v", err)
	}
	if _, err := c.Commit(ctx, ""); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("empty name: %v", err)
	}
}

// selfSigned returns a fresh CA certificate (httptest servers all share
// one certificate, so another test server's would be trusted).
func selfSigned(t *testing.T) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "other CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func TestRequestLog(t *testing.T) {
	e := newEnv(t)
	e.raw(t, "GET", "/api/v1/machines/web?x=1", "Bearer "+testToken, "", nil)
	e.raw(t, "GET", "/api/v1/machines", "Bearer rbt_s3cret-bad", "", nil)
	logs := e.logs.String()
	for _, want := range []string{"method=GET", "path=/api/v1/machines/web", "status=200", "status=401", "duration=", "requestID="} {
		if !strings.Contains(logs, want) {
			t.Fatalf("log lacks %q:\n%s", want, logs)
		}
	}
	// newEnv's cleanup asserts "s3cret" (in both tokens) never appears.
}
