package console

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"html/template"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/rebound-dr/rebound"
)

// view is what every page template gets.
type view struct {
	Title string
	Nav   string
	S     *session // nil on the login page
	Msg   string   // a notice (?msg=)
	Back  string   // the page an error came from (same site only)
	Err   *apiError
	Now   time.Time
	D     any
}

func (c *Console) render(w http.ResponseWriter, status int, page string, v view) {
	t := c.pages[page]
	var buf bytes.Buffer
	if err := t.ExecuteTemplate(&buf, "layout", v); err != nil {
		c.Logger.Error("console template", "page", page, "err", err)
		http.Error(w, "internal error rendering "+page, http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	w.Write(buf.Bytes())
}

// fail renders err as an error page with its status: the API's answer
// (403 for a role that may not act, 409 for a verb the state refuses).
func (c *Console) fail(w http.ResponseWriter, r *http.Request, s *session, err error) {
	var ae *apiError
	if !errors.As(err, &ae) {
		c.Logger.Error("console", "path", r.URL.Path, "err", err)
		ae = &apiError{Status: http.StatusInternalServerError, Code: rebound.EINTERNAL, Message: "internal error: see the server's log"}
	}
	c.render(w, ae.Status, "error", view{Title: http.StatusText(ae.Status), S: s, Err: ae, Now: c.Now(), Back: backOf(r)})
}

func (c *Console) page(w http.ResponseWriter, r *http.Request, s *session, page, title, nav string, d any) {
	c.render(w, http.StatusOK, page, view{Title: title, Nav: nav, S: s, Msg: r.URL.Query().Get("msg"), Now: c.Now(), D: d})
}

// Login

func (c *Console) loginPage(w http.ResponseWriter, r *http.Request) {
	c.loginForm(w, r, http.StatusOK, "")
}

func (c *Console) loginForm(w http.ResponseWriter, r *http.Request, status int, msg string) {
	var b [16]byte
	rand.Read(b[:])
	tok := base64.RawURLEncoding.EncodeToString(b[:])
	http.SetCookie(w, &http.Cookie{Name: loginCookie, Value: tok, Path: "/login", Secure: true, HttpOnly: true,
		SameSite: http.SameSiteStrictMode, MaxAge: 3600})
	v := view{Title: "Log in", Now: c.Now(), D: map[string]string{"CSRF": tok, "Next": safeNext(r.FormValue("next")), "User": r.FormValue("user")}}
	if msg != "" {
		v.Err = &apiError{Status: status, Message: msg}
	}
	c.render(w, status, "login", v)
}

// backOf is the path of the page a request came from, on this site.
func backOf(r *http.Request) string {
	u, err := url.Parse(r.Referer())
	if err != nil || u.Host != r.Host || u.Path == r.URL.Path {
		return ""
	}
	return safeNext(u.RequestURI())
}

// safeNext keeps a redirect target on this site.
func safeNext(s string) string {
	if !strings.HasPrefix(s, "/") || strings.HasPrefix(s, "//") || strings.HasPrefix(s, "/\\") {
		return "/"
	}
	return s
}

func (c *Console) login(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, 16<<10)
	ck, err := r.Cookie(loginCookie)
	if err != nil || ck.Value == "" || r.PostFormValue("csrf") != ck.Value {
		c.render(w, http.StatusForbidden, "error", view{Title: "Forbidden", Now: c.Now(), Err: &apiError{Status: http.StatusForbidden,
			Message: "the login form's CSRF token is missing or wrong: open /login again and submit the form from there"}})
		return
	}
	user, pw := strings.TrimSpace(r.PostFormValue("user")), r.PostFormValue("password")
	now := c.Now()
	keys := []string{"addr:" + remoteHost(r), "user:" + user}
	if d := c.limit.wait(now, keys...); d > 0 {
		secs := int(d.Seconds() + 0.999)
		w.Header().Set("Retry-After", strconv.Itoa(secs))
		c.loginForm(w, r, http.StatusTooManyRequests, fmt.Sprintf(
			"too many failed logins from this address or for this user (%d per minute): wait %d s and try again", LoginFailures, secs))
		return
	}
	u, err := c.Users.CheckPassword(r.Context(), user, pw)
	if err != nil {
		if rebound.ErrorCode(err) != rebound.EUNAUTHORIZED {
			c.fail(w, r, nil, err)
			return
		}
		c.limit.fail(now, keys...)
		c.Logger.Warn("console login failed", "user", user, "remote", r.RemoteAddr)
		c.auditLogin(r, rebound.Principal{User: user, Via: "session"}, "POST /login", http.StatusUnauthorized, rebound.ErrorMessage(err))
		c.loginForm(w, r, http.StatusUnauthorized, "wrong user name or password")
		return
	}
	secret, err := c.Users.CreateSession(r.Context(), u.Name, c.SessionTTL)
	if err != nil {
		c.fail(w, r, nil, err)
		return
	}
	http.SetCookie(w, &http.Cookie{Name: SessionCookie, Value: secret, Path: "/", Secure: true, HttpOnly: true, SameSite: http.SameSiteStrictMode})
	http.SetCookie(w, &http.Cookie{Name: loginCookie, Value: "", Path: "/login", MaxAge: -1, Secure: true, HttpOnly: true, SameSite: http.SameSiteStrictMode})
	c.Logger.Info("console login", "user", u.Name, "role", u.Role, "remote", r.RemoteAddr)
	c.auditLogin(r, rebound.Principal{User: u.Name, Role: u.Role, Via: "session"}, "POST /login", http.StatusSeeOther, "")
	http.Redirect(w, r, safeNext(r.PostFormValue("next")), http.StatusSeeOther)
}

func (c *Console) logout(w http.ResponseWriter, r *http.Request, s *session) {
	if err := c.Users.DeleteSession(r.Context(), s.secret); err != nil {
		c.fail(w, r, s, err)
		return
	}
	http.SetCookie(w, &http.Cookie{Name: SessionCookie, Value: "", Path: "/", MaxAge: -1, Secure: true, HttpOnly: true, SameSite: http.SameSiteStrictMode})
	c.auditLogin(r, s.Principal, "POST /logout", http.StatusSeeOther, "")
	http.Redirect(w, r, "/login", http.StatusSeeOther)
}

// auditLogin records a console login (failed ones too: the name tried)
// or logout in the audit log, next to the API's calls. Refusals by the
// login limit are not recorded: they are bounded only by the network.
func (c *Console) auditLogin(r *http.Request, p rebound.Principal, action string, status int, msg string) {
	if c.Audit == nil {
		return
	}
	e := rebound.AuditEntry{Time: c.Now().UTC(), User: p.User, Role: p.Role, Via: "session", Remote: r.RemoteAddr,
		Action: action, Target: p.User, Status: status}
	if msg != "" {
		e.Error = rebound.EUNAUTHORIZED + ": " + msg
	}
	if err := c.Audit.RecordAudit(context.WithoutCancel(r.Context()), e); err != nil {
		c.Logger.Error("audit record lost", "action", action, "user", p.User, "err", err)
	}
}

// Overview

type overviewData struct {
	Sites    []rebound.SiteDetail
	Machines int
	ByState  []kv
	ByHealth []kv
	Breaches []itemRow
	Active   []rebound.Job
	Events   []rebound.Event
}

type kv struct {
	K string
	V int
}

func counts(m map[string]int) []kv {
	var out []kv
	for k, v := range m {
		out = append(out, kv{k, v})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].K < out[j].K })
	return out
}

