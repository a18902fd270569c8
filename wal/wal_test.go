package wal

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"golang.org/x/sys/unix"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

func mkRec(seq uint64, rng *rand.Rand) *rebound.Record {
	r := &rebound.Record{Seq: seq, Time: int64(seq) * 1000, Disk: uint32(seq % 3), Offset: int64(seq) * 4096}
	switch seq % 5 {
	case 0:
		r.Kind = rebound.RecordMark
		r.PointKind = rebound.PointApp
	case 1:
		r.Kind = rebound.RecordZero
		r.Length = 8192
	default:
		r.Kind = rebound.RecordWrite
		r.Data = make([]byte, 1+rng.IntN(3000))
		for i := range r.Data {
			r.Data[i] = byte(rng.Uint32())
		}
		r.Length = int64(len(r.Data))
	}
	return r
}

func equalRec(a, b *rebound.Record) bool {
	return a.Seq == b.Seq && a.Time == b.Time && a.Kind == b.Kind && a.Disk == b.Disk &&
		a.Offset == b.Offset && a.Length == b.Length && a.PointKind == b.PointKind && bytes.Equal(a.Data, b.Data)
}

// fill appends n records starting at seq from in batches of up to 7.
func fill(t *testing.T, l *Log, from uint64, n int, rng *rand.Rand) []*rebound.Record {
	t.Helper()
	var all []*rebound.Record
	for seq := from; seq < from+uint64(n); {
		k := min(1+rng.IntN(7), int(from+uint64(n)-seq))
		var batch []*rebound.Record
		for i := 0; i < k; i++ {
			batch = append(batch, mkRec(seq, rng))
			seq++
		}
		locs, err := l.Append(batch...)
		if err != nil {
			t.Fatal(err)
		}
		for i, r := range batch {
			if len(r.Data) > 0 {
				got := make([]byte, len(r.Data))
				if err := l.ReadData(locs[i], got); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, r.Data) {
					t.Fatalf("ReadData seq %d mismatch", r.Seq)
				}
			}
		}
		all = append(all, batch...)
	}
	return all
}

func readAll(t *testing.T, l *Log, from uint64) ([]*rebound.Record, error) {
	t.Helper()
	r, err := l.NewReader(from)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	var out []*rebound.Record
	for {
		rec, loc, err := r.Next()
		if err == io.EOF {
			return out, nil
		} else if err != nil {
			return out, err
		}
		if len(rec.Data) > 0 {
			got := make([]byte, len(rec.Data))
			if err := l.ReadData(loc, got); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, rec.Data) {
				t.Fatalf("loc of seq %d does not point at its data", rec.Seq)
			}
		}
		out = append(out, rec)
	}
}

func checkRecs(t *testing.T, got, want []*rebound.Record) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d records, want %d", len(got), len(want))
	}
	for i := range got {
		if !equalRec(got[i], want[i]) {
			t.Fatalf("record %d: got seq %d %+v, want seq %d", i, got[i].Seq, got[i].Kind, want[i].Seq)
		}
	}
}

func segFiles(t *testing.T, dir string) []string {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(dir, "*.wal"))
	return m
}

func TestRoundTripAndReopen(t *testing.T) { bothModes(t, testRoundTripAndReopen) }

