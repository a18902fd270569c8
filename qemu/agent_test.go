package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

// fakeAgent speaks qemu-ga's protocol on a VM directory's agent socket,
// with the misbehaviours the driver must survive.
type fakeAgent struct {
	mu         sync.Mutex
	frozen     bool
	calls      []string
	dropSyncs  int           // ignore this many syncs
	delay      time.Duration // read nothing for this long (port not open yet)
	stale      bool          // send stale answers before each sync's answer
	lostFreeze bool          // freeze, but never answer
	shutdown   bool
}

func (f *fakeAgent) serve(t *testing.T, dir string) {
	l, err := net.Listen("unix", filepath.Join(dir, AgentSocket))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go f.conn(c)
		}
	}()
}

func (f *fakeAgent) conn(c net.Conn) {
	defer c.Close()
	f.mu.Lock()
	delay := f.delay
	f.delay = 0 // the port stays open once opened
	f.mu.Unlock()
	time.Sleep(delay)
	r := bufio.NewReader(c)
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			return
		}
		for len(line) > 0 && line[0] == 0xff {
			// The client resets the parser; qemu-ga 7.2 answers with an
			// error quoting the raw byte.
			line = line[1:]
			c.Write([]byte(`{"error": {"class": "GenericError", "desc": "JSON parse error, stray '` + "\xff" + `'"}}` + "\n"))
		}
		var req struct {
			Execute   string `json:"execute"`
			Arguments struct {
				ID int64 `json:"id"`
			} `json:"arguments"`
		}
		if json.Unmarshal(line, &req) != nil {
			fmt.Fprintf(c, `{"error":{"class":"GenericError","desc":"bad json"}}`+"\n")
			continue
		}
		f.mu.Lock()
		f.calls = append(f.calls, req.Execute)
		var out string
		switch req.Execute {
		case "guest-sync-delimited":
			if f.dropSyncs > 0 {
				f.dropSyncs--
				break
			}
			if f.stale {
				out = `{"return": 2}` + "\n" + "\xff" + `{"return": 7}` + "\n"
			}
			out += fmt.Sprintf("\xff{\"return\": %d}\n", req.Arguments.ID)
		case "guest-ping":
			out = `{"return": {}}` + "\n"
		case "guest-fsfreeze-freeze":
			if f.frozen {
				out = `{"error":{"class":"GenericError","desc":"the agent is in frozen state"}}` + "\n"
				break
			}
			f.frozen = true
			if !f.lostFreeze {
				out = `{"return": 2}` + "\n"
			}
		case "guest-fsfreeze-thaw":
			n := 0
			if f.frozen {
				n = 2
			}
			f.frozen = false
			out = fmt.Sprintf(`{"return": %d}`+"\n", n)
		case "guest-fsfreeze-status":
			st := "thawed"
			if f.frozen {
				st = "frozen"
			}
			out = fmt.Sprintf(`{"return": %q}`+"\n", st)
		case "guest-shutdown":
			f.shutdown = true // no answer on success
		}
		f.mu.Unlock()
		c.Write([]byte(out))
	}
}

func (f *fakeAgent) state() (frozen bool, calls []string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.frozen, append([]string(nil), f.calls...)
}

func fakeVM(t *testing.T, f *fakeAgent) *VM {
	dir := shortDir(t)
	f.serve(t, dir)
	return newVM(VMConfig{Name: "fake", Dir: dir}, 0)
}

