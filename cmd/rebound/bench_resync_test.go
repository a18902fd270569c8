package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/digest"
	"github.com/rebound-dr/rebound/nbd"
)

// BenchmarkResync measures reprotect on a 4 GiB disk full of
// semi-compressible data with 1%, 10% and 50% of its 4 KiB blocks changed
// at the recovery site after a failover: with change tracking and with
// Verify (digest compare), against rsync --inplace --no-whole-file of the
// same image pair to an rsync daemon on loopback, in the same run.
//
// Each measurement is a failover (planned), random block writes at the new
// active site, commit and reprotect, so the machine ping-pongs between the
// two sites. Before a Verify reprotect the old copy (the target's disk) is
// copied for rsync; rsync then pushes the active site's disk onto that copy.
func BenchmarkResync(b *testing.B) {
	rsyncBin, err := exec.LookPath("rsync")
	if err != nil {
		b.Fatal("rsync is needed to compare against: ", err)
	}
	size := int64(4 << 30)
	if v := os.Getenv("REBOUND_RESYNC_MIB"); v != "" { // quicker trial runs
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n <= 0 {
			b.Fatalf("REBOUND_RESYNC_MIB=%q: want a positive number of MiB", v)
		}
		size = n << 20
	}
	const blk = 4096
	ctx := context.Background()
	dir := b.TempDir()
	up, svc := testUp(b, filepath.Join(dir, "rebound"))
	loop := svc.(rebound.LoopService)
	// Points every second: the reprotect's time ends at the target's first
	// point, which the default policy cuts only every 5 s.
	pol := rebound.DefaultPolicy()
	pol.Name, pol.CrashInterval = "bench", rebound.Duration(time.Second)
	if _, err := svc.PutPolicy(ctx, pol); err != nil {
		b.Fatal(err)
	}
	m, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "bench", Site: "primary", Disks: []int64{size}})
	if err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	var runs [][2]int64
	for off := int64(0); off < size; off += 1 << 20 {
		runs = append(runs, [2]int64{off, 1 << 20})
	}
	writeRuns(b, m.Disks[0].NBD, runs, 1)
	b.Logf("filled %d MiB in %s", size>>20, time.Since(start).Round(time.Millisecond))
	start = time.Now()
	waitJob(b, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "bench", To: "recovery", Policy: "bench"}))
	b.Logf("protected in %s", time.Since(start).Round(time.Millisecond))

	rs := startRsyncd(b, rsyncBin, filepath.Join(dir, "rsync"))
	diskPath := func(site string) string {
		return filepath.Join(up.Sites[site].Config.DataDir, "machines", "bench", "disk0.raw")
	}

	// check is a sample of the last round's written blocks and their
	// hashes, read back over NBD after the next failover: the reprotected
	// copy holds them.
	var check map[int64][32]byte
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		seed := uint64(10)
		for _, pct := range []float64{1, 10, 50} {
			var rsyncTime time.Duration
			var rsyncBytes int64
			for _, verify := range []bool{false, true} {
				seed++
				// Fail over to the copy that is the target now.
				m = benchGet(b, svc)
				if m.Protection == nil {
					b.Fatalf("machine not protected: %+v", m)
				}
				from, to := m.Protection.SourceSite, m.Protection.TargetSite
				waitJob(b, svc)(svc.Failover(ctx, rebound.FailoverRequest{Machine: "bench", Point: rebound.PointLatest, Planned: true}))
				m = benchGet(b, svc)
				if m.ActiveSite != to {
					b.Fatalf("failover left the machine at %s, want %s", m.ActiveSite, to)
				}
				verifySample(b, m.Disks[0].NBD, check)

				// Change pct% of the 4 KiB blocks, at random.
				rng := rand.New(rand.NewPCG(seed, 7))
				n := int(pct / 100 * float64(size/blk))
				blocks := rng.Perm(int(size / blk))[:n]
				slices.Sort(blocks)
				changed := int64(n) * blk
				runs = runs[:0]
				for _, bl := range blocks {
					off := int64(bl) * blk
					if k := len(runs) - 1; k >= 0 && runs[k][0]+runs[k][1] == off && runs[k][1] < 1<<20 {
						runs[k][1] += blk
						continue
					}
					runs = append(runs, [2]int64{off, blk})
				}
				start := time.Now()
				check = writeRuns(b, m.Disks[0].NBD, runs, seed)
				b.Logf("%.0f%%: wrote %d blocks in %d writes at %s in %s", pct, n, len(runs), to, time.Since(start).Round(time.Millisecond))
				start = time.Now()
				waitJob(b, svc)(svc.Commit(ctx, "bench"))
				b.Logf("committed in %s", time.Since(start).Round(time.Millisecond))

				// The old copy, before the reprotect touches it.
				if verify {
					start = time.Now()
					if out, err := exec.Command("cp", "--sparse=always", diskPath(from), rs.image).CombinedOutput(); err != nil {
						b.Fatalf("copy the old image: %v: %s", err, out)
					}
					b.Logf("copied the old image in %s", time.Since(start).Round(time.Millisecond))
				}

				load := loadavg()
				j0, err := loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "bench", Verify: verify, Policy: "bench"})
				steps := watchSteps(svc, j0, err)
				j := waitJobDone(b, svc, j0, err)
				if j.EndedAt == nil {
					b.Fatalf("reprotect job has no end time: %+v", j)
				}
				took := j.EndedAt.Sub(j.CreatedAt)
				sent := siteStatus(b, up, to).SyncDone
				mode := "tracked"
				if verify {
					mode = "verify (digest compare)"
				}
				b.Logf("%.0f%% %s: %s, job bytesSent %d, source SyncDone %d, compared %d, changed %d, load before %s after %s",
					pct, mode, took.Round(time.Millisecond), j.BytesSent, sent, j.BytesCompared, changed, load, loadavg())
				b.Logf("%.0f%% %s: steps %s", pct, mode, <-steps)
				if j.BytesSent != sent {
					b.Logf("job.BytesSent %d differs from the source's final SyncDone %d: the job samples it every 250 ms", j.BytesSent, sent)
				}
				sent = max(sent, j.BytesSent)
				if sent < changed/2 {
					b.Fatalf("%s reprotect sent %d bytes for %d changed: too few to be right", mode, sent, changed)
				}
				b.ReportMetric(took.Seconds(), fmt.Sprintf("s/%s@%.0f%%", strings.Fields(mode)[0], pct))
				label := fmt.Sprintf("%.0f%% (%s)", pct, mib(changed))
				if !verify {
					limit := int64(1.05*float64(changed)) + size/1000
					benchReport(b, "| %s | Rebound, tracked | %.1f s | %s | %s | bytes ≤ 1.05 × changed + 0.1%% of disk = %s | %s |\n",
						label, took.Seconds(), mib(sent), mib(j.BytesCompared), mib(limit), yes(sent <= limit))
					continue
				}

				// rsync of the same pair: the active disk onto the old copy.
				rsyncTime, rsyncBytes = rs.push(b, diskPath(to))
				if err := sameFile(diskPath(to), rs.image); err != nil {
					b.Fatalf("rsync result: %v", err)
				}
				b.Logf("%.0f%% rsync: %s, %d bytes sent, load %s", pct, rsyncTime.Round(time.Millisecond), rsyncBytes, loadavg())
				b.ReportMetric(rsyncTime.Seconds(), fmt.Sprintf("s/rsync@%.0f%%", pct))
				benchReport(b, "| %s | Rebound, verify (digest compare) | %.1f s | %s | %s | time ≤ ½ rsync's = %.1f s; bytes ≤ rsync's | %s |\n",
					label, took.Seconds(), mib(sent), mib(j.BytesCompared), rsyncTime.Seconds()/2,
					yes(took <= rsyncTime/2 && sent <= rsyncBytes)+timeBytes(took <= rsyncTime/2, sent <= rsyncBytes))
				benchReport(b, "| %s | rsync --inplace --no-whole-file, loopback daemon | %.1f s | %s | %s | reference | |\n",
					label, rsyncTime.Seconds(), mib(rsyncBytes), mib(size))
			}
		}
	}
	b.StopTimer()
	// The last reprotect's copy holds its writes.
	waitJob(b, svc)(svc.Failover(ctx, rebound.FailoverRequest{Machine: "bench", Point: rebound.PointLatest, Planned: true}))
	verifySample(b, benchGet(b, svc).Disks[0].NBD, check)
}

