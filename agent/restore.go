package agent

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/nbd"
)

// restoreChunk is the bytes read and compared per step.
const restoreChunk = 4 << 20

// RestoreResult says what a restore did.
type RestoreResult struct {
	Size    int64 `json:"size"`
	Written int64 `json:"written"` // bytes that differed and were written
}

// Restore writes the disk exported at uri (a point's export at the
// recovery site) onto the device or file at path, the server's own disk.
// Chunks that already hold the same bytes are not written; the device is
// synced at the end. A mounted device and a size mismatch are refused.
func Restore(ctx context.Context, uri, path string, progress func(done, total int64)) (RestoreResult, error) {
	var res RestoreResult
	if m := mountedAt(path); m != "" {
		return res, rebound.Errorf(rebound.ECONFLICT, "%s is mounted on %s: unmount it (or boot from other media) before writing a point back onto it", path, m)
	}
	size, err := DeviceSize(path)
	if err != nil {
		return res, err
	}
	cl, err := nbd.Dial(ctx, uri)
	if err != nil {
		return res, rebound.Errorf(rebound.EUNAVAILABLE, "read the point at %s: %v", uri, err)
	}
	defer cl.Close()
	if cl.Size() != size {
		return res, rebound.Errorf(rebound.EINVALID, "the export %s has %d bytes and %s has %d: restore onto a disk of the same size", uri, cl.Size(), path, size)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return res, fmt.Errorf("agent: restore: %w", err)
	}
	defer f.Close()
	res.Size = size
	src, dst := make([]byte, restoreChunk), make([]byte, restoreChunk)
	for off := int64(0); off < size; off += restoreChunk {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		n := min(int64(restoreChunk), size-off)
		if _, err := cl.ReadAt(src[:n], off); err != nil {
			return res, rebound.Errorf(rebound.EUNAVAILABLE, "read %s at %d: %v", uri, off, err)
		}
		if _, err := f.ReadAt(dst[:n], off); err != nil {
			return res, fmt.Errorf("agent: read %s at %d: %w", path, off, err)
		}
		if !bytes.Equal(src[:n], dst[:n]) {
			if _, err := f.WriteAt(src[:n], off); err != nil {
				return res, fmt.Errorf("agent: write %s at %d: %w", path, off, err)
			}
			res.Written += n
		}
		if progress != nil {
			progress(off+n, size)
		}
	}
	if err := f.Sync(); err != nil {
		return res, fmt.Errorf("agent: sync %s: %w", path, err)
	}
	// Later reads of the device must not see its old cached pages.
	DropCache(f)
	return res, nil
}

// mountedAt returns where path (a device) is mounted, or "".
func mountedAt(path string) string {
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return ""
	}
	want := map[string]bool{path: true}
	if r, err := filepath.EvalSymlinks(path); err == nil {
		want[r] = true
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && want[f[0]] {
			return f[1]
		}
	}
	return ""
}
