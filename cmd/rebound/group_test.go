package main

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/pem"
	"io"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	rhttp "github.com/rebound-dr/rebound/http"
)

// groupFake answers every lifecycle verb with a running job (or a point,
// points, a report) naming what it was called with.
func groupFake() *fakeService {
	mk := func(typ, name string) (*rebound.Job, error) { return jobFn(typ, name), nil }
	return &fakeService{
		ListPointsFn: func(m string) ([]rebound.RecoveryPoint, error) {
			return []rebound.RecoveryPoint{{ID: "p1", Time: t0, Kind: rebound.PointCrash, Seq: 10}, {ID: "p2", Time: t0.Add(5 * time.Second), Kind: rebound.PointApp, Seq: 25}}, nil
		},
		CreatePointFn: func(m string, app bool) (*rebound.RecoveryPoint, error) {
			return &rebound.RecoveryPoint{ID: "p3", Time: t0, Kind: rebound.PointApp, Seq: 30}, nil
		},
		FailoverFn:            func(r rebound.FailoverRequest) (*rebound.Job, error) { return mk("failover", r.Machine) },
		ChangePointFn:         func(m, p string) (*rebound.Job, error) { return mk("change-point", m) },
		CancelFailoverFn:      func(m string) (*rebound.Job, error) { return mk("cancel-failover", m) },
		CommitFn:              func(m string) (*rebound.Job, error) { return mk("commit", m) },
		TestFailoverFn:        func(m, p string) (*rebound.Job, error) { return mk("test-failover", m) },
		TestFailoverCleanupFn: func(m string) (*rebound.Job, error) { return mk("test-failover-cleanup", m) },
		ReprotectFn:           func(r rebound.ReprotectRequest) (*rebound.Job, error) { return mk("reprotect", r.Machine) },
		FailbackFn:            func(r rebound.FailoverRequest) (*rebound.Job, error) { return mk("failback", r.Machine) },
		UnprotectFn:           func(r rebound.UnprotectRequest) (*rebound.Job, error) { return mk("unprotect", r.Machine) },
		PreflightFn: func(m, op string) (*rebound.PreflightReport, error) {
			return &rebound.PreflightReport{Machine: m, Operation: "failover", OK: true, Checks: []rebound.PreflightCheck{{Name: "lag", OK: true}}}, nil
		},
		ProtectFn: func(r rebound.ProtectRequest) (*rebound.Job, error) { return mk("protect", r.Machine) },
	}
}

// groupVerbs: every lifecycle verb with --group db, and the call it must
// make (the machine verb's, with the group's name).
var groupVerbs = []struct {
	args []string
	call string
}{
	{[]string{"points", "--group", "db"}, "ListPoints db"},
	{[]string{"point", "create", "--group", "db"}, "CreatePoint db app=false"},
	{[]string{"point", "create", "--group", "db", "--app-consistent"}, "CreatePoint db app=true"},
	{[]string{"failover", "--group", "db"}, "Failover {Machine:db Point:latest Planned:false}"},
	{[]string{"failover", "--group=db", "--planned"}, "Failover {Machine:db Point:latest Planned:true}"},
	{[]string{"failover", "--point", "p7", "--group", "db"}, "Failover {Machine:db Point:p7 Planned:false}"},
	{[]string{"failover", "change-point", "--group", "db", "--point", "p8"}, "ChangePoint db p8"},
	{[]string{"failover", "cancel", "--group", "db"}, "CancelFailover db"},
	{[]string{"commit", "--group", "db"}, "Commit db"},
	{[]string{"test-failover", "--group", "db", "--point", "p3"}, "TestFailover db p3"},
	{[]string{"test-failover", "cleanup", "--group", "db"}, "TestFailoverCleanup db"},
	{[]string{"reprotect", "--group", "db", "--verify"}, "Reprotect {Machine:db To: Policy: Verify:true WaitReady:0s Keep:}"},
	{[]string{"failback", "--group", "db"}, "Failback {Machine:db Point: Planned:true}"},
	{[]string{"failback", "--group", "db", "--point", "latest"}, "Failback {Machine:db Point:latest Planned:false}"},
	{[]string{"preflight", "--group", "db", "--operation", "failover"}, "Preflight db failover"},
	{[]string{"unprotect", "--group", "db", "--keep-replica"}, "Unprotect {Machine:db KeepReplica:true}"},
}

