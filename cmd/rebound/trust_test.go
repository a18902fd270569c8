package main

import (
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

// TestOutputCaseInsensitive: -o JSON and --output=Json are -o json, for
// results and for errors.
func TestOutputCaseInsensitive(t *testing.T) {
	f := &fakeService{ListSitesFn: func() ([]rebound.Site, error) { return []rebound.Site{{Name: "a"}}, nil }}
	for _, args := range [][]string{{"-o", "JSON"}, {"--output=Json"}, {"-oJSON"}} {
		r := runCLI(t, f, append([]string{"site", "list"}, args...)...)
		wantCode(t, r, 0)
		if s := decode[[]rebound.Site](t, r.stdout); len(s) != 1 || s[0].Name != "a" {
			t.Fatalf("%v: %q", args, r.stdout)
		}
	}
	r := runCLI(t, f, "site", "list", "-o", "Table")
	wantCode(t, r, 0)
	if !strings.HasPrefix(r.stdout, "NAME") {
		t.Fatalf("table: %q", r.stdout)
	}
	// A usage error before the command runs still answers in JSON.
	r = runCLI(t, f, "site", "list", "--bogus", "-o", "JSON")
	wantCode(t, r, ExitUsage)
	if e := decode[map[string]map[string]string](t, r.stdout); e["error"]["code"] != rebound.EINVALID {
		t.Fatalf("json error %q", r.stdout)
	}
	r = runCLI(t, f, "site", "list", "-o", "yaml")
	wantCode(t, r, ExitUsage)
	if !strings.Contains(r.stderr, "-o must be json or table") {
		t.Fatalf("stderr %q", r.stderr)
	}
}

// TestVersionBuild: version shows the -ldflags version and commit.
func TestVersionBuild(t *testing.T) {
	oldV, oldC := Version, Commit
	t.Cleanup(func() { Version, Commit = oldV, oldC })
	Version, Commit = "v1.2.3", "0123456789abcdef0123"
	r := runWith(t, &fakeService{}, "version")
	wantCode(t, r, 0)
	if !strings.HasPrefix(r.stdout, "rebound v1.2.3 (commit 0123456789ab, go") {
		t.Fatalf("stdout %q", r.stdout)
	}
	r = runWith(t, &fakeService{}, "version", "-o", "json")
	if v := decode[VersionInfo](t, r.stdout); v.Version != "v1.2.3" || v.Commit != "0123456789abcdef0123" || v.Go == "" {
		t.Fatalf("json %+v", v)
	}
}

// TestPolicySetInvalid: zero, negative and inconsistent values are refused
// with the rule, and nothing is stored.
func TestPolicySetInvalid(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--crash-interval", "0"}, "--crash-interval must be positive, not 0s"},
		{[]string{"--crash-interval", "-5s"}, "--crash-interval must be positive, not -5s"},
		{[]string{"--rpo", "0s"}, "--rpo must be positive"},
		{[]string{"--retention", "0"}, "--retention must be positive"},
		{[]string{"--app-interval", "-1m"}, "--app-interval must be positive"},
		{[]string{"--crash-interval", "500ms"}, "crashInterval (--crash-interval) must be at least 1s, not 500ms"},
		{[]string{"--crash-interval", "1m", "--retention", "30s"}, "retention (--retention) 30s is shorter than the crash interval 1m0s"},
		{[]string{"--app-interval", "100ms"}, "appInterval (--app-interval) must be 0 (never) or at least 1s"},
	} {
		f := &fakeService{ListPoliciesFn: func() ([]rebound.Policy, error) { return []rebound.Policy{rebound.DefaultPolicy()}, nil }}
		r := runCLI(t, f, append([]string{"policy", "set", "gold"}, c.args...)...)
		wantCode(t, r, ExitUsage)
		if !strings.Contains(r.stderr, c.want) {
			t.Fatalf("%v: stderr %q, want %q", c.args, r.stderr, c.want)
		}
		for _, call := range f.Calls() {
			if strings.HasPrefix(call, "PutPolicy") {
				t.Fatalf("%v stored: %s", c.args, call)
			}
		}
	}
	// --app-interval 0 is "never", a valid value.
	f := &fakeService{
		ListPoliciesFn: func() ([]rebound.Policy, error) { return nil, nil },
		PutPolicyFn:    func(p rebound.Policy) (*rebound.Policy, error) { return &p, nil },
	}
	wantCode(t, runCLI(t, f, "policy", "set", "gold", "--app-interval", "0"), 0)
	wantCalls(t, f, "ListPolicies", "PutPolicy gold rpo=30s retention=24h0m0s crash=5s app=0s")
}

