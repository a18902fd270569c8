package server

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/pgtest"
	"github.com/rebound-dr/rebound/postgres"
	"github.com/rebound-dr/rebound/sqlite"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// fakeSite is a narrow stand-in for a site: it answers a failover's calls
// (idempotently, as sites do) and records them. A call whose context has
// ended is refused unrecorded, as over a control channel that closed.
type fakeSite struct {
	rebound.SiteService // any other call panics: the tests do not make it
	name                string

	mu    sync.Mutex
	calls []string
}

func (f *fakeSite) call(ctx context.Context, what string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	f.mu.Lock()
	f.calls = append(f.calls, what)
	f.mu.Unlock()
	return nil
}

func (f *fakeSite) count(what string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, c := range f.calls {
		if c == what {
			n++
		}
	}
	return n
}

var testPoint = rebound.RecoveryPoint{ID: "p10", Seq: 10, Kind: rebound.PointCrash, Time: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}

func (f *fakeSite) Status(ctx context.Context) (*rebound.SiteStatus, error) {
	return &rebound.SiteStatus{Site: f.name}, f.call(ctx, "status")
}
func (f *fakeSite) ListPoints(ctx context.Context, m string) (*rebound.PointList, error) {
	return &rebound.PointList{Points: []rebound.RecoveryPoint{testPoint}}, f.call(ctx, "list-points")
}
func (f *fakeSite) ResolvePoint(ctx context.Context, m, sel string) (rebound.RecoveryPoint, error) {
	return testPoint, f.call(ctx, "resolve")
}
func (f *fakeSite) CopyInfo(ctx context.Context, m string) (*rebound.CopyInfo, error) {
	return &rebound.CopyInfo{Generation: "g1"}, f.call(ctx, "copy-info")
}
func (f *fakeSite) Fence(ctx context.Context, m string) (uint64, error) {
	return testPoint.Seq, f.call(ctx, "fence")
}
func (f *fakeSite) Unfence(ctx context.Context, m string) error { return f.call(ctx, "unfence") }
func (f *fakeSite) Replicated(ctx context.Context, m string) (uint64, error) {
	return testPoint.Seq, f.call(ctx, "replicated")
}
func (f *fakeSite) Activate(ctx context.Context, spec rebound.ActivateSpec) ([]rebound.Disk, error) {
	return []rebound.Disk{{Name: "d0", Size: 1 << 20, NBD: "nbd://" + f.name + "/vm1"}}, f.call(ctx, "activate")
}
func (f *fakeSite) StartReplication(ctx context.Context, spec rebound.ReplicationSpec) error {
	return f.call(ctx, "start-replication")
}
func (f *fakeSite) Power(ctx context.Context, m, state string, test bool) error {
	return f.call(ctx, "power")
}

// haFixture is two servers on one store, with two fake sites both reach.
type haFixture struct {
	s1, s2 *Server
	a, b   *fakeSite
	db     rebound.Store // a third handle, for the test's own reads
}

func openStores(t *testing.T, kind string) (open func() rebound.Store) {
	switch kind {
	case "sqlite":
		path := filepath.Join(t.TempDir(), "rebound.db")
		return func() rebound.Store {
			db, err := sqlite.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { db.Close() })
			return db
		}
	default:
		dsn := pgtest.DSN(t)
		return func() rebound.Store {
			db, err := postgres.Open(context.Background(), dsn)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { db.Close() })
			return db
		}
	}
}

