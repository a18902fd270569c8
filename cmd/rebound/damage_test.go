package main

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/failpoint"
	"github.com/rebound-dr/rebound/site"
)

// TestJournalDamage flips 16 bytes in the middle of a journal segment of
// the recovery site, with good records after them, and restarts the site:
// in the newest segment and in an older one (the journal is cut into 1 MiB
// segments). That is damage, not a torn tail. Held at the source's repair
// step (a failpoint), the machine is critical, the events say what was
// lost and that the repair started, the points before the damage are kept
// with their exact bytes, the later ones are gone and not served, and
// preflight reports it. Released, the source compares digests and resyncs
// what differs (an event with its bytes), the journal reports the repair,
// health returns to normal, and a new point, like the kept one, has the
// source's bytes. The two cases run one after the other: they share the
// failpoint.
func TestJournalDamage(t *testing.T) {
	t.Parallel()
	t.Run("newest segment", func(t *testing.T) { journalDamage(t, false) })
	t.Run("older segment", func(t *testing.T) { journalDamage(t, true) })
}

func journalDamage(t *testing.T, older bool) {
	up, svc := fixedUp(t, nil)
	ctx := context.Background()
	if _, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "primary", Disks: []int64{16 << 20}}); err != nil {
		t.Fatal(err)
	}
	// Small journal segments, so that there are older ones to damage.
	cfg := stopSite(t, up, "recovery")
	cfg.JournalSegment = 1 << 20
	startSite(t, up, cfg)
	waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm1", To: "recovery"}))
	uri := getMachine(t, svc, "vm1").Disks[0].NBD
	o := newOracle(t, 16<<20, 11)
	var cut []rebound.RecoveryPoint
	for range 8 {
		o.write(uri, 40)
		cut = append(cut, o.point(svc, "vm1", false))
	}
	// The newest segment must hold more than its final mark: bytes flipped
	// in a lone final record are a torn tail, rightly cut.
	dir := filepath.Join(cfg.DataDir, "machines", "vm1", "journal", "wal")
	for newestSegment(t, dir) < 256<<10 {
		o.write(uri, 10)
		cut = append(cut, o.point(svc, "vm1", false))
	}
	before, err := svc.ListPoints(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}

	cfg = stopSite(t, up, "recovery")
	segs, _ := filepath.Glob(filepath.Join(dir, "*.wal"))
	if len(segs) < 3 {
		t.Fatalf("%d journal segments under %s, want at least 3", len(segs), cfg.DataDir)
	}
	slices.Sort(segs)
	damaged := segs[len(segs)-1]
	if older {
		damaged = segs[len(segs)/2]
	}
	b, err := os.ReadFile(damaged)
	if err != nil {
		t.Fatal(err)
	}
	for i := len(b) / 2; i < len(b)/2+16; i++ {
		b[i] ^= 0x5a
	}
	if err := os.WriteFile(damaged, b, 0o600); err != nil {
		t.Fatal(err)
	}

	// Hold the source at its repair step.
	held, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	disable := failpoint.Enable("grpc/sender/repair", func(ctx context.Context) {
		once.Do(func() { close(held) })
		select {
		case <-release:
		case <-ctx.Done():
		}
	})
	defer disable()
	released := false
	defer func() {
		if !released {
			close(release)
		}
	}()
	startSite(t, up, cfg)
	select {
	case <-held:
	case <-time.After(60 * time.Second):
		t.Fatal("the source never got a repair request")
	}

	var m *rebound.Machine
	waitUntil(t, 30*time.Second, "health critical for the damaged journal", func() bool {
		m = getMachine(t, svc, "vm1")
		return m.Health == rebound.HealthCritical && strings.Contains(m.HealthReason, "damaged")
	})
	for _, want := range []string{"repairing automatically", "rebound unprotect vm1 --wait", "rebound protect vm1 --to recovery --wait"} {
		if !strings.Contains(m.HealthReason, want) {
			t.Fatalf("health reason %q does not name %q", m.HealthReason, want)
		}
	}
	ev := waitEvent(t, svc, "journal.damaged")
	if !strings.Contains(ev.Message, "later one is lost") || !strings.Contains(ev.Message, "were dropped") {
		t.Fatalf("event does not say what was lost: %q", ev.Message)
	}
	waitEvent(t, svc, "journal.repair.started")

	// Points: a prefix of those before; the newest ones are gone and not
	// served.
	after, err := svc.ListPoints(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	if len(after) == 0 || len(after) >= len(before) || !slices.Equal(after, before[:len(after)]) {
		t.Fatalf("points after the damage: %d of %d, want a non-empty strict prefix", len(after), len(before))
	}
	lost := before[len(after):]
	if job, err := svc.TestFailover(ctx, "vm1", lost[0].ID); err == nil {
		if j := jobEnd(t, svc, job, nil); j.State == rebound.JobSucceeded {
			t.Fatalf("lost point %s was served", lost[0].ID)
		}
	}
	// The newest kept point of ours still gives its exact bytes.
	var keep rebound.RecoveryPoint
	for _, p := range cut {
		if slices.ContainsFunc(after, func(q rebound.RecoveryPoint) bool { return q.ID == p.ID }) {
			keep = p
		}
	}
	if keep.ID == "" {
		t.Fatalf("no point of ours survived the damage: %d of %d kept", len(after), len(before))
	}
	checkPoint(t, svc, o, keep.ID)

	rep, err := up.Server.Service.Preflight(ctx, "vm1", "failover")
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(rep.Checks, func(c rebound.PreflightCheck) bool { return c.Name == "journal" })
	if i < 0 || !strings.Contains(rep.Checks[i].Message, "damaged") {
		t.Fatalf("preflight does not report the damage: %+v", rep.Checks)
	}

	// The repair: digests compared, what differs resynced, points resume.
	released = true
	close(release)
	ev = waitEvent(t, svc, "journal.repair.resync")
	if !strings.Contains(ev.Message, "bytes to resync") {
		t.Fatalf("repair resync event: %q", ev.Message)
	}
	waitEvent(t, svc, "journal.repaired")
	waitUntil(t, 30*time.Second, "health normal after the repair", func() bool {
		m = getMachine(t, svc, "vm1")
		return m.Health == rebound.HealthNormal
	})
	o.write(uri, 40)
	p := o.point(svc, "vm1", false)
	now, err := svc.ListPoints(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range lost {
		if slices.ContainsFunc(now, func(q rebound.RecoveryPoint) bool { return q.ID == l.ID }) {
			t.Fatalf("lost point %s is listed again after the repair", l.ID)
		}
	}
	if !slices.ContainsFunc(now, func(q rebound.RecoveryPoint) bool { return q.ID == keep.ID }) {
		t.Fatalf("kept point %s is gone after the repair", keep.ID)
	}
	checkPoint(t, svc, o, p.ID)
	checkPoint(t, svc, o, keep.ID)
}

// checkPoint test-fails over to point id and compares its bytes with the
// source's at that point.
func checkPoint(t *testing.T, svc rebound.Service, o *oracle, id string) {
	t.Helper()
	ctx := context.Background()
	waitJob(t, svc)(svc.TestFailover(ctx, "vm1", id))
	if got := diskSum(t, getMachine(t, svc, "vm1").TestFailover.Disks[0].NBD); got != o.points[id] {
		t.Fatalf("point %s: bytes differ from the source at that point", id)
	}
	waitJob(t, svc)(svc.TestFailoverCleanup(ctx, "vm1"))
}

// waitEvent waits for vm1's first event of kind.
func waitEvent(t *testing.T, svc rebound.Service, kind string) *rebound.Event {
	t.Helper()
	var ev *rebound.Event
	waitUntil(t, 60*time.Second, "a "+kind+" event", func() bool {
		evs, err := svc.ListEvents(context.Background(), "vm1")
		if err != nil {
			t.Fatal(err)
		}
		for i := range evs {
			if evs[i].Kind == kind {
				ev = &evs[i]
				return true
			}
		}
		return false
	})
	return ev
}

// newestSegment returns the size of the newest wal segment in dir.
func newestSegment(t *testing.T, dir string) int64 {
	t.Helper()
	segs, err := filepath.Glob(filepath.Join(dir, "*.wal"))
	if err != nil || len(segs) == 0 {
		t.Fatalf("no wal segment in %s (%v)", dir, err)
	}
	slices.Sort(segs)
	st, err := os.Stat(segs[len(segs)-1])
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

// TestSpoolDamageReprotect flips 16 bytes in the middle of the released
// copy's spool (its last segment, good records after them) before a
// reprotect. That is damage, not a torn tail: the changes it held are
// unknown, so the site reports it (a spool.damaged event) and the
// reprotect compares block digests instead of trusting the spool; after a
// failback the disk equals the source's.
func TestSpoolDamageReprotect(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	// The spool capture mode: every record is in a spool segment to damage
	// (direct mode spools only when the peer falls behind).
	up, svc := fixedUp(t, func(c *UpConfig) { c.Capture = site.CaptureSpool })
	loop := svc.(rebound.LoopService)
	o := loopOracle(t, loopDisk, 13)
	failedOverAndCommitted(t, svc, o)

	cfg := stopSite(t, up, "primary")
	segs, _ := filepath.Glob(filepath.Join(cfg.DataDir, "machines", "vm1", "stream", "spool", "*.wal"))
	if len(segs) == 0 {
		t.Fatalf("no spool segment under %s", cfg.DataDir)
	}
	slices.Sort(segs)
	last := segs[len(segs)-1]
	b, err := os.ReadFile(last)
	if err != nil {
		t.Fatal(err)
	}
	for i := len(b) / 2; i < len(b)/2+16; i++ {
		b[i] ^= 0x5a
	}
	if err := os.WriteFile(last, b, 0o600); err != nil {
		t.Fatal(err)
	}
	startSite(t, up, cfg)

	j := waitJob(t, svc)(loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "vm1"}))
	if msg := stepMessage(j, "preflight"); !strings.Contains(msg, "block digests are compared") || !strings.Contains(msg, "damaged") {
		t.Fatalf("preflight step says %q, want a digest compare because the spool is damaged", msg)
	}
	if j.BytesCompared != loopDisk {
		t.Fatalf("compared %d bytes, want the disk's %d", j.BytesCompared, loopDisk)
	}
	ev := waitEvent(t, svc, "spool.damaged")
	if !strings.Contains(ev.Message, "not a torn tail") || ev.Site != "primary" {
		t.Fatalf("spool.damaged event: %+v", ev)
	}
	if st, _ := os.Stat(last); st.Size() != int64(len(b)) {
		t.Fatalf("the damaged spool segment was cut to %d of %d bytes", st.Size(), len(b))
	}
	failbackAndCheck(t, svc, o.model.Sum(), "primary")
}