// TestGroupFlagVerbs: --group G reaches the machine verb's client call with
// the group's name, in table and JSON output.
func TestGroupFlagVerbs(t *testing.T) {
	for _, tc := range groupVerbs {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			f := groupFake()
			r := runCLI(t, f, tc.args...)
			wantCode(t, r, 0)
			wantCalls(t, f, tc.call)
			f.calls = nil
			r = runCLI(t, f, append(tc.args, "-o", "json")...)
			wantCode(t, r, 0)
			wantCalls(t, f, tc.call)
			var v map[string]any
			var list []any
			if json.Unmarshal([]byte(r.stdout), &v) != nil && json.Unmarshal([]byte(r.stdout), &list) != nil {
				t.Fatalf("not JSON: %s", r.stdout)
			}
			if v != nil && v["machine"] != nil && v["machine"] != "db" {
				t.Fatalf("json names %v, want db: %s", v["machine"], r.stdout)
			}
		})
	}
}

// TestGroupFlagUsage: a lifecycle verb wants NAME or --group G, exactly
// one; anything else is a usage error (exit 2) and calls nothing.
func TestGroupFlagUsage(t *testing.T) {
	verbs := [][]string{{"points"}, {"point", "create"}, {"failover"}, {"failover", "change-point", "--point", "p1"},
		{"failover", "cancel"}, {"commit"}, {"test-failover"}, {"test-failover", "cleanup"}, {"reprotect"},
		{"failback"}, {"preflight"}, {"unprotect"}}
	for _, v := range verbs {
		for _, tc := range []struct {
			extra []string
			msg   string
		}{
			{[]string{"web1", "--group", "db"}, "give a machine NAME or --group G, not both"},
			{nil, "missing NAME (or --group G for a replication group)"},
			{[]string{"--group", ""}, "--group must not be empty"},
			{[]string{"--group", "db", "extra"}, "give a machine NAME or --group G, not both"},
			{[]string{"web1", "web2"}, `unexpected argument "web2"`},
		} {
			args := append(append([]string{}, v...), tc.extra...)
			f := groupFake()
			r := runCLI(t, f, args...)
			wantCode(t, r, ExitUsage)
			wantCalls(t, f)
			if !strings.Contains(r.stderr, tc.msg) {
				t.Errorf("%q: stderr %q, want %q", args, r.stderr, tc.msg)
			}
			r = runCLI(t, f, append(args, "-o", "json")...)
			if r.code != ExitUsage || !strings.Contains(r.stdout, `"code":"invalid"`) {
				t.Errorf("%q -o json: %d %q", args, r.code, r.stdout)
			}
			wantCalls(t, f)
		}
	}
	// Every lifecycle verb has --group (the list above is all of them).
	root := NewCLI(nil, nil, nil).Command()
	for _, v := range verbs {
		cmd, _, err := root.Find(v[:1+boolInt(len(v) > 1 && !strings.HasPrefix(v[1], "-"))])
		if err != nil || cmd.Flags().Lookup("group") == nil || !strings.Contains(cmd.Use, "NAME|--group G") {
			t.Errorf("%q: no --group (%v)", v, err)
		}
	}
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// TestGroupPointsJSON: `points --group G -o json` prints exactly what
// `points NAME -o json` prints, [{id,time,kind,seq}]; a paged listing
// repeats --group, not a NAME, in its next-page command.
func TestGroupPointsJSON(t *testing.T) {
	f := groupFake()
	byName := runCLI(t, f, "points", "db", "-o", "json")
	byGroup := runCLI(t, f, "points", "--group", "db", "-o", "json")
	wantCode(t, byGroup, 0)
	wantCalls(t, f, "ListPoints db", "ListPoints db")
	if byGroup.stdout != byName.stdout {
		t.Fatalf("--group:\n%s\nNAME:\n%s", byGroup.stdout, byName.stdout)
	}
	var raw []map[string]any
	if err := json.Unmarshal([]byte(byGroup.stdout), &raw); err != nil {
		t.Fatal(err)
	}
	if len(raw) != 2 || raw[0]["id"] != "p1" || raw[0]["time"] != "2026-11-27T13:00:00Z" || raw[0]["kind"] != "crash" || raw[1]["kind"] != "app" {
		t.Fatalf("json %v", raw)
	}

	f.QueryPointsFn = func(m string, q rebound.ListQuery) (*rebound.PointPage, error) {
		return &rebound.PointPage{Points: []rebound.RecoveryPoint{{ID: "p1", Time: t0, Kind: rebound.PointApp, Seq: 10}}, Next: "10"}, nil
	}
	f.calls = nil
	r := runCLI(t, f, "points", "--group", "db", "--kind", "app", "--limit", "1")
	wantCode(t, r, 0)
	wantCalls(t, f, "QueryPoints db kind=app limit=1")
	if want := "rebound: more points follow: rebound points --group=db --kind=app --limit=1 --cursor=10\n"; r.stderr != want {
		t.Fatalf("stderr %q\nwant   %q", r.stderr, want)
	}
}

func sampleGroups() []rebound.Group {
	return []rebound.Group{
		{Name: "db", Machines: []string{"db1", "db2"}, State: rebound.MachineProtected, ActiveSite: "a", SourceSite: "a", TargetSite: "b",
			Policy: "gold", Health: rebound.HealthWarning, HealthReason: "lag 45s", LagSeconds: 45.25,
			Protection: &rebound.Protection{SourceSite: "a", TargetSite: "b", Policy: "gold", ReplState: "streaming", LagSeconds: 45.25}},
		{Name: "new", State: rebound.MachineUnprotected, ActiveSite: "a", Health: rebound.HealthNormal},
	}
}

// TestGroupCommands: group list, show and remove-machine, table and JSON,
// and their errors.
func TestGroupCommands(t *testing.T) {
	f := &fakeService{
		ListGroupsFn: func() ([]rebound.Group, error) { return sampleGroups(), nil },
		GetGroupFn: func(name string) (*rebound.Group, error) {
			if name != "db" {
				return nil, rebound.Errorf(rebound.ENOTFOUND, "group %q not found", name)
			}
			g := sampleGroups()[0]
			return &g, nil
		},
		RemoveGroupMemberFn: func(g, m string) (*rebound.Job, error) { return jobFn("group-remove", m), nil },
	}
	r := runCLI(t, f, "group", "list")
	wantCode(t, r, 0)
	wantCalls(t, f, "ListGroups")
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	for i, want := range []string{"NAME MACHINES STATE SOURCE TARGET HEALTH LAG", "db db1,db2 protected a b warning 45.3s", "new - unprotected - - normal -"} {
		if i >= len(lines) || strings.Join(strings.Fields(lines[i]), " ") != want {
			t.Fatalf("line %d: want %q in:\n%s", i, want, r.stdout)
		}
	}
	r = runCLI(t, f, "group", "list", "-o", "json")
	var raw []map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &raw); err != nil {
		t.Fatal(err)
	}
	if len(raw) != 2 || raw[0]["name"] != "db" || !reflect.DeepEqual(raw[0]["machines"], []any{"db1", "db2"}) ||
		raw[0]["sourceSite"] != "a" || raw[0]["targetSite"] != "b" || raw[0]["health"] != "warning" || raw[0]["lagSeconds"] != 45.25 ||
		!reflect.DeepEqual(raw[1]["machines"], []any{}) {
		t.Fatalf("json %s", r.stdout)
	}
	if got := decode[[]rebound.Group](t, r.stdout); got[0].Protection.ReplState != "streaming" {
		t.Fatalf("json %+v", got)
	}

	f.calls = nil
	r = runCLI(t, f, "group", "show", "db", "-o", "json")
	wantCode(t, r, 0)
	wantCalls(t, f, "GetGroup db")
	if g := decode[rebound.Group](t, r.stdout); !reflect.DeepEqual(g, sampleGroups()[0]) {
		t.Fatalf("json %+v", g)
	}
	r = runCLI(t, f, "group", "show", "db")
	for _, want := range []string{"Machines:", "db1, db2", "warning (lag 45s)", "a -> b, policy gold", "streaming, lag 45.3s"} {
		if !strings.Contains(r.stdout, want) {
			t.Fatalf("table lacks %q:\n%s", want, r.stdout)
		}
	}
	r = runCLI(t, f, "group", "show", "nope")
	wantCode(t, r, ExitNotFound)
	if r.stderr != "rebound: group \"nope\" not found\n" {
		t.Fatalf("stderr %q", r.stderr)
	}

	f.calls = nil
	r = runCLI(t, f, "group", "remove-machine", "db", "db2", "-o", "json")
	wantCode(t, r, 0)
	wantCalls(t, f, "RemoveGroupMember db db2")
	if j := decode[rebound.Job](t, r.stdout); j.ID != "j1" || j.Machine != "db2" {
		t.Fatalf("json %+v", j)
	}
	// --wait follows the job to its end.
	f.GetJobFn = func(id string) (*rebound.Job, error) {
		j := jobFn("group-remove", "db2")
		j.State = rebound.JobSucceeded
		return j, nil
	}
	f.calls = nil
	r = runCLI(t, f, "group", "remove-machine", "db", "db2", "--wait")
	wantCode(t, r, 0)
	if c := f.Calls(); len(c) < 2 || c[0] != "RemoveGroupMember db db2" || c[len(c)-1] != "GetJob j1" {
		t.Fatalf("calls %q", c)
	}
	f.RemoveGroupMemberFn = func(g, m string) (*rebound.Job, error) {
		return nil, rebound.Errorf(rebound.ECONFLICT, "db2 is the last machine of group db: unprotect the group (rebound unprotect --group db)")
	}
	r = runCLI(t, f, "group", "remove-machine", "db", "db2")
	wantCode(t, r, ExitConflict)
	if !strings.Contains(r.stderr, "rebound unprotect --group db") {
		t.Fatalf("stderr %q", r.stderr)
	}

	for _, args := range [][]string{
		{"group", "remove-machine", "db"},
		{"group", "remove-machine", "db", "db2", "db3"},
		{"group", "show"},
		{"group", "list", "x"},
		{"group", "bogus"},
	} {
		f.calls = nil
		r := runCLI(t, f, args...)
		wantCode(t, r, ExitUsage)
		wantCalls(t, f)
	}

	// A client without groups says so (exit 1), as for plans.
	r = runCLI(t, plainService{f}, "group", "list")
	wantCode(t, r, ExitFailed)
	if !strings.Contains(r.stderr, "cannot manage replication groups") {
		t.Fatalf("stderr %q", r.stderr)
	}
}

