package console

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

// memUsers is an in-memory rebound.UserService for the console's tests.
type memUsers struct {
	mu       sync.Mutex
	users    map[string]memUser
	sessions map[string]string
}

type memUser struct {
	pw   string
	role rebound.Role
}

func newMemUsers() *memUsers {
	return &memUsers{users: map[string]memUser{
		"op":     {"operator-password", rebound.RoleOperator},
		"viewer": {"viewer-password!", rebound.RoleViewer},
	}, sessions: map[string]string{}}
}

func (m *memUsers) CreateUser(ctx context.Context, req rebound.CreateUserRequest) (*rebound.CreateUserResult, error) {
	return nil, rebound.Errorf(rebound.EINVALID, "not in this fake")
}
func (m *memUsers) ListUsers(ctx context.Context) ([]rebound.User, error)             { return nil, nil }
func (m *memUsers) DeleteUser(ctx context.Context, name string) error                 { return nil }
func (m *memUsers) SetPassword(ctx context.Context, name, pw string) error            { return nil }
func (m *memUsers) SetRole(ctx context.Context, name string, role rebound.Role) error { return nil }
func (m *memUsers) CreateToken(ctx context.Context, user, name string) (*rebound.CreateTokenResult, error) {
	return nil, rebound.Errorf(rebound.EINVALID, "not in this fake")
}
func (m *memUsers) ListTokens(ctx context.Context, user string) ([]rebound.APIToken, error) {
	return nil, nil
}
func (m *memUsers) RevokeToken(ctx context.Context, id string) error { return nil }
func (m *memUsers) CheckToken(ctx context.Context, secret string) (rebound.Principal, error) {
	return rebound.Principal{}, rebound.Errorf(rebound.EUNAUTHORIZED, "invalid API token")
}
func (m *memUsers) CheckPassword(ctx context.Context, name, pw string) (*rebound.User, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	u, ok := m.users[name]
	if !ok || u.pw != pw {
		return nil, rebound.Errorf(rebound.EUNAUTHORIZED, "wrong user name or password")
	}
	return &rebound.User{Name: name, Role: u.role, PasswordSet: true}, nil
}
func (m *memUsers) CreateSession(ctx context.Context, user string, ttl time.Duration) (string, error) {
	var b [24]byte
	rand.Read(b[:])
	s := "rbs_" + hex.EncodeToString(b[:])
	m.mu.Lock()
	m.sessions[s] = user
	m.mu.Unlock()
	return s, nil
}
func (m *memUsers) CheckSession(ctx context.Context, secret string) (rebound.Principal, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	u, ok := m.sessions[secret]
	if !ok {
		return rebound.Principal{}, rebound.Errorf(rebound.EUNAUTHORIZED, "session expired")
	}
	return rebound.Principal{User: u, Role: m.users[u].role, Via: "session"}, nil
}
func (m *memUsers) DeleteSession(ctx context.Context, secret string) error {
	m.mu.Lock()
	delete(m.sessions, secret)
	m.mu.Unlock()
	return nil
}

// fakeAPI answers the few API routes the pages read, and refuses a
// viewer's POST with 403 as the real API does; it records the POSTs.
type fakeAPI struct {
	mu    sync.Mutex
	posts []string
}

