package http

import (
	"context"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/sqlite"
)

// authEnv serves the fake service with the real store for users, tokens
// and the audit log.
type authEnv struct {
	*env
	s      *Server
	db     *sqlite.DB
	tokens map[string]string // user -> token secret
}

// newAuthEnv has users root (admin), ops (operator) and bob (viewer), each
// with a token.
func newAuthEnv(t *testing.T) *authEnv {
	t.Helper()
	db, err := sqlite.Open(filepath.Join(t.TempDir(), "rebound.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	e := &authEnv{env: &env{fake: &fakeService{job: testJob(), machine: testMachine(), token: "rbe_join"}, logs: &syncBuffer{}}, db: db, tokens: map[string]string{}}
	e.s = &Server{
		Service: e.fake, Loop: e.fake, Power: e.fake, Catalog: e.fake, Groups: e.fake,
		Authenticate: db.CheckToken,
		Users:        db,
		Audit:        db,
		Logger:       slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	ctx := context.Background()
	for name, role := range map[string]rebound.Role{"root": rebound.RoleAdmin, "ops": rebound.RoleOperator, "bob": rebound.RoleViewer} {
		if _, err := db.EnsureUser(ctx, name, role); err != nil {
			t.Fatal(err)
		}
		res, err := db.CreateToken(ctx, name, "test")
		if err != nil {
			t.Fatal(err)
		}
		e.tokens[name] = res.Secret
	}
	e.srv = httptest.NewTLSServer(e.s.Handler())
	t.Cleanup(e.srv.Close)
	t.Cleanup(func() {
		for _, tok := range e.tokens {
			if strings.Contains(e.logs.String(), tok) {
				t.Errorf("token leaked into logs:\n%s", e.logs)
			}
		}
	})
	return e
}

// as returns a client with user's token.
func (e *authEnv) as(t *testing.T, user string) *Client {
	t.Helper()
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: e.srv.Certificate().Raw})
	c, err := NewClient(e.srv.URL, e.tokens[user], caPEM)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func (e *authEnv) audit(t *testing.T, f rebound.AuditFilter) []rebound.AuditEntry {
	t.Helper()
	v, err := e.db.ListAudit(context.Background(), f)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func wantErr(t *testing.T, err error, code, contains string) {
	t.Helper()
	if rebound.ErrorCode(err) != code || !strings.Contains(rebound.ErrorMessage(err), contains) {
		t.Fatalf("error %v: want code %s with %q", err, code, contains)
	}
}

// Every route that needs more than a caller's role is 403 for it before its
// handler runs, with a message naming the user, the role, the route, the
// role needed and the command that grants it; a role that suffices is
// never 403.
func TestRoles(t *testing.T) {
	e := newAuthEnv(t)
	fill := strings.NewReplacer("{name}", "web", "{id}", "j1", "{machine}", "m1")
	n := 0
	for _, rt := range e.s.routes() {
		if rt.role == public {
			continue
		}
		path := fill.Replace(rt.path)
		for _, who := range []struct {
			user string
			role rebound.Role
		}{{"bob", viewer}, {"ops", operator}, {"root", admin}} {
			e.fake.mu.Lock()
			e.fake.call = ""
			e.fake.mu.Unlock()
			st, _, er, _ := e.raw(t, rt.method, path, "Bearer "+e.tokens[who.user], "", nil)
			if !who.role.Allows(rt.role) {
				want := fmt.Sprintf(`forbidden: user %q has role %s; %s %s needs role %s (an admin can grant it: rebound user set-role %s %s)`,
					who.user, who.role, rt.method, rt.path, rt.role, who.user, rt.role)
				if st != 403 || er.Error.Code != rebound.EFORBIDDEN || er.Error.Message != want {
					t.Errorf("%s %s as %s: %d %+v, want 403 %q", rt.method, path, who.user, st, er, want)
				}
				if call, _ := e.fake.last(); call != "" {
					t.Errorf("%s %s as %s reached the service (%s)", rt.method, path, who.user, call)
				}
				n++
			} else if st == 403 && !strings.HasPrefix(rt.path, "/api/v1/users/") {
				t.Errorf("%s %s as %s (%s, route needs %s): 403 %+v", rt.method, path, who.user, who.role, rt.role, er)
			}
		}
	}
	if n < 50 {
		t.Fatalf("only %d refusals checked", n)
	}

	// Through the client: the error carries the code the CLI maps to exit 8.
	ctx := context.Background()
	_, err := e.as(t, "bob").Failover(ctx, rebound.FailoverRequest{Machine: "web", Point: "latest"})
	wantErr(t, err, rebound.EFORBIDDEN, `user "bob" has role viewer; POST /api/v1/machines/{name}/failover needs role operator`)
	if _, err := e.as(t, "ops").Failover(ctx, rebound.FailoverRequest{Machine: "web", Point: "latest"}); err != nil {
		t.Fatal(err)
	}
	_, err = e.as(t, "ops").CreateEnrollToken(ctx, "hv1")
	wantErr(t, err, rebound.EFORBIDDEN, "needs role admin")
	if tok, err := e.as(t, "root").CreateEnrollToken(ctx, "hv1"); err != nil || tok != "rbe_join" {
		t.Fatalf("admin's site token: %q %v", tok, err)
	}

	// A role change takes effect at the next call of the same token.
	if _, err := e.as(t, "root").SetRole(ctx, "bob", rebound.RoleOperator); err != nil {
		t.Fatal(err)
	}
	if _, err := e.as(t, "bob").Failover(ctx, rebound.FailoverRequest{Machine: "web"}); err != nil {
		t.Fatalf("after set-role operator: %v", err)
	}
}

// Users and tokens: admins manage users; everyone manages their own
// tokens and password; only admins reach other users'.
func TestUsersAndTokensAPI(t *testing.T) {
	e := newAuthEnv(t)
	ctx := context.Background()
	root, ops, bob := e.as(t, "root"), e.as(t, "ops"), e.as(t, "bob")

	p, err := bob.WhoAmI(ctx)
	if err != nil || p.User != "bob" || p.Role != rebound.RoleViewer || p.Via != "token" || p.TokenID == "" {
		t.Fatalf("whoami %+v %v", p, err)
	}

	res, err := root.CreateUser(ctx, rebound.CreateUserRequest{Name: "carol", Role: rebound.RoleOperator})
	if err != nil || len(res.Password) < 12 || res.User.Name != "carol" || !res.User.PasswordSet {
		t.Fatalf("create: %+v %v", res, err)
	}
	if _, err := e.db.CheckPassword(ctx, "carol", res.Password); err != nil {
		t.Fatalf("generated password: %v", err)
	}
	_, err = root.CreateUser(ctx, rebound.CreateUserRequest{Name: "carol", Role: rebound.RoleViewer})
	wantErr(t, err, rebound.ECONFLICT, "already exists")
	_, err = root.CreateUser(ctx, rebound.CreateUserRequest{Name: "dan", Role: rebound.RoleViewer, Password: "short"})
	wantErr(t, err, rebound.EINVALID, "at least 12")
	_, err = ops.CreateUser(ctx, rebound.CreateUserRequest{Name: "eve", Role: rebound.RoleAdmin})
	wantErr(t, err, rebound.EFORBIDDEN, "needs role admin")
	us, err := root.ListUsers(ctx)
	if err != nil || len(us) != 4 || us[0].Name != "bob" || us[1].Name != "carol" {
		t.Fatalf("users %+v %v", us, err)
	}
	_, err = bob.ListUsers(ctx)
	wantErr(t, err, rebound.EFORBIDDEN, "GET /api/v1/users needs role admin")

	// Passwords: one's own, or an admin's for anyone.
	if gen, err := bob.SetPassword(ctx, "bob", "bobs new password"); err != nil || gen != "" {
		t.Fatalf("own password: %q %v", gen, err)
	}
	_, err = bob.SetPassword(ctx, "ops", "not bobs business")
	wantErr(t, err, rebound.EFORBIDDEN, `setting the password of user "ops" needs role admin`)
	gen, err := root.SetPassword(ctx, "ops", "")
	if err != nil || len(gen) < 12 {
		t.Fatalf("generated: %q %v", gen, err)
	}
	if _, err := e.db.CheckPassword(ctx, "ops", gen); err != nil {
		t.Fatal(err)
	}
	_, err = bob.SetPassword(ctx, "bob", "short")
	wantErr(t, err, rebound.EINVALID, "at least 12")

	// Tokens: own by default; another user's or all need admin.
	tk, err := bob.CreateToken(ctx, "", "laptop")
	if err != nil || tk.Token.User != "bob" || !strings.HasPrefix(tk.Secret, "rbt_") {
		t.Fatalf("create token %+v %v", tk, err)
	}
	_, err = bob.CreateToken(ctx, "ops", "sneaky")
	wantErr(t, err, rebound.EFORBIDDEN, `creating a token of user "ops" needs role admin`)
	opsTok, err := root.CreateToken(ctx, "ops", "ci")
	if err != nil || opsTok.Token.User != "ops" {
		t.Fatalf("admin creates ops's token: %+v %v", opsTok, err)
	}
	mine, err := bob.ListTokens(ctx, "", false)
	if err != nil || len(mine) != 2 || mine[1].ID != tk.Token.ID || mine[0].LastUsed.IsZero() {
		t.Fatalf("bob's tokens %+v %v", mine, err)
	}
	_, err = bob.ListTokens(ctx, "", true)
	wantErr(t, err, rebound.EFORBIDDEN, "listing every user's tokens needs role admin")
	_, err = bob.ListTokens(ctx, "ops", false)
	wantErr(t, err, rebound.EFORBIDDEN, "needs role admin")
	if all, err := root.ListTokens(ctx, "", true); err != nil || len(all) != 5 {
		t.Fatalf("all tokens %d %v", len(all), err)
	}
	if l, err := root.ListTokens(ctx, "ops", false); err != nil || len(l) != 2 {
		t.Fatalf("ops's tokens %d %v", len(l), err)
	}
	// Another's token is not found for a non-admin; an admin revokes it.
	wantErr(t, bob.RevokeToken(ctx, opsTok.Token.ID), rebound.ENOTFOUND, "no API token")
	if err := root.RevokeToken(ctx, opsTok.Token.ID); err != nil {
		t.Fatal(err)
	}
	c, _ := NewClient(e.srv.URL, opsTok.Secret, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: e.srv.Certificate().Raw}))
	_, err = c.ListMachines(ctx)
	wantErr(t, err, rebound.EUNAUTHORIZED, "invalid API token")
	if err := bob.RevokeToken(ctx, tk.Token.ID); err != nil {
		t.Fatal(err)
	}

	// The last admin stays.
	wantErr(t, root.DeleteUser(ctx, "root"), rebound.ECONFLICT, "last admin")
	_, err = root.SetRole(ctx, "root", rebound.RoleViewer)
	wantErr(t, err, rebound.ECONFLICT, "last admin")
	_, err = root.SetRole(ctx, "bob", "god")
	wantErr(t, err, rebound.EINVALID, "unknown role")
	// Deleting a user revokes its tokens.
	if err := root.DeleteUser(ctx, "bob"); err != nil {
		t.Fatal(err)
	}
	_, err = bob.ListMachines(ctx)
	wantErr(t, err, rebound.EUNAUTHORIZED, "invalid API token")
	wantErr(t, root.DeleteUser(ctx, "bob"), rebound.ENOTFOUND, "no user")

	// Without a UserService the routes are 501, the rest works.
	srv := httptest.NewTLSServer((&Server{Service: e.fake, Authenticate: e.db.CheckToken}).Handler())
	defer srv.Close()
	c, _ = NewClient(srv.URL, e.tokens["root"], pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}))
	_, err = c.ListUsers(ctx)
	wantErr(t, err, CodeNotImplemented, "user list is not implemented by this server (it keeps no users)")
	_, err = c.ListAudit(ctx, rebound.AuditFilter{})
	wantErr(t, err, CodeNotImplemented, "audit is not implemented")
	if _, err := c.ListMachines(ctx); err != nil {
		t.Fatal(err)
	}
}

