// Package storetest is the contract every rebound.Store passes: one suite,
// run by sqlite and postgres against a real database each (restic's
// backend tests are the model). Behaviour that only one store has (SQLite's
// migrations from older files, a full disk) is tested in its package.
package storetest

import (
	"context"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

// Harness opens stores of one implementation and reaches into them where
// the contract is about what is stored.
type Harness struct {
	// Open returns a new, empty store; the suite closes it.
	Open func(t *testing.T) rebound.Store
	// Reopen closes s and opens the same database again.
	Reopen func(t *testing.T, s rebound.Store) rebound.Store
	// SetClock makes s read the time from now.
	SetClock func(s rebound.Store, now func() time.Time)
	// SecretStored says whether secret appears in clear anywhere the
	// store keeps tokens and sessions.
	SecretStored func(t *testing.T, s rebound.Store, secret string) bool
	// PasswordHash returns what s keeps of user's password.
	PasswordHash func(t *testing.T, s rebound.Store, user string) string
	// Rows counts the rows of table.
	Rows func(t *testing.T, s rebound.Store, table string) int
	// Second opens another handle on s's database, as a second server
	// does; the suite closes it.
	Second func(t *testing.T, s rebound.Store) rebound.Store
}

func (h Harness) open(t *testing.T) rebound.Store {
	t.Helper()
	s := h.Open(t)
	t.Cleanup(func() { s.Close() })
	return s
}

func (h Harness) reopen(t *testing.T, s rebound.Store) rebound.Store {
	t.Helper()
	s = h.Reopen(t, s)
	t.Cleanup(func() { s.Close() })
	return s
}

// Run runs the contract suite.
func Run(t *testing.T, h Harness) {
	for _, c := range []struct {
		name string
		fn   func(*testing.T, Harness)
	}{
		{"Machines", testMachines}, {"Sites", testSites}, {"Policies", testPolicies},
		{"DeletePolicy", testDeletePolicy}, {"Jobs", testJobs}, {"ConcurrentUpdateJob", testConcurrentUpdateJob},
		{"Events", testEvents}, {"EventIDs", testEventIDs}, {"QueryEvents", testQueryEvents}, {"EnrollTokens", testEnrollTokens},
		{"Settings", testSettings}, {"CertsAndRevocation", testCertsAndRevocation}, {"Users", testUsers},
		{"LastAdmin", testLastAdmin}, {"UserTokens", testUserTokens}, {"Sessions", testSessions},
		{"Audit", testAudit}, {"JobLocks", testJobLocks}, {"JobLeases", testJobLeases}, {"JobRelease", testJobRelease}, {"JobCancel", testJobCancel},
		{"MachineRevisions", testMachineRevisions},
	} {
		t.Run(c.name, func(t *testing.T) { c.fn(t, h) })
	}
}

// second is a call's error, for wantCode.
func second[T any](_ T, err error) error { return err }

func wantCode(t *testing.T, err error, code string) {
	t.Helper()
	if got := rebound.ErrorCode(err); got != code {
		t.Fatalf("error %v: code %q, want %q", err, got, code)
	}
}

func testMachine(name string) *rebound.Machine {
	ts := time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC)
	return &rebound.Machine{
		Name: name, Driver: "none", State: rebound.MachineFailedOver,
		ActiveSite: "b", HomeSite: "a", Health: rebound.HealthWarning, HealthReason: "lag",
		Disks: []rebound.Disk{{Name: "d0", Size: 1 << 30, NBD: "nbd://a/x"}},
		Protection: &rebound.Protection{SourceSite: "a", TargetSite: "b", Policy: "default",
			ReplState: "streaming", LagSeconds: 1.5, BacklogBytes: 7, LastPointTime: ts, ReportedAt: ts},
		Failover: &rebound.FailoverInfo{FromSite: "a", ToSite: "b", Planned: true,
			Point: rebound.RecoveryPoint{ID: "p1", Time: ts, Kind: rebound.PointApp, Seq: 42}},
		TestFailover: &rebound.TestFailover{Site: "b", Point: rebound.RecoveryPoint{ID: "p2", Time: ts, Kind: rebound.PointCrash, Seq: 9},
			Disks: []rebound.Disk{{Name: "d0", Size: 1 << 30, NBD: "nbd://b/test-x"}}},
		CreatedAt: ts,
	}
}

