package site

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/capture"
	"github.com/rebound-dr/rebound/digest"
	"github.com/rebound-dr/rebound/nbd"
	"github.com/rebound-dr/rebound/overlay"
)

// newGeneration returns a fresh generation ID.
func newGeneration() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return "g-" + hex.EncodeToString(b[:])
}

// streamDir is where a unit's capture stream lives.
func (s *Site) streamDir(u *unit) string {
	return filepath.Join(s.unitDir(u), "stream")
}

// diskSpecs returns the capture specs of a unit's disks, in unit order.
func (s *Site) diskSpecs(u *unit) []capture.DiskSpec {
	var specs []capture.DiskSpec
	for _, m := range u.members {
		for i, d := range m.state.Disks {
			specs = append(specs, capture.DiskSpec{Path: s.diskPath(m.state.Name, i), Size: d.Size})
		}
	}
	return specs
}

// memberRegions cuts a member's disks out of per-unit-disk regions.
func memberRegions(m *machine, regions [][]rebound.Region) [][]rebound.Region {
	out := make([][]rebound.Region, len(m.state.Disks))
	for i := range out {
		if k := m.offset + i; k < len(regions) {
			out[i] = regions[k]
		}
	}
	return out
}

// CopyInfo describes this site's copy of a machine.
func (s *Site) CopyInfo(ctx context.Context, name string) (*rebound.CopyInfo, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	ci := &rebound.CopyInfo{Machine: name, Site: s.cfg.Name}
	u, ms, ok := s.scopeLocked(name)
	if !ok {
		return ci, nil
	}
	ci.Role = u.state.Role
	tracked := true
	for _, m := range ms {
		ci.Disks = append(ci.Disks, m.state.Disks...)
		tracked = tracked && len(m.trackers) == len(m.state.Disks)
	}
	ci.Generation, ci.Parent = u.state.Generation, u.state.Parent
	// scoped cuts per-unit-disk regions down to the machines named.
	scoped := func(regions [][]rebound.Region) [][]rebound.Region {
		var out [][]rebound.Region
		for _, m := range ms {
			out = append(out, memberRegions(m, regions)...)
		}
		return out
	}
	switch {
	case u.state.Role == RoleActive && tracked:
		ci.Tracked = true
		for _, m := range ms {
			for _, t := range m.trackers {
				ci.Changed = append(ci.Changed, t.Regions())
				ci.ChangedBytes += t.Bytes()
			}
		}
	case u.state.Role == RoleActive:
		ci.Untrusted = fmt.Sprintf("site %s tracks no changes for this copy (it did not become active through a failover)", s.cfg.Name)
	case u.state.Role == RoleReleased:
		// The old source: what it wrote that its peer may lack is in its
		// closed stream (spool and dirty maps).
		regions, last, err := capture.PendingRegions(s.streamDir(u), s.diskSpecs(u))
		if err != nil {
			ci.Untrusted = fmt.Sprintf("the released copy's stream at site %s cannot be read: %s", s.cfg.Name, rebound.ErrorMessage(err))
			s.spoolDamaged(name, err)
			break
		}
		regions = scoped(regions)
		ci.Tracked, ci.Changed, ci.LastWrite = !u.state.Diverged, regions, last
		if u.state.Diverged {
			ci.Untrusted = "the copy took writes after the failover"
		}
		for _, rs := range regions {
			for _, r := range rs {
				ci.ChangedBytes += r.Length
			}
		}
	case u.state.Role == RoleTarget && u.act == nil && u.state.Spec != nil && u.state.Spec.AdoptDisks:
		// A reprotect target that adopted its released disks: what they
		// lack is still in the released copy's stream, which adoption
		// leaves in place. A retried reprotect resumes from it.
		regions, last, err := capture.PendingRegions(s.streamDir(u), s.diskSpecs(u))
		if err != nil {
			ci.Untrusted = fmt.Sprintf("the adopted copy's old stream at site %s cannot be read: %s", s.cfg.Name, rebound.ErrorMessage(err))
			s.spoolDamaged(name, err)
			break
		}
		regions = scoped(regions)
		ci.Tracked, ci.Changed, ci.LastWrite = true, regions, last
		for _, rs := range regions {
			for _, r := range rs {
				ci.ChangedBytes += r.Length
			}
		}
	default:
		ci.Untrusted = fmt.Sprintf("the %s copy at site %s has no change tracking", u.state.Role, s.cfg.Name)
	}
	return ci, nil
}

