package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/site"
)

// TestUnprotectKeepReplica: unprotect --keep-replica leaves the machine
// active and unprotected at primary and a detached copy at recovery whose
// disks hash equal to the source at unprotect time; later writes do not
// reach it; machine delete removes its files, and a protect to the site
// replaces it with a full copy.
func TestUnprotectKeepReplica(t *testing.T) {
	ctx := context.Background()
	up, svc := testUp(t, t.TempDir())
	for _, name := range []string{"vm1", "vm2"} {
		m, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: name, Site: "primary", Disks: []int64{16 << 20, 8 << 20}})
		if err != nil {
			t.Fatal(err)
		}
		nbdWrite(t, m.Disks[0].NBD, 4<<20)
		waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: name, To: "recovery"}))
	}
	// Written while protected: only the stream carries it to recovery.
	m := getMachine(t, svc, "vm1")
	nbdWrite(t, m.Disks[0].NBD, 2<<20)
	nbdWrite(t, m.Disks[1].NBD, 3<<20)
	want := []string{nbdSum(t, m.Disks[0].NBD), nbdSum(t, m.Disks[1].NBD)}

	r := runCLI(t, svc, "unprotect", "vm1", "--keep-replica", "--wait", "-o", "json")
	wantCode(t, r, ExitOK)
	if j := decode[rebound.Job](t, r.stdout); j.Type != "unprotect" || j.State != rebound.JobSucceeded || len(j.Steps) != 3 || j.Steps[2].Name != "keep replica" {
		t.Fatalf("unprotect --keep-replica job %+v", j)
	}
	m = getMachine(t, svc, "vm1")
	if m.State != rebound.MachineUnprotected || m.Protection != nil || m.ActiveSite != "primary" || m.Health != rebound.HealthNormal {
		t.Fatalf("after unprotect --keep-replica: state %s at %s, protection %+v, health %s", m.State, m.ActiveSite, m.Protection, m.Health)
	}
	if len(m.DetachedCopies) != 1 || m.DetachedCopies[0].Site != "recovery" || m.DetachedCopies[0].Point.ID == "" || len(m.DetachedCopies[0].Paths) != 2 {
		t.Fatalf("detached copies %+v", m.DetachedCopies)
	}
	dc := m.DetachedCopies[0]
	if p, r := copyRole(t, up, "primary", "vm1"), copyRole(t, up, "recovery", "vm1"); p != "active" || r != "detached" {
		t.Fatalf("after unprotect --keep-replica primary holds vm1 as %q, recovery as %q; want active and detached", p, r)
	}
	for i, path := range dc.Paths {
		if got := nbdSum(t, m.Disks[i].NBD); got != want[i] {
			t.Fatalf("vm1's disk %d changed across unprotect: %s, want %s", i, got, want[i])
		}
		if got := nbdSum(t, path); got != want[i] {
			t.Fatalf("detached copy of disk %d (%s) hashes %s, want %s (the source at unprotect)", i, path, got, want[i])
		}
	}
	hasEvent(t, svc, "vm1", "protection.stopped", "kept as a detached copy", dc.Point.ID)
	show := runCLI(t, svc, "machine", "show", "vm1")
	wantCode(t, show, ExitOK)
	if !strings.Contains(show.stdout, "Detached copy:") || !strings.Contains(show.stdout, "at recovery, point "+dc.Point.ID) || !strings.Contains(show.stdout, dc.Paths[1]) {
		t.Fatalf("machine show lacks the detached copy:\n%s", show.stdout)
	}

	// The copy is detached: writes at primary do not reach it.
	nbdWrite(t, m.Disks[0].NBD, 1<<20)
	if got := nbdSum(t, dc.Paths[0]); got != want[0] {
		t.Fatalf("a write at primary reached the detached copy: %s, want %s", got, want[0])
	}
	wantCode(t, runCLI(t, svc, "unprotect", "vm1", "--keep-replica"), ExitOK) // nothing to do
	if m := getMachine(t, svc, "vm1"); len(m.DetachedCopies) != 1 {
		t.Fatalf("a second unprotect changed the detached copies: %+v", m.DetachedCopies)
	}

	reopenDetached(t, up, "vm1")

	// Delete removes the copy at recovery too.
	wantCode(t, runCLI(t, svc, "machine", "delete", "vm1"), ExitOK)
	if r := copyRole(t, up, "recovery", "vm1"); r != "" {
		t.Fatalf("after delete recovery holds vm1 as %q", r)
	}
	for _, path := range dc.Paths {
		if _, err := os.Stat(path); !os.IsNotExist(err) {
			t.Fatalf("detached disk %s survived machine delete: %v", path, err)
		}
	}

	// A protect to the site replaces the copy with a full copy.
	waitJob(t, svc)(svc.(rebound.LoopService).Unprotect(ctx, rebound.UnprotectRequest{Machine: "vm2", KeepReplica: true}))
	if m := getMachine(t, svc, "vm2"); len(m.DetachedCopies) != 1 || copyRole(t, up, "recovery", "vm2") != "detached" {
		t.Fatalf("vm2 after unprotect --keep-replica: %+v", m.DetachedCopies)
	}
	waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm2", To: "recovery"}))
	m = getMachine(t, svc, "vm2")
	if m.State != rebound.MachineProtected || len(m.DetachedCopies) != 0 || copyRole(t, up, "recovery", "vm2") != "target" {
		t.Fatalf("vm2 protected again: state %s, detached copies %+v", m.State, m.DetachedCopies)
	}
	hasEvent(t, svc, "vm2", "detached-copy.removed", "rebound protect vm2 --to recovery")
}

