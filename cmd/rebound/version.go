package main

import (
	"runtime"
	"runtime/debug"

	"github.com/rebound-dr/rebound/site"
)

// Sites (and agents) report the build's version to the server, where
// `rebound site list` and `site show` display it.
func init() { site.Version = buildVersion().Short() }

// VersionInfo is the JSON output of `rebound version`.
type VersionInfo struct {
	Version string `json:"version"`
	Commit  string `json:"commit,omitempty"`
	// Modified: the commit's tree had uncommitted changes when built.
	Modified bool   `json:"modified,omitempty"`
	Go       string `json:"go"`
}

// buildVersion returns the build's version: -ldflags win, then what the Go
// toolchain stamped (module version for go install, vcs.revision for a
// build inside the repository).
func buildVersion() VersionInfo {
	v := VersionInfo{Version: Version, Commit: Commit, Go: runtime.Version()}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return v
	}
	if v.Version == "dev" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		v.Version = bi.Main.Version
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			if v.Commit == "" {
				v.Commit = s.Value
			}
		case "vcs.modified":
			// Only meaningful for the stamped commit, not an -ldflags one.
			if Commit == "" {
				v.Modified = s.Value == "true"
			}
		}
	}
	return v
}

// String is the one-line form: "rebound v1.2.3 (commit abc123, go1.26.8)".
func (v VersionInfo) String() string {
	s := "rebound " + v.Version + " ("
	if v.Commit != "" {
		c := v.Commit
		if len(c) > 12 {
			c = c[:12]
		}
		s += "commit " + c
		if v.Modified {
			s += "+dirty"
		}
		s += ", "
	}
	return s + v.Go + ")"
}

// Short is the version with the commit's first 12 digits: "v1.2.3+0123456789ab".
func (v VersionInfo) Short() string {
	if v.Commit == "" {
		return v.Version
	}
	c := v.Commit
	if len(c) > 12 {
		c = c[:12]
	}
	return v.Version + "+" + c
}
