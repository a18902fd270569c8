package main

import (
	"context"
	"io/fs"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rebound-dr/rebound"
)

// TestDataModes: everything a server and its sites keep (database, disks,
// spool, journal, replicas, overlays, state) is readable by its owner
// only. Certificates are public and may be world-readable.
func TestDataModes(t *testing.T) {
	dir := t.TempDir()
	_, svc := testUp(t, dir)
	ctx := context.Background()
	if _, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "primary", Disks: []int64{8 << 20}}); err != nil {
		t.Fatal(err)
	}
	waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm1", To: "recovery"}))
	m := getMachine(t, svc, "vm1")
	o := newOracle(t, m.Disks[0].Size, 7)
	o.write(m.Disks[0].NBD, 20)
	o.point(svc, "vm1", false)
	waitJob(t, svc)(svc.TestFailover(ctx, "vm1", rebound.PointLatestProcessed))
	t.Cleanup(func() { svc.TestFailoverCleanup(context.Background(), "vm1") })

	var files, dirs int
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return nil // removed while walking
		}
		switch {
		case d.IsDir():
			dirs++
			if path != dir && fi.Mode().Perm()&0o077 != 0 {
				t.Errorf("folder %s has mode %v, want 0700", path, fi.Mode().Perm())
			}
		case fi.Mode().IsRegular():
			files++
			if strings.HasSuffix(path, ".crt") || strings.HasSuffix(path, ".pem") && !strings.Contains(filepath.Base(path), "key") {
				return nil
			}
			if fi.Mode().Perm()&0o077 != 0 {
				t.Errorf("file %s has mode %v, want 0600", path, fi.Mode().Perm())
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"rebound.db", "spool", "wal", "base-"} {
		found := false
		filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if strings.Contains(filepath.Base(path), want) {
				found = true
			}
			return nil
		})
		if !found {
			t.Errorf("no %q under %s: the test no longer sees what it checks", want, dir)
		}
	}
	t.Logf("%d files, %d folders checked", files, dirs)
}
