package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/failpoint"
)

// groupFixture is machines a, b, c at primary, each with an oracle.
type groupFixture struct {
	t       *testing.T
	up      *UpMain
	svc     rebound.Service
	names   []string
	oracles map[string]*oracle
	uris    map[string]string
}

func newGroupFixture(t *testing.T, names ...string) *groupFixture {
	up, svc := testUp(t, t.TempDir())
	f := &groupFixture{t: t, up: up, svc: svc, names: names, oracles: map[string]*oracle{}, uris: map[string]string{}}
	for i, n := range names {
		m, err := svc.CreateMachine(context.Background(), rebound.CreateMachineRequest{Name: n, Site: "primary", Disks: []int64{4 << 20}})
		if err != nil {
			t.Fatal(err)
		}
		f.oracles[n] = newOracle(t, 4<<20, int64(100+i))
		f.uris[n] = m.Disks[0].NBD
		f.oracles[n].write(f.uris[n], 30)
	}
	return f
}

// writeAll writes n operations to every machine through its active export.
func (f *groupFixture) writeAll(n int) {
	for _, name := range f.names {
		m := getMachine(f.t, f.svc, name)
		f.oracles[name].write(m.Disks[0].NBD, n)
	}
}

// checkActive checks every machine's active disk against its model.
func (f *groupFixture) checkActive(what string) {
	f.t.Helper()
	for _, name := range f.names {
		m := getMachine(f.t, f.svc, name)
		if got, want := diskSum(f.t, m.Disks[0].NBD), f.oracles[name].model.Sum(); got != want {
			f.t.Fatalf("%s: %s at %s holds %s, want %s", what, name, m.ActiveSite, got, want)
		}
	}
}

func (f *groupFixture) group(name string) *rebound.Group {
	f.t.Helper()
	g, err := f.svc.(rebound.GroupService).GetGroup(context.Background(), name)
	if err != nil {
		f.t.Fatal(err)
	}
	return g
}

