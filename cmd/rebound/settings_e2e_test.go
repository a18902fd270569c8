package main

import (
	"context"
	"strings"
	"testing"

	"github.com/rebound-dr/rebound"
)

// TestMachineHooksUp runs the README's app-consistent point under `rebound
// up` (no site-wide hooks): a machine without hooks or guest agent is
// refused with the command that sets them; `machine set` stores the hooks
// with the machine, the source site runs freeze, then the cut, then thaw;
// the change is an event.
func TestMachineHooksUp(t *testing.T) {
	ctx := context.Background()
	_, svc := testUp(t, t.TempDir())
	freeze, thaw, log := hookScripts(t, t.TempDir())
	const size = 4 << 20
	o := newOracle(t, size, 7)
	src := createProtected(t, svc, "vm1", size, o)

	r := runCLI(t, svc, "point", "create", "vm1", "--app-consistent")
	wantCode(t, r, ExitConflict)
	if !strings.Contains(r.stderr, "rebound machine set vm1 --freeze-hook") {
		t.Fatalf("no hooks: stderr %q, want the command that sets them", r.stderr)
	}
	if got := readLines(t, log); len(got) != 0 {
		t.Fatalf("hooks ran before they were set: %v", got)
	}

	r = runCLI(t, svc, "machine", "set", "vm1", "--freeze-hook", freeze, "--thaw-hook", thaw, "-o", "json")
	wantCode(t, r, 0)
	if m := decode[rebound.Machine](t, r.stdout); m.Settings.FreezeHook != freeze || m.Settings.ThawHook != thaw {
		t.Fatalf("machine set: settings %+v", m.Settings)
	}
	if m := getMachine(t, svc, "vm1"); m.Settings.FreezeHook != freeze || m.Settings.ThawHook != thaw {
		t.Fatalf("stored settings %+v", m.Settings)
	}

	o.write(src, 20)
	r = runCLI(t, svc, "point", "create", "vm1", "--app-consistent", "-o", "json")
	wantCode(t, r, 0)
	p := decode[rebound.RecoveryPoint](t, r.stdout)
	if p.Kind != rebound.PointApp {
		t.Fatalf("point kind %q", p.Kind)
	}
	if got := readLines(t, log); strings.Join(got, ",") != "freeze_vm1,thaw_vm1" {
		t.Fatalf("hook log %v, want freeze then thaw", got)
	}
	if got, _ := svc.ListPoints(ctx, "vm1"); len(got) == 0 {
		t.Fatal("no points")
	}
	sel, err := svc.ListEvents(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, e := range sel {
		if e.Kind == "machine.set" && strings.Contains(e.Message, "freeze-hook=") {
			found = true
		}
	}
	if !found {
		t.Fatalf("no machine.set event in %+v", sel)
	}

	// Cleared hooks: refused again, nothing runs.
	wantCode(t, runCLI(t, svc, "machine", "set", "vm1", "--freeze-hook", "", "--thaw-hook", ""), 0)
	wantCode(t, runCLI(t, svc, "point", "create", "vm1", "--app-consistent"), ExitConflict)
	if got := readLines(t, log); len(got) != 2 {
		t.Fatalf("hooks ran after they were cleared: %v", got)
	}
}
