package main

import (
	"bufio"
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/rebound-dr/rebound"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// Daemon config files: `rebound server|site|agent --config FILE` reads
// "key = value" lines whose keys are the command's flag names (without
// "--"); '#' starts a comment, a value may be double-quoted, and a
// repeatable flag (--disk, --network, --host) is repeated as lines.
// Precedence, lowest first: the file, the environment
// (REBOUND_<DAEMON>_<FLAG>, e.g. REBOUND_SITE_NBD_ADDR), the command line.

// daemonEnvPrefix is the environment prefix of a daemon's flags.
func daemonEnvPrefix(daemon string) string {
	return "REBOUND_" + strings.ToUpper(daemon) + "_"
}

// flagEnv is the environment variable of a daemon's flag.
func flagEnv(daemon, flag string) string {
	return daemonEnvPrefix(daemon) + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// envAliases are older variables that set a flag too (after the prefixed one).
var envAliases = map[string]string{"token": "REBOUND_JOIN_TOKEN", "db": "REBOUND_DB"}

// addConfigFlag adds --config to a daemon command.
func addConfigFlag(cmd *cobra.Command, daemon string) {
	cmd.Flags().String("config", "", fmt.Sprintf("read flags from FILE: \"flag-name = value\" lines; the environment (%sFLAG_NAME) and the command line override it", daemonEnvPrefix(daemon)))
}

// configLine is one setting of a config file.
type configLine struct {
	key, value string
	line       int
}

// readDaemonConfig parses a config file.
func readDaemonConfig(path string) ([]configLine, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, rebound.Errorf(rebound.EINVALID, "config file: %v", err)
	}
	defer f.Close()
	var out []configLine
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		s := strings.TrimSpace(sc.Text())
		if s == "" || strings.HasPrefix(s, "#") {
			continue
		}
		k, v, ok := strings.Cut(s, "=")
		if !ok {
			return nil, rebound.Errorf(rebound.EINVALID, "%s:%d: want \"flag-name = value\", not %q", path, n, s)
		}
		k = strings.ReplaceAll(strings.TrimSpace(k), "_", "-")
		v = strings.TrimSpace(v)
		if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
			v = v[1 : len(v)-1]
		}
		out = append(out, configLine{key: strings.TrimPrefix(k, "--"), value: v, line: n})
	}
	if err := sc.Err(); err != nil {
		return nil, rebound.Errorf(rebound.EINVALID, "config file %s: %v", path, err)
	}
	return out, nil
}

// notSetting are the flags a config file or the environment cannot set:
// they say what to do, not how to run.
var notSetting = map[string]bool{"config": true, "help": true, "check-db": true}

// loadDaemonConfig applies the environment and the --config file to the
// flags the command line did not set.
func loadDaemonConfig(cmd *cobra.Command, daemon string) error {
	fs := cmd.Flags()
	path, _ := fs.GetString("config")
	if path == "" {
		path = os.Getenv(flagEnv(daemon, "config"))
	}
	var lines []configLine
	if path != "" {
		var err error
		if lines, err = readDaemonConfig(path); err != nil {
			return err
		}
	}
	own := cmd.NonInheritedFlags()
	byKey := map[string][]configLine{}
	for _, l := range lines {
		f := own.Lookup(l.key)
		if f == nil || notSetting[l.key] {
			var names []string
			own.VisitAll(func(f *pflag.Flag) {
				if !notSetting[f.Name] {
					names = append(names, f.Name)
				}
			})
			sort.Strings(names)
			return rebound.Errorf(rebound.EINVALID, "%s:%d: %q is not a setting of rebound %s (settings: %s)", path, l.line, l.key, daemon, strings.Join(names, ", "))
		}
		byKey[l.key] = append(byKey[l.key], l)
	}
	var err error
	own.VisitAll(func(f *pflag.Flag) {
		if err != nil || f.Changed || notSetting[f.Name] {
			return
		}
		for _, env := range []string{flagEnv(daemon, f.Name), envAliases[f.Name]} {
			if v := os.Getenv(env); env != "" && v != "" {
				if serr := fs.Set(f.Name, v); serr != nil {
					err = rebound.Errorf(rebound.EINVALID, "%s=%s: %v", env, v, serr)
				}
				return
			}
		}
		for _, l := range byKey[f.Name] {
			if serr := fs.Set(f.Name, l.value); serr != nil {
				err = rebound.Errorf(rebound.EINVALID, "%s:%d: %s = %s: %v", path, l.line, l.key, l.value, serr)
				return
			}
		}
	})
	return err
}
