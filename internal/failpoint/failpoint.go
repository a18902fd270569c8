// Package failpoint lets tests stop or kill a process at a named point in
// its code, so a fault lands exactly there instead of in a timing window.
//
// Code marks a point with Hit(ctx, name). Nothing happens unless a test
// enabled the point: in-process with Enable, or in a real binary through
// the REBOUND_FAILPOINTS environment variable, read once at the first Hit:
//
//	REBOUND_FAILPOINTS='server/job/failback/drain=pause(/tmp/x/drain);server/job/reprotect/resync=kill'
//
// Actions (each fires at the first hit only, once per process):
//
//	kill         the process sends itself SIGKILL (kill -9: no cleanup, no flush)
//	pause(PATH)  the process writes PATH and blocks until PATH is removed
//	             (or the caller's context ends); a test waits for PATH,
//	             does its fault, and removes PATH to let the process go on
//
// Without the variable and without Enable, Hit is one atomic load.
package failpoint

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Env is the environment variable real binaries read their failpoints from.
const Env = "REBOUND_FAILPOINTS"

var (
	active  atomic.Bool // any point enabled, by Enable or by Env
	envOnce sync.Once

	mu     sync.Mutex
	points = map[string]func(ctx context.Context){}
)

func init() {
	// Set before any Hit so the fast path sees it.
	if os.Getenv(Env) != "" {
		active.Store(true)
	}
}

// Hit runs the action enabled for name, if any.
func Hit(ctx context.Context, name string) {
	if !active.Load() {
		return
	}
	envOnce.Do(loadEnv)
	mu.Lock()
	fn := points[name]
	mu.Unlock()
	if fn != nil {
		if ctx == nil {
			ctx = context.Background()
		}
		fn(ctx)
	}
}

// Enable makes fn run at every Hit of name in this process, until the
// returned func is called. For in-process tests; fn runs on the hitting
// goroutine, so blocking in it stops that code path there.
func Enable(name string, fn func(ctx context.Context)) (disable func()) {
	envOnce.Do(loadEnv)
	mu.Lock()
	points[name] = fn
	active.Store(true)
	mu.Unlock()
	return func() {
		mu.Lock()
		delete(points, name)
		mu.Unlock()
	}
}

// loadEnv parses Env. A malformed value stops the process: only tests set
// it, and a silently ignored failpoint would make them wait for nothing.
func loadEnv() {
	spec := os.Getenv(Env)
	if spec == "" {
		return
	}
	parsed, err := Parse(spec)
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", Env, err)
		os.Exit(2)
	}
	mu.Lock()
	for name, fn := range parsed {
		points[name] = fn
	}
	mu.Unlock()
}

// Parse reads a failpoint spec, name=action entries separated by ';'.
func Parse(spec string) (map[string]func(ctx context.Context), error) {
	out := map[string]func(ctx context.Context){}
	for _, entry := range strings.Split(spec, ";") {
		entry = strings.TrimSpace(entry)
		if entry == "" {
			continue
		}
		name, action, ok := strings.Cut(entry, "=")
		name, action = strings.TrimSpace(name), strings.TrimSpace(action)
		if !ok || name == "" {
			return nil, fmt.Errorf("entry %q: want name=action (kill or pause(PATH))", entry)
		}
		switch {
		case action == "kill":
			out[name] = func(context.Context) { Kill() }
		case strings.HasPrefix(action, "pause(") && strings.HasSuffix(action, ")"):
			path := strings.TrimSuffix(strings.TrimPrefix(action, "pause("), ")")
			if path == "" {
				return nil, fmt.Errorf("entry %q: pause needs a file path, pause(/tmp/dir/name)", entry)
			}
			n := name
			out[name] = func(ctx context.Context) { Pause(ctx, n, path) }
		default:
			return nil, fmt.Errorf("entry %q: unknown action %q; use kill or pause(PATH)", entry, action)
		}
		out[name] = once(out[name])
	}
	return out, nil
}

// once runs fn at the first hit only: a retried job that passes the same
// point again must not stop there a second time with nobody to release it.
func once(fn func(ctx context.Context)) func(ctx context.Context) {
	var fired atomic.Bool
	return func(ctx context.Context) {
		if fired.CompareAndSwap(false, true) {
			fn(ctx)
		}
	}
}

// Kill ends the process with SIGKILL, as kill -9 would.
func Kill() {
	syscall.Kill(os.Getpid(), syscall.SIGKILL)
	select {} // the signal is delivered asynchronously; never run on
}

// Pause writes path (holding name) and blocks until path is removed or
// ctx ends. Waiting on the file, not on a clock: the test decides when the
// process goes on.
func Pause(ctx context.Context, name, path string) {
	if err := os.WriteFile(path, []byte(name+"\n"), 0o644); err != nil {
		fmt.Fprintf(os.Stderr, "failpoint %s: write %s: %v\n", name, path, err)
		return
	}
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for {
		if _, err := os.Stat(path); os.IsNotExist(err) {
			return
		}
		select {
		case <-ctx.Done():
			os.Remove(path)
			return
		case <-t.C:
		}
	}
}