func (c *Console) overview(w http.ResponseWriter, r *http.Request, s *session) {
	a := c.caller(r, s)
	var d overviewData
	var sites []rebound.Site
	if err := a.get(p("sites"), &sites); err != nil {
		c.fail(w, r, s, err)
		return
	}
	for _, st := range sites {
		var sd rebound.SiteDetail
		if err := a.get(p("sites", st.Name), &sd); err != nil {
			sd = rebound.SiteDetail{Site: st, Health: "unknown"} // a server without the catalog
		}
		d.Sites = append(d.Sites, sd)
	}
	rows, err := c.items(a)
	if err != nil {
		c.fail(w, r, s, err)
		return
	}
	st, he := map[string]int{}, map[string]int{}
	for _, it := range rows {
		st[it.M.State]++
		he[it.M.Health]++
		if it.Breach {
			d.Breaches = append(d.Breaches, it)
		}
	}
	d.Machines, d.ByState, d.ByHealth = len(rows), counts(st), counts(he)
	var jobs []rebound.Job
	if err := a.get(p("jobs"), &jobs); err != nil {
		c.fail(w, r, s, err)
		return
	}
	for _, j := range jobs {
		if j.State == rebound.JobRunning || j.State == rebound.JobQueued || j.State == rebound.JobSuspended {
			d.Active = append(d.Active, j)
		}
	}
	if err := a.get(p("events")+"?limit=15", &d.Events); err != nil {
		c.fail(w, r, s, err)
		return
	}
	c.page(w, r, s, "overview", "Overview", "overview", d)
}

// Replicated items

type itemRow struct {
	M       rebound.Machine
	RPO     float64 // the policy's threshold, seconds (0: not protected)
	Lag     float64
	Breach  bool
	PointAt time.Time
	Away    bool
	Dir     string // source → target
}

func (c *Console) items(a *caller) ([]itemRow, error) {
	var ms []rebound.Machine
	if err := a.get(p("machines"), &ms); err != nil {
		return nil, err
	}
	var pols []rebound.Policy
	if err := a.get(p("policies"), &pols); err != nil {
		return nil, err
	}
	rpo := map[string]float64{}
	for _, pl := range pols {
		rpo[pl.Name] = time.Duration(pl.RPOThreshold).Seconds()
	}
	rows := make([]itemRow, 0, len(ms))
	for _, m := range ms {
		it := itemRow{M: m, Away: m.HomeSite != "" && m.ActiveSite != m.HomeSite}
		if pr := m.Protection; pr != nil {
			it.RPO = rpo[cmp.Or(pr.Policy, "default")]
			it.Lag = pr.LagSeconds
			it.Breach = it.RPO > 0 && it.Lag > it.RPO
			it.PointAt = pr.LastPointTime
			it.Dir = pr.SourceSite + " → " + pr.TargetSite
		}
		rows = append(rows, it)
	}
	return rows, nil
}

type itemsData struct {
	Rows                        []itemRow
	Q, State, Health, Group     string
	Sort, Dir                   string
	States, Healths, GroupNames []string
	Total                       int
}

