// Package http is Rebound's REST edge: Server exposes a rebound.Service (and
// optionally a rebound.LoopService and a rebound.PowerService) as JSON over
// HTTP, Client implements all three against such a server.
// The routes, bodies and error format are in docs/design/api.md and in the
// OpenAPI document served at /api/v1/openapi.json.
package http

import (
	"bytes"
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"strings"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/lograte"
)

// MaxBodyBytes bounds a request body.
const MaxBodyBytes = 1 << 20

//go:embed openapi.json
var openAPI []byte

// Server serves a rebound.Service over HTTP. Set the fields, then call
// Handler once.
type Server struct {
	Service rebound.Service
	// Authenticate checks a bearer token and returns who holds it; it is
	// called for every route but /healthz and /api/v1/openapi.json. An
	// error with code EUNAUTHORIZED is answered 401 with its message. A
	// nil Authenticate refuses every request: there is no
	// unauthenticated mode. Handlers find the caller with
	// rebound.PrincipalFrom.
	Authenticate func(ctx context.Context, token string) (rebound.Principal, error)
	// Console, if set, serves every path outside /api/, /healthz and
	// /metrics (the web console). It authenticates on its own and calls
	// the API through ServeAs.
	Console http.Handler
	Logger  *slog.Logger
	// Metrics is served at /metrics, with authentication like every
	// read route (the series name machines and sites). Optional.
	Metrics http.Handler
	// Loop serves reprotect, failback and preflight. When nil those routes
	// answer 501 with code CodeNotImplemented.
	Loop rebound.LoopService
	// Power serves machine start, stop and console. When nil those routes
	// answer 501 like Loop's.
	Power rebound.PowerService
	// Plans serves recovery plans and the resume and retry of their jobs;
	// when nil those routes answer 501.
	Plans rebound.PlanService
	// Catalog serves site detail, policy deletion and the paged, filtered
	// point and event lists. When nil those answer 501 (points and events
	// without query parameters fall back to Service).
	Catalog rebound.CatalogService
	// Groups serves replication groups (list, show, remove a member) and
	// the group form of the lifecycle routes, /api/v1/groups/{name}/...;
	// when nil those routes answer 501.
	Groups rebound.GroupService
	// Healthy, if set, says why the server cannot do its work (its store
	// cannot be written); /healthz answers it with the error's status.
	Healthy func(ctx context.Context) error
	// Users serves users, API tokens and /whoami's details; when nil the
	// user and token routes answer 501.
	Users rebound.UserService
	// Audit, if set, records every mutating call (any method but GET and
	// HEAD), refused ones included, and serves GET /api/v1/audit (501
	// when nil).
	Audit rebound.AuditService

	// unauthAudit bounds the audit records of unauthenticated calls.
	unauthAudit lograte.Limiter
}

// CodeNotImplemented is the error code of a 501 answer: the server has no
// LoopService or no PowerService. It is not a rebound code; the CLI exits 1
// on it.
const CodeNotImplemented = "not_implemented"

// errNotImplemented is answered 501 by writeError. lacks says what the
// server does not serve, in parentheses after the verb.
type errNotImplemented struct{ what, lacks string }

func (e *errNotImplemented) Error() string {
	return e.what + " is not implemented by this server (" + e.lacks + ")"
}

// route is one API route. The table drives the mux, the role check and
// the test that checks the OpenAPI document covers every route.
type route struct {
	method, path string
	// role is the least role a caller needs (viewer, operator, admin), or
	// public: no authentication. A route without one is a bug (Handler
	// panics), so none is open by mistake.
	role   rebound.Role
	handle func(w http.ResponseWriter, r *http.Request) error
}

// The roles of the route table (docs/security.md, "Roles").
const (
	public   rebound.Role = "(public)"
	viewer                = rebound.RoleViewer
	operator              = rebound.RoleOperator
	admin                 = rebound.RoleAdmin
)

func (s *Server) routes() []route {
	return append(s.routes0(), s.groupRoutes()...)
}