func (f *fakeAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	pr, ok := rebound.PrincipalFrom(r.Context())
	if !ok {
		writeJSON(w, 401, map[string]any{"error": map[string]string{"code": "unauthorized", "message": "missing bearer token"}})
		return
	}
	now := time.Now().UTC()
	m := rebound.Machine{Name: "vm1", State: rebound.MachineProtected, ActiveSite: "primary", HomeSite: "primary", Health: "normal",
		Disks:      []rebound.Disk{{Name: "disk0", Size: 1 << 20, NBD: "nbd://127.0.0.1:10809/vm1-disk0"}},
		Protection: &rebound.Protection{SourceSite: "primary", TargetSite: "recovery", Policy: "default", LagSeconds: 1.5, LastPointTime: now.Add(-4 * time.Second)}}
	if r.Method == "POST" {
		if !pr.Role.Allows(rebound.RoleOperator) {
			writeJSON(w, 403, map[string]any{"error": map[string]string{"code": "forbidden",
				"message": "user " + pr.User + " has the viewer role: " + r.URL.Path + " needs operator"}})
			return
		}
		f.mu.Lock()
		f.posts = append(f.posts, pr.User+" "+r.URL.Path)
		f.mu.Unlock()
		if strings.HasSuffix(r.URL.Path, "/points") {
			writeJSON(w, 201, rebound.RecoveryPoint{ID: "p9", Time: now, Kind: "crash"})
			return
		}
		writeJSON(w, 202, rebound.Job{ID: "j-1", Type: "failover", Machine: "vm1", State: "running"})
		return
	}
	switch r.URL.Path {
	case "/api/v1/sites":
		writeJSON(w, 200, []rebound.Site{{Name: "primary", Status: "online", LastSeen: now}})
	case "/api/v1/sites/primary":
		writeJSON(w, 200, rebound.SiteDetail{Site: rebound.Site{Name: "primary", Status: "online", LastSeen: now}, Health: "normal", Machines: []rebound.SiteMachineRole{}})
	case "/api/v1/machines":
		writeJSON(w, 200, []rebound.Machine{m})
	case "/api/v1/machines/vm1":
		writeJSON(w, 200, m)
	case "/api/v1/policies":
		writeJSON(w, 200, []rebound.Policy{rebound.DefaultPolicy()})
	case "/api/v1/machines/vm1/points":
		writeJSON(w, 200, []rebound.RecoveryPoint{{ID: "p5", Time: now.Add(-65 * time.Second), Kind: "crash", Seq: 5}, {ID: "p7", Time: now.Add(-4 * time.Second), Kind: "app", Seq: 7}})
	case "/api/v1/machines/vm1/preflight":
		writeJSON(w, 200, rebound.PreflightReport{Machine: "vm1", Operation: "failover", OK: true, Checks: []rebound.PreflightCheck{{Name: "points", OK: true, Message: "2 points"}}})
	case "/api/v1/jobs":
		writeJSON(w, 200, []rebound.Job{{ID: "j-1", Type: "failover", Machine: "vm1", State: "running", Steps: []rebound.JobStep{}}})
	case "/api/v1/jobs/j-1":
		writeJSON(w, 200, rebound.Job{ID: "j-1", Type: "failover", Machine: "vm1", State: "succeeded", Progress: 1,
			Steps: []rebound.JobStep{{Name: "activate", State: "succeeded"}}})
	case "/api/v1/events":
		writeJSON(w, 200, []rebound.Event{{ID: 1, Time: now, Machine: "vm1", Kind: "job.failover", Message: "started"}})
	case "/api/v1/groups", "/api/v1/plans":
		writeJSON(w, 200, []any{})
	case "/api/v1/groups/db":
		writeJSON(w, 200, rebound.Group{Name: "db", Machines: []string{"vm1"}, State: rebound.MachineFailedOver, ActiveSite: "recovery",
			SourceSite: "primary", TargetSite: "recovery", Health: "warning",
			Failover: &rebound.FailoverInfo{FromSite: "primary", ToSite: "recovery", Point: rebound.RecoveryPoint{ID: "p5", Time: now.Add(-65 * time.Second)}}})
	case "/api/v1/groups/db/points":
		writeJSON(w, 200, []rebound.RecoveryPoint{{ID: "p5", Time: now.Add(-65 * time.Second), Kind: "crash", Seq: 5}})
	case "/api/v1/plans/app":
		writeJSON(w, 200, rebound.Plan{Name: "app", Stages: []rebound.PlanStage{{Name: "all", Machines: []string{"vm1"},
			Before: []rebound.PlanAction{{Manual: "switch the DNS record"}}}}})
	case "/api/v1/plans/app/preflight":
		writeJSON(w, 200, rebound.PlanPreflight{Plan: "app", Operation: "failover", OK: false,
			Machines: []rebound.PreflightReport{{Machine: "vm1", Operation: "failover", Checks: []rebound.PreflightCheck{{Name: "peer reachable", Message: "recovery is offline"}}}}})
	default:
		writeJSON(w, 404, map[string]any{"error": map[string]string{"code": "not_found", "message": "no route " + r.URL.Path}})
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// memAudit keeps what the console records itself (logins, logouts).
type memAudit struct {
	mu  sync.Mutex
	got []rebound.AuditEntry
}

func (m *memAudit) RecordAudit(ctx context.Context, e rebound.AuditEntry) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.got = append(m.got, e)
	return nil
}

func (m *memAudit) recorded() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []string
	for _, e := range m.got {
		out = append(out, fmt.Sprintf("%s %s %s %d %s", e.Action, e.User, e.Remote, e.Status, e.Error))
	}
	return out
}

