package failpoint

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestParseErrors(t *testing.T) {
	for _, spec := range []string{"a", "=kill", "a=sleep", "a=pause()", "a=pause(/x"} {
		_, err := Parse(spec)
		if err == nil || !strings.Contains(err.Error(), "kill or pause(PATH)") && !strings.Contains(err.Error(), "pause needs a file path") {
			t.Errorf("Parse(%q): %v, want an error naming the valid actions", spec, err)
		}
	}
	got, err := Parse(" a=kill ; b/c d=pause(/tmp/x) ;")
	if err != nil || len(got) != 2 || got["a"] == nil || got["b/c d"] == nil {
		t.Fatalf("Parse of two entries: %v %v", got, err)
	}
}

func TestEnable(t *testing.T) {
	n := 0
	off := Enable("t/enable", func(context.Context) { n++ })
	Hit(context.Background(), "t/enable")
	Hit(context.Background(), "t/other")
	off()
	Hit(context.Background(), "t/enable")
	if n != 1 {
		t.Fatalf("hook ran %d times, want 1 (once while enabled)", n)
	}
}

// TestPause: the hitting goroutine blocks until the marker file is removed,
// and a pause parsed from a spec fires at the first hit only.
func TestPause(t *testing.T) {
	path := filepath.Join(t.TempDir(), "marker")
	fps, err := Parse("t/pause=pause(" + path + ")")
	if err != nil {
		t.Fatal(err)
	}
	off := Enable("t/pause", fps["t/pause"])
	defer off()
	done := make(chan struct{})
	go func() { Hit(context.Background(), "t/pause"); close(done) }()
	for {
		if b, err := os.ReadFile(path); err == nil {
			if string(b) != "t/pause\n" {
				t.Fatalf("marker holds %q", b)
			}
			break
		}
		select {
		case <-done:
			t.Fatal("Hit returned before the marker was removed")
		case <-time.After(5 * time.Millisecond):
		}
	}
	select {
	case <-done:
		t.Fatal("Hit returned while the marker exists")
	default:
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	<-done
	Hit(context.Background(), "t/pause") // the second hit passes straight through
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("second hit wrote the marker again: %v", err)
	}
}

// TestPauseContext: a cancelled context releases a pause.
func TestPauseContext(t *testing.T) {
	path := filepath.Join(t.TempDir(), "marker")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { Pause(ctx, "t/ctx", path); close(done) }()
	for _, err := os.Stat(path); err != nil; _, err = os.Stat(path) {
		time.Sleep(5 * time.Millisecond) // waiting for the marker, a state that stays
	}
	cancel()
	<-done
}

// TestKillFromEnv runs this test binary with the variable set: the process
// dies of SIGKILL at the point and not before.
func TestKillFromEnv(t *testing.T) {
	if os.Getenv("FAILPOINT_CHILD") != "" {
		os.Stdout.WriteString("before\n")
		Hit(context.Background(), "t/kill")
		os.Stdout.WriteString("after\n")
		os.Exit(0)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestKillFromEnv$")
	cmd.Env = append(os.Environ(), "FAILPOINT_CHILD=1", Env+"=t/kill=kill")
	out, err := cmd.Output()
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("child: %v, want killed", err)
	}
	ws := ee.Sys().(syscall.WaitStatus)
	if !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("child ended with %v, want SIGKILL", ws)
	}
	if string(out) != "before\n" {
		t.Fatalf("child printed %q, want only what it printed before the point", out)
	}
}

// TestBadEnv: a malformed variable stops the process with a message
// rather than being ignored.
func TestBadEnv(t *testing.T) {
	if os.Getenv("FAILPOINT_CHILD") != "" {
		Hit(context.Background(), "t/x")
		os.Exit(0)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestBadEnv$")
	cmd.Env = append(os.Environ(), "FAILPOINT_CHILD=1", Env+"=t/x=explode")
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), Env) || !strings.Contains(string(out), "kill or pause(PATH)") {
		t.Fatalf("child with a bad spec: %v %q", err, out)
	}
}