// routes0 is every route but the groups'.
func (s *Server) routes0() []route {
	return append([]route{
		{"GET", "/healthz", public, s.healthz},
		{"GET", "/api/v1/openapi.json", public, s.openAPI},

		{"GET", "/api/v1/sites", viewer, s.listSites},
		{"POST", "/api/v1/sites/{name}/enroll-tokens", admin, s.createJoinToken},

		{"POST", "/api/v1/machines", operator, s.createMachine},
		{"GET", "/api/v1/machines", viewer, s.listMachines},
		{"GET", "/api/v1/machines/{name}", viewer, s.getMachine},
		{"DELETE", "/api/v1/machines/{name}", operator, s.deleteMachine},

		{"GET", "/api/v1/policies", viewer, s.listPolicies},
		{"PUT", "/api/v1/policies/{name}", admin, s.putPolicy},

		{"POST", "/api/v1/machines/{name}/protect", operator, s.protect},
		{"GET", "/api/v1/machines/{name}/points", viewer, s.listPoints},
		{"POST", "/api/v1/machines/{name}/points", operator, s.createPoint},
		{"POST", "/api/v1/machines/{name}/failover", operator, s.failover},
		{"POST", "/api/v1/machines/{name}/failover/change-point", operator, s.changePoint},
		{"POST", "/api/v1/machines/{name}/failover/cancel", operator, s.cancelFailover},
		{"POST", "/api/v1/machines/{name}/commit", operator, s.commit},
		{"POST", "/api/v1/machines/{name}/test-failover", operator, s.testFailover},
		{"POST", "/api/v1/machines/{name}/test-failover/cleanup", operator, s.testFailoverCleanup},
		{"POST", "/api/v1/machines/{name}/reprotect", operator, s.reprotect},
		{"POST", "/api/v1/machines/{name}/failback", operator, s.failback},
		{"POST", "/api/v1/machines/{name}/unprotect", operator, s.unprotect},
		{"GET", "/api/v1/machines/{name}/preflight", viewer, s.preflight},
		{"POST", "/api/v1/machines/{name}/start", operator, s.startMachine},
		{"POST", "/api/v1/machines/{name}/stop", operator, s.stopMachine},
		{"GET", "/api/v1/machines/{name}/console", viewer, s.console},
		{"PATCH", "/api/v1/machines/{name}", operator, s.setMachine},

		{"GET", "/api/v1/jobs", viewer, s.listJobs},
		{"GET", "/api/v1/jobs/{id}", viewer, s.getJob},
		{"POST", "/api/v1/jobs/{id}/cancel", operator, s.cancelJob},

		{"GET", "/api/v1/events", viewer, s.listEvents},

		{"GET", "/api/v1/sites/{name}", viewer, s.getSite},
		{"DELETE", "/api/v1/policies/{name}", admin, s.deletePolicy},
		{"DELETE", "/api/v1/sites/{name}", admin, s.removeSite},
	}, append(s.planRoutes(), s.userRoutes()...)...)
}

// Handler returns the HTTP handler: routing, authentication, request IDs,
// panic recovery and request logging.
func (s *Server) Handler() http.Handler {
	if s.Logger == nil {
		s.Logger = slog.New(slog.DiscardHandler)
	}
	s.unauthAudit.Burst = MaxUnauthenticatedAudit
	mux := http.NewServeMux()
	for _, rt := range s.routes() {
		h := s.wrap(rt)
		mux.Handle(rt.method+" "+rt.path, h)
	}
	if s.Metrics != nil {
		mux.Handle("GET /metrics", s.wrap(route{"GET", "/metrics", viewer, func(w http.ResponseWriter, r *http.Request) error {
			s.Metrics.ServeHTTP(w, r)
			return nil
		}}))
	}
	return s.logRequests(s.notFound(mux))
}

