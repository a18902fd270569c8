package pgtest

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// A test binary killed before Main stops its server (SIGKILL, go test's
// timeout) leaves the server running and its folder behind. Each folder
// is named after the test binary's PID, and holds an "owner" file with its
// PID and start time; the next binary to start a server stops the servers
// whose owner is gone and removes their folders (reapStale).

const dirPrefix = "rebound-pg-"

// legacyAge is how old a folder of a pgtest that recorded no owner must be
// before it is taken for stale.
const legacyAge = time.Hour

// ownerOf is "PID STARTTIME" of process pid, the start time in clock ticks
// since boot (/proc/PID/stat), which tells a live owner from a later
// process that reused its PID.
func ownerOf(pid int) (string, error) {
	st, err := startTime(pid)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%d %s", pid, st), nil
}

// startTime reads the start time of pid; an error when pid does not run
// (a zombie counts as not running).
func startTime(pid int) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", err
	}
	// The command name is in parentheses and may hold spaces.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return "", fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state), f[19] field 22 (starttime).
	if len(f) < 20 {
		return "", fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	if f[0] == "Z" || f[0] == "X" {
		return "", fmt.Errorf("process %d has exited", pid)
	}
	return f[19], nil
}

// ownerAlive says whether the test binary that made dir still runs.
func ownerAlive(dir string) bool {
	name := strings.TrimPrefix(filepath.Base(dir), dirPrefix)
	pidPart, _, named := strings.Cut(name, "-")
	if !named {
		// A folder of a pgtest that recorded no owner: stale once old.
		fi, err := os.Stat(dir)
		return err != nil || time.Since(fi.ModTime()) < legacyAge
	}
	pid, err := strconv.Atoi(pidPart)
	if err != nil || pid <= 0 {
		return true // not ours to judge
	}
	st, err := startTime(pid)
	if err != nil {
		return false
	}
	b, err := os.ReadFile(filepath.Join(dir, "owner"))
	if err != nil {
		// Made and not yet recorded, or the owner died in between: the
		// PID alone decides.
		return true
	}
	f := strings.Fields(string(b))
	return len(f) == 2 && f[0] == pidPart && f[1] == st
}

// reapStale stops the servers of the folders under root whose test binary
// is gone and removes the folders; it returns the folders removed.
func reapStale(root string) []string {
	dirs, _ := filepath.Glob(filepath.Join(root, dirPrefix+"*"))
	var out []string
	for _, dir := range dirs {
		if fi, err := os.Lstat(dir); err != nil || !fi.IsDir() || ownerAlive(dir) {
			continue
		}
		if err := stopPostmaster(filepath.Join(dir, "data")); err != nil {
			fmt.Fprintf(os.Stderr, "pgtest: stale %s: %v\n", dir, err)
			continue
		}
		if err := os.RemoveAll(dir); err == nil {
			out = append(out, dir)
		}
	}
	return out
}

// stopPostmaster stops the server of data, if it runs: an immediate
// shutdown (SIGQUIT), then SIGKILL if it has not exited within 10 s.
func stopPostmaster(data string) error {
	b, err := os.ReadFile(filepath.Join(data, "postmaster.pid"))
	if os.IsNotExist(err) {
		return nil
	} else if err != nil {
		return err
	}
	lines := strings.Split(string(b), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(lines[0]))
	if err != nil || pid <= 0 {
		return nil // a torn file: no server started
	}
	// The PID is the server's only while its command line names data:
	// otherwise the server is gone and the PID reused.
	cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !bytes.Contains(cmd, []byte(data)) {
		return nil
	}
	if err := syscall.Kill(pid, syscall.SIGQUIT); err != nil && err != syscall.ESRCH {
		return fmt.Errorf("stop its server (PID %d): %w", pid, err)
	}
	for i := 0; ; i++ {
		if _, err := startTime(pid); err != nil {
			return nil
		}
		if i == 200 {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		if i == 400 {
			return fmt.Errorf("its server (PID %d) does not exit", pid)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
