package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/agent"
	"github.com/rebound-dr/rebound/internal/guestimage"
	"github.com/rebound-dr/rebound/internal/guestimage/record"
	"github.com/rebound-dr/rebound/nbd"
	"github.com/rebound-dr/rebound/pki"
)

// needTools fails the test when a tool it runs is missing (CI has them).
func needTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed: %v", tool, err)
		}
	}
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// loopDevice attaches a new file of size bytes to a loop device.
func loopDevice(t *testing.T, dir string, size int64) string {
	t.Helper()
	f, err := os.CreateTemp(dir, "loop-*.img")
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	dev := run(t, "losetup", "-f", "--show", f.Name())
	t.Cleanup(func() { _ = exec.Command("losetup", "-d", dev).Run() })
	return dev
}

// mountExt4 makes an ext4 filesystem on dev and mounts it.
func mountExt4(t *testing.T, dev, mnt string) {
	t.Helper()
	run(t, "mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	run(t, "mount", dev, mnt)
	t.Cleanup(func() {
		_ = exec.Command("fsfreeze", "-u", mnt).Run()
		_ = exec.Command("umount", mnt).Run()
	})
}

// manifest maps the regular files under root to their SHA-256.
func manifest(root string) (map[string]string, error) {
	out := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Name() == "lost+found" && d.IsDir() {
			return filepath.SkipDir
		}
		if !d.Type().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		sum := sha256.Sum256(b)
		rel, _ := filepath.Rel(root, p)
		out[rel] = hex.EncodeToString(sum[:])
		return nil
	})
	return out, err
}

func diffManifests(want, got map[string]string) string {
	var d []string
	for k, v := range want {
		if g, ok := got[k]; !ok {
			d = append(d, "missing "+k)
		} else if g != v {
			d = append(d, "differs "+k)
		}
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			d = append(d, "extra "+k)
		}
	}
	sort.Strings(d)
	if len(d) > 8 {
		d = append(d[:8], fmt.Sprintf("... %d more", len(d)-8))
	}
	return strings.Join(d, ", ")
}

// copyExport reads a whole NBD export into a file and returns its SHA-256.
func copyExport(t *testing.T, uri, path string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cl, err := nbd.Dial(ctx, uri)
	if err != nil {
		t.Fatalf("dial %s: %v", uri, err)
	}
	defer cl.Close()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	buf := make([]byte, 4<<20)
	for off := int64(0); off < cl.Size(); off += int64(len(buf)) {
		n := min(int64(len(buf)), cl.Size()-off)
		if _, err := cl.ReadAt(buf[:n], off); err != nil {
			t.Fatalf("read %s at %d: %v", uri, off, err)
		}
		if _, err := f.WriteAt(buf[:n], off); err != nil {
			t.Fatal(err)
		}
		h.Write(buf[:n])
	}
	return hex.EncodeToString(h.Sum(nil))
}

