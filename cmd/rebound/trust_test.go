package main

import (
	"strings"
	"testing"

	"github.com/rebound-dr/rebound"
)

// TestOutputCaseInsensitive: -o JSON and --output=Json are -o json, for
// results and for errors.
func TestOutputCaseInsensitive(t *testing.T) {
	f := &fakeService{ListSitesFn: func() ([]rebound.Site, error) { return []rebound.Site{{Name: "a"}}, nil }}
	for _, args := range [][]string{{"-o", "JSON"}, {"--output=Json"}, {"-oJSON"}} {
		r := runCLI(t, f, append([]string{"site", "list"}, args...)...)
		wantCode(t, r, 0)
		if s := decode[[]rebound.Site](t, r.stdout); len(s) != 1 || s[0].Name != "a" {
			t.Fatalf("%v: %q", args, r.stdout)
		}
	}
	r := runCLI(t, f, "site", "list", "-o", "Table")
	wantCode(t, r, 0)
	if !strings.HasPrefix(r.stdout, "NAME") {
		t.Fatalf("table: %q", r.stdout)
	}
	// A usage error before the command runs still answers in JSON.
	r = runCLI(t, f, "site", "list", "--bogus", "-o", "JSON")
	wantCode(t, r, ExitUsage)
	if e := decode[map[string]map[string]string](t, r.stdout); e["error"]["code"] != rebound.EINVALID {
		t.Fatalf("json error %q", r.stdout)
	}
	r = runCLI(t, f, "site", "list", "-o", "yaml")
	wantCode(t, r, ExitUsage)
	if !strings.Contains(r.stderr, "-o must be json or table") {
		t.Fatalf("stderr %q", r.stderr)
	}
}

// TestVersionBuild: version shows the -ldflags version and commit.
func TestVersionBuild(t *testing.T) {
	oldV, oldC := Version, Commit
	t.Cleanup(func() { Version, Commit = oldV, oldC })
	Version, Commit = "v1.2.3", "0123456789abcdef0123"
	r := runWith(t, &fakeService{}, "version")
	wantCode(t, r, 0)
	if !strings.HasPrefix(r.stdout, "rebound v1.2.3 (commit 0123456789ab, go") {
		t.Fatalf("stdout %q", r.stdout)
	}
	r = runWith(t, &fakeService{}, "version", "-o", "json")
	if v := decode[VersionInfo](t, r.stdout); v.Version != "v1.2.3" || v.Commit != "0123456789abcdef0123" || v.Go == "" {
		t.Fatalf("json %+v", v)
	}
}