func newHA(t *testing.T, kind string, ttl time.Duration, hook1, hook2 func(ctx context.Context, j *rebound.Job, step string)) *haFixture {
	t.Helper()
	open := openStores(t, kind)
	f := &haFixture{a: &fakeSite{name: "a"}, b: &fakeSite{name: "b"}, db: open()}
	ctx := context.Background()
	m := &rebound.Machine{Name: "vm1", Driver: rebound.DriverNone, State: rebound.MachineProtected, ActiveSite: "a", HomeSite: "a",
		Health: rebound.HealthNormal, Disks: []rebound.Disk{{Name: "d0", Size: 1 << 20}},
		Protection: &rebound.Protection{SourceSite: "a", TargetSite: "b", Policy: "default", ReplState: "streaming"}}
	if err := f.db.CreateMachine(ctx, m); err != nil {
		t.Fatal(err)
	}
	sites := func(name string) (rebound.SiteService, bool) {
		switch name {
		case "a":
			return f.a, true
		case "b":
			return f.b, true
		}
		return nil, false
	}
	for i, hook := range []func(context.Context, *rebound.Job, string){hook1, hook2} {
		s := &Server{DB: open(), Site: sites, ID: []string{"s1", "s2"}[i], LeaseTTL: ttl, StepHook: hook, WaitTimeout: time.Minute}
		if err := s.Open(prometheus.NewRegistry()); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		if i == 0 {
			f.s1 = s
		} else {
			f.s2 = s
		}
	}
	return f
}

