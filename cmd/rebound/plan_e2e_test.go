package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

// planFixture is three protected machines in a three-stage plan with
// scripts that log their environment, and a manual step on the way away.
type planFixture struct {
	up      *UpMain
	svc     rebound.Service
	plans   rebound.PlanService
	log     string
	oracles map[string]*oracle
}

const planYAML = `name: shop
stages:
  - name: data
    groups: [dbg]
    before:
      - script: ./log.sh
        args: [%[1]s, before]
    after:
      - script: ./log.sh
        args: [%[1]s, after]
        verbs: [failover, failback]
  - name: app
    machines: [app1]
    before:
      - manual: "Point the DNS record of shop.example at the recovery site"
        directions: [away]
        verbs: [failover]
  - name: web
    machines: [web1]
    after:
      - script: ./log.sh
        args: [%[1]s, after]
`

func newPlanFixture(t *testing.T) *planFixture {
	t.Helper()
	up, svc := fixedUp(t, nil)
	f := &planFixture{up: up, svc: svc, plans: svc.(rebound.PlanService), oracles: map[string]*oracle{}}
	const size = 8 << 20
	for i, name := range []string{"app1", "web1"} {
		o := newOracle(t, size, int64(100+i))
		createProtected(t, svc, name, size, o)
		f.oracles[name] = o
	}
	// Stage data is replication group dbg: db and db2.
	for i, name := range []string{"db", "db2"} {
		o := newOracle(t, size, int64(200+i))
		m, err := svc.CreateMachine(context.Background(), rebound.CreateMachineRequest{Name: name, Site: "primary", Disks: []int64{size}})
		if err != nil {
			t.Fatal(err)
		}
		o.write(m.Disks[0].NBD, 50)
		waitJob(t, svc)(svc.Protect(context.Background(), rebound.ProtectRequest{Machine: name, To: "recovery", Group: "dbg"}))
		f.oracles[name] = o
	}
	dir := t.TempDir()
	f.log = filepath.Join(dir, "scripts.log")
	// REBOUND_SECRET stands for the server's own environment, which
	// scripts must not see.
	os.Setenv("REBOUND_SECRET", "s3cret") // the same value from every test: no race on its meaning
	script := "#!/bin/sh\necho \"$2 $REBOUND_STAGE $REBOUND_VERB $REBOUND_DIRECTION $REBOUND_POINT [$REBOUND_MACHINES]$REBOUND_SECRET\" >> \"$1\"\necho \"ran $2 $REBOUND_STAGE\"\n"
	if err := os.WriteFile(filepath.Join(dir, "log.sh"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	planFile := filepath.Join(dir, "shop.yaml")
	if err := os.WriteFile(planFile, []byte(fmt.Sprintf(planYAML, f.log)), 0o644); err != nil {
		t.Fatal(err)
	}
	r := runOn(t, svc, "plan", "apply", "-f", planFile, "-o", "json")
	if r.code != 0 {
		t.Fatalf("plan apply: exit %d: %s", r.code, r.stderr)
	}
	p := decode[rebound.Plan](t, r.stdout)
	if len(p.Stages) != 3 || p.Stages[0].Before[0].Script != filepath.Join(dir, "log.sh") {
		t.Fatalf("applied plan: %+v", p)
	}
	// Applying it again changes nothing.
	if again := runOn(t, svc, "plan", "apply", "-f", planFile, "-o", "json"); again.code != 0 || decode[rebound.Plan](t, again.stdout).UpdatedAt != p.UpdatedAt {
		t.Fatalf("plan apply again: exit %d, %s", again.code, again.stdout)
	}
	return f
}

// logLines returns the script log's lines and empties it.
func (f *planFixture) logLines(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(f.log)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	os.Remove(f.log)
	return strings.Split(strings.TrimSpace(string(b)), "\n")
}

// writeAll writes to every machine where it is active.
func (f *planFixture) writeAll(t *testing.T) {
	t.Helper()
	for name, o := range f.oracles {
		o.write(getMachine(t, f.svc, name).Disks[0].NBD, 20)
	}
}

// checkAll checks every machine is active at site with the bytes of its model.
func (f *planFixture) checkAll(t *testing.T, site, what string) {
	t.Helper()
	for name, o := range f.oracles {
		m := getMachine(t, f.svc, name)
		if m.ActiveSite != site {
			t.Fatalf("%s: machine %s is active at %s, want %s", what, name, m.ActiveSite, site)
		}
		if got := diskSum(t, m.Disks[0].NBD); got != o.model.Sum() {
			t.Fatalf("%s: machine %s's disk differs from what was written", what, name)
		}
	}
}

func (f *planFixture) run(t *testing.T, verb string, planned bool) *rebound.Job {
	t.Helper()
	return waitJob(t, f.svc)(f.plans.RunPlan(context.Background(), rebound.PlanRequest{Plan: "shop", Verb: verb, Planned: planned}))
}

// TestPlanRoundTrip runs a three-stage plan with scripts, a manual step
// and three machines around the loop three times: failover, commit,
// reprotect, planned failback, commit, reprotect. Bytes are checked at
// every step, the scripts' order and environment from their log, the
// manual step by the job suspending before its stage.
func TestPlanRoundTrip(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newPlanFixture(t)
	svc := f.svc
	for round := range 3 {
		f.writeAll(t)
		j, err := f.plans.RunPlan(ctx, rebound.PlanRequest{Plan: "shop", Verb: rebound.PlanFailover})
		if err != nil {
			t.Fatal(err)
		}
		// The job stops at the manual step before stage app: data is done,
		// app and web have not started.
		waitUntil(t, time.Minute, "the plan job suspended", func() bool {
			g, err := svc.GetJob(ctx, j.ID)
			return err == nil && g.State == rebound.JobSuspended
		})
		g, _ := svc.GetJob(ctx, j.ID)
		st := g.Plan.Stages
		if st[0].State != rebound.JobSucceeded || st[0].Members[0].State != rebound.JobSucceeded ||
			st[1].Members[0].State != rebound.JobQueued || st[2].Members[0].State != rebound.JobQueued {
			t.Fatalf("round %d: suspended job's stages: %+v", round, st)
		}
		if !strings.Contains(jobStepMessage(g), "Point the DNS record") {
			t.Fatalf("round %d: suspended job does not show the instruction: %+v", round, g.Steps)
		}
		if m := getMachine(t, svc, "app1"); m.State != rebound.MachineProtected {
			t.Fatalf("round %d: app1 is %s before the manual step was resumed", round, m.State)
		}
		if r := runOn(t, svc, "job", "resume", j.ID); r.code != 0 {
			t.Fatalf("job resume: exit %d: %s", r.code, r.stderr)
		}
		waitJob(t, svc)(g, nil)
		f.checkAll(t, "recovery", fmt.Sprintf("round %d, failover", round))
		want := []string{
			"before data failover away latest [db db2]",
			"after data failover away latest [db db2]",
			"after web failover away latest [web1]",
		}
		if got := f.logLines(t); !slices.Equal(got, want) {
			t.Fatalf("round %d: scripts ran\n%s\nwant\n%s", round, strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
		g, _ = svc.GetJob(ctx, j.ID)
		if out := g.Plan.Stages[0].Actions[0].Output; out != "ran before data\n" {
			t.Fatalf("round %d: script output in the job: %q", round, out)
		}

		f.writeAll(t)
		f.run(t, rebound.PlanCommit, false)
		f.run(t, rebound.PlanReprotect, false)
		f.writeAll(t)
		f.run(t, rebound.PlanFailback, true)
		f.checkAll(t, "primary", fmt.Sprintf("round %d, failback", round))
		f.writeAll(t)
		f.run(t, rebound.PlanCommit, false)
		f.run(t, rebound.PlanReprotect, false)
		want = []string{
			"before data commit away latest [db db2]",
			"after web commit away latest [web1]",
			"before data reprotect away latest [db db2]",
			"after web reprotect away latest [web1]",
			"before data failback home latest [db db2]",
			"after data failback home latest [db db2]",
			"after web failback home latest [web1]",
			"before data commit home latest [db db2]",
			"after web commit home latest [web1]",
			"before data reprotect home latest [db db2]",
			"after web reprotect home latest [web1]",
		}
		if got := f.logLines(t); !slices.Equal(got, want) {
			t.Fatalf("round %d: scripts ran\n%s\nwant\n%s", round, strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
		for name := range f.oracles {
			if m := getMachine(t, svc, name); m.State != rebound.MachineProtected || m.Protection.TargetSite != "recovery" {
				t.Fatalf("round %d: %s after the loop: %s %+v", round, name, m.State, m.Protection)
			}
		}
	}
}

func jobStepMessage(j *rebound.Job) string {
	for _, s := range j.Steps {
		if s.State == rebound.JobRunning {
			return s.Message
		}
	}
	return ""
}

// TestPlanServerRestart: a plan job survives a restart of the server. A
// job suspended at its manual step is suspended again after the restart,
// resumes, and completes with the bytes right; a failed stage is retried
// from its failed member without redoing the members already done.
func TestPlanServerRestart(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newPlanFixture(t)
	f.writeAll(t)
	j, err := f.plans.RunPlan(ctx, rebound.PlanRequest{Plan: "shop", Verb: rebound.PlanFailover})
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, time.Minute, "the plan job suspended", func() bool {
		g, err := f.svc.GetJob(ctx, j.ID)
		return err == nil && g.State == rebound.JobSuspended
	})
	restartServer(t, f.up, nil)
	svc := f.svc // the same address, token and CA
	g, err := svc.GetJob(ctx, j.ID)
	if err != nil || g.State != rebound.JobSuspended {
		t.Fatalf("plan job after the restart: %+v %v", g, err)
	}
	dbJob := g.Plan.Stages[0].Members[0].JobID
	waitUntil(t, time.Minute, "the resumed job loaded", func() bool {
		_, err := f.plans.ResumeJob(ctx, j.ID, "DNS switched")
		return err == nil
	})
	g = waitJob(t, svc)(g, nil)
	noted := false // the note and who resumed are kept as the manual step's output
	for _, st := range g.Plan.Stages {
		for _, a := range st.Actions {
			noted = noted || a.Manual != "" && a.Output == "resumed by admin: DNS switched"
		}
	}
	if !noted {
		t.Fatalf("the resume note is not in the plan job: %+v", g.Plan.Stages)
	}
	f.checkAll(t, "recovery", "after the restart")
	g, _ = svc.GetJob(ctx, j.ID)
	if g.Plan.Stages[0].Members[0].JobID != dbJob {
		t.Fatalf("db's failover ran again after the restart: job %s, was %s", g.Plan.Stages[0].Members[0].JobID, dbJob)
	}
	// Stage data's scripts ran once, before the restart.
	want := []string{"before data failover away latest [db db2]", "after data failover away latest [db db2]", "after web failover away latest [web1]"}
	if got := f.logLines(t); !slices.Equal(got, want) {
		t.Fatalf("scripts across the restart: %q, want %q", got, want)
	}

	// A failing script fails its stage; retry continues from there.
	if err := os.WriteFile(filepath.Join(filepath.Dir(f.log), "log.sh"), []byte("#!/bin/sh\necho broken; exit 3\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	j, err = f.plans.RunPlan(ctx, rebound.PlanRequest{Plan: "shop", Verb: rebound.PlanCommit})
	j = jobEnd(t, svc, j, err)
	if j.State != rebound.JobFailed || !strings.Contains(j.Error, "exited with status 3") || !strings.Contains(j.Error, "rebound job retry "+j.ID) {
		t.Fatalf("plan commit with a failing script: %s %q", j.State, j.Error)
	}
	if a := j.Plan.Stages[0].Actions[0]; a.ExitCode != 3 || !strings.Contains(a.Output, "broken") {
		t.Fatalf("failed script in the job: %+v", a)
	}
	for name := range f.oracles {
		if m := getMachine(t, svc, name); m.State != rebound.MachineFailedOver {
			t.Fatalf("%s was committed although the stage before it failed: %s", name, m.State)
		}
	}
	script := "#!/bin/sh\necho \"$2 $REBOUND_STAGE $REBOUND_VERB\" >> \"$1\"\n"
	if err := os.WriteFile(filepath.Join(filepath.Dir(f.log), "log.sh"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	r := runOn(t, svc, "job", "retry", j.ID, "--wait", "-o", "json")
	if r.code != 0 {
		t.Fatalf("job retry: exit %d: %s %s", r.code, r.stdout, r.stderr)
	}
	for name := range f.oracles {
		if m := getMachine(t, svc, name); m.State != rebound.MachineUnprotected && m.State != rebound.MachineProtected {
			t.Fatalf("%s after the retried commit: %s", name, m.State)
		}
	}
	if got, want := f.logLines(t), []string{"before data commit", "after web commit"}; !slices.Equal(got, want) {
		t.Fatalf("retried job ran scripts %q, want %q", got, want)
	}
}

// runOn runs the CLI in-process against svc; unlike runCLI it sets no
// environment, so parallel tests can use it.
func runOn(t *testing.T, svc rebound.Service, args ...string) result {
	t.Helper()
	return runWith(t, svc, append([]string{"--server", "https://server.test:8440", "--token", "tok"}, args...)...)
}

// TestPlanReadiness: a plan names only machines that exist; a plan
// failover checks every member first and starts nothing when one is not
// ready, unless --skip-unready leaves it behind.
func TestPlanReadiness(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, svc := testUp(t, t.TempDir())
	ps := svc.(rebound.PlanService)
	const size = 4 << 20
	o := newOracle(t, size, 5)
	createProtected(t, svc, "db", size, o)
	if _, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "cache", Site: "primary", Disks: []int64{size}}); err != nil {
		t.Fatal(err)
	}
	_, err := ps.ApplyPlan(ctx, rebound.Plan{Name: "p", Stages: []rebound.PlanStage{{Name: "s", Machines: []string{"db", "ghost"}}}})
	wantErr(t, "a plan naming a missing machine", err, rebound.EINVALID, `machine "ghost" does not exist`)
	_, err = ps.ApplyPlan(ctx, rebound.Plan{Name: "p", Stages: []rebound.PlanStage{{Name: "s", Groups: []string{"db"}}}})
	wantErr(t, "a plan naming a replication group", err, rebound.EINVALID, `replication group "db"`)
	if _, err := ps.ApplyPlan(ctx, rebound.Plan{Name: "p", Stages: []rebound.PlanStage{
		{Name: "one", Machines: []string{"db"}}, {Name: "two", Machines: []string{"cache"}}}}); err != nil {
		t.Fatal(err)
	}
	r := runOn(t, svc, "plan", "preflight", "p", "-o", "json")
	rep := decode[rebound.PlanPreflight](t, r.stdout)
	if r.code != 1 || rep.OK || len(rep.Machines) != 2 || !rep.Machines[0].OK || rep.Machines[1].OK {
		t.Fatalf("plan preflight: exit %d, %+v", r.code, rep)
	}
	_, err = ps.RunPlan(ctx, rebound.PlanRequest{Plan: "p", Verb: rebound.PlanFailover})
	wantErr(t, "a plan failover with an unready member", err, rebound.ECONFLICT, "cache", "nothing started", "--skip-unready")
	if m := getMachine(t, svc, "db"); m.State != rebound.MachineProtected {
		t.Fatalf("db after the refused plan failover: %s", m.State)
	}
	_, err = ps.RunPlan(ctx, rebound.PlanRequest{Plan: "p", Verb: rebound.PlanFailover, SkipUnready: []string{"nobody"}})
	wantErr(t, "--skip-unready of a non-member", err, rebound.EINVALID, "nobody")
	j := waitJob(t, svc)(ps.RunPlan(ctx, rebound.PlanRequest{Plan: "p", Verb: rebound.PlanFailover, SkipUnready: []string{"cache"}}))
	if mp := j.Plan.Stages[1].Members[0]; mp.State != rebound.MemberSkipped || !strings.Contains(mp.Error, "--skip-unready") {
		t.Fatalf("cache in the plan job: %+v", mp)
	}
	m := getMachine(t, svc, "db")
	if m.State != rebound.MachineFailedOver || j.Plan.Stages[0].Members[0].Point != m.Failover.Point.ID {
		t.Fatalf("db after the plan failover: %s, job says point %q", m.State, j.Plan.Stages[0].Members[0].Point)
	}
	if got := diskSum(t, m.Disks[0].NBD); got != o.model.Sum() {
		t.Fatal("db's disk after the plan failover differs")
	}
	_, err = ps.RetryJob(ctx, j.ID)
	wantErr(t, "retry of a succeeded job", err, rebound.ECONFLICT, "only a failed or cancelled plan job")
	_, err = ps.ResumeJob(ctx, j.ID, "")
	wantErr(t, "resume of a job that is not suspended", err, rebound.ECONFLICT, "not suspended")
	if err := ps.DeletePlan(ctx, "p"); err != nil {
		t.Fatal(err)
	}
	_, err = ps.GetPlan(ctx, "p")
	wantErr(t, "a deleted plan", err, rebound.ENOTFOUND, "rebound plan list")
}
