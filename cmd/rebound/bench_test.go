package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/nbd"
)

// benchReport appends a markdown fragment to $REBOUND_BENCH_OUT, which
// scripts/bench.sh assembles into docs/benchmarks.md.
func benchReport(b *testing.B, format string, args ...any) {
	path := os.Getenv("REBOUND_BENCH_OUT")
	if path == "" {
		return
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	fmt.Fprintf(f, format, args...)
}

// benchMachine starts an in-process Rebound and a protected machine.
func benchMachine(b *testing.B, size int64) (*UpMain, rebound.Service, string) {
	up, svc := testUp(b, b.TempDir())
	ctx := context.Background()
	m, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "bench", Site: "primary", Disks: []int64{size}})
	if err != nil {
		b.Fatal(err)
	}
	waitJob(b, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "bench", To: "recovery"}))
	return up, svc, m.Disks[0].NBD
}

// metOrMissed is a benchmark table's met? column.
func metOrMissed(ok bool) string {
	if ok {
		return "met"
	}
	return "missed"
}

// sourceStatus returns the source site's view of the bench machine.
func sourceStatus(b *testing.B, up *UpMain) rebound.MachineStatus {
	return streamStatus(b, up, "bench")
}

// sample calls fn every interval until the returned stop, which returns
// the values.
func sample(every time.Duration, fn func() float64) (stop func() []float64) {
	var vals []float64
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				vals = append(vals, fn())
			}
		}
	}()
	return func() []float64 {
		close(done)
		wg.Wait()
		return vals
	}
}

// randomBlock returns semi-compressible data, like real disk contents:
// half random, half repeated bytes.
func randomBlock(rng *rand.Rand, n int) []byte {
	p := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := rng.Uint64()
		for k := 0; k < 8 && i+k < n; k++ {
			p[i+k] = byte(v >> (8 * k))
		}
	}
	for i := 0; i < n; i += 4096 {
		for k := i; k < i+2048 && k < n; k++ {
			p[k] = 0x5a
		}
	}
	return p
}

// BenchmarkReplicationThroughput writes as fast as four NBD clients can
// and measures how fast the recovery site makes it durable: from the first
// write until the target holds the source's head.
func BenchmarkReplicationThroughput(b *testing.B) {
	const size = 2 << 30
	up, _, uri := benchMachine(b, size)
	const total = 1 << 30
	const chunk = 1 << 20
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		start := time.Now()
		var wg sync.WaitGroup
		for w := 0; w < 4; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				cl, err := nbd.Dial(context.Background(), uri)
				if err != nil {
					b.Error(err)
					return
				}
				defer cl.Close()
				rng := rand.New(rand.NewPCG(uint64(w), 1))
				buf := randomBlock(rng, chunk)
				for off := int64(w) * chunk; off < total; off += 4 * chunk {
					buf[0]++
					if _, err := cl.WriteAt(buf, off); err != nil {
						b.Error(err)
						return
					}
				}
			}(w)
		}
		wg.Wait()
		written := time.Since(start)
		head := sourceStatus(b, up).HeadSeq
		for {
			if ms := sourceStatus(b, up); ms.AckedSeq >= head {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		elapsed := time.Since(start)
		mbps := float64(total) / elapsed.Seconds() / 1e6
		b.ReportMetric(mbps, "MB/s")
		b.ReportMetric(float64(total)/written.Seconds()/1e6, "write-MB/s")
		benchReport(b, "| replication throughput, 1 GiB written by 4 NBD clients (1 MiB writes) until acknowledged durable at recovery | %.0f MB/s (writes completed at %.0f MB/s) | ≥ 400 MB/s | %s |\n",
			mbps, float64(total)/written.Seconds()/1e6, metOrMissed(mbps >= 400))
	}
}

// BenchmarkReplicationLag writes at fixed churn rates and samples the
// source's replication lag (age of the oldest unacknowledged write).
func BenchmarkReplicationLag(b *testing.B) {
	const size = 2 << 30
	up, _, uri := benchMachine(b, size)
	rates := []int{10, 25, 50, 100}
	const run = 8 * time.Second
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for _, rate := range rates {
			cl, err := nbd.Dial(context.Background(), uri)
			if err != nil {
				b.Fatal(err)
			}
			rng := rand.New(rand.NewPCG(uint64(rate), 2))
			buf := randomBlock(rng, 64<<10)
			stopLags := sample(50*time.Millisecond, func() float64 { return sourceStatus(b, up).LagSeconds })
			start := time.Now()
			var sent int64
			for time.Since(start) < run {
				off := rng.Int64N(size/int64(len(buf))) * int64(len(buf))
				buf[0]++
				if _, err := cl.WriteAt(buf, off); err != nil {
					b.Fatal(err)
				}
				sent += int64(len(buf))
				due := start.Add(time.Duration(float64(sent) / float64(rate*1e6) * float64(time.Second)))
				if d := time.Until(due); d > 0 {
					time.Sleep(d)
				}
			}
			achieved := float64(sent) / time.Since(start).Seconds() / 1e6
			lags := stopLags()
			cl.Close()
			sort.Float64s(lags)
			p := func(q float64) float64 {
				if len(lags) == 0 {
					return 0
				}
				return lags[min(len(lags)-1, int(q*float64(len(lags))))]
			}
			b.ReportMetric(p(0.99), fmt.Sprintf("lag-p99-s@%dMB/s", rate))
			target, met := "", ""
			if rate == 100 {
				target, met = "p99 ≤ 1 s", metOrMissed(p(0.99) <= 1 && achieved >= 95)
			}
			benchReport(b, "| replication lag at %d MB/s churn (achieved %.0f MB/s, 64 KiB random writes, %d samples) | p50 %.3f s, p99 %.3f s, max %.3f s | %s | %s |\n",
				rate, achieved, len(lags), p(0.5), p(0.99), p(1), target, met)
			// Let the backlog drain before the next rate.
			for sourceStatus(b, up).BacklogBytes > 0 {
				time.Sleep(20 * time.Millisecond)
			}
		}
	}
}