// waitEnded waits for job id to end, as a client waiting on it would
// (bounded: a job that never ends fails the test).
func waitEnded(t *testing.T, db rebound.Store, id string) *rebound.Job {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		j, err := db.GetJob(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		if j.EndedAt != nil {
			return j
		}
		if time.Now().After(deadline) {
			t.Fatalf("job %s did not end: %s at step %s, owner %s", id, j.State, j.Step, j.Owner)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestJobTakeover: server 1 runs a failover and stops inside its activate
// step (killed: it writes nothing more, or paused: it stops renewing its
// lease). Server 2 takes the job over once the lease expired and continues
// it from its last completed step under the same job ID, and the job
// succeeds. A paused server 1 that wakes up is fenced: it writes neither
// the job nor the machine, and calls no site again. On SQLite (two handles
// on one file) and on PostgreSQL.
func TestJobTakeover(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		for _, how := range []string{"killed", "paused"} {
			t.Run(kind+"/"+how, func(t *testing.T) { testJobTakeover(t, kind, how) })
		}
	}
}

func testJobTakeover(t *testing.T, kind, how string) {
	ctx := context.Background()
	reached, release := make(chan struct{}), make(chan struct{})
	hook1 := func(ctx context.Context, j *rebound.Job, step string) {
		if step == "activate" {
			close(reached)
			select {
			case <-ctx.Done():
			case <-release:
			}
		}
	}
	var mu sync.Mutex
	var steps2 []string
	hook2 := func(ctx context.Context, j *rebound.Job, step string) {
		mu.Lock()
		steps2 = append(steps2, step)
		mu.Unlock()
	}
	f := newHA(t, kind, 1500*time.Millisecond, hook1, hook2)
	job, err := f.s1.Failover(ctx, rebound.FailoverRequest{Machine: "vm1", Planned: true})
	if err != nil {
		t.Fatal(err)
	}
	<-reached
	held, err := f.db.GetJob(ctx, job.ID)
	if err != nil {
		t.Fatal(err)
	}
	if held.Owner != "s1" || held.Fence == 0 || len(held.Request) == 0 {
		t.Fatalf("job at server 1: owner %q fence %d request %s", held.Owner, held.Fence, held.Request)
	}
	// Server 2 refuses a command on the machine while the job holds it.
	if _, err := f.s2.Failover(ctx, rebound.FailoverRequest{Machine: "vm1"}); rebound.ErrorCode(err) != rebound.ECONFLICT {
		t.Fatalf("failover on server 2 while server 1 runs one: %v, want a conflict", err)
	}
	activates := f.b.count("activate")
	switch how {
	case "killed":
		f.s1.killed.Store(true)
		f.s1.Close()
	case "paused":
		f.s1.pauseLeases.Store(true)
	}

	j := waitEnded(t, f.db, job.ID)
	if j.State != rebound.JobSucceeded || j.Owner != "s2" || j.Fence <= held.Fence {
		t.Fatalf("job after takeover: %s (%s), owner %q fence %d (was %d)", j.State, j.Error, j.Owner, j.Fence, held.Fence)
	}
	mu.Lock()
	got := slices.Clone(steps2)
	mu.Unlock()
	if want := []string{"drain", "activate"}; !slices.Equal(got, want) {
		t.Fatalf("server 2 ran steps %v, want %v: it continues after the completed preflight", got, want)
	}
	for _, st := range j.Steps {
		if st.State != rebound.JobSucceeded {
			t.Fatalf("step %s is %s after the takeover", st.Name, st.State)
		}
	}
	m, err := f.db.GetMachine(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	if m.State != rebound.MachineFailedOver || m.ActiveSite != "b" || m.Failover == nil || m.Failover.Point.ID != testPoint.ID {
		t.Fatalf("machine after takeover: %s at %s, failover %+v", m.State, m.ActiveSite, m.Failover)
	}
	if n := f.b.count("activate"); n != activates+1 {
		t.Fatalf("activations at b: %d, want %d (server 2's)", n, activates+1)
	}

	if how == "paused" {
		// Server 1 wakes up inside its step: it finds the lease lost and
		// stops without writing or calling a site.
		close(release)
		f.s1.Close()
		if n := f.b.count("activate"); n != activates+1 {
			t.Fatalf("activations at b after server 1 woke: %d, want %d", n, activates+1)
		}
		if n := f.a.count("unfence"); n != 0 {
			t.Fatalf("server 1 rolled the failover back (%d unfence)", n)
		}
		after, _ := f.db.GetJob(ctx, job.ID)
		if after.State != rebound.JobSucceeded || after.Owner != "s2" || !after.UpdatedAt.Equal(j.UpdatedAt) {
			t.Fatalf("job after server 1 woke: %s owner %q updated %s (was %s)", after.State, after.Owner, after.UpdatedAt, j.UpdatedAt)
		}
		if m2, _ := f.db.GetMachine(ctx, "vm1"); m2.Revision != m.Revision {
			t.Fatalf("machine written after server 1 woke: revision %d, was %d", m2.Revision, m.Revision)
		}
	}
	// A write with server 1's fence is refused by the store.
	held.State = rebound.JobFailed
	if err := f.db.UpdateJob(ctx, held); rebound.ErrorCode(err) != rebound.ECONFLICT {
		t.Fatalf("write with the old fence: %v, want the lease-lost conflict", err)
	}
}

// TestConflictingCommandsOnTwoServers: two servers receive commands on one
// machine at once (a failover on one, a test failover on the other):
// exactly one starts, the other answers conflict naming the winner's job.
func TestConflictingCommandsOnTwoServers(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) {
			ctx := context.Background()
			hold := make(chan struct{})
			hook := func(ctx context.Context, j *rebound.Job, step string) {
				select {
				case <-ctx.Done():
				case <-hold:
				}
			}
			f := newHA(t, kind, DefaultLeaseTTL, hook, hook)
			defer close(hold)
			var wg sync.WaitGroup
			var jobs [2]*rebound.Job
			var errs [2]error
			wg.Add(2)
			go func() {
				defer wg.Done()
				jobs[0], errs[0] = f.s1.Failover(ctx, rebound.FailoverRequest{Machine: "vm1", Planned: true})
			}()
			go func() {
				defer wg.Done()
				jobs[1], errs[1] = f.s2.TestFailover(ctx, "vm1", "latest-processed")
			}()
			wg.Wait()
			won := -1
			for i := range errs {
				if errs[i] == nil {
					if won >= 0 {
						t.Fatalf("both commands started: %s and %s", jobs[0].ID, jobs[1].ID)
					}
					won = i
				}
			}
			if won < 0 {
				t.Fatalf("neither command started: %v; %v", errs[0], errs[1])
			}
			lost := errs[1-won]
			if rebound.ErrorCode(lost) != rebound.ECONFLICT || !strings.Contains(lost.Error(), jobs[won].ID) {
				t.Fatalf("the other command: %v, want a conflict naming job %s", lost, jobs[won].ID)
			}
		})
	}
}