// The audit log: every mutating call, whatever its result, with who, from
// where, what and the answer; reads are not recorded; bodies never are.
func TestAuditLog(t *testing.T) {
	e := newAuthEnv(t)
	ctx := context.Background()
	root, ops, bob := e.as(t, "root"), e.as(t, "ops"), e.as(t, "bob")

	ops.Failover(ctx, rebound.FailoverRequest{Machine: "web", Point: "latest"}) // 202
	bob.Failover(ctx, rebound.FailoverRequest{Machine: "web"})                  // 403
	ops.ListMachines(ctx)                                                       // a read
	e.fake.mu.Lock()
	e.fake.err = rebound.Errorf(rebound.ECONFLICT, "machine web is failed over")
	e.fake.mu.Unlock()
	ops.Commit(ctx, "web") // 409
	e.fake.mu.Lock()
	e.fake.err = nil
	e.fake.mu.Unlock()
	st, _, _, _ := e.raw(t, "POST", "/api/v1/machines/web/failover", "Bearer rbt_wrong", "", nil) // 401
	if st != 401 {
		t.Fatal(st)
	}
	const pw = "a password nobody may see"
	_, err := root.CreateUser(ctx, rebound.CreateUserRequest{Name: "carol", Role: rebound.RoleViewer, Password: pw})
	if err != nil {
		t.Fatal(err)
	}
	gen, _ := root.CreateUser(ctx, rebound.CreateUserRequest{Name: "dan", Role: rebound.RoleViewer})
	tk, err := bob.CreateToken(ctx, "", "laptop")
	if err != nil {
		t.Fatal(err)
	}
	root.SetPassword(ctx, "carol", "another secret password")
	root.RemoveGroupMember(ctx, "db", "m1")

	got := e.audit(t, rebound.AuditFilter{})
	var lines []string
	for _, a := range got {
		if a.RequestID == "" || a.Time.IsZero() || !strings.HasPrefix(a.Remote, "127.0.0.1:") {
			t.Errorf("entry without request ID, time or remote: %+v", a)
		}
		lines = append(lines, fmt.Sprintf("%s|%s|%s|%s|%s|%d|%s", a.User, a.Role, a.Via, a.Action, a.Target, a.Status, a.Error))
		for _, secret := range []string{pw, gen.Password, tk.Secret, "another secret password"} {
			if strings.Contains(fmt.Sprintf("%+v", a), secret) {
				t.Errorf("audit entry holds a secret: %+v", a)
			}
		}
	}
	want := []string{
		"root|admin|token|DELETE /api/v1/groups/{name}/machines/{machine}|db/m1|202|",
		"root|admin|token|PUT /api/v1/users/{name}/password|carol|200|",
		"bob|viewer|token|POST /api/v1/tokens|bob/" + tk.Token.ID + "|201|",
		"root|admin|token|POST /api/v1/users|dan|201|",
		"root|admin|token|POST /api/v1/users|carol|201|",
		"|||POST /api/v1/machines/{name}/failover|web|401|unauthorized: invalid API token",
		"ops|operator|token|POST /api/v1/machines/{name}/commit|web|409|conflict: machine web is failed over",
		`bob|viewer|token|POST /api/v1/machines/{name}/failover|web|403|forbidden: user "bob" has role viewer; POST /api/v1/machines/{name}/failover needs role operator (an admin can grant it: rebound user set-role bob operator)`,
		"ops|operator|token|POST /api/v1/machines/{name}/failover|web|202|",
	}
	if strings.Join(lines, "\n") != strings.Join(want, "\n") {
		t.Fatalf("audit log:\n%s\nwant:\n%s", strings.Join(lines, "\n"), strings.Join(want, "\n"))
	}
	for _, secret := range []string{pw, gen.Password, tk.Secret} {
		if strings.Contains(e.logs.String(), secret) {
			t.Fatalf("a secret reached the log:\n%s", e.logs)
		}
	}

	// Read through the API, by any role, filtered.
	l, err := bob.ListAudit(ctx, rebound.AuditFilter{User: "ops"})
	if err != nil || len(l) != 2 || l[0].Action != "POST /api/v1/machines/{name}/commit" {
		t.Fatalf("ops's entries %+v %v", l, err)
	}
	if l, err := bob.ListAudit(ctx, rebound.AuditFilter{Limit: 1}); err != nil || len(l) != 1 || l[0].Target != "db/m1" {
		t.Fatalf("limit 1: %+v %v", l, err)
	}
	if l, err := bob.ListAudit(ctx, rebound.AuditFilter{Since: time.Now().Add(time.Hour)}); err != nil || len(l) != 0 {
		t.Fatalf("since the future: %+v %v", l, err)
	}
	for _, q := range []string{"?since=yesterday", "?limit=0", "?limit=10001", "?who=x"} {
		if st, _, er, _ := e.raw(t, "GET", "/api/v1/audit"+q, "Bearer "+e.tokens["bob"], "", nil); st != 400 || er.Error.Code != rebound.EINVALID {
			t.Errorf("GET /api/v1/audit%s: %d %+v", q, st, er)
		}
	}
	// Reading the audit log is not recorded.
	if n := len(e.audit(t, rebound.AuditFilter{})); n != len(want) {
		t.Fatalf("%d entries after reads, want %d", n, len(want))
	}

	// A panicking handler is recorded as a 500.
	e.fake.mu.Lock()
	e.fake.panicky = true
	e.fake.mu.Unlock()
	ops.Commit(ctx, "web")
	e.fake.mu.Lock()
	e.fake.panicky = false
	e.fake.mu.Unlock()
	if a := e.audit(t, rebound.AuditFilter{Limit: 1})[0]; a.Status != 500 || !strings.HasPrefix(a.Error, "internal: internal error (request ID "+a.RequestID) {
		t.Fatalf("panic recorded as %+v", a)
	}
}

