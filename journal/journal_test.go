package journal

import (
	"bytes"
	"crypto/sha256"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

// model is the oracle: the disks in memory, and the hash of all disks after
// every position.
type model struct {
	disks  [][]byte
	seq    uint64
	recs   []*rebound.Record
	hashes map[uint64][32]byte
	cons   map[uint64]bool // consistent positions
	open   bool            // inside a resync window
	rng    *rand.Rand
}

func newModel(seed uint64, sizes ...int64) *model {
	m := &model{hashes: map[uint64][32]byte{}, cons: map[uint64]bool{}, open: true, rng: rand.New(rand.NewPCG(seed, seed+1))}
	for _, s := range sizes {
		m.disks = append(m.disks, make([]byte, s))
	}
	return m
}

func (m *model) diskTable() []rebound.Disk {
	var d []rebound.Disk
	for i, b := range m.disks {
		d = append(d, rebound.Disk{Name: string(rune('a' + i)), Size: int64(len(b))})
	}
	return d
}

func (m *model) hash() [32]byte {
	h := sha256.New()
	for _, d := range m.disks {
		h.Write(d)
	}
	var s [32]byte
	copy(s[:], h.Sum(nil))
	return s
}

// add appends a record to the stream and applies it to the model.
func (m *model) add(r *rebound.Record) {
	m.seq++
	r.Seq = m.seq
	r.Time = t0.Add(time.Duration(m.seq) * time.Millisecond).UnixNano()
	switch r.Kind {
	case rebound.RecordWrite:
		copy(m.disks[r.Disk][r.Offset:], r.Data)
	case rebound.RecordZero, rebound.RecordTrim:
		clear(m.disks[r.Disk][r.Offset : r.Offset+r.Length])
	case rebound.RecordResyncBegin:
		wasOpen := m.open
		m.open = true
		if !wasOpen {
			m.cons[m.seq] = true
		}
	case rebound.RecordResyncEnd:
		m.open = false
	}
	if !m.open {
		m.cons[m.seq] = true
	}
	m.recs = append(m.recs, r)
	m.hashes[m.seq] = m.hash()
}

func (m *model) randRange(d int) (int64, int64) {
	size := int64(len(m.disks[d]))
	var n int64
	switch m.rng.IntN(4) {
	case 0:
		n = 1 + m.rng.Int64N(100) // tiny, unaligned
	case 1:
		n = 4096 * (1 + m.rng.Int64N(4))
	default:
		n = 1 + m.rng.Int64N(20000)
	}
	n = min(n, size)
	off := m.rng.Int64N(size - n + 1)
	if m.rng.IntN(2) == 0 {
		off &^= 511
	}
	return off, n
}

// random adds one random record (not a resync marker).
func (m *model) random() {
	d := m.rng.IntN(len(m.disks))
	switch k := m.rng.IntN(20); {
	case k < 13:
		off, n := m.randRange(d)
		data := make([]byte, n)
		for i := range data {
			data[i] = byte(m.rng.Uint32() | 1)
		}
		m.add(&rebound.Record{Kind: rebound.RecordWrite, Disk: uint32(d), Offset: off, Length: n, Data: data})
	case k < 15:
		off, n := m.randRange(d)
		m.add(&rebound.Record{Kind: rebound.RecordZero, Disk: uint32(d), Offset: off, Length: n})
	case k < 17:
		off, n := m.randRange(d)
		m.add(&rebound.Record{Kind: rebound.RecordTrim, Disk: uint32(d), Offset: off, Length: n})
	case k < 19:
		m.add(&rebound.Record{Kind: rebound.RecordMark, PointKind: rebound.PointCrash})
	default:
		m.add(&rebound.Record{Kind: rebound.RecordMark, PointKind: rebound.PointApp})
	}
}

// stream builds an initial copy in a resync window, then n random records
// with an occasional resync window.
func (m *model) stream(n int) {
	m.add(&rebound.Record{Kind: rebound.RecordResyncBegin})
	for d, b := range m.disks {
		for off := int64(0); off < int64(len(b)); off += 32 << 10 {
			data := make([]byte, min(32<<10, int64(len(b))-off))
			for i := range data {
				data[i] = byte(m.rng.Uint32())
			}
			m.add(&rebound.Record{Kind: rebound.RecordWrite, Disk: uint32(d), Offset: off, Length: int64(len(data)), Data: data})
		}
	}
	m.add(&rebound.Record{Kind: rebound.RecordResyncEnd})
	for i := 0; i < n; i++ {
		if m.rng.IntN(300) == 0 {
			m.add(&rebound.Record{Kind: rebound.RecordResyncBegin})
			for k := m.rng.IntN(20); k >= 0; k-- {
				m.random()
			}
			m.add(&rebound.Record{Kind: rebound.RecordResyncEnd})
		}
		m.random()
	}
}

// feed appends the model's records from..to (inclusive) in random batches,
// sometimes resending records the journal already holds.
func (m *model) feed(t testing.TB, j *Journal, from, to uint64) {
	t.Helper()
	for s := from; s <= to; {
		n := uint64(1 + m.rng.IntN(40))
		lo := s
		if m.rng.IntN(8) == 0 && lo > 3 {
			lo -= uint64(m.rng.IntN(3)) // overlap: must be ignored
		}
		hi := min(s+n-1, to)
		if err := j.Append(m.recs[lo-1 : hi]); err != nil {
			t.Fatalf("append %d..%d: %v", lo, hi, err)
		}
		if j.Durable() != hi {
			t.Fatalf("durable %d after append to %d", j.Durable(), hi)
		}
		s = hi + 1
	}
}

func (m *model) consistentSeqs() []uint64 {
	var s []uint64
	for k := range m.cons {
		s = append(s, k)
	}
	sort.Slice(s, func(a, b int) bool { return s[a] < s[b] })
	return s
}

// hashView reads every disk of v in random chunk sizes.
func hashView(t testing.TB, v *View, sizes []int64, rng *rand.Rand) [32]byte {
	t.Helper()
	h := sha256.New()
	buf := make([]byte, 300<<10)
	for i, size := range sizes {
		d := v.Disk(i)
		if d.Size() != size {
			t.Fatalf("disk %d size %d, want %d", i, d.Size(), size)
		}
		for off := int64(0); off < size; {
			n := min(int64(1+rng.IntN(len(buf))), size-off)
			if rng.IntN(3) == 0 {
				n = min(int64(1+rng.IntN(5000)), size-off)
			}
			got, err := d.ReadAt(buf[:n], off)
			if err != nil && !(err == io.EOF && off+int64(got) == size) {
				t.Fatalf("view %d disk %d ReadAt(%d, %d): %v", v.Seq(), i, n, off, err)
			}
			h.Write(buf[:got])
			off += int64(got)
		}
	}
	var s [32]byte
	copy(s[:], h.Sum(nil))
	return s
}

func (m *model) sizes() []int64 {
	var s []int64
	for _, d := range m.disks {
		s = append(s, int64(len(d)))
	}
	return s
}

// checkViews compares views at sample consistent positions >= low with the
// model's hashes.
func (m *model) checkViews(t testing.TB, j *Journal, low uint64, count int) {
	t.Helper()
	var cand []uint64
	for _, s := range m.consistentSeqs() {
		if s >= low && s <= j.Durable() {
			cand = append(cand, s)
		}
	}
	if len(cand) == 0 {
		t.Fatal("no consistent positions to check")
	}
	picks := []uint64{cand[0], cand[len(cand)-1]}
	for i := 0; i < count; i++ {
		picks = append(picks, cand[m.rng.IntN(len(cand))])
	}
	for _, s := range picks {
		v, err := j.View(s)
		if err != nil {
			t.Fatalf("View(%d): %v", s, err)
		}
		if got := hashView(t, v, m.sizes(), m.rng); got != m.hashes[s] {
			t.Fatalf("View(%d) content differs from the model", s)
		}
		v.Close()
	}
}

func openJ(t testing.TB, dir string, m *model) *Journal {
	t.Helper()
	j, err := Open(dir, m.diskTable(), Options{SegmentSize: 256 << 10, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	return j
}

func TestOracle(t *testing.T) {
	m := newModel(1, 300<<10, 200<<10+77)
	m.stream(3000)
	dir := t.TempDir()
	j := openJ(t, dir, m)
	half := m.seq / 2
	m.feed(t, j, 1, half)
	m.checkViews(t, j, 0, 10)
	m.feed(t, j, half+1, m.seq)
	m.checkViews(t, j, 0, 25)
	// Positions inside a resync window are refused.
	for s := uint64(1); s <= m.seq; s++ {
		if !m.cons[s] {
			if v, err := j.View(s); err == nil {
				v.Close()
				t.Fatalf("View(%d) inside a resync window succeeded", s)
			}
		}
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	j = openJ(t, dir, m)
	defer j.Close()
	if j.Durable() != m.seq || j.Corrupt() != nil {
		t.Fatalf("reopen: durable %d want %d, corrupt %v", j.Durable(), m.seq, j.Corrupt())
	}
	m.checkViews(t, j, 0, 15)
	// It keeps going after reopen.
	for i := 0; i < 200; i++ {
		m.random()
	}
	m.feed(t, j, j.Durable()+1, m.seq)
	m.checkViews(t, j, m.seq-300, 5)
}

// TestOracleDenseCheckpoints reruns the oracle with a checkpoint every 16
// records, so views replay from thinned checkpoints of every age.
func TestOracleDenseCheckpoints(t *testing.T) {
	testCheckpointEvery = 16
	defer func() { testCheckpointEvery = 0 }()
	m := newModel(30, 200<<10)
	m.stream(4000)
	dir := t.TempDir()
	j := openJ(t, dir, m)
	defer j.Close()
	m.feed(t, j, 1, m.seq)
	n := len(j.checkpoints)
	if n < 10 || n > 200 {
		t.Fatalf("%d checkpoints for %d records", n, m.seq)
	}
	for i := 1; i < n; i++ {
		gap, age := j.checkpoints[i].seq-j.checkpoints[i-1].seq, j.Durable()-j.checkpoints[i].seq
		if gap > 16 && gap > 2*(age/checkpointRatio)+32 {
			t.Fatalf("checkpoint gap %d at age %d", gap, age)
		}
	}
	t.Logf("%d checkpoints for %d records", n, m.seq)
	m.checkViews(t, j, 0, 30)
	if _, err := j.Expire(time.Unix(0, m.recs[m.seq*2/3].Time)); err != nil {
		t.Fatal(err)
	}
	m.checkViews(t, j, j.base, 10)
}

func TestAppendErrors(t *testing.T) {
	m := newModel(2, 64<<10)
	m.stream(50)
	j := openJ(t, t.TempDir(), m)
	defer j.Close()
	m.feed(t, j, 1, 20)
	check := func(recs []*rebound.Record, code string) {
		t.Helper()
		err := j.Append(recs)
		if rebound.ErrorCode(err) != code {
			t.Fatalf("got %v (%s), want %s", err, rebound.ErrorCode(err), code)
		}
		if err != nil {
			t.Log(err)
		}
	}
	check(m.recs[21:23], rebound.EINVALID) // gap
	check(m.recs[:20], "")                 // resend: ignored
	check([]*rebound.Record{{Seq: 21, Kind: rebound.RecordWrite, Disk: 5, Length: 1, Data: []byte{1}}}, rebound.EINVALID)
	check([]*rebound.Record{{Seq: 21, Kind: rebound.RecordWrite, Offset: 64 << 10, Length: 1, Data: []byte{1}}}, rebound.EINVALID)
	check([]*rebound.Record{{Seq: 21, Kind: rebound.RecordWrite, Length: 2, Data: []byte{1}}}, rebound.EINVALID)
	check([]*rebound.Record{{Seq: 21, Kind: 99}}, rebound.EINVALID)
	check([]*rebound.Record{{Seq: 21, Kind: rebound.RecordWrite, Length: 1, Data: []byte{1}}, {Seq: 23, Kind: rebound.RecordMark}}, rebound.EINVALID)
	if j.Durable() != 20 {
		t.Fatalf("durable %d after refused appends", j.Durable())
	}
	m.feed(t, j, 21, m.seq)
	m.checkViews(t, j, 0, 5)
}

func TestTornTail(t *testing.T) {
	m := newModel(3, 128<<10)
	m.stream(400)
	dir := t.TempDir()
	j := openJ(t, dir, m)
	m.feed(t, j, 1, m.seq)
	j.Close()
	segs, _ := filepath.Glob(filepath.Join(dir, walDir, "*.wal"))
	last := segs[len(segs)-1]
	st, _ := os.Stat(last)
	rng := rand.New(rand.NewPCG(9, 9))
	for cut := st.Size() - 1; cut > st.Size()-200000 && cut > 8; cut -= 1 + rng.Int64N(30000) {
		if err := os.Truncate(last, cut); err != nil {
			t.Fatal(err)
		}
		j := openJ(t, dir, m)
		if j.Corrupt() != nil {
			t.Fatal(j.Corrupt())
		}
		d := j.Durable()
		if d >= m.seq || d == 0 {
			t.Fatalf("cut %d: durable %d", cut, d)
		}
		m.checkViews(t, j, d-100, 3)
		// The sender resumes at Durable()+1 and all is well again.
		m.feed(t, j, d+1, m.seq)
		if j.Durable() != m.seq {
			t.Fatal("did not resume")
		}
		v, err := j.View(m.seq)
		if err != nil {
			t.Fatal(err)
		}
		if hashView(t, v, m.sizes(), rng) != m.hashes[m.seq] {
			t.Fatal("resumed journal differs")
		}
		v.Close()
		j.Close()
		st, _ = os.Stat(last)
	}
}

func TestCorruptMiddle(t *testing.T) {
	m := newModel(4, 128<<10)
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
	b[len(b)/2] ^= 0x40
	os.WriteFile(segs[1], b, 0o644)
	j = openJ(t, dir, m)
	defer j.Close()
	if j.Corrupt() == nil {
		t.Fatal("corruption not reported")
	}
	t.Log(j.Corrupt())
	d := j.Durable()
	if d == 0 || d >= m.seq {
		t.Fatalf("durable %d", d)
	}
	// Everything before the bad record is served; nothing after.
	m.checkViews(t, j, 0, 5)
	if _, err := j.View(m.seq); err == nil {
		t.Fatal("view past the corruption")
	}
	if err := j.Append(m.recs[d : d+1]); err == nil {
		t.Fatal("append to a corrupt journal")
	}
}

func TestExpireWithViews(t *testing.T) {
	m := newModel(5, 256<<10, 100<<10)
	m.stream(4000)
	dir := t.TempDir()
	j := openJ(t, dir, m)
	m.feed(t, j, 1, m.seq)
	cons := m.consistentSeqs()
	// Views at a few positions, read continuously while folding.
	var pinned []*View
	for _, s := range []uint64{cons[len(cons)/3], cons[len(cons)/2], cons[len(cons)-1]} {
		v, err := j.View(s)
		if err != nil {
			t.Fatal(err)
		}
		pinned = append(pinned, v)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan string, 10)
	sizes := m.sizes()
	for k, v := range pinned {
		want := m.hashes[v.Seq()]
		wg.Add(1)
		go func(v *View, seed uint64) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, 7))
			for {
				select {
				case <-stop:
					return
				default:
				}
				if hashView(t, v, sizes, rng) != want {
					errs <- "view changed during fold"
					return
				}
			}
		}(v, uint64(k))
	}
	sizeBefore := j.Size()
	// Expire everything older than the last record: the fold stops at
	// the lowest pinned view.
	folded, err := j.Expire(time.Unix(0, m.recs[len(m.recs)-1].Time))
	if err != nil {
		t.Fatal(err)
	}
	low := pinned[0].Seq()
	if j.base != low || folded != low {
		t.Fatalf("folded %d to base %d, want %d", folded, j.base, low)
	}
	if j.Size() >= sizeBefore {
		t.Fatalf("wal did not shrink: %d -> %d", sizeBefore, j.Size())
	}
	// Appends and views go on during and after.
	for i := 0; i < 300; i++ {
		m.random()
	}
	m.feed(t, j, j.Durable()+1, m.seq)
	time.Sleep(100 * time.Millisecond)
	close(stop)
	wg.Wait()
	select {
	case e := <-errs:
		t.Fatal(e)
	default:
	}
	rng := rand.New(rand.NewPCG(1, 1))
	for _, v := range pinned {
		if hashView(t, v, m.sizes(), rng) != m.hashes[v.Seq()] {
			t.Fatalf("view %d differs after fold", v.Seq())
		}
	}
	if _, err := j.View(low - 1); rebound.ErrorCode(err) != rebound.ENOTFOUND {
		t.Fatalf("view below base: %v", err)
	}
	// The base files alone are the state at the base position.
	h := sha256.New()
	for i := range m.disks {
		b, _ := os.ReadFile(filepath.Join(dir, baseName(i)))
		h.Write(b)
	}
	if [32]byte(h.Sum(nil)) != m.hashes[low] {
		t.Fatal("base files are not the state at the base position")
	}
	if p, err := j.Resolve(pointID(low)); err != nil || p.Seq != low {
		t.Fatalf("resolve base point: %v %v", p, err)
	}
	m.checkViews(t, j, low, 10)
	// Unpin all: the next fold goes up to the newest mark.
	for _, v := range pinned {
		v.Close()
	}
	if _, err := j.Expire(time.Unix(0, m.recs[len(m.recs)-1].Time+1)); err != nil {
		t.Fatal(err)
	}
	lastMark := uint64(0)
	for _, r := range m.recs {
		if r.Kind == rebound.RecordMark && m.cons[r.Seq] {
			lastMark = r.Seq
		}
	}
	if j.base != lastMark {
		t.Fatalf("base %d, newest mark %d", j.base, lastMark)
	}
	pl := j.Points()
	if len(pl.Points) == 0 || pl.Points[len(pl.Points)-1].Seq != lastMark {
		t.Fatalf("newest point lost: %+v", pl.Points)
	}
	m.checkViews(t, j, lastMark, 5)
	// The base is now the only point: more records without a mark must
	// not fold it away.
	for i := 0; i < 50; i++ {
		m.add(&rebound.Record{Kind: rebound.RecordWrite, Offset: int64(i), Length: 1, Data: []byte{byte(i)}})
	}
	m.feed(t, j, j.Durable()+1, m.seq)
	if n, err := j.Expire(time.Unix(0, m.recs[len(m.recs)-1].Time+1)); err != nil || n != 0 || j.base != lastMark {
		t.Fatalf("folded %d past the only point (base %d): %v", n, j.base, err)
	}
	if pl := j.Points(); len(pl.Points) != 1 || pl.Points[0].Seq != lastMark {
		t.Fatalf("points %+v", pl.Points)
	}
	j.Close()
	j = openJ(t, dir, m)
	defer j.Close()
	if j.base != lastMark || j.Durable() != m.seq {
		t.Fatalf("reopen after fold: base %d durable %d", j.base, j.Durable())
	}
	m.checkViews(t, j, lastMark, 5)
}

// TestFoldCrash stops a fold at each step, as a crash would, and reopens.
func TestFoldCrash(t *testing.T) {
	for stage := 1; stage <= 3; stage++ {
		m := newModel(uint64(10+stage), 128<<10)
		m.stream(1500)
		dir := t.TempDir()
		j := openJ(t, dir, m)
		m.feed(t, j, 1, m.seq)
		j.crashAt = stage
		before := time.Unix(0, m.recs[len(m.recs)/2].Time)
		if _, err := j.Expire(before); err != errCrash {
			t.Fatalf("stage %d: %v", stage, err)
		}
		j.abandon()
		j = openJ(t, dir, m)
		if j.base == 0 || j.meta.FoldTo != 0 {
			t.Fatalf("stage %d: fold not finished on open: base %d foldTo %d", stage, j.base, j.meta.FoldTo)
		}
		m.checkViews(t, j, j.base, 8)
		j.Close()
	}
}

// TestFoldFailure: a fold that fails part way keeps views below its target
// refused, and the next Expire finishes it before anything else.
func TestFoldFailure(t *testing.T) {
	m := newModel(20, 128<<10)
	m.stream(1500)
	j := openJ(t, t.TempDir(), m)
	defer j.Close()
	m.feed(t, j, 1, m.seq)
	first := m.consistentSeqs()[0]
	if n, err := j.Expire(t0); err != nil || n != 0 {
		t.Fatalf("expire before everything folded %d: %v", n, err)
	}
	j.crashAt = 1
	if _, err := j.Expire(time.Unix(0, m.recs[len(m.recs)/2].Time)); err != errCrash {
		t.Fatal(err)
	}
	target := j.folding
	if target == 0 || j.base != 0 {
		t.Fatalf("folding %d base %d", target, j.base)
	}
	if _, err := j.View(first); rebound.ErrorCode(err) != rebound.ENOTFOUND {
		t.Fatalf("view below a failed fold's target: %v", err)
	}
	j.crashAt = 0
	if _, err := j.Expire(t0); err != nil {
		t.Fatal(err)
	}
	if j.base != target || j.folding != 0 {
		t.Fatalf("base %d, want %d", j.base, target)
	}
	m.checkViews(t, j, target, 8)
}

func TestResolve(t *testing.T) {
	m := newModel(6, 64<<10)
	j := openJ(t, t.TempDir(), m)
	defer j.Close()
	at := func(s uint64) time.Time { return time.Unix(0, m.recs[s-1].Time).UTC() }
	expectErr := func(sel, code string) {
		t.Helper()
		_, err := j.Resolve(sel)
		if rebound.ErrorCode(err) != code {
			t.Fatalf("Resolve(%q) = %v, want %s", sel, err, code)
		}
		t.Logf("Resolve(%q): %v", sel, err)
	}
	expect := func(sel string, seq uint64, kind rebound.PointKind) {
		t.Helper()
		p, err := j.Resolve(sel)
		if err != nil || p.Seq != seq || p.Kind != kind || p.ID != pointID(seq) || !p.Time.Equal(at(seq)) {
			t.Fatalf("Resolve(%q) = %+v, %v; want seq %d kind %s", sel, p, err, seq, kind)
		}
	}
	expectErr("latest", rebound.ENOTFOUND)
	// 1 begin, 2-3 copy, 4 mark (inside: not a point), 5 end.
	m.add(&rebound.Record{Kind: rebound.RecordResyncBegin})
	m.add(&rebound.Record{Kind: rebound.RecordWrite, Length: 3, Data: []byte{1, 2, 3}})
	m.add(&rebound.Record{Kind: rebound.RecordWrite, Offset: 10, Length: 1, Data: []byte{4}})
	m.add(&rebound.Record{Kind: rebound.RecordMark, PointKind: rebound.PointCrash})
	m.feed(t, j, 1, 4)
	if _, err := j.Resolve("latest"); err != errNoPoint {
		t.Fatalf("no point yet: %v", err)
	}
	if pl := j.Points(); len(pl.Points) != 0 || !pl.Oldest.IsZero() {
		t.Fatalf("points during initial copy: %+v", pl)
	}
	m.add(&rebound.Record{Kind: rebound.RecordResyncEnd})                           // 5
	m.add(&rebound.Record{Kind: rebound.RecordWrite, Length: 1, Data: []byte{9}})   // 6
	m.add(&rebound.Record{Kind: rebound.RecordMark, PointKind: rebound.PointApp})   // 7
	m.add(&rebound.Record{Kind: rebound.RecordMark, PointKind: rebound.PointCrash}) // 8
	m.add(&rebound.Record{Kind: rebound.RecordWrite, Length: 1, Data: []byte{8}})   // 9
	m.add(&rebound.Record{Kind: rebound.RecordResyncBegin})                         // 10 (consistent)
	m.add(&rebound.Record{Kind: rebound.RecordWrite, Length: 1, Data: []byte{7}})   // 11 inside
	m.add(&rebound.Record{Kind: rebound.RecordMark, PointKind: rebound.PointApp})   // 12 inside
	m.feed(t, j, 5, 12)
	expect("latest", 10, rebound.PointCrash)
	expect("latest-processed", 8, rebound.PointCrash)
	expect("latest-app-consistent", 7, rebound.PointApp)
	expect("p5", 5, rebound.PointCrash)
	expect("p7", 7, rebound.PointApp)
	expect(at(9).Format(time.RFC3339Nano), 9, rebound.PointCrash)
	expectErr(at(12).Format(time.RFC3339Nano), rebound.ENOTFOUND) // after the newest consistent position
	expect(at(5).Add(500*time.Microsecond).Format(time.RFC3339Nano), 5, rebound.PointCrash)
	expectErr("p4", rebound.ENOTFOUND)  // inside the initial copy
	expectErr("p11", rebound.ENOTFOUND) // inside a resync
	expectErr("p99", rebound.ENOTFOUND)
	expectErr("p1x", rebound.EINVALID)
	expectErr("", rebound.EINVALID)
	expectErr("yesterday", rebound.EINVALID)
	expectErr(at(4).Format(time.RFC3339Nano), rebound.ENOTFOUND) // before the window
	expectErr(at(12).Add(time.Hour).Format(time.RFC3339), rebound.ENOTFOUND)
	pl := j.Points()
	if len(pl.Points) != 2 || pl.Points[0].Seq != 7 || pl.Points[1].Seq != 8 || !pl.Oldest.Equal(at(5)) || !pl.Newest.Equal(at(10)) {
		t.Fatalf("points %+v", pl)
	}
	m.add(&rebound.Record{Kind: rebound.RecordResyncEnd}) // 13
	m.feed(t, j, 13, 13)
	expect("latest", 13, rebound.PointCrash)
	expect(at(12).Format(time.RFC3339Nano), 10, rebound.PointCrash) // inside the window: back to its start
	if pl := j.Points(); len(pl.Points) != 2 || !pl.Newest.Equal(at(13)) {
		t.Fatalf("points %+v", pl)
	}
	if v, err := j.View(12); err == nil {
		v.Close()
		t.Fatal("view inside resync")
	}
	m.checkViews(t, j, 0, 5)
}

func TestRemove(t *testing.T) {
	m := newModel(7, 64<<10)
	dir := filepath.Join(t.TempDir(), "j")
	j := openJ(t, dir, m)
	j.Close()
	if err := Remove(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatal("not removed")
	}
	os.MkdirAll(dir, 0o755)
	os.WriteFile(filepath.Join(dir, "precious"), []byte("x"), 0o644)
	if err := Remove(dir); err == nil {
		t.Fatal("removed a directory that is not a journal")
	}
	if _, err := Open(dir, []rebound.Disk{{Size: 0}}, Options{}); err == nil {
		t.Fatal("zero-size disk accepted")
	}
}

func TestDiskMismatch(t *testing.T) {
	m := newModel(8, 64<<10)
	dir := t.TempDir()
	j := openJ(t, dir, m)
	j.Close()
	if _, err := Open(dir, []rebound.Disk{{Size: 32 << 10}}, Options{}); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("size mismatch: %v", err)
	}
	_ = bytes.Equal
}