// TestTakeoverReprotectAndUnresumable: jobs of a server that died (their
// lease expired) are taken over: a reprotect whose resync is in flight is
// followed to its end under the same job ID; a job whose type cannot be
// continued (commit) is failed with the message to run it again.
func TestTakeoverReprotectAndUnresumable(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) {
			ctx := context.Background()
			f := newHA(t, kind, 900*time.Millisecond, nil, nil)
			now := time.Now().UTC()
			for _, name := range []string{"a", "b"} {
				if err := f.db.PutSite(ctx, rebound.Site{Name: name, Status: "online", LastSeen: now.Add(time.Hour)}); err != nil {
					t.Fatal(err)
				}
			}
			// vm1 resyncs from b back to a: the dead server's reprotect
			// started the stream and was following it.
			m, _ := f.db.GetMachine(ctx, "vm1")
			m.State, m.ActiveSite, m.PreviousSite = rebound.MachineSyncing, "b", "a"
			m.Protection = &rebound.Protection{SourceSite: "b", TargetSite: "a", Policy: "default", ReplState: "resyncing"}
			if err := f.db.UpdateMachine(ctx, m); err != nil {
				t.Fatal(err)
			}
			steps := func(done int, names ...string) []rebound.JobStep {
				var out []rebound.JobStep
				for i, n := range names {
					st := rebound.JobQueued
					if i < done {
						st = rebound.JobSucceeded
					} else if i == done {
						st = rebound.JobRunning
					}
					out = append(out, rebound.JobStep{Name: n, State: st})
				}
				return out
			}
			rp := &rebound.Job{Type: "reprotect", Machine: "vm1", State: rebound.JobRunning, Step: "resync",
				Steps:   steps(5, "readiness", "preflight", "compare", "prepare target", "start source", "resync"),
				Request: []byte(`{"machine":"vm1","to":"a","policy":"default"}`)}
			cm := &rebound.Job{Type: "commit", Machine: "vm2", State: rebound.JobRunning, Step: "flatten",
				Steps: steps(0, "flatten", "release source"), Request: []byte(`{}`)}
			for _, j := range []*rebound.Job{rp, cm} {
				if err := f.db.CreateJob(ctx, j); err != nil {
					t.Fatal(err)
				}
				// The dead server's lease ends at once.
				if _, err := f.db.ClaimJob(ctx, j.ID, "dead", time.Nanosecond); err != nil {
					t.Fatal(err)
				}
			}
			j := waitEnded(t, f.db, rp.ID)
			if j.State != rebound.JobSucceeded || j.Owner == "dead" || j.Owner == "" {
				t.Fatalf("reprotect after takeover: %s (%s) owner %q", j.State, j.Error, j.Owner)
			}
			if m, _ := f.db.GetMachine(ctx, "vm1"); m.State != rebound.MachineProtected || m.Protection.SourceSite != "b" {
				t.Fatalf("machine after the resync was followed: %s from %s", m.State, m.Protection.SourceSite)
			}
			if n := f.b.count("start-replication"); n != 0 {
				t.Fatalf("the stream was started again (%d calls)", n)
			}
			c := waitEnded(t, f.db, cm.ID)
			if c.State != rebound.JobFailed || c.Error != stoppedMsg {
				t.Fatalf("commit after takeover: %s %q, want failed with %q", c.State, c.Error, stoppedMsg)
			}
		})
	}
}

// racingStore changes a machine behind the server's back just before the
// server's first write of it, as another server would.
type racingStore struct {
	rebound.Store
	raced bool
}

func (r *racingStore) UpdateMachine(ctx context.Context, m *rebound.Machine) error {
	if !r.raced {
		r.raced = true
		other, err := r.Store.GetMachine(ctx, m.Name)
		if err != nil {
			return err
		}
		other.PreviousSite = "other-server"
		if err := r.Store.UpdateMachine(ctx, other); err != nil {
			return err
		}
	}
	return r.Store.UpdateMachine(ctx, m)
}

