// Package console is Rebound's web console: server-rendered pages over the
// REST API, served by the API's HTTPS listener at /. It authenticates users
// with a password and a session cookie (rebound.UserService), and runs
// every read and every action through the API handler in-process
// (http.ServeAs), so the console and the CLI get the same answers, the
// same 403s and the same audit entries. See docs/console.md.
package console

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"embed"
	"encoding/hex"
	"html/template"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/rebound-dr/rebound"
	rhttp "github.com/rebound-dr/rebound/http"
)

//go:embed templates/*.html
var templateFS embed.FS

//go:embed static
var staticFS embed.FS

// SessionCookie is the name of the console's session cookie.
const SessionCookie = "rebound_session"

// loginCookie carries the login form's CSRF token (double submit): there is
// no session yet to derive one from.
const loginCookie = "rebound_login"

// CSP is the Content-Security-Policy of every console answer: scripts and
// styles only from the console's own files, no inline code, no framing.
const CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; " +
	"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"

// Login rate limit: this many failures per remote address, and per user,
// within LoginWindow answer 429 until the oldest leaves the window.
const (
	LoginFailures = 5
	LoginWindow   = time.Minute
)

// Console serves the web console. Set the fields, then call Handler once.
type Console struct {
	// API is the REST API handler (http.Server.Handler); the console
	// calls it through http.ServeAs as the logged-in user.
	API   http.Handler
	Users rebound.UserService
	Audit rebound.AuditService
	// SessionTTL is how long a session lives without use (default 12h).
	SessionTTL time.Duration
	Logger     *slog.Logger
	// Now is the clock (tests); default time.Now.
	Now func() time.Time

	pages  map[string]*template.Template
	limit  limiter
	ctx    context.Context // ends at Close: live streams stop
	cancel context.CancelFunc
	once   sync.Once
}

func (c *Console) init() {
	c.once.Do(func() {
		if c.Logger == nil {
			c.Logger = slog.New(slog.DiscardHandler)
		}
		if c.Now == nil {
			c.Now = time.Now
		}
		if c.SessionTTL <= 0 {
			c.SessionTTL = 12 * time.Hour
		}
		c.ctx, c.cancel = context.WithCancel(context.Background())
		c.pages = parsePages()
		c.limit.fails = map[string][]time.Time{}
	})
}

// Close ends the live streams (server-sent events) so that the HTTP
// server's shutdown does not wait for them.
func (c *Console) Close() {
	c.init()
	c.cancel()
}

// Handler returns the console's handler: every path outside /api/.
func (c *Console) Handler() http.Handler {
	c.init()
	mux := http.NewServeMux()
	static, _ := fs.Sub(staticFS, "static")
	mux.Handle("GET /static/", http.StripPrefix("/static/", cacheStatic(http.FileServerFS(static))))
	mux.HandleFunc("GET /login", c.loginPage)
	mux.HandleFunc("POST /login", c.login)
	mux.HandleFunc("POST /logout", c.authed(c.logout))

	mux.HandleFunc("GET /{$}", c.authed(c.overview))
	mux.HandleFunc("GET /machines", c.authed(c.machines))
	mux.HandleFunc("GET /machines/{name}", c.authed(c.machine))
	mux.HandleFunc("GET /machines/{name}/confirm", c.authed(c.confirm(kindMachine)))
	mux.HandleFunc("GET /machines/{name}/preflight", c.authed(c.preflightPage(kindMachine)))
	mux.HandleFunc("POST /machines/{name}/do/{action}", c.authed(c.do(kindMachine)))
	mux.HandleFunc("GET /groups", c.authed(c.groups))
	mux.HandleFunc("GET /groups/{name}", c.authed(c.group))
	mux.HandleFunc("GET /groups/{name}/confirm", c.authed(c.confirm(kindGroup)))
	mux.HandleFunc("GET /groups/{name}/preflight", c.authed(c.preflightPage(kindGroup)))
	mux.HandleFunc("POST /groups/{name}/do/{action}", c.authed(c.do(kindGroup)))
	mux.HandleFunc("GET /plans", c.authed(c.plans))
	mux.HandleFunc("GET /plans/{name}", c.authed(c.plan))
	mux.HandleFunc("GET /plans/{name}/confirm", c.authed(c.planConfirm))
	mux.HandleFunc("POST /plans/{name}/do/{verb}", c.authed(c.planDo))
	mux.HandleFunc("GET /jobs", c.authed(c.jobs))
	mux.HandleFunc("GET /jobs/{id}", c.authed(c.job))
	mux.HandleFunc("GET /jobs/{id}/events", c.authed(c.jobEvents))
	mux.HandleFunc("GET /jobs/{id}/confirm", c.authed(c.jobConfirm))
	mux.HandleFunc("POST /jobs/{id}/do/{action}", c.authed(c.jobDo))
	mux.HandleFunc("GET /audit", c.authed(c.audit))
	return secure(mux)
}

