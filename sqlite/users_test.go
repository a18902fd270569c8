package sqlite

import (
	"context"
	"database/sql"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	_ "modernc.org/sqlite"
)

func userNames(t *testing.T, db *DB) []string {
	t.Helper()
	us, err := db.ListUsers(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, u := range us {
		out = append(out, fmt.Sprintf("%s:%s:%v", u.Name, u.Role, u.PasswordSet))
	}
	return out
}

// Users: names, roles and passwords are checked; a generated password is
// returned once and works; the stored hash is salted argon2id; an unknown
// user and a wrong password are the same error.
func TestUsers(t *testing.T) {
	ctx := context.Background()
	db, path := open(t)

	res, err := db.CreateUser(ctx, rebound.CreateUserRequest{Name: "alice", Role: rebound.RoleOperator, Password: "correct horse battery"})
	if err != nil {
		t.Fatal(err)
	}
	if res.Password != "" || res.User.Name != "alice" || res.User.Role != rebound.RoleOperator || !res.User.PasswordSet || res.User.CreatedAt.IsZero() {
		t.Fatalf("created %+v", res)
	}
	gen, err := db.CreateUser(ctx, rebound.CreateUserRequest{Name: "bob", Role: rebound.RoleViewer})
	if err != nil {
		t.Fatal(err)
	}
	if len(gen.Password) < MinPasswordLen {
		t.Fatalf("generated password %q", gen.Password)
	}
	if u, err := db.CheckPassword(ctx, "bob", gen.Password); err != nil || u.Name != "bob" || u.Role != rebound.RoleViewer {
		t.Fatalf("generated password: %+v %v", u, err)
	}
	// Same password, other salt.
	db.CreateUser(ctx, rebound.CreateUserRequest{Name: "carol", Role: rebound.RoleAdmin, Password: "correct horse battery"})
	var h1, h2 string
	db.db.QueryRow(`SELECT password FROM users WHERE name = 'alice'`).Scan(&h1)
	db.db.QueryRow(`SELECT password FROM users WHERE name = 'carol'`).Scan(&h2)
	if !strings.HasPrefix(h1, "$argon2id$") || h1 == h2 || strings.Contains(h1, "horse") {
		t.Fatalf("hashes %q %q", h1, h2)
	}

	for _, tc := range []struct {
		req  rebound.CreateUserRequest
		code string
		msg  string
	}{
		{rebound.CreateUserRequest{Name: "alice", Role: rebound.RoleViewer}, rebound.ECONFLICT, "already exists"},
		{rebound.CreateUserRequest{Name: "dave", Role: rebound.RoleViewer, Password: "short"}, rebound.EINVALID, "at least 12"},
		{rebound.CreateUserRequest{Name: "dave", Role: "root"}, rebound.EINVALID, "viewer, operator or admin"},
		{rebound.CreateUserRequest{Name: "Dave", Role: rebound.RoleViewer}, rebound.EINVALID, "invalid user name"},
		{rebound.CreateUserRequest{Name: "", Role: rebound.RoleViewer}, rebound.EINVALID, "invalid user name"},
	} {
		_, err := db.CreateUser(ctx, tc.req)
		wantCode(t, err, tc.code)
		if !strings.Contains(err.Error(), tc.msg) {
			t.Fatalf("%+v: %v", tc.req, err)
		}
	}
	if got := userNames(t, db); !slices.Equal(got, []string{"alice:operator:true", "bob:viewer:true", "carol:admin:true"}) {
		t.Fatalf("users %v", got)
	}

	_, errWrong := db.CheckPassword(ctx, "alice", "correct horse battery!")
	_, errUnknown := db.CheckPassword(ctx, "zed", "correct horse battery")
	wantCode(t, errWrong, rebound.EUNAUTHORIZED)
	wantCode(t, errUnknown, rebound.EUNAUTHORIZED)
	if errWrong.Error() != errUnknown.Error() {
		t.Fatalf("the messages tell users apart: %q, %q", errWrong, errUnknown)
	}
	// A user without a password (the migrated admin) cannot log in.
	if created, err := db.EnsureUser(ctx, "robot", rebound.RoleViewer); err != nil || !created {
		t.Fatalf("ensure: %v %v", created, err)
	}
	if created, _ := db.EnsureUser(ctx, "robot", rebound.RoleAdmin); created {
		t.Fatal("ensured twice")
	}
	if u, _ := db.GetUser(ctx, "robot"); u.Role != rebound.RoleViewer || u.PasswordSet {
		t.Fatalf("robot %+v", u)
	}
	_, err = db.CheckPassword(ctx, "robot", "")
	wantCode(t, err, rebound.EUNAUTHORIZED)

	// A new password ends the sessions; the old one stops working.
	sess, _ := db.CreateSession(ctx, "alice", time.Hour)
	wantCode(t, db.SetPassword(ctx, "alice", "too short"), rebound.EINVALID)
	wantCode(t, db.SetPassword(ctx, "nobody", "long enough password"), rebound.ENOTFOUND)
	if _, err := db.CheckSession(ctx, sess); err != nil {
		t.Fatalf("a refused password change ended the session: %v", err)
	}
	if err := db.SetPassword(ctx, "alice", "another long password"); err != nil {
		t.Fatal(err)
	}
	_, err = db.CheckSession(ctx, sess)
	wantCode(t, err, rebound.EUNAUTHORIZED)
	_, err = db.CheckPassword(ctx, "alice", "correct horse battery")
	wantCode(t, err, rebound.EUNAUTHORIZED)

	db.Close()
	db, _ = Open(path)
	defer db.Close()
	if _, err := db.CheckPassword(ctx, "alice", "another long password"); err != nil {
		t.Fatalf("after reopen: %v", err)
	}
}

// The last admin can be neither deleted nor demoted; with two, one can.
func TestLastAdmin(t *testing.T) {
	ctx := context.Background()
	db, _ := open(t)
	db.EnsureUser(ctx, "root", rebound.RoleAdmin)
	db.EnsureUser(ctx, "ops", rebound.RoleOperator)

	err := db.DeleteUser(ctx, "root")
	wantCode(t, err, rebound.ECONFLICT)
	if !strings.Contains(err.Error(), "last admin") || !strings.Contains(err.Error(), "rebound user set-role") {
		t.Fatalf("message %q", err)
	}
	wantCode(t, db.SetRole(ctx, "root", rebound.RoleOperator), rebound.ECONFLICT)
	wantCode(t, db.SetRole(ctx, "ops", "superuser"), rebound.EINVALID)
	wantCode(t, db.SetRole(ctx, "nobody", rebound.RoleAdmin), rebound.ENOTFOUND)
	wantCode(t, db.DeleteUser(ctx, "nobody"), rebound.ENOTFOUND)

	if err := db.SetRole(ctx, "ops", rebound.RoleAdmin); err != nil {
		t.Fatal(err)
	}
	if err := db.SetRole(ctx, "root", rebound.RoleViewer); err != nil {
		t.Fatalf("demote with another admin: %v", err)
	}
	wantCode(t, db.DeleteUser(ctx, "ops"), rebound.ECONFLICT)
	if err := db.DeleteUser(ctx, "root"); err != nil {
		t.Fatal(err)
	}
	if got := userNames(t, db); !slices.Equal(got, []string{"ops:admin:false"}) {
		t.Fatalf("users %v", got)
	}
}

// Tokens belong to a user and carry its current role; they are stored
// hashed, list without secrets, note their last use, and go with a
// revocation or with their user.
func TestUserTokens(t *testing.T) {
	ctx := context.Background()
	db, _ := open(t)
	now := time.Date(2026, 11, 30, 4, 0, 0, 0, time.UTC)
	db.now = func() time.Time { return now }
	db.EnsureUser(ctx, "root", rebound.RoleAdmin)
	db.EnsureUser(ctx, "bob", rebound.RoleViewer)

	_, err := db.CreateToken(ctx, "nobody", "ci")
	wantCode(t, err, rebound.ENOTFOUND)
	_, err = db.CreateToken(ctx, "bob", " ")
	wantCode(t, err, rebound.EINVALID)
	a, err := db.CreateToken(ctx, "root", "laptop")
	if err != nil {
		t.Fatal(err)
	}
	now = now.Add(time.Second)
	b, _ := db.CreateToken(ctx, "bob", "ci")
	now = now.Add(time.Second)
	b2, _ := db.CreateToken(ctx, "bob", "grafana")
	if !strings.HasPrefix(b.Secret, APITokenPrefix) || b.Token.ID == "" || b.Token.ID == b2.Token.ID || b.Token.User != "bob" || b.Token.Name != "ci" {
		t.Fatalf("token %+v", b)
	}
	var n int
	db.db.QueryRow(`SELECT count(*) FROM api_tokens WHERE hash = ? OR name = ? OR id = ?`, b.Secret, b.Secret, b.Secret).Scan(&n)
	if n != 0 {
		t.Fatal("secret stored")
	}

	p, err := db.CheckToken(ctx, b.Secret)
	if err != nil || p != (rebound.Principal{User: "bob", Role: rebound.RoleViewer, Via: "token", TokenID: b.Token.ID}) {
		t.Fatalf("principal %+v %v", p, err)
	}
	// The role is the user's, read at each call.
	db.SetRole(ctx, "bob", rebound.RoleOperator)
	if p, _ := db.CheckToken(ctx, b.Secret); p.Role != rebound.RoleOperator {
		t.Fatalf("after set-role: %+v", p)
	}
	_, err = db.CheckToken(ctx, b.Secret+"x")
	wantCode(t, err, rebound.EUNAUTHORIZED)

	list := func(user string) []string {
		t.Helper()
		ts, err := db.ListTokens(ctx, user)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, tk := range ts {
			out = append(out, fmt.Sprintf("%s/%s/%s", tk.User, tk.Name, tk.LastUsed.Format(time.TimeOnly)))
		}
		return out
	}
	// Last use: set by the first check, then at most once a minute.
	if got := list("bob"); !slices.Equal(got, []string{"bob/ci/04:00:02", "bob/grafana/00:00:00"}) {
		t.Fatalf("bob's tokens %v", got)
	}
	now = now.Add(30 * time.Second)
	db.CheckToken(ctx, b.Secret)
	if got := list("bob")[0]; got != "bob/ci/04:00:02" {
		t.Fatalf("last use written within the minute: %v", got)
	}
	now = now.Add(time.Minute)
	db.CheckToken(ctx, b.Secret)
	if got := list("bob")[0]; got != "bob/ci/04:01:32" {
		t.Fatalf("last use %v", got)
	}
	if got := list(""); !slices.Equal(got, []string{"root/laptop/00:00:00", "bob/ci/04:01:32", "bob/grafana/00:00:00"}) {
		t.Fatalf("all tokens %v", got)
	}
	_, err = db.ListTokens(ctx, "nobody")
	wantCode(t, err, rebound.ENOTFOUND)

	if err := db.RevokeToken(ctx, b.Token.ID); err != nil {
		t.Fatal(err)
	}
	wantCode(t, db.RevokeToken(ctx, b.Token.ID), rebound.ENOTFOUND)
	_, err = db.CheckToken(ctx, b.Secret)
	wantCode(t, err, rebound.EUNAUTHORIZED)
	if _, err := db.CheckToken(ctx, b2.Secret); err != nil {
		t.Fatalf("revoking one token revoked another: %v", err)
	}

	// Deleting a user revokes its tokens and sessions.
	sess, _ := db.CreateSession(ctx, "bob", time.Hour)
	if err := db.DeleteUser(ctx, "bob"); err != nil {
		t.Fatal(err)
	}
	_, err = db.CheckToken(ctx, b2.Secret)
	wantCode(t, err, rebound.EUNAUTHORIZED)
	_, err = db.CheckSession(ctx, sess)
	wantCode(t, err, rebound.EUNAUTHORIZED)
	if got := list(""); !slices.Equal(got, []string{"root/laptop/00:00:00"}) {
		t.Fatalf("tokens after the deletion %v", got)
	}
	// A new user of the same name does not inherit them.
	db.EnsureUser(ctx, "bob", rebound.RoleAdmin)
	_, err = db.CheckToken(ctx, b2.Secret)
	wantCode(t, err, rebound.EUNAUTHORIZED)
	if _, err := db.CheckToken(ctx, a.Secret); err != nil {
		t.Fatal(err)
	}
}

// Sessions expire after their lifetime of inactivity; each use extends
// them; logout ends them.
func TestSessions(t *testing.T) {
	ctx := context.Background()
	db, _ := open(t)
	now := time.Date(2026, 11, 30, 4, 0, 0, 0, time.UTC)
	db.now = func() time.Time { return now }
	db.EnsureUser(ctx, "ops", rebound.RoleOperator)

	_, err := db.CreateSession(ctx, "nobody", time.Hour)
	wantCode(t, err, rebound.ENOTFOUND)
	_, err = db.CreateSession(ctx, "ops", 0)
	wantCode(t, err, rebound.EINVALID)
	s, err := db.CreateSession(ctx, "ops", 10*time.Minute)
	if err != nil || !strings.HasPrefix(s, SessionPrefix) {
		t.Fatalf("session %q %v", s, err)
	}
	var n int
	db.db.QueryRow(`SELECT count(*) FROM sessions WHERE hash = ?`, s).Scan(&n)
	if n != 0 {
		t.Fatal("session secret stored")
	}
	for i := range 3 { // 9 minutes apart: each use extends the session
		now = now.Add(9 * time.Minute)
		p, err := db.CheckSession(ctx, s)
		if err != nil || p != (rebound.Principal{User: "ops", Role: rebound.RoleOperator, Via: "session"}) {
			t.Fatalf("use %d: %+v %v", i, p, err)
		}
	}
	now = now.Add(10 * time.Minute)
	_, err = db.CheckSession(ctx, s)
	wantCode(t, err, rebound.EUNAUTHORIZED)
	if !strings.Contains(err.Error(), "log in again") {
		t.Fatalf("message %q", err)
	}

	s2, _ := db.CreateSession(ctx, "ops", time.Hour)
	db.db.QueryRow(`SELECT count(*) FROM sessions`).Scan(&n)
	if n != 1 {
		t.Fatalf("%d sessions: the expired one was not dropped", n)
	}
	if err := db.DeleteSession(ctx, s2); err != nil {
		t.Fatal(err)
	}
	if err := db.DeleteSession(ctx, "rbs_unknown"); err != nil {
		t.Fatal(err)
	}
	_, err = db.CheckSession(ctx, s2)
	wantCode(t, err, rebound.EUNAUTHORIZED)
}

// The audit log is newest first and filters by time, user and count.
func TestAudit(t *testing.T) {
	ctx := context.Background()
	db, path := open(t)
	t0 := time.Date(2026, 11, 30, 4, 0, 0, 0, time.UTC)
	for i := range 150 {
		user := "alice"
		if i%3 == 0 {
			user = "bob"
		}
		e := rebound.AuditEntry{Time: t0.Add(time.Duration(i) * time.Second), User: user, Role: rebound.RoleOperator, Via: "token",
			Remote: "127.0.0.1:5000", Action: "POST /api/v1/machines/{name}/failover", Target: fmt.Sprint("vm", i),
			Status: 202, RequestID: fmt.Sprint("r", i)}
		if i == 149 {
			e.Status, e.Error = 403, "forbidden: no"
		}
		if err := db.RecordAudit(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
	all, err := db.ListAudit(ctx, rebound.AuditFilter{})
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != DefaultAuditLimit || all[0].Target != "vm149" || all[0].Error != "forbidden: no" || all[0].Status != 403 || all[99].Target != "vm50" {
		t.Fatalf("default page: %d entries, first %+v", len(all), all[0])
	}
	want := rebound.AuditEntry{ID: all[1].ID, Time: t0.Add(148 * time.Second), User: "alice", Role: rebound.RoleOperator, Via: "token",
		Remote: "127.0.0.1:5000", Action: "POST /api/v1/machines/{name}/failover", Target: "vm148", Status: 202, RequestID: "r148"}
	if all[1] != want {
		t.Fatalf("entry %+v, want %+v", all[1], want)
	}
	bob, _ := db.ListAudit(ctx, rebound.AuditFilter{User: "bob", Since: t0.Add(140 * time.Second), Limit: 2})
	if len(bob) != 2 || bob[0].Target != "vm147" || bob[1].Target != "vm144" {
		t.Fatalf("bob since 140s: %+v", bob)
	}
	bob, _ = db.ListAudit(ctx, rebound.AuditFilter{User: "bob", Since: t0.Add(140 * time.Second)})
	if len(bob) != 3 {
		t.Fatalf("bob since 140s: %d entries", len(bob))
	}
	db.Close()
	db, _ = Open(path)
	defer db.Close()
	if got, _ := db.ListAudit(ctx, rebound.AuditFilter{Limit: 1000}); len(got) != 150 {
		t.Fatalf("after reopen %d entries", len(got))
	}
}

// A database of schema 3 (tokens without users) migrates: its tokens keep
// working, owned by a new user "admin" with role admin and no password.
func TestMigrationToUsers(t *testing.T) {
	ctx := context.Background()
	path := t.TempDir() + "/old.db"
	raw, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{
		`CREATE TABLE schema_version (version INTEGER NOT NULL)`,
		`INSERT INTO schema_version (version) VALUES (3)`,
		migrations[0], migrations[1], migrations[2],
		`INSERT INTO api_tokens (hash, name, created_at) VALUES ('` + hashToken("rbt_old") + `', 'admin', 1000000000000000000)`,
		`INSERT INTO api_tokens (hash, name, created_at) VALUES ('` + hashToken("rbt_prom") + `', 'prom', 1100000000000000000)`,
	} {
		if _, err := raw.Exec(q); err != nil {
			t.Fatal(err)
		}
	}
	raw.Close()
	db, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	for _, s := range []string{"rbt_old", "rbt_prom"} {
		p, err := db.CheckToken(ctx, s)
		if err != nil || p.User != "admin" || p.Role != rebound.RoleAdmin || p.TokenID == "" {
			t.Fatalf("old token %s after the migration: %+v %v", s, p, err)
		}
	}
	if got := userNames(t, db); !slices.Equal(got, []string{"admin:admin:false"}) {
		t.Fatalf("users %v", got)
	}
	ts, _ := db.ListTokens(ctx, "admin")
	if len(ts) != 2 || ts[0].Name != "admin" || ts[1].Name != "prom" || ts[0].ID == ts[1].ID || ts[0].CreatedAt != time.Unix(1e9, 0).UTC() {
		t.Fatalf("tokens %+v", ts)
	}
	if err := db.RevokeToken(ctx, ts[1].ID); err != nil {
		t.Fatal(err)
	}
	_, err = db.CheckToken(ctx, "rbt_prom")
	wantCode(t, err, rebound.EUNAUTHORIZED)

	// A database without tokens gets no user.
	fresh, _ := open(t)
	if got := userNames(t, fresh); len(got) != 0 {
		t.Fatalf("fresh store has users %v", got)
	}
}
