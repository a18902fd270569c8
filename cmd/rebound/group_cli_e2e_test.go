package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/rebound-dr/rebound"
)

// TestGroupCLIEndToEnd drives a group through the CLI's --group forms
// against a real server and sites (rebound up): protect --group, group
// list/show, machine list's GROUP column, a member's verb refused naming
// --group, a point cut and listed with --group (the same JSON as points
// NAME), the /api/v1/groups/{name}/... routes, a test failover and its
// cleanup, remove-machine and unprotect --group.
func TestGroupCLIEndToEnd(t *testing.T) {
	ctx := context.Background()
	up, svc := testUp(t, t.TempDir())
	for _, n := range []string{"ga", "gb"} {
		m, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: n, Site: "primary", Disks: []int64{4 << 20}})
		if err != nil {
			t.Fatal(err)
		}
		nbdWrite(t, m.Disks[0].NBD, 1<<20)
	}
	cli := func(args ...string) result { t.Helper(); return runCLI(t, svc, args...) }
	for _, n := range []string{"ga", "gb"} {
		wantCode(t, cli("protect", n, "--to", "recovery", "--group", "g", "--wait"), 0)
	}

	r := cli("group", "list", "-o", "json")
	wantCode(t, r, 0)
	gs := decode[[]rebound.Group](t, r.stdout)
	if len(gs) != 1 || gs[0].Name != "g" || strings.Join(gs[0].Machines, ",") != "ga,gb" || gs[0].SourceSite != "primary" || gs[0].TargetSite != "recovery" {
		t.Fatalf("group list: %s", r.stdout)
	}
	r = cli("group", "show", "g")
	wantCode(t, r, 0)
	if !strings.Contains(r.stdout, "ga, gb") || !strings.Contains(r.stdout, "primary -> recovery") {
		t.Fatalf("group show:\n%s", r.stdout)
	}
	r = cli("machine", "list")
	if lines := strings.Split(r.stdout, "\n"); !strings.HasPrefix(strings.Join(strings.Fields(lines[0]), " "), "NAME GROUP STATE") {
		t.Fatalf("machine list:\n%s", r.stdout)
	}

	// A member's own verb is refused with the --group form.
	wantStderr(t, cli("failover", "ga"), ExitConflict, "--group g")
	wantStderr(t, cli("failover", "ga", "--group", "g"), ExitUsage, "not both")

	// One point for the group, listed with --group like a machine's.
	r = cli("point", "create", "--group", "g", "-o", "json")
	wantCode(t, r, 0)
	p := decode[rebound.RecoveryPoint](t, r.stdout)
	r = cli("points", "--group", "g", "-o", "json")
	wantCode(t, r, 0)
	var raw []map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &raw); err != nil || len(raw) == 0 {
		t.Fatalf("points --group: %v %s", err, r.stdout)
	}
	found := false
	for _, x := range raw {
		if x["id"] == p.ID && x["kind"] == "crash" && x["time"] != nil {
			found = true
		}
	}
	if !found {
		t.Fatalf("point %s not in %s", p.ID, r.stdout)
	}

	// The group routes answer like the machine routes, and only for a group.
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(up.Server.CA.CertPEM())
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	get := func(path string) (int, string) {
		req, _ := http.NewRequest("GET", up.Server.APIURL+path, nil)
		req.Header.Set("Authorization", "Bearer "+up.AdminToken)
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if st, body := get("/api/v1/groups/g/points"); st != 200 || !strings.Contains(body, `"id":"`+p.ID+`"`) {
		t.Fatalf("GET /groups/g/points: %d %s", st, body)
	}
	if st, body := get("/api/v1/groups/ga/points"); st != 404 {
		t.Fatalf("GET /groups/ga/points (a machine): %d %s", st, body)
	}
	if st, body := get("/api/v1/groups/g/preflight?operation=failover"); st != 200 || !strings.Contains(body, `"checks":[`) {
		t.Fatalf("GET /groups/g/preflight: %d %s", st, body)
	}

	wantCode(t, cli("test-failover", "--group", "g", "--point", p.ID, "--wait"), 0)
	for _, n := range []string{"ga", "gb"} {
		if m := getMachine(t, svc, n); m.TestFailover == nil || m.TestFailover.Point.ID != p.ID {
			t.Fatalf("%s after test-failover --group: %+v", n, m.TestFailover)
		}
	}
	wantCode(t, cli("test-failover", "cleanup", "--group", "g", "--wait"), 0)
	if m := getMachine(t, svc, "gb"); m.TestFailover != nil {
		t.Fatalf("gb after cleanup: %+v", m.TestFailover)
	}

	wantCode(t, cli("group", "remove-machine", "g", "gb", "--wait"), 0)
	if m := getMachine(t, svc, "gb"); m.Group != "" || m.State != rebound.MachineProtected {
		t.Fatalf("gb after remove-machine: group %q state %s", m.Group, m.State)
	}
	wantStderr(t, cli("group", "remove-machine", "g", "ga"), ExitConflict, "rebound unprotect --group g")
	wantCode(t, cli("unprotect", "--group", "g", "--wait"), 0)
	r = cli("group", "list", "-o", "json")
	if strings.TrimSpace(r.stdout) != "[]" {
		t.Fatalf("groups after unprotect: %s", r.stdout)
	}
	if m := getMachine(t, svc, "ga"); m.Group != "" || m.State != rebound.MachineUnprotected {
		t.Fatalf("ga after unprotect --group: group %q state %s", m.Group, m.State)
	}
}
