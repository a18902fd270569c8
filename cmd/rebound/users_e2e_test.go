package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rebound-dr/rebound"
	rhttp "github.com/rebound-dr/rebound/http"
	"github.com/rebound-dr/rebound/internal/syncbuf"
	"github.com/rebound-dr/rebound/sqlite"
)

// TestUsersCLIEndToEnd drives users, roles, tokens and the audit log
// through the CLI against a real server (rebound up): a viewer's failover
// is exit 8 naming the role it needs, an operator runs the loop but cannot
// mint a site token, an admin can; a revoked token is 401; the audit log
// records each call with its user, action and result, and filters by user;
// no password or token reaches the server's log.
func TestUsersCLIEndToEnd(t *testing.T) {
	logs := &syncbuf.Buffer{}
	up, admin := fixedUpLog(t, nil, logs)
	ctx := context.Background()
	secrets := []string{up.AdminToken}
	if up.AdminPassword == "" {
		t.Fatal("up did not give user admin a password")
	}
	secrets = append(secrets, up.AdminPassword)
	as := func(token string) rebound.Service {
		t.Helper()
		c, err := rhttp.NewClient(up.Server.APIURL, token, up.Server.CA.CertPEM())
		if err != nil {
			t.Fatal(err)
		}
		return c
	}

	// An admin creates a viewer (generated password) and an operator (a
	// password from a file), and a token of each.
	r := runCLI(t, admin, "user", "create", "vic", "--role", "viewer", "-o", "json")
	wantCode(t, r, 0)
	vic := decode[rebound.CreateUserResult](t, r.stdout)
	if vic.User.Role != rebound.RoleViewer || len(vic.Password) < 12 {
		t.Fatalf("user create: %s", r.stdout)
	}
	secrets = append(secrets, vic.Password)
	pwFile := filepath.Join(t.TempDir(), "opa.pw")
	os.WriteFile(pwFile, []byte("operators long password\n"), 0o600)
	r = runCLI(t, admin, "user", "create", "opa", "--role", "operator", "--password-file", pwFile)
	wantCode(t, r, 0)
	if !strings.Contains(r.stdout, "created user opa (role operator)") || strings.Contains(r.stdout, "password:") {
		t.Fatalf("user create with a password file:\n%s", r.stdout)
	}
	secrets = append(secrets, "operators long password")
	if _, err := up.Server.DB.CheckPassword(ctx, "opa", "operators long password"); err != nil {
		t.Fatalf("the file's password (without its newline): %v", err)
	}
	wantStderr(t, runCLI(t, admin, "user", "create", "x", "--role", "root"), ExitUsage, "viewer, operator or admin")
	wantStderr(t, runCLI(t, admin, "user", "create", "x"), ExitUsage, "--role is required")

	token := func(user string) rebound.CreateTokenResult {
		t.Helper()
		r := runCLI(t, admin, "token", "create", "--user", user, "--name", "cli", "-o", "json")
		wantCode(t, r, 0)
		tk := decode[rebound.CreateTokenResult](t, r.stdout)
		if tk.Token.User != user || !strings.HasPrefix(tk.Secret, "rbt_") {
			t.Fatalf("token create: %s", r.stdout)
		}
		secrets = append(secrets, tk.Secret)
		return tk
	}
	viewer, operator := as(token("vic").Secret), as(token("opa").Secret)

	r = runCLI(t, operator, "whoami")
	wantCode(t, r, 0)
	if !strings.HasPrefix(r.stdout, "user opa, role operator (via token, token ") {
		t.Fatalf("whoami: %q", r.stdout)
	}

	// Operators run the loop; viewers see it and change nothing.
	wantCode(t, runCLI(t, operator, "machine", "create", "vm1", "--site", "primary", "--disk", "4M"), 0)
	r = runCLI(t, viewer, "machine", "list")
	wantCode(t, r, 0)
	if !strings.Contains(r.stdout, "vm1") {
		t.Fatalf("viewer's machine list:\n%s", r.stdout)
	}
	r = runCLI(t, viewer, "failover", "vm1")
	wantStderr(t, r, ExitForbidden, `rebound: forbidden: user "vic" has role viewer; POST /api/v1/machines/{name}/failover needs role operator`,
		"rebound user set-role vic operator")
	r = runCLI(t, viewer, "failover", "vm1", "-o", "json")
	if r.code != ExitForbidden || !strings.Contains(r.stdout, `"code":"forbidden"`) {
		t.Fatalf("failover -o json as a viewer: %d %s", r.code, r.stdout)
	}
	wantStderr(t, runCLI(t, operator, "site", "token", "edge"), ExitForbidden, `user "opa" has role operator; POST /api/v1/sites/{name}/enroll-tokens needs role admin`)
	wantStderr(t, runCLI(t, operator, "policy", "set", "gold", "--rpo", "10s"), ExitForbidden, "needs role admin")
	r = runCLI(t, admin, "site", "token", "edge")
	wantCode(t, r, 0)
	secrets = append(secrets, strings.TrimSpace(r.stdout))
	wantStderr(t, runCLI(t, viewer, "user", "list"), ExitForbidden, "GET /api/v1/users needs role admin")
	wantStderr(t, runCLI(t, viewer, "token", "list", "--all"), ExitForbidden, "needs role admin")

	r = runCLI(t, admin, "user", "list", "-o", "json")
	wantCode(t, r, 0)
	us := decode[[]rebound.User](t, r.stdout)
	if len(us) != 3 || us[0].Name != "admin" || us[0].Role != rebound.RoleAdmin || !us[0].PasswordSet || us[2].Name != "vic" {
		t.Fatalf("user list: %s", r.stdout)
	}

	// Completion offers user names (to an admin) and one's own token IDs.
	complete := func(svc rebound.Service, args ...string) string {
		t.Helper()
		r := runCLI(t, svc, append([]string{"__complete"}, args...)...)
		wantCode(t, r, 0)
		lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
		return strings.Join(lines[:len(lines)-1], " ")
	}
	if got := complete(admin, "user", "set-role", ""); got != "admin opa vic" {
		t.Fatalf("complete user set-role: %q", got)
	}
	if got := complete(admin, "audit", "--user", "v"); got != "vic" {
		t.Fatalf("complete audit --user: %q", got)
	}
	if got, ts := complete(operator, "token", "revoke", ""), decode[[]rebound.APIToken](t, runCLI(t, operator, "token", "list", "-o", "json").stdout); len(ts) != 1 || got != ts[0].ID {
		t.Fatalf("complete token revoke: %q, tokens %+v", got, ts)
	}

	// A token revoked is refused from the next call on.
	r = runCLI(t, operator, "token", "create", "--name", "spare", "-o", "json")
	wantCode(t, r, 0)
	spare := decode[rebound.CreateTokenResult](t, r.stdout)
	secrets = append(secrets, spare.Secret)
	r = runCLI(t, operator, "token", "list", "-o", "json")
	wantCode(t, r, 0)
	if ts := decode[[]rebound.APIToken](t, r.stdout); len(ts) != 2 || ts[1].ID != spare.Token.ID || strings.Contains(r.stdout, "rbt_") {
		t.Fatalf("token list: %s", r.stdout)
	}
	wantCode(t, runCLI(t, as(spare.Secret), "machine", "list"), 0)
	wantStderr(t, runCLI(t, viewer, "token", "revoke", spare.Token.ID), ExitNotFound, "no API token")
	wantCode(t, runCLI(t, operator, "token", "revoke", spare.Token.ID), 0)
	wantStderr(t, runCLI(t, as(spare.Secret), "machine", "delete", "vm1"), ExitUnauthorized, "invalid API token")

	// The audit log has each of those calls, refused ones too.
	r = runCLI(t, viewer, "audit", "-o", "json", "--limit", "1000")
	wantCode(t, r, 0)
	entries := decode[[]rebound.AuditEntry](t, r.stdout)
	has := func(user, action, target string, status int, errPart string) {
		t.Helper()
		for _, e := range entries {
			if e.User == user && e.Action == action && e.Target == target && e.Status == status && strings.Contains(e.Error, errPart) &&
				e.RequestID != "" && strings.HasPrefix(e.Remote, "127.0.0.1:") {
				return
			}
		}
		t.Fatalf("no audit entry %s %s %s %d %q in\n%s", user, action, target, status, errPart, r.stdout)
	}
	has("vic", "POST /api/v1/machines/{name}/failover", "vm1", 403, "forbidden: user \"vic\" has role viewer")
	has("opa", "POST /api/v1/machines", "vm1", 201, "")
	has("opa", "POST /api/v1/sites/{name}/enroll-tokens", "edge", 403, "needs role admin")
	has("admin", "POST /api/v1/sites/{name}/enroll-tokens", "edge", 201, "")
	has("admin", "POST /api/v1/users", "vic", 201, "")
	has("opa", "DELETE /api/v1/tokens/{id}", spare.Token.ID, 204, "")
	has("vic", "DELETE /api/v1/tokens/{id}", spare.Token.ID, 404, "not_found")
	has("", "DELETE /api/v1/machines/{name}", "vm1", 401, "unauthorized: invalid API token")
	for _, e := range entries {
		if strings.HasPrefix(e.Action, "GET ") {
			t.Fatalf("a read was audited: %+v", e)
		}
		for _, s := range secrets {
			if strings.Contains(r.stdout, s) {
				t.Fatalf("the audit log holds a secret %q", s)
			}
		}
	}
	r = runCLI(t, admin, "audit", "--user", "vic", "-o", "json")
	wantCode(t, r, 0)
	vics := decode[[]rebound.AuditEntry](t, r.stdout)
	if len(vics) < 3 {
		t.Fatalf("audit --user vic: %s", r.stdout)
	}
	for _, e := range vics {
		if e.User != "vic" {
			t.Fatalf("audit --user vic lists %+v", e)
		}
	}
	r = runCLI(t, admin, "audit", "--since", "1h", "--user", "opa", "--limit", "2")
	wantCode(t, r, 0)
	if lines := strings.Split(strings.TrimSpace(r.stdout), "\n"); len(lines) != 3 || !strings.HasPrefix(strings.Join(strings.Fields(lines[0]), " "), "TIME USER ROLE VIA REMOTE ACTION TARGET STATUS ERROR") ||
		!strings.Contains(lines[1], "DELETE /api/v1/tokens/{id}") {
		t.Fatalf("audit table:\n%s", r.stdout)
	}
	wantStderr(t, runCLI(t, admin, "audit", "--since", "yesterday"), ExitUsage, "neither an RFC 3339 time")

	// A role change takes effect at once; a deleted user's tokens stop.
	wantCode(t, runCLI(t, admin, "user", "set-role", "vic", "operator"), 0)
	wantCode(t, runCLI(t, viewer, "point", "create", "vm1"), ExitConflict) // allowed now: refused by the machine's state, not the role
	wantStderr(t, runCLI(t, admin, "user", "delete", "admin"), ExitConflict, "last admin")
	r = runCLI(t, admin, "user", "passwd", "vic", "-o", "json")
	wantCode(t, r, 0)
	if pw := decode[PasswordSet](t, r.stdout); len(pw.Password) < 12 {
		t.Fatalf("user passwd: %s", r.stdout)
	} else {
		secrets = append(secrets, pw.Password)
	}
	wantCode(t, runCLI(t, admin, "user", "delete", "vic"), 0)
	wantStderr(t, runCLI(t, viewer, "machine", "list"), ExitUnauthorized, "invalid API token")

	for _, s := range secrets {
		if strings.Contains(logs.String(), s) {
			t.Fatalf("secret %q in the server's log", s)
		}
	}
}