func (c *Console) machines(w http.ResponseWriter, r *http.Request, s *session) {
	a := c.caller(r, s)
	all, err := c.items(a)
	if err != nil {
		c.fail(w, r, s, err)
		return
	}
	q := r.URL.Query()
	d := itemsData{Q: q.Get("q"), State: q.Get("state"), Health: q.Get("health"), Group: q.Get("group"),
		Sort: cmp.Or(q.Get("sort"), "name"), Dir: cmp.Or(q.Get("dir"), "asc"), Total: len(all)}
	set := func(v string, seen map[string]bool, out *[]string) {
		if v != "" && !seen[v] {
			seen[v] = true
			*out = append(*out, v)
		}
	}
	s1, s2, s3 := map[string]bool{}, map[string]bool{}, map[string]bool{}
	for _, it := range all {
		set(it.M.State, s1, &d.States)
		set(it.M.Health, s2, &d.Healths)
		set(it.M.Group, s3, &d.GroupNames)
		if d.Q != "" && !strings.Contains(strings.ToLower(it.M.Name), strings.ToLower(d.Q)) ||
			d.State != "" && it.M.State != d.State || d.Health != "" && it.M.Health != d.Health ||
			d.Group != "" && it.M.Group != d.Group {
			continue
		}
		d.Rows = append(d.Rows, it)
	}
	slices.Sort(d.States)
	slices.Sort(d.Healths)
	slices.Sort(d.GroupNames)
	key := map[string]func(a, b itemRow) int{
		"name":   func(a, b itemRow) int { return cmp.Compare(a.M.Name, b.M.Name) },
		"group":  func(a, b itemRow) int { return cmp.Compare(a.M.Group, b.M.Group) },
		"state":  func(a, b itemRow) int { return cmp.Compare(a.M.State, b.M.State) },
		"health": func(a, b itemRow) int { return cmp.Compare(healthRank(a.M.Health), healthRank(b.M.Health)) },
		"lag":    func(a, b itemRow) int { return cmp.Compare(a.Lag, b.Lag) },
		"age":    func(a, b itemRow) int { return b.PointAt.Compare(a.PointAt) },
		"site":   func(a, b itemRow) int { return cmp.Compare(a.M.ActiveSite, b.M.ActiveSite) },
	}
	f, ok := key[d.Sort]
	if !ok {
		d.Sort, f = "name", key["name"]
	}
	slices.SortStableFunc(d.Rows, func(a, b itemRow) int {
		if d.Dir == "desc" {
			return cmp.Or(f(b, a), cmp.Compare(a.M.Name, b.M.Name))
		}
		return cmp.Or(f(a, b), cmp.Compare(a.M.Name, b.M.Name))
	})
	c.page(w, r, s, "machines", "Replicated items", "machines", d)
}

func healthRank(h string) int {
	switch h {
	case rebound.HealthNormal:
		return 0
	case rebound.HealthWarning:
		return 1
	case rebound.HealthCritical:
		return 2
	}
	return 3
}

// Machine and group pages

type kind int

const (
	kindMachine kind = iota
	kindGroup
)

func (k kind) api() string {
	if k == kindGroup {
		return "groups"
	}
	return "machines"
}

// subject is the machine or group a page acts on.
type subject struct {
	Kind    string // machine or group
	Name    string
	Base    string // the console's page, /machines/NAME
	State   string
	Active  string // where it runs now
	From    string // the direction's source (the active site unless failed over)
	To      string // target site
	Home    string
	Away    bool
	Group   string // a machine's group
	Lag     float64
	LastPt  time.Time
	Fail    *rebound.FailoverInfo
	Test    *rebound.TestFailover
	QEMU    bool
	Running bool
	Policy  string
	Prev    string
}

func (c *Console) subject(a *caller, k kind, name string) (*subject, *rebound.Machine, *rebound.Group, error) {
	if k == kindGroup {
		var g rebound.Group
		if err := a.get(p("groups", name), &g); err != nil {
			return nil, nil, nil, err
		}
		sj := &subject{Kind: "group", Name: g.Name, Base: "/groups/" + url.PathEscape(g.Name), State: g.State,
			Active: g.ActiveSite, From: cmp.Or(g.SourceSite, g.ActiveSite), To: g.TargetSite, Lag: g.LagSeconds, Fail: g.Failover, Test: g.TestFailover, Policy: g.Policy}
		if g.Protection != nil {
			sj.LastPt = g.Protection.LastPointTime
		}
		if g.Failover != nil {
			sj.From, sj.To = g.Failover.FromSite, g.Failover.ToSite
		}
		return sj, nil, &g, nil
	}
	var m rebound.Machine
	if err := a.get(p("machines", name), &m); err != nil {
		return nil, nil, nil, err
	}
	sj := &subject{Kind: "machine", Name: m.Name, Base: "/machines/" + url.PathEscape(m.Name), State: m.State,
		Active: m.ActiveSite, From: m.ActiveSite, Home: m.HomeSite, Away: m.HomeSite != "" && m.ActiveSite != m.HomeSite, Group: m.Group,
		Fail: m.Failover, Test: m.TestFailover, QEMU: m.Driver == rebound.DriverQEMU, Prev: m.PreviousSite}
	if m.VMStatus != nil {
		sj.Running = m.VMStatus.Running
	}
	if pr := m.Protection; pr != nil {
		sj.To, sj.Lag, sj.LastPt, sj.Policy = pr.TargetSite, pr.LagSeconds, pr.LastPointTime, pr.Policy
		if pr.SourceSite != "" {
			sj.From = pr.SourceSite
		}
	}
	if m.Failover != nil {
		sj.From, sj.To = m.Failover.FromSite, m.Failover.ToSite
	}
	return sj, &m, nil, nil
}

// action is one verb of the loop as the console offers it.
type action struct {
	Name, Label string
	Path        string // the API verb under /api/v1/{machines|groups}/NAME/
	Confirm     bool   // asks on a confirmation page first
	Point       bool   // takes a recovery point
	Planned     bool   // may run planned (stop, drain, no data loss)
	Preflight   string // the operation whose preflight the confirmation shows
	Danger      bool
	MachineOnly bool
	Hint        string // what it does and what it costs, on the confirmation page
}

