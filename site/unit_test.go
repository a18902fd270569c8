package site

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/nbd"
)

const testDisk = 1 << 20

func testSite(t *testing.T, name, dir string) *Site {
	t.Helper()
	s := New(Config{Name: name, DataDir: dir, PeerTLS: &tls.Config{}, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err := s.Open(); err != nil {
		t.Fatalf("open site %s: %v", name, err)
	}
	return s
}

// serveNBD serves the site's exports on a unix socket until the test ends.
func serveNBD(t *testing.T, s *Site) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go s.NBD.Serve(l)
	t.Cleanup(func() { s.NBD.Close() })
	return sock
}

// addTestUnit holds a unit of the given role whose members are machines
// with the given numbers of disks, named m0, m1, ... in member order.
func addTestUnit(t *testing.T, s *Site, name string, f unitFields, members map[string]int, order ...string) *unit {
	t.Helper()
	var ms []*machine
	for _, n := range order {
		st := machineState{Name: n}
		for i := 0; i < members[n]; i++ {
			st.Disks = append(st.Disks, rebound.Disk{Name: "d", Size: testDisk})
		}
		if err := os.MkdirAll(s.machineDir(n), 0o700); err != nil {
			t.Fatal(err)
		}
		ms = append(ms, &machine{state: st})
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	u := newUnit(name, f, ms)
	var err error
	if f.Role == RoleTarget {
		err = s.startTarget(u, nil)
	} else {
		err = s.openUnit(u)
	}
	if err != nil {
		t.Fatalf("open unit %s: %v", name, err)
	}
	s.addUnitLocked(u)
	if err := s.saveLocked(); err != nil {
		t.Fatal(err)
	}
	return u
}

func qemuWrite(t *testing.T, sock, export string, pattern byte, off, n int) {
	t.Helper()
	cmd := exec.Command("qemu-io", "-f", "raw", nbd.URI("unix", sock, export),
		"-c", fmt.Sprintf("write -P %d %d %d", pattern, off, n))
	if out, err := cmd.CombinedOutput(); err != nil || strings.Contains(string(out), "error") {
		t.Fatalf("qemu-io write to %s: %v: %s", export, err, out)
	}
}

// readExport copies an export with nbdcopy and returns its bytes.
func readExport(t *testing.T, sock, export string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "copy.raw")
	if b, err := exec.Command("nbdcopy", nbd.URI("unix", sock, export), out).CombinedOutput(); err != nil {
		t.Fatalf("nbdcopy %s: %v: %s", export, err, b)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func fill(b []byte, off, n int, v byte) {
	for i := off; i < off+n; i++ {
		b[i] = v
	}
}

// TestUnitTwoMembersOneStream builds a stream unit of two machines (a with
// one disk, b with two) and shows that the unit is one stream: writes to
// both members' exports land in it in acknowledgement order at the
// members' disk offsets, and an activation of the target unit exports each
// member's disks with their bytes, also after a restart of the site.
func TestUnitTwoMembersOneStream(t *testing.T) {
	ctx := context.Background()
	src := testSite(t, "primary", t.TempDir())
	defer src.Close()
	members := map[string]int{"a": 1, "b": 2}
	gen := newGeneration()
	addTestUnit(t, src, "g", unitFields{Role: RoleActive, Generation: gen}, members, "a", "b")
	sock := serveNBD(t, src)

	// The unit's stream starts for any member's name; its delta seed is
	// empty, so the stream holds just the writes below.
	spec := rebound.ReplicationSpec{Machine: "b", Role: RoleSource, StreamID: "s-g", PeerSite: "recovery",
		PeerAddr: "127.0.0.1:9", Seed: rebound.SeedDelta, Generation: gen}
	if err := src.StartReplication(ctx, spec); err != nil {
		t.Fatal(err)
	}
	src.mu.Lock()
	u := src.units["g"]
	stream := u.stream
	if src.machines["a"].unit != u || src.machines["b"].offset != 1 || stream == nil {
		src.mu.Unlock()
		t.Fatalf("members are not linked to unit g at offsets 0 and 1")
	}
	src.mu.Unlock()

	// A, then B, then A again, each after the previous was acknowledged.
	qemuWrite(t, sock, "a-disk0", 0x11, 0, 4096)
	qemuWrite(t, sock, "b-disk1", 0x22, 4096, 4096)
	qemuWrite(t, sock, "a-disk0", 0x33, 0, 512)

	// Read the stream up to its resync end and the writes.
	var recs []*rebound.Record
	var writes []uint32
	ended := false
	for len(writes) < 3 || !ended {
		rs, err := stream.Read(ctx, uint64(len(recs))+1, 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rs {
			recs = append(recs, r)
			switch r.Kind {
			case rebound.RecordWrite:
				writes = append(writes, r.Disk)
			case rebound.RecordResyncEnd:
				ended = true
			}
		}
	}
	if want := []uint32{0, 2, 0}; len(writes) != 3 || writes[0] != want[0] || writes[1] != want[1] || writes[2] != want[2] {
		t.Fatalf("write records carry disks %v, want %v (a's disk 0, b's disk 1 at offset 1, a's disk 0)", writes, want)
	}
	// Fencing a member fences its unit: every member's exports.
	head, err := src.Fence(ctx, "a")
	if err != nil || head != stream.Head() {
		t.Fatalf("fence a: head %d, %v; want the stream's head %d", head, err, stream.Head())
	}
	if _, err := src.lookupExport("b-disk0"); err == nil || !strings.Contains(err.Error(), "fenced") {
		t.Fatalf("b-disk0 is served while its unit is fenced: %v", err)
	}
	if err := src.Unfence(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	if _, err := src.lookupExport("a-disk0"); err != nil {
		t.Fatalf("a-disk0 after its unit was unfenced: %v", err)
	}
	p, err := stream.Mark(rebound.PointCrash)
	if err != nil {
		t.Fatal(err)
	}
	rs, err := stream.Read(ctx, uint64(len(recs))+1, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	recs = append(recs, rs...)
	// Member b's disk 1 is b's own file.
	b1, err := os.ReadFile(src.diskPath("b", 1))
	if err != nil {
		t.Fatal(err)
	}
	wantB1 := make([]byte, testDisk)
	fill(wantB1, 4096, 4096, 0x22)
	if !bytes.Equal(b1, wantB1) {
		t.Fatalf("b's disk 1 file does not hold the write to b-disk1")
	}

	// The target unit receives the one stream in one journal.
	tdir := t.TempDir()
	tgt := testSite(t, "recovery", tdir)
	tspec := spec
	tspec.Role = RoleTarget
	addTestUnit(t, tgt, "g", unitFields{Role: RoleTarget, Spec: &tspec, Generation: gen}, members, "a", "b")
	tu := tgt.units["g"]
	if err := tu.journal.Append(recs); err != nil {
		t.Fatal(err)
	}
	disks, err := tgt.Activate(ctx, rebound.ActivateSpec{Machine: "a", PointID: p.ID, Seq: p.Seq})
	if err != nil {
		t.Fatal(err)
	}
	if len(disks) != 3 || !strings.HasSuffix(disks[0].NBD, "a-disk0") || !strings.HasSuffix(disks[2].NBD, "b-disk1") {
		t.Fatalf("activation disks %+v, want a-disk0, b-disk0, b-disk1", disks)
	}
	// A test failover of the unit exports the same point under -test names.
	if _, err := tgt.Activate(ctx, rebound.ActivateSpec{Machine: "b", PointID: p.ID, Seq: p.Seq, Test: true}); err != nil {
		t.Fatal(err)
	}
	wantA0 := make([]byte, testDisk)
	fill(wantA0, 0, 4096, 0x11)
	fill(wantA0, 0, 512, 0x33)
	want := map[string][]byte{"a-disk0": wantA0, "b-disk0": make([]byte, testDisk), "b-disk1": wantB1}
	check := func(s *Site) {
		t.Helper()
		sock := serveNBD(t, s)
		for export, w := range want {
			for _, name := range []string{export, export + "-test"} {
				if got := readExport(t, sock, name); !bytes.Equal(got, w) {
					t.Errorf("activated export %s does not hold the member's disk at the point", name)
				}
			}
		}
		st, err := s.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, ms := range st.Machines {
			if !ms.Activated || !ms.TestActivated || ms.Role != RoleTarget {
				t.Errorf("machine %s: role %s activated %v, want an activated target", ms.Name, ms.Role, ms.Activated)
			}
		}
	}
	check(tgt)

	// The unit, its members and its activation survive a restart.
	if err := tgt.Close(); err != nil {
		t.Fatal(err)
	}
	tgt = testSite(t, "recovery", tdir)
	defer tgt.Close()
	if u := tgt.units["g"]; u == nil || len(u.members) != 2 || u.members[1].state.Name != "b" || u.members[1].offset != 1 || u.act == nil || u.test == nil {
		t.Fatalf("unit g after restart: %+v", u)
	}
	check(tgt)

	// Commit renames the unit's disk k into its member's file.
	if err := tgt.Commit(ctx, "a", nil); err != nil {
		t.Fatal(err)
	}
	for _, f := range []struct {
		m string
		i int
		w []byte
	}{{"a", 0, wantA0}, {"b", 0, want["b-disk0"]}, {"b", 1, wantB1}} {
		if got, err := os.ReadFile(tgt.diskPath(f.m, f.i)); err != nil || !bytes.Equal(got, f.w) {
			t.Errorf("after commit, disk %d of %s does not hold its bytes at the point (%v)", f.i, f.m, err)
		}
	}
	if u := tgt.units["g"]; u.state.Role != RoleActive || len(u.members[1].files) != 2 {
		t.Fatalf("unit g after commit: role %s, b has %d open disks", u.state.Role, len(u.members[1].files))
	}
}

// TestStateV1Migrates opens a data dir whose state.json is the version 1
// list of machines: every machine becomes a unit of one named like it with
// its fields, and state.json is rewritten as version 2.
func TestStateV1Migrates(t *testing.T) {
	dir := t.TempDir()
	v1 := `[
  {"name": "x", "disks": [{"name": "root", "size": 1048576}], "role": "active", "generation": "g-x",
   "hooks": {"freeze": "/bin/true"}, "vm": {"cpus": 1, "memoryMiB": 64}, "power": "off"},
  {"name": "y", "disks": [{"name": "root", "size": 1048576}, {"name": "data", "size": 2097152}], "role": "released",
   "fenced": true, "generation": "g-y2", "parent": "g-y1", "diverged": true},
  {"name": "z", "disks": [{"name": "root", "size": 1048576}], "role": "target", "generation": "g-z",
   "spec": {"machine": "z", "role": "target", "streamId": "s-z", "disks": [{"name": "root", "size": 1048576}], "peerSite": "primary", "policy": {"name": "p", "retention": 0}}}
]`
	if err := os.WriteFile(filepath.Join(dir, "state.json"), []byte(v1), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"x", "y", "z"} {
		if err := os.MkdirAll(filepath.Join(dir, "machines", n), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	s := testSite(t, "primary", dir)
	check := func(s *Site) {
		t.Helper()
		s.mu.Lock()
		defer s.mu.Unlock()
		if len(s.units) != 3 || len(s.machines) != 3 {
			t.Fatalf("%d units, %d machines; want 3 and 3", len(s.units), len(s.machines))
		}
		for _, n := range []string{"x", "y", "z"} {
			u := s.units[n]
			if u == nil || !u.lone() || s.machines[n].unit != u || s.unitDir(u) != s.machineDir(n) {
				t.Fatalf("machine %s is not a unit of one in its own directory", n)
			}
		}
		x, y, z := s.units["x"], s.units["y"], s.units["z"]
		if x.state.Role != RoleActive || x.state.Generation != "g-x" || x.members[0].state.Hooks.Freeze != "/bin/true" ||
			x.members[0].state.VM == nil || x.members[0].state.Power != "off" || len(x.members[0].files) != 1 {
			t.Errorf("x: %+v %+v", x.state, x.members[0].state)
		}
		if y.state.Role != RoleReleased || !y.state.Fenced || !y.state.Diverged || y.state.Parent != "g-y1" ||
			y.state.Generation != "g-y2" || len(y.disks()) != 2 || y.disks()[1].Size != 2097152 {
			t.Errorf("y: %+v", y.state)
		}
		if z.state.Role != RoleTarget || z.state.Spec == nil || z.state.Spec.StreamID != "s-z" || z.journal == nil {
			t.Errorf("z: %+v", z.state)
		}
	}
	check(s)
	b, err := os.ReadFile(filepath.Join(dir, "state.json"))
	if err != nil {
		t.Fatal(err)
	}
	var st siteState
	if err := json.Unmarshal(b, &st); err != nil || st.Version != stateVersion || len(st.Units) != 3 {
		t.Fatalf("state.json after open is not version %d with 3 units (%v): %s", stateVersion, err, b)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = testSite(t, "primary", dir)
	defer s.Close()
	check(s)
	if _, err := os.Stat(filepath.Join(dir, "machines", "z", "journal")); err != nil {
		t.Errorf("z's journal is not at machines/z/journal: %v", err)
	}
}
