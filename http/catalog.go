package http

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"github.com/rebound-dr/rebound"
)

// NextCursorHeader carries the cursor of the next page of a paged list
// (points, events); it is absent on the last page. The body stays a JSON
// array, so clients that do not page read what they always read.
const NextCursorHeader = "X-Next-Cursor"

func (s *Server) catalog(what string) (rebound.CatalogService, error) {
	if s.Catalog == nil {
		return nil, &errNotImplemented{what, "it serves no site detail, policy deletion or paged lists"}
	}
	return s.Catalog, nil
}

func (s *Server) getSite(w http.ResponseWriter, r *http.Request) error {
	c, err := s.catalog("site show")
	if err != nil {
		return err
	}
	d, err := c.GetSite(r.Context(), r.PathValue("name"))
	if err != nil {
		return err
	}
	if d.Machines == nil {
		d.Machines = []rebound.SiteMachineRole{}
	}
	writeJSON(w, http.StatusOK, d)
	return nil
}

func (s *Server) deletePolicy(w http.ResponseWriter, r *http.Request) error {
	c, err := s.catalog("policy delete")
	if err != nil {
		return err
	}
	if err := c.DeletePolicy(r.Context(), r.PathValue("name")); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// listQueryParams are the query parameters of the paged lists.
var listQueryParams = []string{"since", "until", "kind", "limit", "cursor"}

// listQuery reads since, until (RFC 3339), kind, limit and cursor.
func listQuery(r *http.Request) (rebound.ListQuery, bool, error) {
	v := r.URL.Query()
	var q rebound.ListQuery
	given := false
	for _, k := range listQueryParams {
		given = given || v.Has(k)
	}
	for _, t := range []struct {
		name string
		dst  *time.Time
	}{{"since", &q.Since}, {"until", &q.Until}} {
		if s := v.Get(t.name); s != "" {
			tm, err := time.Parse(time.RFC3339Nano, s)
			if err != nil {
				return q, given, rebound.Errorf(rebound.EINVALID, "%s must be an RFC 3339 time like 2026-11-27T14:03:05Z, not %q", t.name, s)
			}
			*t.dst = tm
		}
	}
	if !q.Since.IsZero() && !q.Until.IsZero() && !q.Until.After(q.Since) {
		return q, given, rebound.Errorf(rebound.EINVALID, "until (%s) must be after since (%s)", q.Until.Format(time.RFC3339), q.Since.Format(time.RFC3339))
	}
	if s := v.Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > rebound.MaxPageSize {
			return q, given, rebound.Errorf(rebound.EINVALID, "limit must be a number from 1 to %d, not %q", rebound.MaxPageSize, s)
		}
		q.Limit = n
	}
	q.Kind, q.Cursor, q.Machine = v.Get("kind"), v.Get("cursor"), v.Get("machine")
	return q, given, nil
}

// writePage answers one page: the items and, when more follow, the next
// cursor in NextCursorHeader and a Link to the next page.
func writePage[T any](w http.ResponseWriter, r *http.Request, items []T, next string) {
	if next != "" {
		w.Header().Set(NextCursorHeader, next)
		u := *r.URL
		q := u.Query()
		q.Set("cursor", next)
		u.RawQuery = q.Encode()
		w.Header().Set("Link", "<"+u.RequestURI()+`>; rel="next"`)
	}
	writeJSON(w, http.StatusOK, nonNil(items))
}

func (s *Server) listPoints(w http.ResponseWriter, r *http.Request) error {
	q, given, err := listQuery(r)
	if err != nil {
		return err
	}
	if s.Catalog == nil && !given {
		v, err := s.Service.ListPoints(r.Context(), r.PathValue("name"))
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, nonNil(v))
		return nil
	}
	c, err := s.catalog("paged points")
	if err != nil {
		return err
	}
	p, err := c.QueryPoints(r.Context(), r.PathValue("name"), q)
	if err != nil {
		return err
	}
	writePage(w, r, p.Points, p.Next)
	return nil
}

func (s *Server) listEvents(w http.ResponseWriter, r *http.Request) error {
	q, given, err := listQuery(r)
	if err != nil {
		return err
	}
	if s.Catalog == nil && !given {
		v, err := s.Service.ListEvents(r.Context(), q.Machine)
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, nonNil(v))
		return nil
	}
	c, err := s.catalog("paged events")
	if err != nil {
		return err
	}
	p, err := c.QueryEvents(r.Context(), q)
	if err != nil {
		return err
	}
	writePage(w, r, p.Events, p.Next)
	return nil
}

// Client side.

var _ rebound.CatalogService = (*Client)(nil)