var actions = []action{
	{Name: "protect", Label: "Protect", Path: "protect", MachineOnly: true},
	{Name: "point", Label: "Cut a point", Path: "points"},
	{Name: "app-point", Label: "Cut an app-consistent point", Path: "points"},
	{Name: "test-failover", Label: "Test failover", Path: "test-failover", Confirm: true, Point: true,
		Hint: "A scratch copy at the target from the chosen point; replication goes on and the source is not touched."},
	{Name: "test-failover-cleanup", Label: "Clean up test failover", Path: "test-failover/cleanup", Confirm: true, Danger: true,
		Hint: "Deletes the scratch copy and every write made to it."},
	{Name: "failover", Label: "Fail over", Path: "failover", Confirm: true, Point: true, Planned: true, Preflight: "failover", Danger: true,
		Hint: "The copy at the target becomes active at the chosen point; the source is fenced (kept, not written) until commit or cancel."},
	{Name: "change-point", Label: "Change point", Path: "failover/change-point", Confirm: true, Point: true, Danger: true,
		Hint: "Replaces the failed-over copy with one at another point; writes made to the current one are lost."},
	{Name: "cancel", Label: "Cancel failover", Path: "failover/cancel", Confirm: true, Danger: true,
		Hint: "Unfences the source, which is active again with everything it wrote; the failed-over copy and its writes are deleted."},
	{Name: "commit", Label: "Commit", Path: "commit", Confirm: true, Danger: true,
		Hint: "Makes the failed-over copy the machine: it can no longer be cancelled. The old source's disks are kept for a reprotect."},
	{Name: "reprotect", Label: "Reprotect", Path: "reprotect", Confirm: true, Preflight: "reprotect", Danger: true,
		Hint: "Replicates back to the previous site; only the changes travel, onto its old disks."},
	{Name: "failback", Label: "Fail back", Path: "failback", Confirm: true, Point: true, Planned: true, Preflight: "failback", Danger: true,
		Hint: "A failover towards home; planned by default: I/O stops at the active site and the stream drains, no data is lost."},
	{Name: "start", Label: "Start VM", Path: "start", MachineOnly: true},
	{Name: "stop", Label: "Stop VM", Path: "stop", Confirm: true, MachineOnly: true, Danger: true, Hint: "Shuts the virtual machine down."},
}

func actionByName(name string) (action, bool) {
	for _, a := range actions {
		if a.Name == name {
			return a, true
		}
	}
	return action{}, false
}

// next lists the actions the state allows, in the loop's order; the API
// decides (a state it refuses is a 409 naming the step that comes next).
func (sj *subject) next() []action {
	var names []string
	state := sj.State
	if sj.Group != "" {
		state = "" // a member's loop verbs run on its group (its page links there)
	}
	switch state {
	case rebound.MachineUnprotected:
		if sj.Kind == "machine" {
			names = append(names, "protect")
		}
		if sj.Prev != "" || sj.Kind == "group" {
			names = append(names, "reprotect")
		}
	case rebound.MachineProtected:
		names = append(names, "point", "app-point")
		if sj.Test == nil {
			names = append(names, "test-failover")
		} else {
			names = append(names, "test-failover-cleanup")
		}
		names = append(names, "failover")
		if sj.Away {
			names = append(names, "failback")
		}
	case rebound.MachineFailedOver:
		names = append(names, "change-point", "cancel", "commit")
	}
	if sj.QEMU {
		if sj.Running {
			names = append(names, "stop")
		} else {
			names = append(names, "start")
		}
	}
	var out []action
	for _, n := range names {
		a, _ := actionByName(n)
		out = append(out, a)
	}
	return out
}

type timeline struct {
	Points    []rebound.RecoveryPoint // newest first, at most 50 in the table
	Dots      []dot
	From, To  time.Time
	Oldest    time.Time
	Total     int
	Retention time.Duration
	Current   *rebound.RecoveryPoint
	CurrentX  float64
	HasCur    bool
}

type dot struct {
	X   float64 // percent of the width
	P   rebound.RecoveryPoint
	Cur bool
}

// timelineOf reads the points of the last hour (and the oldest point, the
// start of the retention window) and lays them out.
func (c *Console) timelineOf(a *caller, k kind, sj *subject, retention time.Duration) (*timeline, error) {
	now := c.Now()
	var pts []rebound.RecoveryPoint
	since := now.Add(-time.Hour)
	err := a.get(p(k.api(), sj.Name, "points")+"?since="+url.QueryEscape(since.UTC().Format(time.RFC3339Nano))+"&limit=10000", &pts)
	var ae *apiError
	if errors.As(err, &ae) && ae.Status == http.StatusNotImplemented {
		err = a.get(p(k.api(), sj.Name, "points"), &pts)
	}
	if err != nil {
		return nil, err
	}
	tl := &timeline{Total: len(pts), Retention: retention, To: now}
	var first []rebound.RecoveryPoint
	if a.get(p(k.api(), sj.Name, "points")+"?limit=1", &first) == nil && len(first) > 0 {
		tl.Oldest = first[0].Time
	}
	if len(pts) > 300 { // the dots: the newest 300
		pts = pts[len(pts)-300:]
	}
	// The axis runs from the oldest point shown (with a margin), at least
	// a minute, to now.
	tl.From = now.Add(-time.Minute)
	if len(pts) > 0 {
		first := pts[0].Time.Add(-now.Sub(pts[0].Time) / 20)
		tl.From = minTime(tl.From, first)
	}
	span := now.Sub(tl.From).Seconds()
	x := func(t time.Time) float64 {
		if span <= 0 {
			return 100
		}
		return min(100, max(0, 100*t.Sub(tl.From).Seconds()/span))
	}
	if sj.Fail != nil {
		tl.Current = &sj.Fail.Point
	} else if sj.Test != nil {
		tl.Current = &sj.Test.Point
	}
	if tl.Current != nil && !tl.Current.Time.IsZero() {
		tl.HasCur, tl.CurrentX = true, x(tl.Current.Time)
	}
	for _, pt := range pts {
		cur := tl.Current != nil && tl.Current.ID == pt.ID
		tl.Dots = append(tl.Dots, dot{X: x(pt.Time), P: pt, Cur: cur})
	}
	for i := len(pts) - 1; i >= 0 && len(tl.Points) < 50; i-- {
		tl.Points = append(tl.Points, pts[i])
	}
	return tl, nil
}