// secure sets the security headers of every answer.
func secure(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", CSP)
		h.Set("X-Frame-Options", "DENY")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "same-origin")
		h.Set("Cross-Origin-Opener-Policy", "same-origin")
		if !strings.HasPrefix(r.URL.Path, "/static/") {
			h.Set("Cache-Control", "no-store")
		}
		next.ServeHTTP(w, r)
	})
}

func cacheStatic(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "public, max-age=3600")
		next.ServeHTTP(w, r)
	})
}

// session is the logged-in user of a request.
type session struct {
	rebound.Principal
	secret string // the cookie's value: never rendered
	CSRF   string // the forms' token, derived from secret
}

type sessionKey struct{}

func sessionOf(r *http.Request) *session {
	s, _ := r.Context().Value(sessionKey{}).(*session)
	return s
}

// csrfOf derives a session's CSRF token from its secret: one-way, so a
// page showing it reveals nothing of the cookie, and no state to keep.
func csrfOf(secret string) string {
	sum := sha256.Sum256([]byte("rebound-console-csrf\x00" + secret))
	return hex.EncodeToString(sum[:16])
}

// authed checks the session cookie; without a valid one, a page redirects
// to the login page and anything else (a form, a stream) answers 401.
// Every POST must carry the session's CSRF token (403 otherwise).
func (c *Console) authed(h func(w http.ResponseWriter, r *http.Request, s *session)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var s *session
		if ck, err := r.Cookie(SessionCookie); err == nil && ck.Value != "" {
			p, err := c.Users.CheckSession(r.Context(), ck.Value)
			if err == nil {
				s = &session{Principal: p, secret: ck.Value, CSRF: csrfOf(ck.Value)}
			} else if rebound.ErrorCode(err) != rebound.EUNAUTHORIZED {
				c.fail(w, r, nil, err)
				return
			}
		}
		if s == nil {
			if r.Method == http.MethodGet && !strings.HasSuffix(r.URL.Path, "/events") {
				http.Redirect(w, r, "/login?next="+urlQueryEscape(r.URL.RequestURI()), http.StatusSeeOther)
				return
			}
			c.fail(w, r, nil, &apiError{Status: http.StatusUnauthorized, Code: rebound.EUNAUTHORIZED,
				Message: "not logged in, or the session expired: log in again at /login"})
			return
		}
		if r.Method == http.MethodPost {
			r.Body = http.MaxBytesReader(w, r.Body, 64<<10)
			if tok := r.PostFormValue("csrf"); subtle.ConstantTimeCompare([]byte(tok), []byte(s.CSRF)) != 1 {
				c.fail(w, r, s, &apiError{Status: http.StatusForbidden, Code: rebound.EFORBIDDEN,
					Message: "the form's CSRF token is missing or wrong: reload the page and submit it again"})
				return
			}
		}
		h(w, r.WithContext(context.WithValue(r.Context(), sessionKey{}, s)), s)
	}
}

func remoteHost(r *http.Request) string {
	if h, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
		return h
	}
	return r.RemoteAddr
}

// limiter counts failed logins per key within LoginWindow.
type limiter struct {
	mu    sync.Mutex
	fails map[string][]time.Time
}

// wait returns how long until key may try again (0: now).
func (l *limiter) wait(now time.Time, keys ...string) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	var d time.Duration
	for _, k := range keys {
		ts := l.prune(now, k)
		if len(ts) >= LoginFailures {
			d = max(d, ts[0].Add(LoginWindow).Sub(now))
		}
	}
	return d
}

func (l *limiter) fail(now time.Time, keys ...string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, k := range keys {
		l.fails[k] = append(l.prune(now, k), now)
	}
	if len(l.fails) > 10000 { // bound the memory a scan of names can take
		for k := range l.fails {
			if len(l.prune(now, k)) == 0 {
				delete(l.fails, k)
			}
		}
	}
}

func (l *limiter) prune(now time.Time, k string) []time.Time {
	ts := l.fails[k]
	i := 0
	for i < len(ts) && now.Sub(ts[i]) >= LoginWindow {
		i++
	}
	ts = ts[i:]
	if len(ts) == 0 {
		delete(l.fails, k)
	} else {
		l.fails[k] = ts
	}
	return ts
}

// apiCaller is how a page reaches the API: as the session's principal,
// from the browser's address (the audit log's "from where").
func (c *Console) caller(r *http.Request, s *session) *caller {
	return &caller{h: rhttp.ServeAs(c.API, s.Principal), ctx: r.Context(), remote: r.RemoteAddr}
}