func fileSum(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	agent.DropCache(f)
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// writer creates, rewrites and deletes files under dir until stopped.
type writer struct {
	dir  string
	stop chan struct{}
	done chan struct{}
	n    int
	err  error
}

func startWriter(dir string) *writer {
	w := &writer{dir: dir, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		rng := rand.New(rand.NewSource(7))
		for i := 0; ; i++ {
			select {
			case <-w.stop:
				return
			default:
			}
			name := filepath.Join(dir, fmt.Sprintf("d%d", i%4), fmt.Sprintf("f%05d", i%300))
			if err := os.MkdirAll(filepath.Dir(name), 0o755); err != nil {
				w.err = err
				return
			}
			switch {
			case i%17 == 0:
				_ = os.Remove(filepath.Join(dir, fmt.Sprintf("d%d", rng.Intn(4)), fmt.Sprintf("f%05d", rng.Intn(300))))
			default:
				b := make([]byte, 512+rng.Intn(96<<10))
				rng.Read(b)
				f, err := os.Create(name)
				if err == nil {
					_, err = f.Write(b)
					if i%5 == 0 && err == nil {
						err = f.Sync()
					}
					err = errorsJoin(err, f.Close())
				}
				if err != nil {
					w.err = err
					return
				}
			}
			w.n++
			time.Sleep(2 * time.Millisecond)
		}
	}()
	return w
}

func errorsJoin(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

func (w *writer) Stop() error {
	select {
	case <-w.stop:
	default:
		close(w.stop)
	}
	<-w.done
	return w.err
}

// TestAgentLoopDevice: an agent protects a loop device carrying a mounted
// ext4 filesystem while files are written; test failovers to points its
// cycles cut give exports at recovery whose filesystem passes e2fsck and
// holds exactly the files as of the point. Restore then writes a point
// back onto a device, byte for byte.
func TestAgentLoopDevice(t *testing.T) {
	needTools(t, "losetup", "mkfs.ext4", "mount", "umount", "fsfreeze", "e2fsck")
	dir := t.TempDir()
	dev := loopDevice(t, dir, 64<<20)
	mnt := filepath.Join(dir, "mnt")
	mountExt4(t, dev, mnt)

	up, svc := testUp(t, filepath.Join(dir, "up"))
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	token, err := up.Server.JoinTokenAs(ctx, "srv1", pki.RoleAgent, false)
	if err != nil {
		t.Fatal(err)
	}

	// Each cycle records the files while the filesystem is still frozen;
	// the point it then cuts gets that manifest.
	var mu sync.Mutex
	var pending map[string]string
	var pendingErr error
	manifests := map[string]map[string]string{}
	var order []string
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	am := &AgentMain{Logger: logger, Config: AgentConfig{
		Name: "srv1", DataDir: filepath.Join(dir, "agent"), Server: up.Server.GRPCAddr, JoinToken: token,
		Disks: []string{dev}, FreezeMount: mnt, Interval: 500 * time.Millisecond, ReportEvery: 200 * time.Millisecond,
		OnFrozen: func() {
			m, err := manifest(mnt)
			mu.Lock()
			pending, pendingErr = m, err
			mu.Unlock()
		},
		OnPoint: func(p rebound.RecoveryPoint) {
			mu.Lock()
			defer mu.Unlock()
			if pendingErr != nil {
				t.Errorf("manifest at %s: %v", p.ID, pendingErr)
			}
			manifests[p.ID] = pending
			order = append(order, p.ID)
		},
	}}
	if err := am.Run(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { am.Close() })

	// The agent's site reports; then the machine is registered and protected.
	for deadline := time.Now().Add(30 * time.Second); ; {
		sites, err := svc.ListSites(ctx)
		if err != nil {
			t.Fatal(err)
		}
		online := false
		for _, s := range sites {
			online = online || s.Name == "srv1" && s.Status == rebound.SiteOnline
		}
		if online {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("agent srv1 never reported to the server")
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Registering the machine the agent holds; its disks are not served.
	if m, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "srv1", Site: "srv1", Disks: []int64{64 << 20}}); err != nil {
		t.Fatal(err)
	} else if m.Disks[0].NBD != "" {
		t.Fatalf("the agent's disk is reported as served at %s", m.Disks[0].NBD)
	}
	if _, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "srv2", Site: "srv1", Disks: []int64{1 << 20}}); err == nil {
		t.Fatal("a second machine at the agent was created")
	}
	w := startWriter(mnt)
	defer w.Stop()
	waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "srv1", To: "recovery"}))
	// A point on demand is a cycle; frozen, so app-consistent.
	if p, err := svc.CreatePoint(ctx, "srv1", true); err != nil || p.Kind != rebound.PointApp {
		t.Fatalf("point on demand: %+v %v", p, err)
	}

	// A few cycles with the writer running.
	mu.Lock()
	first := len(order)
	mu.Unlock()
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
		mu.Lock()
		n := len(order)
		mu.Unlock()
		if n >= first+4 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("only %d cycles: %s", n, am.Agent.Stats().LastError)
		}
	}
	if err := w.Stop(); err != nil {
		t.Fatalf("writer: %v", err)
	}
	if w.n < 30 {
		t.Fatalf("the writer did only %d operations", w.n)
	}
	st := am.Agent.Stats()
	t.Logf("agent: %d cycles, last scan %s for %d bytes, last copy %d bytes, frozen %s; writer did %d operations",
		st.Cycles, st.LastScan, st.LastScanned, st.LastChanged, st.LastFrozen, w.n)

	// Restart the agent after a 1 MiB file was written while it was down:
	// its digests were kept, so it sends about that, not the disk. Two
	// cycles first, so the writer's last changes are sent before.
	mu.Lock()
	stopped := len(order)
	mu.Unlock()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		mu.Lock()
		n := len(order)
		mu.Unlock()
		if n >= stopped+2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no cycles after the writer stopped: %s", am.Agent.Stats().LastError)
		}
	}
	if err := am.Close(); err != nil {
		t.Fatalf("close agent: %v", err)
	}
	big := make([]byte, 1<<20)
	rand.New(rand.NewSource(11)).Read(big)
	if err := os.WriteFile(filepath.Join(mnt, "after-restart"), big, 0o644); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	before := len(order)
	mu.Unlock()
	cfg := am.Config
	cfg.JoinToken = ""
	am = &AgentMain{Logger: logger, Config: cfg}
	if err := am.Run(ctx); err != nil {
		t.Fatalf("restart agent: %v", err)
	}
	t.Cleanup(func() { am.Close() })
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		mu.Lock()
		n := len(order)
		mu.Unlock()
		if n > before {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no cycle after the restart: %s", am.Agent.Stats().LastError)
		}
	}
	if sent := am.Agent.Stats().ChangedTotal; sent < 1<<20 || sent > 3<<20 {
		t.Fatalf("the restarted agent sent %d bytes; want the new 1 MiB file and a little metadata", sent)
	}
	mu.Lock()
	points := []string{order[first+1], order[len(order)-1]}
	mu.Unlock()

	for _, id := range points {
		mu.Lock()
		want := manifests[id]
		mu.Unlock()
		if len(want) == 0 {
			t.Fatalf("no files recorded at point %s", id)
		}
		// The point reaches the recovery site's journal.
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			ps, err := svc.ListPoints(ctx, "srv1")
			if err != nil {
				t.Fatal(err)
			}
			found := false
			for _, p := range ps {
				if p.ID == id {
					found = true
					if p.Kind != rebound.PointApp {
						t.Fatalf("point %s is %s; a frozen cycle is app-consistent", id, p.Kind)
					}
				}
			}
			if found {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("point %s never reached recovery", id)
			}
		}
		waitJob(t, svc)(svc.TestFailover(ctx, "srv1", id))
		m, err := svc.GetMachine(ctx, "srv1")
		if err != nil || m.TestFailover == nil || len(m.TestFailover.Disks) != 1 {
			t.Fatalf("test failover of srv1: %+v %v", m, err)
		}
		img := filepath.Join(dir, id+".img")
		copyExport(t, m.TestFailover.Disks[0].NBD, img)
		if out, err := exec.Command("e2fsck", "-fn", img).CombinedOutput(); err != nil {
			t.Fatalf("e2fsck of point %s: %v\n%s", id, err, out)
		}
		chk := filepath.Join(dir, "chk-"+id)
		if err := os.MkdirAll(chk, 0o755); err != nil {
			t.Fatal(err)
		}
		run(t, "mount", "-o", "ro,loop,noload", img, chk)
		got, err := manifest(chk)
		_ = exec.Command("umount", chk).Run()
		if err != nil {
			t.Fatal(err)
		}
		if d := diffManifests(want, got); d != "" {
			t.Fatalf("files at point %s (%d recorded, %d recovered): %s", id, len(want), len(got), d)
		}
		t.Logf("point %s: fsck clean, %d files as recorded", id, len(got))

		if id == points[0] {
			// Restore the first point onto a device of the same size: the
			// device then holds the export's bytes; a second run writes
			// nothing; the mounted source device is refused.
			dev2 := loopDevice(t, dir, 64<<20)
			junk := make([]byte, 1<<20)
			rand.New(rand.NewSource(3)).Read(junk)
			if err := os.WriteFile(dev2, junk, 0); err != nil {
				t.Fatal(err)
			}
			uri := m.TestFailover.Disks[0].NBD
			res, err := agent.Restore(ctx, uri, dev2, nil)
			if err != nil {
				t.Fatalf("restore: %v", err)
			}
			if a, b := fileSum(t, dev2), fileSum(t, img); a != b {
				t.Fatalf("restored device %s differs from point %s", a, b)
			}
			if res.Written == 0 || res.Size != 64<<20 {
				t.Fatalf("restore result %+v", res)
			}
			if res, err := agent.Restore(ctx, uri, dev2, nil); err != nil || res.Written != 0 {
				t.Fatalf("second restore: %+v %v; want nothing written", res, err)
			}
			if _, err := agent.Restore(ctx, uri, dev, nil); rebound.ErrorCode(err) != rebound.ECONFLICT {
				t.Fatalf("restore onto the mounted device: %v, want a conflict", err)
			}
		}
		waitJob(t, svc)(svc.TestFailoverCleanup(ctx, "srv1"))
	}
	if points[0] == points[1] {
		t.Fatal("the two points are the same")
	}

	// The CLI restores a point by ID, through a test failover it starts
	// and cleans up.
	last := points[1]
	dev3 := loopDevice(t, dir, 64<<20)
	r := runCLI(t, svc, "agent", "restore", "--machine", "srv1", "--point", last, "--disk", dev3)
	if r.code != 0 {
		t.Fatalf("agent restore: exit %d: %s %s", r.code, r.stdout, r.stderr)
	}
	lastSum := fileSum(t, filepath.Join(dir, last+".img"))
	if got := fileSum(t, dev3); got != lastSum {
		t.Fatalf("device restored by the CLI at %s differs from the point", last)
	}
	if m, err := svc.GetMachine(ctx, "srv1"); err != nil || m.TestFailover != nil {
		t.Fatalf("agent restore left a test failover: %+v %v", m, err)
	}

	// Failover to the point exports the same bytes at recovery; after
	// commit, a reprotect back onto the server's own devices is refused
	// with the way to bring the point home.
	waitJob(t, svc)(svc.Failover(ctx, rebound.FailoverRequest{Machine: "srv1", Point: last}))
	m, err := svc.GetMachine(ctx, "srv1")
	if err != nil || m.ActiveSite != "recovery" || len(m.Disks) != 1 {
		t.Fatalf("after failover: %+v %v", m, err)
	}
	if got := copyExport(t, m.Disks[0].NBD, filepath.Join(dir, "failover.img")); got != lastSum {
		t.Fatalf("failed-over disk differs from point %s", last)
	}
	waitJob(t, svc)(svc.Commit(ctx, "srv1"))
	job, err := svc.(rebound.LoopService).Reprotect(ctx, rebound.ReprotectRequest{Machine: "srv1"})
	if err == nil {
		job, err = waitJobEnd(ctx, svc, job)
	}
	if err == nil && job.State == rebound.JobSucceeded {
		t.Fatal("reprotect onto the agent's devices succeeded")
	}
	if msg := errText(job, err); !strings.Contains(msg, "agent restore") {
		t.Fatalf("reprotect onto the agent: %q; want it to point at rebound agent restore", msg)
	}
}