type machineData struct {
	Sj       *subject
	M        *rebound.Machine
	G        *rebound.Group
	Policy   *rebound.Policy
	TL       *timeline
	Actions  []action
	Events   []rebound.Event
	Jobs     []rebound.Job
	Console  string
	Sites    []rebound.Site
	Policies []rebound.Policy
	Members  []rebound.Machine
}

func (c *Console) machine(w http.ResponseWriter, r *http.Request, s *session) {
	c.subjectPage(w, r, s, kindMachine)
}

func (c *Console) group(w http.ResponseWriter, r *http.Request, s *session) {
	c.subjectPage(w, r, s, kindGroup)
}

func (c *Console) subjectPage(w http.ResponseWriter, r *http.Request, s *session, k kind) {
	a := c.caller(r, s)
	sj, m, g, err := c.subject(a, k, r.PathValue("name"))
	var ae *apiError
	if k == kindMachine && errors.As(err, &ae) && ae.Status == http.StatusNotFound {
		// Jobs and events name a group where a machine would be.
		if a.get(p("groups", r.PathValue("name")), nil) == nil {
			http.Redirect(w, r, "/groups/"+url.PathEscape(r.PathValue("name")), http.StatusSeeOther)
			return
		}
	}
	if err != nil {
		c.fail(w, r, s, err)
		return
	}
	d := machineData{Sj: sj, M: m, G: g, Actions: sj.next()}
	if err := a.get(p("policies"), &d.Policies); err != nil {
		c.fail(w, r, s, err)
		return
	}
	for i, pl := range d.Policies {
		if pl.Name == cmp.Or(sj.Policy, "default") {
			d.Policy = &d.Policies[i]
		}
	}
	if sj.State != rebound.MachineUnprotected || sj.Prev != "" {
		ret := 24 * time.Hour
		if d.Policy != nil {
			ret = time.Duration(d.Policy.Retention)
		}
		if d.TL, err = c.timelineOf(a, k, sj, ret); err != nil {
			d.TL = nil // no points to show (unprotected, the target offline): the page still helps
		}
	}
	if err := a.get(p("sites"), &d.Sites); err != nil {
		c.fail(w, r, s, err)
		return
	}
	var jobs []rebound.Job
	names := []string{sj.Name}
	if g != nil {
		names = append(names, g.Machines...)
		for _, mn := range g.Machines {
			var mm rebound.Machine
			if a.get(p("machines", mn), &mm) == nil {
				d.Members = append(d.Members, mm)
			}
		}
	}
	if err := a.get(p("jobs"), &jobs); err != nil {
		c.fail(w, r, s, err)
		return
	}
	for _, j := range jobs {
		if slices.Contains(names, j.Machine) && len(d.Jobs) < 20 {
			d.Jobs = append(d.Jobs, j)
		}
	}
	if k == kindMachine {
		_ = a.get(p("events")+"?limit=20&machine="+url.QueryEscape(sj.Name), &d.Events)
		if sj.QEMU {
			var out []byte
			if a.get(p("machines", sj.Name, "console")+"?tail=8192", &out) == nil {
				d.Console = strings.ToValidUTF8(string(out), "�")
			}
		}
		c.page(w, r, s, "machine", "Machine "+sj.Name, "machines", d)
		return
	}
	c.page(w, r, s, "machine", "Group "+sj.Name, "groups", d)
}

// Confirmation and actions

type confirmData struct {
	Sj        *subject
	A         action
	Post      string // the form's action
	Point     string // the selector the form sends
	PointText string // an ID or a time typed in
	Planned   bool
	Cost      []string
	Preflight *rebound.PreflightReport
	PlanPF    *rebound.PlanPreflight
	Choices   []choice
	Back      string
	Plan      string
	Verb      string
	PlanVerb  bool
}

type choice struct{ Value, Label string }

var pointChoices = []choice{
	{rebound.PointLatest, "latest: drain what reached the target, then its newest moment"},
	{rebound.PointLatestProcessed, "latest processed: the newest recovery point"},
	{rebound.PointLatestAppConsistent, "latest app-consistent point"},
}

// pointSelector is the selector a form or a link chose; text is set when
// it is an ID or a time (the picker's "other" field).
func pointSelector(q url.Values) (sel, text string) {
	sel, text = q.Get("point"), strings.TrimSpace(q.Get("pointText"))
	if sel == "other" || sel == "" && text != "" {
		return text, text
	}
	switch sel {
	case "", rebound.PointLatest, rebound.PointLatestProcessed, rebound.PointLatestAppConsistent,
		rebound.PointLatestMultiVMProcessed, rebound.PointLatestMultiVMAppConsistent:
		return sel, ""
	}
	return sel, sel // a point picked on the timeline
}

func (c *Console) confirm(k kind) func(w http.ResponseWriter, r *http.Request, s *session) {
	return func(w http.ResponseWriter, r *http.Request, s *session) {
		act, ok := actionByName(r.URL.Query().Get("action"))
		if !ok || k == kindGroup && act.MachineOnly {
			c.fail(w, r, s, &apiError{Status: http.StatusNotFound, Code: rebound.ENOTFOUND, Message: "no such action: pick one on the page"})
			return
		}
		a := c.caller(r, s)
		sj, _, _, err := c.subject(a, k, r.PathValue("name"))
		if err != nil {
			c.fail(w, r, s, err)
			return
		}
		d := confirmData{Sj: sj, A: act, Post: sj.Base + "/do/" + act.Name, Back: sj.Base}
		q := r.URL.Query()
		if act.Point {
			d.Point, d.PointText = pointSelector(q)
			d.Planned = q.Get("planned") == "1" || act.Name == "failback" && d.Point == "" && !q.Has("planned")
			if d.Point == "" && !d.Planned {
				d.Point = rebound.PointLatest
			}
			d.Choices = pointChoices
		}
		d.Cost = c.cost(a, k, sj, act, d.Point, d.Planned)
		if act.Preflight != "" {
			var rep rebound.PreflightReport
			if err := a.get(p(k.api(), sj.Name, "preflight")+"?operation="+act.Preflight, &rep); err != nil {
				d.Cost = append(d.Cost, "preflight could not run: "+err.Error())
			} else {
				d.Preflight = &rep
			}
		}
		c.page(w, r, s, "confirm", act.Label+" "+sj.Name, navOf(k), d)
	}
}