// TestProtectGroup: protect --group sets ProtectRequest.Group.
func TestProtectGroup(t *testing.T) {
	f := groupFake()
	r := runCLI(t, f, "protect", "db2", "--to", "b", "--group", "db", "-o", "json")
	wantCode(t, r, 0)
	wantCalls(t, f, "Protect {Machine:db2 To:b Policy: Group:db}")
	f.calls = nil
	for _, args := range [][]string{{"protect", "db2", "--to", "b", "--group", ""}, {"protect", "--group", "db", "--to", "b"}} {
		r = runCLI(t, f, args...)
		wantCode(t, r, ExitUsage)
		wantCalls(t, f)
	}
}

// TestGroupMemberRefused: the server's refusal of a member's machine verb
// reaches the user with its exit code (4) and the --group form.
func TestGroupMemberRefused(t *testing.T) {
	f := &fakeService{CommitFn: func(m string) (*rebound.Job, error) {
		return nil, rebound.Errorf(rebound.ECONFLICT, "machine %s is in replication group db: run rebound commit --group db", m)
	}}
	r := runCLI(t, f, "commit", "db1")
	wantCode(t, r, ExitConflict)
	if r.stderr != "rebound: machine db1 is in replication group db: run rebound commit --group db\n" {
		t.Fatalf("stderr %q", r.stderr)
	}
}