// TestUpConsolePassword: up gives user admin a console password, writes it
// to the CLI config (0600) and keeps it across restarts; the banner and
// the log name the file, never the password.
func TestUpConsolePassword(t *testing.T) {
	dir := clearEnv(t)
	data := t.TempDir()
	logs := &syncbuf.Buffer{}
	up, _ := fixedUpLog(t, func(c *UpConfig) { c.DataDir, c.WriteConfig = data, true }, logs)
	path := filepath.Join(dir, "rebound", "config")
	if up.ConfigPath != path {
		t.Fatalf("config at %s", up.ConfigPath)
	}
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("config mode: %v %v", st, err)
	}
	cfg, err := readClientConfigFile()
	if err != nil || cfg.ConsoleUser != "admin" || cfg.ConsolePassword != up.AdminPassword || len(cfg.ConsolePassword) < 12 {
		t.Fatalf("config %+v %v", cfg, err)
	}
	ctx := context.Background()
	if u, err := up.Server.DB.CheckPassword(ctx, "admin", cfg.ConsolePassword); err != nil || u.Role != rebound.RoleAdmin {
		t.Fatalf("console password: %+v %v", u, err)
	}
	login := up.consoleLogin()
	if login != "user admin, password in "+path || strings.Contains(logs.String(), cfg.ConsolePassword) {
		t.Fatalf("banner %q or the log shows the password", login)
	}
	pw := cfg.ConsolePassword
	up.Close()

	// Again on the same data: the same password.
	up, _ = fixedUpLog(t, func(c *UpConfig) { c.DataDir, c.WriteConfig = data, true }, logs)
	if cfg, _ := readClientConfigFile(); up.AdminPassword != pw || cfg.ConsolePassword != pw {
		t.Fatalf("restart changed the password: %q, config %q", up.AdminPassword, cfg.ConsolePassword)
	}
	// A password set by someone else is left alone, and not written.
	if err := up.Server.DB.SetPassword(ctx, "admin", "chosen by a human"); err != nil {
		t.Fatal(err)
	}
	up.Close()
	up, _ = fixedUpLog(t, func(c *UpConfig) { c.DataDir, c.WriteConfig = data, true }, logs)
	if cfg, _ := readClientConfigFile(); up.AdminPassword != "" || cfg.ConsolePassword != "" || !strings.Contains(up.consoleLogin(), "rebound user passwd admin") {
		t.Fatalf("after a human's password: %q, config %q, banner %q", up.AdminPassword, cfg.ConsolePassword, up.consoleLogin())
	}
	if _, err := up.Server.DB.CheckPassword(ctx, "admin", "chosen by a human"); err != nil {
		t.Fatal(err)
	}
}