func TestPolicyDelete(t *testing.T) {
	f := &fakeService{DeletePolicyFn: func(name string) error {
		if name == "gold" {
			return rebound.Errorf(rebound.ECONFLICT, "policy \"gold\" is used by machines db, web1: move them to another policy first")
		}
		return nil
	}}
	r := runCLI(t, f, "policy", "delete", "silver")
	wantCode(t, r, 0)
	if r.stdout != "deleted policy silver\n" {
		t.Fatalf("stdout %q", r.stdout)
	}
	r = runCLI(t, f, "policy", "delete", "silver", "-o", "json")
	if d := decode[Deleted](t, r.stdout); d != (Deleted{Name: "silver", Deleted: true}) {
		t.Fatalf("json %+v", d)
	}
	r = runCLI(t, f, "policy", "delete", "gold")
	wantCode(t, r, ExitConflict)
	if !strings.Contains(r.stderr, "used by machines db, web1") {
		t.Fatalf("stderr %q", r.stderr)
	}
}

func TestSiteShow(t *testing.T) {
	seen := time.Now().Add(-3 * time.Minute)
	d := &rebound.SiteDetail{
		Site:   rebound.Site{Name: "b", Status: rebound.SiteOffline, NBDAddr: "b:10809", FreeBytes: 10 << 30, LastSeen: seen, Version: "v1.2.3+abc"},
		Health: rebound.HealthCritical, HealthReason: "no report since then",
		Machines: []rebound.SiteMachineRole{{Name: "web1", Role: "target", State: "protected", Health: "warning"},
			{Name: "app", Role: "source,home", State: "protected", Health: "normal"}},
	}
	f := &fakeService{GetSiteFn: func(name string) (*rebound.SiteDetail, error) {
		if name != "b" {
			return nil, rebound.Errorf(rebound.ENOTFOUND, "site %q not found", name)
		}
		return d, nil
	}}
	r := runCLI(t, f, "site", "show", "b")
	wantCode(t, r, 0)
	for _, want := range []string{
		"Status: offline", "Health: critical (no report since then)", "Version: v1.2.3+abc", "Free space: 10GiB",
		"Replication: -", "Last report: " + seen.UTC().Format(time.RFC3339) + " (3m ago)",
		"NAME ROLE STATE HEALTH", "web1 target protected warning", "app source,home protected normal",
	} {
		found := false
		for _, l := range strings.Split(r.stdout, "\n") {
			found = found || strings.Join(strings.Fields(l), " ") == want
		}
		if !found {
			t.Fatalf("no line %q in:\n%s", want, r.stdout)
		}
	}
	r = runCLI(t, f, "site", "show", "b", "-o", "json")
	if got := decode[rebound.SiteDetail](t, r.stdout); got.Name != "b" || got.Health != "critical" || len(got.Machines) != 2 || got.Machines[1].Role != "source,home" {
		t.Fatalf("json %+v", got)
	}
	wantCode(t, runCLI(t, f, "site", "show", "z"), ExitNotFound)
}

// TestPointsFilters: filters go to the server as a ListQuery; --limit
// prints one page and the command for the next; without --limit every page
// is followed.
func TestPointsFilters(t *testing.T) {
	pts := []rebound.RecoveryPoint{{ID: "p1", Time: t0, Kind: rebound.PointApp, Seq: 10}, {ID: "p2", Time: t0.Add(time.Second), Kind: rebound.PointApp, Seq: 20}}
	f := &fakeService{QueryPointsFn: func(m string, q rebound.ListQuery) (*rebound.PointPage, error) {
		if q.Cursor == "" {
			return &rebound.PointPage{Points: pts[:1], Next: "10"}, nil
		}
		return &rebound.PointPage{Points: pts[1:]}, nil
	}}
	r := runCLI(t, f, "points", "web1", "--kind", "app", "--since", "2026-11-27T12:00:00Z", "--until", "2026-11-27T14:00:00Z", "--limit", "1")
	wantCode(t, r, 0)
	wantCalls(t, f, "QueryPoints web1 since=2026-11-27T12:00:00Z until=2026-11-27T14:00:00Z kind=app limit=1")
	if lines := strings.Split(strings.TrimSpace(r.stdout), "\n"); len(lines) != 2 || !strings.HasPrefix(lines[1], "p1 ") {
		t.Fatalf("table:\n%s", r.stdout)
	}
	if want := "rebound: more points follow: rebound points web1 --since=2026-11-27T12:00:00Z --until=2026-11-27T14:00:00Z --kind=app --limit=1 --cursor=10\n"; r.stderr != want {
		t.Fatalf("stderr %q\nwant   %q", r.stderr, want)
	}
	f.calls = nil
	r = runCLI(t, f, "points", "web1", "--kind", "app", "-o", "json")
	wantCode(t, r, 0)
	wantCalls(t, f, "QueryPoints web1 kind=app limit=10000", "QueryPoints web1 kind=app limit=10000 cursor=10")
	if got := decode[[]rebound.RecoveryPoint](t, r.stdout); !reflect.DeepEqual(got, pts) || r.stderr != "" {
		t.Fatalf("json %+v stderr %q", got, r.stderr)
	}
	// A duration is a time ago.
	f.calls = nil
	before := time.Now().Add(-90 * time.Minute)
	wantCode(t, runCLI(t, f, "points", "web1", "--since", "90m", "--limit", "5"), 0)
	c := f.Calls()[0]
	since, err := time.Parse(time.RFC3339, strings.TrimPrefix(strings.Fields(c)[2], "since="))
	if err != nil || since.Before(before.Add(-time.Second)) || since.After(time.Now().Add(-90*time.Minute)) {
		t.Fatalf("call %q: since %v %v", c, since, err)
	}
	for _, bad := range [][]string{
		{"--since", "yesterday"}, {"--kind", "hourly"}, {"--limit", "-1"}, {"--limit", "10001"},
		{"--since", "1h", "--until", "2h"},
	} {
		f.calls = nil
		r := runCLI(t, f, append([]string{"points", "web1"}, bad...)...)
		wantCode(t, r, ExitUsage)
		wantCalls(t, f)
	}
}