func TestAgentProtocol(t *testing.T) {
	ctx := context.Background()
	within := func(d time.Duration) context.Context {
		ctx, cancel := context.WithTimeout(ctx, d)
		t.Cleanup(cancel)
		return ctx
	}

	t.Run("LateAgent", func(t *testing.T) {
		// The agent reads the first sync only after the second was sent:
		// both are answered, then the command.
		f := &fakeAgent{delay: syncRetry + 300*time.Millisecond}
		v := fakeVM(t, f)
		if err := v.Ping(within(5 * time.Second)); err != nil {
			t.Fatal(err)
		}
		if _, calls := f.state(); len(calls) != 3 {
			t.Fatalf("calls %v", calls)
		}
		if st, err := v.FreezeStatus(within(time.Second)); err != nil || st != "thawed" {
			t.Fatalf("status %q %v", st, err)
		}
	})

	t.Run("StaleAnswersAndDroppedSync", func(t *testing.T) {
		f := &fakeAgent{stale: true, dropSyncs: 1}
		v := fakeVM(t, f)
		start := time.Now()
		n, err := v.Freeze(within(5 * time.Second))
		if err != nil || n != 2 {
			t.Fatalf("freeze: %d %v", n, err)
		}
		if el := time.Since(start); el < syncRetry || el > 3*syncRetry {
			t.Fatalf("the dropped sync was resent after %v", el)
		}
		if st, err := v.FreezeStatus(within(time.Second)); err != nil || st != "frozen" {
			t.Fatalf("status %q %v", st, err)
		}
		// The agent refuses a second freeze: its message reaches the caller.
		if _, err := v.Freeze(within(time.Second)); rebound.ErrorCode(err) != rebound.ECONFLICT || !strings.Contains(err.Error(), "frozen state") {
			t.Fatalf("second freeze: %v", err)
		}
		if n, err := v.Thaw(within(time.Second)); err != nil || n != 2 {
			t.Fatalf("thaw: %d %v", n, err)
		}
	})

	t.Run("LostFreezeAnswerIsThawed", func(t *testing.T) {
		f := &fakeAgent{lostFreeze: true}
		v := fakeVM(t, f)
		cut := false
		err := v.FreezeThaw(within(time.Second), func() error { cut = true; return nil })
		if rebound.ErrorCode(err) != rebound.EUNAVAILABLE || cut {
			t.Fatalf("FreezeThaw: %v, cut ran %v", err, cut)
		}
		frozen, calls := f.state()
		if frozen || calls[len(calls)-1] != "guest-fsfreeze-thaw" {
			t.Fatalf("left frozen %v, calls %v", frozen, calls)
		}
	})

	t.Run("CutErrorAndThaw", func(t *testing.T) {
		f := &fakeAgent{}
		v := fakeVM(t, f)
		boom := errors.New("boom")
		var during string
		err := v.FreezeThaw(within(2*time.Second), func() error {
			during, _ = v.FreezeStatus(within(time.Second))
			return boom
		})
		if !errors.Is(err, boom) || during != "frozen" {
			t.Fatalf("FreezeThaw: %v, during %q", err, during)
		}
		if frozen, _ := f.state(); frozen {
			t.Fatal("left frozen")
		}
	})

	t.Run("Shutdown", func(t *testing.T) {
		f := &fakeAgent{}
		v := fakeVM(t, f)
		if err := v.agentShutdown(within(2 * time.Second)); err != nil {
			t.Fatal(err)
		}
		if _, calls := f.state(); calls[len(calls)-1] != "guest-shutdown" || !f.shutdown {
			t.Fatalf("calls %v", calls)
		}
	})

	t.Run("NoAgentListening", func(t *testing.T) {
		v := newVM(VMConfig{Name: "none", Dir: shortDir(t)}, 0)
		start := time.Now()
		if err := v.Ping(within(time.Second)); rebound.ErrorCode(err) != rebound.EUNAVAILABLE || time.Since(start) > time.Second+200*time.Millisecond {
			t.Fatalf("ping: %v after %v", err, time.Since(start))
		}
		v.cfg.NoAgent = true
		if _, err := v.Freeze(ctx); rebound.ErrorCode(err) != rebound.EUNAVAILABLE || !strings.Contains(err.Error(), "no guest agent channel") {
			t.Fatalf("freeze: %v", err)
		}
	})
}
