package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/spf13/cobra"
)

// result is one in-process run of the CLI.
type result struct {
	code           int
	stdout, stderr string
}

// runCLI runs the CLI in-process against svc with a configured server.
func runCLI(t *testing.T, svc rebound.Service, args ...string) result {
	t.Helper()
	t.Setenv("XDG_CONFIG_HOME", t.TempDir())
	t.Setenv(EnvServer, "https://server.test:8440")
	t.Setenv(EnvToken, "tok")
	t.Setenv(EnvCA, "")
	return runWith(t, svc, args...)
}

func runWith(t *testing.T, svc rebound.Service, args ...string) result {
	t.Helper()
	var out, errb bytes.Buffer
	c := NewCLI(strings.NewReader(""), &out, &errb)
	c.NewService = func(cfg *ClientConfig) (rebound.Service, error) { return svc, nil }
	c.PollInterval = time.Millisecond
	c.IsTerminal = func(io.Writer) bool { return false }
	code := c.Run(context.Background(), args)
	return result{code, out.String(), errb.String()}
}

func decode[T any](t *testing.T, s string) T {
	t.Helper()
	var v T
	dec := json.NewDecoder(strings.NewReader(s))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&v); err != nil {
		t.Fatalf("decode %T from %q: %v", v, s, err)
	}
	return v
}

func wantCalls(t *testing.T, f *fakeService, want ...string) {
	t.Helper()
	got := f.Calls()
	if want == nil {
		want = []string{}
	}
	if got == nil {
		got = []string{}
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("calls:\n got %q\nwant %q", got, want)
	}
}

func wantCode(t *testing.T, r result, code int) {
	t.Helper()
	if r.code != code {
		t.Fatalf("exit code %d, want %d\nstdout: %s\nstderr: %s", r.code, code, r.stdout, r.stderr)
	}
}

var t0 = time.Date(2026, 11, 27, 13, 0, 0, 0, time.UTC)

func sampleMachine() *rebound.Machine {
	return &rebound.Machine{
		Name: "web1", Driver: "none", State: rebound.MachineProtected,
		ActiveSite: "a", HomeSite: "a", Health: rebound.HealthWarning, HealthReason: "lag 45s",
		Disks: []rebound.Disk{
			{Name: "disk0", Size: 4 << 30, NBD: "nbd://a:10809/web1-disk0"},
			{Name: "disk1", Size: 512 << 20, NBD: "nbd://a:10809/web1-disk1"},
		},
		Protection: &rebound.Protection{SourceSite: "a", TargetSite: "b", Policy: "default", ReplState: "streaming", LagSeconds: 1.25},
		TestFailover: &rebound.TestFailover{Site: "b",
			Point: rebound.RecoveryPoint{ID: "p7", Time: t0, Kind: rebound.PointCrash, Seq: 70},
			Disks: []rebound.Disk{{Name: "disk0", Size: 4 << 30, NBD: "nbd://b:10809/test-web1-disk0"}}},
		CreatedAt: t0,
	}
}

func TestSiteList(t *testing.T) {
	f := &fakeService{ListSitesFn: func() ([]rebound.Site, error) {
		return []rebound.Site{
			{Name: "a", Status: rebound.SiteOnline, NBDAddr: "a:10809", FreeBytes: 10 << 30, LastSeen: t0, Version: "v1"},
			{Name: "b", Status: rebound.SiteOffline},
		}, nil
	}}
	r := runCLI(t, f, "site", "list")
	wantCode(t, r, 0)
	wantCalls(t, f, "ListSites")
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "NAME") ||
		strings.Join(strings.Fields(lines[1]), " ") != "a online a:10809 - 10GiB 2026-11-27T13:00:00Z v1" ||
		strings.Join(strings.Fields(lines[2]), " ") != "b offline - - - - -" {
		t.Fatalf("table:\n%s", r.stdout)
	}

	r = runCLI(t, f, "site", "list", "-o", "json")
	wantCode(t, r, 0)
	sites := decode[[]rebound.Site](t, r.stdout)
	if len(sites) != 2 || sites[0].Name != "a" || sites[0].FreeBytes != 10<<30 || !sites[0].LastSeen.Equal(t0) {
		t.Fatalf("json: %+v", sites)
	}

	// An empty list is [] in JSON, not null.
	f = &fakeService{ListSitesFn: func() ([]rebound.Site, error) { return nil, nil }}
	r = runCLI(t, f, "site", "list", "-o", "json")
	if strings.TrimSpace(r.stdout) != "[]" {
		t.Fatalf("empty json: %q", r.stdout)
	}
}