// TestNewestPoint: NewestPoint is the last of Points at every stage: none
// during the initial copy (a mark inside it is no point), the newest mark
// after it (a mark inside a later resync is none), the base once a fold
// took every mark into it, and the same after a reopen.
func TestNewestPoint(t *testing.T) {
	m := newModel(9, 64<<10)
	dir := t.TempDir()
	j := openJ(t, dir, m)
	defer func() { j.Close() }()
	same := func(want uint64) {
		t.Helper()
		p, ok := j.NewestPoint()
		pl := j.Points()
		if want == 0 {
			if ok || len(pl.Points) != 0 {
				t.Fatalf("NewestPoint %+v %v, points %+v; want none", p, ok, pl.Points)
			}
			return
		}
		if !ok || p.Seq != want || len(pl.Points) == 0 || p != pl.Points[len(pl.Points)-1] {
			t.Fatalf("NewestPoint %+v %v, points %+v; want p%d, the last of the list", p, ok, pl.Points, want)
		}
	}
	same(0)
	m.add(&rebound.Record{Kind: rebound.RecordResyncBegin})                             // 1
	m.add(&rebound.Record{Kind: rebound.RecordWrite, Length: 3, Data: []byte{1, 2, 3}}) // 2
	m.add(&rebound.Record{Kind: rebound.RecordMark, PointKind: rebound.PointCrash})     // 3 inside
	m.feed(t, j, 1, 3)
	same(0)
	m.add(&rebound.Record{Kind: rebound.RecordResyncEnd})                           // 4
	m.add(&rebound.Record{Kind: rebound.RecordMark, PointKind: rebound.PointApp})   // 5
	m.add(&rebound.Record{Kind: rebound.RecordWrite, Length: 1, Data: []byte{9}})   // 6
	m.add(&rebound.Record{Kind: rebound.RecordMark, PointKind: rebound.PointCrash}) // 7
	m.add(&rebound.Record{Kind: rebound.RecordResyncBegin})                         // 8
	m.add(&rebound.Record{Kind: rebound.RecordMark, PointKind: rebound.PointApp})   // 9 inside
	m.feed(t, j, 4, 9)
	same(7)
	m.add(&rebound.Record{Kind: rebound.RecordResyncEnd}) // 10
	m.feed(t, j, 10, 10)
	same(7)
	// A fold of everything keeps the newest mark as the base.
	if n, err := j.Expire(t0.Add(time.Hour)); err != nil || n == 0 {
		t.Fatalf("expire: %d %v", n, err)
	}
	same(7)
	if p, _ := j.NewestPoint(); p.Kind != rebound.PointCrash {
		t.Fatalf("newest point after the fold: %+v", p)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	j = openJ(t, dir, m)
	same(7)
}