// watchSteps polls a job and sends, once it ends, how long each step took
// (from the job's start to the first time the next step is seen).
func watchSteps(svc rebound.Service, j *rebound.Job, err error) <-chan string {
	out := make(chan string, 1)
	if err != nil {
		out <- "?"
		return out
	}
	go func() {
		var names []string
		var at []time.Time
		for {
			cur, err := svc.GetJob(context.Background(), j.ID)
			if err != nil || cur.EndedAt != nil {
				break
			}
			if len(names) == 0 || names[len(names)-1] != cur.Step {
				names, at = append(names, cur.Step), append(at, time.Now())
			}
			time.Sleep(50 * time.Millisecond)
		}
		end := time.Now()
		var parts []string
		for i, n := range names {
			next := end
			if i+1 < len(at) {
				next = at[i+1]
			}
			parts = append(parts, fmt.Sprintf("%s %.1fs", n, next.Sub(at[i]).Seconds()))
		}
		out <- strings.Join(parts, ", ")
	}()
	return out
}

// writeRuns writes fresh semi-compressible data over runs ({offset,
// length}) through four NBD clients and returns the hashes of a sample of
// the 4 KiB blocks written.
func writeRuns(b *testing.B, uri string, runs [][2]int64, seed uint64) map[int64][32]byte {
	const workers = 4
	var mu sync.Mutex
	sample := map[int64][32]byte{}
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			cl, err := nbd.Dial(context.Background(), uri)
			if err != nil {
				b.Error(err)
				return
			}
			defer cl.Close()
			rng := rand.New(rand.NewPCG(seed, uint64(w)))
			buf := make([]byte, 1<<20)
			for k := w; k < len(runs); k += workers {
				p := buf[:runs[k][1]]
				fillSemi(rng, p)
				if _, err := cl.WriteAt(p, runs[k][0]); err != nil {
					b.Errorf("write at %d: %v", runs[k][0], err)
					return
				}
				if k%(max(len(runs)/64, 1)) == 0 {
					mu.Lock()
					sample[runs[k][0]] = sha256.Sum256(p[:4096])
					mu.Unlock()
				}
			}
			if err := cl.Flush(); err != nil {
				b.Error(err)
			}
		}(w)
	}
	wg.Wait()
	if b.Failed() {
		b.FailNow()
	}
	return sample
}

