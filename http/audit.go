package http

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/rebound-dr/rebound"
)

// The audit log: wrap records every mutating call through the Server's
// AuditService once it has been answered. Bodies are never recorded, so
// the passwords and token secrets of user and token calls stay out.

// auditKey holds the request's *auditRecord in its context.
type auditKey struct{}

// auditRecord is what wrap learns about a call while serving it.
type auditRecord struct {
	principal rebound.Principal
	code, msg string // the error answered, if any
	target    string // set by a handler whose target is not in the path
	panicked  bool
}

// auditTarget names the object a call acted on when the path does not
// (a create names it in its body), for the audit record.
func auditTarget(r *http.Request, target string) {
	if a, ok := r.Context().Value(auditKey{}).(*auditRecord); ok {
		a.target = target
	}
}

// MaxUnauthenticatedAudit is how many unauthenticated calls a minute the
// audit log records; the rest are counted in the next record, so a flood of
// bad tokens cannot fill the server's disk.
const MaxUnauthenticatedAudit = 60

func (s *Server) recordAudit(r *http.Request, rt route, sw *statusWriter, a *auditRecord) {
	status := sw.statusCode()
	if a.panicked && sw.status == 0 {
		status = http.StatusInternalServerError
	}
	target := a.target
	if target == "" {
		var parts []string
		for _, k := range []string{"name", "id", "machine"} {
			if v := r.PathValue(k); v != "" {
				parts = append(parts, v)
			}
		}
		target = strings.Join(parts, "/")
	}
	e := rebound.AuditEntry{
		Time: time.Now().UTC(), User: a.principal.User, Role: a.principal.Role, Via: a.principal.Via,
		Remote: r.RemoteAddr, Action: rt.method + " " + rt.path, Target: target, Status: status,
		RequestID: requestID(r.Context()),
	}
	if a.code != "" {
		e.Error = a.msg
		if !strings.HasPrefix(a.msg, a.code+":") {
			e.Error = a.code + ": " + a.msg
		}
	}
	if status == http.StatusUnauthorized && e.User == "" {
		ok, dropped := s.unauthAudit.Allow()
		if !ok {
			return
		}
		if dropped > 0 {
			e.Error += fmt.Sprintf(" (and %d unauthenticated calls before it not recorded)", dropped)
		}
	}
	// The client may be gone; the record is still due.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), 10*time.Second)
	defer cancel()
	if err := s.Audit.RecordAudit(ctx, e); err != nil {
		s.Logger.Error("audit record lost", "action", e.Action, "target", e.Target, "user", e.User,
			"status", e.Status, "requestID", e.RequestID, "err", err)
	}
}

// listAudit serves GET /api/v1/audit?since=RFC3339&user=&limit=.
func (s *Server) listAudit(w http.ResponseWriter, r *http.Request) error {
	if s.Audit == nil {
		return &errNotImplemented{"audit", "it keeps no audit log"}
	}
	q := r.URL.Query()
	for k := range q {
		if k != "since" && k != "user" && k != "limit" {
			return rebound.Errorf(rebound.EINVALID, "unknown query parameter %q: use since, user or limit", k)
		}
	}
	var f rebound.AuditFilter
	if v := q.Get("since"); v != "" {
		t, err := time.Parse(time.RFC3339Nano, v)
		if err != nil {
			return rebound.Errorf(rebound.EINVALID, "since must be an RFC 3339 time (2026-11-30T04:00:00Z), not %q", v)
		}
		f.Since = t
	}
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > rebound.MaxPageSize {
			return rebound.Errorf(rebound.EINVALID, "limit must be 1..%d, not %q", rebound.MaxPageSize, v)
		}
		f.Limit = n
	}
	f.User = q.Get("user")
	v, err := s.Audit.ListAudit(r.Context(), f)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, nonNil(v))
	return nil
}
