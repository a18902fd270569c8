package site

import (
	"sync"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/nbd"
)

// liveDisk is the backend an NBD connection holds for a machine's disk.
// The disk behind it changes as the machine changes role (active, source,
// failed-over, committed) while a VM keeps its connection open; a role
// change pauses it, so requests in flight finish on the old backend and
// new ones wait for the new one.
type liveDisk struct {
	mu   sync.RWMutex
	b    nbd.Backend // nil: not served here now
	size int64
	name string
}

func (d *liveDisk) backend() (nbd.Backend, error) {
	if d.b == nil {
		return nil, rebound.Errorf(rebound.EUNAVAILABLE, "export %s is not served at this site any more", d.name)
	}
	return d.b, nil
}

func (d *liveDisk) Size() int64 { return d.size }

func (d *liveDisk) ReadAt(p []byte, off int64) (int, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	b, err := d.backend()
	if err != nil {
		return 0, err
	}
	return b.ReadAt(p, off)
}

func (d *liveDisk) WriteAt(p []byte, off int64) (int, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	b, err := d.backend()
	if err != nil {
		return 0, err
	}
	return b.WriteAt(p, off)
}

func (d *liveDisk) Flush() error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	b, err := d.backend()
	if err != nil {
		return err
	}
	return b.Flush()
}

func (d *liveDisk) Trim(off, length int64) error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	b, err := d.backend()
	if err != nil {
		return err
	}
	return b.Trim(off, length)
}

func (d *liveDisk) WriteZeroes(off, length int64) error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	b, err := d.backend()
	if err != nil {
		return err
	}
	return b.WriteZeroes(off, length)
}

func (d *liveDisk) WriteZeroesNoHole(off, length int64) error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	b, err := d.backend()
	if err != nil {
		return err
	}
	return b.WriteZeroesNoHole(off, length)
}

// Extents forwards the backend's allocation status (nbd.Extenter), so
// block status works on the real exports; a backend that cannot tell
// reports data.
func (d *liveDisk) Extents(off, length int64) ([]nbd.Extent, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	b, err := d.backend()
	if err != nil {
		return nil, err
	}
	return nbd.ExtentsOf(b, off, length)
}

// WriteZeroesFast forwards NBD_CMD_FLAG_FAST_ZERO (nbd.FastZeroer).
func (d *liveDisk) WriteZeroesFast(off, length int64) error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	b, err := d.backend()
	if err != nil {
		return err
	}
	return nbd.WriteZeroesFast(b, off, length)
}

// liveLocked returns the machine's live disks, creating them.
func (s *Site) liveLocked(m *machine) []*liveDisk {
	if len(m.live) != len(m.state.Disks) {
		m.live = make([]*liveDisk, len(m.state.Disks))
		for i, d := range m.state.Disks {
			m.live[i] = &liveDisk{size: d.Size, name: exportName(m.state.Name, i, false), b: currentLocked(m, i)}
		}
	}
	return m.live
}

// currentLocked is the backend that serves disk i of m now, or nil: its
// own file while its unit is active, else its unit's stream or activation
// at its disk offset.
func currentLocked(m *machine, i int) nbd.Backend {
	u := m.unit
	switch {
	case u.state.Role == RoleActive && i < len(m.files):
		return m.files[i]
	case u.state.Role == RoleSource && u.stream != nil:
		return u.stream.Disk(m.offset + i)
	case u.state.Role == RoleTarget && u.act != nil:
		return u.act.backend(m.offset + i)
	}
	return nil
}

// setLiveLocked points the live disks of the unit's members at the current
// backends, after the requests in flight on the old ones.
func (s *Site) setLiveLocked(u *unit) {
	for _, m := range u.members {
		for i, d := range m.live {
			d.mu.Lock()
			d.b = currentLocked(m, i)
			d.mu.Unlock()
		}
	}
}

// pauseLocked waits for requests in flight on the disks of u's members and
// holds new ones until resumeLocked, which serves them from the backends
// of then: a unit changes role as a whole.
func (s *Site) pauseLocked(u *unit) {
	for _, m := range u.members {
		for _, d := range s.liveLocked(m) {
			d.mu.Lock()
		}
	}
}

func (s *Site) resumeLocked(u *unit) {
	for _, m := range u.members {
		for i, d := range m.live {
			d.b = currentLocked(m, i)
			d.mu.Unlock()
		}
	}
}
