package site

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/journal"
)

// Detach writes the journal's state at seq out as plain disk files and
// drops the journal: the replica stays as a detached copy, not served and
// not replicated. The copy is written aside and renamed into place only
// once complete, so an interrupted detach leaves the replica as it was.
func (s *Site) Detach(ctx context.Context, name string, seq uint64) ([]string, error) {
	s.mu.Lock()
	_, u, err := s.unitLocked(name)
	switch {
	case err != nil:
	case u.state.Role == RoleDetached:
		s.mu.Unlock()
		return s.detachedPaths(u), nil
	case u.state.Role != RoleTarget || u.journal == nil:
		err = rebound.Errorf(rebound.ECONFLICT, "site %s is not the recovery site of machine %q; only a replica can be detached", s.cfg.Name, name)
	case u.act != nil || u.test != nil:
		err = rebound.Errorf(rebound.ECONFLICT, "machine %q has a failover or test failover at site %s; commit, cancel or clean it up first", name, s.cfg.Name)
	}
	if err != nil {
		s.mu.Unlock()
		return nil, err
	}
	j, disks, udir := u.journal, u.disks(), s.unitDir(u)
	s.mu.Unlock()

	// The view pins seq: expiry cannot fold past it while it is copied.
	view, err := j.View(seq)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(udir, "detach")
	err = os.RemoveAll(dir) // an interrupted earlier run, maybe at another seq
	if err == nil {
		err = os.MkdirAll(dir, 0o700)
	}
	for i, d := range disks {
		if err != nil {
			break
		}
		err = copyDisk(ctx, filepath.Join(dir, fmt.Sprintf("disk%d.raw", i)), view.Disk(i), d.Size)
	}
	err = errors.Join(err, view.Close())
	if err != nil {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("detach %s at position %d: %w", name, seq, err)
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if cur, ok := s.units[u.name]; !ok || cur != u || u.journal != j {
		_ = os.RemoveAll(dir)
		return nil, rebound.Errorf(rebound.ECONFLICT, "machine %q changed at site %s while it was being detached; retry", name, s.cfg.Name)
	}
	if err := j.Close(); err != nil {
		return nil, err
	}
	u.journal = nil
	for i := range disks {
		if err := os.Rename(filepath.Join(dir, fmt.Sprintf("disk%d.raw", i)), s.unitDiskPath(u, i)); err != nil {
			return nil, err
		}
	}
	u.state.Role, u.state.Spec, u.state.Act, u.state.Test, u.state.Fenced = RoleDetached, nil, nil, nil, false
	if err := s.saveLocked(u); err != nil {
		return nil, err
	}
	_ = os.RemoveAll(dir)
	if err := journal.Remove(filepath.Join(udir, "journal")); err != nil {
		s.logger.Warn("detach: the old journal stays until the site restarts", "machine", name, "err", err)
	}
	return s.detachedPaths(u), nil
}

// detachedPaths are the files of the unit's disks, in unit order.
func (s *Site) detachedPaths(u *unit) []string {
	paths := make([]string, len(u.disks()))
	for i := range paths {
		paths[i] = s.unitDiskPath(u, i)
	}
	return paths
}

// copyDisk writes a disk of a view to a new sparse file at path: zero
// chunks stay holes.
func copyDisk(ctx context.Context, path string, src io.ReaderAt, size int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	err = f.Truncate(size)
	buf := make([]byte, 1<<20)
	for off := int64(0); err == nil && off < size; off += int64(len(buf)) {
		if err = ctx.Err(); err != nil {
			break
		}
		p := buf[:min(int64(len(buf)), size-off)]
		var n int
		if n, err = src.ReadAt(p, off); n == len(p) {
			err = nil
		} else if err == nil {
			err = io.ErrUnexpectedEOF
		}
		if err == nil && !zeroBytes(p) {
			_, err = f.WriteAt(p, off)
		}
	}
	if err == nil {
		err = f.Sync()
	}
	return errors.Join(err, f.Close())
}

var zeroChunk = make([]byte, 1<<20)

func zeroBytes(p []byte) bool { return bytes.Equal(p, zeroChunk[:len(p)]) }
