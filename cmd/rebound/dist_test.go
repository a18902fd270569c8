package main

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// unitFile is a parsed systemd unit: section -> key -> values.
type unitFile map[string]map[string][]string

func parseUnit(t *testing.T, path string) unitFile {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	u := unitFile{}
	section := ""
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		s := strings.TrimSpace(sc.Text())
		switch {
		case s == "" || strings.HasPrefix(s, "#"):
		case strings.HasPrefix(s, "[") && strings.HasSuffix(s, "]"):
			section = s[1 : len(s)-1]
			u[section] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(s, "=")
			if !ok || section == "" {
				t.Fatalf("%s:%d: not a unit line: %q", path, n, s)
			}
			u[section][k] = append(u[section][k], v)
		}
	}
	return u
}

// TestUnitFiles: each daemon's unit runs it with its config file, keeps
// its data directory the only writable one, and sandboxes it; the example
// config files hold only settings the daemon knows. systemd-analyze
// verifies the units.
func TestUnitFiles(t *testing.T) {
	dist := filepath.Join("..", "..", "dist")
	for _, daemon := range []string{"server", "site", "agent"} {
		unit := filepath.Join(dist, "systemd", "rebound-"+daemon+".service")
		u := parseUnit(t, unit)
		svc := u["Service"]
		one := func(k string) string {
			t.Helper()
			if len(svc[k]) != 1 {
				t.Fatalf("%s: %s is %q", unit, k, svc[k])
			}
			return svc[k][0]
		}
		conf := "/etc/rebound/" + daemon + ".conf"
		if got := one("ExecStart"); got != "/usr/local/bin/rebound "+daemon+" --config "+conf {
			t.Fatalf("%s: ExecStart=%s", unit, got)
		}
		data := "/var/lib/rebound/" + daemon
		for k, want := range map[string]string{"StateDirectory": "rebound/" + daemon, "ReadWritePaths": data,
			"ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes"} {
			if got := one(k); got != want {
				t.Fatalf("%s: %s=%s, want %s", unit, k, got, want)
			}
		}
		if len(u["Install"]["WantedBy"]) != 1 {
			t.Fatalf("%s: no WantedBy", unit)
		}
		// The example config is valid for the daemon and uses the unit's
		// data directory.
		cmd := daemonCommand(t, daemon, "--config", filepath.Join(dist, "config", daemon+".conf"))
		if err := loadDaemonConfig(cmd, daemon); err != nil {
			t.Fatalf("dist/config/%s.conf: %v", daemon, err)
		}
		if got, _ := cmd.Flags().GetString("data"); got != data {
			t.Fatalf("dist/config/%s.conf: data = %s, want %s", daemon, got, data)
		}
	}
	// What each daemon needs beyond the sandbox.
	site := parseUnit(t, filepath.Join(dist, "systemd", "rebound-site.service"))["Service"]
	if strings.Join(site["DeviceAllow"], ",") != "/dev/kvm rw,/dev/net/tun rw" || site["KillMode"][0] != "process" || site["PrivateDevices"] != nil {
		t.Fatalf("site: DeviceAllow %q KillMode %q PrivateDevices %q", site["DeviceAllow"], site["KillMode"], site["PrivateDevices"])
	}
	agent := parseUnit(t, filepath.Join(dist, "systemd", "rebound-agent.service"))["Service"]
	if agent["PrivateDevices"] != nil || !strings.Contains(agent["CapabilityBoundingSet"][0], "CAP_SYS_ADMIN") {
		t.Fatalf("agent: block devices and fsfreeze: %q %q", agent["PrivateDevices"], agent["CapabilityBoundingSet"])
	}
	server := parseUnit(t, filepath.Join(dist, "systemd", "rebound-server.service"))["Service"]
	if server["PrivateDevices"][0] != "yes" || server["User"][0] != "rebound" {
		t.Fatalf("server: %q %q", server["PrivateDevices"], server["User"])
	}

	// systemd-analyze verify: no warning at all. ExecStart must exist, so
	// copies point it at this test binary.
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Fatalf("systemd-analyze is missing: install Debian's systemd (scripts/test.sh does)")
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	var units []string
	for _, daemon := range []string{"server", "site", "agent"} {
		b, err := os.ReadFile(filepath.Join(dist, "systemd", "rebound-"+daemon+".service"))
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(tmp, "rebound-"+daemon+".service")
		os.WriteFile(p, []byte(strings.ReplaceAll(string(b), "/usr/local/bin/rebound", self)), 0o644)
		units = append(units, p)
	}
	out, err := exec.Command(analyze, append([]string{"verify"}, units...)...).CombinedOutput()
	if err != nil || len(out) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}
