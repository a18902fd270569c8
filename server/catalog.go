package server

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/rebound-dr/rebound"
)

var _ rebound.CatalogService = (*Server)(nil)

// GetSite returns a site with its health and the machines it holds.
func (s *Server) GetSite(ctx context.Context, name string) (*rebound.SiteDetail, error) {
	st, err := s.getSite(ctx, name)
	if err != nil {
		if rebound.ErrorCode(err) == rebound.ENOTFOUND {
			if d := s.unreportedSite(ctx, name); d != nil {
				return d, nil
			}
			return nil, rebound.Errorf(rebound.ENOTFOUND, "site %q not found: `rebound site list` shows the enrolled sites", name)
		}
		return nil, err
	}
	d := &rebound.SiteDetail{Site: *st, Health: rebound.HealthNormal, Machines: []rebound.SiteMachineRole{}}
	if s.siteOffline(ctx, name) {
		d.Status = rebound.SiteOffline
		d.Health = rebound.HealthCritical
		d.HealthReason = "no report since " + fmtAgo(st.LastSeen)
		if st.LastSeen.IsZero() {
			d.HealthReason = "it has never reported"
		}
	}
	ms, err := s.listMachines(ctx)
	if err != nil {
		return nil, err
	}
	for _, m := range ms {
		if roles := siteRoles(&m, name); len(roles) > 0 {
			d.Machines = append(d.Machines, rebound.SiteMachineRole{Name: m.Name, Role: strings.Join(roles, ","), State: m.State, Health: m.Health})
		}
	}
	return d, nil
}

func fmtAgo(t time.Time) string {
	return fmt.Sprintf("%s (%s ago)", t.Format(time.RFC3339), time.Since(t).Round(time.Second))
}

// siteRoles says what a machine is at a site (rebound.SiteMachineRole).
func siteRoles(m *rebound.Machine, site string) []string {
	var roles []string
	p, f := m.Protection, m.Failover
	switch {
	case f != nil && f.ToSite == site:
		roles = append(roles, "failed-over")
	case p != nil && p.SourceSite == site:
		roles = append(roles, "source")
	case m.ActiveSite == site:
		roles = append(roles, "active")
	}
	if p != nil && p.TargetSite == site && (f == nil || f.ToSite != site) {
		roles = append(roles, "target")
	}
	if t := m.TestFailover; t != nil && t.Site == site {
		roles = append(roles, "test-failover")
	}
	if m.HomeSite == site && m.ActiveSite != site {
		roles = append(roles, "home")
	}
	return roles
}