func navOf(k kind) string {
	if k == kindGroup {
		return "groups"
	}
	return "machines"
}

// cost says what an action loses: for a failover, the age of its point.
func (c *Console) cost(a *caller, k kind, sj *subject, act action, sel string, planned bool) []string {
	switch act.Name {
	case "failover", "failback", "test-failover", "change-point":
	case "cancel":
		return []string{"Writes made at " + sj.To + " since the failover are deleted; the source keeps everything it wrote."}
	case "commit":
		return []string{"After commit the failover cannot be cancelled; " + sj.From + "'s disks are kept (released) as the seed of a reprotect."}
	case "test-failover-cleanup":
		return []string{"The test copy and its writes are deleted. Replication was never interrupted."}
	default:
		if act.Hint != "" {
			return []string{act.Hint}
		}
		return nil
	}
	if act.Name == "test-failover" {
		if pt, ok := c.resolve(a, k, sj, sel); ok {
			return []string{fmt.Sprintf("The test copy holds the data up to %s (%s old). Nothing is lost.", pt.Format(time.RFC3339), age(c.Now().Sub(pt)))}
		}
		return []string{"Nothing is lost: replication goes on."}
	}
	if planned {
		return []string{"Planned: I/O stops at " + sj.From + " and the stream drains first: no data is lost, the machine is down until the job ends."}
	}
	if sel == rebound.PointLatest {
		return []string{fmt.Sprintf("Data loss: what did not reach %s yet; the replication lag is %s now.", sj.To, age(time.Duration(sj.Lag*float64(time.Second))))}
	}
	pt, ok := c.resolve(a, k, sj, sel)
	if !ok {
		return []string{"The point " + sel + " was not found among the recovery points: the job will fail unless it exists."}
	}
	return []string{fmt.Sprintf("Data loss: every write after %s — %s of data, as of now — is not in the copy you fail over to (the source keeps it until commit).",
		pt.UTC().Format(time.RFC3339), age(c.Now().Sub(pt)))}
}

// resolve finds the time of a point selector.
func (c *Console) resolve(a *caller, k kind, sj *subject, sel string) (time.Time, bool) {
	switch {
	case sel == rebound.PointLatest:
		return c.Now().Add(-time.Duration(sj.Lag * float64(time.Second))), true
	case sel == rebound.PointLatestProcessed:
		return sj.LastPt, !sj.LastPt.IsZero()
	case sel == rebound.PointLatestAppConsistent:
		var pts []rebound.RecoveryPoint
		if a.get(p(k.api(), sj.Name, "points")+"?kind=app&limit=10000", &pts) == nil && len(pts) > 0 {
			return pts[len(pts)-1].Time, true
		}
		return time.Time{}, false
	case strings.HasPrefix(sel, "p"):
		var pts []rebound.RecoveryPoint
		if a.get(p(k.api(), sj.Name, "points")+"?limit=10000", &pts) == nil {
			for _, pt := range pts {
				if pt.ID == sel {
					return pt.Time, true
				}
			}
		}
		return time.Time{}, false
	}
	t, err := time.Parse(time.RFC3339Nano, sel)
	return t, err == nil
}

func (c *Console) do(k kind) func(w http.ResponseWriter, r *http.Request, s *session) {
	return func(w http.ResponseWriter, r *http.Request, s *session) {
		name := r.PathValue("name")
		act, ok := actionByName(r.PathValue("action"))
		if !ok || k == kindGroup && act.MachineOnly {
			c.fail(w, r, s, &apiError{Status: http.StatusNotFound, Code: rebound.ENOTFOUND, Message: "no such action: pick one on the page"})
			return
		}
		base := "/" + k.api() + "/" + url.PathEscape(name)
		if act.Confirm && r.PostFormValue("confirm") != "yes" {
			http.Redirect(w, r, base+"/confirm?action="+act.Name, http.StatusSeeOther)
			return
		}
		var body any
		sel, _ := pointSelector(r.PostForm)
		switch act.Name {
		case "protect":
			body = map[string]string{"to": r.PostFormValue("to"), "policy": r.PostFormValue("policy"), "group": strings.TrimSpace(r.PostFormValue("group"))}
		case "point":
			body = map[string]bool{"appConsistent": false}
		case "app-point":
			body = map[string]bool{"appConsistent": true}
		case "test-failover", "change-point":
			body = map[string]string{"point": sel}
		case "failover", "failback":
			if r.PostFormValue("planned") == "1" {
				body = map[string]bool{"planned": true}
			} else {
				body = map[string]string{"point": sel}
			}
		case "reprotect":
			body = map[string]string{}
		}
		a := c.caller(r, s)
		if act.Path == "points" {
			var pt rebound.RecoveryPoint
			if err := a.do("POST", p(k.api(), name)+"/"+act.Path, body, &pt); err != nil {
				c.fail(w, r, s, err)
				return
			}
			http.Redirect(w, r, base+"?msg="+url.QueryEscape("point "+pt.ID+" cut at "+pt.Time.UTC().Format(time.RFC3339)), http.StatusSeeOther)
			return
		}
		var j rebound.Job
		if err := a.do("POST", p(k.api(), name)+"/"+act.Path, body, &j); err != nil {
			c.fail(w, r, s, err)
			return
		}
		http.Redirect(w, r, "/jobs/"+url.PathEscape(j.ID), http.StatusSeeOther)
	}
}

