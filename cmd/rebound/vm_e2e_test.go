package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/rebound-dr/rebound"
)

// TestImportImage creates machines from a raw and a qcow2 image: the
// exported disk holds exactly the image's bytes, and a larger size pads
// with zeroes.
func TestImportImage(t *testing.T) {
	ctx := context.Background()
	_, svc := testUp(t, t.TempDir())
	dir := t.TempDir()
	raw := filepath.Join(dir, "img.raw")
	data := make([]byte, 3<<20)
	rand.Read(data[:1<<20]) // data, then zeroes
	if err := os.WriteFile(raw, data, 0o644); err != nil {
		t.Fatal(err)
	}
	qcow := filepath.Join(dir, "img.qcow2")
	if out, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v: %s", err, out)
	}
	sum := func(b []byte) string { h := sha256.Sum256(b); return hex.EncodeToString(h[:]) }

	for _, c := range []struct {
		name, img string
		size      int64
	}{{"fromraw", raw, 0}, {"fromqcow", qcow, 0}, {"padded", qcow, 4 << 20}} {
		m, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: c.name, Site: "primary", Disks: []int64{c.size}, Import: []string{c.img}})
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		want := data
		if c.size > int64(len(data)) {
			want = append(append([]byte(nil), data...), make([]byte, c.size-int64(len(data)))...)
		}
		if m.Disks[0].Size != int64(len(want)) {
			t.Fatalf("%s: disk size %d, want %d", c.name, m.Disks[0].Size, len(want))
		}
		if got := diskSum(t, m.Disks[0].NBD); got != sum(want) {
			t.Fatalf("%s: disk hash %s, want the image's %s", c.name, got, sum(want))
		}
	}
	// Bad input: a missing image, a relative path.
	if _, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "nope", Site: "primary", Disks: []int64{0}, Import: []string{filepath.Join(dir, "missing.qcow2")}}); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("missing image: %v", err)
	}
	if _, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "nope", Site: "primary", Disks: []int64{0}, Import: []string{"img.raw"}}); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("relative image: %v", err)
	}
	if _, err := svc.GetMachine(ctx, "nope"); rebound.ErrorCode(err) != rebound.ENOTFOUND {
		t.Fatalf("a failed import left a machine: %v", err)
	}
}