func testRoundTripAndReopen(t *testing.T) {
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(1, 2))
	l, err := testOpen(dir, Options{SegmentSize: 16 << 10})
	if err != nil {
		t.Fatal(err)
	}
	if l.FirstSeq() != 0 || l.LastSeq() != 0 {
		t.Fatal("empty log has seqs")
	}
	want := fill(t, l, 10, 300, rng)
	if err := l.Sync(); err != nil {
		t.Fatal(err)
	}
	if l.FirstSeq() != 10 || l.LastSeq() != 309 {
		t.Fatalf("first/last %d/%d", l.FirstSeq(), l.LastSeq())
	}
	if n := len(segFiles(t, dir)); n < 5 {
		t.Fatalf("only %d segments", n)
	}
	got, err := readAll(t, l, 0)
	if err != nil {
		t.Fatal(err)
	}
	checkRecs(t, got, want)
	got, _ = readAll(t, l, 150)
	checkRecs(t, got, want[140:])
	// Wrong seqs are refused.
	if _, err := l.Append(&rebound.Record{Seq: 311}); !errors.Is(err, ErrSeq) {
		t.Fatalf("gap accepted: %v", err)
	}
	if _, err := l.Append(&rebound.Record{Seq: 310}, &rebound.Record{Seq: 310}); !errors.Is(err, ErrSeq) {
		t.Fatalf("repeat accepted: %v", err)
	}
	size := l.Size()
	l.Close()

	var visited []*rebound.Record
	visit := func(r *rebound.Record, loc Location) error {
		c := *r
		c.Data = append([]byte(nil), r.Data...)
		visited = append(visited, &c)
		return nil
	}
	l, err = testOpen(dir, Options{SegmentSize: 16 << 10, Visit: visit})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	checkRecs(t, visited, want)
	if l.Corrupt() != nil || l.FirstSeq() != 10 || l.LastSeq() != 309 || l.Size() != size {
		t.Fatalf("reopen: corrupt=%v first=%d last=%d size=%d/%d", l.Corrupt(), l.FirstSeq(), l.LastSeq(), l.Size(), size)
	}
	want = append(want, fill(t, l, 310, 50, rng)...)
	got, _ = readAll(t, l, 0)
	checkRecs(t, got, want)
	files := func() (total int64) {
		for _, f := range segFiles(t, dir) {
			st, _ := os.Stat(f)
			total += st.Size()
		}
		return total
	}
	// Direct appends pad the last segment to a whole block while it is
	// open; Close cuts the padding.
	if pad := files() - l.Size(); pad != 0 && (!testDirect || pad < 0 || pad >= directAlign) {
		t.Fatalf("Size %d, files %d", l.Size(), files())
	}
	size = l.Size()
	l.Close()
	if files() != size {
		t.Fatalf("closed: Size %d, files %d", size, files())
	}
}

func TestTornTail(t *testing.T) { bothModes(t, testTornTail) }

func testTornTail(t *testing.T) {
	// 8 KiB: the last record starts a new segment; 1 MiB: it follows
	// others in the same segment.
	for _, segSize := range []int64{8 << 10, 1 << 20} {
		t.Run(fmt.Sprint(segSize), func(t *testing.T) { tornTailCase(t, segSize) })
	}
}

func tornTailCase(t *testing.T, segSize int64) {
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(3, 4))
	l, err := testOpen(dir, Options{SegmentSize: segSize, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	want := fill(t, l, 1, 40, rng)
	l.Sync()
	// The last record goes alone into the last segment's tail.
	last := mkRec(41, rng)
	last.Kind, last.Data, last.Length = rebound.RecordWrite, bytes.Repeat([]byte{7}, 700), 700
	if _, err := l.Append(last); err != nil {
		t.Fatal(err)
	}
	l.Close()
	files := segFiles(t, dir)
	lastFile := files[len(files)-1]
	full, _ := os.ReadFile(lastFile)
	recSize := frameSize + fixedSize + 700
	start := len(full) - recSize
	for cut := start; cut < len(full); cut++ {
		if err := os.WriteFile(lastFile, full[:cut], 0o644); err != nil {
			t.Fatal(err)
		}
		l, err := testOpen(dir, Options{SegmentSize: segSize, Logger: quiet})
		if err != nil {
			t.Fatalf("cut %d: %v", cut, err)
		}
		if l.Corrupt() != nil || l.LastSeq() != 40 {
			t.Fatalf("cut %d: corrupt=%v last=%d", cut, l.Corrupt(), l.LastSeq())
		}
		got, err := readAll(t, l, 0)
		if err != nil {
			t.Fatal(err)
		}
		checkRecs(t, got, want)
		if st, _ := os.Stat(lastFile); st != nil && st.Size() != int64(start) {
			t.Fatalf("cut %d: file not truncated to %d: %d", cut, start, st.Size())
		}
		// The log continues after the truncation.
		if _, err := l.Append(last); err != nil {
			t.Fatal(err)
		}
		l.Close()
		os.WriteFile(lastFile, full[:cut], 0o644)
	}
	// A checksum failure at the tail is a torn write too.
	bad := append([]byte(nil), full...)
	bad[len(bad)-5] ^= 0x10
	os.WriteFile(lastFile, bad, 0o644)
	l, err = testOpen(dir, Options{SegmentSize: segSize, Logger: quiet})
	if err != nil || l.Corrupt() != nil || l.LastSeq() != 40 {
		t.Fatalf("flipped tail: %v %v %d", err, l.Corrupt(), l.LastSeq())
	}
	l.Close()
}

func TestTornNewSegment(t *testing.T) { bothModes(t, testTornNewSegment) }

func testTornNewSegment(t *testing.T) {
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(5, 6))
	l, _ := testOpen(dir, Options{})
	fill(t, l, 1, 10, rng)
	l.Close()
	// A segment created but with no record (crash after rename).
	os.WriteFile(filepath.Join(dir, segName(11)), []byte(magic), 0o644)
	os.WriteFile(filepath.Join(dir, tmpPrefix+segName(12)), []byte("junk"), 0o644)
	l, err := testOpen(dir, Options{})
	if err != nil || l.Corrupt() != nil || l.LastSeq() != 10 {
		t.Fatalf("%v %v %d", err, l.Corrupt(), l.LastSeq())
	}
	if _, err := l.Append(mkRec(11, rng)); err != nil {
		t.Fatal(err)
	}
	l.Close()
	if n := len(segFiles(t, dir)); n != 1 {
		t.Fatalf("%d segments", n)
	}
}

