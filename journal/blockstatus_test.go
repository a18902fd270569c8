package journal

import (
	"testing"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/blockcheck"
)

// randomRecord adds a write, zero or trim record inside [0, limit).
func (m *model) randomRecord(limit int64) {
	n := min(1+m.rng.Int64N(400<<10), limit)
	off := m.rng.Int64N(limit - n + 1)
	if m.rng.IntN(2) == 0 {
		off &^= 4095
	}
	switch m.rng.IntN(4) {
	case 0, 1:
		data := make([]byte, n)
		for i := range data {
			data[i] = byte(m.rng.Uint32() | 1)
		}
		m.add(&rebound.Record{Kind: rebound.RecordWrite, Offset: off, Length: n, Data: data})
	case 2:
		m.add(&rebound.Record{Kind: rebound.RecordZero, Offset: off, Length: n})
	default:
		m.add(&rebound.Record{Kind: rebound.RecordTrim, Offset: off, Length: n})
	}
}

// TestBlockStatusMatchesData: a view's disk (what failover and
// test-failover overlays read, and detach copies) reports extents from its
// records over the base file's holes; at the newest position and at an
// older one (a layered view), after a fold moved records into the base,
// every range reported zero reads as zero, directly and through NBD with
// libnbd, and the untouched half is reported zero.
func TestBlockStatusMatchesData(t *testing.T) {
	const size = 4 << 20
	m := newModel(11, size)
	m.add(&rebound.Record{Kind: rebound.RecordResyncBegin})
	for range 20 {
		m.randomRecord(size / 2)
	}
	m.add(&rebound.Record{Kind: rebound.RecordResyncEnd})
	for range 40 {
		m.randomRecord(size / 2)
	}
	j := openJ(t, t.TempDir(), m)
	defer j.Close()
	m.feed(t, j, 1, m.seq)
	if err := j.FoldAll(); err != nil {
		t.Fatal(err)
	}
	mid := m.seq
	for range 60 {
		m.randomRecord(size / 2)
	}
	m.feed(t, j, mid+1, m.seq)
	for _, seq := range []uint64{m.seq, mid + 30} {
		v, err := j.View(seq)
		if err != nil {
			t.Fatal(err)
		}
		d, ok := v.Disk(0).(blockcheck.Disk)
		if !ok {
			t.Fatal("a view's disk does not report extents")
		}
		res := blockcheck.Check(t, d)
		if res.Zero < size/2 || res.Hole < size/2 {
			t.Fatalf("view at %d: %d zero, %d hole bytes; the untouched half is %d", seq, res.Zero, res.Hole, size/2)
		}
		v.Close()
	}
}
