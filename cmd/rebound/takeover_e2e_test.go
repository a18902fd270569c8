package main

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/failpoint"
	"github.com/rebound-dr/rebound/internal/pgtest"
)

// TestSeveralServersJobTakeover: two servers on one PostgreSQL, two sites
// given both addresses, a protected machine. Server 1 starts a planned
// failover and stops (cleanly) inside its activate step, handing its lease
// over; server 2 takes the job over at its next scan (within 3.3 s, not
// after the 10 s lease), continues it under the same job ID and
// finishes it; a client waiting through server 2 sees it succeed, and the
// recovery site's disk holds every acknowledged write. Not parallel: its
// failpoint is process-wide.
func TestSeveralServersJobTakeover(t *testing.T) {
	ctx := context.Background()
	dsn := pgtest.DSN(t)
	dir := t.TempDir()
	logger := fixedUpLogger()
	s1, s2 := startSharedServers(t, dir, logger, dsn)

	_, client := sharedClients(t, dir, s1)
	svc1, svc2 := client(s1.APIURL), client(s2.APIURL)
	startSitesOn(t, dir, logger, s1, s2, "primary", "recovery")

	const size = 8 << 20
	o := newOracle(t, size, 17)
	m, err := svc1.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "primary", Disks: []int64{size}})
	if err != nil {
		t.Fatal(err)
	}
	o.write(m.Disks[0].NBD, 50)
	waitJob(t, svc1)(svc1.Protect(ctx, rebound.ProtectRequest{Machine: "vm1", To: "recovery"}))
	o.write(m.Disks[0].NBD, 30)
	full := o.model.Sum()

	job, hits, release := failoverHeldAtActivate(t, svc1, rebound.FailoverRequest{Machine: "vm1", Planned: true})
	defer release()
	// Server 2 refuses another command on the machine meanwhile.
	if _, err := svc2.TestFailover(ctx, "vm1", ""); rebound.ErrorCode(err) != rebound.ECONFLICT || !strings.Contains(err.Error(), job.ID) {
		t.Fatalf("test failover through server 2 during server 1's failover: %v, want a conflict naming %s", err, job.ID)
	}
	if err := s1.Close(); err != nil {
		t.Fatalf("close server 1: %v", err)
	}
	stopped := time.Now()

	j := waitJob(t, svc2)(job, nil)
	took := time.Since(stopped)
	if j.ID != job.ID || j.Owner != "s2" || hits.Load() != 2 {
		t.Fatalf("job after server 1 stopped: %s owner %q, activate entered %d times", j.ID, j.Owner, hits.Load())
	}
	t.Logf("server 2 finished the failover %s after server 1 stopped", took.Round(100*time.Millisecond))
	got := getMachine(t, svc2, "vm1")
	if got.State != rebound.MachineFailedOver || got.ActiveSite != "recovery" {
		t.Fatalf("vm1 after the takeover: %s at %s", got.State, got.ActiveSite)
	}
	if sum := diskSum(t, got.Disks[0].NBD); sum != full {
		t.Fatalf("recovery disk after the takeover: hash %s, want %s", sum, full)
	}
}

// failoverHeldAtActivate starts req through svc with the process-wide
// failpoint server/job/failover/activate holding the job's first entry
// into activate until the server running it stops, and returns once it is
// held, with the count of entries and the failpoint's release.
func failoverHeldAtActivate(t testing.TB, svc rebound.Service, req rebound.FailoverRequest) (*rebound.Job, *atomic.Int32, func()) {
	t.Helper()
	reached := make(chan struct{})
	hits := new(atomic.Int32)
	release := failpoint.Enable("server/job/failover/activate", func(ctx context.Context) {
		if hits.Add(1) == 1 {
			close(reached)
			<-ctx.Done() // the server stops
		}
	})
	job, err := svc.Failover(context.Background(), req)
	if err != nil {
		release()
		t.Fatal(err)
	}
	select {
	case <-reached:
	case <-time.After(time.Minute):
		release()
		t.Fatal("the failover never reached its activate step")
	}
	return job, hits, release
}
