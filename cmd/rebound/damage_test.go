package main

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

// TestJournalDamage flips 16 bytes in the middle of the recovery site's
// newest journal segment, with good records after them, and restarts the
// site. That is damage, not a torn tail: the records before it are kept
// and their points served with the right bytes, the points after it are
// gone, the machine turns critical naming the commands that resync it, an
// event says what was lost, preflight reports it, and the resync it names
// brings the stream back.
func TestJournalDamage(t *testing.T) {
	t.Parallel()
	up, svc := fixedUp(t, nil)
	ctx := context.Background()
	if _, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "primary", Disks: []int64{16 << 20}}); err != nil {
		t.Fatal(err)
	}
	waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm1", To: "recovery"}))
	uri := getMachine(t, svc, "vm1").Disks[0].NBD
	o := newOracle(t, 16<<20, 11)
	var cut []rebound.RecoveryPoint
	for range 8 {
		o.write(uri, 40)
		cut = append(cut, o.point(svc, "vm1", false))
	}
	before, err := svc.ListPoints(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}

	cfg := stopSite(t, up, "recovery")
	var segs []string
	filepath.WalkDir(cfg.DataDir, func(p string, d os.DirEntry, err error) error {
		if err == nil && strings.Contains(p, filepath.Join("vm1", "journal", "wal")) && strings.HasSuffix(p, ".wal") {
			segs = append(segs, p)
		}
		return nil
	})
	if len(segs) == 0 {
		t.Fatalf("no journal segment under %s", cfg.DataDir)
	}
	slices.Sort(segs)
	newest := segs[len(segs)-1]
	b, err := os.ReadFile(newest)
	if err != nil {
		t.Fatal(err)
	}
	for i := len(b) / 2; i < len(b)/2+16; i++ {
		b[i] ^= 0x5a
	}
	if err := os.WriteFile(newest, b, 0o600); err != nil {
		t.Fatal(err)
	}
	startSite(t, up, cfg)

	var m *rebound.Machine
	waitUntil(t, 30*time.Second, "health critical for the damaged journal", func() bool {
		m = getMachine(t, svc, "vm1")
		return m.Health == rebound.HealthCritical && strings.Contains(m.HealthReason, "damaged")
	})
	for _, want := range []string{"rebound unprotect vm1 --wait", "rebound protect vm1 --to recovery --wait"} {
		if !strings.Contains(m.HealthReason, want) {
			t.Fatalf("health reason %q does not name %q", m.HealthReason, want)
		}
	}
	if st, _ := os.Stat(newest); st.Size() != int64(len(b)) {
		t.Fatalf("the damaged segment was cut to %d of %d bytes", st.Size(), len(b))
	}
	var ev *rebound.Event
	waitUntil(t, 10*time.Second, "a journal.damaged event", func() bool {
		evs, err := svc.ListEvents(ctx, "vm1")
		if err != nil {
			t.Fatal(err)
		}
		for i := range evs {
			if evs[i].Kind == "journal.damaged" {
				ev = &evs[i]
				return true
			}
		}
		return false
	})
	if !strings.Contains(ev.Message, "later one is lost") {
		t.Fatalf("event does not say what was lost: %q", ev.Message)
	}

	// Points: a prefix of those before, and the newest ones are gone.
	after, err := svc.ListPoints(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	if len(after) == 0 || len(after) >= len(before) || !slices.Equal(after, before[:len(after)]) {
		t.Fatalf("points after the damage: %d of %d, want a non-empty strict prefix", len(after), len(before))
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
	waitJob(t, svc)(svc.TestFailover(ctx, "vm1", keep.ID))
	tf := getMachine(t, svc, "vm1").TestFailover
	if got := diskSum(t, tf.Disks[0].NBD); got != o.points[keep.ID] {
		t.Fatalf("point %s after the damage: bytes differ from the source at that point", keep.ID)
	}
	waitJob(t, svc)(svc.TestFailoverCleanup(ctx, "vm1"))

	rep, err := up.Server.Service.Preflight(ctx, "vm1", "failover")
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(rep.Checks, func(c rebound.PreflightCheck) bool { return c.Name == "journal" })
	if i < 0 || !strings.Contains(rep.Checks[i].Message, "damaged") {
		t.Fatalf("preflight does not report the damage: %+v", rep.Checks)
	}

	// The resync the reason names brings the stream back, bytes right.
	waitJob(t, svc)(up.Server.Service.Unprotect(ctx, rebound.UnprotectRequest{Machine: "vm1"}))
	waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm1", To: "recovery"}))
	o.write(uri, 40)
	p := o.point(svc, "vm1", false)
	waitJob(t, svc)(svc.TestFailover(ctx, "vm1", p.ID))
	if got := diskSum(t, getMachine(t, svc, "vm1").TestFailover.Disks[0].NBD); got != o.points[p.ID] {
		t.Fatal("after the resync the new point's bytes differ from the source")
	}
	waitUntil(t, 30*time.Second, "health normal after the resync", func() bool {
		m = getMachine(t, svc, "vm1")
		return m.Health == rebound.HealthNormal
	})
}