func (c *Console) preflightPage(k kind) func(w http.ResponseWriter, r *http.Request, s *session) {
	return func(w http.ResponseWriter, r *http.Request, s *session) {
		a := c.caller(r, s)
		name := r.PathValue("name")
		var rep rebound.PreflightReport
		q := ""
		if op := r.URL.Query().Get("operation"); op != "" {
			q = "?operation=" + url.QueryEscape(op)
		}
		if err := a.get(p(k.api(), name, "preflight")+q, &rep); err != nil {
			c.fail(w, r, s, err)
			return
		}
		c.page(w, r, s, "preflight", "Preflight "+name, navOf(k), map[string]any{
			"R": rep, "Back": "/" + k.api() + "/" + url.PathEscape(name)})
	}
}

// Groups and plans

func (c *Console) groups(w http.ResponseWriter, r *http.Request, s *session) {
	var gs []rebound.Group
	if err := c.caller(r, s).get(p("groups"), &gs); err != nil {
		c.fail(w, r, s, err)
		return
	}
	c.page(w, r, s, "groups", "Groups", "groups", gs)
}

func (c *Console) plans(w http.ResponseWriter, r *http.Request, s *session) {
	var ps []rebound.Plan
	if err := c.caller(r, s).get(p("plans"), &ps); err != nil {
		c.fail(w, r, s, err)
		return
	}
	c.page(w, r, s, "plans", "Plans", "plans", ps)
}

// planVerbs is each plan verb's label and API path.
var planVerbs = []struct{ Verb, Label, Path string }{
	{rebound.PlanTestFailover, "Test failover", "test-failover"},
	{rebound.PlanTestFailoverCleanup, "Clean up test failover", "test-failover/cleanup"},
	{rebound.PlanFailover, "Fail over", "failover"},
	{rebound.PlanChangePoint, "Change point", "failover/change-point"},
	{rebound.PlanCancel, "Cancel failover", "failover/cancel"},
	{rebound.PlanCommit, "Commit", "commit"},
	{rebound.PlanReprotect, "Reprotect", "reprotect"},
	{rebound.PlanFailback, "Fail back", "failback"},
}

func planVerb(v string) (label, path string, ok bool) {
	for _, pv := range planVerbs {
		if pv.Verb == v {
			return pv.Label, pv.Path, true
		}
	}
	return "", "", false
}

func (c *Console) plan(w http.ResponseWriter, r *http.Request, s *session) {
	a := c.caller(r, s)
	var pl rebound.Plan
	if err := a.get(p("plans", r.PathValue("name")), &pl); err != nil {
		c.fail(w, r, s, err)
		return
	}
	var jobs, mine []rebound.Job
	if err := a.get(p("jobs"), &jobs); err != nil {
		c.fail(w, r, s, err)
		return
	}
	for _, j := range jobs {
		if j.Plan != nil && j.Plan.Name == pl.Name && len(mine) < 20 {
			mine = append(mine, j)
		}
	}
	c.page(w, r, s, "plan", "Plan "+pl.Name, "plans", map[string]any{"P": pl, "Jobs": mine, "Verbs": planVerbs})
}

func (c *Console) planConfirm(w http.ResponseWriter, r *http.Request, s *session) {
	name, verb := r.PathValue("name"), r.URL.Query().Get("verb")
	label, _, ok := planVerb(verb)
	if !ok {
		c.fail(w, r, s, &apiError{Status: http.StatusNotFound, Code: rebound.ENOTFOUND, Message: "no such plan verb: pick one on the plan's page"})
		return
	}
	a := c.caller(r, s)
	base := "/plans/" + url.PathEscape(name)
	d := confirmData{Sj: &subject{Kind: "plan", Name: name, Base: base}, A: action{Name: verb, Label: label, Danger: verb != rebound.PlanTestFailover},
		Post: base + "/do/" + verb, Back: base, Plan: name, Verb: verb, PlanVerb: true}
	q := r.URL.Query()
	switch verb {
	case rebound.PlanFailover, rebound.PlanFailback, rebound.PlanTestFailover, rebound.PlanChangePoint:
		d.A.Point = true
		d.A.Planned = verb == rebound.PlanFailover || verb == rebound.PlanFailback
		d.Point, d.PointText = pointSelector(q)
		d.Planned = d.A.Planned && q.Get("planned") == "1"
		if d.Point == "" && !d.Planned {
			d.Point = rebound.PointLatest
		}
		d.Choices = []choice{
			{rebound.PointLatest, "latest: each machine's newest moment, pending data drained"},
			{rebound.PointLatestMultiVMProcessed, "latest multi-VM processed: each group's newest common point"},
			{rebound.PointLatestMultiVMAppConsistent, "latest multi-VM app-consistent point"},
		}
	}
	if verb == rebound.PlanFailover || verb == rebound.PlanFailback || verb == rebound.PlanTestFailover {
		var pf rebound.PlanPreflight
		if err := a.get(p("plans", name, "preflight")+"?operation="+url.QueryEscape(verb), &pf); err != nil {
			d.Cost = append(d.Cost, "preflight could not run: "+err.Error())
		} else {
			d.PlanPF = &pf
		}
	}
	if d.Planned {
		d.Cost = append(d.Cost, "Planned: every member's I/O stops and drains first: no data is lost.")
	} else if d.A.Point && verb != rebound.PlanTestFailover {
		d.Cost = append(d.Cost, "Data loss: each member loses what it wrote after its point ("+d.Point+"); the sources keep it until commit.")
	}
	c.page(w, r, s, "confirm", label+" plan "+name, "plans", d)
}

