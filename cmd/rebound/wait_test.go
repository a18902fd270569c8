package main

import (
	"bytes"
	"context"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/syncbuf"
)

// jobScript is a GetJob that returns the given states one per poll, then
// the last one forever.
func jobScript(steps ...rebound.Job) func(string) (*rebound.Job, error) {
	var mu sync.Mutex
	i := 0
	return func(id string) (*rebound.Job, error) {
		mu.Lock()
		defer mu.Unlock()
		j := steps[min(i, len(steps)-1)]
		i++
		j.ID = id
		return &j, nil
	}
}

func TestWaitSucceeds(t *testing.T) {
	f := &fakeService{
		FailoverFn: func(rebound.FailoverRequest) (*rebound.Job, error) {
			return &rebound.Job{ID: "j5", Type: "failover", Machine: "web1", State: rebound.JobQueued}, nil
		},
		GetJobFn: jobScript(
			rebound.Job{Type: "failover", State: rebound.JobRunning, Step: "resolve point", Progress: 0.1},
			rebound.Job{Type: "failover", State: rebound.JobRunning, Step: "resolve point", Progress: 0.2},
			rebound.Job{Type: "failover", State: rebound.JobRunning, Step: "activate", Progress: 0.6},
			rebound.Job{Type: "failover", State: rebound.JobSucceeded, Step: "activate", Progress: 1},
		),
	}
	r := runCLI(t, f, "failover", "web1", "--planned", "--wait", "-o", "json")
	wantCode(t, r, 0)
	wantCalls(t, f, "Failover {Machine:web1 Point:latest Planned:true}", "GetJob j5", "GetJob j5", "GetJob j5", "GetJob j5")
	if j := decode[rebound.Job](t, r.stdout); j.ID != "j5" || j.State != rebound.JobSucceeded {
		t.Fatalf("json %+v", j)
	}
	// One line per step change, not per poll.
	want := "job j5 queued (0%)\njob j5 running: resolve point (10%)\njob j5 running: activate (60%)\njob j5 succeeded: activate (100%)\n"
	if r.stderr != want {
		t.Fatalf("stderr:\n%s\nwant:\n%s", r.stderr, want)
	}
}

func TestWaitFails(t *testing.T) {
	for _, state := range []string{rebound.JobFailed, rebound.JobCancelled} {
		f := &fakeService{
			CommitFn: func(string) (*rebound.Job, error) {
				return &rebound.Job{ID: "j6", Type: "commit", Machine: "web1", State: rebound.JobRunning, Step: "flatten"}, nil
			},
			GetJobFn: jobScript(
				rebound.Job{Type: "commit", Machine: "web1", State: rebound.JobRunning, Step: "flatten", Progress: 0.5},
				rebound.Job{Type: "commit", Machine: "web1", State: state, Step: "flatten", Error: "disk full"},
			),
		}
		r := runCLI(t, f, "commit", "web1", "--wait")
		wantCode(t, r, ExitFailed)
		if !strings.Contains(r.stdout, state) || !strings.Contains(r.stdout, "disk full") {
			t.Fatalf("%s: table:\n%s", state, r.stdout)
		}
		if !strings.HasSuffix(r.stderr, "rebound: job j6 (commit web1) "+state+": disk full\n") {
			t.Fatalf("%s: stderr %q", state, r.stderr)
		}
		// With -o json stdout holds only the job (one JSON document).
		r = runCLI(t, f, "commit", "web1", "--wait", "-o", "json")
		wantCode(t, r, ExitFailed)
		if j := decode[rebound.Job](t, r.stdout); j.State != state || j.Error != "disk full" {
			t.Fatalf("%s: json %+v", state, j)
		}
	}
}

func TestWaitAlreadyDone(t *testing.T) {
	f := &fakeService{TestFailoverCleanupFn: func(string) (*rebound.Job, error) {
		return &rebound.Job{ID: "j7", Type: "test-failover-cleanup", State: rebound.JobSucceeded}, nil
	}}
	r := runCLI(t, f, "test-failover", "cleanup", "web1", "--wait")
	wantCode(t, r, 0)
	wantCalls(t, f, "TestFailoverCleanup web1") // no polling
}

func TestWaitRetriesUnavailable(t *testing.T) {
	n := 0
	f := &fakeService{
		ProtectFn: func(rebound.ProtectRequest) (*rebound.Job, error) {
			return &rebound.Job{ID: "j8", Type: "protect", State: rebound.JobRunning}, nil
		},
		GetJobFn: func(id string) (*rebound.Job, error) {
			n++
			if n <= 3 {
				return nil, rebound.Errorf(rebound.EUNAVAILABLE, "server restarting")
			}
			return &rebound.Job{ID: id, Type: "protect", State: rebound.JobSucceeded}, nil
		},
	}
	r := runCLI(t, f, "protect", "web1", "--to", "b", "--wait")
	wantCode(t, r, 0)
	if n != 4 {
		t.Fatalf("polls %d", n)
	}

	// A server that stays away ends the wait with exit 5.
	f.GetJobFn = func(id string) (*rebound.Job, error) {
		return nil, rebound.Errorf(rebound.EUNAVAILABLE, "connection refused")
	}
	r = runCLI(t, f, "protect", "web1", "--to", "b", "--wait")
	wantCode(t, r, ExitUnavailable)
	// Other errors end it at once.
	f.GetJobFn = func(id string) (*rebound.Job, error) {
		return nil, rebound.Errorf(rebound.ENOTFOUND, "job %s not found", id)
	}
	r = runCLI(t, f, "protect", "web1", "--to", "b", "--wait")
	wantCode(t, r, ExitNotFound)
}

