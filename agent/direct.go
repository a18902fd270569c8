package agent

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"syscall"

	"github.com/rebound-dr/rebound/internal/fsutil"
)

// directAlign is the alignment of O_DIRECT offsets, lengths and buffers.
const directAlign = fsutil.DirectAlign

// directChunk is the most one pread of a directDisk reads.
const directChunk = 4 << 20

var directPool = sync.Pool{New: func() any {
	b := fsutil.AlignedBuf(directChunk)
	return &b
}}

// directDisk reads a device with O_DIRECT, past its page cache. A mounted
// filesystem writes file data to the device past the device's page cache,
// and pages pinned by the filesystem's buffer heads survive
// POSIX_FADV_DONTNEED: a buffered read can return a block's old content
// (the end-to-end test sees it). Files on filesystems without O_DIRECT
// (tmpfs) are read buffered: their page cache is the file itself.
type directDisk struct {
	f      *os.File
	size   int64
	direct bool
}

func openDirect(path string, size int64) (*directDisk, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_DIRECT, 0)
	if err == nil {
		return &directDisk{f: f, size: size, direct: true}, nil
	}
	if !errors.Is(err, syscall.EINVAL) {
		return nil, fmt.Errorf("agent: %w", err)
	}
	if f, err = os.Open(path); err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	return &directDisk{f: f, size: size}, nil
}

// ReadAt reads len(p) bytes at off through aligned bounce buffers.
func (d *directDisk) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > d.size {
		return 0, fmt.Errorf("agent: read [%d, %d) past the disk's %d bytes", off, off+int64(len(p)), d.size)
	}
	if !d.direct {
		return d.f.ReadAt(p, off)
	}
	bp := directPool.Get().(*[]byte)
	defer directPool.Put(bp)
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		start := pos &^ (directAlign - 1)
		end := min(start+directChunk, (off+int64(len(p))+directAlign-1)&^(directAlign-1))
		// The device's end need not be page-aligned; it is sector-aligned.
		end = min(end, (d.size+511)&^511)
		want := min(off+int64(len(p)), start+directChunk) // bytes of p this read must cover
		buf := (*bp)[:end-start]
		n, err := d.f.ReadAt(buf, start)
		if start+int64(n) >= want {
			err = nil // a short read past a file's unaligned end
		} else if err == nil || err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		if err != nil {
			return done, fmt.Errorf("agent: read %d bytes at %d: %w", len(buf), start, err)
		}
		done += copy(p[done:], buf[pos-start:want-start])
	}
	return done, nil
}

func (d *directDisk) Close() error { return d.f.Close() }
