package main

import (
	"context"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

// sitePolicy reads the policy a site keeps for a machine's stream (what
// its cutter and expiry read).
func sitePolicy(t *testing.T, up *UpMain, site, machine string) rebound.Policy {
	t.Helper()
	return siteSpec(t, up.Sites[site].Config.DataDir, machine).Policy
}

// TestPolicyChangeReachesSites: `protect --policy` moves a protected
// machine to another policy, and `policy set` of a policy in use reaches
// both sites: the source cuts points at the new interval, the target
// expires points by the new retention. A policy in use cannot be deleted.
func TestPolicyChangeReachesSites(t *testing.T) {
	ctx := context.Background()
	up, svc := testUp(t, t.TempDir())
	cat := svc.(rebound.CatalogService)
	slow := rebound.Policy{Name: "slow", RPOThreshold: rebound.Duration(time.Minute), Retention: rebound.Duration(24 * time.Hour), CrashInterval: rebound.Duration(time.Hour)}
	if _, err := svc.PutPolicy(ctx, slow); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "primary", Disks: []int64{1 << 20}}); err != nil {
		t.Fatal(err)
	}
	waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm1", To: "recovery"}))

	// protect --policy on the protected machine changes its policy.
	j := waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm1", To: "recovery", Policy: "slow"}))
	if len(j.Steps) == 0 || !strings.Contains(j.Steps[0].Message, "now uses policy slow (was default)") {
		t.Fatalf("job %+v", j)
	}
	if m := getMachine(t, svc, "vm1"); m.Protection.Policy != "slow" {
		t.Fatalf("machine policy %q", m.Protection.Policy)
	}
	for _, site := range []string{"primary", "recovery"} {
		if p := sitePolicy(t, up, site, "vm1"); p != slow {
			t.Fatalf("site %s keeps %+v", site, p)
		}
	}
	// Without --policy, protect leaves the policy alone.
	waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm1", To: "recovery"}))
	if m := getMachine(t, svc, "vm1"); m.Protection.Policy != "slow" {
		t.Fatalf("protect without --policy moved the machine to %q", m.Protection.Policy)
	}

	err := cat.DeletePolicy(ctx, "slow")
	if rebound.ErrorCode(err) != rebound.ECONFLICT || !strings.Contains(err.Error(), "used by machine vm1") {
		t.Fatalf("delete in use: %v", err)
	}

	// policy set reaches the sites: points every second, a 3 s window.
	first, err := svc.CreatePoint(ctx, "vm1", false)
	if err != nil {
		t.Fatal(err)
	}
	fast := slow
	fast.CrashInterval, fast.Retention = rebound.Duration(time.Second), rebound.Duration(3*time.Second)
	if _, err := svc.PutPolicy(ctx, fast); err != nil {
		t.Fatal(err)
	}
	for _, site := range []string{"primary", "recovery"} {
		if p := sitePolicy(t, up, site, "vm1"); p != fast {
			t.Fatalf("site %s keeps %+v after policy set", site, p)
		}
	}
	// Under the old hour-long interval no automatic point would come; at
	// 1 s they come about a second apart (the 5 s of a lost change would
	// show as 5 s gaps).
	var auto []rebound.RecoveryPoint
	waitUntil(t, 60*time.Second, "four automatic points after the change", func() bool {
		ps, err := svc.ListPoints(ctx, "vm1")
		if err != nil {
			return false
		}
		auto = auto[:0]
		for _, p := range ps {
			if p.Seq > first.Seq && p.Kind == rebound.PointCrash {
				auto = append(auto, p)
			}
		}
		return len(auto) >= 4
	})
	var gaps []time.Duration
	for i := 1; i < len(auto); i++ {
		gaps = append(gaps, auto[i].Time.Sub(auto[i-1].Time))
	}
	sort.Slice(gaps, func(i, j int) bool { return gaps[i] < gaps[j] })
	if med := gaps[len(gaps)/2]; med > 3*time.Second {
		t.Fatalf("points %v apart (median %s): the 1s interval did not take effect", gaps, med)
	}
	// The target folds points older than 3 s: the manual point goes.
	waitUntil(t, 90*time.Second, "the target expires the point older than the new retention", func() bool {
		ps, err := svc.ListPoints(ctx, "vm1")
		return err == nil && len(ps) > 0 && ps[0].Seq > first.Seq
	})

	// Events say what happened.
	page, err := cat.QueryEvents(ctx, rebound.ListQuery{Machine: "vm1", Kind: "policy", Limit: 10})
	if err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for _, e := range page.Events {
		kinds = append(kinds, e.Kind)
	}
	if strings.Join(kinds, " ") != "policy.applied policy.changed" {
		t.Fatalf("policy events %q", kinds)
	}

	// Invalid values are refused, the stored policy stays.
	bad := fast
	bad.Retention = rebound.Duration(500 * time.Millisecond)
	if _, err := svc.PutPolicy(ctx, bad); rebound.ErrorCode(err) != rebound.EINVALID || !strings.Contains(err.Error(), "shorter than the crash interval") {
		t.Fatalf("bad retention: %v", err)
	}
	if err := cat.DeletePolicy(ctx, "default"); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("delete default: %v", err)
	}

	// site show: the roles of vm1 at each site.
	for site, role := range map[string]string{"primary": "source", "recovery": "target"} {
		d, err := cat.GetSite(ctx, site)
		if err != nil {
			t.Fatal(err)
		}
		if d.Health != rebound.HealthNormal || d.Status != rebound.SiteOnline || d.Version == "" || d.LastSeen.IsZero() ||
			len(d.Machines) != 1 || d.Machines[0].Name != "vm1" || d.Machines[0].Role != role {
			t.Fatalf("site %s: %+v", site, d)
		}
	}
}

