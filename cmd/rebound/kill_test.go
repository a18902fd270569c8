package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	rhttp "github.com/rebound-dr/rebound/http"
	"github.com/rebound-dr/rebound/internal/failpoint"
	"github.com/rebound-dr/rebound/nbd"
	"github.com/rebound-dr/rebound/workload"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// reboundBinary builds the real binary once per test run.
func reboundBinary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "rebound-bin")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "rebound")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// nextPort hands out fixed ports below the kernel's ephemeral range
// (32768-60999 on Linux), so an outgoing connection or another test's
// listener cannot take a port while its process is down between a kill
// and a restart; parallel tests each get their own.
var nextPort atomic.Int32

func freePort(t testing.TB) string {
	t.Helper()
	nextPort.CompareAndSwap(0, int32(20000+os.Getpid()%400*25))
	for range 12000 {
		p := nextPort.Add(1)
		if p >= 32000 {
			nextPort.Store(20000)
			continue
		}
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			continue // in use
		}
		l.Close()
		return l.Addr().String()
	}
	t.Fatal("no free port in 20000-32000")
	return ""
}

// proc is a real rebound process that can be killed and restarted.
type proc struct {
	t    testing.TB
	name string
	args []string
	env  []string // added to the environment of every start
	log  *os.File
	cmd  *exec.Cmd
	done chan struct{}
}