// Unauthenticated calls are recorded at most MaxUnauthenticatedAudit a
// minute; the next record counts those left out.
func TestAuditUnauthenticatedBound(t *testing.T) {
	e := newAuthEnv(t)
	now := time.Date(2026, 11, 30, 4, 0, 0, 0, time.UTC)
	e.s.unauthAudit.Now = func() time.Time { return now }
	for range MaxUnauthenticatedAudit + 10 {
		if st, _, _, _ := e.raw(t, "DELETE", "/api/v1/machines/web", "", "", nil); st != 401 {
			t.Fatal(st)
		}
	}
	if n := len(e.audit(t, rebound.AuditFilter{Limit: 1000})); n != MaxUnauthenticatedAudit {
		t.Fatalf("%d records of %d unauthenticated calls", n, MaxUnauthenticatedAudit+10)
	}
	// Authenticated calls are not bounded.
	e.as(t, "ops").DeleteMachine(context.Background(), "web")
	now = now.Add(time.Minute)
	e.raw(t, "DELETE", "/api/v1/machines/web", "Bearer nope", "", nil)
	l := e.audit(t, rebound.AuditFilter{Limit: 2})
	if l[0].Error != "unauthorized: invalid API token (and 10 unauthenticated calls before it not recorded)" || l[1].User != "ops" {
		t.Fatalf("after the minute: %+v", l)
	}
}

