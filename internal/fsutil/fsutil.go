// Package fsutil holds the durable file writes several parts share.
package fsutil

import (
	"fmt"
	"os"
	"path/filepath"
	"unsafe"
)

// DirectAlign is the alignment of O_DIRECT offsets, lengths and buffers:
// a page, at least any device's logical block size.
const DirectAlign = 4096

// AlignedBuf returns n bytes of zeroed memory aligned for O_DIRECT (the Go
// heap does not move it).
func AlignedBuf(n int) []byte {
	raw := make([]byte, n+DirectAlign)
	pad := (DirectAlign - int(uintptr(unsafe.Pointer(&raw[0]))%DirectAlign)) % DirectAlign
	return raw[pad : pad+n : pad+n]
}

// WriteFileAtomic replaces path with data so that a crash leaves either
// the old or the new content: write a temp file in the same directory,
// fsync it, rename it over path, fsync the directory.
func WriteFileAtomic(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, ".tmp-"+filepath.Base(path)+"-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after the rename
	err = f.Chmod(perm)
	if err == nil {
		_, err = f.Write(data)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		err = SyncDir(dir)
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// SyncDir fsyncs a directory, making renames and creations in it durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