// TestGroupRoundTrip protects three machines in one group (two new, one
// joining from its own stream without a full copy), and takes the group
// around the loop with --group verbs at shared points, checking every
// member's bytes; member verbs are refused naming the group; a member
// leaves without a full copy; unprotect dissolves the group.
func TestGroupRoundTrip(t *testing.T) {
	ctx := context.Background()
	f := newGroupFixture(t, "a", "b", "c")
	svc := f.svc
	wait := waitJob(t, svc)

	wait(svc.Protect(ctx, rebound.ProtectRequest{Machine: "a", To: "recovery", Group: "g"}))
	wait(svc.Protect(ctx, rebound.ProtectRequest{Machine: "b", To: "recovery", Group: "g"}))
	// c replicates alone first, then joins.
	wait(svc.Protect(ctx, rebound.ProtectRequest{Machine: "c", To: "recovery"}))
	f.writeAll(20)
	wait(svc.Protect(ctx, rebound.ProtectRequest{Machine: "c", To: "recovery", Group: "g"}))
	// The join resent only what had not reached the recovery site, not
	// c's disk (4 MiB) nor the group's (8 MiB).
	st, err := f.up.Sites["primary"].Site.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, ms := range st.Machines {
		if ms.Name == "g" {
			t.Logf("join of c: the group's delta resync copied %d of %d bytes", ms.SyncDone, ms.SyncTotal)
			if ms.SyncTotal >= 4<<20 {
				t.Fatalf("joining c resent %d bytes: a full copy", ms.SyncTotal)
			}
		}
	}
	g := f.group("g")
	if g.State != rebound.MachineProtected || len(g.Machines) != 3 || g.SourceSite != "primary" || g.TargetSite != "recovery" {
		t.Fatalf("group after joins: %+v", g)
	}
	for _, n := range f.names {
		if m := getMachine(t, svc, n); m.Group != "g" || m.State != rebound.MachineProtected {
			t.Fatalf("member %s: group %q state %s", n, m.Group, m.State)
		}
	}
	// The source reports the group's stream: its health and lag.
	since := time.Now()
	waitUntil(t, time.Minute, "the group's stream reported", func() bool {
		g := f.group("g")
		return g.Health == rebound.HealthNormal && g.Protection != nil && g.Protection.ReportedAt.After(since) && g.Protection.ReplState == "streaming"
	})
	// Member verbs name the group.
	_, err = svc.Failover(ctx, rebound.FailoverRequest{Machine: "b"})
	wantErr(t, "failover of a member", err, rebound.ECONFLICT, "group g", "--group g")
	_, err = svc.GetMachine(ctx, "g")
	wantErr(t, "machine show of a group", err, rebound.ENOTFOUND, "replication group")

	// A shared point: every member's bytes at it.
	f.writeAll(20)
	p, err := svc.CreatePoint(ctx, "g", false)
	if err != nil {
		t.Fatal(err)
	}
	at := map[string]string{}
	for _, n := range f.names {
		at[n] = f.oracles[n].model.Sum()
	}
	f.writeAll(10)
	wait(svc.TestFailover(ctx, "g", p.ID))
	for _, n := range f.names {
		m := getMachine(t, svc, n)
		if m.TestFailover == nil || len(m.TestFailover.Disks) != 1 {
			t.Fatalf("test failover of %s: %+v", n, m.TestFailover)
		}
		if got := diskSum(t, m.TestFailover.Disks[0].NBD); got != at[n] {
			t.Fatalf("test failover of g at %s: %s holds %s, want %s", p.ID, n, got, at[n])
		}
	}
	wait(svc.TestFailoverCleanup(ctx, "g"))

	// Around the loop twice: planned failover, commit, reprotect, and
	// the planned failback home.
	loop := svc.(rebound.LoopService)
	for round := 0; round < 2; round++ {
		wait(svc.Failover(ctx, rebound.FailoverRequest{Machine: "g", Planned: true}))
		f.checkActive("after planned failover")
		if g := f.group("g"); g.State != rebound.MachineFailedOver || g.ActiveSite != "recovery" {
			t.Fatalf("group after failover: %+v", g)
		}
		wait(svc.Commit(ctx, "g"))
		f.writeAll(10)
		wait(loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "g"}))
		f.writeAll(10)
		wait(loop.Failback(ctx, rebound.FailoverRequest{Machine: "g"}))
		f.checkActive("after failback")
		wait(svc.Commit(ctx, "g"))
		wait(loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "g"}))
		f.writeAll(10)
	}

	// c leaves without a full copy and replicates alone.
	wait(f.svc.(rebound.GroupService).RemoveGroupMember(ctx, "g", "c"))
	if g := f.group("g"); len(g.Machines) != 2 || g.State != rebound.MachineProtected {
		t.Fatalf("group after remove: %+v", g)
	}
	if m := getMachine(t, svc, "c"); m.Group != "" || m.State != rebound.MachineProtected {
		t.Fatalf("c after remove: group %q state %s", m.Group, m.State)
	}
	f.writeAll(10)
	wait(svc.Failover(ctx, rebound.FailoverRequest{Machine: "c", Planned: true}))
	wait(svc.Failover(ctx, rebound.FailoverRequest{Machine: "g", Planned: true}))
	f.checkActive("after the split failovers")
	wait(svc.CancelFailover(ctx, "c"))
	wait(svc.CancelFailover(ctx, "g"))
	f.checkActive("after cancels")

	wait(loop.Unprotect(ctx, rebound.UnprotectRequest{Machine: "g"}))
	if _, err := f.svc.(rebound.GroupService).GetGroup(ctx, "g"); rebound.ErrorCode(err) != rebound.ENOTFOUND {
		t.Fatalf("group after unprotect: %v", err)
	}
	for _, n := range []string{"a", "b"} {
		if m := getMachine(t, svc, n); m.Group != "" || m.State != rebound.MachineUnprotected {
			t.Fatalf("%s after unprotect: group %q state %s", n, m.Group, m.State)
		}
	}
	f.writeAll(5)
	f.checkActive("after unprotect")
}