// ServeAs: the console's calls carry its user's role and are audited as
// theirs, without a bearer token.
func TestServeAs(t *testing.T) {
	e := newAuthEnv(t)
	h := e.s.Handler()
	do := func(p rebound.Principal, method, path string) (int, string) {
		req := httptest.NewRequest(method, path, nil)
		req.RemoteAddr = "192.0.2.7:4000"
		w := httptest.NewRecorder()
		ServeAs(h, p).ServeHTTP(w, req)
		b, _ := io.ReadAll(w.Result().Body)
		return w.Code, string(b)
	}
	viewerP := rebound.Principal{User: "bob", Role: rebound.RoleViewer, Via: "session"}
	if st, body := do(viewerP, "POST", "/api/v1/machines/web/failover"); st != 403 || !strings.Contains(body, `user \"bob\" has role viewer`) {
		t.Fatalf("viewer's failover through the console: %d %s", st, body)
	}
	if st, body := do(rebound.Principal{User: "ops", Role: rebound.RoleOperator, Via: "session"}, "POST", "/api/v1/machines/web/failover"); st != 202 {
		t.Fatalf("operator's failover through the console: %d %s", st, body)
	}
	if st, body := do(viewerP, "GET", "/api/v1/whoami"); st != 200 || !strings.Contains(body, `"via":"session"`) {
		t.Fatalf("whoami: %d %s", st, body)
	}
	l := e.audit(t, rebound.AuditFilter{})
	if len(l) != 2 || l[0].User != "ops" || l[0].Via != "session" || l[0].Remote != "192.0.2.7:4000" || l[1].Status != 403 {
		t.Fatalf("audit %+v", l)
	}
	// An untrusted request with a principal in its context still needs a token.
	req := httptest.NewRequest("GET", "/api/v1/machines", nil)
	req = req.WithContext(rebound.WithPrincipal(req.Context(), rebound.Principal{User: "root", Role: rebound.RoleAdmin}))
	w := httptest.NewRecorder()
	h.ServeHTTP(w, req)
	if w.Code != http.StatusUnauthorized {
		t.Fatalf("a principal without ServeAs: %d", w.Code)
	}
}
