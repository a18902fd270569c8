package main

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/failpoint"
	"github.com/rebound-dr/rebound/internal/pgtest"
)

// BenchmarkJobTakeover measures how long a job waits when the server
// running it goes away, two servers on one PostgreSQL with real sites and
// a protected machine, each iteration with a new database, servers and
// sites. stop: in-process servers; server 1 runs a planned failover and
// stops (Close) inside its activate step, handing its lease over; kill:
// the real binaries; server 1 runs an unplanned failover and is killed
// (SIGKILL, by a failpoint) as it enters activate, so server 2 claims the
// job once its lease expired. In both server 2 finishes the job under the
// same ID. takeover-s is from server 1's stop (its start) or death to the
// job's end by the server's clock; close-s is how long the stop took. Not
// parallel with other tests: stop's failpoint is process-wide.
func BenchmarkJobTakeover(b *testing.B) {
	b.Run("stop", func(b *testing.B) {
		var took, closing time.Duration
		for range b.N {
			t, c := jobTakeover(b)
			took += t
			closing += c
		}
		n := float64(b.N)
		b.ReportMetric(took.Seconds()/n, "takeover-s")
		b.ReportMetric(closing.Seconds()/n, "close-s")
		b.ReportMetric(0, "ns/op") // the setup dominates the iteration's time
		benchReport(b, "| stops cleanly (Close, in-process) | %.1f s | %.1f s |\n", took.Seconds()/n, closing.Seconds()/n)
	})
	b.Run("kill", func(b *testing.B) {
		var took time.Duration
		for range b.N {
			took += jobTakeoverKill(b)
		}
		n := float64(b.N)
		b.ReportMetric(took.Seconds()/n, "takeover-s")
		b.ReportMetric(0, "ns/op")
		benchReport(b, "| killed (SIGKILL, real binaries) | %.1f s | |\n", took.Seconds()/n)
	})
}

// jobTakeoverKill runs one takeover of a killed server's job and returns
// the time from its death to the job's end.
func jobTakeoverKill(b *testing.B) time.Duration {
	ctx := context.Background()
	tc := startTwoServers(b, []string{failpoint.Env + "=server/job/failover/activate=kill"})
	m, err := tc.svc1.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "primary", Disks: []int64{8 << 20}})
	if err != nil {
		b.Fatal(err)
	}
	writeRandom(b, m.Disks[0].NBD, 4<<20)
	waitJob(b, tc.svc1)(tc.svc1.Protect(ctx, rebound.ProtectRequest{Machine: "vm1", To: "recovery"}))
	writeRandom(b, m.Disks[0].NBD, 1<<20)
	job, err := tc.svc1.Failover(ctx, rebound.FailoverRequest{Machine: "vm1", Point: rebound.PointLatest})
	if err != nil {
		b.Fatal(err)
	}
	select {
	case <-tc.srv1.done:
	case <-time.After(2 * time.Minute):
		b.Fatal("server 1 did not die at the failover's activate step")
	}
	died := time.Now()
	j := waitJob(b, tc.svc2)(job, nil)
	if j.ID != job.ID || j.Owner != "s2" || j.EndedAt == nil {
		b.Fatalf("job after server 1 died: %s owner %q", j.ID, j.Owner)
	}
	got, err := tc.svc2.GetMachine(ctx, "vm1")
	if err != nil || got.State != rebound.MachineFailedOver || got.ActiveSite != "recovery" {
		b.Fatalf("vm1 after the takeover: %+v %v", got, err)
	}
	return j.EndedAt.Sub(died)
}

// jobTakeover runs one takeover and returns its time and server 1's stop.
func jobTakeover(b *testing.B) (took, closing time.Duration) {
	ctx := context.Background()
	dir := b.TempDir()
	logger := slog.New(slog.DiscardHandler)
	s1, s2 := startSharedServers(b, dir, logger, pgtest.DSN(b))
	_, client := sharedClients(b, dir, s1)
	svc1, svc2 := client(s1.APIURL), client(s2.APIURL)
	startSitesOn(b, dir, logger, s1, s2, "primary", "recovery")
	m, err := svc1.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "primary", Disks: []int64{8 << 20}})
	if err != nil {
		b.Fatal(err)
	}
	writeRandom(b, m.Disks[0].NBD, 4<<20)
	waitJob(b, svc1)(svc1.Protect(ctx, rebound.ProtectRequest{Machine: "vm1", To: "recovery"}))
	writeRandom(b, m.Disks[0].NBD, 1<<20)

	job, hits, release := failoverHeldAtActivate(b, svc1, rebound.FailoverRequest{Machine: "vm1", Planned: true})
	defer release()
	stopped := time.Now()
	if err := s1.Close(); err != nil {
		b.Fatalf("close server 1: %v", err)
	}
	closing = time.Since(stopped)
	j := waitJob(b, svc2)(job, nil)
	if j.ID != job.ID || j.Owner != "s2" || hits.Load() != 2 || j.EndedAt == nil {
		b.Fatalf("job after server 1 stopped: %s owner %q, activate entered %d times", j.ID, j.Owner, hits.Load())
	}
	got, err := svc2.GetMachine(ctx, "vm1")
	if err != nil || got.State != rebound.MachineFailedOver || got.ActiveSite != "recovery" {
		b.Fatalf("vm1 after the takeover: %+v %v", got, err)
	}
	return j.EndedAt.Sub(stopped), closing
}