// TestGroupAppPoints: an app-consistent group point freezes every member,
// cuts one mark and thaws every member; a member without hooks, or one
// whose freeze fails, fails the point naming it, and every member that
// froze is thawed.
func TestGroupAppPoints(t *testing.T) {
	ctx := context.Background()
	f := newGroupFixture(t, "a", "b", "c")
	svc := f.svc
	wait := waitJob(t, svc)
	for _, n := range f.names {
		wait(svc.Protect(ctx, rebound.ProtectRequest{Machine: n, To: "recovery", Group: "g"}))
	}
	logs, dirs := map[string]string{}, map[string]string{}
	for _, n := range []string{"a", "b"} {
		dirs[n] = t.TempDir()
		freeze, thaw, log := hookScripts(t, dirs[n])
		logs[n] = log
		if _, err := svc.SetMachine(ctx, rebound.SetMachineRequest{Name: n, FreezeHook: &freeze, ThawHook: &thaw}); err != nil {
			t.Fatal(err)
		}
	}
	_, err := svc.CreatePoint(ctx, "g", true)
	wantErr(t, "app point with a member without hooks", err, rebound.ECONFLICT, "c", "no freeze hook")

	dirs["c"] = t.TempDir()
	freeze, thaw, log := hookScripts(t, dirs["c"])
	logs["c"] = log
	if _, err := svc.SetMachine(ctx, rebound.SetMachineRequest{Name: "c", FreezeHook: &freeze, ThawHook: &thaw}); err != nil {
		t.Fatal(err)
	}
	f.writeAll(20)
	p, err := svc.CreatePoint(ctx, "g", true)
	if err != nil {
		t.Fatal(err)
	}
	if p.Kind != rebound.PointApp {
		t.Fatalf("group app point kind %s", p.Kind)
	}
	want := map[string]string{}
	for _, n := range f.names {
		want[n] = f.oracles[n].model.Sum()
		if got := readLines(t, logs[n]); len(got) != 2 || got[0] != "freeze_"+n || got[1] != "thaw_"+n {
			t.Fatalf("hooks of %s: %q, want freeze then thaw", n, got)
		}
	}
	f.writeAll(10)
	wait(svc.TestFailover(ctx, "g", rebound.PointLatestAppConsistent))
	for _, n := range f.names {
		m := getMachine(t, svc, n)
		if m.TestFailover.Point.ID != p.ID {
			t.Fatalf("latest-app-consistent of g is %s, want %s", m.TestFailover.Point.ID, p.ID)
		}
		if got := diskSum(t, m.TestFailover.Disks[0].NBD); got != want[n] {
			t.Fatalf("app point of g: %s holds %s, want %s", n, got, want[n])
		}
	}
	wait(svc.TestFailoverCleanup(ctx, "g"))

	// b's freeze fails: the point fails naming b, and a, b and c thaw.
	if err := os.WriteFile(filepath.Join(dirs["b"], "fail-freeze"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = svc.CreatePoint(ctx, "g", true)
	wantErr(t, "app point with a failing freeze", err, rebound.ECONFLICT, "b: ", "database refused to freeze", "thawed")
	for _, n := range f.names {
		got := readLines(t, logs[n])
		if len(got) != 4 || got[3] != "thaw_"+n {
			t.Fatalf("hooks of %s after a failed group freeze: %q, want a thaw last", n, got)
		}
	}
	if got := readLines(t, logs["b"]); got[2] != "freeze-failed_b" {
		t.Fatalf("hooks of b: %q", got)
	}
	pl, err := svc.ListPoints(ctx, "g")
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range pl {
		if q.Kind == rebound.PointApp && q.ID != p.ID {
			t.Fatalf("a failed group freeze cut app point %s", q.ID)
		}
	}
}

// TestGroupJoinRetry: a join whose target step fails (the recovery site
// goes away right after the source moved the machine into the group's
// stream) is resumed by running the same protect again, and the group's
// points then hold both machines' bytes.
func TestGroupJoinRetry(t *testing.T) {
	ctx := context.Background()
	up, svc := fixedUp(t, nil)
	wait := waitJob(t, svc)
	oracles := map[string]*oracle{}
	for i, n := range []string{"a", "b"} {
		oracles[n] = newOracle(t, 4<<20, int64(300+i))
		m, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: n, Site: "primary", Disks: []int64{4 << 20}})
		if err != nil {
			t.Fatal(err)
		}
		oracles[n].write(m.Disks[0].NBD, 40)
	}
	wait(svc.Protect(ctx, rebound.ProtectRequest{Machine: "a", To: "recovery", Group: "g"}))
	wait(svc.Protect(ctx, rebound.ProtectRequest{Machine: "b", To: "recovery"}))
	oracles["b"].write(getMachine(t, svc, "b").Disks[0].NBD, 20)

	var cfg SiteConfig
	var once sync.Once
	disable := failpoint.Enable("server/job/protect/prepare target", func(context.Context) {
		once.Do(func() { cfg = stopSite(t, up, "recovery") })
	})
	j, err := svc.Protect(ctx, rebound.ProtectRequest{Machine: "b", To: "recovery", Group: "g"})
	j = jobEnd(t, svc, j, err)
	disable()
	if j.State != rebound.JobFailed || !strings.Contains(j.Error, "rebound protect b --to recovery --group g") {
		t.Fatalf("join with the target gone: %s %q", j.State, j.Error)
	}
	startSite(t, up, cfg)
	for _, n := range []string{"a", "b"} {
		oracles[n].write(getMachine(t, svc, n).Disks[0].NBD, 20)
	}
	wait(svc.Protect(ctx, rebound.ProtectRequest{Machine: "b", To: "recovery", Group: "g"}))
	g, err := svc.(rebound.GroupService).GetGroup(ctx, "g")
	if err != nil || len(g.Machines) != 2 || g.State != rebound.MachineProtected {
		t.Fatalf("group after the retried join: %+v %v", g, err)
	}
	p, err := svc.CreatePoint(ctx, "g", false)
	if err != nil {
		t.Fatal(err)
	}
	wait(svc.TestFailover(ctx, "g", p.ID))
	for _, n := range []string{"a", "b"} {
		if got := diskSum(t, getMachine(t, svc, n).TestFailover.Disks[0].NBD); got != oracles[n].model.Sum() {
			t.Fatalf("%s after the retried join: %s, want %s", n, got, oracles[n].model.Sum())
		}
	}
	wait(svc.TestFailoverCleanup(ctx, "g"))

	// A named policy on a member's protect changes the group's.
	if _, err := svc.PutPolicy(ctx, rebound.Policy{Name: "hourly", CrashInterval: rebound.Duration(time.Hour), RPOThreshold: rebound.Duration(time.Hour), Retention: rebound.Duration(48 * time.Hour)}); err != nil {
		t.Fatal(err)
	}
	wait(svc.Protect(ctx, rebound.ProtectRequest{Machine: "a", To: "recovery", Group: "g", Policy: "hourly"}))
	if g, err := svc.(rebound.GroupService).GetGroup(ctx, "g"); err != nil || g.Policy != "hourly" {
		t.Fatalf("group policy after protect --policy hourly: %+v %v", g, err)
	}
	if m := getMachine(t, svc, "b"); m.Protection == nil || m.Protection.Policy != "hourly" {
		t.Fatalf("member b's policy: %+v", m.Protection)
	}
}

