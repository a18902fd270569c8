package nbd

import (
	"math/rand/v2"
	"sync/atomic"
	"testing"
)

const benchDisk = 256 << 20

func benchClient(b *testing.B) *Client {
	ts := startServer(b, exportSpec{Name: "bench", Size: benchDisk})
	return ts.dial(b, ts.unixURI("bench"))
}

// BenchmarkWrite4K: random 4 KiB writes, 16 in flight on one connection.
func BenchmarkWrite4K(b *testing.B) {
	c := benchClient(b)
	b.SetBytes(4096)
	b.SetParallelism(8)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		p := make([]byte, 4096)
		r := rand.New(rand.NewPCG(rand.Uint64(), 0))
		for pb.Next() {
			off := int64(r.IntN(benchDisk/4096)) * 4096
			if _, err := c.WriteAt(p, off); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkWriteSeq1M: sequential 1 MiB writes, 4 in flight.
func BenchmarkWriteSeq1M(b *testing.B) {
	c := benchClient(b)
	b.SetBytes(1 << 20)
	b.SetParallelism(2)
	var next atomic.Int64
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		p := make([]byte, 1<<20)
		for pb.Next() {
			off := (next.Add(1) - 1) % (benchDisk >> 20) << 20
			if _, err := c.WriteAt(p, off); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
