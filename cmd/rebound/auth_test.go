package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	rgrpc "github.com/rebound-dr/rebound/grpc"
	"github.com/rebound-dr/rebound/grpc/pb"
	"github.com/rebound-dr/rebound/pki"
	"github.com/rebound-dr/rebound/site"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// peerClient is a test client that enrolls with the server like a site or
// an agent and speaks the replication protocol to a site directly.
type peerClient struct {
	name             string
	cert, key, caPEM []byte
	role             pki.Role
}

func enrollPeer(t *testing.T, up *UpMain, name string, role pki.Role) *peerClient {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tok, err := up.Server.JoinTokenAs(ctx, name, role, false)
	if err != nil {
		t.Fatal(err)
	}
	cert, key, ca, err := rgrpc.EnrollAs(ctx, up.Server.GRPCAddr, tok, name, role)
	if err != nil {
		t.Fatalf("enroll %s as %s: %v", name, role, err)
	}
	return &peerClient{name: name, cert: cert, key: key, caPEM: ca, role: role}
}

// inject opens a replication stream to the site at addr (named site),
// says hello as sourceSite and sends recs. It returns the stream's end.
func (p *peerClient) inject(ctx context.Context, addr, site string, hello *pb.ReplHello, recs []*pb.Record) error {
	conf, err := pki.ClientTLS(p.cert, p.key, p.caPEM, site)
	if err != nil {
		return err
	}
	cc, err := rgrpc.Dial(addr, conf)
	if err != nil {
		return err
	}
	defer cc.Close()
	st, err := pb.NewReplicationClient(cc).Replicate(ctx)
	if err != nil {
		return err
	}
	hello.Version = rgrpc.ProtocolVersion
	if err := st.Send(&pb.ReplicateRequest{Body: &pb.ReplicateRequest_Hello{Hello: hello}}); err != nil {
		_, err = st.Recv()
		return err
	}
	m, err := st.Recv()
	if err != nil {
		return err
	}
	for _, r := range recs {
		r.Seq += m.GetHelloAck().GetDurableSeq()
	}
	if err := st.Send(&pb.ReplicateRequest{Body: &pb.ReplicateRequest_Batch{Batch: &pb.Batch{Records: recs}}}); err != nil {
		_, err = st.Recv()
		return err
	}
	_, err = st.Recv()
	return err
}

// targetStream reads a target site's state.json for the stream ID and
// generation of a machine, as anyone with access to the site's disk could.
func targetStream(t *testing.T, dataDir, machine string) (streamID, generation string) {
	t.Helper()
	sp := siteSpec(t, dataDir, machine)
	return sp.StreamID, sp.Generation
}

// siteSpec reads the replication spec a site keeps for a machine from its
// state.json: what survives a restart.
func siteSpec(t *testing.T, dataDir, machine string) *rebound.ReplicationSpec {
	t.Helper()
	b, err := site.SavedState(dataDir)
	if err != nil {
		t.Fatal(err)
	}
	// state.json holds stream units; a machine's stream is its unit's.
	var state struct {
		Units []struct {
			Members []struct {
				Name string `json:"name"`
			} `json:"members"`
			Spec *rebound.ReplicationSpec `json:"spec"`
		} `json:"units"`
	}
	if err := json.Unmarshal(b, &state); err != nil {
		t.Fatal(err)
	}
	for _, u := range state.Units {
		for _, m := range u.Members {
			if m.Name == machine && u.Spec != nil {
				return u.Spec
			}
		}
	}
	t.Fatalf("%s holds no stream of %s: %s", dataDir, machine, b)
	return nil
}

func durableAt(t *testing.T, up *UpMain, site, machine string) uint64 {
	t.Helper()
	st, err := up.Sites[site].Site.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range st.Machines {
		if m.Name == machine {
			return m.DurableSeq
		}
	}
	t.Fatalf("%s holds no %s", site, machine)
	return 0
}