func TestSiteToken(t *testing.T) {
	f := &fakeService{CreateEnrollTokenFn: func(site string) (string, error) { return "enroll-" + site, nil }}
	r := runCLI(t, f, "site", "token", "b")
	wantCode(t, r, 0)
	wantCalls(t, f, "CreateEnrollToken b")
	if r.stdout != "enroll-b\n" {
		t.Fatalf("stdout %q", r.stdout)
	}
	r = runCLI(t, f, "site", "token", "b", "-o", "json")
	if tok := decode[EnrollToken](t, r.stdout); tok != (EnrollToken{Site: "b", Token: "enroll-b"}) {
		t.Fatalf("json %+v", tok)
	}
	r = runCLI(t, &fakeService{}, "site", "token")
	wantCode(t, r, ExitUsage)
	if !strings.Contains(r.stderr, "rebound: site token: missing NAME") {
		t.Fatalf("stderr %q", r.stderr)
	}
}

func TestMachineCreate(t *testing.T) {
	f := &fakeService{CreateMachineFn: func(req rebound.CreateMachineRequest) (*rebound.Machine, error) {
		m := &rebound.Machine{Name: req.Name, Driver: req.Driver, State: rebound.MachineUnprotected, ActiveSite: req.Site, HomeSite: req.Site, Health: rebound.HealthNormal}
		for i, n := range req.Disks {
			m.Disks = append(m.Disks, rebound.Disk{Name: "disk" + string(rune('0'+i)), Size: n, NBD: "nbd://x/" + req.Name})
		}
		return m, nil
	}}
	r := runCLI(t, f, "machine", "create", "web1", "--site", "a", "--disk", "4GiB", "--disk", "512M", "--disk", "1048576", "-o", "json")
	wantCode(t, r, 0)
	wantCalls(t, f, "CreateMachine {Name:web1 Site:a Driver:none Disks:[4294967296 536870912 1048576] Import:[] VM:<nil>}")
	m := decode[rebound.Machine](t, r.stdout)
	if m.Name != "web1" || m.ActiveSite != "a" || len(m.Disks) != 3 || m.Disks[1].Size != 512<<20 {
		t.Fatalf("json %+v", m)
	}

	r = runCLI(t, f, "machine", "create", "db", "--site=a", "--disk=1G")
	wantCode(t, r, 0)
	for _, want := range []string{"Name:", "db", "unprotected", "disk0", "1GiB", "nbd://x/db"} {
		if !strings.Contains(r.stdout, want) {
			t.Fatalf("table lacks %q:\n%s", want, r.stdout)
		}
	}

	for _, args := range [][]string{
		{"machine", "create", "x", "--disk", "1G"},                          // no site
		{"machine", "create", "x", "--site", "a"},                           // no disk
		{"machine", "create", "x", "--site", "a", "--disk", "lots"},         // bad size
		{"machine", "create", "x", "--site", "a", "--disk", "-1G"},          // negative
		{"machine", "create", "--site", "a", "--disk", "1G"},                // no name
		{"machine", "create", "x", "y", "--site", "a", "--disk", "1G"},      // extra arg
		{"machine", "create", "x", "--site", "a", "--disk", "1G", "--nope"}, // unknown flag
	} {
		f := &fakeService{}
		r := runCLI(t, f, args...)
		wantCode(t, r, ExitUsage)
		wantCalls(t, f)
		if !strings.HasPrefix(r.stderr, "rebound: ") {
			t.Fatalf("%q: stderr %q", args, r.stderr)
		}
	}
}