// spoolDamaged reports a closed stream whose spool is damaged (not a torn
// tail): the regions it held are unknown, so a reprotect compares block
// digests of both copies instead (CopyInfo.Untrusted); nothing is skipped.
func (s *Site) spoolDamaged(name string, err error) {
	if !errors.Is(err, capture.ErrSpoolDamaged) {
		return
	}
	s.logger.Error("spool damaged", "machine", name, "err", err)
	s.emit(rebound.Event{Time: time.Now().UTC(), Machine: name, Site: s.cfg.Name, Kind: "spool.damaged",
		Message: fmt.Sprintf("%s; a reprotect of %s compares block digests of both copies and resyncs every block that differs", rebound.ErrorMessage(err), name)})
}

// Digests returns block digests of the site's copy of each disk.
func (s *Site) Digests(ctx context.Context, name string, blockSize int64) ([]rebound.BlockDigests, error) {
	if blockSize <= 0 || blockSize%512 != 0 || blockSize > 16<<20 {
		return nil, rebound.Errorf(rebound.EINVALID, "block size %d must be a multiple of 512 up to 16 MiB", blockSize)
	}
	s.mu.Lock()
	var paths []string
	var disks []rebound.Disk
	u, ms, ok := s.scopeLocked(name)
	err := error(nil)
	if !ok {
		err = rebound.Errorf(rebound.ENOTFOUND, "machine %q is not held at site %s", name, s.cfg.Name)
	} else if r := u.state.Role; r != RoleActive && r != RoleReleased {
		err = rebound.Errorf(rebound.ECONFLICT, "machine %q is %s at site %s; digests are taken of active or released copies", name, r, s.cfg.Name)
	} else {
		for _, m := range ms {
			disks = append(disks, m.state.Disks...)
			for i := range m.state.Disks {
				paths = append(paths, s.diskPath(m.state.Name, i))
			}
		}
	}
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	out := make([]rebound.BlockDigests, len(disks))
	for i, d := range disks {
		sums, err := fileDigests(ctx, paths[i], d.Size, blockSize)
		if err != nil {
			return nil, fmt.Errorf("digest disk %d of %s: %w", i, name, err)
		}
		packed := make([]byte, 0, len(sums)*digest.Size)
		for _, sum := range sums {
			packed = append(packed, sum...)
		}
		out[i] = rebound.BlockDigests{BlockSize: blockSize, Size: d.Size, Packed: packed}
	}
	return out, nil
}

// fileDigests hashes a disk with parallel workers and large preads; holes
// and zero blocks cost no hashing (digest.File).
func fileDigests(ctx context.Context, path string, size, blockSize int64) ([][]byte, error) {
	return digest.File(ctx, path, size, blockSize, 0)
}

// Reactivate makes a released copy the active one again, as a new
// generation: reprotect keeping this site's copy after a split brain.
func (s *Site) Reactivate(ctx context.Context, name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, u, err := s.unitLocked(name)
	if err != nil {
		return err
	}
	switch u.state.Role {
	case RoleActive:
		return nil
	case RoleReleased:
	default:
		return rebound.Errorf(rebound.ECONFLICT, "machine %q is %s at site %s; only a released copy can be reactivated", name, u.state.Role, s.cfg.Name)
	}
	s.pauseLocked(u)
	defer s.resumeLocked(u)
	if err := s.openUnitFiles(u); err != nil {
		return err
	}
	u.state.Role, u.state.Fenced, u.state.Spec = RoleActive, false, nil
	u.state.Parent, u.state.Generation, u.state.Diverged = u.state.Generation, newGeneration(), false
	return s.saveLocked(u)
}

// trackerPath is the change map of a disk of an active copy.
func (s *Site) trackerPath(name string, i int) string {
	return filepath.Join(s.machineDir(name), fmt.Sprintf("changed-%d.map", i))
}