// TestMachineGroupShown: machine list has a GROUP column when a machine is
// in a group; machine show prints the group.
func TestMachineGroupShown(t *testing.T) {
	m := sampleMachine()
	m.Group = "db"
	f := &fakeService{
		ListMachinesFn: func() ([]rebound.Machine, error) {
			return []rebound.Machine{*m, {Name: "lone", State: rebound.MachineUnprotected, ActiveSite: "a", HomeSite: "a", Health: rebound.HealthNormal}}, nil
		},
		ListPoliciesFn: func() ([]rebound.Policy, error) { return []rebound.Policy{rebound.DefaultPolicy()}, nil },
		GetMachineFn:   func(string) (*rebound.Machine, error) { return m, nil },
	}
	r := runCLI(t, f, "machine", "list")
	wantCode(t, r, 0)
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if got := strings.Fields(lines[0]); !reflect.DeepEqual(got, []string{"NAME", "GROUP", "STATE", "DIRECTION", "HEALTH", "LAG/RPO", "LAST-POINT", "HOME", "DISKS"}) {
		t.Fatalf("header %q", got)
	}
	if f1, f2 := strings.Fields(lines[1]), strings.Fields(lines[2]); f1[1] != "db" || f1[2] != "protected" || f2[1] != "-" || f2[2] != "unprotected" {
		t.Fatalf("rows:\n%s", r.stdout)
	}
	r = runCLI(t, f, "machine", "show", "web1")
	wantCode(t, r, 0)
	if !strings.Contains(r.stdout, "Group:") || !strings.Contains(r.stdout, "db (its verbs take --group db)") {
		t.Fatalf("show:\n%s", r.stdout)
	}
	r = runCLI(t, f, "machine", "show", "web1", "-o", "json")
	if got := decode[rebound.Machine](t, r.stdout); got.Group != "db" {
		t.Fatalf("json %+v", got)
	}
}

