package main

import (
	"context"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/rebound-dr/rebound/nbd"
)

// BenchmarkExportWrite4K writes 4 KiB blocks at random offsets through the
// NBD export of a protected machine, 32 requests in flight.
func BenchmarkExportWrite4K(b *testing.B) {
	_, _, uri := benchMachine(b, 1<<30)
	cl, err := nbd.Dial(context.Background(), uri)
	if err != nil {
		b.Fatal(err)
	}
	defer cl.Close()
	var n atomic.Int64
	b.ResetTimer()
	var wg sync.WaitGroup
	for w := 0; w < 32; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 3))
			buf := randomBlock(rng, 4096)
			for n.Add(1) <= int64(b.N) {
				if _, err := cl.WriteAt(buf, rng.Int64N(1<<18)*4096); err != nil {
					b.Error(err)
					return
				}
			}
		}(w)
	}
	wg.Wait()
}