// fillSemi fills p like randomBlock (half random, half a repeated byte per
// 4 KiB), but fast enough for gigabytes.
func fillSemi(rng *rand.Rand, p []byte) {
	for i := 0; i+8 <= len(p); i += 8 {
		binary.LittleEndian.PutUint64(p[i:], rng.Uint64())
	}
	for i := 0; i < len(p); i += 4096 {
		copy(p[i:min(i+2048, len(p))], fives)
	}
}

var fives = bytes.Repeat([]byte{0x5a}, 2048)

// verifySample reads sampled 4 KiB blocks over NBD and compares hashes.
func verifySample(b *testing.B, uri string, sample map[int64][32]byte) {
	if len(sample) == 0 {
		return
	}
	cl, err := nbd.Dial(context.Background(), uri)
	if err != nil {
		b.Fatal(err)
	}
	defer cl.Close()
	buf := make([]byte, 4096)
	for off, want := range sample {
		if _, err := cl.ReadAt(buf, off); err != nil {
			b.Fatal(err)
		}
		if sha256.Sum256(buf) != want {
			b.Fatalf("block at %d differs after reprotect and failover", off)
		}
	}
}

func benchGet(b *testing.B, svc rebound.Service) *rebound.Machine {
	m, err := svc.GetMachine(context.Background(), "bench")
	if err != nil {
		b.Fatal(err)
	}
	return m
}

