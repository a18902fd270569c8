package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/nbd"
)

// The write-order oracle of a group: record k is written to a, then to b,
// then to c, each after the previous write was acknowledged. Every group
// point must hold a prefix of that order: (k,k,k), (k+1,k,k) or
// (k+1,k+1,k) records on (a,b,c); never b ahead of a or c ahead of b.

const (
	slotSize  = 512
	slotCount = 2048 // the first MiB of each disk holds the records
	orderDisk = 4 << 20
)

// slotBytes is record k of machine name: its bytes identify both.
func slotBytes(name string, k int) []byte {
	var hdr [16]byte
	copy(hdr[:], name)
	binary.LittleEndian.PutUint64(hdr[8:], uint64(k))
	sum := sha256.Sum256(hdr[:])
	return bytes.Repeat(sum[:], slotSize/len(sum))
}

// causal writes records and random data through the machines' exports,
// reconnecting and repeating a write whose answer was lost (a killed site):
// a write counts as done only once acknowledged.
type causal struct {
	t    *testing.T
	svc  rebound.Service
	cls  map[string]*nbd.Client
	rng  *rand.Rand
	done int // records on every machine
}

func (w *causal) write(name string, p []byte, off int64) {
	w.t.Helper()
	retry(w.t, "write to "+name, func() error {
		cl := w.cls[name]
		if cl == nil {
			m, err := w.svc.GetMachine(context.Background(), name)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if cl, err = nbd.Dial(ctx, m.Disks[0].NBD); err != nil {
				return err
			}
			w.cls[name] = cl
		}
		if _, err := cl.WriteAt(p, off); err != nil {
			cl.Close()
			w.cls[name] = nil
			return err
		}
		return nil
	})
}

// next writes record done+1 to a, b and c in order, with random data
// after each.
func (w *causal) next() {
	k := w.done + 1
	for _, name := range []string{"a", "b", "c"} {
		w.write(name, slotBytes(name, k), int64(k)*slotSize)
		junk := make([]byte, 512*(1+w.rng.IntN(64)))
		for i := range junk {
			junk[i] = byte(w.rng.Uint32())
		}
		w.write(name, junk, slotCount*slotSize+512*w.rng.Int64N((orderDisk-slotCount*slotSize-int64(len(junk)))/512))
	}
	w.done = k
}

func (w *causal) close() {
	for _, cl := range w.cls {
		if cl != nil {
			cl.Close()
		}
	}
}

// recordsAt reads machine name's records through uri: how many, checking
// they are a prefix (records 1..k, nothing after).
func recordsAt(t *testing.T, uri, name string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cl, err := nbd.Dial(ctx, uri)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	buf := make([]byte, slotCount*slotSize)
	if _, err := cl.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	n, zero := 0, make([]byte, slotSize)
	for k := 1; k < slotCount; k++ {
		got := buf[k*slotSize : (k+1)*slotSize]
		switch {
		case bytes.Equal(got, slotBytes(name, k)):
			if n != k-1 {
				t.Fatalf("%s holds record %d but not record %d: not a prefix", name, k, n+1)
			}
			n = k
		case bytes.Equal(got, zero):
		default:
			t.Fatalf("%s: slot %d holds bytes of no record", name, k)
		}
	}
	return n
}

// orderOK says whether records (a, b, c) are a prefix of a1 b1 c1 a2 ...
func orderOK(a, b, c int) bool {
	return a == b && b == c || a == b+1 && b == c || a == b && b == c+1
}