// TestCLIErrorsRealServer: against a real server, the CLI's errors for a
// wrong port, plain HTTP, a bad token (by where it came from) and a server
// that is down name the next step.
func TestCLIErrorsRealServer(t *testing.T) {
	up, _ := testUp(t, t.TempDir())
	dir := clearEnv(t)
	ca := filepath.Join(dir, "ca.crt")
	if err := os.WriteFile(ca, up.Server.CA.CertPEM(), 0o644); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) result {
		var out, errb strings.Builder
		c := NewCLI(nil, &out, &errb)
		code := c.Run(context.Background(), append(args, "--ca", ca))
		return result{code, out.String(), errb.String()}
	}
	api := up.Server.APIURL
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"machine", "list", "--server", "https://" + up.Server.GRPCAddr, "--token", up.AdminToken}, ExitUnavailable,
			"rebound: https://" + up.Server.GRPCAddr + " is not a Rebound API (HTTP 415 Unsupported Media Type): check --server (or REBOUND_SERVER); the API listens on the --api-addr of `rebound server`"},
		{[]string{"machine", "list", "--server", "http://" + strings.TrimPrefix(api, "https://"), "--token", up.AdminToken}, ExitUsage,
			"speaks HTTPS, not HTTP: use --server " + api},
		{[]string{"machine", "list", "--server", api, "--token", "rbt_wrong"}, ExitUnauthorized, "(token from --token): use the admin token of the server"},
	} {
		r := run(c.args...)
		wantCode(t, r, c.code)
		if !strings.Contains(r.stderr, c.want) {
			t.Fatalf("%v: stderr %q, want %q", c.args, r.stderr, c.want)
		}
	}
	// The token's source: the environment, then the config file.
	t.Setenv(EnvServer, api)
	t.Setenv(EnvToken, "rbt_wrong")
	if r := run("machine", "list"); r.code != ExitUnauthorized || !strings.Contains(r.stderr, "(token from REBOUND_TOKEN)") {
		t.Fatalf("env token: %d %q", r.code, r.stderr)
	}
	t.Setenv(EnvToken, "")
	path, err := WriteClientConfig(ClientConfig{Server: api, Token: "rbt_wrong"})
	if err != nil {
		t.Fatal(err)
	}
	if r := run("machine", "list"); r.code != ExitUnauthorized || !strings.Contains(r.stderr, "(token from the config file "+path+")") {
		t.Fatalf("file token: %d %q", r.code, r.stderr)
	}
	// The real token works; then the server goes down.
	t.Setenv(EnvToken, up.AdminToken)
	wantCode(t, run("machine", "list"), 0)
	up.Close()
	r := run("machine", "list")
	wantCode(t, r, ExitUnavailable)
	if !strings.Contains(r.stderr, "connection refused. Is it running? Start one with `rebound up`") {
		t.Fatalf("down: %q", r.stderr)
	}
}