func (*memAudit) ListAudit(ctx context.Context, f rebound.AuditFilter) ([]rebound.AuditEntry, error) {
	return []rebound.AuditEntry{{ID: 1, Time: time.Now(), User: "op", Role: "operator", Via: "session", Action: "POST /api/v1/machines/{name}/failover", Target: "vm1", Status: 202}}, nil
}

type env struct {
	t     *testing.T
	api   *fakeAPI
	users *memUsers
	audit *memAudit
	h     http.Handler
}

func newEnv(t *testing.T) *env {
	e := &env{t: t, api: &fakeAPI{}, users: newMemUsers(), audit: &memAudit{}}
	c := &Console{API: e.api, Users: e.users, Audit: e.audit}
	t.Cleanup(c.Close)
	e.h = c.Handler()
	return e
}

func (e *env) do(method, path, cookie string, form url.Values, remote string) *httptest.ResponseRecorder {
	var body io.Reader
	if form != nil {
		body = strings.NewReader(form.Encode())
	}
	r := httptest.NewRequest(method, "https://vault.example"+path, body)
	if form != nil {
		r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	if remote != "" {
		r.RemoteAddr = remote
	}
	if cookie != "" {
		r.Header.Set("Cookie", cookie)
	}
	w := httptest.NewRecorder()
	e.h.ServeHTTP(w, r)
	return w
}

var csrfRE = regexp.MustCompile(`name="csrf" value="([^"]+)"`)

// login logs user in and returns the session cookie header and the
// session's CSRF token (read from a page, as a browser would).
func (e *env) login(user, pw string) (cookie, csrf string) {
	e.t.Helper()
	w := e.do("GET", "/login", "", nil, "")
	lc := w.Result().Cookies()[0]
	tok := csrfRE.FindStringSubmatch(w.Body.String())[1]
	w = e.do("POST", "/login", lc.Name+"="+lc.Value, url.Values{"csrf": {tok}, "user": {user}, "password": {pw}, "next": {"/machines"}}, "")
	if w.Code != http.StatusSeeOther || w.Header().Get("Location") != "/machines" {
		e.t.Fatalf("login %s: %d %s", user, w.Code, w.Body.String())
	}
	var sc *http.Cookie
	for _, c := range w.Result().Cookies() {
		if c.Name == SessionCookie {
			sc = c
		}
	}
	if sc == nil || !sc.Secure || !sc.HttpOnly || sc.SameSite != http.SameSiteStrictMode || sc.Path != "/" {
		e.t.Fatalf("session cookie %+v: want Secure, HttpOnly, SameSite=Strict, Path=/", sc)
	}
	cookie = SessionCookie + "=" + sc.Value
	w = e.do("GET", "/machines/vm1", cookie, nil, "")
	m := csrfRE.FindStringSubmatch(w.Body.String())
	if w.Code != 200 || m == nil {
		e.t.Fatalf("machine page: %d, csrf %v", w.Code, m)
	}
	if strings.Contains(w.Body.String(), sc.Value) {
		e.t.Fatal("the machine page renders the session secret")
	}
	return cookie, m[1]
}

func TestCSRFRequired(t *testing.T) {
	e := newEnv(t)
	cookie, csrf := e.login("op", "operator-password")
	for _, form := range []url.Values{{}, {"csrf": {"wrong"}}, {"csrf": {csrf + "x"}}} {
		w := e.do("POST", "/machines/vm1/do/point", cookie, form, "")
		if w.Code != http.StatusForbidden || !strings.Contains(w.Body.String(), "CSRF token is missing or wrong") {
			t.Fatalf("POST with csrf %q: %d %s", form.Get("csrf"), w.Code, w.Body.String())
		}
	}
	if len(e.api.posts) != 0 {
		t.Fatalf("a POST without the CSRF token reached the API: %v", e.api.posts)
	}
	w := e.do("POST", "/machines/vm1/do/point", cookie, url.Values{"csrf": {csrf}}, "")
	if w.Code != http.StatusSeeOther || len(e.api.posts) != 1 || e.api.posts[0] != "op /api/v1/machines/vm1/points" {
		t.Fatalf("POST with the token: %d, API saw %v", w.Code, e.api.posts)
	}
	// A destructive action without confirm=yes goes to its confirmation page.
	w = e.do("POST", "/machines/vm1/do/failover", cookie, url.Values{"csrf": {csrf}}, "")
	if w.Code != http.StatusSeeOther || w.Header().Get("Location") != "/machines/vm1/confirm?action=failover" || len(e.api.posts) != 1 {
		t.Fatalf("unconfirmed failover: %d %s, API saw %v", w.Code, w.Header().Get("Location"), e.api.posts)
	}
	// Logout needs the token too, and ends the session.
	if w := e.do("POST", "/logout", cookie, url.Values{}, ""); w.Code != http.StatusForbidden {
		t.Fatalf("logout without csrf: %d", w.Code)
	}
	if w := e.do("POST", "/logout", cookie, url.Values{"csrf": {csrf}}, ""); w.Code != http.StatusSeeOther {
		t.Fatalf("logout: %d", w.Code)
	}
	if w := e.do("GET", "/machines", cookie, nil, ""); w.Code != http.StatusSeeOther {
		t.Fatalf("after logout: %d, want a redirect to the login page", w.Code)
	}
	if got := e.audit.recorded(); len(got) != 2 || !strings.HasPrefix(got[0], "POST /login op ") || !strings.HasPrefix(got[1], "POST /logout op ") {
		t.Fatalf("audit of the login and the logout: %q", got)
	}
}

func TestLoginCSRF(t *testing.T) {
	e := newEnv(t)
	w := e.do("POST", "/login", "", url.Values{"user": {"op"}, "password": {"operator-password"}}, "")
	if w.Code != http.StatusForbidden {
		t.Fatalf("login without the form's token: %d", w.Code)
	}
	w = e.do("POST", "/login", loginCookie+"=abc", url.Values{"csrf": {"abd"}, "user": {"op"}, "password": {"operator-password"}}, "")
	if w.Code != http.StatusForbidden {
		t.Fatalf("login with a token unlike the cookie: %d", w.Code)
	}
}

func TestNoSession(t *testing.T) {
	e := newEnv(t)
	for _, path := range []string{"/", "/machines", "/machines/vm1", "/jobs/j-1", "/audit", "/plans"} {
		w := e.do("GET", path, "", nil, "")
		if w.Code != http.StatusSeeOther || w.Header().Get("Location") != "/login?next="+url.QueryEscape(path) {
			t.Fatalf("GET %s without a session: %d %q", path, w.Code, w.Header().Get("Location"))
		}
		w = e.do("GET", path, SessionCookie+"=rbs_forged", nil, "")
		if w.Code != http.StatusSeeOther {
			t.Fatalf("GET %s with an unknown session: %d", path, w.Code)
		}
	}
	if w := e.do("POST", "/machines/vm1/do/failover", "", url.Values{"confirm": {"yes"}}, ""); w.Code != http.StatusUnauthorized {
		t.Fatalf("POST without a session: %d", w.Code)
	}
	if w := e.do("GET", "/jobs/j-1/events", "", nil, ""); w.Code != http.StatusUnauthorized {
		t.Fatalf("event stream without a session: %d", w.Code)
	}
	if len(e.api.posts) != 0 {
		t.Fatalf("API saw %v", e.api.posts)
	}
}

func TestViewerRefused(t *testing.T) {
	e := newEnv(t)
	cookie, csrf := e.login("viewer", "viewer-password!")
	for _, path := range []string{"/machines/vm1/do/point", "/machines/vm1/do/failover", "/jobs/j-1/do/cancel", "/plans/app/do/failover"} {
		w := e.do("POST", path, cookie, url.Values{"csrf": {csrf}, "confirm": {"yes"}}, "")
		if w.Code != http.StatusForbidden || !strings.Contains(w.Body.String(), "has the viewer role") {
			t.Fatalf("viewer POST %s: %d %s", path, w.Code, w.Body.String())
		}
	}
	if len(e.api.posts) != 0 {
		t.Fatalf("API accepted %v", e.api.posts)
	}
	// A viewer reads every page.
	for _, path := range []string{"/", "/machines", "/machines/vm1", "/machines/vm1/confirm?action=failover&point=p5", "/jobs", "/jobs/j-1", "/audit", "/groups", "/plans"} {
		if w := e.do("GET", path, cookie, nil, ""); w.Code != 200 {
			t.Fatalf("viewer GET %s: %d %s", path, w.Code, w.Body.String())
		}
	}
}

func TestLoginRateLimit(t *testing.T) {
	e := newEnv(t)
	try := func(user, pw, remote string) *httptest.ResponseRecorder {
		w := e.do("GET", "/login", "", nil, remote)
		lc := w.Result().Cookies()[0]
		tok := csrfRE.FindStringSubmatch(w.Body.String())[1]
		return e.do("POST", "/login", lc.Name+"="+lc.Value, url.Values{"csrf": {tok}, "user": {user}, "password": {pw}}, remote)
	}
	for i := 0; i < LoginFailures; i++ {
		if w := try("op", "wrong", "192.0.2.1:5000"); w.Code != http.StatusUnauthorized {
			t.Fatalf("failure %d: %d", i+1, w.Code)
		}
	}
	// The right password no longer helps, from this address or for this user.
	for _, c := range []struct{ user, pw, remote string }{
		{"op", "operator-password", "192.0.2.1:5001"},
		{"viewer", "viewer-password!", "192.0.2.1:5002"},
		{"op", "operator-password", "198.51.100.7:4000"},
	} {
		w := try(c.user, c.pw, c.remote)
		if w.Code != http.StatusTooManyRequests || !strings.Contains(w.Body.String(), "too many failed logins") || w.Header().Get("Retry-After") == "" {
			t.Fatalf("%s from %s after %d failures: %d %s", c.user, c.remote, LoginFailures, w.Code, w.Body.String())
		}
	}
	// Another user from another address is not affected.
	if w := try("viewer", "viewer-password!", "198.51.100.8:4000"); w.Code != http.StatusSeeOther {
		t.Fatalf("an unrelated login: %d", w.Code)
	}
	// The audit log has each failure (with the name tried) and the login;
	// the limit's refusals are not recorded.
	want := []string{}
	for i := 0; i < LoginFailures; i++ {
		want = append(want, "POST /login op 192.0.2.1:5000 401 unauthorized: wrong user name or password")
	}
	want = append(want, "POST /login viewer 198.51.100.8:4000 303 ")
	if got := e.audit.recorded(); !slices.Equal(got, want) {
		t.Fatalf("audit\n got %q\nwant %q", got, want)
	}
}

func TestSecurityHeaders(t *testing.T) {
	e := newEnv(t)
	cookie, _ := e.login("op", "operator-password")
	for _, path := range []string{"/login", "/static/console.css", "/", "/machines/vm1"} {
		w := e.do("GET", path, cookie, nil, "")
		h := w.Header()
		if w.Code != 200 || h.Get("Content-Security-Policy") != CSP || h.Get("X-Frame-Options") != "DENY" || h.Get("X-Content-Type-Options") != "nosniff" {
			t.Fatalf("GET %s: %d headers %v", path, w.Code, h)
		}
		if strings.Contains(w.Body.String(), "<script>") || strings.Contains(w.Body.String(), " style=") {
			t.Fatalf("GET %s has inline script or style", path)
		}
	}
	for _, want := range []string{"script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"} {
		if !strings.Contains(CSP, want) {
			t.Fatalf("CSP %q lacks %q", CSP, want)
		}
	}
}

func TestPagesRender(t *testing.T) {
	e := newEnv(t)
	cookie, _ := e.login("op", "operator-password")
	for path, want := range map[string]string{
		"/":                  "RPO breaches",
		"/machines?sort=lag": "primary → recovery",
		"/machines/vm1":      "nbd://127.0.0.1:10809/vm1-disk0",
		"/machines/vm1/confirm?action=failover&point=p5":                 "1m 5s of data",
		"/machines/vm1/confirm?action=failover&planned=1":                "no data is lost",
		"/machines/vm1/confirm?action=failover&point=other&pointText=p5": "1m 5s of data",
		"/jobs/j-1":                        `id="job-progress"`,
		"/audit":                           "POST /api/v1/machines/{name}/failover",
		"/groups/db":                       "change to here",
		"/groups/db/confirm?action=cancel": "Writes made at recovery since the failover are deleted",
		"/plans/app":                       "switch the DNS record",
		"/plans/app/confirm?verb=failover": "recovery is offline",
	} {
		w := e.do("GET", path, cookie, nil, "")
		if w.Code != 200 || !strings.Contains(w.Body.String(), want) {
			t.Fatalf("GET %s: %d, want %q in\n%s", path, w.Code, want, w.Body.String())
		}
	}
	// Jobs and events name a group where a machine would be: its page.
	if w := e.do("GET", "/machines/db", cookie, nil, ""); w.Code != http.StatusSeeOther || w.Header().Get("Location") != "/groups/db" {
		t.Fatalf("/machines/db of group db: %d %q", w.Code, w.Header().Get("Location"))
	}
	if w := e.do("GET", "/machines/nope", cookie, nil, ""); w.Code != http.StatusNotFound {
		t.Fatalf("/machines/nope: %d", w.Code)
	}
	// The confirmation of a failover shows the preflight before it starts.
	w := e.do("GET", "/machines/vm1/confirm?action=failover", cookie, nil, "")
	if !strings.Contains(w.Body.String(), `id="preflight"`) {
		t.Fatalf("no preflight on the failover confirmation:\n%s", w.Body.String())
	}
	// The stream of an ended job sends its fragment and ends.
	w = e.do("GET", "/jobs/j-1/events", cookie, nil, "")
	if b := w.Body.String(); w.Header().Get("Content-Type") != "text/event-stream" || !strings.Contains(b, "event: update\ndata: ") || !strings.Contains(b, "event: end\ndata: succeeded") {
		t.Fatalf("job events: %s", b)
	}
	// With the version the page shows, the stream sends no copy of it.
	sse := regexp.MustCompile(`data-sse="([^"]+)"`).FindStringSubmatch(e.do("GET", "/jobs/j-1", cookie, nil, "").Body.String())
	if sse == nil || !strings.Contains(sse[1], "?v=") {
		t.Fatalf("job page's stream: %v", sse)
	}
	w = e.do("GET", strings.ReplaceAll(sse[1], "&amp;", "&"), cookie, nil, "")
	if b := w.Body.String(); strings.Contains(b, "event: update") || !strings.Contains(b, "event: end") {
		t.Fatalf("job events from the page's version: %s", b)
	}
}
