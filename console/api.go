package console

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"github.com/rebound-dr/rebound"
)

// caller calls the REST API in-process as one user.
type caller struct {
	h      http.Handler
	ctx    context.Context
	remote string
}

// apiError is an error answer of the API (or of the console itself), with
// the status the console answers in turn.
type apiError struct {
	Status  int
	Code    string
	Message string
}

func (e *apiError) Error() string { return e.Message }

// recorder is a minimal in-memory http.ResponseWriter.
type recorder struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func (r *recorder) Header() http.Header { return r.header }
func (r *recorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	return r.body.Write(b)
}
func (r *recorder) WriteHeader(code int) {
	if r.status == 0 {
		r.status = code
	}
}

// do sends method path (with body as JSON when not nil) and decodes the
// answer into out (when not nil). An error answer is an *apiError with the
// API's status, code and message.
func (a *caller) do(method, path string, body, out any) error {
	var rd *bytes.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	} else {
		rd = bytes.NewReader(nil)
	}
	req, err := http.NewRequestWithContext(a.ctx, method, path, rd)
	if err != nil {
		return err
	}
	req.RemoteAddr = a.remote
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	rec := &recorder{header: http.Header{}}
	a.h.ServeHTTP(rec, req)
	if rec.status == 0 {
		rec.status = http.StatusOK
	}
	if rec.status >= 400 {
		var e struct {
			Error struct{ Code, Message string } `json:"error"`
		}
		if json.Unmarshal(rec.body.Bytes(), &e) != nil || e.Error.Message == "" {
			return &apiError{Status: rec.status, Code: rebound.EINTERNAL, Message: fmt.Sprintf("%s %s: HTTP %d", method, path, rec.status)}
		}
		return &apiError{Status: rec.status, Code: e.Error.Code, Message: e.Error.Message}
	}
	if out == nil {
		return nil
	}
	if p, ok := out.(*[]byte); ok {
		*p = rec.body.Bytes()
		return nil
	}
	if err := json.Unmarshal(rec.body.Bytes(), out); err != nil {
		return fmt.Errorf("decode %s %s: %w", method, path, err)
	}
	return nil
}

func (a *caller) get(path string, out any) error { return a.do("GET", path, nil, out) }

// p joins path-escaped segments onto /api/v1. A verb's path (a constant,
// such as "failover/cancel") is appended to it as it is.
func p(segs ...string) string {
	var b strings.Builder
	b.WriteString("/api/v1")
	for _, s := range segs {
		b.WriteByte('/')
		b.WriteString(url.PathEscape(s))
	}
	return b.String()
}

func urlQueryEscape(s string) string { return url.QueryEscape(s) }