// wrap turns a route's error-returning handler into an http.Handler with
// authentication, the role check and the audit record in front of it.
func (s *Server) wrap(rt route) http.Handler {
	if rt.role != public && !rt.role.Valid() {
		panic("http: route " + rt.method + " " + rt.path + " has no role")
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var a *auditRecord
		if s.Audit != nil && r.Method != http.MethodGet && r.Method != http.MethodHead {
			a = &auditRecord{}
			r = r.WithContext(context.WithValue(r.Context(), auditKey{}, a))
			sw := &statusWriter{ResponseWriter: w}
			w = sw
			defer func() {
				if p := recover(); p != nil {
					a.code, a.msg, a.panicked = rebound.EINTERNAL, "internal error (request ID "+requestID(r.Context())+")", true
					s.recordAudit(r, rt, sw, a)
					panic(p)
				}
				s.recordAudit(r, rt, sw, a)
			}()
		}
		p, err := s.admit(rt, r)
		if a != nil {
			a.principal = p
		}
		if err == nil {
			if rt.role != public {
				r = r.WithContext(rebound.WithPrincipal(r.Context(), p))
			}
			err = rt.handle(w, r)
		}
		if err != nil {
			code, msg := s.writeError(w, r, err)
			if a != nil {
				a.code, a.msg = code, msg
			}
		}
	})
}

// admit returns who makes r, authenticating it unless ServeAs did, and
// checks the principal's role allows the route. A refused role returns
// the principal too, for the audit record.
func (s *Server) admit(rt route, r *http.Request) (rebound.Principal, error) {
	if rt.role == public {
		return rebound.Principal{}, nil
	}
	p, ok := rebound.PrincipalFrom(r.Context())
	if _, trusted := r.Context().Value(trustedKey{}).(bool); !trusted || !ok {
		var err error
		if p, err = s.authenticate(r); err != nil {
			return rebound.Principal{}, err
		}
	}
	if !p.Role.Allows(rt.role) {
		return p, forbidden(p, rt.method+" "+rt.path, rt.role)
	}
	return p, nil
}

// forbidden is the 403 of a principal whose role does not allow what.
func forbidden(p rebound.Principal, what string, need rebound.Role) error {
	return rebound.Errorf(rebound.EFORBIDDEN, "forbidden: user %q has role %s; %s needs role %s (an admin can grant it: rebound user set-role %s %s)",
		p.User, roleName(p.Role), what, need, p.User, need)
}

func roleName(r rebound.Role) string {
	if r == "" {
		return "(none)"
	}
	return string(r)
}

// trustedKey marks a request ServeAs authenticated already.
type trustedKey struct{}

// ServeAs returns h (the result of Handler) serving requests as p: the
// console authenticates its user with a session and calls the API this
// way, so roles, errors and the audit log are the API's own. The request
// never carries a bearer token.
func ServeAs(h http.Handler, p rebound.Principal) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx := context.WithValue(rebound.WithPrincipal(r.Context(), p), trustedKey{}, true)
		h.ServeHTTP(w, r.WithContext(ctx))
	})
}

func (s *Server) authenticate(r *http.Request) (rebound.Principal, error) {
	h := strings.TrimSpace(r.Header.Get("Authorization"))
	if h == "" || strings.EqualFold(h, "Bearer") {
		return rebound.Principal{}, rebound.Errorf(rebound.EUNAUTHORIZED, "missing bearer token")
	}
	scheme, tok, ok := strings.Cut(h, " ")
	tok = strings.TrimSpace(tok)
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return rebound.Principal{}, rebound.Errorf(rebound.EUNAUTHORIZED, `authorization header must be "Bearer <token>"`)
	}
	if tok == "" {
		return rebound.Principal{}, rebound.Errorf(rebound.EUNAUTHORIZED, "missing bearer token")
	}
	if s.Authenticate == nil {
		return rebound.Principal{}, rebound.Errorf(rebound.EUNAUTHORIZED, "authentication is not configured on this server")
	}
	return s.Authenticate(r.Context(), tok)
}