// TestUpdateMachineRetriesConflict: a write that lost the compare-and-swap
// to another server's is applied again to the new record: neither change
// is lost.
func TestUpdateMachineRetriesConflict(t *testing.T) {
	ctx := context.Background()
	db, err := sqlite.Open(filepath.Join(t.TempDir(), "rebound.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.CreateMachine(ctx, &rebound.Machine{Name: "vm1", State: rebound.MachineProtected, Disks: []rebound.Disk{}}); err != nil {
		t.Fatal(err)
	}
	s := &Server{DB: &racingStore{Store: db}, ID: "s1"}
	if err := s.Open(prometheus.NewRegistry()); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	calls := 0
	if err := s.updateMachine(ctx, "vm1", func(m *rebound.Machine) { calls++; m.State = rebound.MachineFailingOver }); err != nil {
		t.Fatal(err)
	}
	m, _ := db.GetMachine(ctx, "vm1")
	if calls != 2 || m.State != rebound.MachineFailingOver || m.PreviousSite != "other-server" || m.Revision != 2 {
		t.Fatalf("after a lost compare-and-swap: %d applications, state %s, previous site %q, revision %d", calls, m.State, m.PreviousSite, m.Revision)
	}
}

// TestCancelOnOtherServer: failover on server 1, cancel on server 2:
// exactly one wins. While server 1's failover drains (before its point of
// no return), `job cancel` through server 2 is accepted: it answers with
// the job, not ended, and server 1 cancels it at its next lease renewal
// or at its next step; the failover ends cancelled, rolled back (the
// source unfenced, the machine protected), the target never activated.
// Once the failover passed its point of no return (activate), a cancel
// through either server is refused with a conflict, and the failover
// succeeds. The state-changing verbs on the machine (failover cancel,
// commit) answer conflict on server 2 throughout.
func TestCancelOnOtherServer(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		for _, when := range []string{"renewal", "step", "no-return"} {
			t.Run(kind+"/"+when, func(t *testing.T) { testCancelOnOtherServer(t, kind, when) })
		}
	}
}