// TestEnsureAdminToken: --admin-token-file gets a token of user admin (the
// user created if missing, role admin, no password), kept while valid and
// replaced once revoked.
func TestEnsureAdminToken(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	db, err := sqlite.Open(filepath.Join(dir, "rebound.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	path := filepath.Join(dir, "sub", "admin-token")
	read := func() string {
		t.Helper()
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if st, _ := os.Stat(path); st.Mode().Perm() != 0o600 {
			t.Fatalf("token file mode %v", st.Mode())
		}
		return strings.TrimSpace(string(b))
	}
	if err := ensureAdminToken(ctx, db, path); err != nil {
		t.Fatal(err)
	}
	tok := read()
	p, err := db.CheckToken(ctx, tok)
	if err != nil || p.User != "admin" || p.Role != rebound.RoleAdmin {
		t.Fatalf("admin token: %+v %v", p, err)
	}
	if u, _ := db.GetUser(ctx, "admin"); u.PasswordSet {
		t.Fatal("the admin user got a password")
	}
	if err := ensureAdminToken(ctx, db, path); err != nil || read() != tok {
		t.Fatalf("a valid token was replaced (%v)", err)
	}
	if err := db.RevokeToken(ctx, p.TokenID); err != nil {
		t.Fatal(err)
	}
	if err := ensureAdminToken(ctx, db, path); err != nil || read() == tok {
		t.Fatalf("a revoked token was kept (%v)", err)
	}
	// Deleted (another admin remains): created again at the next start.
	db.EnsureUser(ctx, "root", rebound.RoleAdmin)
	if err := db.DeleteUser(ctx, "admin"); err != nil {
		t.Fatal(err)
	}
	if err := ensureAdminToken(ctx, db, path); err != nil {
		t.Fatal(err)
	}
	if p, err := db.CheckToken(ctx, read()); err != nil || p.User != "admin" || p.Role != rebound.RoleAdmin {
		t.Fatalf("after the deletion: %+v %v", p, err)
	}
}