func TestWaitInterrupted(t *testing.T) {
	t.Setenv("XDG_CONFIG_HOME", t.TempDir())
	t.Setenv(EnvServer, "https://x")
	ctx, cancel := context.WithCancel(context.Background())
	polls := 0
	f := &fakeService{
		CommitFn: func(string) (*rebound.Job, error) {
			return &rebound.Job{ID: "j9", Type: "commit", State: rebound.JobRunning}, nil
		},
		GetJobFn: func(id string) (*rebound.Job, error) {
			if polls++; polls == 3 {
				cancel()
			}
			return &rebound.Job{ID: id, Type: "commit", State: rebound.JobRunning}, nil
		},
	}
	var out, errb bytes.Buffer
	c := NewCLI(nil, &out, &errb)
	c.NewService = func(*ClientConfig) (rebound.Service, error) { return f, nil }
	c.PollInterval = time.Millisecond
	c.IsTerminal = func(io.Writer) bool { return false }
	if code := c.Run(ctx, []string{"commit", "web1", "--wait"}); code != ExitFailed {
		t.Fatalf("code %d", code)
	}
	if !strings.Contains(errb.String(), "job j9 continues on the server (rebound job wait j9)") {
		t.Fatalf("stderr %q", errb.String())
	}
}

// syncBuffer is a log sink safe for concurrent writers.
type syncBuffer = syncbuf.Buffer

func TestWaitProgressBar(t *testing.T) {
	t.Setenv("XDG_CONFIG_HOME", t.TempDir())
	t.Setenv(EnvServer, "https://x")
	for _, final := range []string{rebound.JobSucceeded, rebound.JobFailed} {
		f := &fakeService{
			ProtectFn: func(rebound.ProtectRequest) (*rebound.Job, error) {
				return &rebound.Job{ID: "j10", Type: "protect", Machine: "web1", State: rebound.JobQueued}, nil
			},
			GetJobFn: jobScript(
				rebound.Job{Type: "protect", Machine: "web1", State: rebound.JobRunning, Step: "initial copy", Progress: 0.4},
				rebound.Job{Type: "protect", Machine: "web1", State: rebound.JobRunning, Step: "initial copy", Progress: 0.8},
				rebound.Job{Type: "protect", Machine: "web1", State: final, Step: "wait first point", Progress: 1},
			),
		}
		var out bytes.Buffer
		var errb syncBuffer
		c := NewCLI(nil, &out, &errb)
		c.NewService = func(*ClientConfig) (rebound.Service, error) { return f, nil }
		c.PollInterval = 50 * time.Millisecond // let mpb render between polls
		c.IsTerminal = func(io.Writer) bool { return true }
		code := c.Run(context.Background(), []string{"protect", "web1", "--to", "b", "--wait"})
		want := map[string]int{rebound.JobSucceeded: 0, rebound.JobFailed: ExitFailed}[final]
		if code != want {
			t.Fatalf("%s: code %d, stderr %q", final, code, errb.String())
		}
		s := errb.String()
		if !strings.Contains(s, "protect web1") || !strings.Contains(s, "%") {
			t.Fatalf("%s: no bar on stderr: %q", final, s)
		}
		if final == rebound.JobSucceeded && !strings.Contains(s, "100 %") {
			t.Fatalf("bar did not complete: %q", s)
		}
		if strings.Contains(s, "job j10 running") {
			t.Fatalf("line output on a terminal: %q", s)
		}
		if !strings.Contains(out.String(), final) {
			t.Fatalf("%s: stdout %q", final, out.String())
		}
	}
}

// TestWaitSuspended: --wait on a job that suspends at a manual step says
// what it waits for and the command that goes on, once, and keeps waiting.
func TestWaitSuspended(t *testing.T) {
	f := &fakeService{
		GetJobFn: jobScript(
			rebound.Job{Type: "plan-failover", State: rebound.JobSuspended, Step: "stage web",
				Steps: []rebound.JobStep{{Name: "stage web", State: rebound.JobRunning, Message: "manual step: switch the DNS"}}},
			rebound.Job{Type: "plan-failover", State: rebound.JobSuspended, Step: "stage web",
				Steps: []rebound.JobStep{{Name: "stage web", State: rebound.JobRunning, Message: "manual step: switch the DNS"}}},
			rebound.Job{Type: "plan-failover", State: rebound.JobSucceeded, Step: "stage web", Progress: 1},
		),
	}
	r := runCLI(t, f, "job", "wait", "j7")
	wantCode(t, r, 0)
	want := "job j7 suspended: stage web (0%)\nmanual step: switch the DNS; then: rebound job resume j7\njob j7 succeeded: stage web (100%)\n"
	if r.stderr != want {
		t.Fatalf("stderr:\n%s\nwant:\n%s", r.stderr, want)
	}
}