func (c *Console) planDo(w http.ResponseWriter, r *http.Request, s *session) {
	name, verb := r.PathValue("name"), r.PathValue("verb")
	_, path, ok := planVerb(verb)
	if !ok {
		c.fail(w, r, s, &apiError{Status: http.StatusNotFound, Code: rebound.ENOTFOUND, Message: "no such plan verb: pick one on the plan's page"})
		return
	}
	if r.PostFormValue("confirm") != "yes" {
		http.Redirect(w, r, "/plans/"+url.PathEscape(name)+"/confirm?verb="+url.QueryEscape(verb), http.StatusSeeOther)
		return
	}
	body := map[string]any{}
	if sel, _ := pointSelector(r.PostForm); sel != "" {
		body["point"] = sel
	}
	if r.PostFormValue("planned") == "1" {
		body["planned"] = true
		delete(body, "point")
	}
	var j rebound.Job
	if err := c.caller(r, s).do("POST", p("plans", name)+"/"+path, body, &j); err != nil {
		c.fail(w, r, s, err)
		return
	}
	http.Redirect(w, r, "/jobs/"+url.PathEscape(j.ID), http.StatusSeeOther)
}

// Audit

func (c *Console) audit(w http.ResponseWriter, r *http.Request, s *session) {
	q := r.URL.Query()
	f := rebound.AuditFilter{User: strings.TrimSpace(q.Get("user")), Limit: 200}
	d := map[string]any{"User": f.User, "Since": q.Get("since")}
	if v := strings.TrimSpace(q.Get("since")); v != "" {
		t, err := parseSince(v, c.Now())
		if err != nil {
			c.fail(w, r, s, &apiError{Status: http.StatusBadRequest, Code: rebound.EINVALID, Message: err.Error()})
			return
		}
		f.Since = t
	}
	if c.Audit == nil {
		c.fail(w, r, s, &apiError{Status: http.StatusNotImplemented, Code: "not_implemented", Message: "this server keeps no audit log"})
		return
	}
	es, err := c.Audit.ListAudit(r.Context(), f)
	if err != nil {
		c.fail(w, r, s, err)
		return
	}
	d["Entries"] = es
	c.page(w, r, s, "audit", "Audit", "audit", d)
}

// parseSince takes a duration back from now (1h) or an RFC 3339 time.
func parseSince(v string, now time.Time) (time.Time, error) {
	if d, err := time.ParseDuration(v); err == nil && d > 0 {
		return now.Add(-d), nil
	}
	if t, err := time.Parse(time.RFC3339Nano, v); err == nil {
		return t, nil
	}
	return time.Time{}, fmt.Errorf("since %q is neither a duration (1h) nor an RFC 3339 time (2026-11-30T02:00:00Z)", v)
}

// Template helpers

// liveJob is what the job page's live part shows: the job, and the
// session's CSRF token for its buttons.
type liveJob struct {
	J    *rebound.Job
	CSRF string
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

func age(d time.Duration) string {
	if d < 0 {
		d = 0
	}
	switch {
	case d < time.Second:
		return fmt.Sprintf("%d ms", d.Milliseconds())
	case d < time.Minute:
		return fmt.Sprintf("%.1f s", d.Seconds())
	case d < time.Hour:
		return fmt.Sprintf("%dm %ds", int(d.Minutes()), int(d.Seconds())%60)
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh %dm", int(d.Hours()), int(d.Minutes())%60)
	}
	return fmt.Sprintf("%dd %dh", int(d.Hours())/24, int(d.Hours())%24)
}

func bytesStr(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

var funcs = template.FuncMap{
	"ago": func(now, t time.Time) string {
		if t.IsZero() {
			return "never"
		}
		return age(now.Sub(t)) + " ago"
	},
	"secs": func(f float64) string { return age(time.Duration(f * float64(time.Second))) },
	"dur":  func(d time.Duration) string { return age(d) },
	"bytes": func(n int64) string {
		return bytesStr(n)
	},
	"bps": func(f float64) string { return bytesStr(int64(f)) },
	"pct": func(f float64) string { return fmt.Sprintf("%.0f%%", f*100) },
	"t": func(t time.Time) string {
		if t.IsZero() {
			return "-"
		}
		return t.UTC().Format("2006-01-02 15:04:05Z")
	},
	"rfc":   func(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) },
	"pathq": url.PathEscape,
	"query": url.QueryEscape,
	"xpct":  func(f float64) string { return strconv.FormatFloat(f, 'f', 2, 64) + "%" },
	"ended": func(s string) bool {
		return s == rebound.JobSucceeded || s == rebound.JobFailed || s == rebound.JobCancelled
	},
	"active": func(s string) bool {
		return s == rebound.JobRunning || s == rebound.JobQueued || s == rebound.JobSuspended
	},
	"sortq": func(d itemsData, key string) string {
		dir := "asc"
		if d.Sort == key && d.Dir == "asc" {
			dir = "desc"
		}
		v := url.Values{"sort": {key}, "dir": {dir}}
		for k, x := range map[string]string{"q": d.Q, "state": d.State, "health": d.Health, "group": d.Group} {
			if x != "" {
				v.Set(k, x)
			}
		}
		return "/machines?" + v.Encode()
	},
	"eta": func(s float64) string {
		if s <= 0 {
			return "-"
		}
		return age(time.Duration(s * float64(time.Second)))
	},
	"live":     func(j *rebound.Job, csrf string) liveJob { return liveJob{J: j, CSRF: csrf} },
	"progress": func(f float64) string { return strconv.FormatFloat(min(1, max(0, f)), 'f', 3, 64) },
}

func parsePages() map[string]*template.Template {
	names, err := templateFS.ReadDir("templates")
	if err != nil {
		panic(err)
	}
	out := map[string]*template.Template{}
	for _, e := range names {
		n := strings.TrimSuffix(e.Name(), ".html")
		if n == "layout" || n == "parts" {
			continue
		}
		out[n] = template.Must(template.New(n).Funcs(funcs).ParseFS(templateFS,
			"templates/layout.html", "templates/parts.html", "templates/"+e.Name()))
	}
	return out
}
