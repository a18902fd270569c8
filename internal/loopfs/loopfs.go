// Package loopfs mounts small real file systems on loop devices for tests
// that need one to fill up.
package loopfs

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// Mount makes a file system of type fstype (mkfs.<fstype>) in a size-byte
// image file, attaches it to a loop device and mounts it on dir (created
// if missing). Cleanup unmounts it and detaches the device; register it
// before anything that keeps files open there, or close those first. It
// fails the test, never skips, when it cannot (not root, tools missing).
func Mount(t testing.TB, dir string, size int64, fstype string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatalf("loopfs: mounting a %s loop device needs root (CI runs as root)", fstype)
	}
	run := func(name string, args ...string) string {
		t.Helper()
		out, err := exec.Command(name, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return strings.TrimSpace(string(out))
	}
	img := filepath.Join(t.TempDir(), fstype+".img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	run("mkfs."+fstype, "-q", img)
	dev := run("losetup", "--find", "--show", img)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	mounted := false
	t.Cleanup(func() {
		if mounted {
			if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
				t.Errorf("umount %s: %v\n%s", dir, err, out)
			}
		}
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v\n%s", dev, err, out)
		}
	})
	run("mount", dev, dir)
	mounted = true
}

// Fill writes dir/filler until the file system is full (ENOSPC), syncs,
// and returns a function that deletes the filler and syncs, so the space
// is free again.
func Fill(t testing.TB, dir string) (free func()) {
	t.Helper()
	path := filepath.Join(dir, "filler")
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for _, n := range []int{1 << 20, 64 << 10, 4 << 10, 512} {
		for {
			if _, err := f.Write(buf[:n]); err != nil {
				if !errors.Is(err, syscall.ENOSPC) {
					f.Close()
					t.Fatalf("fill %s: %v", dir, err)
				}
				break
			}
		}
	}
	f.Sync() // may fail with ENOSPC too: full is what we want
	f.Close()
	syscall.Sync()
	return func() {
		t.Helper()
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
		syscall.Sync()
	}
}