func startProc(t testing.TB, dir, name string, env []string, args ...string) *proc {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(dir, name+".log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	p := &proc{t: t, name: name, args: args, env: env, log: f}
	p.start()
	t.Cleanup(func() { p.kill(); f.Close() })
	return p
}

func (p *proc) start() {
	p.t.Helper()
	p.cmd = exec.Command(reboundBinary(p.t), p.args...)
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	if len(p.env) > 0 {
		p.cmd.Env = append(os.Environ(), p.env...)
	}
	if err := p.cmd.Start(); err != nil {
		p.t.Fatalf("start %s: %v", p.name, err)
	}
	done := make(chan struct{})
	p.done = done
	cmd := p.cmd
	go func() { cmd.Wait(); close(done) }()
}

// kill sends SIGKILL: no clean shutdown, no flush.
func (p *proc) kill() {
	if p.cmd != nil && p.cmd.Process != nil {
		p.cmd.Process.Signal(syscall.SIGKILL)
		<-p.done
	}
}

// cluster is a server and two sites as separate processes.
type cluster struct {
	t      *testing.T
	dir    string
	svc    rebound.Service
	srv    *proc
	sites  map[string]*proc
	pauses map[string]string // job step ("failback/drain") -> its failpoint's marker file
}

// startCluster starts a server and two sites. The server pauses the first
// time a job enters each of the pauseAt steps ("type/step", as
// "reprotect/resync"); atStep acts there.
func startCluster(t *testing.T, pauseAt ...string) *cluster {
	t.Helper()
	dir := t.TempDir()
	api, grpcAddr := freePort(t), freePort(t)
	c := &cluster{t: t, dir: dir, sites: map[string]*proc{}, pauses: map[string]string{}}
	var fps []string
	for i, step := range pauseAt {
		marker := filepath.Join(dir, fmt.Sprintf("failpoint-%d", i))
		c.pauses[step] = marker
		fps = append(fps, "server/job/"+step+"=pause("+marker+")")
	}
	var env []string
	if len(fps) > 0 {
		env = []string{failpoint.Env + "=" + strings.Join(fps, ";")}
	}
	tokenFile := filepath.Join(dir, "admin-token")
	c.srv = startProc(t, dir, "server", env, "server", "--data", filepath.Join(dir, "server"),
		"--api-addr", api, "--grpc-addr", grpcAddr, "--admin-token-file", tokenFile)
	var token, ca []byte
	deadline := time.Now().Add(30 * time.Second)
	for {
		token, _ = os.ReadFile(tokenFile)
		ca, _ = os.ReadFile(filepath.Join(dir, "server", "ca", "ca.crt"))
		if len(token) > 0 && len(ca) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("server did not start")
		}
		time.Sleep(50 * time.Millisecond)
	}
	svc, err := rhttp.NewClient("https://"+api, strings.TrimSpace(string(token)), ca)
	if err != nil {
		t.Fatal(err)
	}
	c.svc = svc
	for _, name := range []string{"primary", "recovery"} {
		var tok string
		for {
			tok, err = svc.CreateEnrollToken(context.Background(), name)
			if err == nil || time.Now().After(deadline) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil {
			t.Fatal(err)
		}
		c.sites[name] = startProc(t, dir, name, nil, "site", "--name", name, "--data", filepath.Join(dir, name),
			"--server-addr", grpcAddr, "--token", tok, "--nbd-addr", freePort(t), "--repl-addr", freePort(t))
	}
	c.waitOnline("primary", "recovery")
	return c
}

// atStep waits until a job of the server stops at step (one of the
// cluster's pauseAt), runs fault while the job is held there, and lets the
// job go on. The fault lands exactly at the step, whatever the machine's load.
func (c *cluster) atStep(step string, fault func()) {
	c.t.Helper()
	marker, ok := c.pauses[step]
	if !ok {
		c.t.Fatalf("no failpoint at step %q: pass it to startCluster", step)
	}
	// Polling for a state that stays: the server is blocked until the
	// marker goes.
	waitUntil(c.t, 2*time.Minute, "a job stopped at step "+step, func() bool {
		_, err := os.Stat(marker)
		return err == nil
	})
	fault()
	if err := os.Remove(marker); err != nil {
		c.t.Fatal(err)
	}
}

func (c *cluster) waitOnline(names ...string) {
	c.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		sites, err := c.svc.ListSites(context.Background())
		online := 0
		for _, s := range sites {
			for _, n := range names {
				if s.Name == n && s.Status == rebound.SiteOnline && time.Since(s.LastSeen) < 3*time.Second {
					online++
				}
			}
		}
		if err == nil && online == len(names) {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	c.t.Fatalf("sites %v did not come online", names)
}

// retry runs fn until it succeeds or a minute passes: the cluster is being
// killed and restarted underneath it.
func retry(t *testing.T, what string, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	var err error
	for time.Now().Before(deadline) {
		if err = fn(); err == nil {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("%s: %v", what, err)
}

// resilientWrite applies ops through uri, reconnecting and repeating the
// same op after a failure: an unacknowledged write may or may not have
// landed, and repeating it makes the outcome certain.
func resilientWrite(t *testing.T, uri string, o *oracle, n int) {
	t.Helper()
	var cl *nbd.Client
	defer func() {
		if cl != nil {
			cl.Close()
		}
	}()
	for i := 0; i < n; i++ {
		op := o.gen.Next()
		retry(t, "write", func() error {
			if cl == nil {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				c, err := nbd.Dial(ctx, uri)
				if err != nil {
					return err
				}
				cl = c
			}
			if err := workload.Apply(cl, op); err != nil {
				cl.Close()
				cl = nil
				return err
			}
			return nil
		})
		o.model.Apply(op)
	}
	retry(t, "flush", func() error {
		if cl == nil {
			return nil // the site restarted: kill -9 keeps the page cache, nothing to flush
		}
		if err := cl.Flush(); err != nil {
			cl.Close()
			cl = nil
			return err
		}
		return nil
	})
}

// TestOracleWithKills runs the real binaries, kills the sending and the
// receiving site with SIGKILL at random moments while a workload writes
// and points are cut, and then checks every recorded point byte for byte.
func TestOracleWithKills(t *testing.T) {
	t.Parallel()
	c := startCluster(t)
	svc, ctx := c.svc, context.Background()
	const size = 16 << 20
	m, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "primary", Disks: []int64{size}})
	if err != nil {
		t.Fatal(err)
	}
	src := m.Disks[0].NBD
	o := newOracle(t, size, 7)
	resilientWrite(t, src, o, 100)
	waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm1", To: "recovery"}))

	kills, stop := c.killSites(1)
	// Keep writing and cutting points until several kills have happened.
	for i := 0; i < 10 || kills.Load() < 5; i++ {
		resilientWrite(t, src, o, 30)
		retry(t, "cut point", func() error {
			p, err := svc.CreatePoint(ctx, "vm1", false)
			if err != nil {
				return err
			}
			o.points[p.ID] = o.model.Sum()
			o.order = append(o.order, p.ID)
			return nil
		})
	}
	stop()
	t.Logf("%d site kills during the run, %d points recorded", kills.Load(), len(o.order))

	for _, id := range o.order {
		retry(t, "test failover "+id, func() error {
			j, err := svc.TestFailover(ctx, "vm1", id)
			if err != nil {
				return err
			}
			return jobErr(svc, j)
		})
		mm := getMachine(t, svc, "vm1")
		if got := diskSum(t, mm.TestFailover.Disks[0].NBD); got != o.points[id] {
			t.Fatalf("point %s after kills: hash %s, want %s", id, got, o.points[id])
		}
		waitJob(t, svc)(svc.TestFailoverCleanup(ctx, "vm1"))
	}
	// Latest drains the source: every acknowledged write is there.
	final := o.model.Sum()
	waitJob(t, svc)(svc.Failover(ctx, rebound.FailoverRequest{Machine: "vm1", Point: "latest"}))
	mm := getMachine(t, svc, "vm1")
	if got := diskSum(t, mm.Disks[0].NBD); got != final {
		t.Fatalf("failover to latest after kills: hash %s, want %s", got, final)
	}
}

// killSites sends SIGKILL to one site at a random moment, every 0.7 to
// 2.2 s, and restarts it 0.1 to 0.7 s later, until stop; stop waits for
// both sites to be online again. kills counts them.
func (c *cluster) killSites(seed uint64) (kills *atomic.Int32, stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	kills = new(atomic.Int32)
	wg.Add(1)
	go func() {
		defer wg.Done()
		rng := rand.New(rand.NewPCG(seed, seed+1))
		for {
			select {
			case <-done:
				return
			case <-time.After(time.Duration(700+rng.IntN(1500)) * time.Millisecond):
			}
			p := c.sites[[]string{"primary", "recovery"}[rng.IntN(2)]]
			p.kill()
			kills.Add(1)
			time.Sleep(time.Duration(100+rng.IntN(600)) * time.Millisecond)
			p.start()
		}
	}()
	return kills, func() {
		close(done)
		wg.Wait()
		c.waitOnline("primary", "recovery")
	}
}

// jobErr waits for a job and returns its error, if any.
func jobErr(svc rebound.Service, j *rebound.Job) error {
	for {
		j, err := svc.GetJob(context.Background(), j.ID)
		if err != nil {
			return err
		}
		switch j.State {
		case rebound.JobSucceeded:
			return nil
		case rebound.JobFailed, rebound.JobCancelled:
			return fmt.Errorf("job %s %s: %s", j.ID, j.State, j.Error)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