// waitJobEnd waits for a job to end, whatever its outcome.
func waitJobEnd(ctx context.Context, svc rebound.Service, job *rebound.Job) (*rebound.Job, error) {
	for {
		j, err := svc.GetJob(ctx, job.ID)
		if err != nil {
			return nil, err
		}
		if jobDone(j) {
			return j, nil
		}
		select {
		case <-ctx.Done():
			return j, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func errText(job *rebound.Job, err error) string {
	if err != nil {
		return err.Error()
	}
	if job != nil {
		return job.Error
	}
	return ""
}

// TestAgentP2V: a server's data disk (a loop device with ext4 mounted on
// the host, records written with fsync the way the test guest writes them)
// is protected by the agent as a qemu machine; an unplanned failover to a
// cycle's point boots it as a VM at recovery, and the guest reports the
// filesystem clean and every record fsynced before the point intact. It
// then fails back as a VM at the primary site.
func TestAgentP2V(t *testing.T) {
	needTools(t, "losetup", "mkfs.ext4", "mount", "umount", "fsfreeze")
	vmlinux, initrd := guestimage.Build(t)
	dir := t.TempDir()
	dev := loopDevice(t, dir, 64<<20)
	mnt := filepath.Join(dir, "mnt")
	mountExt4(t, dev, mnt)
	up, svc := testUp(t, filepath.Join(dir, "up"))
	power := svc.(rebound.PowerService)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	token, err := up.Server.JoinTokenAs(ctx, "srv1", pki.RoleAgent, false)
	if err != nil {
		t.Fatal(err)
	}

	// The server's application: records, each fsynced.
	f, err := os.Create(filepath.Join(mnt, "records"))
	if err != nil {
		t.Fatal(err)
	}
	var synced atomic.Uint64
	stop, done := make(chan struct{}), make(chan error, 1)
	go func() {
		buf := make([]byte, record.Size)
		for seq := uint64(1); ; seq++ {
			select {
			case <-stop:
				done <- f.Close()
				return
			default:
			}
			record.Encode(buf, seq, 1, time.Now().UnixNano())
			if _, err := f.WriteAt(buf, int64(seq-1)*record.Size); err != nil {
				done <- err
				return
			}
			if err := f.Sync(); err != nil {
				done <- err
				return
			}
			synced.Store(seq)
			time.Sleep(5 * time.Millisecond)
		}
	}()
	stopWriter := func() error {
		select {
		case <-stop:
			return nil
		default:
		}
		close(stop)
		return <-done
	}
	defer stopWriter()

	var mu sync.Mutex
	var frozenAt uint64
	atPoint := map[string]uint64{}
	var order []string
	am := &AgentMain{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Config: AgentConfig{
		Name: "srv1", DataDir: filepath.Join(dir, "agent"), Server: up.Server.GRPCAddr, JoinToken: token,
		Disks: []string{dev}, FreezeMount: mnt, Interval: 500 * time.Millisecond, ReportEvery: 200 * time.Millisecond,
		OnFrozen: func() { mu.Lock(); frozenAt = synced.Load(); mu.Unlock() },
		OnPoint: func(p rebound.RecoveryPoint) {
			mu.Lock()
			atPoint[p.ID] = frozenAt
			order = append(order, p.ID)
			mu.Unlock()
		},
	}}
	if err := am.Run(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { am.Close() })
	spec := &rebound.VMSpec{CPUs: 1, MemoryMiB: 256, Kernel: vmlinux, Initrd: initrd,
		Append: guestimage.KernelArgs(guestimage.BootOptions{Rate: 40})}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		_, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "srv1", Site: "srv1", Driver: rebound.DriverQEMU, Disks: []int64{64 << 20}, VM: spec})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("register srv1: %v", err)
		}
	}
	waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "srv1", To: "recovery"}))
	mu.Lock()
	first := len(order)
	mu.Unlock()
	var id string
	var want uint64
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
		mu.Lock()
		if len(order) >= first+3 {
			id = order[len(order)-1]
			want = atPoint[id]
		}
		mu.Unlock()
		if id != "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("too few cycles: %s", am.Agent.Stats().LastError)
		}
	}
	if want < 5 {
		t.Fatalf("only %d records before point %s", want, id)
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		ps, err := svc.ListPoints(ctx, "srv1")
		if err == nil && len(ps) > 0 && ps[len(ps)-1].Seq >= mustSeq(t, id) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("point %s never reached recovery", id)
		}
	}

	// Unplanned failover: the server keeps writing (the agent cannot stop
	// it); the VM boots at recovery on the point.
	start := time.Now()
	waitJob(t, svc)(svc.Failover(ctx, rebound.FailoverRequest{Machine: "srv1", Point: id}))
	waitConsole(t, power, "srv1", regexp.MustCompile(`REBOUND-GUEST booted`), time.Minute)
	t.Logf("P2V: failover command to booted at recovery: %s", time.Since(start).Round(time.Millisecond))
	cons, _ := power.Console(ctx, "srv1", 1<<20)
	if !regexp.MustCompile(`REBOUND-GUEST fsck clean`).Match(cons) {
		t.Fatalf("server as a VM at recovery: filesystem not clean:\n%s", tailString(string(cons), 3000))
	}
	v := verifiedRE.FindStringSubmatch(string(cons))
	if v == nil {
		t.Fatalf("server as a VM at recovery: no ok verdict:\n%s", tailString(string(cons), 3000))
	}
	if n := uint64(atoi(t, v[1])); n < want {
		t.Fatalf("the VM verified %d records; %d were fsynced before point %s", n, want, id)
	}
	t.Logf("point %s: %d records fsynced before it, %s verified by the VM", id, want, v[1])
	if err := stopWriter(); err != nil {
		t.Fatalf("writer: %v", err)
	}

	// Failback as a VM at the primary site (a physical server comes back
	// virtual): commit, reprotect to primary (a full copy: primary holds
	// nothing), the VM writes more, planned failback boots it at primary
	// with every record.
	loop := svc.(rebound.LoopService)
	waitJob(t, svc)(svc.Commit(ctx, "srv1"))
	waitJob(t, svc)(loop.Reprotect(ctx, rebound.ReprotectRequest{Machine: "srv1", To: "primary"}))
	atRecovery := atoi(t, waitConsole(t, power, "srv1", wroteRE, 30*time.Second)[1])
	waitJob(t, svc)(loop.Failback(ctx, rebound.FailoverRequest{Machine: "srv1"}))
	if m, err := svc.GetMachine(ctx, "srv1"); err != nil || m.ActiveSite != "primary" {
		t.Fatalf("after failback: %+v %v", m, err)
	}
	waitConsole(t, power, "srv1", regexp.MustCompile(`REBOUND-GUEST booted`), time.Minute)
	cons, _ = power.Console(ctx, "srv1", 1<<20)
	v = verifiedRE.FindStringSubmatch(string(cons))
	if v == nil || !regexp.MustCompile(`REBOUND-GUEST fsck clean`).Match(cons) {
		t.Fatalf("VM at primary after failback:\n%s", tailString(string(cons), 3000))
	}
	if n := atoi(t, v[1]); n < atRecovery {
		t.Fatalf("VM at primary verified %d records; %d were written at recovery", n, atRecovery)
	}
	t.Logf("failback: VM at primary verified %s records (%d written at recovery)", v[1], atRecovery)
	waitJob(t, svc)(power.StopMachine(ctx, "srv1"))
}

func mustSeq(t *testing.T, id string) uint64 {
	t.Helper()
	n, err := strconv.ParseUint(strings.TrimPrefix(id, "p"), 10, 64)
	if err != nil {
		t.Fatalf("point ID %q: %v", id, err)
	}
	return n
}

// TestAgentCLIErrors: bad agent flags fail at once with a usage error
// naming the problem, before enrolling.
func TestAgentCLIErrors(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"agent", "--name", "srv1", "--data", dir}, "at least one disk"},
		{[]string{"agent", "--name", "srv1", "--data", dir, "--disk", "relative.img"}, "absolute path"},
		{[]string{"agent", "--name", "srv1", "--data", dir, "--disk", filepath.Join(dir, "missing")}, "missing"},
		{[]string{"agent", "restore", "--machine", "srv1", "--point", "p1"}, "--disk is required"},
		{[]string{"agent", "restore", "--disk", "/dev/null"}, "--machine and --point, or --from"},
	} {
		r := runCLI(t, nil, c.args...)
		if r.code != ExitUsage || !strings.Contains(r.stderr, c.want) {
			t.Errorf("%v: exit %d, stderr %q; want usage error with %q", c.args, r.code, r.stderr, c.want)
		}
	}
}