// siteStatus returns a site's view of the bench machine.
func siteStatus(b *testing.B, up *UpMain, site string) rebound.MachineStatus {
	st, err := up.Sites[site].Site.Status(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	for _, ms := range st.Machines {
		if ms.Name == "bench" {
			return ms
		}
	}
	b.Fatalf("bench machine not at %s", site)
	return rebound.MachineStatus{}
}

// rsyncd is an rsync daemon on loopback whose module holds the old image.
type rsyncd struct {
	bin, url, image string
}

// startRsyncd runs an rsync daemon on 127.0.0.1 with a module "img" in
// dir; it stops with the benchmark.
func startRsyncd(b *testing.B, bin, dir string) *rsyncd {
	mod := filepath.Join(dir, "img")
	if err := os.MkdirAll(mod, 0o755); err != nil {
		b.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	conf := filepath.Join(dir, "rsyncd.conf")
	text := fmt.Sprintf("use chroot = no\nuid = %d\ngid = %d\npid file = %s\n\n[img]\npath = %s\nread only = false\n",
		os.Getuid(), os.Getgid(), filepath.Join(dir, "rsyncd.pid"), mod)
	if err := os.WriteFile(conf, []byte(text), 0o644); err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command(bin, "--daemon", "--no-detach", "--config="+conf, "--address=127.0.0.1", "--port="+strconv.Itoa(port))
	cmd.Stderr = os.Stderr
	// Killed with the benchmark even if it dies without cleaning up.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for i := 0; ; i++ {
		c, err := net.Dial("tcp", l.Addr().String())
		if err == nil {
			c.Close()
			break
		}
		if i == 100 {
			b.Fatalf("rsync daemon does not listen: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return &rsyncd{bin: bin, url: fmt.Sprintf("rsync://127.0.0.1:%d/img/disk.raw", port), image: filepath.Join(mod, "disk.raw")}
}

var totalSent = regexp.MustCompile(`Total bytes sent: ([0-9,.]+)`)

// push rsyncs src onto the daemon's image and returns the wall time and
// rsync's "Total bytes sent". -I makes rsync compare even if size and
// mtime happened to match.
func (r *rsyncd) push(b *testing.B, src string) (time.Duration, int64) {
	start := time.Now()
	out, err := exec.Command(r.bin, "--inplace", "--no-whole-file", "-I", "--stats", src, r.url).CombinedOutput()
	took := time.Since(start)
	if err != nil {
		b.Fatalf("rsync: %v: %s", err, out)
	}
	m := totalSent.FindSubmatch(out)
	if m == nil {
		b.Fatalf("rsync printed no total bytes sent: %s", out)
	}
	n, err := strconv.ParseInt(strings.NewReplacer(",", "", ".", "").Replace(string(m[1])), 10, 64)
	if err != nil {
		b.Fatal(err)
	}
	return took, n
}

// sameFile compares two images by their 1 MiB block digests.
func sameFile(a, b string) error {
	fa, err := os.Stat(a)
	if err != nil {
		return err
	}
	da, err := digest.File(context.Background(), a, fa.Size(), 1<<20, 0)
	if err != nil {
		return err
	}
	db, err := digest.File(context.Background(), b, fa.Size(), 1<<20, 0)
	if err != nil {
		return err
	}
	if d := digest.Diff(da, db, 1<<20, fa.Size()); len(d) > 0 {
		return fmt.Errorf("%s and %s differ in %d regions, first at %d", a, b, len(d), d[0].Offset)
	}
	return nil
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

func yes(ok bool) string {
	if ok {
		return "yes"
	}
	return "no"
}

// timeBytes says which half of a two-part target was missed.
func timeBytes(timeOK, bytesOK bool) string {
	switch {
	case timeOK && bytesOK:
		return ""
	case !timeOK && !bytesOK:
		return " (time and bytes)"
	case !timeOK:
		return " (time)"
	}
	return " (bytes)"
}