// TestGroupWriteOrder runs the real binaries, writes causally ordered
// records across the three machines of a group while the sending and the
// receiving site are killed with SIGKILL at random moments and points are
// cut every 300 ms and on demand, and checks that every point holds a
// prefix of the order on all three, the on-demand ones exactly what was
// acknowledged before them, and that latest holds every record.
func TestGroupWriteOrder(t *testing.T) {
	t.Parallel()
	c := startCluster(t)
	svc, ctx := c.svc, context.Background()
	if _, err := svc.PutPolicy(ctx, rebound.Policy{Name: "fast", CrashInterval: rebound.Duration(time.Second),
		RPOThreshold: rebound.Duration(time.Minute), Retention: rebound.Duration(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"a", "b", "c"} {
		if _, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: n, Site: "primary", Disks: []int64{orderDisk}}); err != nil {
			t.Fatal(err)
		}
		waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: n, To: "recovery", Group: "g", Policy: "fast"}))
	}
	w := &causal{t: t, svc: svc, cls: map[string]*nbd.Client{}, rng: rand.New(rand.NewPCG(3, 4))}
	defer w.close()

	kills, stop := c.killSites(5)
	exact := map[string]int{} // on-demand point -> records acknowledged before it
	for i := 0; i < 12 || kills.Load() < 5; i++ {
		for range 15 {
			if w.done+1 < slotCount {
				w.next()
			}
		}
		retry(t, "cut point", func() error {
			p, err := svc.CreatePoint(ctx, "g", false)
			if err == nil {
				exact[p.ID] = w.done
			}
			return err
		})
	}
	stop()

	var pl []rebound.RecoveryPoint
	retry(t, "list points", func() (err error) {
		pl, err = svc.ListPoints(ctx, "g")
		return err
	})
	// Every on-demand point, and the automatic ones between them (up to
	// 30, spread over the run).
	var check []rebound.RecoveryPoint
	var auto []rebound.RecoveryPoint
	for _, p := range pl {
		if _, ok := exact[p.ID]; ok {
			check = append(check, p)
		} else {
			auto = append(auto, p)
		}
	}
	step := max(1, len(auto)/30)
	for i := 0; i < len(auto); i += step {
		check = append(check, auto[i])
	}
	t.Logf("%d site kills, %d records, %d points (%d on demand); checking %d", kills.Load(), w.done, len(pl), len(exact), len(check))
	if len(exact) < 12 {
		t.Fatalf("only %d of the on-demand points are listed", len(exact))
	}
	for _, p := range check {
		retry(t, "test failover "+p.ID, func() error {
			j, err := svc.TestFailover(ctx, "g", p.ID)
			if err != nil {
				return err
			}
			return jobErr(svc, j)
		})
		var got [3]int
		for i, n := range []string{"a", "b", "c"} {
			got[i] = recordsAt(t, getMachine(t, svc, n).TestFailover.Disks[0].NBD, n)
		}
		if !orderOK(got[0], got[1], got[2]) {
			t.Fatalf("point %s holds records (a, b, c) = %v: not a prefix of the write order", p.ID, got)
		}
		if k, ok := exact[p.ID]; ok && got != [3]int{k, k, k} {
			t.Fatalf("point %s, cut after record %d was acknowledged everywhere, holds %v", p.ID, k, got)
		}
		waitJob(t, svc)(svc.TestFailoverCleanup(ctx, "g"))
	}
	// Latest drains the source: every acknowledged record is there.
	waitJob(t, svc)(svc.Failover(ctx, rebound.FailoverRequest{Machine: "g", Point: "latest"}))
	for _, n := range []string{"a", "b", "c"} {
		if got := recordsAt(t, getMachine(t, svc, n).Disks[0].NBD, n); got != w.done {
			t.Fatalf("failover to latest: %s holds %d records, want %d", n, got, w.done)
		}
	}
}

// TestPlanServerKilled runs the real binaries: a plan failover of a lone
// machine (stage one) and a group of two (stage two) whose server is
// killed with SIGKILL as stage two starts. The restarted server resumes
// the job without redoing stage one, and every machine is active at the
// recovery site with the bytes written before the failover.
func TestPlanServerKilled(t *testing.T) {
	t.Parallel()
	c := startCluster(t, "plan-failover/stage two")
	svc, ctx := c.svc, context.Background()
	oracles := map[string]*oracle{}
	for i, n := range []string{"m1", "m2", "m3"} {
		m, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: n, Site: "primary", Disks: []int64{4 << 20}})
		if err != nil {
			t.Fatal(err)
		}
		oracles[n] = newOracle(t, 4<<20, int64(400+i))
		oracles[n].write(m.Disks[0].NBD, 40)
		req := rebound.ProtectRequest{Machine: n, To: "recovery"}
		if n != "m1" {
			req.Group = "g"
		}
		waitJob(t, svc)(svc.Protect(ctx, req))
	}
	plans := svc.(rebound.PlanService)
	if _, err := plans.ApplyPlan(ctx, rebound.Plan{Name: "app", Stages: []rebound.PlanStage{
		{Name: "one", Machines: []string{"m1"}}, {Name: "two", Groups: []string{"g"}}}}); err != nil {
		t.Fatal(err)
	}
	j, err := plans.RunPlan(ctx, rebound.PlanRequest{Plan: "app", Verb: rebound.PlanFailover})
	if err != nil {
		t.Fatal(err)
	}
	c.atStep("plan-failover/stage two", func() { c.srv.kill() })
	c.srv.start()
	// The restarted server resumes the job and enters stage two again.
	c.atStep("plan-failover/stage two", func() {})
	var end *rebound.Job
	retry(t, "the resumed plan job", func() error {
		var err error
		end, err = svc.GetJob(ctx, j.ID)
		if err == nil && end.State != rebound.JobSucceeded {
			err = fmt.Errorf("job %s is %s: %s", end.ID, end.State, end.Error)
		}
		return err
	})
	if n := len(end.Plan.Stages[0].Members); n != 1 || end.Plan.Stages[0].Members[0].JobID == "" {
		t.Fatalf("stage one after the kill: %+v", end.Plan.Stages[0])
	}
	for n, o := range oracles {
		m := getMachine(t, svc, n)
		if m.ActiveSite != "recovery" || m.State != rebound.MachineFailedOver {
			t.Fatalf("%s after the plan: %s at %s", n, m.State, m.ActiveSite)
		}
		if got := diskSum(t, m.Disks[0].NBD); got != o.model.Sum() {
			t.Fatalf("%s after the plan across a server kill: %s, want %s", n, got, o.model.Sum())
		}
	}
	evs, err := svc.ListEvents(ctx, "m1")
	if err != nil {
		t.Fatal(err)
	}
	failovers := 0
	for _, e := range evs {
		if e.Kind == "failover" {
			failovers++
		}
	}
	if failovers != 1 {
		t.Fatalf("m1 failed over %d times: stage one was redone after the kill", failovers)
	}
}
