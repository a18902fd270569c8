package main

import (
	"context"
	"fmt"
	"testing"
	"time"

	"crypto/rand"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/nbd"
)

// BenchmarkPlanFailover measures an unplanned plan failover (latest, each
// machine drained to its own newest moment) of 10 protected machines in 3
// stages of 3, 3 and 4, against the same 10 machines failed over one after
// the other with the machine verb, in the same run; both timed by the jobs'
// own start and end. Each iteration cancels the failovers again.
func BenchmarkPlanFailover(b *testing.B) {
	ctx := context.Background()
	_, svc := testUp(b, b.TempDir())
	ps := svc.(rebound.PlanService)
	const size = 64 << 20
	var names []string
	stages := []rebound.PlanStage{{Name: "data"}, {Name: "app"}, {Name: "web"}}
	for i := range 10 {
		name := fmt.Sprintf("m%d", i)
		names = append(names, name)
		m, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: name, Site: "primary", Disks: []int64{size}})
		if err != nil {
			b.Fatal(err)
		}
		writeRandom(b, m.Disks[0].NBD, 8<<20)
		waitJob(b, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: name, To: "recovery"}))
		st := &stages[min(i/3, 2)]
		st.Machines = append(st.Machines, name)
	}
	if _, err := ps.ApplyPlan(ctx, rebound.Plan{Name: "ten", Stages: stages}); err != nil {
		b.Fatal(err)
	}
	var planned, serial time.Duration
	for range b.N {
		for _, name := range names {
			m, _ := svc.GetMachine(ctx, name)
			writeRandom(b, m.Disks[0].NBD, 1<<20)
		}
		planned += jobTime(waitJob(b, svc)(ps.RunPlan(ctx, rebound.PlanRequest{Plan: "ten", Verb: rebound.PlanFailover})))
		waitJob(b, svc)(ps.RunPlan(ctx, rebound.PlanRequest{Plan: "ten", Verb: rebound.PlanCancel}))

		for _, name := range names {
			m, _ := svc.GetMachine(ctx, name)
			writeRandom(b, m.Disks[0].NBD, 1<<20)
		}
		for _, name := range names {
			serial += jobTime(waitJob(b, svc)(svc.Failover(ctx, rebound.FailoverRequest{Machine: name, Point: rebound.PointLatest})))
		}
		for _, name := range names {
			waitJob(b, svc)(svc.CancelFailover(ctx, name))
		}
	}
	b.ReportMetric(planned.Seconds()/float64(b.N), "plan-s/op")
	b.ReportMetric(serial.Seconds()/float64(b.N), "serial-s/op")
}

// jobTime is how long a job ran by the server's clock (the client's
// polling is not in it).
func jobTime(j *rebound.Job) time.Duration { return j.EndedAt.Sub(j.CreatedAt) }

// writeRandom writes n random bytes at the start of an export.
func writeRandom(b *testing.B, uri string, n int) {
	b.Helper()
	cl, err := nbd.Dial(context.Background(), uri)
	if err != nil {
		b.Fatal(err)
	}
	defer cl.Close()
	buf := make([]byte, 1<<20)
	for off := 0; off < n; off += len(buf) {
		rand.Read(buf)
		if _, err := cl.WriteAt(buf, int64(off)); err != nil {
			b.Fatal(err)
		}
	}
	if err := cl.Flush(); err != nil {
		b.Fatal(err)
	}
}