// DeletePolicy deletes a policy no machine uses.
func (s *Server) DeletePolicy(ctx context.Context, name string) error {
	if name == "default" {
		return rebound.Errorf(rebound.EINVALID, "the default policy cannot be deleted; change it with `rebound policy set default`")
	}
	if _, err := s.DB.GetPolicy(ctx, name); err != nil {
		return err
	}
	users, err := s.policyUsers(ctx, name)
	if err != nil {
		return err
	}
	if len(users) > 0 {
		return rebound.Errorf(rebound.ECONFLICT, "policy %q is used by %s %s: move them to another policy first (rebound protect %s --to %s --policy default)",
			name, plural(len(users), "machine", "machines"), strings.Join(names(users), ", "), users[0].Name, users[0].Protection.TargetSite)
	}
	if err := s.DB.DeletePolicy(ctx, name); err != nil {
		return err
	}
	s.event("", "", "policy.deleted", "policy "+name+" deleted")
	return nil
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

func names(ms []rebound.Machine) []string {
	out := make([]string, len(ms))
	for i := range ms {
		out[i] = ms[i].Name
	}
	return out
}

// policyUsers returns the machines whose protection uses the policy.
func (s *Server) policyUsers(ctx context.Context, name string) ([]rebound.Machine, error) {
	ms, err := s.DB.ListMachines(ctx)
	if err != nil {
		return nil, err
	}
	var out []rebound.Machine
	for _, m := range ms {
		if m.Protection != nil && m.Protection.Policy == name {
			out = append(out, m)
		}
	}
	return out, nil
}

// pushPolicy sends a machine's policy to the sites of its stream. A site
// that is not connected gets it when it reconnects (syncPolicies); the
// names of those are returned.
func (s *Server) pushPolicy(ctx context.Context, m *rebound.Machine, p rebound.Policy) (pending []string) {
	if m.Protection == nil {
		return nil
	}
	for _, name := range []string{m.Protection.SourceSite, m.Protection.TargetSite} {
		site, err := s.site(name)
		if err == nil {
			err = site.SetPolicy(ctx, m.Name, p)
		}
		if err != nil && rebound.ErrorCode(err) != rebound.ENOTFOUND {
			s.Logger.Warn("push policy", "machine", m.Name, "site", name, "policy", p.Name, "err", err)
			pending = append(pending, name)
		}
	}
	return pending
}

// applyPolicy pushes a changed policy to every machine that uses it.
func (s *Server) applyPolicy(ctx context.Context, p rebound.Policy) {
	users, err := s.policyUsers(ctx, p.Name)
	if err != nil {
		s.Logger.Warn("apply policy", "policy", p.Name, "err", err)
		return
	}
	for i := range users {
		msg := fmt.Sprintf("policy %s applied: crash points every %s, retention %s", p.Name, p.CrashInterval, p.Retention)
		if pending := s.pushPolicy(ctx, &users[i], p); len(pending) > 0 {
			msg += "; " + strings.Join(pending, ", ") + " gets it when it reconnects"
		}
		s.event(users[i].Name, "", "policy.applied", msg)
	}
}

// changePolicy moves a protected machine to another policy: the record
// first (so a reconnecting site syncs to it), then the sites.
func (s *Server) changePolicy(ctx context.Context, m *rebound.Machine, p *rebound.Policy) (*rebound.Job, error) {
	from := m.Protection.Policy
	if err := s.updateMachine(ctx, m.Name, func(m *rebound.Machine) {
		if m.Protection != nil {
			m.Protection.Policy = p.Name
		}
	}); err != nil {
		return nil, err
	}
	m.Protection.Policy = p.Name
	msg := fmt.Sprintf("machine %s now uses policy %s (was %s): crash points every %s, retention %s", m.Name, p.Name, from, p.CrashInterval, p.Retention)
	if pending := s.pushPolicy(ctx, m, *p); len(pending) > 0 {
		msg += "; site " + strings.Join(pending, ", ") + " gets it when it reconnects"
	}
	s.event(m.Name, "", "policy.changed", msg)
	if m.State == rebound.MachineSyncing {
		return s.resumeProtect(ctx, m) // the initial copy goes on under the new policy
	}
	return s.doneJob(ctx, "protect", m.Name, msg)
}

// syncPolicies sends a reconnecting site the current policy of every
// machine it replicates, which it may have missed while away.
func (s *Server) syncPolicies(ctx context.Context, name string, site rebound.SiteService) {
	ms, err := s.DB.ListMachines(ctx)
	if err != nil {
		return
	}
	for _, m := range ms {
		p := m.Protection
		if p == nil || (p.SourceSite != name && p.TargetSite != name) {
			continue
		}
		pol, err := s.DB.GetPolicy(ctx, p.Policy)
		if err != nil {
			continue
		}
		if err := site.SetPolicy(ctx, m.Name, *pol); err != nil && rebound.ErrorCode(err) != rebound.ENOTFOUND {
			s.Logger.Warn("sync policy after reconnect", "site", name, "machine", m.Name, "err", err)
		}
	}
}

// pageLimit checks a query's limit and returns the page size.
func pageLimit(n int) (int, error) {
	switch {
	case n < 0 || n > rebound.MaxPageSize:
		return 0, rebound.Errorf(rebound.EINVALID, "limit must be from 1 to %d, not %d", rebound.MaxPageSize, n)
	case n == 0:
		return rebound.DefaultPageSize, nil
	}
	return n, nil
}

// QueryPoints returns a page of the points the target holds. The cursor
// is the sequence of the last point of the previous page.
func (s *Server) QueryPoints(ctx context.Context, name string, q rebound.ListQuery) (*rebound.PointPage, error) {
	limit, err := pageLimit(q.Limit)
	if err != nil {
		return nil, err
	}
	var after uint64
	if q.Cursor != "" {
		if after, err = strconv.ParseUint(q.Cursor, 10, 64); err != nil {
			return nil, rebound.Errorf(rebound.EINVALID, "cursor %q is not one this server gave: start again without it", q.Cursor)
		}
	}
	if q.Kind != "" && q.Kind != string(rebound.PointCrash) && q.Kind != string(rebound.PointApp) {
		return nil, rebound.Errorf(rebound.EINVALID, "point kind must be crash or app, not %q", q.Kind)
	}
	dst, err := s.pointsSite(ctx, name)
	if err != nil {
		return nil, err
	}
	// The site pages its journal. A site from before the query sends
	// every point (wire.md): the answer is paged here again, which
	// leaves a site's page as it is.
	pq := rebound.PointQuery{After: after, Limit: limit, Kind: rebound.PointKind(q.Kind), Since: q.Since, Until: q.Until}
	pl, err := dst.QueryPoints(ctx, name, pq)
	if err != nil {
		return nil, err
	}
	// The journal lists by sequence; a cursor continues after one.
	start := sort.Search(len(pl.Points), func(i int) bool { return pl.Points[i].Seq > after })
	page := &rebound.PointPage{Points: []rebound.RecoveryPoint{}}
	for _, p := range pl.Points[start:] {
		if !pq.Match(p) {
			continue
		}
		if len(page.Points) == limit {
			page.Next = strconv.FormatUint(page.Points[limit-1].Seq, 10)
			return page, nil
		}
		page.Points = append(page.Points, p)
	}
	// A site's page says whether more follow.
	if n := len(page.Points); pl.Next != 0 && n > 0 {
		page.Next = strconv.FormatUint(page.Points[n-1].Seq, 10)
	}
	return page, nil
}

// QueryEvents returns a page of events.
func (s *Server) QueryEvents(ctx context.Context, q rebound.ListQuery) (*rebound.EventPage, error) {
	limit, err := pageLimit(q.Limit)
	if err != nil {
		return nil, err
	}
	q.Limit = limit
	return s.DB.QueryEvents(ctx, q)
}