// reopenDetached opens a copy of the recovery site's state for name in a
// new site, as a restart does: the copy opens as detached, and the journal
// a crash after the detach was saved can leave is removed.
func reopenDetached(t *testing.T, up *UpMain, name string) {
	t.Helper()
	from := filepath.Join(up.Config.DataDir, "sites", "recovery")
	dir := t.TempDir()
	b, err := site.SavedState(from)
	if err != nil {
		t.Fatal(err)
	}
	var state struct {
		Version int              `json:"version"`
		Units   []map[string]any `json:"units"`
	}
	if err := json.Unmarshal(b, &state); err != nil {
		t.Fatal(err)
	}
	var keep []map[string]any
	for _, st := range state.Units {
		if st["name"] == name {
			keep = append(keep, st)
		}
	}
	if len(keep) != 1 || keep[0]["role"] != "detached" {
		t.Fatalf("recovery's saved state of %s: %v", name, keep)
	}
	state.Units = keep
	b, _ = json.Marshal(state)
	mdir := filepath.Join(dir, "machines", name)
	if err := os.MkdirAll(filepath.Join(mdir, "journal"), 0o700); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(filepath.Join(from, "machines", name))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if e.IsDir() {
			t.Fatalf("the detached copy's directory still holds %s/", e.Name())
		}
		data, err := os.ReadFile(filepath.Join(from, "machines", name, e.Name()))
		if err == nil {
			err = os.WriteFile(filepath.Join(mdir, e.Name()), data, 0o600)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []struct{ path, data string }{{filepath.Join(dir, "state.json"), string(b)}, {filepath.Join(mdir, "journal", "meta.json"), "{}"}} {
		if err := os.WriteFile(f.path, []byte(f.data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	s := site.New(site.Config{Name: "recovery", DataDir: dir})
	if err := s.Open(); err != nil {
		t.Fatalf("reopen a site holding a detached copy: %v", err)
	}
	defer s.Close()
	if ci, err := s.CopyInfo(context.Background(), name); err != nil || ci.Role != "detached" {
		t.Fatalf("reopened copy of %s: %+v %v", name, ci, err)
	}
	if _, err := os.Stat(filepath.Join(mdir, "journal")); !os.IsNotExist(err) {
		t.Fatalf("the leftover journal of a detached copy survived the reopen: %v", err)
	}
}
