package site

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

// resyncDone appends an empty resync (begin, end): a journal's first
// consistent position.
func resyncDone(t *testing.T, u *unit, seq *uint64) {
	t.Helper()
	now := time.Now().UnixNano()
	recs := []*rebound.Record{{Seq: *seq + 1, Time: now, Kind: rebound.RecordResyncBegin}, {Seq: *seq + 2, Time: now, Kind: rebound.RecordResyncEnd}}
	*seq += 2
	if err := u.journal.Append(recs); err != nil {
		t.Fatal(err)
	}
}

// appendWrites appends one write of pattern v to every disk of u's
// journal, then a crash-consistent point.
func appendWrites(t *testing.T, u *unit, seq *uint64, v byte) {
	t.Helper()
	var recs []*rebound.Record
	for i := range u.disks() {
		*seq++
		recs = append(recs, &rebound.Record{Seq: *seq, Time: time.Now().UnixNano(), Kind: rebound.RecordWrite, Disk: uint32(i),
			Offset: 4096 * int64(v), Length: 4096, Data: bytes.Repeat([]byte{v + byte(i)}, 4096)})
	}
	*seq++
	recs = append(recs, &rebound.Record{Seq: *seq, Time: time.Now().UnixNano(), Kind: rebound.RecordMark, PointKind: rebound.PointCrash})
	if err := u.journal.Append(recs); err != nil {
		t.Fatal(err)
	}
}

// diskAt reads disk i of the unit's journal at its newest position.
func diskAt(t *testing.T, u *unit, i int) []byte {
	t.Helper()
	v, err := u.journal.View(u.journal.Durable())
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	b := make([]byte, testDisk)
	if _, err := v.Disk(i).ReadAt(b, 0); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	return b
}

// TestRegroupTargetCrash: a target regroup killed right after it saved its
// intent (before any file moved) is finished when the site opens again:
// the group's journal holds every acknowledged record of the old replicas,
// and a member left out is a released copy with its bytes.
func TestRegroupTargetCrash(t *testing.T) {
	for _, sameName := range []bool{false, true} {
		dir := t.TempDir()
		s := testSite(t, "recovery", dir)
		// Replicas of a and b, each its own stream; then (sameName) a group
		// g of a and b that drops b.
		var want [][]byte
		var spec rebound.ReplicationSpec
		if !sameName {
			ua := addTestUnit(t, s, "a", unitFields{Role: RoleTarget, Spec: &rebound.ReplicationSpec{Machine: "a", StreamID: "a.1"}}, map[string]int{"a": 1}, "a")
			ub := addTestUnit(t, s, "b", unitFields{Role: RoleTarget, Spec: &rebound.ReplicationSpec{Machine: "b", StreamID: "b.1"}}, map[string]int{"b": 2}, "b")
			var sa, sb uint64
			resyncDone(t, ua, &sa)
			resyncDone(t, ub, &sb)
			appendWrites(t, ua, &sa, 3)
			appendWrites(t, ub, &sb, 5)
			appendWrites(t, ub, &sb, 6)
			want = [][]byte{diskAt(t, ua, 0), diskAt(t, ub, 0), diskAt(t, ub, 1)}
			d := rebound.Disk{Name: "d", Size: testDisk}
			spec = rebound.ReplicationSpec{Machine: "g", Role: RoleTarget, StreamID: "g.1", PeerSite: "primary", AdoptDisks: true,
				Members: []rebound.MemberDisks{{Name: "a", Disks: []rebound.Disk{d}}, {Name: "b", Disks: []rebound.Disk{d, d}}}, Disks: []rebound.Disk{d, d, d}}
		} else {
			ug := addTestUnit(t, s, "g", unitFields{Role: RoleTarget, Spec: &rebound.ReplicationSpec{Machine: "g", StreamID: "g.1"}}, map[string]int{"a": 1, "b": 1}, "a", "b")
			var sg uint64
			resyncDone(t, ug, &sg)
			appendWrites(t, ug, &sg, 7)
			want = [][]byte{diskAt(t, ug, 0), diskAt(t, ug, 1)}
			d := rebound.Disk{Name: "d", Size: testDisk}
			spec = rebound.ReplicationSpec{Machine: "g", Role: RoleTarget, StreamID: "g.2", PeerSite: "primary", AdoptDisks: true,
				Members: []rebound.MemberDisks{{Name: "a", Disks: []rebound.Disk{d}}}, Disks: []rebound.Disk{d}}
		}
		s.regroupCrash = func() bool { return true }
		if err := s.StartReplication(context.Background(), spec); !errors.Is(err, errRegroupCrash) {
			t.Fatalf("regroup with a crash: %v", err)
		}
		s.Close()

		s = testSite(t, "recovery", dir)
		s.mu.Lock()
		g := s.units["g"]
		s.mu.Unlock()
		if g == nil || g.state.Regroup != nil || g.journal == nil || g.state.Spec.StreamID != spec.StreamID {
			t.Fatalf("group after the reopen: %+v", g)
		}
		var seq uint64
		resyncDone(t, g, &seq) // the source's delta resync, empty here
		for i := range spec.Disks {
			if !bytes.Equal(diskAt(t, g, i), want[i]) {
				t.Fatalf("same name %v: disk %d of the regrouped journal lost the replica's bytes", sameName, i)
			}
		}
		if sameName {
			// b left: its folded disk is a released copy.
			s.mu.Lock()
			ub := s.units["b"]
			s.mu.Unlock()
			if ub == nil || ub.state.Role != RoleReleased {
				t.Fatalf("b after leaving: %+v", ub)
			}
			got, err := os.ReadFile(s.diskPath("b", 0))
			if err != nil || !bytes.Equal(got, want[1]) {
				t.Fatalf("b's released disk: %v", err)
			}
		}
		if m, _ := filepath.Glob(filepath.Join(dir, "*", "*", "journal.regroup")); len(m) > 0 {
			t.Fatalf("old journals left: %v", m)
		}
		// Repeating the call changes nothing.
		if err := s.StartReplication(context.Background(), spec); err != nil {
			t.Fatalf("repeated regroup: %v", err)
		}
		s.Close()
	}
}