func testCancelOnOtherServer(t *testing.T, kind, when string) {
	ctx := context.Background()
	at := map[string]string{"renewal": "drain", "step": "drain", "no-return": "activate"}[when]
	reached, release := make(chan struct{}), make(chan struct{})
	hook := func(ctx context.Context, j *rebound.Job, step string) {
		if step == at {
			close(reached)
			select {
			case <-ctx.Done(): // the cancel, seen at a lease renewal
			case <-release:
			}
		}
	}
	// An hour's lease: server 1's own renewals (every 20 min) play no
	// part; the test renews for it.
	f := newHA(t, kind, time.Hour, hook, nil)
	job, err := f.s1.Failover(ctx, rebound.FailoverRequest{Machine: "vm1", Planned: true})
	if err != nil {
		t.Fatal(err)
	}
	<-reached
	_, err = f.s2.CancelFailover(ctx, "vm1")
	if rebound.ErrorCode(err) != rebound.ECONFLICT || !strings.Contains(err.Error(), job.ID) {
		t.Fatalf("failover cancel on server 2 during server 1's failover: %v, want a conflict naming %s", err, job.ID)
	}
	if _, err := f.s2.Commit(ctx, "vm1"); rebound.ErrorCode(err) != rebound.ECONFLICT {
		t.Fatalf("commit on server 2 during server 1's failover: %v, want a conflict", err)
	}

	c, err := f.s2.CancelJob(ctx, job.ID)
	if when == "no-return" {
		if rebound.ErrorCode(err) != rebound.ECONFLICT || !strings.Contains(err.Error(), "point of no return") {
			t.Fatalf("job cancel on server 2 after the point of no return: %+v %v, want a conflict", c, err)
		}
		if _, err := f.s1.CancelJob(ctx, job.ID); rebound.ErrorCode(err) != rebound.ECONFLICT {
			t.Fatalf("job cancel on server 1 after the point of no return: %v, want a conflict", err)
		}
		close(release)
		j := waitEnded(t, f.db, job.ID)
		if j.State != rebound.JobSucceeded || j.Owner != "s1" || j.Cancel != rebound.CancelRefused {
			t.Fatalf("failover after the refused cancel: %s (%s) owner %q cancel %q", j.State, j.Error, j.Owner, j.Cancel)
		}
		if n := f.a.count("unfence"); n != 0 {
			t.Fatalf("the source was unfenced %d times", n)
		}
		if m, _ := f.db.GetMachine(ctx, "vm1"); m.State != rebound.MachineFailedOver || m.ActiveSite != "b" {
			t.Fatalf("machine: %s at %s, want failed over to b", m.State, m.ActiveSite)
		}
		return
	}
	if err != nil || c.EndedAt != nil || c.State != rebound.JobRunning || c.Cancel != rebound.CancelRequested {
		t.Fatalf("job cancel on server 2: %+v %v, want the job running with its cancel requested", c, err)
	}
	switch when {
	case "renewal":
		f.s1.renewLeases(ctx) // what server 1's lease loop does every TTL/3
	case "step":
		close(release) // server 1 goes on to its next step's lease check
	}
	j := waitEnded(t, f.db, job.ID)
	if j.State != rebound.JobCancelled || j.Owner != "s1" {
		t.Fatalf("failover after the cancel on server 2: %s (%s) owner %q, want cancelled", j.State, j.Error, j.Owner)
	}
	if n := f.b.count("activate"); n != 0 {
		t.Fatalf("the target was activated %d times after the cancel", n)
	}
	if n := f.a.count("unfence"); n != 1 {
		t.Fatalf("the source was unfenced %d times, want 1 (the rollback)", n)
	}
	if m, _ := f.db.GetMachine(ctx, "vm1"); m.State != rebound.MachineProtected || m.ActiveSite != "a" {
		t.Fatalf("machine after the cancel: %s at %s, want protected at a", m.State, m.ActiveSite)
	}
	// Cancelling an ended job, through either server, answers it unchanged.
	if e, err := f.s2.CancelJob(ctx, job.ID); err != nil || e.State != rebound.JobCancelled {
		t.Fatalf("cancel of the ended job: %+v %v", e, err)
	}
}

