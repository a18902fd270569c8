package main

import (
	"bytes"
	"context"
	"encoding/pem"
	"io"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	rhttp "github.com/rebound-dr/rebound/http"
)

func loopFake() *fakeService {
	return &fakeService{
		ReprotectFn: func(req rebound.ReprotectRequest) (*rebound.Job, error) { return jobFn("reprotect", req.Machine), nil },
		FailbackFn:  func(req rebound.FailoverRequest) (*rebound.Job, error) { return jobFn("failback", req.Machine), nil },
	}
}

func TestLoopVerbs(t *testing.T) {
	for _, tc := range []struct {
		args []string
		call string
		typ  string
	}{
		{[]string{"reprotect", "web1"}, "Reprotect {Machine:web1 To: Policy: Verify:false WaitReady:0s Keep:}", "reprotect"},
		{[]string{"reprotect", "web1", "--wait-ready"}, "Reprotect {Machine:web1 To: Policy: Verify:false WaitReady:15m0s Keep:}", "reprotect"},
		{[]string{"reprotect", "--wait-ready", "web1"}, "Reprotect {Machine:web1 To: Policy: Verify:false WaitReady:15m0s Keep:}", "reprotect"},
		{[]string{"reprotect", "web1", "--wait-ready=90s", "--to", "a", "--policy", "gold", "--verify", "--keep", "b"},
			"Reprotect {Machine:web1 To:a Policy:gold Verify:true WaitReady:1m30s Keep:b}", "reprotect"},
		{[]string{"failback", "web1"}, "Failback {Machine:web1 Point: Planned:true}", "failback"},
		{[]string{"failback", "web1", "--planned"}, "Failback {Machine:web1 Point: Planned:true}", "failback"},
		{[]string{"failback", "web1", "--point", "latest-app-consistent"}, "Failback {Machine:web1 Point:latest-app-consistent Planned:false}", "failback"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			f := loopFake()
			r := runCLI(t, f, tc.args...)
			wantCode(t, r, 0)
			wantCalls(t, f, tc.call)
			if !strings.Contains(r.stdout, "j1") || !strings.Contains(r.stdout, tc.typ) || !strings.Contains(r.stdout, "running") {
				t.Fatalf("table:\n%s", r.stdout)
			}
			f.calls = nil
			r = runCLI(t, f, append(tc.args, "-o", "json")...)
			wantCode(t, r, 0)
			wantCalls(t, f, tc.call)
			if j := decode[rebound.Job](t, r.stdout); j.ID != "j1" || j.Type != tc.typ {
				t.Fatalf("json %+v", j)
			}
		})
	}

	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{[]string{"failback", "web1", "--planned", "--point", "p7"}, "--planned and --point exclude each other"},
		{[]string{"failback", "web1", "--point", ""}, "--point must not be empty"},
		{[]string{"failback"}, "missing NAME"},
		{[]string{"reprotect", "web1", "--wait-ready=-1s"}, "must not be negative"},
		{[]string{"reprotect", "web1", "--wait-ready=soon"}, "invalid argument"},
		// A bare --wait-ready takes no separate value: "5m" is an argument.
		{[]string{"reprotect", "web1", "--wait-ready", "5m"}, `unexpected argument "5m"`},
		{[]string{"reprotect", "web1", "--to", ""}, "--to must not be empty"},
		{[]string{"reprotect", "web1", "--keep="}, "--keep must not be empty"},
		{[]string{"reprotect", "web1", "--verify=maybe"}, "invalid argument"},
		{[]string{"preflight", "web1", "--operation", "delete"}, `not "delete"`},
		{[]string{"preflight"}, "missing NAME"},
	} {
		f := loopFake()
		r := runCLI(t, f, tc.args...)
		wantCode(t, r, ExitUsage)
		wantCalls(t, f)
		if !strings.Contains(r.stderr, tc.msg) {
			t.Errorf("%q: stderr %q, want %q", tc.args, r.stderr, tc.msg)
		}
		r = runCLI(t, f, append(tc.args, "-o", "json")...)
		if r.code != ExitUsage || !strings.Contains(r.stdout, `"code":"invalid"`) {
			t.Errorf("%q -o json: %d %q", tc.args, r.code, r.stdout)
		}
	}

	// Server-side refusals keep their exit codes.
	f := &fakeService{ReprotectFn: func(rebound.ReprotectRequest) (*rebound.Job, error) {
		return nil, rebound.Errorf(rebound.ECONFLICT, "copies of web1 diverged; choose --keep a or --keep b")
	}}
	r := runCLI(t, f, "reprotect", "web1")
	wantCode(t, r, ExitConflict)
	if r.stderr != "rebound: copies of web1 diverged; choose --keep a or --keep b\n" {
		t.Fatalf("stderr %q", r.stderr)
	}
	f = &fakeService{FailbackFn: func(rebound.FailoverRequest) (*rebound.Job, error) {
		return nil, rebound.Errorf(rebound.EUNAVAILABLE, "site a is offline")
	}}
	wantCode(t, runCLI(t, f, "failback", "web1"), ExitUnavailable)
}