func (c *Client) GetSite(ctx context.Context, name string) (*rebound.SiteDetail, error) {
	var v rebound.SiteDetail
	if err := c.do(ctx, "GET", "/api/v1/sites/"+seg(name), nil, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

func (c *Client) DeletePolicy(ctx context.Context, name string) error {
	return c.do(ctx, "DELETE", "/api/v1/policies/"+seg(name), nil, nil)
}

// queryString encodes a ListQuery's set fields.
func queryString(q rebound.ListQuery) string {
	v := url.Values{}
	if !q.Since.IsZero() {
		v.Set("since", q.Since.UTC().Format(time.RFC3339Nano))
	}
	if !q.Until.IsZero() {
		v.Set("until", q.Until.UTC().Format(time.RFC3339Nano))
	}
	for k, s := range map[string]string{"kind": q.Kind, "machine": q.Machine, "cursor": q.Cursor} {
		if s != "" {
			v.Set(k, s)
		}
	}
	if q.Limit > 0 {
		v.Set("limit", strconv.Itoa(q.Limit))
	}
	if len(v) == 0 {
		return ""
	}
	return "?" + v.Encode()
}

func (c *Client) QueryPoints(ctx context.Context, machine string, q rebound.ListQuery) (*rebound.PointPage, error) {
	p := &rebound.PointPage{}
	next, err := c.page(ctx, "/api/v1/machines/"+seg(machine)+"/points"+queryString(q), &p.Points)
	p.Next = next
	if err != nil {
		return nil, err
	}
	return p, nil
}

func (c *Client) QueryEvents(ctx context.Context, q rebound.ListQuery) (*rebound.EventPage, error) {
	p := &rebound.EventPage{}
	next, err := c.page(ctx, "/api/v1/events"+queryString(q), &p.Events)
	p.Next = next
	if err != nil {
		return nil, err
	}
	return p, nil
}

// ListPoints returns every point, following the pages.
func (c *Client) ListPoints(ctx context.Context, machine string) ([]rebound.RecoveryPoint, error) {
	var all []rebound.RecoveryPoint
	q := rebound.ListQuery{Limit: rebound.MaxPageSize}
	for {
		p, err := c.QueryPoints(ctx, machine, q)
		if err != nil {
			return nil, err
		}
		all = append(all, p.Points...)
		if p.Next == "" {
			return all, nil
		}
		q.Cursor = p.Next
	}
}

// ListEvents returns the newest page of events.
func (c *Client) ListEvents(ctx context.Context, machine string) ([]rebound.Event, error) {
	p, err := c.QueryEvents(ctx, rebound.ListQuery{Machine: machine})
	if err != nil {
		return nil, err
	}
	return p.Events, nil
}

// page GETs one page of a list into out and returns the next cursor.
func (c *Client) page(ctx context.Context, path string, out any) (string, error) {
	b, h, err := c.exchange(ctx, "GET", path, nil, "application/json")
	if err != nil {
		return "", err
	}
	if err := json.Unmarshal(b, out); err != nil {
		return "", rebound.Errorf(rebound.EINTERNAL, "cannot decode the answer to GET %s: %v", path, err)
	}
	return h.Get(NextCursorHeader), nil
}

// policyBody is a PUT policy body: an omitted duration takes the default
// policy's value, an explicit zero one is refused rather than replaced.
type policyBody struct {
	Name          string            `json:"name"`
	RPOThreshold  *rebound.Duration `json:"rpoThreshold"`
	Retention     *rebound.Duration `json:"retention"`
	CrashInterval *rebound.Duration `json:"crashInterval"`
	AppInterval   *rebound.Duration `json:"appInterval"`
	Congestion    string            `json:"congestion,omitempty"` // "" takes the default (track)
}

func (b policyBody) policy() (rebound.Policy, error) {
	p := rebound.Policy{Name: b.Name, Congestion: b.Congestion}
	def := rebound.DefaultPolicy()
	for _, f := range []struct {
		name     string
		v        *rebound.Duration
		dst      *rebound.Duration
		def      rebound.Duration
		zeroNone bool // 0 means "never", a valid value
	}{
		{"rpoThreshold", b.RPOThreshold, &p.RPOThreshold, def.RPOThreshold, false},
		{"retention", b.Retention, &p.Retention, def.Retention, false},
		{"crashInterval", b.CrashInterval, &p.CrashInterval, def.CrashInterval, false},
		{"appInterval", b.AppInterval, &p.AppInterval, def.AppInterval, true},
	} {
		if f.v == nil {
			continue
		}
		if *f.v == 0 && !f.zeroNone {
			return p, rebound.Errorf(rebound.EINVALID, "%s must not be 0: give a positive duration, or omit it for the default %s", f.name, f.def)
		}
		*f.dst = *f.v
	}
	return p, nil
}

// bodyOfPolicy is the PUT body of a Policy: its zero durations are left
// out, so the server applies the defaults as Service.PutPolicy does.
func bodyOfPolicy(p rebound.Policy) policyBody {
	b := policyBody{Name: p.Name, Congestion: p.Congestion}
	for _, f := range []struct {
		v   rebound.Duration
		dst **rebound.Duration
	}{{p.RPOThreshold, &b.RPOThreshold}, {p.Retention, &b.Retention}, {p.CrashInterval, &b.CrashInterval}, {p.AppInterval, &b.AppInterval}} {
		if f.v != 0 {
			v := f.v
			*f.dst = &v
		}
	}
	return b
}