// TestGroupCompletion: --group and the group verbs' first argument complete
// group names; --point after --group G completes G's points.
func TestGroupCompletion(t *testing.T) {
	f := &fakeService{
		ListGroupsFn: func() ([]rebound.Group, error) { return sampleGroups(), nil },
		ListPointsFn: func(m string) ([]rebound.RecoveryPoint, error) {
			if m != "db" {
				return nil, rebound.Errorf(rebound.ENOTFOUND, "no %s", m)
			}
			return []rebound.RecoveryPoint{{ID: "p10"}, {ID: "p20"}}, nil
		},
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"group", "show", ""}, "db new"},
		{[]string{"group", "remove-machine", "d"}, "db"},
		{[]string{"failover", "--group", ""}, "db new"},
		{[]string{"protect", "web1", "--group", "n"}, "new"},
		{[]string{"failover", "--group", "db", "--point", ""}, "latest latest-processed latest-app-consistent p20 p10"},
	} {
		r := runCLI(t, f, append([]string{"__complete"}, c.args...)...)
		wantCode(t, r, 0)
		lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
		if got := strings.Join(lines[:len(lines)-1], " "); got != c.want {
			t.Fatalf("complete %q: %q, want %q", c.args, got, c.want)
		}
	}
}

// TestGroupOverHTTP: the group verbs and --group through the real HTTP
// client and server; a server without groups answers exit 1 with 501's
// message.
func TestGroupOverHTTP(t *testing.T) {
	f := groupFake()
	f.ListGroupsFn = func() ([]rebound.Group, error) { return sampleGroups(), nil }
	f.RemoveGroupMemberFn = func(g, m string) (*rebound.Job, error) { return jobFn("group-remove", m), nil }
	f.QueryPointsFn = func(m string, q rebound.ListQuery) (*rebound.PointPage, error) {
		return &rebound.PointPage{Points: []rebound.RecoveryPoint{{ID: "p1", Time: t0, Kind: rebound.PointCrash, Seq: 1}}}, nil
	}
	auth := func(ctx context.Context, tok string) (rebound.Principal, error) {
		return rebound.Principal{User: "admin", Role: rebound.RoleAdmin, Via: "token"}, nil
	}
	with := httptest.NewTLSServer((&rhttp.Server{Service: f, Loop: f, Catalog: f, Groups: f, Authenticate: auth}).Handler())
	defer with.Close()
	without := httptest.NewTLSServer((&rhttp.Server{Service: f, Loop: f, Catalog: f, Authenticate: auth}).Handler())
	defer without.Close()
	dir := clearEnv(t)
	ca := filepath.Join(dir, "ca.crt")
	os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: with.Certificate().Raw}), 0o644)
	run := func(url string, args ...string) result {
		var out, errb bytes.Buffer
		c := NewCLI(nil, &out, &errb)
		c.PollInterval = time.Millisecond
		c.IsTerminal = func(io.Writer) bool { return false }
		code := c.Run(context.Background(), append(args, "--server", url, "--token", "t", "--ca", ca))
		return result{code, out.String(), errb.String()}
	}
	r := run(with.URL, "group", "list", "-o", "json")
	wantCode(t, r, 0)
	if gs := decode[[]rebound.Group](t, r.stdout); len(gs) != 2 || gs[0].Name != "db" || len(gs[0].Machines) != 2 {
		t.Fatalf("json %+v", gs)
	}
	wantCode(t, run(with.URL, "protect", "db3", "--to", "b", "--group", "db"), 0)
	wantCode(t, run(with.URL, "failover", "--group", "db", "--planned"), 0)
	r = run(with.URL, "points", "--group", "db", "-o", "json")
	wantCode(t, r, 0)
	if pts := decode[[]rebound.RecoveryPoint](t, r.stdout); len(pts) != 1 || pts[0].ID != "p1" {
		t.Fatalf("points json %s", r.stdout)
	}
	wantCode(t, run(with.URL, "preflight", "--group", "db"), 0)
	wantCode(t, run(with.URL, "group", "remove-machine", "db", "db2"), 0)
	wantCalls(t, f, "ListGroups", "Protect {Machine:db3 To:b Policy: Group:db}", "Failover {Machine:db Point:latest Planned:true}",
		"QueryPoints db limit=10000", "Preflight db ", "RemoveGroupMember db db2")

	f.calls = nil
	for _, args := range [][]string{{"group", "list"}, {"group", "show", "db"}, {"group", "remove-machine", "db", "db2"}} {
		r := run(without.URL, args...)
		wantCode(t, r, ExitFailed)
		if !strings.Contains(r.stderr, "is not implemented by this server (it serves no replication groups)") {
			t.Fatalf("%q: stderr %q", args, r.stderr)
		}
	}
	wantCalls(t, f)
}