// plainService hides the fake's LoopService methods.
type plainService struct{ rebound.Service }

func TestLoopUnsupportedService(t *testing.T) {
	f := loopFake()
	for _, args := range [][]string{{"reprotect", "web1"}, {"failback", "web1"}, {"preflight", "web1"}} {
		r := runCLI(t, plainService{f}, args...)
		wantCode(t, r, ExitFailed)
		if !strings.Contains(r.stderr, "cannot reprotect, fail back or run preflight checks") {
			t.Fatalf("%q: stderr %q", args, r.stderr)
		}
	}
	wantCalls(t, f)
}

func TestPreflight(t *testing.T) {
	report := func(ok bool) *rebound.PreflightReport {
		return &rebound.PreflightReport{Machine: "web1", Operation: "failback", OK: ok, Checks: []rebound.PreflightCheck{
			{Name: "home-site-online", OK: true, Message: "site a is online"},
			{Name: "replicated", OK: ok, Message: "backlog 0B"},
		}}
	}
	for _, ok := range []bool{true, false} {
		f := &fakeService{PreflightFn: func(machine, op string) (*rebound.PreflightReport, error) { return report(ok), nil }}
		want := map[bool]int{true: ExitOK, false: ExitFailed}[ok]

		r := runCLI(t, f, "preflight", "web1", "--operation", "failback")
		wantCode(t, r, want)
		wantCalls(t, f, "Preflight web1 failback")
		lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
		okCell := map[bool]string{true: "ok", false: "FAIL"}[ok]
		if len(lines) != 6 || strings.Join(strings.Fields(lines[3]), " ") != "NAME OK MESSAGE" ||
			strings.Join(strings.Fields(lines[4]), " ") != "home-site-online ok site a is online" ||
			strings.Join(strings.Fields(lines[5]), " ") != "replicated "+okCell+" backlog 0B" {
			t.Fatalf("table:\n%s", r.stdout)
		}
		if ok && r.stderr != "" || !ok && r.stderr != "rebound: preflight failback web1: 1 of 2 checks failed\n" {
			t.Fatalf("stderr %q", r.stderr)
		}

		// JSON: the report alone on stdout, even when a check failed.
		f.calls = nil
		r = runCLI(t, f, "preflight", "web1", "-o", "json")
		wantCode(t, r, want)
		wantCalls(t, f, "Preflight web1 ")
		if got := decode[rebound.PreflightReport](t, r.stdout); got.OK != ok || len(got.Checks) != 2 || got.Checks[1].OK != ok {
			t.Fatalf("json %+v", got)
		}
	}
	// An error (not a failed check) keeps its own exit code.
	f := &fakeService{PreflightFn: func(string, string) (*rebound.PreflightReport, error) {
		return nil, rebound.Errorf(rebound.ENOTFOUND, "machine %q not found", "nope")
	}}
	wantCode(t, runCLI(t, f, "preflight", "nope"), ExitNotFound)
}