func TestMachineList(t *testing.T) {
	web := sampleMachine()
	web.Protection.LastPointTime = time.Now().Add(-10 * time.Minute)
	away := rebound.Machine{Name: "app", State: rebound.MachineProtected, ActiveSite: "b", HomeSite: "a", Health: rebound.HealthNormal,
		Protection: &rebound.Protection{SourceSite: "b", TargetSite: "a", Policy: "gold", LagSeconds: 2.1}}
	f := &fakeService{
		ListMachinesFn: func() ([]rebound.Machine, error) {
			return []rebound.Machine{away, *web, {Name: "db", State: rebound.MachineUnprotected, ActiveSite: "a", HomeSite: "a", Health: rebound.HealthNormal}}, nil
		},
		ListPoliciesFn: func() ([]rebound.Policy, error) {
			return []rebound.Policy{rebound.DefaultPolicy(), {Name: "gold", RPOThreshold: rebound.Duration(10 * time.Second)}}, nil
		},
	}
	r := runCLI(t, f, "machine", "list")
	wantCode(t, r, 0)
	wantCalls(t, f, "ListMachines", "ListPolicies")
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if got := strings.Fields(lines[0]); !reflect.DeepEqual(got, []string{"NAME", "STATE", "DIRECTION", "HEALTH", "LAG/RPO", "LAST-POINT", "HOME", "DISKS"}) {
		t.Fatalf("header %q", got)
	}
	for i, want := range []string{
		"app protected b -> a normal 2.1s / 10s - a (away) -",
		"web1 protected a -> b warning 1.3s / 30s 10m ago a 4GiB,512MiB",
		"db unprotected a normal - - a -",
	} {
		if got := strings.Join(strings.Fields(lines[i+1]), " "); got != want {
			t.Fatalf("row %d %q, want %q", i, got, want)
		}
	}
	r = runCLI(t, f, "machine", "list", "-o", "json")
	ms := decode[[]rebound.Machine](t, r.stdout)
	if len(ms) != 3 || ms[1].Protection.TargetSite != "b" {
		t.Fatalf("json %+v", ms)
	}
	// Without policies (an old server) the lag stands alone.
	f.ListPoliciesFn = nil
	r = runCLI(t, f, "machine", "list")
	wantCode(t, r, 0)
	if !strings.Contains(r.stdout, "1.3s ") || strings.Contains(r.stdout, " / ") {
		t.Fatalf("no policies:\n%s", r.stdout)
	}
}

