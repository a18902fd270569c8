package journal

import (
	"context"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/digest"
)

// TestRepairGap: a journal damaged in an older segment repairs itself.
// Repair drops the records from the damage on and writes a gap record: the
// positions before it keep their bytes and points, none after it is
// consistent. An unrelated resync window does not close the gap; the
// repair resync does (a ResyncBegin tagged repair, the blocks whose digests
// differ, its ResyncEnd), after which positions are consistent again with
// the source's bytes, new marks are points, the lost ones never come back,
// and all of it survives a reopen.
func TestRepairGap(t *testing.T) {
	m := newModel(7, 128<<10, 64<<10)
	m.stream(600)
	dir := t.TempDir()
	j := openJ(t, dir, m)
	m.feed(t, j, 1, m.seq)
	j.Close()
	segs, _ := filepath.Glob(filepath.Join(dir, walDir, "*.wal"))
	if len(segs) < 3 {
		t.Fatalf("%d segments", len(segs))
	}
	b, _ := os.ReadFile(segs[1])
	for i := len(b) / 2; i < len(b)/2+16; i++ {
		b[i] ^= 0x5a
	}
	os.WriteFile(segs[1], b, 0o600)

	var repaired [][2]uint64
	j, err := Open(dir, m.diskTable(), Options{SegmentSize: 256 << 10, Logger: quiet, OnRepaired: func(from, to uint64) {
		repaired = append(repaired, [2]uint64{from, to})
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { j.Close() }()
	if j.Corrupt() == nil {
		t.Fatal("damage not reported")
	}
	d := j.Durable()
	from, to, err := j.Repair()
	if err != nil {
		t.Fatal(err)
	}
	if from != d+1 || to != m.seq || j.Durable() != m.seq || j.Corrupt() != nil {
		t.Fatalf("repair: lost %d..%d, durable %d, corrupt %v; want %d..%d", from, to, j.Durable(), j.Corrupt(), d+1, m.seq)
	}
	lostFrom := from
	checkGap := func(j *Journal) {
		t.Helper()
		pl := j.Points()
		for _, p := range pl.Points {
			if p.Seq >= lostFrom && p.Seq <= to {
				t.Fatalf("point %s lies in the lost range %d..%d", p.ID, lostFrom, to)
			}
		}
		for s := range m.cons {
			if s < lostFrom {
				continue
			}
			if _, err := j.View(s); err == nil && s <= to {
				t.Fatalf("view of position %d inside the gap", s)
			}
		}
		// Kept positions keep their bytes.
		for _, s := range []uint64{d, d - 1, d / 2} {
			if !m.cons[s] {
				continue
			}
			v, err := j.View(s)
			if err != nil {
				t.Fatalf("View(%d) before the damage: %v", s, err)
			}
			if hashView(t, v, m.sizes(), m.rng) != m.hashes[s] {
				t.Fatalf("View(%d) before the damage: bytes differ", s)
			}
			v.Close()
		}
	}
	checkGap(j)
	if _, _, _, ok := j.Repairing(); !ok {
		t.Fatal("no repair pending after Repair")
	}
	if rs := j.RegionsAfter(d - 1); len(rs[0]) != 1 || rs[0][0].Length != 128<<10 {
		t.Fatalf("RegionsAfter across a gap: %v, want whole disks", rs)
	}

	// An unrelated resync window (and a mark in it) goes through: the gap
	// stays open.
	next := m.seq + 1
	m.add(&rebound.Record{Kind: rebound.RecordResyncBegin})
	for range 5 {
		m.random()
	}
	m.add(&rebound.Record{Kind: rebound.RecordResyncEnd})
	m.add(&rebound.Record{Kind: rebound.RecordMark, PointKind: rebound.PointCrash})
	m.feed(t, j, next, m.seq)
	if _, _, armed, ok := j.Repairing(); !ok || armed {
		t.Fatalf("unrelated resync: repairing %v armed %v, want a pending, unarmed repair", ok, armed)
	}
	if _, err := j.View(m.seq); err == nil {
		t.Fatal("view after an unrelated resync inside the gap")
	}

	// The source's side: compare digests, resync what differs.
	req, err := j.RepairRequest(context.Background())
	if err != nil || req == nil || req.From != lostFrom || req.To != to || len(req.Digests) != 2 {
		t.Fatalf("repair request %+v, %v", req, err)
	}
	next = m.seq + 1
	m.add(&rebound.Record{Kind: rebound.RecordResyncBegin, PointKind: rebound.ResyncRepair})
	var differ, total int64
	for i, disk := range m.disks {
		size := int64(len(disk))
		ours, err := digest.ReaderAt(context.Background(), bytesReader(disk), size, req.BlockSize, 0)
		if err != nil {
			t.Fatal(err)
		}
		n := (size + req.BlockSize - 1) / req.BlockSize
		theirs := make([][]byte, n)
		for k := range theirs {
			theirs[k] = req.Digests[i][k*digest.Size : (k+1)*digest.Size]
		}
		total += size
		for _, r := range digest.Diff(ours, theirs, req.BlockSize, size) {
			differ += r.Length
			m.add(&rebound.Record{Kind: rebound.RecordWrite, Disk: uint32(i), Offset: r.Offset, Length: r.Length,
				Data: append([]byte(nil), disk[r.Offset:r.Offset+r.Length]...)})
		}
	}
	if differ == 0 || differ >= total {
		t.Fatalf("%d of %d bytes differ: the test wants some, not all", differ, total)
	}
	m.add(&rebound.Record{Kind: rebound.RecordResyncEnd})
	end := m.seq
	for range 30 {
		m.random()
	}
	m.add(&rebound.Record{Kind: rebound.RecordMark, PointKind: rebound.PointApp})
	m.feed(t, j, next, m.seq)
	if _, _, _, ok := j.Repairing(); ok {
		t.Fatal("repair still pending after the repair resync")
	}
	if len(repaired) != 1 || repaired[0] != [2]uint64{lostFrom, to} {
		t.Fatalf("OnRepaired calls %v, want one for %d..%d", repaired, lostFrom, to)
	}
	check := func(j *Journal) {
		t.Helper()
		checkGap(j)
		for _, s := range []uint64{end, m.seq} {
			v, err := j.View(s)
			if err != nil {
				t.Fatalf("View(%d) after the repair: %v", s, err)
			}
			if hashView(t, v, m.sizes(), rand.New(rand.NewPCG(1, 2))) != m.hashes[s] {
				t.Fatalf("View(%d) after the repair: bytes differ from the source", s)
			}
			v.Close()
		}
		pl := j.Points()
		if n := len(pl.Points); n == 0 || pl.Points[n-1].Seq != m.seq {
			t.Fatalf("newest point %v, want the mark at %d", pl.Points, m.seq)
		}
	}
	check(j)
	j.Close()
	j, err = Open(dir, m.diskTable(), Options{SegmentSize: 256 << 10, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	if j.Corrupt() != nil || j.Durable() != m.seq {
		t.Fatalf("reopen: corrupt %v, durable %d want %d", j.Corrupt(), j.Durable(), m.seq)
	}
	check(j)
}

type bytesReader []byte

func (b bytesReader) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(b)) {
		return 0, io.EOF
	}
	return copy(p, b[off:]), nil
}

// TestRepairCrashBeforeGap: a crash after the wal was cut but before the
// gap record landed; Open writes the gap from meta's intent, so the
// journal neither takes the source's next records as following the kept
// ones nor serves a position past the damage.
func TestRepairCrashBeforeGap(t *testing.T) {
	m := newModel(8, 128<<10)
	m.stream(400)
	dir := t.TempDir()
	j := openJ(t, dir, m)
	m.feed(t, j, 1, m.seq)
	j.Close()
	segs, _ := filepath.Glob(filepath.Join(dir, walDir, "*.wal"))
	b, _ := os.ReadFile(segs[1])
	b[len(b)/2] ^= 0x40
	os.WriteFile(segs[1], b, 0o600)
	j = openJ(t, dir, m)
	d, last := j.Durable(), j.log.LastSeq()
	// Repair's first two steps, then the crash.
	mt := j.meta
	mt.Lost = &[2]uint64{d + 1, last}
	if err := writeMeta(dir, mt); err != nil {
		t.Fatal(err)
	}
	if _, _, err := j.log.DropCorrupt(); err != nil {
		t.Fatal(err)
	}
	j.abandon()
	j = openJ(t, dir, m)
	defer j.Close()
	from, to, armed, ok := j.Repairing()
	if !ok || armed || from != d+1 || to != last || j.Durable() != last || j.Corrupt() != nil {
		t.Fatalf("reopen: repairing %v (%d..%d, armed %v), durable %d; want the gap %d..%d", ok, from, to, armed, j.Durable(), d+1, last)
	}
	if err := j.Append(m.recs[d : d+1]); err != nil {
		t.Fatalf("a record below the gap is a resend and ignored: %v", err)
	}
	if j.Durable() != last {
		t.Fatalf("durable %d after a resend, want %d", j.Durable(), last)
	}
}
