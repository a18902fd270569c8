package capture

import (
	"bytes"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound/internal/loopfs"
	"github.com/rebound-dr/rebound/internal/nbdtest"
	"github.com/rebound-dr/rebound/nbd"
)

// TestStateDirFull puts a stream's directory (spool, dirty maps, meta) on
// a small real file system on a loop device, fills it, and writes through
// NBD with qemu-io. The disk file lives elsewhere and has room.
//
//   - ext4: the spool append fails but the dirty map, written in full when
//     created, is overwritten in place and needs no new block: writes
//     succeed, their regions are dirty, and once space is freed the resync
//     sends them.
//   - btrfs (copy on write): the map's overwrite needs a new block too, so
//     neither can record the write: the client gets EIO, the disk does not
//     change, Stats.Error says why; once space is freed writes succeed.
//
// Either way the stream replayed onto zeroes ends equal to the disk.
func TestStateDirFull(t *testing.T) {
	for _, fs := range []string{"ext4", "btrfs"} {
		t.Run(fs, func(t *testing.T) { stateDirFull(t, fs) })
	}
}

func stateDirFull(t *testing.T, fstype string) {
	const size = 8 << 20
	dir := t.TempDir()
	h := &harness{t: t, dir: dir, opts: Options{Logger: slog.New(slog.DiscardHandler)}}
	h.specs = []DiskSpec{{Path: filepath.Join(dir, "disk0"), Size: size}}
	streamDir := filepath.Join(dir, "stream")
	loopfs.Mount(t, streamDir, 128<<20, fstype)
	h.open()
	t.Cleanup(func() { h.s.Close() })

	uri := serveExports(t, map[string]nbd.Backend{"d0": h.s.Disk(0)}) + "d0"
	nbdtest.QemuIO(t, uri, "write -P 0x11 0 1M", "flush")

	free := loopfs.Fill(t, streamDir)
	// The same range twice: a refused write must not leave its regions
	// taken as recorded.
	out, _ := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 0x22 2M 64k", "-c", "write -P 0x22 2M 64k", "-c", "write -P 0x33 0 4k", uri).CombinedOutput()
	st := h.s.Stats()
	switch fstype {
	case "ext4":
		if bytes.Contains(out, []byte("error")) {
			t.Fatalf("writes with only the spool full failed:\n%s", out)
		}
		// Overflow, or already resyncing: the housekeeper starts a resync
		// as soon as the (small) spool looks drained, and its copies then
		// fail for want of space too, leaving the regions dirty.
		if st.State != StateOverflow && st.State != StateResyncing || st.DirtyBytes < 64<<10 || st.Error != "" {
			t.Fatalf("stats with the spool full: %+v", st)
		}
	case "btrfs":
		if n := bytes.Count(out, []byte("Input/output error")); n != 3 {
			t.Fatalf("%d of 3 writes neither spool nor dirty map can record failed with EIO:\n%s", n, out)
		}
		if st.State != StateOverflow || st.DirtyBytes != 0 || !strings.Contains(st.Error, "write refused") {
			t.Fatalf("stats while writes are refused: %+v", st)
		}
		b, err := os.ReadFile(h.specs[0].Path)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b[2<<20:2<<20+64<<10], make([]byte, 64<<10)) || !bytes.Equal(b[:4096], bytes.Repeat([]byte{0x11}, 4096)) {
			t.Fatal("a refused write reached the disk")
		}
	}

	free()
	nbdtest.QemuIO(t, uri, "write -P 0x44 3M 64k", "write -P 0x22 2M 64k", "write -P 0x33 0 4k", "flush")
	deadline := time.Now().Add(30 * time.Second)
	for st = h.s.Stats(); st.State != StateStreaming || st.DirtyBytes != 0 || st.Error != ""; st = h.s.Stats() {
		if time.Now().After(deadline) {
			t.Fatalf("no resync after space returned: %+v", st)
		}
		time.Sleep(50 * time.Millisecond)
	}
	m := newModel(1, size)
	m.apply(t, readRange(t, h.s, 1, h.s.Head()))
	m.check(t, h)
	if !bytes.Equal(m[0][2<<20:2<<20+64<<10], bytes.Repeat([]byte{0x22}, 64<<10)) {
		t.Fatal("the write after space returned is missing")
	}
}
