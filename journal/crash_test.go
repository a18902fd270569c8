package journal

import (
	"testing"

	"github.com/rebound-dr/rebound"
)

// TestSourceCrashGap: a source that lost its newest records in a crash
// (capture's direct mode) continues above them with a ResyncBegin tagged
// ResyncSourceCrash. The journal takes the jump (also in the middle of a
// batch), records the lost seqs as a gap from Durable+1, cuts no point and
// serves no view inside the window, and the matching ResyncEnd closes it
// with the source's bytes. It is not a repair (no digests asked, no
// OnRepaired), RegionsAfter does not widen to whole disks, and all of it
// survives a reopen. A jump by any other record is refused.
func TestSourceCrashGap(t *testing.T) {
	m := newModel(11, 128<<10, 64<<10)
	m.stream(200)
	dir := t.TempDir()
	repaired := 0
	open := func() *Journal {
		j, err := Open(dir, m.diskTable(), Options{SegmentSize: 256 << 10, Logger: quiet, OnRepaired: func(from, to uint64) { repaired++ }})
		if err != nil {
			t.Fatal(err)
		}
		return j
	}
	j := open()
	defer func() { j.Close() }()
	sent := m.seq // the source's spool holds sent-4..sent, the target has up to sent-5
	m.feed(t, j, 1, sent-5)

	// Records only the source's ring held: lost in the kill.
	var lost []*rebound.Record
	for range 30 {
		m.random()
		lost = append(lost, m.recs[len(m.recs)-1])
	}
	lostTo := m.seq + 1000 // the seq watermark: seqs up to it may have been used
	m.seq = lostTo

	// The restarted source: its spooled records, then the crash resync of
	// the regions the lost records touched, a mark inside the window
	// (not a point), a live write, the end, a mark after it (a point).
	batch := append([]*rebound.Record(nil), m.recs[sent-5:sent]...)
	m.add(&rebound.Record{Kind: rebound.RecordResyncBegin, PointKind: rebound.ResyncSourceCrash})
	begin := m.seq
	batch = append(batch, m.recs[len(m.recs)-1])
	for _, r := range lost {
		if r.Length == 0 || r.Kind == rebound.RecordMark {
			continue
		}
		data := append([]byte(nil), m.disks[r.Disk][r.Offset:r.Offset+r.Length]...)
		m.add(&rebound.Record{Kind: rebound.RecordWrite, Disk: r.Disk, Offset: r.Offset, Length: r.Length, Data: data})
		batch = append(batch, m.recs[len(m.recs)-1])
	}
	m.add(&rebound.Record{Kind: rebound.RecordMark, PointKind: rebound.PointCrash})
	inside := m.seq
	batch = append(batch, m.recs[len(m.recs)-1])
	m.random()
	batch = append(batch, m.recs[len(m.recs)-1])

	// A plain record cannot jump.
	bad := &rebound.Record{Seq: j.Durable() + 7, Kind: rebound.RecordZero, Disk: 0, Offset: 0, Length: 512}
	if err := j.Append([]*rebound.Record{bad}); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("jump by a zero record: %v, want EINVALID", err)
	}
	// An untagged begin cannot either.
	if err := j.Append([]*rebound.Record{{Seq: begin, Kind: rebound.RecordResyncBegin}}); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("jump by an untagged begin: %v, want EINVALID", err)
	}

	if err := j.Append(batch); err != nil {
		t.Fatal(err)
	}
	if j.Durable() != m.seq {
		t.Fatalf("durable %d, want %d", j.Durable(), m.seq)
	}
	check := func(j *Journal) {
		t.Helper()
		for _, p := range j.Points().Points {
			if p.Seq > sent {
				t.Fatalf("point %s inside the source-crash window (lost %d..%d, window open)", p.ID, sent+1, lostTo)
			}
		}
		for _, s := range []uint64{sent + 1, begin, inside, m.seq} {
			if v, err := j.View(s); err == nil {
				v.Close()
				t.Fatalf("view of position %d inside the window", s)
			}
		}
		if _, _, _, ok := j.Repairing(); ok {
			t.Fatal("a source-crash gap reported as a repair")
		}
		if rs := j.RegionsAfter(sent - 5); len(rs[0]) == 1 && rs[0][0].Length == 128<<10 && len(rs[1]) == 1 && rs[1][0].Length == 64<<10 {
			t.Fatalf("RegionsAfter across a source-crash gap widened to whole disks: %v", rs)
		}
		// Positions before the window keep their bytes.
		v, err := j.View(sent)
		if err != nil {
			t.Fatalf("View(%d) before the window: %v", sent, err)
		}
		if hashView(t, v, m.sizes(), m.rng) != m.hashes[sent] {
			t.Fatalf("View(%d) before the window: bytes differ", sent)
		}
		v.Close()
	}
	check(j)

	// The end closes the window: its position is the source's state.
	m.add(&rebound.Record{Kind: rebound.RecordResyncEnd})
	end := m.seq
	m.add(&rebound.Record{Kind: rebound.RecordMark, PointKind: rebound.PointApp})
	if err := j.Append(m.recs[len(m.recs)-2:]); err != nil {
		t.Fatal(err)
	}
	after := func(j *Journal) {
		t.Helper()
		pl := j.Points()
		last := pl.Points[len(pl.Points)-1]
		if last.Seq != m.seq || last.Kind != rebound.PointApp {
			t.Fatalf("newest point %s, want p%d after the window", last.ID, m.seq)
		}
		for _, p := range pl.Points {
			if p.Seq > sent && p.Seq < end {
				t.Fatalf("point %s inside the closed source-crash window", p.ID)
			}
		}
		for _, s := range []uint64{end, m.seq} {
			v, err := j.View(s)
			if err != nil {
				t.Fatalf("View(%d) after the window: %v", s, err)
			}
			if hashView(t, v, m.sizes(), m.rng) != m.hashes[s] {
				t.Fatalf("View(%d): bytes differ from the source's", s)
			}
			v.Close()
		}
		if _, err := j.View(inside); err == nil {
			t.Fatal("view of the mark inside the window")
		}
	}
	after(j)
	if repaired != 0 {
		t.Fatal("a source-crash gap fired OnRepaired")
	}
	j.Close()
	j = open()
	after(j)
	if j.Durable() != m.seq {
		t.Fatalf("durable %d after reopen, want %d", j.Durable(), m.seq)
	}
	// Expire can fold past the gap.
	if err := j.FoldAll(); err != nil {
		t.Fatal(err)
	}
}
