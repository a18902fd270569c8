package main

import (
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

// TestMachineSet: only the flags given reach the server; "" clears; the
// table and JSON show the settings; bad values are usage errors (exit 2)
// that call nothing.
func TestMachineSet(t *testing.T) {
	var got rebound.SetMachineRequest
	f := &fakeService{SetMachineFn: func(req rebound.SetMachineRequest) (*rebound.Machine, error) {
		got = req
		return &rebound.Machine{Name: req.Name, Settings: rebound.MachineSettings{FreezeHook: "/f", Shutdown: "force", ShutdownTimeout: rebound.Duration(30 * time.Second)}}, nil
	}}
	r := runCLI(t, f, "machine", "set", "vm1", "--freeze-hook", "/f", "--shutdown", "force", "--shutdown-timeout", "30s")
	wantCode(t, r, 0)
	wantCalls(t, f, "SetMachine vm1")
	force, freeze, d := "force", "/f", rebound.Duration(30*time.Second)
	if want := (rebound.SetMachineRequest{Name: "vm1", FreezeHook: &freeze, Shutdown: &force, ShutdownTimeout: &d}); !reflect.DeepEqual(got, want) {
		t.Fatalf("request %+v", got)
	}
	wantLines(t, r.stdout, "Freeze hook: /f", "Thaw hook: -", "Shutdown: force, 30s")

	f.calls = nil
	r = runCLI(t, f, "machine", "set", "vm1", "--thaw-hook", "", "-o", "json")
	wantCode(t, r, 0)
	empty := ""
	if want := (rebound.SetMachineRequest{Name: "vm1", ThawHook: &empty}); !reflect.DeepEqual(got, want) {
		t.Fatalf("clear: request %+v", got)
	}
	if m := decode[rebound.Machine](t, r.stdout); m.Settings.FreezeHook != "/f" || m.Settings.ShutdownTimeout != d {
		t.Fatalf("json %+v", m)
	}

	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{nil, "nothing to set"},
		{[]string{"--shutdown", "hard"}, `--shutdown must be graceful or force, not "hard"`},
		{[]string{"--shutdown-timeout", "10ms"}, "--shutdown-timeout must be 1s to 24h"},
		{[]string{"--shutdown-timeout", "soon"}, "invalid argument"},
	} {
		f := &fakeService{}
		r := runCLI(t, f, append([]string{"machine", "set", "vm1"}, tc.args...)...)
		wantCode(t, r, ExitUsage)
		wantCalls(t, f)
		if !strings.Contains(r.stderr, tc.msg) {
			t.Errorf("%q: stderr %q, want %q", tc.args, r.stderr, tc.msg)
		}
	}
}

// TestPlannedShutdownFlags: --shutdown and --shutdown-timeout reach the
// planned failover and failback requests, and are usage errors where the
// operation is unplanned.
func TestPlannedShutdownFlags(t *testing.T) {
	var got rebound.FailoverRequest
	job := func(req rebound.FailoverRequest) (*rebound.Job, error) {
		got = req
		return &rebound.Job{ID: "j1", Type: "failover", Machine: req.Machine, State: rebound.JobRunning}, nil
	}
	f := &fakeService{FailoverFn: job, FailbackFn: job}
	want := rebound.ShutdownOptions{Mode: rebound.ShutdownForce, Timeout: rebound.Duration(5 * time.Second)}
	wantCode(t, runCLI(t, f, "failover", "vm1", "--planned", "--shutdown", "force", "--shutdown-timeout", "5s"), 0)
	if !got.Planned || got.Shutdown != want {
		t.Fatalf("failover request %+v", got)
	}
	wantCode(t, runCLI(t, f, "failback", "vm1", "--shutdown", "force", "--shutdown-timeout", "5s"), 0)
	if !got.Planned || got.Shutdown != want {
		t.Fatalf("failback request %+v", got)
	}
	wantCode(t, runCLI(t, f, "failback", "vm1"), 0)
	if got.Shutdown != (rebound.ShutdownOptions{}) {
		t.Fatalf("failback without flags sends %+v; the server picks the machine's settings", got.Shutdown)
	}
	for _, args := range [][]string{
		{"failover", "vm1", "--shutdown", "force"},
		{"failover", "vm1", "--planned", "--shutdown", "now"},
		{"failover", "vm1", "--planned", "--shutdown-timeout", "0s"},
		{"failback", "vm1", "--point", "latest", "--shutdown-timeout", "5s"},
	} {
		f := &fakeService{}
		r := runCLI(t, f, args...)
		wantCode(t, r, ExitUsage)
		wantCalls(t, f)
		if !strings.Contains(r.stderr, "shutdown") {
			t.Errorf("%q: stderr %q", args, r.stderr)
		}
	}
}