func resyncJob(state string, sent int64, eta float64) rebound.Job {
	return rebound.Job{Type: "reprotect", Machine: "web1", State: state, Step: "resync", Progress: float64(sent) / float64(41<<20),
		BytesCompared: 4 << 30, BytesSent: sent, BytesTotal: 41<<20 + 200<<10, ETASeconds: eta}
}

func TestJobResyncFigures(t *testing.T) {
	j := resyncJob(rebound.JobRunning, 40<<20, 3.4)
	f := &fakeService{GetJobFn: func(id string) (*rebound.Job, error) { j.ID = id; return &j, nil }}
	r := runCLI(t, f, "job", "show", "j1")
	wantCode(t, r, 0)
	if !strings.Contains(r.stdout, "sent 40MiB of 41.2MiB, compared 4GiB, ETA 3s") {
		t.Fatalf("table:\n%s", r.stdout)
	}
	r = runCLI(t, f, "job", "show", "j1", "-o", "json")
	if got := decode[rebound.Job](t, r.stdout); got.BytesSent != 40<<20 || got.BytesTotal != j.BytesTotal || got.ETASeconds != 3.4 || got.BytesCompared != 4<<30 {
		t.Fatalf("json %+v", got)
	}
	// A job without figures shows none.
	j = rebound.Job{Type: "commit", State: rebound.JobSucceeded}
	if r := runCLI(t, f, "job", "show", "j1"); strings.Contains(r.stdout, "Resync") {
		t.Fatalf("table:\n%s", r.stdout)
	}

	// --wait lines carry the figures.
	f = &fakeService{
		ReprotectFn: func(rebound.ReprotectRequest) (*rebound.Job, error) {
			return &rebound.Job{ID: "j2", Type: "reprotect", Machine: "web1", State: rebound.JobQueued}, nil
		},
		GetJobFn: jobScript(
			resyncJob(rebound.JobRunning, 10<<20, 30),
			resyncJob(rebound.JobSucceeded, 41<<20+200<<10, 0),
		),
	}
	r = runCLI(t, f, "reprotect", "web1", "--wait")
	wantCode(t, r, 0)
	if !strings.Contains(r.stderr, "job j2 running: resync (24%, sent 10MiB of 41.2MiB, compared 4GiB, ETA 30s)") ||
		!strings.Contains(r.stdout, "sent 41.2MiB of 41.2MiB, compared 4GiB\n") {
		t.Fatalf("stderr %q\nstdout %q", r.stderr, r.stdout)
	}
}

func TestResyncProgressBar(t *testing.T) {
	t.Setenv("XDG_CONFIG_HOME", t.TempDir())
	t.Setenv(EnvServer, "https://x")
	f := &fakeService{
		ReprotectFn: func(rebound.ReprotectRequest) (*rebound.Job, error) {
			return &rebound.Job{ID: "j3", Type: "reprotect", Machine: "web1", State: rebound.JobQueued}, nil
		},
		GetJobFn: jobScript(
			resyncJob(rebound.JobRunning, 20<<20, 12),
			resyncJob(rebound.JobRunning, 20<<20, 12),
			resyncJob(rebound.JobRunning, 20<<20, 12),
			resyncJob(rebound.JobRunning, 20<<20, 12),
			resyncJob(rebound.JobRunning, 20<<20, 12),
			resyncJob(rebound.JobSucceeded, 41<<20+200<<10, 0),
		),
	}
	var out bytes.Buffer
	var errb syncBuffer
	c := NewCLI(nil, &out, &errb)
	c.NewService = func(*ClientConfig) (rebound.Service, error) { return f, nil }
	c.PollInterval = 50 * time.Millisecond
	c.IsTerminal = func(io.Writer) bool { return true }
	if code := c.Run(context.Background(), []string{"reprotect", "web1", "--wait"}); code != 0 {
		t.Fatalf("code %d, stderr %q", code, errb.String())
	}
	if s := errb.String(); !strings.Contains(s, "reprotect web1") || !strings.Contains(s, "resync (sent 20MiB of 41.2MiB, compared 4GiB, ETA 12s)") {
		t.Fatalf("bar: %q", s)
	}
}