// openTrackers attaches the change maps a copy has (after a failover) to
// its disks. A copy has maps for all disks or none.
func (s *Site) openTrackers(m *machine) error {
	for i := range m.state.Disks {
		if _, err := os.Stat(s.trackerPath(m.state.Name, i)); err != nil {
			return nil
		}
	}
	for i, d := range m.state.Disks {
		t, err := capture.OpenTracker(s.trackerPath(m.state.Name, i), d.Size, 4096)
		if err != nil {
			return err
		}
		m.trackers = append(m.trackers, t)
		m.files[i].SetTracker(t)
	}
	return nil
}

func (s *Site) removeTrackers(name string, disks int) {
	for i := 0; i < disks; i++ {
		_ = capture.RemoveTracker(s.trackerPath(name, i))
	}
}

// removeUnitTrackers removes the change maps of every member of u.
func (s *Site) removeUnitTrackers(u *unit) {
	for _, m := range u.members {
		s.removeTrackers(m.state.Name, len(m.state.Disks))
	}
}

// deltaSeed returns the regions a delta resync sends, per disk of the
// unit: those asked for plus every write tracked at this copy. Called with
// s.mu held.
func (s *Site) deltaSeed(u *unit, extra [][]rebound.Region) [][]rebound.Region {
	seed := make([][]rebound.Region, len(u.disks()))
	for i := range seed {
		if i < len(extra) {
			seed[i] = append(seed[i], extra[i]...)
		}
		if m, j := u.locate(i); j < len(m.trackers) {
			seed[i] = append(seed[i], m.trackers[j].Regions()...)
		}
		if seed[i] == nil {
			seed[i] = []rebound.Region{}
		}
	}
	return seed
}

// backend is what the NBD server serves for disk i of an activation: the
// overlay, with every change marked in the tracker first.
func (a *activation) backend(i int) nbd.Backend {
	if i < len(a.trackers) {
		return trackedDisk{a.disks[i], a.trackers[i]}
	}
	return a.disks[i]
}

// trackedDisk marks a change in its tracker before applying it, so a kill
// never leaves a change untracked.
type trackedDisk struct {
	*overlay.Disk
	t *capture.Tracker
}

func (d trackedDisk) WriteAt(p []byte, off int64) (int, error) {
	if err := d.t.Mark(off, int64(len(p))); err != nil {
		return 0, err
	}
	return d.Disk.WriteAt(p, off)
}

func (d trackedDisk) WriteZeroes(off, length int64) error {
	if err := d.t.Mark(off, length); err != nil {
		return err
	}
	return d.Disk.WriteZeroes(off, length)
}

func (d trackedDisk) WriteZeroesNoHole(off, length int64) error {
	if err := d.t.Mark(off, length); err != nil {
		return err
	}
	return d.Disk.WriteZeroesNoHole(off, length)
}

func (d trackedDisk) Trim(off, length int64) error {
	if err := d.t.Mark(off, length); err != nil {
		return err
	}
	return d.Disk.Trim(off, length)
}

// deltaSeedFromFiles is deltaSeed for a unit whose change maps are not
// open (a source reopened after a crash): it reads them from their files.
func (s *Site) deltaSeedFromFiles(u *unit, extra [][]rebound.Region) [][]rebound.Region {
	disks := u.disks()
	seed := make([][]rebound.Region, len(disks))
	for i, d := range disks {
		seed[i] = []rebound.Region{}
		if i < len(extra) {
			seed[i] = append(seed[i], extra[i]...)
		}
		m, j := u.locate(i)
		path := s.trackerPath(m.state.Name, j)
		if _, err := os.Stat(path); err != nil {
			continue
		}
		t, err := capture.OpenTracker(path, d.Size, 4096)
		if err != nil {
			// Unknown changes: the whole disk is the only safe seed.
			seed[i] = []rebound.Region{{Offset: 0, Length: d.Size}}
			continue
		}
		seed[i] = append(seed[i], t.Regions()...)
		t.Close()
	}
	return seed
}

// WriteZeroesFast marks the range first like every change; without it
// the embedded overlay's method would zero untracked.
func (d trackedDisk) WriteZeroesFast(off, length int64) error {
	if err := d.t.Mark(off, length); err != nil {
		return err
	}
	return d.Disk.WriteZeroesFast(off, length)
}

// trackedDisk must keep reporting the overlay's allocation (block status
// of a failover export); the embedded *overlay.Disk provides it.
var (
	_ nbd.Extenter   = trackedDisk{}
	_ nbd.FastZeroer = trackedDisk{}
)
