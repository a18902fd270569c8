package journal

import (
	"math/rand/v2"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

const benchDisk = 1 << 30

// benchJournal returns a journal past its initial copy.
func benchJournal(b *testing.B) *Journal {
	j, err := Open(b.TempDir(), []rebound.Disk{{Name: "a", Size: benchDisk}}, Options{Logger: quiet})
	if err != nil {
		b.Fatal(err)
	}
	if err := j.Append([]*rebound.Record{
		{Seq: 1, Kind: rebound.RecordResyncBegin, Time: t0.UnixNano()},
		{Seq: 2, Kind: rebound.RecordResyncEnd, Time: t0.UnixNano()},
	}); err != nil {
		b.Fatal(err)
	}
	return j
}

// BenchmarkJournalAppend: 64 KiB writes, 16 per Append (one fsync per
// ~1 MiB batch), as the replication receiver lands them.
func BenchmarkJournalAppend(b *testing.B) {
	j := benchJournal(b)
	defer j.Close()
	data := make([]byte, 64<<10)
	for i := range data {
		data[i] = byte(i * 7)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	batch := make([]*rebound.Record, 16)
	b.SetBytes(int64(len(data) * len(batch)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		seq := j.Durable() + 1
		for k := range batch {
			batch[k] = &rebound.Record{Seq: seq, Kind: rebound.RecordWrite, Time: t0.UnixNano(),
				Offset: rng.Int64N(int64(benchDisk/len(data))) * int64(len(data)), Length: int64(len(data)), Data: data}
			seq++
		}
		if err := j.Append(batch); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkViewBuild: a view of an older position of a journal holding
// 100k small random writes (index replay from the nearest checkpoint),
// and of the durable position (index snapshot).
func BenchmarkViewBuild(b *testing.B) {
	j := benchJournal(b)
	defer j.Close()
	rng := rand.New(rand.NewPCG(3, 4))
	data := make([]byte, 512)
	const n = 100_000
	for done := 0; done < n; {
		var batch []*rebound.Record
		seq := j.Durable() + 1
		for k := 0; k < 1000; k++ {
			batch = append(batch, &rebound.Record{Seq: seq, Kind: rebound.RecordWrite, Time: t0.Add(time.Duration(seq)).UnixNano(),
				Offset: rng.Int64N(benchDisk/512) * 512, Length: 512, Data: data})
			seq++
		}
		if err := j.Append(batch); err != nil {
			b.Fatal(err)
		}
		done += len(batch)
	}
	b.Run("older", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			v, err := j.View(3 + uint64(rng.IntN(n-1)))
			if err != nil {
				b.Fatal(err)
			}
			v.Close()
		}
	})
	b.Run("durable", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			v, err := j.View(j.Durable())
			if err != nil {
				b.Fatal(err)
			}
			v.Close()
		}
	})
	b.Run("read4k", func(b *testing.B) {
		v, _ := j.View(j.Durable())
		defer v.Close()
		d := v.Disk(0)
		p := make([]byte, 4096)
		for i := 0; i < b.N; i++ {
			if _, err := d.ReadAt(p, rng.Int64N(benchDisk/4096)*4096); err != nil {
				b.Fatal(err)
			}
		}
	})
}
