package main

import (
	"bytes"
	"context"
	"errors"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/loopfs"
	"github.com/rebound-dr/rebound/nbd"
	"github.com/rebound-dr/rebound/site"
	"github.com/rebound-dr/rebound/workload"
)

// TestStreamStateDirFull: the primary's stream directory of a protected
// machine is a small file system on a loop device, filled up.
//   - btrfs: neither the spool nor the dirty map can record a write (copy
//     on write needs new blocks even to overwrite the map), so writes fail
//     with EIO (qemu-io and the nbd client) and the site reports overflow
//     with a reason.
//   - ext4: the preallocated dirty map still takes overwrites, so writes
//     succeed and their regions are dirty.
//
// Either way no acknowledged write is missing from the source disk nor any
// refused one on it, and after the space is freed writes succeed, the
// stream resyncs, and a point's test failover at recovery hashes equal to
// the source.
func TestStreamStateDirFull(t *testing.T) {
	for _, fs := range []string{"btrfs", "ext4"} {
		t.Run(fs, func(t *testing.T) { streamStateDirFull(t, fs) })
	}
}

func streamStateDirFull(t *testing.T, fstype string) {
	ctx := context.Background()
	refused := fstype == "btrfs"
	up, svc := fixedUp(t, func(c *UpConfig) {
		// The spool capture mode, where every write needs the spool; in
		// direct mode a write needs no space in this directory until the
		// peer falls behind.
		c.Capture = site.CaptureSpool
		loopfs.Mount(t, filepath.Join(c.DataDir, "sites", "primary", "machines", "vm1", "stream"), 128<<20, fstype)
	})
	const size = 16 << 20
	o := newOracle(t, size, 21)
	src := createProtected(t, svc, "vm1", size, o)
	waitReplicatedAll(t, up, "vm1")

	// Only once the acked spool segments are gone: removing them later would
	// free space.
	streamDir := filepath.Join(up.Sites["primary"].Config.DataDir, "machines", "vm1", "stream")
	waitUntil(t, 20*time.Second, "the acked spool segments removed", func() bool {
		segs, err := filepath.Glob(filepath.Join(streamDir, "spool", "*.wal"))
		return err == nil && len(segs) == 1
	})
	free := loopfs.Fill(t, streamDir)
	out, _ := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 64k", src).CombinedOutput()
	if eio := bytes.Contains(out, []byte("Input/output error")); eio != refused {
		t.Fatalf("a write with the stream directory full on %s: EIO %v, want %v:\n%s", fstype, eio, refused, out)
	}
	if !refused {
		o.model.Apply(workload.Op{Kind: workload.OpWrite, Offset: 0, Data: bytes.Repeat([]byte{0x77}, 64<<10)})
	}
	// Random writes: each fails with EIO or is acknowledged, and only the
	// acknowledged ones go into the model.
	cl, err := nbd.Dial(ctx, src)
	if err != nil {
		t.Fatal(err)
	}
	failed := 0
	for range 40 {
		op := o.gen.Next()
		if err := workload.Apply(cl, op); err != nil {
			if !errors.Is(err, syscall.EIO) {
				t.Fatalf("write with the stream directory full: %v, want EIO", err)
			}
			failed++
			continue
		}
		o.model.Apply(op)
	}
	cl.Close()
	if refused && failed == 0 || !refused && failed > 0 {
		t.Fatalf("%d of 40 writes failed with the stream directory full on %s", failed, fstype)
	}
	ms := primaryStatus(t, up, "vm1")
	// ext4: overflow, or a resync waiting for spool space to open its window.
	state := ms.ReplState == "overflow" || !refused && ms.ReplState == "resyncing"
	if !state || strings.Contains(ms.ReplError, "write refused") != refused || !refused && ms.DirtyBytes == 0 {
		t.Fatalf("site status with the stream directory full: %+v", ms)
	}
	if got := diskSum(t, src); got != o.model.Sum() {
		t.Fatalf("source disk with writes refused: hash %s, want %s (acknowledged writes only)", got, o.model.Sum())
	}

	free()
	o.write(src, 30)
	// The site's own status: the server's copy may still be from before.
	waitUntil(t, 60*time.Second, "streaming again with nothing dirty", func() bool {
		ms := primaryStatus(t, up, "vm1")
		return ms.ReplState == "streaming" && ms.DirtyBytes == 0 && ms.ReplError == ""
	})
	p := o.point(svc, "vm1", false)
	got, sum := testFailoverSum(t, svc, "vm1", p.ID)
	if got.ID != p.ID || sum != o.model.Sum() || diskSum(t, src) != o.model.Sum() {
		t.Fatalf("after the resync: point %s hash %s, source %s, want %s", got.ID, sum, diskSum(t, src), o.model.Sum())
	}
}

// primaryStatus is the primary site's own status of a machine.
func primaryStatus(t *testing.T, up *UpMain, name string) rebound.MachineStatus {
	t.Helper()
	st, err := up.Sites["primary"].Site.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range st.Machines {
		if m.Name == name {
			return m
		}
	}
	t.Fatalf("primary has no machine %s", name)
	return rebound.MachineStatus{}
}