func TestMachineShow(t *testing.T) {
	f := &fakeService{GetMachineFn: func(name string) (*rebound.Machine, error) {
		if name != "web1" {
			return nil, rebound.Errorf(rebound.ENOTFOUND, "machine %q not found", name)
		}
		return sampleMachine(), nil
	}}
	r := runCLI(t, f, "machine", "show", "web1", "-o", "json")
	wantCode(t, r, 0)
	wantCalls(t, f, "GetMachine web1")
	// The documented fields, read generically as a script would.
	var v struct {
		Name       string `json:"name"`
		State      string `json:"state"`
		ActiveSite string `json:"activeSite"`
		Health     string `json:"health"`
		Disks      []struct {
			Name string `json:"name"`
			Size int64  `json:"size"`
			NBD  string `json:"nbd"`
		} `json:"disks"`
		TestFailover struct {
			Disks []struct {
				NBD string `json:"nbd"`
			} `json:"disks"`
		} `json:"testFailover"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &v); err != nil {
		t.Fatal(err)
	}
	if v.Name != "web1" || v.State != "protected" || v.ActiveSite != "a" || v.Health != "warning" ||
		len(v.Disks) != 2 || v.Disks[0].Name != "disk0" || v.Disks[0].Size != 4<<30 || v.Disks[1].NBD != "nbd://a:10809/web1-disk1" ||
		len(v.TestFailover.Disks) != 1 || v.TestFailover.Disks[0].NBD != "nbd://b:10809/test-web1-disk0" {
		t.Fatalf("json %+v", v)
	}
	m := decode[rebound.Machine](t, r.stdout)
	if !reflect.DeepEqual(&m, sampleMachine()) {
		t.Fatalf("round trip:\n got %+v\nwant %+v", m, sampleMachine())
	}

	r = runCLI(t, f, "machine", "show", "web1")
	wantCode(t, r, 0)
	for _, want := range []string{"warning (lag 45s)", "a -> b, policy default", "nbd://a:10809/web1-disk0", "Test failover:", "nbd://b:10809/test-web1-disk0", "p7 (crash,"} {
		if !strings.Contains(r.stdout, want) {
			t.Fatalf("table lacks %q:\n%s", want, r.stdout)
		}
	}

	r = runCLI(t, f, "machine", "show", "nope")
	wantCode(t, r, ExitNotFound)
	if r.stderr != "rebound: machine \"nope\" not found\n" || r.stdout != "" {
		t.Fatalf("stderr %q stdout %q", r.stderr, r.stdout)
	}
}

func TestMachineDelete(t *testing.T) {
	f := &fakeService{DeleteMachineFn: func(name string) error { return nil }}
	r := runCLI(t, f, "machine", "delete", "web1")
	wantCode(t, r, 0)
	wantCalls(t, f, "DeleteMachine web1")
	if r.stdout != "deleted machine web1\n" {
		t.Fatalf("stdout %q", r.stdout)
	}
	r = runCLI(t, f, "machine", "delete", "web1", "-o", "json")
	if d := decode[Deleted](t, r.stdout); d != (Deleted{Name: "web1", Deleted: true}) {
		t.Fatalf("json %+v", d)
	}
	f = &fakeService{DeleteMachineFn: func(name string) error {
		return rebound.Errorf(rebound.ECONFLICT, "machine %s is failing over", name)
	}}
	r = runCLI(t, f, "machine", "delete", "web1")
	wantCode(t, r, ExitConflict)
}

func TestPolicy(t *testing.T) {
	gold := rebound.Policy{Name: "gold", RPOThreshold: rebound.Duration(10 * time.Second), Retention: rebound.Duration(72 * time.Hour),
		CrashInterval: rebound.Duration(2 * time.Second), AppInterval: rebound.Duration(15 * time.Minute)}
	f := &fakeService{
		ListPoliciesFn: func() ([]rebound.Policy, error) { return []rebound.Policy{rebound.DefaultPolicy(), gold}, nil },
		PutPolicyFn:    func(p rebound.Policy) (*rebound.Policy, error) { return &p, nil },
	}
	r := runCLI(t, f, "policy", "list")
	wantCode(t, r, 0)
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if len(lines) != 3 || strings.Join(strings.Fields(lines[1]), " ") != "default 30s 24h0m0s 5s never track" ||
		strings.Join(strings.Fields(lines[2]), " ") != "gold 10s 72h0m0s 2s 15m0s track" {
		t.Fatalf("table:\n%s", r.stdout)
	}
	r = runCLI(t, f, "policy", "list", "-o", "json")
	if ps := decode[[]rebound.Policy](t, r.stdout); len(ps) != 2 || ps[1] != gold {
		t.Fatalf("json %+v", ps)
	}

	// Updating one field keeps the others.
	f.calls = nil
	r = runCLI(t, f, "policy", "set", "gold", "--rpo", "1m", "-o", "json")
	wantCode(t, r, 0)
	wantCalls(t, f, "ListPolicies", "PutPolicy gold rpo=1m0s retention=72h0m0s crash=2s app=15m0s")
	if p := decode[rebound.Policy](t, r.stdout); p.RPOThreshold != rebound.Duration(time.Minute) || p.Retention != gold.Retention {
		t.Fatalf("json %+v", p)
	}
	// A new policy starts from the defaults.
	f.calls = nil
	r = runCLI(t, f, "policy", "set", "silver", "--retention", "48h", "--app-interval", "1h", "--crash-interval", "10s")
	wantCode(t, r, 0)
	wantCalls(t, f, "ListPolicies", "PutPolicy silver rpo=30s retention=48h0m0s crash=10s app=1h0m0s")
	// --congestion changes only the congestion policy.
	r = runCLI(t, f, "policy", "set", "gold", "--congestion", "throttle", "-o", "json")
	wantCode(t, r, 0)
	if p := decode[rebound.Policy](t, r.stdout); p.Congestion != rebound.CongestionThrottle || p.RPOThreshold != gold.RPOThreshold {
		t.Fatalf("json %+v", p)
	}

	for _, args := range [][]string{
		{"policy", "set", "x", "--rpo", "soon"},
		{"policy", "set", "x", "--retention", "-1h"},
		{"policy", "set", "x", "--congestion", "block"},
		{"policy", "set"},
	} {
		f := &fakeService{ListPoliciesFn: func() ([]rebound.Policy, error) { return nil, nil }}
		r := runCLI(t, f, args...)
		wantCode(t, r, ExitUsage)
		for _, c := range f.Calls() {
			if strings.HasPrefix(c, "PutPolicy") {
				t.Fatalf("%q called %s", args, c)
			}
		}
	}
}

// TestJobVerbs checks each job-starting verb's arguments reach the right
// Service call and the returned job is printed.
func TestJobVerbs(t *testing.T) {
	job := func(typ string) func() *rebound.Job { return func() *rebound.Job { return jobFn(typ, "web1") } }
	for _, tc := range []struct {
		args []string
		call string
		typ  string
	}{
		{[]string{"protect", "web1", "--to", "b"}, "Protect {Machine:web1 To:b Policy:}", "protect"},
		{[]string{"protect", "web1", "--to", "b", "--policy", "gold"}, "Protect {Machine:web1 To:b Policy:gold}", "protect"},
		{[]string{"failover", "web1"}, "Failover {Machine:web1 Point:latest Planned:false}", "failover"},
		{[]string{"failover", "web1", "--point", "p7", "--planned"}, "Failover {Machine:web1 Point:p7 Planned:true}", "failover"},
		{[]string{"failover", "--point", "2026-11-27T13:00:00Z", "web1"}, "Failover {Machine:web1 Point:2026-11-27T13:00:00Z Planned:false}", "failover"},
		{[]string{"failover", "change-point", "web1", "--point", "latest-app-consistent"}, "ChangePoint web1 latest-app-consistent", "change-point"},
		{[]string{"failover", "cancel", "web1"}, "CancelFailover web1", "cancel-failover"},
		{[]string{"commit", "web1"}, "Commit web1", "commit"},
		{[]string{"test-failover", "web1"}, "TestFailover web1 latest", "test-failover"},
		{[]string{"test-failover", "web1", "--point", "p3"}, "TestFailover web1 p3", "test-failover"},
		{[]string{"test-failover", "cleanup", "web1"}, "TestFailoverCleanup web1", "test-failover-cleanup"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			mk := job(tc.typ)
			f := &fakeService{
				ProtectFn:             func(rebound.ProtectRequest) (*rebound.Job, error) { return mk(), nil },
				FailoverFn:            func(rebound.FailoverRequest) (*rebound.Job, error) { return mk(), nil },
				ChangePointFn:         func(string, string) (*rebound.Job, error) { return mk(), nil },
				CancelFailoverFn:      func(string) (*rebound.Job, error) { return mk(), nil },
				CommitFn:              func(string) (*rebound.Job, error) { return mk(), nil },
				TestFailoverFn:        func(string, string) (*rebound.Job, error) { return mk(), nil },
				TestFailoverCleanupFn: func(string) (*rebound.Job, error) { return mk(), nil },
			}
			r := runCLI(t, f, tc.args...)
			wantCode(t, r, 0)
			wantCalls(t, f, tc.call)
			if !strings.Contains(r.stdout, "j1") || !strings.Contains(r.stdout, tc.typ) || !strings.Contains(r.stdout, "running") {
				t.Fatalf("table:\n%s", r.stdout)
			}
			f.calls = nil
			r = runCLI(t, f, append(tc.args, "-o", "json")...)
			wantCode(t, r, 0)
			wantCalls(t, f, tc.call)
			if j := decode[rebound.Job](t, r.stdout); j.ID != "j1" || j.Type != tc.typ || j.State != rebound.JobRunning {
				t.Fatalf("json %+v", j)
			}
		})
	}

	for _, args := range [][]string{
		{"protect", "web1"},                           // no --to
		{"failover", "change-point", "web1"},          // no --point
		{"failover", "web1", "--point", ""},           // empty point
		{"failover", "web1", "extra"},                 // extra arg
		{"failover", "web1", "--planned=maybe"},       // bad bool
		{"test-failover", "cleanup"},                  // no name
		{"commit"},                                    // no name
		{"protect", "web1", "--to", "b", "-o", "xml"}, // bad output
	} {
		f := &fakeService{}
		r := runCLI(t, f, args...)
		wantCode(t, r, ExitUsage)
		wantCalls(t, f)
	}
}

func TestPoints(t *testing.T) {
	pts := []rebound.RecoveryPoint{
		{ID: "p1", Time: t0, Kind: rebound.PointCrash, Seq: 10},
		{ID: "p2", Time: t0.Add(5 * time.Second), Kind: rebound.PointApp, Seq: 25},
	}
	f := &fakeService{
		ListPointsFn: func(string) ([]rebound.RecoveryPoint, error) { return pts, nil },
		CreatePointFn: func(m string, app bool) (*rebound.RecoveryPoint, error) {
			k := rebound.PointCrash
			if app {
				k = rebound.PointApp
			}
			return &rebound.RecoveryPoint{ID: "p3", Time: t0, Kind: k, Seq: 30}, nil
		},
	}
	r := runCLI(t, f, "points", "web1", "-o", "json")
	wantCode(t, r, 0)
	wantCalls(t, f, "ListPoints web1")
	var raw []map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &raw); err != nil {
		t.Fatal(err)
	}
	if len(raw) != 2 || raw[1]["id"] != "p2" || raw[1]["kind"] != "app" || raw[1]["seq"] != 25.0 || raw[1]["time"] != "2026-11-27T13:00:05Z" {
		t.Fatalf("json %v", raw)
	}
	if got := decode[[]rebound.RecoveryPoint](t, r.stdout); !reflect.DeepEqual(got, pts) {
		t.Fatalf("json %+v", got)
	}
	r = runCLI(t, f, "points", "web1")
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if len(lines) != 3 || strings.Join(strings.Fields(lines[2]), " ") != "p2 2026-11-27T13:00:05Z app 25" {
		t.Fatalf("table:\n%s", r.stdout)
	}

	f.calls = nil
	r = runCLI(t, f, "point", "create", "web1", "--app-consistent", "-o", "json")
	wantCode(t, r, 0)
	wantCalls(t, f, "CreatePoint web1 app=true")
	if p := decode[rebound.RecoveryPoint](t, r.stdout); p.ID != "p3" || p.Kind != rebound.PointApp {
		t.Fatalf("json %+v", p)
	}
	f.calls = nil
	r = runCLI(t, f, "point", "create", "web1")
	wantCalls(t, f, "CreatePoint web1 app=false")
	if !strings.Contains(r.stdout, "p3") || !strings.Contains(r.stdout, "crash") {
		t.Fatalf("table:\n%s", r.stdout)
	}
}

func TestJobCommands(t *testing.T) {
	jobs := []rebound.Job{
		{ID: "j1", Type: "protect", Machine: "web1", State: rebound.JobSucceeded, Progress: 1, CreatedAt: t0, Steps: []rebound.JobStep{{Name: "copy", State: rebound.JobSucceeded}}},
		{ID: "j2", Type: "failover", Machine: "db", State: rebound.JobRunning, Progress: 0.5, Step: "activate", CreatedAt: t0},
	}
	f := &fakeService{
		ListJobsFn: func() ([]rebound.Job, error) { return jobs, nil },
		GetJobFn: func(id string) (*rebound.Job, error) {
			for _, j := range jobs {
				if j.ID == id {
					return &j, nil
				}
			}
			return nil, rebound.Errorf(rebound.ENOTFOUND, "job %s not found", id)
		},
		CancelJobFn: func(id string) (*rebound.Job, error) {
			j := jobs[1]
			j.State = rebound.JobCancelled
			return &j, nil
		},
	}
	r := runCLI(t, f, "job", "list", "--machine", "db", "-o", "json")
	wantCode(t, r, 0)
	if js := decode[[]rebound.Job](t, r.stdout); len(js) != 1 || js[0].ID != "j2" {
		t.Fatalf("json %+v", js)
	}
	r = runCLI(t, f, "job", "list")
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if len(lines) != 3 || strings.Join(strings.Fields(lines[2]), " ") != "j2 failover db running 50% activate 2026-11-27T13:00:00Z" {
		t.Fatalf("table:\n%s", r.stdout)
	}
	r = runCLI(t, f, "job", "list", "--machine", "none", "-o", "json")
	if strings.TrimSpace(r.stdout) != "[]" {
		t.Fatalf("filtered json %q", r.stdout)
	}

	r = runCLI(t, f, "job", "show", "j1")
	wantCode(t, r, 0)
	for _, want := range []string{"protect", "succeeded", "100%", "Steps:", "copy"} {
		if !strings.Contains(r.stdout, want) {
			t.Fatalf("table lacks %q:\n%s", want, r.stdout)
		}
	}
	r = runCLI(t, f, "job", "show", "j9", "-o", "json")
	wantCode(t, r, ExitNotFound)
	var e struct {
		Error struct{ Code, Message string }
	}
	if err := json.Unmarshal([]byte(r.stdout), &e); err != nil || e.Error.Code != "not_found" || e.Error.Message != "job j9 not found" {
		t.Fatalf("json error %q (%v)", r.stdout, err)
	}

	r = runCLI(t, f, "job", "wait", "j1", "-o", "json")
	wantCode(t, r, 0)
	if j := decode[rebound.Job](t, r.stdout); j.State != rebound.JobSucceeded {
		t.Fatalf("json %+v", j)
	}

	f.calls = nil
	r = runCLI(t, f, "job", "cancel", "j2", "-o", "json")
	wantCode(t, r, 0)
	wantCalls(t, f, "CancelJob j2")
	if j := decode[rebound.Job](t, r.stdout); j.State != rebound.JobCancelled {
		t.Fatalf("json %+v", j)
	}
}

func TestEvents(t *testing.T) {
	f := &fakeService{ListEventsFn: func(m string) ([]rebound.Event, error) {
		return []rebound.Event{{ID: 1, Time: t0, Machine: m, Kind: "health", Message: "lag above RPO"}}, nil
	}}
	r := runCLI(t, f, "events", "--machine", "web1")
	wantCode(t, r, 0)
	wantCalls(t, f, "ListEvents web1")
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if len(lines) != 2 || strings.Join(strings.Fields(lines[1]), " ") != "2026-11-27T13:00:00Z health web1 - lag above RPO" {
		t.Fatalf("table:\n%s", r.stdout)
	}
	f.calls = nil
	r = runCLI(t, f, "events", "-o", "json")
	wantCalls(t, f, "ListEvents ")
	if evs := decode[[]rebound.Event](t, r.stdout); len(evs) != 1 || evs[0].Message != "lag above RPO" {
		t.Fatalf("json %+v", evs)
	}
}

func TestVersion(t *testing.T) {
	f := &fakeService{}
	r := runWith(t, f, "version") // needs no server
	wantCode(t, r, 0)
	if !strings.HasPrefix(r.stdout, "rebound "+Version) {
		t.Fatalf("stdout %q", r.stdout)
	}
	r = runWith(t, f, "version", "-o", "json")
	if v := decode[VersionInfo](t, r.stdout); v.Version != Version || v.Go == "" {
		t.Fatalf("json %+v", v)
	}
	wantCalls(t, f)
}

// TestErrorExitCodes checks every rebound error code's exit code and the
// two error outputs.
func TestErrorExitCodes(t *testing.T) {
	for code, exit := range map[string]int{
		rebound.EINVALID:      2,
		rebound.ENOTFOUND:     3,
		rebound.ECONFLICT:     4,
		rebound.EUNAVAILABLE:  5,
		rebound.EUNAUTHORIZED: 6,
		rebound.ENOSPACE:      7,
		rebound.EINTERNAL:     1,
	} {
		f := &fakeService{CommitFn: func(string) (*rebound.Job, error) {
			return nil, rebound.Errorf(code, "commit says %s", code)
		}}
		r := runCLI(t, f, "commit", "web1")
		wantCode(t, r, exit)
		// A refused token also says where it came from (TestBadTokenSource).
		if !strings.HasPrefix(r.stderr, "rebound: commit says "+code) || code != rebound.EUNAUTHORIZED && r.stderr != "rebound: commit says "+code+"\n" || r.stdout != "" {
			t.Fatalf("%s: stderr %q stdout %q", code, r.stderr, r.stdout)
		}
		r = runCLI(t, f, "commit", "web1", "-o", "json")
		wantCode(t, r, exit)
		var e struct {
			Error struct {
				Code    string `json:"code"`
				Message string `json:"message"`
			} `json:"error"`
		}
		if err := json.Unmarshal([]byte(r.stdout), &e); err != nil || e.Error.Code != code || !strings.HasPrefix(e.Error.Message, "commit says "+code) {
			t.Fatalf("%s: json %q (%v)", code, r.stdout, err)
		}
	}
	// A plain error (e.g. a transport bug) is internal: exit 1.
	f := &fakeService{CommitFn: func(string) (*rebound.Job, error) { return nil, io.ErrUnexpectedEOF }}
	wantCode(t, runCLI(t, f, "commit", "web1"), ExitFailed)

	// Usage errors from cobra: unknown command/flag, with -o json too.
	for _, args := range [][]string{{"bogus"}, {"machine", "bogus"}, {"machine", "list", "--bogus"}, {"bogus", "-o", "json"}} {
		r := runCLI(t, &fakeService{}, args...)
		wantCode(t, r, ExitUsage)
		if !strings.HasPrefix(r.stderr, "rebound: ") || !strings.Contains(r.stderr, "--help") {
			t.Fatalf("%q: stderr %q", args, r.stderr)
		}
		if args[len(args)-1] == "json" && !strings.Contains(r.stdout, `"code":"invalid"`) {
			t.Fatalf("%q: stdout %q", args, r.stdout)
		}
	}
	// Help is not an error.
	r := runCLI(t, &fakeService{}, "--help")
	wantCode(t, r, 0)
	if !strings.Contains(r.stdout, "Exit codes:") || !strings.Contains(r.stdout, "6  unauthorized") {
		t.Fatalf("help lacks exit codes:\n%s", r.stdout)
	}
}

func TestServiceFactoryError(t *testing.T) {
	t.Setenv("XDG_CONFIG_HOME", t.TempDir())
	t.Setenv(EnvServer, "https://x")
	var out, errb bytes.Buffer
	c := NewCLI(nil, &out, &errb)
	c.NewService = func(*ClientConfig) (rebound.Service, error) {
		return nil, rebound.Errorf(rebound.EUNAVAILABLE, "dial x: connection refused")
	}
	if code := c.Run(context.Background(), []string{"machine", "list"}); code != ExitUnavailable {
		t.Fatalf("code %d", code)
	}
	if errb.String() != "rebound: dial x: connection refused\n" {
		t.Fatalf("stderr %q", errb.String())
	}
}

func TestExtraCommands(t *testing.T) {
	saved := extraCommands
	t.Cleanup(func() { extraCommands = saved })
	var ran []string
	extraCommands = append([]func(*CLI) *cobra.Command(nil), // without server.go, site.go, up.go

		// Like site.go: a runnable "site" with flags and its own subcommand.
		func(c *CLI) *cobra.Command {
			var name string
			site := &cobra.Command{Use: "site", Args: cobra.NoArgs, RunE: func(*cobra.Command, []string) error {
				ran = append(ran, "site --name "+name)
				return nil
			}}
			site.Flags().StringVar(&name, "name", "", "")
			site.AddCommand(&cobra.Command{Use: "run", RunE: func(*cobra.Command, []string) error {
				ran = append(ran, "site run")
				return nil
			}})
			return site
		},
		func(c *CLI) *cobra.Command {
			return &cobra.Command{Use: "up", RunE: func(*cobra.Command, []string) error {
				ran = append(ran, "up")
				return rebound.Errorf(rebound.EUNAVAILABLE, "port busy")
			}}
		},
		// A runnable command merging into one of ours that is not a group
		// keeps ours and gains the subcommand.
		func(c *CLI) *cobra.Command {
			cmd := &cobra.Command{Use: "commit", RunE: func(*cobra.Command, []string) error { return nil }}
			cmd.AddCommand(&cobra.Command{Use: "status", RunE: func(*cobra.Command, []string) error {
				ran = append(ran, "commit status")
				return nil
			}})
			return cmd
		},
	)
	f := &fakeService{ListSitesFn: func() ([]rebound.Site, error) { return nil, nil }}
	wantCode(t, runCLI(t, f, "site", "--name", "a"), 0)
	wantCode(t, runCLI(t, f, "site", "run"), 0)
	wantCode(t, runCLI(t, f, "site", "list"), 0) // our verbs stay under the merged command
	wantCalls(t, f, "ListSites")
	wantCode(t, runCLI(t, f, "up"), ExitUnavailable)
	wantCode(t, runCLI(t, f, "commit", "status"), 0)
	wantCode(t, runCLI(t, f, "site", "bogus"), ExitUsage)
	f.CommitFn = func(string) (*rebound.Job, error) { return jobFn("commit", "web1"), nil }
	wantCode(t, runCLI(t, f, "commit", "web1"), 0)
	if !reflect.DeepEqual(ran, []string{"site --name a", "site run", "up", "commit status"}) {
		t.Fatalf("ran %q", ran)
	}
}

func TestRunAndHelp(t *testing.T) {
	var out, errb bytes.Buffer
	if code := Run(context.Background(), []string{"version"}, nil, &out, &errb); code != 0 || !strings.HasPrefix(out.String(), "rebound ") {
		t.Fatalf("code %d out %q err %q", code, out.String(), errb.String())
	}
	// A bare group prints its verbs.
	r := runCLI(t, &fakeService{}, "machine")
	wantCode(t, r, 0)
	for _, verb := range []string{"create", "list", "show", "delete"} {
		if !strings.Contains(r.stdout, verb) {
			t.Fatalf("help lacks %s:\n%s", verb, r.stdout)
		}
	}
	// A pipe is not a terminal: --wait prints lines, not a bar.
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	defer pw.Close()
	if isTerminal(pw) || isTerminal(&out) {
		t.Fatal("pipe or buffer taken for a terminal")
	}
}

func TestMachineShowFailedOver(t *testing.T) {
	m := sampleMachine()
	m.State, m.ActiveSite, m.TestFailover = rebound.MachineFailedOver, "b", nil
	m.Failover = &rebound.FailoverInfo{FromSite: "a", ToSite: "b", Planned: true,
		Point: rebound.RecoveryPoint{ID: "p9", Time: t0, Kind: rebound.PointApp, Seq: 90}}
	f := &fakeService{GetMachineFn: func(string) (*rebound.Machine, error) { return m, nil }}
	r := runCLI(t, f, "machine", "show", "web1")
	wantCode(t, r, 0)
	if !strings.Contains(r.stdout, "a -> b, planned, point p9 (app, 2026-11-27T13:00:00Z)") || strings.Contains(r.stdout, "Test failover") {
		t.Fatalf("table:\n%s", r.stdout)
	}
	r = runCLI(t, f, "machine", "show", "web1", "-o", "json")
	if got := decode[rebound.Machine](t, r.stdout); got.Failover == nil || got.Failover.Point.ID != "p9" || !got.Failover.Planned {
		t.Fatalf("json %+v", got)
	}
}

// TestRegisteredCommands: with the package's real server, site and up
// commands registered, our verbs under "site" still work.
func TestRegisteredCommands(t *testing.T) {
	f := &fakeService{
		ListSitesFn:         func() ([]rebound.Site, error) { return []rebound.Site{{Name: "a"}}, nil },
		CreateEnrollTokenFn: func(site string) (string, error) { return "tok-" + site, nil },
	}
	wantCode(t, runCLI(t, f, "site", "list"), 0)
	r := runCLI(t, f, "site", "token", "edge", "--token", "api-token")
	wantCode(t, r, 0)
	if r.stdout != "tok-edge\n" {
		t.Fatalf("stdout %q", r.stdout)
	}
	wantCalls(t, f, "ListSites", "CreateEnrollToken edge")
}