// notFound answers the mux's own 404 and 405 with the JSON error format.
func (s *Server) notFound(mux *http.ServeMux) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, pattern := mux.Handler(r); pattern != "" {
			mux.ServeHTTP(w, r)
			return
		}
		if s.Console != nil && !strings.HasPrefix(r.URL.Path, "/api/") {
			s.Console.ServeHTTP(w, r)
			return
		}
		// No pattern: the mux would answer 404, 405 (with Allow) or a
		// redirect. Let it decide the status, then replace the body.
		rec := &statusOnly{header: http.Header{}}
		mux.ServeHTTP(rec, r)
		switch rec.status {
		case http.StatusNotFound:
			s.writeError(w, r, rebound.Errorf(rebound.ENOTFOUND, "no route %s %s", r.Method, r.URL.Path))
		case http.StatusMethodNotAllowed:
			w.Header().Set("Allow", rec.header.Get("Allow"))
			writeJSON(w, http.StatusMethodNotAllowed, errorBody(rebound.EINVALID,
				fmt.Sprintf("method %s is not allowed on %s (allowed: %s)", r.Method, r.URL.Path, rec.header.Get("Allow"))))
		default:
			mux.ServeHTTP(w, r)
		}
	})
}

type statusOnly struct {
	header http.Header
	status int
}

func (s *statusOnly) Header() http.Header         { return s.header }
func (s *statusOnly) Write(b []byte) (int, error) { return len(b), nil }
func (s *statusOnly) WriteHeader(code int) {
	if s.status == 0 {
		s.status = code
	}
}

type ctxKey int

const requestIDKey ctxKey = 0

func requestID(ctx context.Context) string {
	id, _ := ctx.Value(requestIDKey).(string)
	return id
}

// logRequests assigns a request ID, recovers panics and logs one line per
// request. It never logs headers, so the bearer token stays out of logs.
func (s *Server) logRequests(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		var b [8]byte
		rand.Read(b[:])
		id := hex.EncodeToString(b[:])
		r = r.WithContext(context.WithValue(r.Context(), requestIDKey, id))
		w.Header().Set("X-Request-ID", id)
		sw := &statusWriter{ResponseWriter: w}
		defer func() {
			if p := recover(); p != nil {
				if p == http.ErrAbortHandler {
					panic(p)
				}
				s.Logger.Error("http handler panic", "requestID", id, "panic", fmt.Sprint(p))
				if sw.status == 0 {
					s.writeError(sw, r, fmt.Errorf("panic: %v", p))
				}
			}
			s.Logger.Info("http request", "method", r.Method, "path", r.URL.Path,
				"status", sw.statusCode(), "duration", time.Since(start), "requestID", id)
		}()
		next.ServeHTTP(sw, r)
	})
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

func (w *statusWriter) statusCode() int {
	if w.status == 0 {
		return http.StatusOK
	}
	return w.status
}

// Unwrap lets http.ResponseController reach the underlying writer.
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// Errors

// errorResponse is the body of every error answer.
type errorResponse struct {
	Error errorDetail `json:"error"`
}

type errorDetail struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

func errorBody(code, msg string) errorResponse {
	return errorResponse{Error: errorDetail{Code: code, Message: msg}}
}

// statusOf maps a rebound error code to an HTTP status.
func statusOf(code string) int {
	switch code {
	case rebound.EINVALID:
		return http.StatusBadRequest
	case rebound.EUNAUTHORIZED:
		return http.StatusUnauthorized
	case rebound.EFORBIDDEN:
		return http.StatusForbidden
	case rebound.ENOTFOUND:
		return http.StatusNotFound
	case rebound.ECONFLICT:
		return http.StatusConflict
	case rebound.EUNAVAILABLE:
		return http.StatusServiceUnavailable
	case rebound.ENOSPACE:
		return http.StatusInsufficientStorage
	}
	return http.StatusInternalServerError
}

