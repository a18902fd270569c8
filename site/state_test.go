package site

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"syscall"
	"testing"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/failpoint"
)

// unitsOf is every unit of s as the state files hold it, by name.
func unitsOf(s *Site) map[string]unitState {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[string]unitState{}
	for n, u := range s.units {
		out[n] = unitStateOf(u)
	}
	return out
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestStateSurvivesRestart: units added, changed in place (hooks, policy,
// fence) and removed are what the site holds after a restart. A change
// appends one record of its unit to state.log and leaves state.json as
// it was (its cost does not grow with the site); a log grown past the
// snapshot becomes a new snapshot at the next save, and a start folds
// the log into the snapshot.
func TestStateSurvivesRestart(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := testSite(t, "recovery", dir)
	for _, n := range []string{"a", "b", "c", "d"} {
		addTestUnit(t, s, n, unitFields{Role: RoleActive, Generation: "g-" + n}, map[string]int{n: 1}, n)
	}
	addTestUnit(t, s, "t", unitFields{Role: RoleTarget, Generation: "g-t", Spec: &rebound.ReplicationSpec{Machine: "t", Role: RoleTarget, StreamID: "t.1",
		Policy: rebound.DefaultPolicy()}}, map[string]int{"t": 2}, "t")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = testSite(t, "recovery", dir) // a start makes the snapshot
	snap := readFile(t, filepath.Join(dir, "state.json"))
	logSize := func() int64 {
		fi, err := os.Stat(filepath.Join(dir, stateLog))
		if err != nil {
			t.Fatal(err)
		}
		return fi.Size()
	}
	before := logSize()
	if err := s.SetHooks(ctx, "b", rebound.Hooks{Freeze: "/bin/freeze", Thaw: "/bin/thaw"}); err != nil {
		t.Fatal(err)
	}
	one := logSize() - before
	b, _ := json.Marshal(unitsOf(s)["b"])
	if one <= 0 || one > int64(len(b))+64 {
		t.Fatalf("a change of unit b appended %d bytes to the log; the unit is %d", one, len(b))
	}
	pol := rebound.DefaultPolicy()
	pol.Name = "gold"
	if err := s.SetPolicy(ctx, "t", pol); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Fence(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteMachine(ctx, "d"); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, filepath.Join(dir, "state.json")); !bytes.Equal(got, snap) {
		t.Fatalf("state.json was rewritten by a unit's change")
	}
	want := unitsOf(s)
	if _, ok := want["d"]; ok || want["b"].Members[0].Hooks.Freeze != "/bin/freeze" || want["t"].Spec.Policy.Name != "gold" || !want["c"].Fenced {
		t.Fatalf("the changes are not in the site: %+v", want)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = testSite(t, "recovery", dir)
	if got := unitsOf(s); !reflect.DeepEqual(got, want) {
		t.Fatalf("after a restart the site holds\n%+v\nwant\n%+v", got, want)
	}
	// The start folded the log into the snapshot.
	if n := logSize(); n != 0 {
		t.Fatalf("the log holds %d bytes after a start", n)
	}
	var st siteState
	if err := json.Unmarshal(readFile(t, filepath.Join(dir, "state.json")), &st); err != nil || st.Version != stateVersion || len(st.Units) != 4 || st.Seq < 5 {
		t.Fatalf("state.json after the start: version %d, seq %d, %d units (%v)", st.Version, st.Seq, len(st.Units), err)
	}
	// A log past the snapshot's size (the floor lowered) is compacted by
	// the next save.
	defer func(n int64) { minCompact = n }(minCompact)
	minCompact = 0
	snapSize := int64(len(readFile(t, filepath.Join(dir, "state.json"))))
	compacted := false
	for i := range 100 {
		if err := s.SetHooks(ctx, "a", rebound.Hooks{Freeze: "/bin/freeze-" + string(rune('a'+i%26))}); err != nil {
			t.Fatal(err)
		}
		if n := logSize(); n > snapSize+int64(one)*2 {
			t.Fatalf("the log grew to %d bytes past the snapshot's %d", n, snapSize)
		} else if n < int64(one) {
			compacted = true
		}
	}
	if !compacted {
		t.Fatal("the log was never compacted")
	}
	want = unitsOf(s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = testSite(t, "recovery", dir)
	defer s.Close()
	if got := unitsOf(s); !reflect.DeepEqual(got, want) {
		t.Fatalf("after compactions and a restart the site holds\n%+v\nwant\n%+v", got, want)
	}
}

// TestStateTornRecord: a record cut short at the log's end (a save killed
// inside its write, never acknowledged) is dropped; the records before it
// are read.
func TestStateTornRecord(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := testSite(t, "primary", dir)
	addTestUnit(t, s, "a", unitFields{Role: RoleActive, Generation: "g-a"}, map[string]int{"a": 1}, "a")
	if err := s.SetHooks(ctx, "a", rebound.Hooks{Freeze: "/bin/one"}); err != nil {
		t.Fatal(err)
	}
	want := unitsOf(s)
	logPath := filepath.Join(dir, stateLog)
	good := readFile(t, logPath)
	if err := s.SetHooks(ctx, "a", rebound.Hooks{Freeze: "/bin/two"}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	all := readFile(t, logPath)
	for _, cut := range []int{len(good) + 3, len(good) + 8, len(all) - 1} {
		if err := os.WriteFile(logPath, all[:cut], 0o600); err != nil {
			t.Fatal(err)
		}
		s = testSite(t, "primary", dir)
		if got := unitsOf(s); !reflect.DeepEqual(got, want) {
			t.Fatalf("log cut at %d of %d: the site holds %+v, want %+v", cut, len(all), got, want)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		// The start made a snapshot of it: only the log again for the next cut.
		if err := os.Remove(filepath.Join(dir, "state.json")); err != nil {
			t.Fatal(err)
		}
	}
}

// v2State is a site's state.json as rebound wrote it before state.log
// (version 2: every unit, rewritten whole by every save): an active
// machine, a released copy, a target.
const v2State = `{
  "version": 2,
  "units": [
    {"name": "x", "members": [{"name": "x", "disks": [{"name": "root", "size": 1048576}], "hooks": {"freeze": "/bin/true"}, "vm": {"cpus": 1, "memoryMiB": 64}, "power": "off"}],
     "role": "active", "generation": "g-x"},
    {"name": "y", "members": [{"name": "y", "disks": [{"name": "root", "size": 1048576}, {"name": "data", "size": 2097152}]}],
     "role": "released", "fenced": true, "generation": "g-y2", "parent": "g-y1", "diverged": true},
    {"name": "z", "members": [{"name": "z", "disks": [{"name": "root", "size": 1048576}]}], "role": "target", "generation": "g-z",
     "spec": {"machine": "z", "role": "target", "streamId": "s-z", "disks": [{"name": "root", "size": 1048576}], "peerSite": "primary", "policy": {"name": "p", "retention": 0}}}
  ]
}`

// v2Dir is a data directory holding v2State.
func v2Dir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "state.json"), []byte(v2State), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"x", "y", "z"} {
		if err := os.MkdirAll(filepath.Join(dir, "machines", n), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// checkV2Units checks that s holds v2State's units, open, and that the
// site runs: a change is saved in the log and read after a restart.
func checkV2Units(t *testing.T, dir string) {
	t.Helper()
	s := testSite(t, "recovery", dir)
	u := unitsOf(s)
	x, y, z := u["x"], u["y"], u["z"]
	if len(u) != 3 || x.Role != RoleActive || x.Generation != "g-x" || x.Members[0].Hooks.Freeze != "/bin/true" || x.Members[0].VM == nil ||
		y.Role != RoleReleased || !y.Fenced || !y.Diverged || y.Parent != "g-y1" || len(y.Members[0].Disks) != 2 ||
		z.Role != RoleTarget || z.Spec == nil || z.Spec.StreamID != "s-z" {
		t.Fatalf("the site holds %+v", u)
	}
	s.mu.Lock()
	opened := len(s.units["x"].members[0].files) == 1 && s.units["z"].journal != nil
	s.mu.Unlock()
	if !opened {
		t.Fatal("x's disk or z's journal is not open")
	}
	var st siteState
	if err := json.Unmarshal(readFile(t, filepath.Join(dir, "state.json")), &st); err != nil || st.Version != stateVersion || len(st.Units) != 3 {
		t.Fatalf("state.json is not version %d with 3 units: %v", stateVersion, err)
	}
	if err := s.SetHooks(context.Background(), "x", rebound.Hooks{Freeze: "/bin/after"}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = testSite(t, "recovery", dir)
	defer s.Close()
	if got := unitsOf(s)["x"].Members[0].Hooks.Freeze; got != "/bin/after" {
		t.Fatalf("x's hook after a restart: %q", got)
	}
}

// TestStateV2Migrates: a state.json of version 2 is read, written as a
// version 3 snapshot with an empty log at the first start, and the site
// runs on it.
func TestStateV2Migrates(t *testing.T) {
	checkV2Units(t, v2Dir(t))
}

// childEnv names the data directory TestStateChild opens.
const childEnv = "REBOUND_SITE_STATE_CHILD"

// TestStateChild is the child of TestStateMigrationKilled: it opens the
// site at $REBOUND_SITE_STATE_CHILD, where a failpoint kills it. Run
// alone it opens nothing.
func TestStateChild(t *testing.T) {
	dir := os.Getenv(childEnv)
	if dir == "" {
		return
	}
	s := testSite(t, "recovery", dir)
	s.Close()
	t.Fatal("the site opened: the failpoint did not kill it")
}

// TestStateMigrationKilled: a site killed (SIGKILL, a failpoint) in its
// first start's migration of a version 2 state, after the new snapshot is
// written but before it replaces state.json, or after it replaced it but
// before the log is emptied, leaves a state the next start reads and
// runs on. The same after a start killed folding a log of records.
func TestStateMigrationKilled(t *testing.T) {
	run := func(t *testing.T, dir, point string) {
		t.Helper()
		cmd := exec.Command(os.Args[0], "-test.run=^TestStateChild$", "-test.count=1")
		cmd.Env = append(os.Environ(), childEnv+"="+dir, failpoint.Env+"="+point+"=kill")
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
			t.Fatalf("the child was not killed at %s: %v\n%s", point, err, out)
		}
	}
	t.Run("written", func(t *testing.T) {
		dir := v2Dir(t)
		run(t, dir, "site/state/snapshot/written")
		if got := readFile(t, filepath.Join(dir, "state.json")); string(got) != v2State {
			t.Fatal("state.json changed before the rename")
		}
		if _, err := os.Stat(filepath.Join(dir, "state.json.tmp")); err != nil {
			t.Fatalf("no new snapshot written: %v", err)
		}
		checkV2Units(t, dir)
	})
	t.Run("renamed", func(t *testing.T) {
		dir := v2Dir(t)
		run(t, dir, "site/state/snapshot/renamed")
		var st siteState
		if err := json.Unmarshal(readFile(t, filepath.Join(dir, "state.json")), &st); err != nil || st.Version != stateVersion {
			t.Fatalf("state.json after the rename: %v", err)
		}
		checkV2Units(t, dir)
	})
	t.Run("log", func(t *testing.T) {
		// A version 3 site with records in its log; its next start is
		// killed after the new snapshot replaced state.json, the log not
		// yet emptied: its records are older than the snapshot.
		dir := v2Dir(t)
		s := testSite(t, "recovery", dir)
		for _, h := range []string{"/bin/1", "/bin/2", "/bin/3"} {
			if err := s.SetHooks(context.Background(), "y", rebound.Hooks{Freeze: h}); err != nil {
				t.Fatal(err)
			}
		}
		want := unitsOf(s)
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		run(t, dir, "site/state/snapshot/renamed")
		if fi, err := os.Stat(filepath.Join(dir, stateLog)); err != nil || fi.Size() == 0 {
			t.Fatalf("the log is empty: %v", err)
		}
		s = testSite(t, "recovery", dir)
		if got := unitsOf(s); !reflect.DeepEqual(got, want) {
			t.Fatalf("the site holds\n%+v\nwant\n%+v", got, want)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		checkV2Units(t, dir)
	})
}
