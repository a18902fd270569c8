package http

import (
	"context"
	"encoding/json"
	"net/http/httptest"
	"reflect"
	"sort"
	"strings"
	"testing"

	"github.com/rebound-dr/rebound"
)

func testGroup() *rebound.Group {
	m := testMachine()
	return &rebound.Group{Name: "db", Machines: []string{"db1", "db2"}, State: rebound.MachineFailedOver,
		ActiveSite: "b", SourceSite: "a", TargetSite: "b", Policy: "gold", Health: rebound.HealthWarning,
		HealthReason: "lag 45s", LagSeconds: 45.5, Protection: m.Protection, Failover: m.Failover,
		TestFailover: m.TestFailover, CreatedAt: "2026-05-06T07:08:01Z"}
}

// TestGroupRoundTrip: list, show and remove-machine through the client
// reach the GroupService with the path's names and come back unchanged.
func TestGroupRoundTrip(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	c, f := e.client, e.fake
	f.group, f.groups, f.job = testGroup(), []rebound.Group{*testGroup(), {Name: "web", Machines: []string{"w1"}, State: rebound.MachineProtected}}, testJob()

	gs, err := c.ListGroups(ctx)
	if err != nil {
		t.Fatal(err)
	}
	same(t, gs, f.groups)
	check(t, f, "ListGroups")
	g, err := c.GetGroup(ctx, "db")
	if err != nil {
		t.Fatal(err)
	}
	same(t, g, f.group)
	check(t, f, "GetGroup", "db")
	if _, err := c.GetGroup(ctx, "nope"); rebound.ErrorCode(err) != rebound.ENOTFOUND || err.Error() != `group "nope" not found` {
		t.Fatalf("unknown group: %v", err)
	}
	j, err := c.RemoveGroupMember(ctx, "db/x", "db 2")
	if err != nil {
		t.Fatal(err)
	}
	same(t, j, f.job)
	check(t, f, "RemoveGroupMember", "db/x", "db 2")

	// The wire: 202 with the job for remove-machine, and the group's JSON
	// field names are the schema's.
	auth := "Bearer " + testToken
	st, _, er, body := e.raw(t, "DELETE", "/api/v1/groups/db/machines/db2", auth, "", nil)
	if st != 202 || !strings.Contains(string(body), `"id":"j-0123abcd"`) {
		t.Fatalf("remove-machine: %d %+v %s", st, er, body)
	}
	check(t, f, "RemoveGroupMember", "db", "db2")
	_, _, _, body = e.raw(t, "GET", "/api/v1/groups/db", auth, "", nil)
	var raw map[string]any
	if err := json.Unmarshal(body, &raw); err != nil {
		t.Fatal(err)
	}
	var keys []string
	for k := range raw {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	want := []string{"activeSite", "createdAt", "failover", "health", "healthReason", "lagSeconds", "machines", "name",
		"policy", "protection", "sourceSite", "state", "targetSite", "testFailover"}
	if !reflect.DeepEqual(keys, want) || raw["lagSeconds"] != 45.5 || !reflect.DeepEqual(raw["machines"], []any{"db1", "db2"}) {
		t.Fatalf("group JSON %s", body)
	}

	// Empty lists are [], never null: no groups, and a group without machines.
	f.groups = []rebound.Group{{Name: "e"}}
	if _, _, _, body = e.raw(t, "GET", "/api/v1/groups", auth, "", nil); !strings.Contains(string(body), `"machines":[]`) {
		t.Fatalf("list: %s", body)
	}
	f.groups = nil
	if _, _, _, body = e.raw(t, "GET", "/api/v1/groups", auth, "", nil); strings.TrimSpace(string(body)) != "[]" {
		t.Fatalf("empty list: %s", body)
	}

	// Service errors keep their codes (a member's verb is refused with ECONFLICT).
	f.err = rebound.Errorf(rebound.ECONFLICT, "db2 is in group db: use --group db")
	if st, _, er, _ := e.raw(t, "DELETE", "/api/v1/groups/db/machines/db2", auth, "", nil); st != 409 || er.Error.Code != rebound.ECONFLICT {
		t.Fatalf("conflict: %d %+v", st, er)
	}
}

// TestProtectGroup: ProtectRequest.Group travels as the body's "group".
func TestProtectGroup(t *testing.T) {
	e := newEnv(t)
	e.fake.job = testJob()
	req := rebound.ProtectRequest{Machine: "db2", To: "b", Policy: "gold", Group: "db"}
	if _, err := e.client.Protect(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	check(t, e.fake, "Protect", req)
	st, _, er, _ := e.raw(t, "POST", "/api/v1/machines/db3/protect", "Bearer "+testToken, "", strings.NewReader(`{"to":"b","group":"db"}`))
	if st != 202 {
		t.Fatalf("status %d %+v", st, er)
	}
	check(t, e.fake, "Protect", rebound.ProtectRequest{Machine: "db3", To: "b", Group: "db"})
	// A lone protect sends no group key (older servers refuse unknown keys).
	if _, err := e.client.Protect(context.Background(), rebound.ProtectRequest{Machine: "w", To: "b"}); err != nil {
		t.Fatal(err)
	}
	check(t, e.fake, "Protect", rebound.ProtectRequest{Machine: "w", To: "b"})
}

// groupVerbCases are the group routes of the lifecycle verbs: request,
// status and the call the service must see with the group's name.
var groupVerbCases = []struct {
	method, path, body string
	status             int
	call               string
	args               []any
}{
	{"GET", "points", "", 200, "QueryPoints", []any{"db", rebound.ListQuery{}}},
	{"POST", "points", `{"appConsistent":true}`, 201, "CreatePoint", []any{"db", true}},
	{"POST", "failover", `{"point":"p-3","planned":true}`, 202, "Failover", []any{rebound.FailoverRequest{Machine: "db", Point: "p-3", Planned: true}}},
	{"POST", "failover/change-point", `{"point":"p-4"}`, 202, "ChangePoint", []any{"db", "p-4"}},
	{"POST", "failover/cancel", "", 202, "CancelFailover", []any{"db"}},
	{"POST", "commit", "", 202, "Commit", []any{"db"}},
	{"POST", "test-failover", `{"point":"latest"}`, 202, "TestFailover", []any{"db", "latest"}},
	{"POST", "test-failover/cleanup", "", 202, "TestFailoverCleanup", []any{"db"}},
	{"POST", "reprotect", `{"to":"a","verify":true}`, 202, "Reprotect", []any{rebound.ReprotectRequest{Machine: "db", To: "a", Verify: true}}},
	{"POST", "failback", `{"planned":true}`, 202, "Failback", []any{rebound.FailoverRequest{Machine: "db", Planned: true}}},
	{"POST", "unprotect", `{"keepReplica":true}`, 202, "Unprotect", []any{rebound.UnprotectRequest{Machine: "db", KeepReplica: true}}},
	{"GET", "preflight?operation=failover", "", 200, "Preflight", []any{"db", "failover"}},
}

// TestGroupVerbRoutes: each /api/v1/groups/{name}/... route runs the
// machine verb with the group's name, only for a group that exists, and
// only with a token.
func TestGroupVerbRoutes(t *testing.T) {
	e := newEnv(t)
	f := e.fake
	f.group, f.job = testGroup(), testJob()
	f.point = &rebound.RecoveryPoint{ID: "p-9", Kind: rebound.PointApp}
	f.points = []rebound.RecoveryPoint{{ID: "p-1", Time: ts(1), Kind: rebound.PointCrash, Seq: 1}}
	f.report = &rebound.PreflightReport{Machine: "db", Operation: "failover", OK: true}
	auth := "Bearer " + testToken
	if len(groupVerbCases) != len(groupVerbRoutes) {
		t.Fatalf("%d cases for %d group verb routes", len(groupVerbCases), len(groupVerbRoutes))
	}
	for _, tc := range groupVerbCases {
		path := "/api/v1/groups/db/" + tc.path
		f.call = ""
		st, _, er, body := e.raw(t, tc.method, path, auth, "", strings.NewReader(tc.body))
		if st != tc.status {
			t.Errorf("%s %s: %d %+v, want %d", tc.method, path, st, er, tc.status)
			continue
		}
		call, args := f.last()
		if call != tc.call || !reflect.DeepEqual(args, tc.args) {
			t.Errorf("%s %s: service got %s%v, want %s%v", tc.method, path, call, args, tc.call, tc.args)
		}
		// The answer is the machine route's: same body for the same call.
		mpath := "/api/v1/machines/db/" + tc.path
		if _, _, _, mbody := e.raw(t, tc.method, mpath, auth, "", strings.NewReader(tc.body)); string(mbody) != string(body) {
			t.Errorf("%s: group answer %s, machine answer %s", tc.path, body, mbody)
		}

		// A name that is no group's is 404 and never reaches the verb.
		f.call = ""
		st, _, er, _ = e.raw(t, tc.method, "/api/v1/groups/web/"+tc.path, auth, "", strings.NewReader(tc.body))
		if call, args := f.last(); st != 404 || er.Error.Message != `group "web" not found` || call != "GetGroup" || !reflect.DeepEqual(args, []any{"web"}) {
			t.Errorf("%s on a machine's name: %d %+v, last call %s%v", tc.path, st, er, call, args)
		}
		// No token: 401 before any call.
		f.call = ""
		if st, _, _, _ := e.raw(t, tc.method, path, "", "", strings.NewReader(tc.body)); st != 401 {
			t.Errorf("%s without a token: %d", tc.path, st)
		}
		if call, _ := f.last(); call != "" {
			t.Errorf("%s without a token called %s", tc.path, call)
		}
	}
	// Bodies are as strict as the machine routes'.
	f.call = ""
	if st, _, er, _ := e.raw(t, "POST", "/api/v1/groups/db/failover", auth, "", strings.NewReader(`{"machine":"x"}`)); st != 400 || !strings.Contains(er.Error.Message, `unknown field "machine"`) {
		t.Fatalf("unknown field: %d %+v", st, er)
	}
	if call, _ := f.last(); call == "Failover" {
		t.Fatal("failover ran with a bad body")
	}
	for _, p := range []string{"/api/v1/groups", "/api/v1/groups/db", "/api/v1/groups/db/machines/db1"} {
		method := "GET"
		if strings.Contains(p, "/machines/") {
			method = "DELETE"
		}
		f.call = ""
		if st, _, _, _ := e.raw(t, method, p, "Bearer wrong", "", nil); st != 401 {
			t.Errorf("%s %s with a bad token: %d", method, p, st)
		}
		if call, _ := f.last(); call != "" {
			t.Errorf("%s without auth called %s", p, call)
		}
	}
	if st, _, _, _ := e.raw(t, "POST", "/api/v1/groups/db", auth, "", nil); st != 405 {
		t.Fatalf("POST on a group: %d", st)
	}
}

// TestGroupsNotImplemented: without Groups every group route answers 501
// and nothing is called; the machine routes keep working.
func TestGroupsNotImplemented(t *testing.T) {
	f := &fakeService{job: testJob(), group: testGroup()}
	s := &Server{Service: f, Loop: f, Authenticate: func(context.Context, string) (rebound.Principal, error) {
		return rebound.Principal{User: "admin", Role: rebound.RoleAdmin, Via: "token"}, nil
	}}
	srv := httptest.NewTLSServer(s.Handler())
	defer srv.Close()
	c := &Client{BaseURL: srv.URL, Token: "t", HTTPClient: srv.Client()}
	ctx := context.Background()
	checkErr := func(what string, err error) {
		t.Helper()
		if rebound.ErrorCode(err) != CodeNotImplemented || !strings.Contains(err.Error(), what+" is not implemented by this server (it serves no replication groups)") {
			t.Fatalf("%s: %q %v", what, rebound.ErrorCode(err), err)
		}
	}
	_, err := c.ListGroups(ctx)
	checkErr("group list", err)
	_, err = c.GetGroup(ctx, "db")
	checkErr("group show", err)
	_, err = c.RemoveGroupMember(ctx, "db", "db1")
	checkErr("group remove-machine", err)
	e := &env{fake: f, srv: srv}
	for _, tc := range groupVerbCases {
		st, _, er, _ := e.raw(t, tc.method, "/api/v1/groups/db/"+tc.path, "Bearer t", "", strings.NewReader(tc.body))
		if p, _, _ := strings.Cut(tc.path, "?"); st != 501 || er.Error.Code != CodeNotImplemented || !strings.Contains(er.Error.Message, "group "+p+" is not implemented") {
			t.Errorf("%s %s: %d %+v", tc.method, tc.path, st, er)
		}
	}
	if call, _ := f.last(); call != "" {
		t.Fatalf("service called: %s", call)
	}
	if _, err := c.Commit(ctx, "db"); err != nil {
		t.Fatalf("commit without Groups: %v", err)
	}
}
