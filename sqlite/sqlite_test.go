package sqlite

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

func open(t *testing.T) (*DB, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "rebound.db")
	db, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db, path
}

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

func TestMachines(t *testing.T) {
	ctx := context.Background()
	db, path := open(t)

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
	db.Close()
	db, err = Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
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

func TestSites(t *testing.T) {
	ctx := context.Background()
	db, _ := open(t)
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

func TestPolicies(t *testing.T) {
	ctx := context.Background()
	db, path := open(t)
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
	db.Close()
	db, err = Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
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

func TestJobs(t *testing.T) {
	ctx := context.Background()
	db, _ := open(t)
	var ids []string
	for i := range 5 {
		machine := "a"
		if i%2 == 1 {
			machine = "b"
		}
		j := &rebound.Job{Type: "protect", Machine: machine, State: rebound.JobRunning,
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
	if len(bs) != 1 || bs[0].ID != ids[3] {
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

func TestConcurrentUpdateJob(t *testing.T) {
	ctx := context.Background()
	db, _ := open(t)
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

func TestEvents(t *testing.T) {
	ctx := context.Background()
	db, _ := open(t)
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

func TestAPITokens(t *testing.T) {
	ctx := context.Background()
	db, path := open(t)
	tok, err := db.CreateAPIToken(ctx, "admin")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(tok, "rbt_") || len(tok) != 4+43 {
		t.Fatalf("token %q", tok)
	}
	tok2, _ := db.CreateAPIToken(ctx, "ci")
	if tok2 == tok {
		t.Fatal("tokens repeat")
	}
	if name, err := db.CheckAPIToken(ctx, tok); err != nil || name != "admin" {
		t.Fatalf("check: %q %v", name, err)
	}
	_, err = db.CheckAPIToken(ctx, tok+"x")
	wantCode(t, err, rebound.EUNAUTHORIZED)
	_, err = db.CheckAPIToken(ctx, "")
	wantCode(t, err, rebound.EUNAUTHORIZED)

	// Only the hash is stored.
	var n int
	if err := db.db.QueryRow(`SELECT count(*) FROM api_tokens WHERE hash = ? OR name = ?`, tok, tok).Scan(&n); err != nil || n != 0 {
		t.Fatalf("plaintext stored? n=%d err=%v", n, err)
	}
	db.Close()
	db, _ = Open(path)
	defer db.Close()
	// Both belong to user admin, named after what they are for.
	if name, err := db.CheckAPIToken(ctx, tok2); err != nil || name != "admin" {
		t.Fatalf("after reopen: %q %v", name, err)
	}
	if ts, _ := db.ListTokens(ctx, "admin"); len(ts) != 2 || ts[0].Name != "admin" || ts[1].Name != "ci" {
		t.Fatalf("tokens %+v", ts)
	}
}

func TestEnrollTokens(t *testing.T) {
	ctx := context.Background()
	db, _ := open(t)
	_, err := db.CreateEnrollToken(ctx, "b", 0)
	wantCode(t, err, rebound.EINVALID)

	sec, err := db.CreateEnrollToken(ctx, "b", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	// Wrong site fails and does not consume the token.
	err = db.UseEnrollToken(ctx, sec, "c")
	wantCode(t, err, rebound.EUNAUTHORIZED)
	if !strings.Contains(err.Error(), `for site "b"`) {
		t.Fatalf("message %q", err)
	}
	if err := db.UseEnrollToken(ctx, sec, "b"); err != nil {
		t.Fatal(err)
	}
	err = db.UseEnrollToken(ctx, sec, "b")
	wantCode(t, err, rebound.EUNAUTHORIZED)
	if !strings.Contains(err.Error(), "already used") {
		t.Fatalf("message %q", err)
	}
	err = db.UseEnrollToken(ctx, "rbe_bogus", "b")
	wantCode(t, err, rebound.EUNAUTHORIZED)

	// Expiry, with a moved clock.
	sec2, _ := db.CreateEnrollToken(ctx, "b", time.Minute)
	db.now = func() time.Time { return time.Now().Add(2 * time.Minute) }
	err = db.UseEnrollToken(ctx, sec2, "b")
	wantCode(t, err, rebound.EUNAUTHORIZED)
	if !strings.Contains(err.Error(), "expired") {
		t.Fatalf("message %q", err)
	}
	db.now = time.Now

	// Racing uses: exactly one wins.
	sec3, _ := db.CreateEnrollToken(ctx, "b", time.Hour)
	var wg sync.WaitGroup
	var mu sync.Mutex
	ok := 0
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := db.UseEnrollToken(ctx, sec3, "b")
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

func TestSettings(t *testing.T) {
	ctx := context.Background()
	db, path := open(t)
	if _, ok, err := db.GetSetting(ctx, "ca"); ok || err != nil {
		t.Fatalf("unset: %v %v", ok, err)
	}
	db.PutSetting(ctx, "ca", "one")
	if err := db.PutSetting(ctx, "ca", "two"); err != nil {
		t.Fatal(err)
	}
	db.Close()
	db, _ = Open(path)
	defer db.Close()
	if v, ok, err := db.GetSetting(ctx, "ca"); v != "two" || !ok || err != nil {
		t.Fatalf("got %q %v %v", v, ok, err)
	}
}

func TestMigrationIdempotent(t *testing.T) {
	ctx := context.Background()
	db, path := open(t)
	db.PutSetting(ctx, "k", "v")
	for range 3 {
		db.Close()
		var err error
		if db, err = Open(path); err != nil {
			t.Fatal(err)
		}
		v, err := db.SchemaVersion(ctx)
		if err != nil || v != len(migrations) {
			t.Fatalf("version %d %v", v, err)
		}
		if err := db.migrate(ctx); err != nil {
			t.Fatal(err)
		}
	}
	defer db.Close()
	if v, ok, _ := db.GetSetting(ctx, "k"); !ok || v != "v" {
		t.Fatal("data lost over migrations")
	}
	var mode string
	if err := db.db.QueryRow(`PRAGMA journal_mode`).Scan(&mode); err != nil || mode != "wal" {
		t.Fatalf("journal_mode %q %v", mode, err)
	}
	var fk int
	if err := db.db.QueryRow(`PRAGMA foreign_keys`).Scan(&fk); err != nil || fk != 1 {
		t.Fatalf("foreign_keys %d %v", fk, err)
	}

	// A database from a newer binary is refused, not silently used.
	db.db.Exec(`UPDATE schema_version SET version = 999`)
	db.Close()
	if _, err := Open(path); err == nil || !strings.Contains(err.Error(), "newer") {
		t.Fatalf("newer schema: %v", err)
	}
}

func TestOddPath(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "data dir #1?x=y")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "rebound.db")
	db, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	db.PutSetting(ctx, "k", "v")
	db.Close()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("database not at %s: %v", path, err)
	}
	db, err = Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if v, ok, _ := db.GetSetting(ctx, "k"); !ok || v != "v" {
		t.Fatal("data lost")
	}
}