func TestBitFlipMiddle(t *testing.T) { bothModes(t, testBitFlipMiddle) }

func testBitFlipMiddle(t *testing.T) {
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(7, 8))
	l, _ := testOpen(dir, Options{SegmentSize: 8 << 10, Logger: quiet})
	want := fill(t, l, 1, 100, rng)
	l.Close()
	files := segFiles(t, dir)
	if len(files) < 3 {
		t.Fatalf("%d segments", len(files))
	}
	// Flip a byte in the middle of the second segment.
	victim := files[1]
	b, _ := os.ReadFile(victim)
	b[len(b)/2] ^= 0x01
	os.WriteFile(victim, b, 0o644)

	visited := 0
	l, err := testOpen(dir, Options{SegmentSize: 8 << 10, Logger: quiet, Visit: func(r *rebound.Record, _ Location) error {
		if !equalRec(r, want[visited]) {
			return fmt.Errorf("visited seq %d, want %d", r.Seq, want[visited].Seq)
		}
		visited++
		return nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if !errors.Is(l.Corrupt(), ErrCorrupt) {
		t.Fatalf("Corrupt() = %v", l.Corrupt())
	}
	t.Log(l.Corrupt())
	if l.LastSeq() != 100 {
		t.Fatalf("LastSeq %d", l.LastSeq())
	}
	got, err := readAll(t, l, 0)
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("reader err %v", err)
	}
	// Everything before the bad record, nothing from it on.
	if len(got) == 0 || len(got) >= 100 {
		t.Fatalf("read %d records", len(got))
	}
	checkRecs(t, got, want[:len(got)])
	if visited != len(got) {
		t.Fatalf("visited %d records, readers serve %d", visited, len(got))
	}
	if got[len(got)-1].Seq >= want[len(want)-1].Seq {
		t.Fatal("served past the corruption")
	}
	// The victim segment's good prefix was not truncated.
	if st, _ := os.Stat(victim); st.Size() != int64(len(b)) {
		t.Fatal("corrupt middle segment was truncated")
	}
}

func TestTruncateFront(t *testing.T) { bothModes(t, testTruncateFront) }

func testTruncateFront(t *testing.T) {
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(9, 10))
	l, _ := testOpen(dir, Options{SegmentSize: 8 << 10, Logger: quiet})
	want := fill(t, l, 1, 200, rng)
	nseg := len(segFiles(t, dir))
	// A reader positioned at the start keeps working across truncation.
	r, _ := l.NewReader(1)
	first, _, err := r.Next()
	if err != nil || first.Seq != 1 {
		t.Fatal(err)
	}
	sizeBefore := l.Size()
	if err := l.TruncateFront(100); err != nil {
		t.Fatal(err)
	}
	fs := l.FirstSeq()
	if fs > 101 || fs <= 1 {
		t.Fatalf("FirstSeq %d after TruncateFront(100)", fs)
	}
	if len(segFiles(t, dir)) >= nseg || l.Size() >= sizeBefore {
		t.Fatal("nothing removed")
	}
	// It finishes its (removed) segment, then reports the gap.
	for i := 1; ; i++ {
		rec, _, err := r.Next()
		if errors.Is(err, ErrTruncated) {
			if i >= int(fs) {
				t.Fatalf("gap reported at %d, first retained %d", i, fs)
			}
			break
		}
		if err != nil || !equalRec(rec, want[i]) {
			t.Fatalf("reader across truncation at %d: %v", i, err)
		}
	}
	r.Close()
	// A reader on a retained segment continues through to the end.
	r, _ = l.NewReader(fs)
	rec, _, _ := r.Next()
	l.TruncateFront(fs)
	for i := int(fs); i < 200; i++ {
		if rec, _, err = r.Next(); err != nil || !equalRec(rec, want[i]) {
			t.Fatalf("reader at %d: %v", i, err)
		}
	}
	r.Close()
	fs = l.FirstSeq()
	got, _ := readAll(t, l, 0)
	checkRecs(t, got, want[fs-1:])
	if err := l.ReadData(Location{Segment: 1, Offset: segHeaderSize}, make([]byte, 1)); !errors.Is(err, ErrTruncated) {
		t.Fatalf("read of removed segment: %v", err)
	}
	// Truncating everything keeps the last segment.
	l.TruncateFront(1000)
	if l.LastSeq() != 200 || len(segFiles(t, dir)) != 1 {
		t.Fatal("last segment removed")
	}
	fill(t, l, 201, 5, rng)
	l.Close()
	l, _ = testOpen(dir, Options{SegmentSize: 8 << 10, Logger: quiet})
	defer l.Close()
	if l.LastSeq() != 205 || l.FirstSeq() == 0 {
		t.Fatalf("reopen after truncate: %d %d", l.FirstSeq(), l.LastSeq())
	}
}