// codeOf maps an HTTP status back to a rebound code, for answers that carry
// no error body (a proxy's, say).
func codeOf(status int) string {
	switch {
	case status == http.StatusUnauthorized:
		return rebound.EUNAUTHORIZED
	case status == http.StatusForbidden:
		return rebound.EFORBIDDEN
	case status == http.StatusNotFound:
		return rebound.ENOTFOUND
	case status == http.StatusConflict:
		return rebound.ECONFLICT
	case status == http.StatusBadGateway || status == http.StatusServiceUnavailable || status == http.StatusGatewayTimeout:
		return rebound.EUNAVAILABLE
	case status >= 400 && status < 500:
		return rebound.EINVALID
	}
	return rebound.EINTERNAL
}

// writeError answers err. Internal errors are logged with the request ID
// and answered without their text, which may hold paths or SQL.
func (s *Server) writeError(w http.ResponseWriter, r *http.Request, err error) (code, msg string) {
	code = rebound.ErrorCode(err)
	msg = rebound.ErrorMessage(err)
	status := statusOf(code)
	var tooBig *http.MaxBytesError
	var notImpl *errNotImplemented
	if errors.As(err, &tooBig) {
		code, status = rebound.EINVALID, http.StatusRequestEntityTooLarge
		msg = fmt.Sprintf("request body is larger than %d bytes", tooBig.Limit)
	} else if errors.As(err, &notImpl) {
		code, status, msg = CodeNotImplemented, http.StatusNotImplemented, notImpl.Error()
	}
	if status == http.StatusInternalServerError {
		id := requestID(r.Context())
		s.Logger.Error("internal error", "method", r.Method, "path", r.URL.Path, "requestID", id, "err", err)
		code, msg = rebound.EINTERNAL, "internal error (request ID "+id+")"
	}
	writeJSON(w, status, errorBody(code, msg))
	return code, msg
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false) // messages quote "<token>"; this is not HTML
	if err := enc.Encode(v); err != nil {
		status = http.StatusInternalServerError
		buf.Reset()
		enc.Encode(errorBody(rebound.EINTERNAL, "internal error: cannot encode response"))
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	w.Write(buf.Bytes())
}

// decode reads a JSON request body into v strictly: JSON content type (if
// any is given), at most MaxBodyBytes, one value, no unknown fields, no key
// twice in an object and no key in another case than its field's (see
// checkKeys). An empty body leaves v as it is when optional, else is an
// error.
func decode(w http.ResponseWriter, r *http.Request, v any, optional bool) error {
	if ct := r.Header.Get("Content-Type"); ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		if err != nil || mt != "application/json" {
			return rebound.Errorf(rebound.EINVALID, "Content-Type must be application/json, not %q", ct)
		}
	}
	data, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxBodyBytes))
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err == io.EOF {
		if optional {
			return nil
		}
		return rebound.Errorf(rebound.EINVALID, "request body is empty; a JSON object is required")
	} else if err != nil {
		return decodeError(err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return rebound.Errorf(rebound.EINVALID, "request body must hold a single JSON value")
	}
	if err := checkKeys(data, v); err != nil {
		return decodeError(err)
	}
	return nil
}

func decodeError(err error) error {
	var syntax *json.SyntaxError
	var typ *json.UnmarshalTypeError
	var tooBig *http.MaxBytesError
	var rerr *rebound.Error
	switch {
	case errors.As(err, &tooBig):
		return err
	case errors.As(err, &rerr):
		return rebound.Errorf(rebound.EINVALID, "invalid request body: %s", rerr.Message)
	case errors.As(err, &syntax):
		return rebound.Errorf(rebound.EINVALID, "invalid JSON at byte %d: %s", syntax.Offset, strings.TrimPrefix(syntax.Error(), "json: "))
	case errors.As(err, &typ):
		if typ.Field != "" {
			return rebound.Errorf(rebound.EINVALID, "invalid request body: field %q must be %s, not %s", typ.Field, typ.Type, typ.Value)
		}
		return rebound.Errorf(rebound.EINVALID, "invalid request body: must be %s, not %s", typ.Type, typ.Value)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return rebound.Errorf(rebound.EINVALID, "invalid JSON: body ends early")
	}
	return rebound.Errorf(rebound.EINVALID, "invalid request body: %s", strings.TrimPrefix(err.Error(), "json: "))
}