func TestEventsFilters(t *testing.T) {
	f := &fakeService{QueryEventsFn: func(q rebound.ListQuery) (*rebound.EventPage, error) {
		return &rebound.EventPage{Events: []rebound.Event{{ID: 7, Time: t0, Machine: "web1", Kind: "job.protect", Message: "started"}}, Next: "7"}, nil
	}}
	r := runCLI(t, f, "events", "--machine", "web1", "--kind", "job", "--limit", "1", "--until", "2026-11-28T00:00:00Z")
	wantCode(t, r, 0)
	wantCalls(t, f, "QueryEvents until=2026-11-28T00:00:00Z kind=job machine=web1 limit=1")
	if !strings.Contains(r.stdout, "job.protect") || r.stderr != "rebound: more events follow: rebound events --machine=web1 --until=2026-11-28T00:00:00Z --kind=job --limit=1 --cursor=7\n" {
		t.Fatalf("stdout %q stderr %q", r.stdout, r.stderr)
	}
	// Filters without --limit ask for the newest page.
	f.calls = nil
	r = runCLI(t, f, "events", "--kind", "health", "-o", "json")
	wantCalls(t, f, "QueryEvents kind=health limit=1000")
	if evs := decode[[]rebound.Event](t, r.stdout); len(evs) != 1 || evs[0].ID != 7 {
		t.Fatalf("json %q", r.stdout)
	}
}

// TestCompletion: the scripts generate, and __complete offers machine,
// site, policy and point names from the server.
func TestCompletion(t *testing.T) {
	f := &fakeService{
		ListMachinesFn: func() ([]rebound.Machine, error) { return []rebound.Machine{{Name: "web1"}, {Name: "db"}}, nil },
		ListSitesFn:    func() ([]rebound.Site, error) { return []rebound.Site{{Name: "primary"}, {Name: "recovery"}}, nil },
		ListPoliciesFn: func() ([]rebound.Policy, error) { return []rebound.Policy{{Name: "default"}, {Name: "gold"}}, nil },
		ListPointsFn: func(m string) ([]rebound.RecoveryPoint, error) {
			return []rebound.RecoveryPoint{{ID: "p10"}, {ID: "p20"}}, nil
		},
	}
	for _, sh := range []string{"bash", "zsh", "fish"} {
		r := runCLI(t, f, "completion", sh)
		wantCode(t, r, 0)
		if !strings.Contains(r.stdout, "__complete") {
			t.Fatalf("%s script:\n%.300s", sh, r.stdout)
		}
	}
	complete := func(args ...string) []string {
		t.Helper()
		r := runCLI(t, f, append([]string{"__complete"}, args...)...)
		wantCode(t, r, 0)
		lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
		return lines[:len(lines)-1] // the last line is the directive
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"machine", "show", ""}, "db web1"},
		{[]string{"failover", "w"}, "web1"},
		{[]string{"protect", "web1", "--to", ""}, "primary recovery"},
		{[]string{"machine", "create", "x", "--site", "re"}, "recovery"},
		{[]string{"site", "show", ""}, "primary recovery"},
		{[]string{"protect", "web1", "--policy", ""}, "default gold"},
		{[]string{"failover", "web1", "--point", ""}, "latest latest-processed latest-app-consistent p20 p10"},
		{[]string{"test-failover", "web1", "--point", "p1"}, "p10"},
		{[]string{"events", "--machine", ""}, "db web1"},
		{[]string{"points", ""}, "db web1"},
	} {
		if got := strings.Join(complete(c.args...), " "); got != c.want {
			t.Fatalf("complete %q: %q, want %q", c.args, got, c.want)
		}
	}
	// A second argument gets nothing.
	if got := complete("machine", "show", "web1", ""); len(got) != 0 {
		t.Fatalf("second arg: %q", got)
	}
}