// TestReplicationOnlyFromTheSource: a rogue site and an agent, both
// enrolled with the server, try to append to vm1's stream at recovery
// (stream ID and generation read from recovery's state.json). Both are
// refused with PermissionDenied, recovery's journal is unchanged (durable
// sequence and the bytes a test failover to the latest point exports), each
// refusal is in the server's event log, and the real stream keeps flowing.
func TestReplicationOnlyFromTheSource(t *testing.T) {
	ctx := context.Background()
	up, svc := testUp(t, t.TempDir())
	// No timed points: the journal changes only by what the test does.
	const size = 8 << 20
	o := newOracle(t, size, 7)
	src := protectQuiet(t, up, svc, o, size)
	o.write(src, 20)
	p1 := o.point(svc, "vm1", false)

	streamID, gen := targetStream(t, up.Sites["recovery"].Config.DataDir, "vm1")
	if got := durableAt(t, up, "recovery", "vm1"); got != p1.Seq {
		t.Fatalf("recovery holds %d, the point is %d", got, p1.Seq)
	}
	exported := func(sel string) string {
		t.Helper()
		waitJob(t, svc)(svc.TestFailover(ctx, "vm1", sel))
		sum := diskSum(t, getMachine(t, svc, "vm1").TestFailover.Disks[0].NBD)
		waitJob(t, svc)(svc.TestFailoverCleanup(ctx, "vm1"))
		return sum
	}
	// "latest" drains the source first (it may cut a point there): the
	// journal as it stands after it is the baseline.
	if got := exported("latest"); got != o.points[p1.ID] {
		t.Fatalf("test failover before the attempts: %s, want %s", got, o.points[p1.ID])
	}
	before := durableAt(t, up, "recovery", "vm1")
	pointsBefore, err := svc.ListPoints(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}

	// Junk over the start of the disk, then a point that would serve it.
	junk := func() []*pb.Record {
		data := bytes.Repeat([]byte{0xEE}, 64<<10)
		return []*pb.Record{
			{Seq: 1, Time: time.Now().UnixNano(), Kind: uint32(rebound.RecordWrite), Offset: 0, Length: int64(len(data)), Data: data},
			{Seq: 2, Time: time.Now().UnixNano(), Kind: uint32(rebound.RecordMark), PointKind: string(rebound.PointCrash)},
		}
	}
	replAddr := up.Sites["recovery"].ReplAddr
	rogue := enrollPeer(t, up, "rogue", pki.RoleSite)
	agent := enrollPeer(t, up, "srv1", pki.RoleAgent)
	attempts := []struct {
		who    *peerClient
		as     string
		reason string
	}{
		{rogue, "rogue", `site "rogue" is not the source of stream`},
		{rogue, "primary", `certificate is for site "rogue", hello says "primary"`},
		{agent, "srv1", `site "srv1" is not the source of stream`},
	}
	actx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for _, a := range attempts {
		err := a.who.inject(actx, replAddr, "recovery", &pb.ReplHello{StreamId: streamID, SourceSite: a.as, Generation: gen}, junk())
		if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), a.reason) {
			t.Fatalf("%s (%s) as %s: %v, want PermissionDenied: %s", a.who.name, a.who.role, a.as, err, a.reason)
		}
		t.Logf("%s (%s) as %s: %v", a.who.name, a.who.role, a.as, err)
	}

	if got := durableAt(t, up, "recovery", "vm1"); got != before {
		t.Fatalf("recovery's journal moved from %d to %d", before, got)
	}
	pts, err := svc.ListPoints(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(pts) != fmt.Sprint(pointsBefore) {
		t.Fatalf("points changed:\n%v\nwas\n%v", pts, pointsBefore)
	}
	if got := exported(pts[len(pts)-1].ID); got != o.points[p1.ID] {
		t.Fatalf("test failover to the latest point after the attempts: %s, want %s", got, o.points[p1.ID])
	}
	if got := exported("latest"); got != o.points[p1.ID] {
		t.Fatalf("test failover to latest after the attempts: %s, want %s", got, o.points[p1.ID])
	}

	// Each refusal reaches the server's event log (the control channel is
	// asynchronous: wait for it).
	want := []string{"refused a replication stream from site rogue", "from agent srv1 (machine srv1)"}
	deadline := time.Now().Add(30 * time.Second)
	for {
		evs, err := svc.ListEvents(ctx, "vm1")
		if err != nil {
			t.Fatal(err)
		}
		found := 0
		for _, w := range want {
			for _, e := range evs {
				if e.Kind == "replication.refused" && e.Site == "recovery" && strings.Contains(e.Message, w) {
					found++
					break
				}
			}
		}
		if found == len(want) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("refusals not in the event log: %+v", evs)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// The real stream flows on: a new write reaches a new point.
	o.write(src, 20)
	p2 := o.point(svc, "vm1", false)
	if p2.Seq <= before {
		t.Fatalf("new point at %d, not past %d", p2.Seq, before)
	}
	if got := exported(p2.ID); got != o.points[p2.ID] {
		t.Fatalf("test failover to the new point: %s, want %s", got, o.points[p2.ID])
	}
	if mm := getMachine(t, svc, "vm1"); mm.Health != rebound.HealthNormal {
		t.Fatalf("health %s: %s", mm.Health, mm.HealthReason)
	}
}

// protectQuiet protects vm1 (size bytes, 50 writes of o first) to recovery
// under a policy that cuts no timed points, cutting the first point itself.
func protectQuiet(t *testing.T, up *UpMain, svc rebound.Service, o *oracle, size int64) string {
	t.Helper()
	ctx := context.Background()
	if _, err := svc.PutPolicy(ctx, rebound.Policy{Name: "quiet", RPOThreshold: rebound.Duration(time.Hour), Retention: rebound.Duration(24 * time.Hour), CrashInterval: rebound.Duration(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	m, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "primary", Disks: []int64{size}})
	if err != nil {
		t.Fatal(err)
	}
	src := m.Disks[0].NBD
	o.write(src, 50)
	protectAgain(t, up, svc)
	return src
}

// protectAgain protects vm1 to recovery under the quiet policy: the
// protect job waits for a first point, and the policy cuts none for an
// hour, so it cuts one at the source once the initial copy is done.
func protectAgain(t *testing.T, up *UpMain, svc rebound.Service) {
	t.Helper()
	ctx := context.Background()
	job, err := svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm1", To: "recovery", Policy: "quiet"})
	deadline := time.Now().Add(time.Minute)
	for {
		_, cerr := up.Sites["primary"].Site.CutPoint(ctx, "vm1", rebound.PointCrash)
		if cerr == nil {
			break
		}
		if rebound.ErrorCode(cerr) != rebound.ECONFLICT || time.Now().After(deadline) {
			t.Fatalf("first point: %v", cerr)
		}
		time.Sleep(50 * time.Millisecond)
	}
	waitJobDone(t, svc, job, err)
}

// TestAckBeyondHeadStopsTheStream: when recovery's journal holds records
// primary never wrote (here appended behind the receiver's back), the
// source's next write is acknowledged beyond its head. The sender stops
// instead of taking its own records for duplicates: primary reports the
// stream "broken" with the reason in ReplError, the server turns the
// machine's health critical with that reason, and the records primary
// wrote stay in its stream (its head moves, its acked sequence does not).
// The resync the reason names (unprotect, protect) recovers it: a new point
// exports exactly primary's bytes, none of the foreign ones.
func TestAckBeyondHeadStopsTheStream(t *testing.T) {
	ctx := context.Background()
	up, svc := testUp(t, t.TempDir())
	const size = 8 << 20
	o := newOracle(t, size, 11)
	src := protectQuiet(t, up, svc, o, size)
	p1 := o.point(svc, "vm1", false)

	streamID, _ := targetStream(t, up.Sites["recovery"].Config.DataDir, "vm1")
	tgt, err := up.Sites["recovery"].Site.Repl.Target(streamID)
	if err != nil {
		t.Fatal(err)
	}
	if tgt.SourceSite != "primary" || tgt.Machine != "vm1" || tgt.Generation == "" {
		t.Fatalf("target %+v", tgt)
	}
	data := bytes.Repeat([]byte{0xEE}, 4096)
	var foreign []*rebound.Record
	for i := uint64(1); i <= 3; i++ {
		foreign = append(foreign, &rebound.Record{Seq: p1.Seq + i, Time: time.Now().UnixNano(), Kind: rebound.RecordWrite, Offset: int64(i) << 12, Length: 4096, Data: data})
	}
	if err := tgt.Sink.Append(foreign); err != nil {
		t.Fatal(err)
	}

	o.write(src, 1) // one record: the target acks p1+3 for it
	source := func() rebound.MachineStatus {
		st, err := up.Sites["primary"].Site.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return st.Machines[0]
	}
	deadline := time.Now().Add(30 * time.Second)
	for source().ReplState != "broken" {
		if time.Now().After(deadline) {
			t.Fatalf("source never stopped: %+v", source())
		}
		time.Sleep(20 * time.Millisecond)
	}
	ms := source()
	want := "the target holds records up to " + fmtUint(p1.Seq+3) + " but this source wrote only up to " + fmtUint(p1.Seq+1)
	if !strings.Contains(ms.ReplError, want) || !strings.Contains(ms.ReplError, "run `rebound unprotect vm1 --wait`, then `rebound protect vm1 --to recovery --wait`") {
		t.Fatalf("ReplError %q, want %q", ms.ReplError, want)
	}
	if ms.AckedSeq != p1.Seq || ms.HeadSeq != p1.Seq+1 {
		t.Fatalf("source acked %d head %d: its record %d must stay unacknowledged", ms.AckedSeq, ms.HeadSeq, p1.Seq+1)
	}
	for {
		m := getMachine(t, svc, "vm1")
		if m.Health == rebound.HealthCritical {
			if !strings.Contains(m.HealthReason, want) || m.Protection.ReplError == "" {
				t.Fatalf("health reason %q, replError %q", m.HealthReason, m.Protection.ReplError)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("health %s (%s), want critical", m.Health, m.HealthReason)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Writes go on at the source; the stream stays stopped.
	o.write(src, 5)
	if ms := source(); ms.ReplState != "broken" || ms.AckedSeq != p1.Seq || ms.HeadSeq != p1.Seq+6 {
		t.Fatalf("after more writes: %+v", ms)
	}

	// The resync the reason names.
	waitJob(t, svc)(svc.(rebound.LoopService).Unprotect(ctx, rebound.UnprotectRequest{Machine: "vm1"}))
	protectAgain(t, up, svc)
	p2 := o.point(svc, "vm1", false)
	waitJob(t, svc)(svc.TestFailover(ctx, "vm1", p2.ID))
	if got := diskSum(t, getMachine(t, svc, "vm1").TestFailover.Disks[0].NBD); got != o.points[p2.ID] {
		t.Fatalf("after the resync: test failover %s, want %s", got, o.points[p2.ID])
	}
	waitJob(t, svc)(svc.TestFailoverCleanup(ctx, "vm1"))
	for {
		m := getMachine(t, svc, "vm1")
		if m.Health == rebound.HealthNormal && m.Protection.ReplError == "" {
			break
		}
		if time.Now().After(deadline.Add(30 * time.Second)) {
			t.Fatalf("after the resync: health %s (%s)", m.Health, m.HealthReason)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func fmtUint(n uint64) string { return strconv.FormatUint(n, 10) }