// TestJobEndedFreesMachine: once a job reads as ended, the next verb on its
// machine or group is taken at once. A client waiting for the end (the CLI's
// --wait) used to be refused "has job ... running" in the moment between
// the job's final save and its machine being freed.
func TestJobEndedFreesMachine(t *testing.T) {
	ctx := context.Background()
	_, svc := fixedUp(t, nil)
	for _, n := range []string{"a", "b"} {
		if _, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: n, Site: "primary", Disks: []int64{4 << 20}}); err != nil {
			t.Fatal(err)
		}
	}
	var once sync.Once
	var ended string
	var next *rebound.Job
	var nextErr error
	first := make(chan string, 1)
	disable := failpoint.Enable("server/job/ended", func(context.Context) {
		once.Do(func() {
			// Right after the first job's final save: it reads as ended.
			j, err := svc.GetJob(ctx, <-first)
			if err != nil {
				nextErr = err
				return
			}
			ended = j.State
			next, nextErr = svc.Protect(ctx, rebound.ProtectRequest{Machine: "b", To: "recovery", Group: "g"})
		})
	})
	defer disable()
	j, err := svc.Protect(ctx, rebound.ProtectRequest{Machine: "a", To: "recovery", Group: "g"})
	if err != nil {
		t.Fatal(err)
	}
	first <- j.ID
	if j = jobEnd(t, svc, j, nil); j.State != rebound.JobSucceeded {
		t.Fatalf("protect a: %s %s", j.State, j.Error)
	}
	once.Do(func() {}) // the hook ran (jobEnd saw the save it follows)
	if ended != rebound.JobSucceeded {
		t.Fatalf("at the hook the first job reads %q, want succeeded", ended)
	}
	if nextErr != nil {
		t.Fatalf("the verb right after the job ended was refused: %v", nextErr)
	}
	if j := jobEnd(t, svc, next, nil); j.State != rebound.JobSucceeded {
		t.Fatalf("protect b: %s %s", j.State, j.Error)
	}
}