// TestLoopOverHTTP drives the loop verbs through the real REST server and
// client: with a LoopService they work, without one they exit 1 with the
// server's 501 message.
func TestLoopOverHTTP(t *testing.T) {
	f := loopFake()
	f.PreflightFn = func(machine, op string) (*rebound.PreflightReport, error) {
		return &rebound.PreflightReport{Machine: machine, Operation: op, OK: op != "failover",
			Checks: []rebound.PreflightCheck{{Name: "x", OK: op != "failover", Message: "m"}}}, nil
	}
	auth := func(ctx context.Context, tok string) (rebound.Principal, error) {
		return rebound.Principal{User: "admin", Role: rebound.RoleAdmin, Via: "token"}, nil
	}
	withLoop := httptest.NewTLSServer((&rhttp.Server{Service: f, Loop: f, Authenticate: auth}).Handler())
	defer withLoop.Close()
	without := httptest.NewTLSServer((&rhttp.Server{Service: f, Authenticate: auth}).Handler())
	defer without.Close()

	dir := clearEnv(t)
	ca := filepath.Join(dir, "ca.crt")
	os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: withLoop.Certificate().Raw}), 0o644)
	run := func(url string, args ...string) result {
		var out, errb bytes.Buffer
		c := NewCLI(nil, &out, &errb)
		c.PollInterval = time.Millisecond
		c.IsTerminal = func(io.Writer) bool { return false }
		code := c.Run(context.Background(), append(args, "--server", url, "--token", "t", "--ca", ca))
		return result{code, out.String(), errb.String()}
	}

	r := run(withLoop.URL, "reprotect", "web1", "--wait-ready", "--verify", "-o", "json")
	wantCode(t, r, 0)
	if j := decode[rebound.Job](t, r.stdout); j.Type != "reprotect" || j.Machine != "web1" {
		t.Fatalf("json %+v", j)
	}
	r = run(withLoop.URL, "failback", "web1", "--point", "p7")
	wantCode(t, r, 0)
	wantCalls(t, f, "Reprotect {Machine:web1 To: Policy: Verify:true WaitReady:15m0s Keep:}",
		"Failback {Machine:web1 Point:p7 Planned:false}")
	wantCode(t, run(withLoop.URL, "preflight", "web1", "--operation", "reprotect"), ExitOK)
	r = run(withLoop.URL, "preflight", "web1", "--operation", "failover", "-o", "json")
	wantCode(t, r, ExitFailed)
	if rep := decode[rebound.PreflightReport](t, r.stdout); rep.OK || rep.Operation != "failover" {
		t.Fatalf("json %+v", rep)
	}

	f.calls = nil
	for _, args := range [][]string{{"reprotect", "web1"}, {"failback", "web1"}, {"preflight", "web1"}} {
		r := run(without.URL, args...)
		wantCode(t, r, ExitFailed)
		if !strings.Contains(r.stderr, args[0]+" is not implemented by this server") {
			t.Fatalf("%q: stderr %q", args, r.stderr)
		}
	}
	wantCalls(t, f)
}

func TestMachineShowPreviousSite(t *testing.T) {
	m := sampleMachine()
	m.ActiveSite, m.PreviousSite, m.TestFailover = "b", "a", nil
	f := &fakeService{GetMachineFn: func(string) (*rebound.Machine, error) { return m, nil }}
	r := runCLI(t, f, "machine", "show", "web1")
	wantCode(t, r, 0)
	if !strings.Contains(r.stdout, "Previous site:  a\n") {
		t.Fatalf("table:\n%s", r.stdout)
	}
	r = runCLI(t, f, "machine", "show", "web1", "-o", "json")
	if got := decode[rebound.Machine](t, r.stdout); got.PreviousSite != "a" {
		t.Fatalf("json %+v", got)
	}
	m.PreviousSite = ""
	if r := runCLI(t, f, "machine", "show", "web1"); strings.Contains(r.stdout, "Previous site") {
		t.Fatalf("table:\n%s", r.stdout)
	}
}