// TestCleanStopLeaseHandover: server 1 stops cleanly (Close) inside a
// failover's activate step. It hands the job's lease over at once: the
// store shows the job running with no owner and a higher fence, although
// the lease (an hour) is far from expiring, and server 2's next scan
// claims it and continues it after the completed preflight, under the
// same job ID. Server 1 undoes nothing on its way out.
func TestCleanStopLeaseHandover(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) {
			ctx := context.Background()
			reached := make(chan struct{})
			hook1 := func(ctx context.Context, j *rebound.Job, step string) {
				if step == "activate" {
					close(reached)
					<-ctx.Done() // Close cancels the job
				}
			}
			var mu sync.Mutex
			var steps2 []string
			hook2 := func(ctx context.Context, j *rebound.Job, step string) {
				mu.Lock()
				steps2 = append(steps2, step)
				mu.Unlock()
			}
			// An hour's lease: the servers' own scans (every 20 min) and
			// an expiry play no part; the test scans for server 2.
			f := newHA(t, kind, time.Hour, hook1, hook2)
			job, err := f.s1.Failover(ctx, rebound.FailoverRequest{Machine: "vm1", Planned: true})
			if err != nil {
				t.Fatal(err)
			}
			<-reached
			// A job no other server can continue (commit), running too.
			other, err := f.s1.startJob(ctx, "commit", "vm2", []string{"flatten"}, func(ctx context.Context, r *jobRun) error {
				r.Step("flatten")
				<-ctx.Done()
				return ctx.Err()
			})
			if err != nil {
				t.Fatal(err)
			}
			held, err := f.db.GetJob(ctx, job.ID)
			if err != nil {
				t.Fatal(err)
			}
			if exp, err := f.db.ExpiredJobs(ctx); err != nil || len(exp) != 0 {
				t.Fatalf("jobs listed for takeover while server 1 holds the lease: %+v %v", exp, err)
			}
			f.s1.Close()
			if o, _ := f.db.GetJob(ctx, other.ID); o.State != rebound.JobFailed || o.Error != interruptedMsg {
				t.Fatalf("commit job after the clean stop: %s %q, want failed as interrupted, as before", o.State, o.Error)
			}

			rel, err := f.db.GetJob(ctx, job.ID)
			if err != nil {
				t.Fatal(err)
			}
			if rel.State != rebound.JobRunning || rel.Owner != "" || rel.LeaseUntil != nil || rel.Fence != held.Fence+1 {
				t.Fatalf("job after server 1's clean stop: %s owner %q lease %v fence %d (held %d), want running, released",
					rel.State, rel.Owner, rel.LeaseUntil, rel.Fence, held.Fence)
			}
			if exp, err := f.db.ExpiredJobs(ctx); err != nil || len(exp) != 1 || exp[0].ID != job.ID {
				t.Fatalf("released job not listed for takeover: %+v %v", exp, err)
			}
			if n := f.a.count("unfence"); n != 0 {
				t.Fatalf("server 1 rolled the failover back on its way out (%d unfence)", n)
			}
			if err := f.s2.takeOverJobs(ctx, false); err != nil { // server 2's scan
				t.Fatal(err)
			}
			if c, _ := f.db.GetJob(ctx, job.ID); c.Owner != "s2" || c.Fence <= rel.Fence {
				t.Fatalf("after server 2's scan: owner %q fence %d, want server 2's claim above %d", c.Owner, c.Fence, rel.Fence)
			}
			j := waitEnded(t, f.db, job.ID)
			if j.State != rebound.JobSucceeded || j.Owner != "s2" {
				t.Fatalf("job after the handover: %s (%s), owner %q", j.State, j.Error, j.Owner)
			}
			mu.Lock()
			got := slices.Clone(steps2)
			mu.Unlock()
			if want := []string{"drain", "activate"}; !slices.Equal(got, want) {
				t.Fatalf("server 2 ran steps %v, want %v", got, want)
			}
			if m, _ := f.db.GetMachine(ctx, "vm1"); m.State != rebound.MachineFailedOver || m.ActiveSite != "b" {
				t.Fatalf("machine after the handover: %s at %s", m.State, m.ActiveSite)
			}
		})
	}
}

// A plan whose job runs on another server (found in the store, not in
// this server's memory) is not deleted: conflict naming the job; once the
// job ended the delete goes through.
func TestDeletePlanWithJobOnOtherServer(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) {
			ctx := context.Background()
			f := newHA(t, kind, DefaultLeaseTTL, nil, nil)
			if _, err := f.s1.ApplyPlan(ctx, rebound.Plan{Name: "app", Stages: []rebound.PlanStage{{Name: "db", Machines: []string{"vm1"}}}}); err != nil {
				t.Fatal(err)
			}
			// Server 1's plan job, as the store holds it while s1 runs it.
			j := &rebound.Job{Type: "plan-failover", State: rebound.JobRunning, Plan: &rebound.PlanProgress{Name: "app"}}
			if err := f.db.CreateJob(ctx, j); err != nil {
				t.Fatal(err)
			}
			err := f.s2.DeletePlan(ctx, "app")
			if rebound.ErrorCode(err) != rebound.ECONFLICT || !strings.Contains(err.Error(), j.ID) {
				t.Fatalf("delete through server 2 while server 1 runs %s: %v, want a conflict naming it", j.ID, err)
			}
			if _, err := f.s2.GetPlan(ctx, "app"); err != nil {
				t.Fatalf("the plan after the refused delete: %v", err)
			}
			now := time.Now()
			j.State, j.EndedAt = rebound.JobSucceeded, &now
			if err := f.db.UpdateJob(ctx, j); err != nil {
				t.Fatal(err)
			}
			if err := f.s2.DeletePlan(ctx, "app"); err != nil {
				t.Fatalf("delete once the job ended: %v", err)
			}
		})
	}
}