func testMachines(t *testing.T, h Harness) {
	ctx := context.Background()
	db := h.open(t)

	m := testMachine("web")
	if err := db.CreateMachine(ctx, m); err != nil {
		t.Fatal(err)
	}
	err := db.CreateMachine(ctx, testMachine("web"))
	wantCode(t, err, rebound.ECONFLICT)
	if want := `machine "web" already exists`; err.Error() != want {
		t.Fatalf("got %q want %q", err, want)
	}
	_, err = db.GetMachine(ctx, "nope")
	wantCode(t, err, rebound.ENOTFOUND)
	if want := `machine "nope" not found`; err.Error() != want {
		t.Fatalf("got %q want %q", err, want)
	}
	wantCode(t, db.CreateMachine(ctx, &rebound.Machine{}), rebound.EINVALID)

	got, err := db.GetMachine(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, m) {
		t.Fatalf("round trip:\n got %+v\nwant %+v", got, m)
	}

	m.State, m.Failover = rebound.MachineProtected, nil
	if err := db.UpdateMachine(ctx, m); err != nil {
		t.Fatal(err)
	}
	wantCode(t, db.UpdateMachine(ctx, testMachine("ghost")), rebound.ENOTFOUND)

	m2 := &rebound.Machine{Name: "app", Disks: []rebound.Disk{}}
	if err := db.CreateMachine(ctx, m2); err != nil {
		t.Fatal(err)
	}
	if m2.CreatedAt.IsZero() {
		t.Fatal("CreatedAt not set")
	}
	list, err := db.ListMachines(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 2 || list[0].Name != "app" || list[1].Name != "web" || list[1].State != rebound.MachineProtected || list[1].Failover != nil {
		t.Fatalf("list: %+v", list)
	}

	// Reopen keeps everything.
	db = h.reopen(t, db)
	got, err = db.GetMachine(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, m) {
		t.Fatalf("after reopen:\n got %+v\nwant %+v", got, m)
	}

	if err := db.DeleteMachine(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	wantCode(t, db.DeleteMachine(ctx, "web"), rebound.ENOTFOUND)
	_, err = db.GetMachine(ctx, "web")
	wantCode(t, err, rebound.ENOTFOUND)
	// The name is free again.
	if err := db.CreateMachine(ctx, testMachine("web")); err != nil {
		t.Fatal(err)
	}
}

// testMachineRevisions: UpdateMachine is a compare-and-swap on Revision;
// of two writers that read the same revision, one wins and the other is
// refused naming the machine, and racing writers never lose an update.
func testMachineRevisions(t *testing.T, h Harness) {
	ctx := context.Background()
	db := h.open(t)
	if err := db.CreateMachine(ctx, testMachine("web")); err != nil {
		t.Fatal(err)
	}
	a, err := db.GetMachine(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := db.GetMachine(ctx, "web")
	if a.Revision != 0 {
		t.Fatalf("new machine at revision %d", a.Revision)
	}
	a.State = rebound.MachineProtected
	if err := db.UpdateMachine(ctx, a); err != nil {
		t.Fatal(err)
	}
	if a.Revision != 1 {
		t.Fatalf("revision after update %d, want 1", a.Revision)
	}
	b.State = rebound.MachineFailingOver
	err = db.UpdateMachine(ctx, b)
	wantCode(t, err, rebound.ECONFLICT)
	if !strings.Contains(err.Error(), `machine "web"`) || b.Revision != 0 {
		t.Fatalf("stale update: %v (revision %d)", err, b.Revision)
	}
	got, _ := db.GetMachine(ctx, "web")
	if got.State != rebound.MachineProtected || got.Revision != 1 {
		t.Fatalf("stored %s at revision %d after a refused write", got.State, got.Revision)
	}
	db = h.reopen(t, db)
	if got, _ = db.GetMachine(ctx, "web"); got.Revision != 1 {
		t.Fatalf("revision after reopen %d", got.Revision)
	}

	// Racing read-modify-write loops that retry on a conflict: every
	// increment lands once.
	const workers, each = 4, 5
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				for {
					m, err := db.GetMachine(ctx, "web")
					if err != nil {
						errs <- err
						return
					}
					m.Disks[0].Size++
					err = db.UpdateMachine(ctx, m)
					if err == nil {
						break
					}
					if rebound.ErrorCode(err) != rebound.ECONFLICT {
						errs <- err
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	got, _ = db.GetMachine(ctx, "web")
	if want := got.Disks[0].Size; want != testMachine("web").Disks[0].Size+workers*each || got.Revision != 1+workers*each {
		t.Fatalf("after racing updates: size %d revision %d", want, got.Revision)
	}
}

func testSites(t *testing.T, h Harness) {
	ctx := context.Background()
	db := h.open(t)
	s := rebound.Site{Name: "b", Status: rebound.SiteOnline, NBDAddr: "b:10809", ReplAddr: "b:7000",
		FreeBytes: 99, LastSeen: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), Version: "v1"}
	if err := db.PutSite(ctx, s); err != nil {
		t.Fatal(err)
	}
	if err := db.PutSite(ctx, rebound.Site{Name: "a", Status: rebound.SiteOffline}); err != nil {
		t.Fatal(err)
	}
	s.FreeBytes = 100 // upsert
	if err := db.PutSite(ctx, s); err != nil {
		t.Fatal(err)
	}
	got, err := db.GetSite(ctx, "b")
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(*got, s) {
		t.Fatalf("got %+v want %+v", got, s)
	}
	_, err = db.GetSite(ctx, "zz")
	wantCode(t, err, rebound.ENOTFOUND)
	wantCode(t, db.PutSite(ctx, rebound.Site{}), rebound.EINVALID)
	list, err := db.ListSites(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 2 || list[0].Name != "a" || list[1].FreeBytes != 100 {
		t.Fatalf("list %+v", list)
	}
}

func testPolicies(t *testing.T, h Harness) {
	ctx := context.Background()
	db := h.open(t)
	p, err := db.GetPolicy(ctx, "default")
	if err != nil {
		t.Fatal(err)
	}
	if *p != rebound.DefaultPolicy() {
		t.Fatalf("default %+v", p)
	}
	gold := rebound.Policy{Name: "gold", RPOThreshold: rebound.Duration(time.Second), Retention: rebound.Duration(time.Hour),
		CrashInterval: rebound.Duration(time.Second), AppInterval: rebound.Duration(time.Minute)}
	if err := db.PutPolicy(ctx, gold); err != nil {
		t.Fatal(err)
	}
	// An operator's change of "default" survives reopen (no re-seeding).
	def := rebound.DefaultPolicy()
	def.Retention = rebound.Duration(2 * time.Hour)
	if err := db.PutPolicy(ctx, def); err != nil {
		t.Fatal(err)
	}
	db = h.reopen(t, db)
	list, err := db.ListPolicies(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 2 || list[0] != def || list[1] != gold {
		t.Fatalf("list %+v", list)
	}
	_, err = db.GetPolicy(ctx, "silver")
	wantCode(t, err, rebound.ENOTFOUND)
	wantCode(t, db.PutPolicy(ctx, rebound.Policy{}), rebound.EINVALID)
}

func testDeletePolicy(t *testing.T, h Harness) {
	ctx := context.Background()
	db := h.open(t)
	gold := rebound.DefaultPolicy()
	gold.Name = "gold"
	if err := db.PutPolicy(ctx, gold); err != nil {
		t.Fatal(err)
	}
	if err := db.DeletePolicy(ctx, "gold"); err != nil {
		t.Fatal(err)
	}
	_, err := db.GetPolicy(ctx, "gold")
	wantCode(t, err, rebound.ENOTFOUND)
	wantCode(t, db.DeletePolicy(ctx, "gold"), rebound.ENOTFOUND)
	if ps, _ := db.ListPolicies(ctx); len(ps) != 1 || ps[0].Name != "default" {
		t.Fatalf("policies %+v", ps)
	}
}

func testJobs(t *testing.T, h Harness) {
	ctx := context.Background()
	db := h.open(t)
	var ids []string
	// One job per machine runs at a time (testJobLocks): job 1 of "b"
	// starts queued and is the only one to end below.
	for i, machine := range []string{"a", "b", "c", "", "d"} {
		state := rebound.JobRunning
		if i == 1 {
			state = rebound.JobQueued
		}
		j := &rebound.Job{Type: "protect", Machine: machine, State: state,
			Steps: []rebound.JobStep{{Name: "copy", State: rebound.JobRunning}, {Name: "done", State: rebound.JobQueued}}}
		if err := db.CreateJob(ctx, j); err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(j.ID, "j-") || len(j.ID) != 10 || j.CreatedAt.IsZero() || j.UpdatedAt.IsZero() {
			t.Fatalf("job not filled in: %+v", j)
		}
		ids = append(ids, j.ID)
	}
	wantCode(t, db.CreateJob(ctx, &rebound.Job{ID: ids[0]}), rebound.ECONFLICT)

	all, err := db.ListJobs(ctx, "", 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 5 || all[0].ID != ids[4] || all[4].ID != ids[0] {
		t.Fatalf("not newest first: %v vs %v", all, ids)
	}
	bs, err := db.ListJobs(ctx, "b", 1)
	if err != nil {
		t.Fatal(err)
	}
	if len(bs) != 1 || bs[0].ID != ids[1] {
		t.Fatalf("filter/limit: %+v", bs)
	}

	j, err := db.GetJob(ctx, ids[1])
	if err != nil {
		t.Fatal(err)
	}
	end := time.Now().UTC()
	j.State, j.Progress, j.EndedAt, j.Result = rebound.JobSucceeded, 1, &end, map[string]any{"point": "p1"}
	j.Steps[0].State, j.Steps[1].State = rebound.JobSucceeded, rebound.JobSucceeded
	if err := db.UpdateJob(ctx, j); err != nil {
		t.Fatal(err)
	}
	got, err := db.GetJob(ctx, ids[1])
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, j) {
		t.Fatalf("round trip:\n got %+v\nwant %+v", got, j)
	}
	_, err = db.GetJob(ctx, "j-nope")
	wantCode(t, err, rebound.ENOTFOUND)
	wantCode(t, db.UpdateJob(ctx, &rebound.Job{ID: "j-nope"}), rebound.ENOTFOUND)

	n, err := db.FailInterruptedJobs(ctx, "server restarted")
	if err != nil {
		t.Fatal(err)
	}
	if n != 4 {
		t.Fatalf("failed %d jobs, want 4", n)
	}
	all, _ = db.ListJobs(ctx, "", 0)
	for _, j := range all {
		if j.ID == ids[1] {
			if j.State != rebound.JobSucceeded {
				t.Fatalf("finished job touched: %+v", j)
			}
			continue
		}
		if j.State != rebound.JobFailed || j.Error != "server restarted" || j.EndedAt == nil ||
			j.Steps[0].State != rebound.JobFailed || j.Steps[1].State != rebound.JobFailed {
			t.Fatalf("not failed: %+v", j)
		}
	}
	if n, _ := db.FailInterruptedJobs(ctx, "again"); n != 0 {
		t.Fatalf("second run failed %d", n)
	}
}

func testConcurrentUpdateJob(t *testing.T, h Harness) {
	ctx := context.Background()
	db := h.open(t)
	const jobs, updates = 4, 25
	js := make([]*rebound.Job, jobs)
	for i := range js {
		js[i] = &rebound.Job{Type: "t", State: rebound.JobRunning}
		if err := db.CreateJob(ctx, js[i]); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	errs := make(chan error, jobs*2*updates)
	for i := range jobs {
		for w := range 2 { // two writers per job
			wg.Add(1)
			go func() {
				defer wg.Done()
				for u := 1; u <= updates; u++ {
					j := *js[i]
					j.Step = fmt.Sprintf("w%d", w)
					j.Progress = float64(u) / updates
					if err := db.UpdateJob(ctx, &j); err != nil {
						errs <- err
						return
					}
					if _, err := db.GetJob(ctx, j.ID); err != nil {
						errs <- err
						return
					}
				}
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for _, j := range js {
		got, err := db.GetJob(ctx, j.ID)
		if err != nil {
			t.Fatal(err)
		}
		if got.Progress != 1 || (got.Step != "w0" && got.Step != "w1") {
			t.Fatalf("lost update: %+v", got)
		}
	}
}

func testEvents(t *testing.T, h Harness) {
	ctx := context.Background()
	db := h.open(t)
	ts := time.Date(2026, 3, 4, 5, 6, 7, 8, time.UTC)
	for i := range 4 {
		e := rebound.Event{Machine: []string{"a", "b"}[i%2], Site: "s", Kind: "health", Message: fmt.Sprint("m", i)}
		if i == 0 {
			e.Time = ts
		}
		if err := db.AddEvent(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
	all, err := db.ListEvents(ctx, "", 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 4 || all[0].Message != "m3" || all[3].Message != "m0" || !all[3].Time.Equal(ts) || all[0].Time.IsZero() {
		t.Fatalf("events %+v", all)
	}
	if all[0].ID <= all[1].ID {
		t.Fatalf("ids not increasing: %+v", all)
	}
	as, err := db.ListEvents(ctx, "a", 1)
	if err != nil {
		t.Fatal(err)
	}
	if len(as) != 1 || as[0].Message != "m2" || as[0].Site != "s" || as[0].Kind != "health" {
		t.Fatalf("filtered %+v", as)
	}
}

// testEventIDs: an event whose EventID is stored is not stored again,
// even when two servers (two handles on one database) add it at the same
// time, many times over; events without an EventID are all kept.
func testEventIDs(t *testing.T, h Harness) {
	ctx := context.Background()
	db1 := h.open(t)
	db2 := h.Second(t, db1)
	t.Cleanup(func() { db2.Close() })
	const ids, tries = 6, 4
	start := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 2*tries*(ids+1))
	for w, db := range []rebound.Store{db1, db2, db1, db2} {
		for range tries / 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				for i := range ids {
					e := rebound.Event{Site: "s", Kind: "site.test", Message: fmt.Sprint("once ", i), EventID: fmt.Sprintf("s/p-%d", i)}
					if err := db.AddEvent(ctx, e); err != nil {
						errs <- err
					}
				}
				// Without an ID: every one is kept.
				if err := db.AddEvent(ctx, rebound.Event{Site: "s", Kind: "site.test", Message: fmt.Sprint("each ", w)}); err != nil {
					errs <- err
				}
			}()
		}
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	all, err := db2.ListEvents(ctx, "", 0)
	if err != nil {
		t.Fatal(err)
	}
	once, each := map[string]int{}, 0
	for _, e := range all {
		if strings.HasPrefix(e.Message, "once ") {
			once[e.Message]++
		} else {
			each++
		}
	}
	if len(once) != ids || each != 4*(tries/2) {
		t.Fatalf("want %d events with an ID and %d without, got %d and %d: %+v", ids, 4*(tries/2), len(once), each, all)
	}
	for m, n := range once {
		if n != 1 {
			t.Fatalf("event %q stored %d times", m, n)
		}
	}
	if n := h.Rows(t, db1, "events"); n != ids+4*(tries/2) {
		t.Fatalf("events table has %d rows, want %d", n, ids+4*(tries/2))
	}
	// Later, one more time: still one.
	if err := db1.AddEvent(ctx, rebound.Event{Site: "s", Kind: "site.test", Message: "once 0", EventID: "s/p-0"}); err != nil {
		t.Fatal(err)
	}
	if n := h.Rows(t, db2, "events"); n != ids+4*(tries/2) {
		t.Fatalf("a resent event was stored again: %d rows", n)
	}
}

// TestQueryEvents: filters by machine, kind (exact or dotted prefix) and
// time, pages newest first with a cursor that events added meanwhile do
// not shift.
func testQueryEvents(t *testing.T, h Harness) {
	ctx := context.Background()
	db := h.open(t)
	base := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	kinds := []string{"job.protect", "health.changed", "jobless"}
	for i := 0; i < 30; i++ {
		e := rebound.Event{Time: base.Add(time.Duration(i) * time.Minute), Machine: fmt.Sprintf("vm%d", i%2),
			Kind: kinds[i%3], Message: fmt.Sprint(i)}
		if err := db.AddEvent(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
	msgs := func(p *rebound.EventPage) (s []string) {
		for _, e := range p.Events {
			s = append(s, e.Message)
		}
		return s
	}
	q := rebound.ListQuery{Limit: 4}
	p, err := db.QueryEvents(ctx, q)
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(msgs(p)); got != "[29 28 27 26]" || p.Next == "" {
		t.Fatalf("first page %s next %q", got, p.Next)
	}
	// An event added between pages shows on no later page.
	if err := db.AddEvent(ctx, rebound.Event{Time: base.Add(time.Hour), Kind: "job.x", Message: "late"}); err != nil {
		t.Fatal(err)
	}
	q.Cursor = p.Next
	if p, err = db.QueryEvents(ctx, q); err != nil || fmt.Sprint(msgs(p)) != "[25 24 23 22]" {
		t.Fatalf("second page %v %v", msgs(p), err)
	}
	// Filters: vm1's job.* events from minute 10 to before 25.
	q = rebound.ListQuery{Limit: 100, Machine: "vm1", Kind: "job", Since: base.Add(10 * time.Minute), Until: base.Add(25 * time.Minute)}
	if p, err = db.QueryEvents(ctx, q); err != nil || fmt.Sprint(msgs(p)) != "[21 15]" || p.Next != "" {
		t.Fatalf("filtered %v next %q %v", msgs(p), p.Next, err)
	}
	// "job" is a dotted prefix: "jobless" is not a job event.
	q = rebound.ListQuery{Limit: 100, Kind: "job", Since: base, Until: base.Add(6 * time.Minute)}
	if p, err = db.QueryEvents(ctx, q); err != nil || fmt.Sprint(msgs(p)) != "[3 0]" {
		t.Fatalf("kind prefix %v %v", msgs(p), err)
	}
	q.Kind = "jobless"
	if p, err = db.QueryEvents(ctx, q); err != nil || fmt.Sprint(msgs(p)) != "[5 2]" {
		t.Fatalf("exact kind %v %v", msgs(p), err)
	}
	// The last page has no next; a page exactly at the end neither.
	q = rebound.ListQuery{Limit: 31}
	if p, err = db.QueryEvents(ctx, q); err != nil || len(p.Events) != 31 || p.Next != "" {
		t.Fatalf("whole list %d next %q %v", len(p.Events), p.Next, err)
	}
	_, err = db.QueryEvents(ctx, rebound.ListQuery{Limit: 5, Cursor: "x1"})
	wantCode(t, err, rebound.EINVALID)
	_, err = db.QueryEvents(ctx, rebound.ListQuery{})
	wantCode(t, err, rebound.EINVALID)
}

func testEnrollTokens(t *testing.T, h Harness) {
	ctx := context.Background()
	db := h.open(t)
	_, err := db.CreateJoinToken(ctx, "b", "site", false, 0)
	wantCode(t, err, rebound.EINVALID)

	sec, err := db.CreateJoinToken(ctx, "b", "site", false, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	// Wrong site fails and does not consume the token.
	err = db.Enroll(ctx, sec, "c", "site", "s1")
	wantCode(t, err, rebound.EUNAUTHORIZED)
	if !strings.Contains(err.Error(), `for site "b"`) {
		t.Fatalf("message %q", err)
	}
	if err := db.Enroll(ctx, sec, "b", "site", "s1"); err != nil {
		t.Fatal(err)
	}
	err = db.Enroll(ctx, sec, "b", "site", "s2")
	wantCode(t, err, rebound.EUNAUTHORIZED)
	if !strings.Contains(err.Error(), "already used") {
		t.Fatalf("message %q", err)
	}
	err = db.Enroll(ctx, "rbe_bogus", "b", "site", "s3")
	wantCode(t, err, rebound.EUNAUTHORIZED)

	// Expiry, with a moved clock.
	sec2, _ := db.CreateJoinToken(ctx, "b", "site", false, time.Minute)
	h.SetClock(db, func() time.Time { return time.Now().Add(2 * time.Minute) })
	err = db.Enroll(ctx, sec2, "b", "site", "s4")
	wantCode(t, err, rebound.EUNAUTHORIZED)
	if !strings.Contains(err.Error(), "expired") {
		t.Fatalf("message %q", err)
	}
	h.SetClock(db, time.Now)

	// Racing uses: exactly one wins.
	sec3, _ := db.CreateJoinToken(ctx, "b", "site", false, time.Hour)
	var wg sync.WaitGroup
	var mu sync.Mutex
	ok := 0
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := db.Enroll(ctx, sec3, "b", "site", fmt.Sprint("r", i))
			if err == nil {
				mu.Lock()
				ok++
				mu.Unlock()
			} else if rebound.ErrorCode(err) != rebound.EUNAUTHORIZED {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if ok != 1 {
		t.Fatalf("%d concurrent uses succeeded", ok)
	}
}

func testSettings(t *testing.T, h Harness) {
	ctx := context.Background()
	db := h.open(t)
	if _, ok, err := db.GetSetting(ctx, "ca"); ok || err != nil {
		t.Fatalf("unset: %v %v", ok, err)
	}
	db.PutSetting(ctx, "ca", "one")
	if err := db.PutSetting(ctx, "ca", "two"); err != nil {
		t.Fatal(err)
	}
	db = h.reopen(t, db)
	if v, ok, err := db.GetSetting(ctx, "ca"); v != "two" || !ok || err != nil {
		t.Fatalf("got %q %v %v", v, ok, err)
	}
}

// Tokens bind a role; enrolment records the certificate; a rotating
// certificate's first use revokes the name's others; removal revokes all
// and drops unused tokens.
func testCertsAndRevocation(t *testing.T, h Harness) {
	ctx := context.Background()
	db := h.open(t)

	agentTok, err := db.CreateJoinToken(ctx, "srv1", "agent", false, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Enroll(ctx, agentTok, "srv1", "site", "s0")
	wantCode(t, err, rebound.EUNAUTHORIZED)
	if !strings.Contains(err.Error(), "minted for an agent") || !strings.Contains(err.Error(), "rebound site token srv1") {
		t.Fatalf("message %q", err)
	}
	if p, _ := db.PendingTokens(ctx); !slices.Equal(p, []string{"srv1"}) {
		t.Fatalf("the refused attempt used the token: pending %v", p)
	}
	if err := db.Enroll(ctx, agentTok, "srv1", "agent", "a1"); err != nil {
		t.Fatal(err)
	}
	wantCode(t, db.Enroll(ctx, agentTok, "srv1", "agent", "a2"), rebound.EUNAUTHORIZED)

	siteTok, _ := db.CreateJoinToken(ctx, "primary", "site", false, time.Hour)
	err = db.Enroll(ctx, siteTok, "primary", "agent", "x")
	wantCode(t, err, rebound.EUNAUTHORIZED)
	if !strings.Contains(err.Error(), "minted for a site") || !strings.Contains(err.Error(), "--agent") {
		t.Fatalf("message %q", err)
	}
	if err := db.Enroll(ctx, siteTok, "primary", "site", "p1"); err != nil {
		t.Fatal(err)
	}
	// A certificate the store never saw (issued before it recorded them)
	// is recorded at its first use.
	if rev, err := db.CertUsed(ctx, "p0", "primary", "site"); err != nil || rev != nil {
		t.Fatalf("unknown certificate: %v %v", rev, err)
	}
	if rev, err := db.CertUsed(ctx, "p1", "primary", "site"); err != nil || rev != nil {
		t.Fatalf("plain certificate's first use revoked %v (%v)", rev, err)
	}

	rotTok, _ := db.CreateJoinToken(ctx, "primary", "site", true, time.Hour)
	if err := db.Enroll(ctx, rotTok, "primary", "site", "p2"); err != nil {
		t.Fatal(err)
	}
	if l, _ := db.RevokedSerials(ctx); len(l) != 0 {
		t.Fatalf("enrolling the rotation revoked %v before its first use", l)
	}
	rev, err := db.CertUsed(ctx, "p2", "primary", "site")
	if err != nil || !slices.Equal(rev, []string{"p0", "p1"}) {
		t.Fatalf("rotation's first use revoked %v (%v), want p0 p1", rev, err)
	}
	if rev, _ := db.CertUsed(ctx, "p2", "primary", "site"); rev != nil {
		t.Fatalf("second use revoked %v", rev)
	}

	db.CreateJoinToken(ctx, "srv1", "site", false, time.Hour) // unused, dropped by the removal
	rev, err = db.RevokeSite(ctx, "srv1", "removed")
	if err != nil || !slices.Equal(rev, []string{"a1"}) {
		t.Fatalf("removal revoked %v (%v)", rev, err)
	}
	if l, _ := db.RevokedSerials(ctx); !slices.Equal(l, []string{"a1", "p0", "p1"}) {
		t.Fatalf("revocation list %v", l)
	}
	if p, _ := db.PendingTokens(ctx); len(p) != 0 {
		t.Fatalf("pending after the removal: %v", p)
	}
	certs, _ := db.Certs(ctx, "primary")
	var live []string
	for _, c := range certs {
		if c.RevokedAt.IsZero() {
			live = append(live, c.Serial)
		} else if c.Reason != "rotated" {
			t.Fatalf("%s revoked as %q", c.Serial, c.Reason)
		}
	}
	if !slices.Equal(live, []string{"p2"}) {
		t.Fatalf("primary's live certificates %v", live)
	}
}

func userNames(t *testing.T, db rebound.Store) []string {
	t.Helper()
	us, err := db.ListUsers(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, u := range us {
		out = append(out, fmt.Sprintf("%s:%s:%v", u.Name, u.Role, u.PasswordSet))
	}
	return out
}

// Users: names, roles and passwords are checked; a generated password is
// returned once and works; the stored hash is salted argon2id; an unknown
// user and a wrong password are the same error.
func testUsers(t *testing.T, h Harness) {
	ctx := context.Background()
	db := h.open(t)

	res, err := db.CreateUser(ctx, rebound.CreateUserRequest{Name: "alice", Role: rebound.RoleOperator, Password: "correct horse battery"})
	if err != nil {
		t.Fatal(err)
	}
	if res.Password != "" || res.User.Name != "alice" || res.User.Role != rebound.RoleOperator || !res.User.PasswordSet || res.User.CreatedAt.IsZero() {
		t.Fatalf("created %+v", res)
	}
	gen, err := db.CreateUser(ctx, rebound.CreateUserRequest{Name: "bob", Role: rebound.RoleViewer})
	if err != nil {
		t.Fatal(err)
	}
	if len(gen.Password) < 12 {
		t.Fatalf("generated password %q", gen.Password)
	}
	if u, err := db.CheckPassword(ctx, "bob", gen.Password); err != nil || u.Name != "bob" || u.Role != rebound.RoleViewer {
		t.Fatalf("generated password: %+v %v", u, err)
	}
	// Same password, other salt.
	db.CreateUser(ctx, rebound.CreateUserRequest{Name: "carol", Role: rebound.RoleAdmin, Password: "correct horse battery"})
	h1, h2 := h.PasswordHash(t, db, "alice"), h.PasswordHash(t, db, "carol")
	if !strings.HasPrefix(h1, "$argon2id$") || h1 == h2 || strings.Contains(h1, "horse") {
		t.Fatalf("hashes %q %q", h1, h2)
	}

	for _, tc := range []struct {
		req  rebound.CreateUserRequest
		code string
		msg  string
	}{
		{rebound.CreateUserRequest{Name: "alice", Role: rebound.RoleViewer}, rebound.ECONFLICT, "already exists"},
		{rebound.CreateUserRequest{Name: "dave", Role: rebound.RoleViewer, Password: "short"}, rebound.EINVALID, "at least 12"},
		{rebound.CreateUserRequest{Name: "dave", Role: "root"}, rebound.EINVALID, "viewer, operator or admin"},
		{rebound.CreateUserRequest{Name: "Dave", Role: rebound.RoleViewer}, rebound.EINVALID, "invalid user name"},
		{rebound.CreateUserRequest{Name: "", Role: rebound.RoleViewer}, rebound.EINVALID, "invalid user name"},
	} {
		_, err := db.CreateUser(ctx, tc.req)
		wantCode(t, err, tc.code)
		if !strings.Contains(err.Error(), tc.msg) {
			t.Fatalf("%+v: %v", tc.req, err)
		}
	}
	if got := userNames(t, db); !slices.Equal(got, []string{"alice:operator:true", "bob:viewer:true", "carol:admin:true"}) {
		t.Fatalf("users %v", got)
	}

	_, errWrong := db.CheckPassword(ctx, "alice", "correct horse battery!")
	_, errUnknown := db.CheckPassword(ctx, "zed", "correct horse battery")
	wantCode(t, errWrong, rebound.EUNAUTHORIZED)
	wantCode(t, errUnknown, rebound.EUNAUTHORIZED)
	if errWrong.Error() != errUnknown.Error() {
		t.Fatalf("the messages tell users apart: %q, %q", errWrong, errUnknown)
	}
	// A user without a password (the migrated admin) cannot log in.
	if created, err := db.EnsureUser(ctx, "robot", rebound.RoleViewer); err != nil || !created {
		t.Fatalf("ensure: %v %v", created, err)
	}
	if created, _ := db.EnsureUser(ctx, "robot", rebound.RoleAdmin); created {
		t.Fatal("ensured twice")
	}
	if u, _ := db.GetUser(ctx, "robot"); u.Role != rebound.RoleViewer || u.PasswordSet {
		t.Fatalf("robot %+v", u)
	}
	_, err = db.CheckPassword(ctx, "robot", "")
	wantCode(t, err, rebound.EUNAUTHORIZED)

	// A new password ends the sessions; the old one stops working.
	sess, _ := db.CreateSession(ctx, "alice", time.Hour)
	wantCode(t, db.SetPassword(ctx, "alice", "too short"), rebound.EINVALID)
	wantCode(t, db.SetPassword(ctx, "nobody", "long enough password"), rebound.ENOTFOUND)
	if _, err := db.CheckSession(ctx, sess); err != nil {
		t.Fatalf("a refused password change ended the session: %v", err)
	}
	if err := db.SetPassword(ctx, "alice", "another long password"); err != nil {
		t.Fatal(err)
	}
	_, err = db.CheckSession(ctx, sess)
	wantCode(t, err, rebound.EUNAUTHORIZED)
	_, err = db.CheckPassword(ctx, "alice", "correct horse battery")
	wantCode(t, err, rebound.EUNAUTHORIZED)

	db = h.reopen(t, db)
	if _, err := db.CheckPassword(ctx, "alice", "another long password"); err != nil {
		t.Fatalf("after reopen: %v", err)
	}
}

// The last admin can be neither deleted nor demoted; with two, one can.
func testLastAdmin(t *testing.T, h Harness) {
	ctx := context.Background()
	db := h.open(t)
	db.EnsureUser(ctx, "root", rebound.RoleAdmin)
	db.EnsureUser(ctx, "ops", rebound.RoleOperator)

	err := db.DeleteUser(ctx, "root")
	wantCode(t, err, rebound.ECONFLICT)
	if !strings.Contains(err.Error(), "last admin") || !strings.Contains(err.Error(), "rebound user set-role") {
		t.Fatalf("message %q", err)
	}
	wantCode(t, db.SetRole(ctx, "root", rebound.RoleOperator), rebound.ECONFLICT)
	wantCode(t, db.SetRole(ctx, "ops", "superuser"), rebound.EINVALID)
	wantCode(t, db.SetRole(ctx, "nobody", rebound.RoleAdmin), rebound.ENOTFOUND)
	wantCode(t, db.DeleteUser(ctx, "nobody"), rebound.ENOTFOUND)

	if err := db.SetRole(ctx, "ops", rebound.RoleAdmin); err != nil {
		t.Fatal(err)
	}
	if err := db.SetRole(ctx, "root", rebound.RoleViewer); err != nil {
		t.Fatalf("demote with another admin: %v", err)
	}
	wantCode(t, db.DeleteUser(ctx, "ops"), rebound.ECONFLICT)
	if err := db.DeleteUser(ctx, "root"); err != nil {
		t.Fatal(err)
	}
	if got := userNames(t, db); !slices.Equal(got, []string{"ops:admin:false"}) {
		t.Fatalf("users %v", got)
	}

	// Two admins deleting each other at once: the count and the delete are
	// one transaction, so one of them stays.
	db.EnsureUser(ctx, "a1", rebound.RoleAdmin)
	errs := make(chan error, 2)
	for _, n := range []string{"ops", "a1"} {
		go func() { errs <- db.DeleteUser(ctx, n) }()
	}
	e1, e2 := <-errs, <-errs
	if (e1 == nil) == (e2 == nil) || rebound.ErrorCode(e1)+rebound.ErrorCode(e2) != rebound.ECONFLICT {
		t.Fatalf("concurrent deletions: %v, %v", e1, e2)
	}
	if us, _ := db.ListUsers(ctx); len(us) != 1 || us[0].Role != rebound.RoleAdmin {
		t.Fatalf("users after concurrent deletions %+v", us)
	}
}

// Tokens belong to a user and carry its current role; they are stored
// hashed, list without secrets, note their last use, and go with a
// revocation or with their user.
func testUserTokens(t *testing.T, h Harness) {
	ctx := context.Background()
	db := h.open(t)
	now := time.Date(2026, 11, 30, 4, 0, 0, 0, time.UTC)
	h.SetClock(db, func() time.Time { return now })
	db.EnsureUser(ctx, "root", rebound.RoleAdmin)
	db.EnsureUser(ctx, "bob", rebound.RoleViewer)

	_, err := db.CreateToken(ctx, "nobody", "ci")
	wantCode(t, err, rebound.ENOTFOUND)
	_, err = db.CreateToken(ctx, "bob", " ")
	wantCode(t, err, rebound.EINVALID)
	a, err := db.CreateToken(ctx, "root", "laptop")
	if err != nil {
		t.Fatal(err)
	}
	now = now.Add(time.Second)
	b, _ := db.CreateToken(ctx, "bob", "ci")
	now = now.Add(time.Second)
	b2, _ := db.CreateToken(ctx, "bob", "grafana")
	if !strings.HasPrefix(b.Secret, "rbt_") || b.Token.ID == "" || b.Token.ID == b2.Token.ID || b.Token.User != "bob" || b.Token.Name != "ci" {
		t.Fatalf("token %+v", b)
	}
	if h.SecretStored(t, db, b.Secret) {
		t.Fatal("secret stored")
	}

	p, err := db.CheckToken(ctx, b.Secret)
	if err != nil || p != (rebound.Principal{User: "bob", Role: rebound.RoleViewer, Via: "token", TokenID: b.Token.ID}) {
		t.Fatalf("principal %+v %v", p, err)
	}
	// The role is the user's, read at each call.
	db.SetRole(ctx, "bob", rebound.RoleOperator)
	if p, _ := db.CheckToken(ctx, b.Secret); p.Role != rebound.RoleOperator {
		t.Fatalf("after set-role: %+v", p)
	}
	_, err = db.CheckToken(ctx, b.Secret+"x")
	wantCode(t, err, rebound.EUNAUTHORIZED)

	list := func(user string) []string {
		t.Helper()
		ts, err := db.ListTokens(ctx, user)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, tk := range ts {
			out = append(out, fmt.Sprintf("%s/%s/%s", tk.User, tk.Name, tk.LastUsed.Format(time.TimeOnly)))
		}
		return out
	}
	// Last use: set by the first check, then at most once a minute.
	if got := list("bob"); !slices.Equal(got, []string{"bob/ci/04:00:02", "bob/grafana/00:00:00"}) {
		t.Fatalf("bob's tokens %v", got)
	}
	now = now.Add(30 * time.Second)
	db.CheckToken(ctx, b.Secret)
	if got := list("bob")[0]; got != "bob/ci/04:00:02" {
		t.Fatalf("last use written within the minute: %v", got)
	}
	now = now.Add(time.Minute)
	db.CheckToken(ctx, b.Secret)
	if got := list("bob")[0]; got != "bob/ci/04:01:32" {
		t.Fatalf("last use %v", got)
	}
	if got := list(""); !slices.Equal(got, []string{"root/laptop/00:00:00", "bob/ci/04:01:32", "bob/grafana/00:00:00"}) {
		t.Fatalf("all tokens %v", got)
	}
	_, err = db.ListTokens(ctx, "nobody")
	wantCode(t, err, rebound.ENOTFOUND)

	if err := db.RevokeToken(ctx, b.Token.ID); err != nil {
		t.Fatal(err)
	}
	wantCode(t, db.RevokeToken(ctx, b.Token.ID), rebound.ENOTFOUND)
	_, err = db.CheckToken(ctx, b.Secret)
	wantCode(t, err, rebound.EUNAUTHORIZED)
	if _, err := db.CheckToken(ctx, b2.Secret); err != nil {
		t.Fatalf("revoking one token revoked another: %v", err)
	}

	// Deleting a user revokes its tokens and sessions.
	sess, _ := db.CreateSession(ctx, "bob", time.Hour)
	if err := db.DeleteUser(ctx, "bob"); err != nil {
		t.Fatal(err)
	}
	_, err = db.CheckToken(ctx, b2.Secret)
	wantCode(t, err, rebound.EUNAUTHORIZED)
	_, err = db.CheckSession(ctx, sess)
	wantCode(t, err, rebound.EUNAUTHORIZED)
	if got := list(""); !slices.Equal(got, []string{"root/laptop/00:00:00"}) {
		t.Fatalf("tokens after the deletion %v", got)
	}
	// A new user of the same name does not inherit them.
	db.EnsureUser(ctx, "bob", rebound.RoleAdmin)
	_, err = db.CheckToken(ctx, b2.Secret)
	wantCode(t, err, rebound.EUNAUTHORIZED)
	if _, err := db.CheckToken(ctx, a.Secret); err != nil {
		t.Fatal(err)
	}
}

// Sessions expire after their lifetime of inactivity; each use extends
// them; logout ends them.
func testSessions(t *testing.T, h Harness) {
	ctx := context.Background()
	db := h.open(t)
	now := time.Date(2026, 11, 30, 4, 0, 0, 0, time.UTC)
	h.SetClock(db, func() time.Time { return now })
	db.EnsureUser(ctx, "ops", rebound.RoleOperator)

	_, err := db.CreateSession(ctx, "nobody", time.Hour)
	wantCode(t, err, rebound.ENOTFOUND)
	_, err = db.CreateSession(ctx, "ops", 0)
	wantCode(t, err, rebound.EINVALID)
	s, err := db.CreateSession(ctx, "ops", 10*time.Minute)
	if err != nil || !strings.HasPrefix(s, "rbs_") {
		t.Fatalf("session %q %v", s, err)
	}
	if h.SecretStored(t, db, s) {
		t.Fatal("session secret stored")
	}
	for i := range 3 { // 9 minutes apart: each use extends the session
		now = now.Add(9 * time.Minute)
		p, err := db.CheckSession(ctx, s)
		if err != nil || p != (rebound.Principal{User: "ops", Role: rebound.RoleOperator, Via: "session"}) {
			t.Fatalf("use %d: %+v %v", i, p, err)
		}
	}
	now = now.Add(10 * time.Minute)
	_, err = db.CheckSession(ctx, s)
	wantCode(t, err, rebound.EUNAUTHORIZED)
	if !strings.Contains(err.Error(), "log in again") {
		t.Fatalf("message %q", err)
	}

	s2, _ := db.CreateSession(ctx, "ops", time.Hour)
	if n := h.Rows(t, db, "sessions"); n != 1 {
		t.Fatalf("%d sessions: the expired one was not dropped", n)
	}
	if err := db.DeleteSession(ctx, s2); err != nil {
		t.Fatal(err)
	}
	if err := db.DeleteSession(ctx, "rbs_unknown"); err != nil {
		t.Fatal(err)
	}
	_, err = db.CheckSession(ctx, s2)
	wantCode(t, err, rebound.EUNAUTHORIZED)
}

// The audit log is newest first and filters by time, user and count.
func testAudit(t *testing.T, h Harness) {
	ctx := context.Background()
	db := h.open(t)
	t0 := time.Date(2026, 11, 30, 4, 0, 0, 0, time.UTC)
	for i := range 150 {
		user := "alice"
		if i%3 == 0 {
			user = "bob"
		}
		e := rebound.AuditEntry{Time: t0.Add(time.Duration(i) * time.Second), User: user, Role: rebound.RoleOperator, Via: "token",
			Remote: "127.0.0.1:5000", Action: "POST /api/v1/machines/{name}/failover", Target: fmt.Sprint("vm", i),
			Status: 202, RequestID: fmt.Sprint("r", i)}
		if i == 149 {
			e.Status, e.Error = 403, "forbidden: no"
		}
		if err := db.RecordAudit(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
	all, err := db.ListAudit(ctx, rebound.AuditFilter{})
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 100 || all[0].Target != "vm149" || all[0].Error != "forbidden: no" || all[0].Status != 403 || all[99].Target != "vm50" {
		t.Fatalf("default page: %d entries, first %+v", len(all), all[0])
	}
	want := rebound.AuditEntry{ID: all[1].ID, Time: t0.Add(148 * time.Second), User: "alice", Role: rebound.RoleOperator, Via: "token",
		Remote: "127.0.0.1:5000", Action: "POST /api/v1/machines/{name}/failover", Target: "vm148", Status: 202, RequestID: "r148"}
	if all[1] != want {
		t.Fatalf("entry %+v, want %+v", all[1], want)
	}
	bob, _ := db.ListAudit(ctx, rebound.AuditFilter{User: "bob", Since: t0.Add(140 * time.Second), Limit: 2})
	if len(bob) != 2 || bob[0].Target != "vm147" || bob[1].Target != "vm144" {
		t.Fatalf("bob since 140s: %+v", bob)
	}
	bob, _ = db.ListAudit(ctx, rebound.AuditFilter{User: "bob", Since: t0.Add(140 * time.Second)})
	if len(bob) != 3 {
		t.Fatalf("bob since 140s: %d entries", len(bob))
	}
	db = h.reopen(t, db)
	if got, _ := db.ListAudit(ctx, rebound.AuditFilter{Limit: 1000}); len(got) != 150 {
		t.Fatalf("after reopen %d entries", len(got))
	}
}

// testJobLocks: one job per lock key (machine, or plan) is queued, running
// or suspended; a second is refused naming the first, also when both are
// created at once; the key is free again once the job ends.
func testJobLocks(t *testing.T, h Harness) {
	ctx := context.Background()
	db := h.open(t)
	first := &rebound.Job{Type: "failover", Machine: "vm1", State: rebound.JobRunning}
	if err := db.CreateJob(ctx, first); err != nil {
		t.Fatal(err)
	}
	err := db.CreateJob(ctx, &rebound.Job{Type: "commit", Machine: "vm1", State: rebound.JobRunning})
	wantCode(t, err, rebound.ECONFLICT)
	if want := rebound.BusyError("vm1", first.ID).Error(); err.Error() != want {
		t.Fatalf("message %q, want %q", err, want)
	}
	for _, j := range []*rebound.Job{
		{Type: "failover", Machine: "vm2", State: rebound.JobRunning},
		{Type: "check", Machine: "vm1", State: rebound.JobSucceeded}, // ended: holds nothing
		{Type: "plan-failover", State: rebound.JobRunning, Plan: &rebound.PlanProgress{Name: "p"}},
		{Type: "sweep", State: rebound.JobRunning}, // no key
		{Type: "sweep", State: rebound.JobRunning},
	} {
		if err := db.CreateJob(ctx, j); err != nil {
			t.Fatalf("%s on %q: %v", j.Type, j.LockKey(), err)
		}
	}
	err = db.CreateJob(ctx, &rebound.Job{Type: "plan-failback", State: rebound.JobSuspended, Plan: &rebound.PlanProgress{Name: "p"}})
	wantCode(t, err, rebound.ECONFLICT)
	if !strings.Contains(err.Error(), `plan "p" has job`) {
		t.Fatalf("message %q", err)
	}
	first.State = rebound.JobSucceeded
	if err := db.UpdateJob(ctx, first); err != nil {
		t.Fatal(err)
	}
	if err := db.CreateJob(ctx, &rebound.Job{Type: "commit", Machine: "vm1", State: rebound.JobRunning}); err != nil {
		t.Fatalf("after the first job ended: %v", err)
	}

	// Eight servers start a job on vm3 at once: one wins.
	var wg sync.WaitGroup
	var mu sync.Mutex
	won := 0
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := db.CreateJob(ctx, &rebound.Job{Type: "failover", Machine: "vm3", State: rebound.JobRunning})
			mu.Lock()
			defer mu.Unlock()
			if err == nil {
				won++
			} else if rebound.ErrorCode(err) != rebound.ECONFLICT {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if won != 1 {
		t.Fatalf("%d of 8 concurrent jobs on one machine were created", won)
	}
}

// testJobLeases: a job is claimed by one server at a time; another claims
// it once the lease expired, with a higher fence; the old owner's writes
// and renewals are refused from then on.
func testJobLeases(t *testing.T, h Harness) {
	ctx := context.Background()
	db := h.open(t)
	now := time.Date(2026, 11, 30, 5, 0, 0, 0, time.UTC)
	h.SetClock(db, func() time.Time { return now })
	j := &rebound.Job{Type: "failover", Machine: "vm1", State: rebound.JobRunning, Steps: []rebound.JobStep{{Name: "drain", State: rebound.JobRunning}},
		Request: []byte(`{"machine":"vm1","planned":true}`)}
	if err := db.CreateJob(ctx, j); err != nil {
		t.Fatal(err)
	}
	ended := &rebound.Job{Type: "commit", Machine: "vm2", State: rebound.JobSucceeded}
	if err := db.CreateJob(ctx, ended); err != nil {
		t.Fatal(err)
	}
	if act, err := db.ActiveJobs(ctx); err != nil || len(act) != 1 || act[0].ID != j.ID || string(act[0].Request) != string(j.Request) {
		t.Fatalf("active jobs: %+v %v, want %s with its request", act, err, j.ID)
	}
	if exp, err := db.ExpiredJobs(ctx); err != nil || len(exp) != 0 {
		t.Fatalf("a job never claimed counts as expired: %+v %v", exp, err)
	}
	a, err := db.ClaimJob(ctx, j.ID, "s1", 15*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if a.Owner != "s1" || a.Fence != 1 || a.LeaseUntil == nil || !a.LeaseUntil.Equal(now.Add(15*time.Second)) || len(a.Steps) != 1 {
		t.Fatalf("claimed %+v", a)
	}
	if again, err := db.ClaimJob(ctx, j.ID, "s1", 15*time.Second); err != nil || again.Fence != 2 {
		t.Fatalf("the owner's own claim: %+v %v", again, err)
	}
	a.Fence = 2
	_, err = db.ClaimJob(ctx, j.ID, "s2", 15*time.Second)
	wantCode(t, err, rebound.ECONFLICT)
	if !strings.Contains(err.Error(), "run by server s1") {
		t.Fatalf("message %q", err)
	}
	now = now.Add(10 * time.Second)
	if _, err := db.RenewJob(ctx, j.ID, "s1", a.Fence, 15*time.Second); err != nil {
		t.Fatal(err)
	}
	now = now.Add(14 * time.Second) // 1 s left: still s1's
	if exp, _ := db.ExpiredJobs(ctx); len(exp) != 0 {
		t.Fatalf("a live lease counts as expired: %+v", exp)
	}
	a.Steps[0].State = rebound.JobSucceeded
	if err := db.UpdateJob(ctx, a); err != nil {
		t.Fatalf("the owner's write: %v", err)
	}

	now = now.Add(2 * time.Second) // s1 went silent
	exp, err := db.ExpiredJobs(ctx)
	if err != nil || len(exp) != 1 || exp[0].ID != j.ID || exp[0].Owner != "s1" {
		t.Fatalf("expired %+v %v", exp, err)
	}
	// Eight servers race for it: one wins.
	var wg sync.WaitGroup
	var mu sync.Mutex
	var winners []*rebound.Job
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, err := db.ClaimJob(ctx, j.ID, fmt.Sprint("s", i+2), 15*time.Second)
			mu.Lock()
			defer mu.Unlock()
			if err == nil {
				winners = append(winners, got)
			} else if rebound.ErrorCode(err) != rebound.ECONFLICT {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if len(winners) != 1 {
		t.Fatalf("%d servers claimed the expired job", len(winners))
	}
	b := winners[0]
	if b.Fence != 3 || b.Steps[0].State != rebound.JobSucceeded {
		t.Fatalf("taken over as %+v: the steps done must stay done", b)
	}
	// The old owner, back: fenced out.
	a.Progress = 0.9
	err = db.UpdateJob(ctx, a)
	wantCode(t, err, rebound.ECONFLICT)
	if !strings.Contains(err.Error(), "lease on job "+j.ID+" was lost") {
		t.Fatalf("message %q", err)
	}
	wantCode(t, second(db.RenewJob(ctx, j.ID, "s1", a.Fence, 15*time.Second)), rebound.ECONFLICT)
	got, _ := db.GetJob(ctx, j.ID)
	if got.Progress == 0.9 || got.Owner != b.Owner || got.Fence != 3 {
		t.Fatalf("stored %+v", got)
	}
	b.State = rebound.JobSucceeded
	if err := db.UpdateJob(ctx, b); err != nil {
		t.Fatal(err)
	}
	_, err = db.ClaimJob(ctx, j.ID, "s9", 15*time.Second)
	wantCode(t, err, rebound.ECONFLICT)
	wantCode(t, second(db.RenewJob(ctx, "j-none", "s1", 1, time.Second)), rebound.ENOTFOUND)
	_, err = db.ClaimJob(ctx, "j-none", "s1", time.Second)
	wantCode(t, err, rebound.ENOTFOUND)
}

// testJobRelease: a lease released by its owner (a clean stop) is listed
// for takeover at once, long before it would have expired; the fence goes
// on rising, so the releasing owner's writes are refused, and only the
// owner holding the fence may release.
func testJobRelease(t *testing.T, h Harness) {
	ctx := context.Background()
	db := h.open(t)
	now := time.Date(2026, 11, 30, 6, 0, 0, 0, time.UTC)
	h.SetClock(db, func() time.Time { return now })
	j := &rebound.Job{Type: "failover", Machine: "vm1", State: rebound.JobRunning, Request: []byte(`{"machine":"vm1"}`)}
	if err := db.CreateJob(ctx, j); err != nil {
		t.Fatal(err)
	}
	a, err := db.ClaimJob(ctx, j.ID, "s1", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	wantCode(t, db.ReleaseJob(ctx, j.ID, "s2", a.Fence), rebound.ECONFLICT)
	wantCode(t, db.ReleaseJob(ctx, j.ID, "s1", a.Fence-1), rebound.ECONFLICT)
	wantCode(t, db.ReleaseJob(ctx, "j-none", "s1", 1), rebound.ENOTFOUND)
	if exp, _ := db.ExpiredJobs(ctx); len(exp) != 0 {
		t.Fatalf("a held lease is listed for takeover: %+v", exp)
	}
	if err := db.ReleaseJob(ctx, j.ID, "s1", a.Fence); err != nil {
		t.Fatal(err)
	}
	got, err := db.GetJob(ctx, j.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Owner != "" || got.LeaseUntil != nil || got.Fence != a.Fence+1 || got.State != rebound.JobRunning {
		t.Fatalf("released job: owner %q lease %v fence %d (was %d) state %s", got.Owner, got.LeaseUntil, got.Fence, a.Fence, got.State)
	}
	// The clock has not moved: the hour-long lease would still hold.
	exp, err := db.ExpiredJobs(ctx)
	if err != nil || len(exp) != 1 || exp[0].ID != j.ID {
		t.Fatalf("released job not listed for takeover: %+v %v", exp, err)
	}
	a.Progress = 0.5
	wantCode(t, db.UpdateJob(ctx, a), rebound.ECONFLICT)
	wantCode(t, second(db.RenewJob(ctx, j.ID, "s1", a.Fence, time.Hour)), rebound.ECONFLICT)
	wantCode(t, db.ReleaseJob(ctx, j.ID, "s1", a.Fence), rebound.ECONFLICT)
	b, err := db.ClaimJob(ctx, j.ID, "s2", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if b.Owner != "s2" || b.Fence != a.Fence+2 {
		t.Fatalf("claimed after the release: owner %q fence %d", b.Owner, b.Fence)
	}
	if exp, _ := db.ExpiredJobs(ctx); len(exp) != 0 {
		t.Fatalf("a claimed job is still listed: %+v", exp)
	}
	// A job created and not yet claimed is its creator's, not listed.
	k := &rebound.Job{Type: "commit", Machine: "vm2", State: rebound.JobRunning}
	if err := db.CreateJob(ctx, k); err != nil {
		t.Fatal(err)
	}
	if exp, _ := db.ExpiredJobs(ctx); len(exp) != 0 {
		t.Fatalf("an unclaimed new job is listed: %+v", exp)
	}
}

// testJobCancel: a cancel asked through any server is kept on the job
// until its owner sees it (RenewJob), survives the owner's writes and a
// change of owner; once the job passed its point of no return, a cancel is
// refused; of a cancel and the point of no return racing, exactly one
// wins.
func testJobCancel(t *testing.T, h Harness) {
	ctx := context.Background()
	db := h.open(t)
	newJob := func(machine string) *rebound.Job {
		t.Helper()
		j := &rebound.Job{Type: "failover", Machine: machine, State: rebound.JobRunning, Request: []byte(`{}`)}
		if err := db.CreateJob(ctx, j); err != nil {
			t.Fatal(err)
		}
		c, err := db.ClaimJob(ctx, j.ID, "s1", time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	a := newJob("vm1")
	if c, err := db.RenewJob(ctx, a.ID, "s1", a.Fence, time.Hour); err != nil || c {
		t.Fatalf("renew before any cancel: cancel %v, %v", c, err)
	}
	got, err := db.RequestCancel(ctx, a.ID)
	if err != nil || got.Cancel != rebound.CancelRequested || got.State != rebound.JobRunning || got.EndedAt != nil {
		t.Fatalf("cancel requested: %+v %v", got, err)
	}
	if again, err := db.RequestCancel(ctx, a.ID); err != nil || again.Cancel != rebound.CancelRequested {
		t.Fatalf("a second request: %+v %v", again, err)
	}
	a.Progress = 0.5 // the owner's write, from its copy without the request
	if err := db.UpdateJob(ctx, a); err != nil {
		t.Fatal(err)
	}
	if c, err := db.RenewJob(ctx, a.ID, "s1", a.Fence, time.Hour); err != nil || !c {
		t.Fatalf("renew after the request: cancel %v, %v; want true", c, err)
	}
	if c, err := db.PassNoReturn(ctx, a.ID, "s1", a.Fence); err != nil || !c {
		t.Fatalf("point of no return after the request: cancel %v, %v; want the cancel to win", c, err)
	}
	if err := db.ReleaseJob(ctx, a.ID, "s1", a.Fence); err != nil {
		t.Fatal(err)
	}
	if b, err := db.ClaimJob(ctx, a.ID, "s2", time.Hour); err != nil || b.Cancel != rebound.CancelRequested {
		t.Fatalf("the next owner's claim: %+v %v; want the request kept", b, err)
	}

	p := newJob("vm2")
	if _, err := db.PassNoReturn(ctx, p.ID, "s1", p.Fence+1); rebound.ErrorCode(err) != rebound.ECONFLICT {
		t.Fatalf("point of no return with another fence: %v, want the lease-lost conflict", err)
	}
	if c, err := db.PassNoReturn(ctx, p.ID, "s1", p.Fence); err != nil || c {
		t.Fatalf("point of no return: cancel %v, %v", c, err)
	}
	if c, err := db.PassNoReturn(ctx, p.ID, "s1", p.Fence); err != nil || c {
		t.Fatalf("point of no return again (a job continued): cancel %v, %v", c, err)
	}
	_, err = db.RequestCancel(ctx, p.ID)
	wantCode(t, err, rebound.ECONFLICT)
	if !strings.Contains(err.Error(), "point of no return") || !strings.Contains(err.Error(), "rebound job wait "+p.ID) {
		t.Fatalf("message %q", err)
	}
	if got, _ := db.GetJob(ctx, p.ID); got.Cancel != rebound.CancelRefused {
		t.Fatalf("cancel %q after the point of no return", got.Cancel)
	}
	p.State = rebound.JobSucceeded
	now := time.Now().UTC()
	p.EndedAt = &now
	if err := db.UpdateJob(ctx, p); err != nil {
		t.Fatal(err)
	}
	if got, err := db.RequestCancel(ctx, p.ID); err != nil || got.State != rebound.JobSucceeded {
		t.Fatalf("cancel of an ended job: %+v %v, want it unchanged", got, err)
	}
	_, err = db.RequestCancel(ctx, "j-none")
	wantCode(t, err, rebound.ENOTFOUND)

	// Cancels through four servers race the owner's point of no return.
	r := newJob("vm3")
	var wg sync.WaitGroup
	var cancelled bool
	var passErr error
	var accepted, refused int
	var mu sync.Mutex
	wg.Add(5)
	go func() {
		defer wg.Done()
		cancelled, passErr = db.PassNoReturn(ctx, r.ID, "s1", r.Fence)
	}()
	for range 4 {
		go func() {
			defer wg.Done()
			_, err := db.RequestCancel(ctx, r.ID)
			mu.Lock()
			defer mu.Unlock()
			switch rebound.ErrorCode(err) {
			case "":
				accepted++
			case rebound.ECONFLICT:
				refused++
			default:
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if passErr != nil {
		t.Fatal(passErr)
	}
	if cancelled && (accepted == 0 || refused != 0) || !cancelled && accepted != 0 {
		t.Fatalf("race: point of no return cancelled=%v, cancels accepted %d refused %d: both sides won", cancelled, accepted, refused)
	}
}
