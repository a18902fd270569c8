package rebound

import (
	"context"
	"time"
)

// ListQuery filters and pages a list of recovery points or events. Zero
// fields do not filter.
type ListQuery struct {
	// Since and Until bound the items' times: Since <= time < Until.
	Since time.Time `json:"since,omitempty"`
	Until time.Time `json:"until,omitempty"`
	// Kind: a point's kind ("crash", "app"), or an event's kind or its
	// dotted prefix ("job" matches "job.protect").
	Kind string `json:"kind,omitempty"`
	// Machine: only events of this machine (points are always one machine's).
	Machine string `json:"machine,omitempty"`
	// Limit: at most this many items; 0 is the server's page size.
	Limit int `json:"limit,omitempty"`
	// Cursor continues after the previous page: its Next.
	Cursor string `json:"cursor,omitempty"`
}

// Page sizes of the point and event lists: what a page holds without a
// limit, and the most a limit may ask for.
const (
	DefaultPageSize = 1000
	MaxPageSize     = 10000
)

// PointPage is one page of a machine's recovery points, oldest first. Next
// is empty on the last page, else the cursor of the following one.
type PointPage struct {
	Points []RecoveryPoint `json:"points"`
	Next   string          `json:"next,omitempty"`
}

// EventPage is one page of events, newest first.
type EventPage struct {
	Events []Event `json:"events"`
	Next   string  `json:"next,omitempty"`
}

// SiteDetail is a site with its health and what it holds.
type SiteDetail struct {
	Site
	// Health: normal while the site reports, critical once it is offline.
	Health       string `json:"health"`
	HealthReason string `json:"healthReason,omitempty"`
	// Machines the site holds, with their roles there.
	Machines []SiteMachineRole `json:"machines"`
}

// SiteMachineRole is one machine at a site: Role is "active" (served,
// not replicated), "source", "target", "failed-over" (active here after a
// failover), "test-failover" or "home" (created here, active elsewhere);
// a machine can have several, comma-separated.
type SiteMachineRole struct {
	Name   string `json:"name"`
	Role   string `json:"role"`
	State  string `json:"state"`
	Health string `json:"health"`
}

// CatalogService holds the inventory verbs that came after Service: site
// detail, policy deletion and the paged, filtered lists. The server and
// http.Client implement it next to Service.
type CatalogService interface {
	GetSite(ctx context.Context, name string) (*SiteDetail, error)
	// DeletePolicy deletes a policy no machine uses; "default" cannot be
	// deleted.
	DeletePolicy(ctx context.Context, name string) error
	// QueryPoints returns a page of the recovery points the machine's
	// target holds, oldest first.
	QueryPoints(ctx context.Context, machine string, q ListQuery) (*PointPage, error)
	// QueryEvents returns a page of events, newest first.
	QueryEvents(ctx context.Context, q ListQuery) (*EventPage, error)
}

// ValidatePolicy checks a policy's values: the crash interval at least a
// second, a positive RPO threshold, retention no shorter than the crash
// interval, an app interval of 0 (never) or at least a second, a known
// congestion policy.
func ValidatePolicy(p Policy) error {
	const sec = Duration(time.Second)
	switch {
	case p.CrashInterval < sec:
		return Errorf(EINVALID, "policy %s: crashInterval (--crash-interval) must be at least 1s, not %s", p.Name, p.CrashInterval)
	case p.RPOThreshold <= 0:
		return Errorf(EINVALID, "policy %s: rpoThreshold (--rpo) must be positive, not %s", p.Name, p.RPOThreshold)
	case p.Retention < p.CrashInterval:
		return Errorf(EINVALID, "policy %s: retention (--retention) %s is shorter than the crash interval %s: no point would be kept", p.Name, p.Retention, p.CrashInterval)
	case p.AppInterval < 0 || p.AppInterval > 0 && p.AppInterval < sec:
		return Errorf(EINVALID, "policy %s: appInterval (--app-interval) must be 0 (never) or at least 1s, not %s", p.Name, p.AppInterval)
	case p.Congestion != "" && p.Congestion != CongestionTrack && p.Congestion != CongestionThrottle:
		return Errorf(EINVALID, "policy %s: congestion (--congestion) must be %s or %s, not %q", p.Name, CongestionThrottle, CongestionTrack, p.Congestion)
	}
	return nil
}
