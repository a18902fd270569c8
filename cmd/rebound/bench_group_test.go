package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/nbd"
)

// streamStatus is the source site's view of a stream (a machine's, or a
// group's under its name).
func streamStatus(b *testing.B, up *UpMain, name string) rebound.MachineStatus {
	st, err := up.Sites["primary"].Site.Status(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	for _, ms := range st.Machines {
		if ms.Name == name {
			return ms
		}
	}
	b.Fatalf("%s not at primary", name)
	return rebound.MachineStatus{}
}

// BenchmarkGroupStream compares three machines in one group's stream with
// the same three machines each in its own stream, in one run: throughput
// (three NBD writers, one per machine, until the target holds every
// stream's head) and lag under a steady churn.
func BenchmarkGroupStream(b *testing.B) {
	const size = 512 << 20
	up, svc := testUp(b, b.TempDir())
	ctx := context.Background()
	configs := []struct {
		label   string
		names   []string
		streams []string
	}{
		{"one group stream (3 machines)", []string{"g1", "g2", "g3"}, []string{"g"}},
		{"three separate streams", []string{"s1", "s2", "s3"}, []string{"s1", "s2", "s3"}},
	}
	uris := map[string]string{}
	for _, c := range configs {
		for _, n := range c.names {
			m, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: n, Site: "primary", Disks: []int64{size}})
			if err != nil {
				b.Fatal(err)
			}
			uris[n] = m.Disks[0].NBD
			req := rebound.ProtectRequest{Machine: n, To: "recovery"}
			if c.streams[0] == "g" {
				req.Group = "g"
			}
			waitJob(b, svc)(svc.Protect(ctx, req))
		}
	}
	const perMachine = 192 << 20
	const chunk = 1 << 20
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		// Odd runs go in the other order: neither configuration always
		// writes first.
		order := slices.Clone(configs)
		if i%2 == 1 {
			slices.Reverse(order)
		}
		for _, c := range order {
			start := time.Now()
			var wg sync.WaitGroup
			for w, n := range c.names {
				wg.Add(1)
				go func() {
					defer wg.Done()
					cl, err := nbd.Dial(context.Background(), uris[n])
					if err != nil {
						b.Error(err)
						return
					}
					defer cl.Close()
					buf := randomBlock(rand.New(rand.NewPCG(uint64(w), 7)), chunk)
					for off := int64(0); off < perMachine; off += chunk {
						buf[0]++
						if _, err := cl.WriteAt(buf, off); err != nil {
							b.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			written := time.Since(start)
			for _, s := range c.streams {
				head := streamStatus(b, up, s).HeadSeq
				for streamStatus(b, up, s).AckedSeq < head {
					time.Sleep(5 * time.Millisecond)
				}
			}
			elapsed := time.Since(start)
			total := float64(perMachine * len(c.names))
			mbps := total / elapsed.Seconds() / 1e6
			b.ReportMetric(mbps, "MB/s-"+c.streams[0])
			benchReport(b, "| run %d: %s: throughput, 3 × 192 MiB written by 3 NBD clients (1 MiB writes) until durable at recovery | %.0f MB/s (writes completed at %.0f MB/s) |\n",
				i+1, c.label, mbps, total/written.Seconds()/1e6)
		}
		for _, c := range order {
			lags := groupLag(b, up, c.names, c.streams, uris, size)
			p := func(q float64) float64 { return lags[min(len(lags)-1, int(q*float64(len(lags))))] }
			b.ReportMetric(p(0.99), "lag-p99-s-"+c.streams[0])
			benchReport(b, "| run %d: %s: lag at 30 MB/s churn (10 MB/s per machine, 64 KiB random writes, %d samples of the worst stream) | p50 %.3f s, p99 %.3f s, max %.3f s |\n",
				i+1, c.label, len(lags), p(0.5), p(0.99), p(1))
		}
	}
}

// groupLag writes 10 MB/s to each machine for 6 s and samples the worst
// lag of the streams every 50 ms.
func groupLag(b *testing.B, up *UpMain, names, streams []string, uris map[string]string, size int64) []float64 {
	const rate, run = 10e6, 6 * time.Second
	stopLags := sample(50*time.Millisecond, func() float64 {
		worst := 0.0
		for _, s := range streams {
			worst = max(worst, streamStatus(b, up, s).LagSeconds)
		}
		return worst
	})
	var wg sync.WaitGroup
	for w, n := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cl, err := nbd.Dial(context.Background(), uris[n])
			if err != nil {
				b.Error(err)
				return
			}
			defer cl.Close()
			rng := rand.New(rand.NewPCG(uint64(w), 9))
			buf := randomBlock(rng, 64<<10)
			start := time.Now()
			var sent int64
			for time.Since(start) < run {
				buf[0]++
				if _, err := cl.WriteAt(buf, rng.Int64N(size/int64(len(buf)))*int64(len(buf))); err != nil {
					b.Error(err)
					return
				}
				sent += int64(len(buf))
				if d := time.Until(start.Add(time.Duration(float64(sent) / rate * float64(time.Second)))); d > 0 {
					time.Sleep(d)
				}
			}
		}()
	}
	wg.Wait()
	lags := stopLags()
	for _, s := range streams {
		for streamStatus(b, up, s).BacklogBytes > 0 {
			time.Sleep(20 * time.Millisecond)
		}
	}
	sort.Float64s(lags)
	if len(lags) == 0 {
		b.Fatal(fmt.Errorf("no lag samples"))
	}
	return lags
}