func TestConcurrentReader(t *testing.T) { bothModes(t, testConcurrentReader) }

func testConcurrentReader(t *testing.T) {
	dir := t.TempDir()
	l, _ := testOpen(dir, Options{SegmentSize: 32 << 10})
	defer l.Close()
	const n = 2000
	var wg sync.WaitGroup
	errc := make(chan error, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		r, _ := l.NewReader(1)
		defer r.Close()
		next := uint64(1)
		for next <= n {
			rec, _, err := r.Next()
			if err == io.EOF {
				continue
			} else if err != nil {
				errc <- err
				return
			}
			want := mkRec(next, rand.New(rand.NewPCG(next, 0)))
			if !equalRec(rec, want) {
				errc <- fmt.Errorf("reader got seq %d, want %d", rec.Seq, next)
				return
			}
			next++
		}
		errc <- nil
	}()
	for seq := uint64(1); seq <= n; seq++ {
		if _, err := l.Append(mkRec(seq, rand.New(rand.NewPCG(seq, 0)))); err != nil {
			t.Fatal(err)
		}
		if seq%100 == 0 {
			l.Sync()
		}
	}
	wg.Wait()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

// BenchmarkAppend appends 4 MiB batches of 64 x 64 KiB records with an
// fsync each, as the journal does with the sender's 4 MiB batches, through
// the page cache and direct, and reports the CPU (user+system, whole
// process) per GiB appended. Fresh segments each time: the journal only
// ever appends new bytes.
//
//	go test ./wal -run '^$' -bench Append -benchtime 1024x
func BenchmarkAppend(b *testing.B) {
	for _, direct := range []bool{false, true} {
		name := "buffered"
		if direct {
			name = "direct"
		}
		b.Run(name, func(b *testing.B) {
			l, err := Open(b.TempDir(), Options{Direct: direct})
			if err != nil {
				b.Fatal(err)
			}
			defer l.Close()
			data := make([]byte, 64<<10)
			for i := range data {
				data[i] = byte(i * 7)
			}
			batch := make([]*rebound.Record, 64)
			b.SetBytes(int64(len(data) * len(batch)))
			seq := uint64(1)
			cpu0 := cpuTime()
			for i := 0; i < b.N; i++ {
				for j := range batch {
					batch[j] = &rebound.Record{Seq: seq, Kind: rebound.RecordWrite, Length: int64(len(data)), Data: data}
					seq++
				}
				if _, err := l.Append(batch...); err != nil {
					b.Fatal(err)
				}
				if err := l.Sync(); err != nil {
					b.Fatal(err)
				}
			}
			if direct && !l.direct {
				b.Fatal("this filesystem refused O_DIRECT")
			}
			b.ReportMetric((cpuTime()-cpu0).Seconds()/(float64(b.N)*float64(len(data)*len(batch))/(1<<30)), "cpu-s/GiB")
		})
	}
}

// cpuTime is the process's user+system CPU time.
func cpuTime() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// A bad record in the last segment with good ones after it is damage, not a
// torn tail: Open keeps the file, reports it, and serves nothing past it.
func TestDamagedLastSegment(t *testing.T) { bothModes(t, testDamagedLastSegment) }

func testDamagedLastSegment(t *testing.T) {
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(9, 10))
	l, _ := testOpen(dir, Options{SegmentSize: 1 << 20, Logger: quiet})
	want := fill(t, l, 1, 60, rng)
	l.Close()
	files := segFiles(t, dir)
	if len(files) != 1 {
		t.Fatalf("%d segments", len(files))
	}
	victim := files[0]
	b, _ := os.ReadFile(victim)
	b[len(b)/2] ^= 0x20
	os.WriteFile(victim, b, 0o644)

	l, err := testOpen(dir, Options{SegmentSize: 1 << 20, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	if !errors.Is(l.Corrupt(), ErrCorrupt) {
		t.Fatalf("Corrupt() = %v, want damage reported", l.Corrupt())
	}
	if st, _ := os.Stat(victim); st.Size() != int64(len(b)) {
		t.Fatalf("damaged last segment was truncated to %d of %d bytes", st.Size(), len(b))
	}
	if l.LastSeq() != 60 {
		t.Fatalf("LastSeq %d, want 60 (the readable records past the damage)", l.LastSeq())
	}
	got, err := readAll(t, l, 0)
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("reader err %v", err)
	}
	if len(got) == 0 || len(got) >= 60 {
		t.Fatalf("read %d records", len(got))
	}
	checkRecs(t, got, want[:len(got)])
	good := got[len(got)-1].Seq

	// New records go after the readable ones, and a reopen still sees the
	// damage, now in a middle segment.
	fill(t, l, 61, 5, rng)
	l.Close()
	l, err = testOpen(dir, Options{SegmentSize: 1 << 20, Logger: quiet})
	if err != nil || !errors.Is(l.Corrupt(), ErrCorrupt) || l.LastSeq() != 65 {
		t.Fatalf("reopen: %v %v last %d", err, l.Corrupt(), l.LastSeq())
	}

	// DropCorrupt cuts at the damage: everything after the good prefix goes.
	from, to, err := l.DropCorrupt()
	if err != nil {
		t.Fatal(err)
	}
	if from != good+1 || to != 65 || l.LastSeq() != good || l.Corrupt() != nil {
		t.Fatalf("DropCorrupt %d..%d, last %d, corrupt %v; want %d..65", from, to, l.LastSeq(), l.Corrupt(), good+1)
	}
	if _, err := l.Append(mkRec(good+1, rng)); err != nil {
		t.Fatalf("append after drop: %v", err)
	}
	l.Close()
	l, err = testOpen(dir, Options{SegmentSize: 1 << 20, Logger: quiet})
	if err != nil || l.Corrupt() != nil || l.LastSeq() != good+1 {
		t.Fatalf("reopen after drop: %v %v last %d", err, l.Corrupt(), l.LastSeq())
	}
	got, err = readAll(t, l, 0)
	if err != nil || len(got) != int(good+1) {
		t.Fatalf("after drop read %d records: %v", len(got), err)
	}
	checkRecs(t, got[:good], want[:good])
	l.Close()
}

// DropCorrupt on damage in an older segment removes it and every later one
// and keeps the older segments whole.
func TestDropCorruptMiddle(t *testing.T) { bothModes(t, testDropCorruptMiddle) }

func testDropCorruptMiddle(t *testing.T) {
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(11, 12))
	l, _ := testOpen(dir, Options{SegmentSize: 8 << 10, Logger: quiet})
	want := fill(t, l, 1, 100, rng)
	l.Close()
	files := segFiles(t, dir)
	b, _ := os.ReadFile(files[1])
	b[len(b)/2] ^= 0x01
	os.WriteFile(files[1], b, 0o644)
	l, _ = testOpen(dir, Options{SegmentSize: 8 << 10, Logger: quiet})
	defer l.Close()
	got, _ := readAll(t, l, 0)
	good := got[len(got)-1].Seq
	from, to, err := l.DropCorrupt()
	if err != nil || from != good+1 || to != 100 || l.LastSeq() != good {
		t.Fatalf("DropCorrupt %d..%d %v, last %d; want %d..100", from, to, err, l.LastSeq(), good+1)
	}
	if n := len(segFiles(t, dir)); n != 2 {
		t.Fatalf("%d segments left, want 2", n)
	}
	got, err = readAll(t, l, 0)
	if err != nil {
		t.Fatal(err)
	}
	checkRecs(t, got, want[:good])
	if from, to, _ := l.DropCorrupt(); from <= to {
		t.Fatalf("second DropCorrupt dropped %d..%d", from, to)
	}
}

