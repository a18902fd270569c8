package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	rhttp "github.com/rebound-dr/rebound/http"
	"github.com/rebound-dr/rebound/nbd"
	"github.com/rebound-dr/rebound/workload"
)

// testUp starts a server and two sites in-process on ephemeral ports and
// returns a REST client for it.
func testUp(t testing.TB, dir string) (*UpMain, rebound.Service) {
	t.Helper()
	cfg := UpConfig{
		DataDir: dir, APIAddr: "127.0.0.1:0", GRPCAddr: "127.0.0.1:0",
		Sites: []UpSite{
			{Name: "primary", NBDAddr: "127.0.0.1:0", ReplAddr: "127.0.0.1:0"},
			{Name: "recovery", NBDAddr: "127.0.0.1:0", ReplAddr: "127.0.0.1:0"},
		},
	}
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	m := &UpMain{Config: cfg, Logger: logger}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := m.Run(ctx); err != nil {
		t.Fatalf("up: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	cl, err := rhttp.NewClient(m.Server.APIURL, m.AdminToken, m.Server.CA.CertPEM())
	if err != nil {
		t.Fatal(err)
	}
	return m, cl
}

// waitJob returns a function that waits for the job a verb started and
// fails the test unless it succeeded: waitJob(t, svc)(svc.Commit(ctx, "vm1")).
func waitJob(t testing.TB, svc rebound.Service) func(job *rebound.Job, err error) *rebound.Job {
	return func(job *rebound.Job, err error) *rebound.Job {
		t.Helper()
		return waitJobDone(t, svc, job, err)
	}
}

func waitJobDone(t testing.TB, svc rebound.Service, job *rebound.Job, err error) *rebound.Job {
	t.Helper()
	j := jobEnd(t, svc, job, err)
	if j.State != rebound.JobSucceeded {
		t.Fatalf("job %s (%s) %s: %s", j.ID, j.Type, j.State, j.Error)
	}
	return j
}

// diskSum reads a whole export over NBD and returns its SHA-256.
func diskSum(t *testing.T, uri string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cl, err := nbd.Dial(ctx, uri)
	if err != nil {
		t.Fatalf("dial %s: %v", uri, err)
	}
	defer cl.Close()
	h := sha256.New()
	buf := make([]byte, 1<<20)
	for off := int64(0); off < cl.Size(); off += int64(len(buf)) {
		n := min(int64(len(buf)), cl.Size()-off)
		if _, err := cl.ReadAt(buf[:n], off); err != nil {
			t.Fatalf("read %s at %d: %v", uri, off, err)
		}
		h.Write(buf[:n])
	}
	return hex.EncodeToString(h.Sum(nil))
}

// oracle drives random I/O through NBD, keeps a model of the disk, and
// records the model's hash at recovery points and at quiet instants.
type oracle struct {
	t      *testing.T
	gen    *workload.Gen
	model  *workload.Model
	points map[string]string    // point ID -> hash
	times  map[time.Time]string // instant -> hash
	order  []string             // point IDs in order
	tlist  []time.Time
	track  changeSet // if set, blocks written are added to it
}

func newOracle(t *testing.T, size int64, seed int64) *oracle {
	return &oracle{
		t: t, model: workload.NewModel(size), points: map[string]string{}, times: map[time.Time]string{},
		gen: workload.NewGen(size, workload.Options{Seed: seed, MinLen: 512, MaxLen: 128 << 10, ZeroFraction: 0.1, TrimFraction: 0.05}),
	}
}

// write applies n random operations through uri.
func (o *oracle) write(uri string, n int) {
	o.t.Helper()
	cl, err := nbd.Dial(context.Background(), uri)
	if err != nil {
		o.t.Fatalf("dial %s: %v", uri, err)
	}
	defer cl.Close()
	for i := 0; i < n; i++ {
		op := o.gen.Next()
		if err := workload.Apply(cl, op); err != nil {
			o.t.Fatalf("write through %s: %v", uri, err)
		}
		o.model.Apply(op)
		if o.track != nil {
			o.track.add(op)
		}
	}
	if err := cl.Flush(); err != nil {
		o.t.Fatal(err)
	}
}

// instant records the current time, between two quiet gaps, with the hash.
func (o *oracle) instant() time.Time {
	time.Sleep(3 * time.Millisecond)
	now := time.Now().UTC()
	time.Sleep(3 * time.Millisecond)
	o.times[now] = o.model.Sum()
	o.tlist = append(o.tlist, now)
	return now
}

// point cuts a recovery point and records the hash.
func (o *oracle) point(svc rebound.Service, machine string, app bool) rebound.RecoveryPoint {
	o.t.Helper()
	p, err := svc.CreatePoint(context.Background(), machine, app)
	if err != nil {
		o.t.Fatalf("create point: %v", err)
	}
	o.points[p.ID] = o.model.Sum()
	o.order = append(o.order, p.ID)
	return *p
}

func getMachine(t *testing.T, svc rebound.Service, name string) *rebound.Machine {
	t.Helper()
	m, err := svc.GetMachine(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestRecoverAnyPoint is the consistency oracle in-process: failover and
// test failover to recorded points and instants give disks whose bytes hash
// equal to the model at that moment.
func TestRecoverAnyPoint(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	up, svc := testUp(t, t.TempDir())
	_ = up
	const size = 32 << 20
	m, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "primary", Disks: []int64{size}})
	if err != nil {
		t.Fatal(err)
	}
	src := m.Disks[0].NBD
	o := newOracle(t, size, 1)
	o.write(src, 200) // existing content before protection

	waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm1", To: "recovery"}))
	if m := getMachine(t, svc, "vm1"); m.State != rebound.MachineProtected {
		t.Fatalf("state after protect = %s", m.State)
	}

	for i := 0; i < 12; i++ {
		o.write(src, 40)
		if i%3 == 0 {
			o.point(svc, "vm1", false)
		} else {
			o.instant()
		}
	}
	// Let the last instants reach the recovery site.
	o.point(svc, "vm1", false)

	points, err := svc.ListPoints(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	ids := map[string]bool{}
	for _, p := range points {
		ids[p.ID] = true
	}
	for _, id := range o.order {
		if !ids[id] {
			t.Fatalf("point %s not listed in %v", id, points)
		}
	}

	// Test failover to every recorded point and instant while replication
	// continues.
	check := func(sel, want string) {
		t.Helper()
		waitJob(t, svc)(svc.TestFailover(ctx, "vm1", sel))
		m := getMachine(t, svc, "vm1")
		if m.TestFailover == nil || len(m.TestFailover.Disks) != 1 {
			t.Fatalf("test failover %s: no disks in %+v", sel, m.TestFailover)
		}
		if got := diskSum(t, m.TestFailover.Disks[0].NBD); got != want {
			t.Fatalf("test failover to %s: disk hash %s, want %s", sel, got, want)
		}
		waitJob(t, svc)(svc.TestFailoverCleanup(ctx, "vm1"))
	}
	for _, id := range o.order {
		check(id, o.points[id])
	}
	for _, at := range o.tlist {
		check(at.Format(time.RFC3339Nano), o.times[at])
	}

	// Real failover to an old point, change the point, write at recovery,
	// then cancel: the source lost nothing.
	final := o.model.Sum()
	waitJob(t, svc)(svc.Failover(ctx, rebound.FailoverRequest{Machine: "vm1", Point: o.order[1]}))
	m = getMachine(t, svc, "vm1")
	if m.State != rebound.MachineFailedOver || m.ActiveSite != "recovery" {
		t.Fatalf("after failover: state %s at %s", m.State, m.ActiveSite)
	}
	if got := diskSum(t, m.Disks[0].NBD); got != o.points[o.order[1]] {
		t.Fatalf("failover disk hash %s, want point %s's %s", got, o.order[1], o.points[o.order[1]])
	}
	at := o.tlist[len(o.tlist)/2]
	waitJob(t, svc)(svc.ChangePoint(ctx, "vm1", at.Format(time.RFC3339Nano)))
	m = getMachine(t, svc, "vm1")
	if got := diskSum(t, m.Disks[0].NBD); got != o.times[at] {
		t.Fatalf("change-point disk hash %s, want %s", got, o.times[at])
	}
	scratch := newOracle(t, size, 99)
	scratch.write(m.Disks[0].NBD, 20) // writes at recovery go to the new active copy
	waitJob(t, svc)(svc.CancelFailover(ctx, "vm1"))
	m = getMachine(t, svc, "vm1")
	if m.State != rebound.MachineProtected || m.ActiveSite != "primary" {
		t.Fatalf("after cancel: state %s at %s", m.State, m.ActiveSite)
	}
	if got := diskSum(t, m.Disks[0].NBD); got != final {
		t.Fatalf("source after cancel: hash %s, want %s", got, final)
	}

	// Planned failover: zero data loss, then commit.
	o.write(m.Disks[0].NBD, 50)
	final = o.model.Sum()
	waitJob(t, svc)(svc.Failover(ctx, rebound.FailoverRequest{Machine: "vm1", Planned: true}))
	m = getMachine(t, svc, "vm1")
	if got := diskSum(t, m.Disks[0].NBD); got != final {
		t.Fatalf("planned failover: hash %s, want %s", got, final)
	}
	o.write(m.Disks[0].NBD, 30)
	final = o.model.Sum()
	waitJob(t, svc)(svc.Commit(ctx, "vm1"))
	m = getMachine(t, svc, "vm1")
	if m.State != rebound.MachineUnprotected || m.ActiveSite != "recovery" {
		t.Fatalf("after commit: state %s at %s", m.State, m.ActiveSite)
	}
	if got := diskSum(t, m.Disks[0].NBD); got != final {
		t.Fatalf("after commit: hash %s, want %s", got, final)
	}
	// Commit again reports that it is done and changes nothing.
	j := waitJob(t, svc)(svc.Commit(ctx, "vm1"))
	if len(j.Steps) != 1 || j.Steps[0].Message == "" {
		t.Fatalf("repeated commit: %+v", j)
	}
	// The released source refuses its old export.
	if _, err := nbd.Dial(ctx, src); err == nil {
		t.Fatalf("old source export %s still served after commit", src)
	}
}
