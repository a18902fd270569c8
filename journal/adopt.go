package journal

import (
	"errors"
	"fmt"
	"github.com/rebound-dr/rebound/internal/fsutil"
	"os"
	"path/filepath"
	"syscall"

	"github.com/rebound-dr/rebound"
)

// Adopt makes existing disk files the base of a new journal in dir, so a
// stream that sends only the regions where they differ (a delta resync)
// can land on them: each paths[i] is renamed to dir's base file of disk i
// (base position 0, no copy), and the files and directories are fsynced
// before meta.json marks the journal complete. Open then opens it as
// usual; as for any journal, no position is consistent before the
// stream's first ResyncEnd.
//
// Sizes must match the disk table and the files must be on dir's file
// system. A dir that already holds a journal is an ECONFLICT error. Adopt
// is safe to repeat after a crash: a path already moved in (missing, with
// its base file present) is taken as adopted.
func Adopt(dir string, disks []rebound.Disk, paths []string) error {
	if len(disks) == 0 || len(paths) != len(disks) {
		return rebound.Errorf(rebound.EINVALID, "journal: adopt needs one path per disk (%d disks, %d paths)", len(disks), len(paths))
	}
	if _, err := os.Stat(filepath.Join(dir, metaFile)); err == nil {
		return rebound.Errorf(rebound.ECONFLICT, "journal: %s already holds a journal; remove it before adopting disks", dir)
	}
	if ents, err := os.ReadDir(filepath.Join(dir, walDir)); err == nil && len(ents) > 0 {
		return rebound.Errorf(rebound.ECONFLICT, "journal: %s holds a wal without a journal; remove it before adopting disks", dir)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("journal: adopt: %w", err)
	}
	// Check everything before moving anything.
	moved := make([]bool, len(disks))
	for i, d := range disks {
		if d.Size <= 0 {
			return rebound.Errorf(rebound.EINVALID, "journal: disk %d (%s): invalid size %d", i, d.Name, d.Size)
		}
		base := filepath.Join(dir, baseName(i))
		fi, err := os.Stat(paths[i])
		if errors.Is(err, os.ErrNotExist) {
			if bi, berr := os.Stat(base); berr == nil && bi.Size() == d.Size {
				moved[i] = true // an earlier Adopt moved it, then crashed
				continue
			}
			return rebound.Errorf(rebound.ENOTFOUND, "journal: disk %d to adopt: %s does not exist", i, paths[i])
		} else if err != nil {
			return fmt.Errorf("journal: adopt: %w", err)
		}
		if !fi.Mode().IsRegular() {
			return rebound.Errorf(rebound.EINVALID, "journal: disk %d to adopt: %s is not a regular file", i, paths[i])
		}
		if fi.Size() != d.Size {
			return rebound.Errorf(rebound.EINVALID, "journal: disk %d to adopt: %s has %d bytes, the disk %d", i, paths[i], fi.Size(), d.Size)
		}
	}
	dirs := map[string]bool{dir: true}
	for i := range disks {
		base := filepath.Join(dir, baseName(i))
		if !moved[i] {
			if err := os.Rename(paths[i], base); errors.Is(err, syscall.EXDEV) {
				return rebound.Errorf(rebound.EINVALID, "journal: disk %d to adopt: %s is on another file system than %s", i, paths[i], dir)
			} else if err != nil {
				return fmt.Errorf("journal: adopt: %w", err)
			}
			dirs[filepath.Dir(paths[i])] = true
		}
		// The disks' data must be durable before meta says the base is.
		f, err := os.Open(base)
		if err != nil {
			return fmt.Errorf("journal: adopt: %w", err)
		}
		err = f.Sync()
		f.Close()
		if err != nil {
			return fmt.Errorf("journal: adopt: sync %s: %w", base, err)
		}
	}
	for d := range dirs {
		if err := fsutil.SyncDir(d); err != nil {
			return fmt.Errorf("journal: adopt: sync %s: %w", d, err)
		}
	}
	return writeMeta(dir, meta{Format: metaFormat, Disks: append([]rebound.Disk(nil), disks...)})
}

// RegionsAfter returns, per disk, the merged regions touched by writes,
// zeroes and trims with Seq > seq that the journal holds. Records at or
// below the base are folded and their ranges forgotten, so for seq below
// the base every disk is returned whole.
func (j *Journal) RegionsAfter(seq uint64) [][]rebound.Region {
	j.mu.Lock()
	defer j.mu.Unlock()
	out := make([][]rebound.Region, len(j.disks))
	if seq < j.base {
		for i, d := range j.disks {
			out[i] = []rebound.Region{{Offset: 0, Length: d.Size}}
		}
		return out
	}
	if n := len(j.gaps); n > 0 && j.gaps[n-1] > seq {
		// Records after seq were lost to damage: their ranges are unknown.
		for i, d := range j.disks {
			out[i] = []rebound.Region{{Offset: 0, Length: d.Size}}
		}
		return out
	}
	for _, r := range j.recs[j.recIndex(seq+1):] {
		switch r.kind {
		case rebound.RecordWrite, rebound.RecordZero, rebound.RecordTrim:
			if r.length > 0 {
				out[r.disk] = append(out[r.disk], rebound.Region{Offset: r.off, Length: r.length})
			}
		}
	}
	for i := range out {
		out[i] = rebound.MergeRegions(out[i])
	}
	return out
}