// One Append of more large records (written from the caller's slices,
// not copied) than one pwritev takes, mixed with small inline ones: every
// record reads back and survives a reopen.
func TestAppendVectored(t *testing.T) { bothModes(t, testAppendVectored) }

func testAppendVectored(t *testing.T) {
	dir := t.TempDir()
	l, err := testOpen(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(5, 6))
	var want []*rebound.Record
	for i := range 700 { // > 1024 iovecs: a header chunk and the data of each large record
		n := inlineData + 1 + rng.IntN(100)
		if i%3 == 0 {
			n = rng.IntN(4096)
		}
		data := make([]byte, n)
		for k := range data {
			data[k] = byte(rng.Uint32())
		}
		want = append(want, &rebound.Record{Seq: uint64(i + 1), Time: int64(i), Kind: rebound.RecordWrite, Length: int64(n), Data: data})
	}
	locs, err := l.Append(want...)
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range want {
		got := make([]byte, len(r.Data))
		if err := l.ReadData(locs[i], got); err != nil || !bytes.Equal(got, r.Data) {
			t.Fatalf("ReadData seq %d: %v", r.Seq, err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if l, err = testOpen(dir, Options{}); err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got, err := readAll(t, l, 1)
	if err != nil {
		t.Fatal(err)
	}
	checkRecs(t, got, want)
}

// testDirect makes testOpen open logs with Options.Direct: every test runs
// in both modes (bothModes), not in parallel.
var testDirect bool

func testOpen(dir string, o Options) (*Log, error) {
	o.Direct = o.Direct || testDirect
	return Open(dir, o)
}

func bothModes(t *testing.T, f func(*testing.T)) {
	for _, direct := range []bool{false, true} {
		name := "buffered"
		if direct {
			name = "direct"
		}
		t.Run(name, func(t *testing.T) {
			testDirect = direct
			defer func() { testDirect = false }()
			f(t)
		})
	}
}

// A crash while a direct log is open leaves its last segment padded with
// zeros past the last record: Open keeps every synced record and drops the
// padding without calling it a torn tail.
func TestDirectCrashLeavesPadding(t *testing.T) {
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(3, 4))
	l, err := Open(dir, Options{SegmentSize: 64 << 10, Direct: true, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	want := fill(t, l, 1, 200, rng)
	if err := l.Sync(); err != nil {
		t.Fatal(err)
	}
	if !l.direct {
		t.Fatal("the log fell back to buffered appends on this filesystem")
	}
	segs := segFiles(t, dir)
	st, err := os.Stat(segs[len(segs)-1])
	if err != nil {
		t.Fatal(err)
	}
	if st.Size()%directAlign != 0 {
		t.Fatalf("last segment is %d bytes: direct writes are whole blocks", st.Size())
	}
	// "Crash": open the directory again while l still has it open.
	var logged bytes.Buffer
	warn := slog.New(slog.NewTextHandler(&logged, &slog.HandlerOptions{Level: slog.LevelWarn}))
	var visited []*rebound.Record
	l2, err := Open(dir, Options{SegmentSize: 64 << 10, Direct: true, Logger: warn, Visit: func(r *rebound.Record, _ Location) error {
		c := *r
		c.Data = append([]byte(nil), r.Data...)
		visited = append(visited, &c)
		return nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer l2.Close()
	checkRecs(t, visited, want)
	if l2.Corrupt() != nil {
		t.Fatalf("padding reported as damage: %v", l2.Corrupt())
	}
	if logged.Len() != 0 {
		t.Fatalf("padding logged as a torn tail: %s", logged.String())
	}
	// Appends continue after the last record, rewriting its partial block.
	want = append(want, fill(t, l2, 201, 50, rng)...)
	got, err := readAll(t, l2, 0)
	if err != nil {
		t.Fatal(err)
	}
	checkRecs(t, got, want)
}

// Where O_DIRECT is refused, a direct log appends through the page cache.
func TestDirectRefusedFallsBack(t *testing.T) {
	defer func(f func(string) (*os.File, error)) { openDirect = f }(openDirect)
	openDirect = func(string) (*os.File, error) { return nil, unix.EINVAL }
	dir := t.TempDir()
	l, err := Open(dir, Options{SegmentSize: 16 << 10, Direct: true, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	want := fill(t, l, 1, 100, rand.New(rand.NewPCG(5, 6)))
	if l.direct {
		t.Fatal("still direct after O_DIRECT was refused")
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	l, err = Open(dir, Options{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got, err := readAll(t, l, 0)
	if err != nil {
		t.Fatal(err)
	}
	checkRecs(t, got, want)
}
