package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/nbd"
)

// TestReadmeTour runs the README's tour of the verbs, line by line, with the
// real binary against `rebound up` (in-process), app-consistent points
// included. Only the examples the README marks as such are replaced: the
// NBD address, the hook paths, a point time, a point ID and a job ID.
func TestReadmeTour(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	i := strings.Index(s, "## A tour of the verbs")
	if i < 0 {
		t.Fatal("README has no tour")
	}
	s = s[i:]
	s = s[strings.Index(s, "```sh\n")+6:]
	tour := strings.Split(strings.TrimSpace(s[:strings.Index(s, "```")]), "\n")

	bin := reboundBinary(t)
	dir := t.TempDir()
	up, svc := testUp(t, filepath.Join(dir, "data"))
	ca := filepath.Join(dir, "ca.crt")
	if err := os.WriteFile(ca, up.Server.CA.CertPEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	hookLog := filepath.Join(dir, "hooks.log")
	for _, h := range []string{"freeze", "thaw"} {
		script := "#!/bin/sh\necho " + h + " \"$1\" >> " + hookLog + "\n"
		if err := os.WriteFile(filepath.Join(dir, h), []byte(script), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	env := append(os.Environ(), "XDG_CONFIG_HOME="+dir, EnvServer+"="+up.Server.APIURL, EnvToken+"="+up.AdminToken, EnvCA+"="+ca,
		"PATH="+filepath.Dir(bin)+":"+os.Getenv("PATH"))
	ctx := context.Background()

	// Examples, filled in when a line needs them.
	points := func() []rebound.RecoveryPoint {
		ps, err := svc.ListPoints(ctx, "vm1")
		if err != nil || len(ps) < 2 {
			t.Fatalf("points: %d, %v", len(ps), err)
		}
		return ps
	}
	examples := []struct {
		text  string
		value func() string
	}{
		{"nbd://127.0.0.1:10809/vm1-disk0", func() string { return getMachine(t, svc, "vm1").Disks[0].NBD }},
		{"/path/freeze", func() string { return filepath.Join(dir, "freeze") }},
		{"/path/thaw", func() string { return filepath.Join(dir, "thaw") }},
		{"2026-11-27T14:03:05Z", func() string { ps := points(); return ps[len(ps)-1].Time.Format("2006-01-02T15:04:05.999999999Z07:00") }},
		{"p456", func() string { ps := points(); return ps[len(ps)-2].ID }},
		{"job show ID", func() string {
			js, err := svc.ListJobs(ctx)
			if err != nil || len(js) == 0 {
				t.Fatalf("jobs: %v", err)
			}
			return "job show " + js[0].ID
		}},
	}
	for _, line := range tour {
		cmd := line
		if k := strings.Index(cmd, "  #"); k >= 0 {
			cmd = strings.TrimSpace(cmd[:k])
		}
		for _, ex := range examples {
			if strings.Contains(cmd, ex.text) {
				cmd = strings.ReplaceAll(cmd, ex.text, ex.value())
			}
		}
		c := exec.Command("bash", "-e", "-o", "pipefail", "-c", cmd)
		c.Env, c.Dir = env, dir
		out, err := c.CombinedOutput()
		if err != nil {
			t.Fatalf("README line failed: %s\nran: %s\n%v\n%s", line, cmd, err, out)
		}
		t.Logf("$ %s\n%s", cmd, out)
	}

	// The tour's hooks ran in order around its app-consistent point.
	if b, _ := os.ReadFile(hookLog); string(b) != "freeze vm1\nthaw vm1\n" {
		t.Fatalf("hook log %q, want freeze then thaw", b)
	}
	// The machine ends home, protected again, with the tour's first write.
	m := getMachine(t, svc, "vm1")
	if m.ActiveSite != "primary" || m.State != rebound.MachineProtected || m.Protection == nil || m.Protection.TargetSite != "recovery" {
		t.Fatalf("after the tour: active %s, state %s, protection %+v", m.ActiveSite, m.State, m.Protection)
	}
	cl, err := nbd.Dial(ctx, m.Disks[0].NBD)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	got := make([]byte, 1<<20)
	if _, err := cl.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, bytes.Repeat([]byte{0xab}, 1<<20)) {
		t.Fatal("the tour's 1 MiB of 0xab is not on the disk after the round trip")
	}
}
