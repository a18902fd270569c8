package site

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/capture"
	"github.com/rebound-dr/rebound/journal"
	"github.com/rebound-dr/rebound/overlay"
)

var _ rebound.SiteService = (*Site)(nil)

// Status reports the site and every machine it holds.
func (s *Site) Status(ctx context.Context) (*rebound.SiteStatus, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.addrMu.Lock()
	st := &rebound.SiteStatus{
		Site: s.cfg.Name, Version: Version, NBDAddr: s.nbdAddr, ReplAddr: s.replAddr,
		FreeBytes: s.freeBytes(), Time: time.Now().UTC(),
	}
	s.addrMu.Unlock()
	for _, m := range s.machines {
		ms := rebound.MachineStatus{Name: m.state.Name, Role: m.state.Role, Fenced: m.state.Fenced,
			VM: s.vmStatusLocked(m, false), TestVM: s.vmStatusLocked(m, true)}
		switch m.state.Role {
		case RoleActive, RoleSource:
			ms.Disks = s.disksWithURIs(m.state.Name, m.state.Disks, false)
		case RoleTarget:
			if m.act != nil {
				ms.Disks = s.disksWithURIs(m.state.Name, m.state.Disks, false)
			}
		}
		if m.stream != nil {
			cs := m.stream.Stats()
			ms.ReplState = cs.State
			ms.SyncDone, ms.SyncTotal = cs.SyncDone, cs.SyncTotal
			ms.HeadSeq, ms.AckedSeq = cs.HeadSeq, cs.AckedSeq
			ms.BacklogBytes, ms.DirtyBytes = cs.BacklogBytes, cs.DirtyBytes
			ms.LagSeconds, ms.ThroughputBps = cs.LagSeconds, cs.ThroughputBps
			ms.ReplError = cs.Error
			if m.sender != nil {
				switch ss := m.sender.Stats(); {
				case ss.Stopped != "":
					// The stream cannot go on without a resync: say so.
					to := "SITE"
					if m.state.Spec != nil {
						to = m.state.Spec.PeerSite
					}
					ms.ReplState = "broken"
					ms.ReplError = strings.TrimSpace(fmt.Sprintf("%s %s: run `rebound unprotect %s --wait`, then `rebound protect %s --to %s --wait`",
						ms.ReplError, ss.Stopped, m.state.Name, m.state.Name, to))
				case !ss.Connected && ms.ReplState == "streaming":
					ms.ReplState = "spooling"
				}
			}
		}
		if m.journal != nil {
			ms.DurableSeq = m.journal.Durable()
			pl := m.journal.Points()
			ms.Consistent = len(pl.Points) > 0
			if n := len(pl.Points); n > 0 {
				ms.LastPointTime = pl.Points[n-1].Time
			}
			ms.Activated, ms.TestActivated = m.act != nil, m.test != nil
			if _, _, _, repairing := m.journal.Repairing(); repairing || m.journal.Corrupt() != nil {
				ms.ReplError = journalDamage(s.cfg.Name, &m.state, m.journal)
			}
		}
		st.Machines = append(st.Machines, ms)
	}
	sort.Slice(st.Machines, func(i, j int) bool { return st.Machines[i].Name < st.Machines[j].Name })
	return st, nil
}

// CreateMachine creates empty disks and serves them.
func (s *Site) CreateMachine(ctx context.Context, req rebound.SiteMachine) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if m, ok := s.machines[req.Name]; ok {
		if sameDisks(m.state.Disks, req.Disks) {
			return nil
		}
		return rebound.Errorf(rebound.ECONFLICT, "machine %q already exists at site %s with other disks", req.Name, s.cfg.Name)
	}
	if len(req.Disks) == 0 {
		return rebound.Errorf(rebound.EINVALID, "a machine needs at least one disk")
	}
	if err := os.MkdirAll(s.machineDir(req.Name), 0o700); err != nil {
		return err
	}
	disks, err := s.importDisks(ctx, req)
	if err != nil {
		_ = os.RemoveAll(s.machineDir(req.Name))
		return err
	}
	m := &machine{state: machineState{Name: req.Name, Disks: disks, Role: RoleActive, Generation: newGeneration(), VM: req.VM}}
	if err := s.openFiles(m); err != nil {
		s.closeFiles(m)
		return err
	}
	s.machines[req.Name] = m
	return s.saveLocked()
}

func sameDisks(a, b []rebound.Disk) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].Size != b[i].Size {
			return false
		}
	}
	return true
}

// DeleteMachine stops serving the machine and removes its files.
func (s *Site) DeleteMachine(ctx context.Context, name string) error {
	s.mu.Lock()
	m, ok := s.machines[name]
	if !ok {
		s.mu.Unlock()
		return nil
	}
	delete(s.machines, name)
	s.killVMLocked(m, false)
	s.killVMLocked(m, true)
	err := s.saveLocked()
	s.mu.Unlock()
	s.disconnectAll(name, len(m.state.Disks))
	s.mu.Lock()
	err = errors.Join(err, s.closeMachine(m))
	s.mu.Unlock()
	return errors.Join(err, os.RemoveAll(s.machineDir(name)))
}

func (s *Site) disconnectAll(name string, disks int) {
	for i := 0; i < disks; i++ {
		s.NBD.Disconnect(exportName(name, i, false))
		s.NBD.Disconnect(exportName(name, i, true))
	}
}

// StartReplication makes this site the source or target of a stream.
func (s *Site) StartReplication(ctx context.Context, spec rebound.ReplicationSpec) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch spec.Role {
	case RoleSource:
		m, err := s.getLocked(spec.Machine)
		if err != nil {
			return err
		}
		if spec.Hooks != nil && m.state.Hooks != *spec.Hooks {
			m.state.Hooks = *spec.Hooks
			if err := s.saveLocked(); err != nil {
				return err
			}
		}
		if m.state.Role == RoleSource {
			if m.state.Spec != nil && m.state.Spec.StreamID == spec.StreamID {
				return nil
			}
			return rebound.Errorf(rebound.ECONFLICT, "machine %q already replicates as stream %q", spec.Machine, m.state.Spec.StreamID)
		}
		if m.state.Role != RoleActive {
			return rebound.Errorf(rebound.ECONFLICT, "machine %q is %s at site %s; only an active machine can be a source", spec.Machine, m.state.Role, s.cfg.Name)
		}
		if spec.PeerAddr == "" {
			return rebound.Errorf(rebound.EINVALID, "a source needs the peer's replication address")
		}
		// A fresh stream starts with a full copy, or for a delta seed with
		// the given regions plus every write tracked since the failover.
		seed := allDisks
		if spec.Seed == rebound.SeedDelta {
			seed = s.deltaSeed(m, spec.Regions)
		}
		streamDir := filepath.Join(s.machineDir(spec.Machine), "stream")
		_ = capture.Remove(streamDir)
		// Connected clients (a running VM) wait while the disks move from
		// plain files to the capture stream.
		s.pauseLocked(m)
		defer s.resumeLocked(m)
		if err := s.closeFiles(m); err != nil {
			return err
		}
		sp := spec
		m.state.Role, m.state.Spec = RoleSource, &sp
		if err := s.startSourceSeed(m, seed); err != nil {
			m.state.Role, m.state.Spec = RoleActive, nil
			return errors.Join(err, s.openFiles(m))
		}
		if err := s.saveLocked(); err != nil {
			return err
		}
		// The stream's dirty map holds the regions now.
		s.removeTrackers(m.state.Name, len(m.state.Disks))
		return nil
	case RoleTarget:
		dir := filepath.Join(s.machineDir(spec.Machine), "journal")
		if m, ok := s.machines[spec.Machine]; ok {
			if m.state.Role == RoleTarget && m.state.Spec != nil && m.state.Spec.StreamID == spec.StreamID {
				return nil
			}
			if !spec.AdoptDisks || m.state.Role != RoleReleased {
				return rebound.Errorf(rebound.ECONFLICT, "site %s already holds machine %q as %s", s.cfg.Name, spec.Machine, m.state.Role)
			}
			// The old disks become the journal's base: the delta resync
			// lands on top of them. A journal directory is removed only
			// while every disk is still in place (then it is stale): after
			// a crash between Adopt and the state save it holds the
			// adopted disks, the only seed. Adopt resumes a partial move,
			// and a complete one (meta written; no stream could land
			// before the save) is opened as it is.
			paths := make([]string, len(m.state.Disks))
			inPlace := true
			for i := range paths {
				paths[i] = s.diskPath(spec.Machine, i)
				if _, err := os.Stat(paths[i]); err != nil {
					inPlace = false
				}
			}
			if inPlace {
				_ = journal.Remove(dir)
			}
			if err := journal.Adopt(dir, spec.Disks, paths); err != nil {
				if _, serr := os.Stat(filepath.Join(dir, "meta.json")); serr != nil || rebound.ErrorCode(err) != rebound.ECONFLICT {
					return err
				}
				s.logger.Warn("reusing the journal an interrupted adopt left", "machine", spec.Machine)
			}
			delete(s.machines, spec.Machine)
		} else if spec.AdoptDisks {
			return rebound.Errorf(rebound.ECONFLICT, "site %s holds no disks of machine %q to adopt", s.cfg.Name, spec.Machine)
		} else {
			_ = journal.Remove(dir)
		}
		if err := os.MkdirAll(s.machineDir(spec.Machine), 0o700); err != nil {
			return err
		}
		j, err := journal.Open(dir, spec.Disks, s.journalOptions(spec.Machine))
		if err != nil {
			return err
		}
		sp := spec
		m := &machine{state: machineState{Name: spec.Machine, Disks: spec.Disks, Role: RoleTarget, Spec: &sp, Generation: spec.Generation, VM: spec.VM}, journal: j}
		s.machines[spec.Machine] = m
		s.startExpiry(m.state.Name, j)
		return s.saveLocked()
	}
	return rebound.Errorf(rebound.EINVALID, "unknown replication role %q", spec.Role)
}

// startExpiry folds records older than the retention window into the base.
// The window is read at every pass, so a policy change (SetPolicy) applies
// without reopening the journal.
func (s *Site) startExpiry(name string, j *journal.Journal) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		t := time.NewTicker(s.cfg.ExpireEvery)
		defer t.Stop()
		for {
			select {
			case <-s.ctx.Done():
				return
			case <-t.C:
			}
			s.mu.Lock()
			m, ok := s.machines[name]
			live := ok && m.journal == j
			var retention time.Duration
			if live && m.state.Spec != nil {
				retention = time.Duration(m.state.Spec.Policy.Retention)
			}
			s.mu.Unlock()
			if !live {
				return
			}
			if retention <= 0 {
				continue
			}
			if _, err := j.Expire(time.Now().Add(-retention)); err != nil {
				s.logger.Warn("journal expiry", "machine", name, "err", err)
			}
		}
	}()
}

// SetPolicy replaces the policy of a machine's stream on this side: a
// source cuts points at the new intervals from now on, a target keeps the
// new retention window. A machine that does not replicate here has nothing
// to change.
func (s *Site) SetPolicy(ctx context.Context, name string, p rebound.Policy) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, ok := s.machines[name]
	if !ok {
		return rebound.Errorf(rebound.ENOTFOUND, "site %s holds no machine %q", s.cfg.Name, name)
	}
	if m.state.Spec == nil || m.state.Spec.Policy == p {
		return nil
	}
	old := m.state.Spec.Policy
	m.state.Spec.Policy = p
	if err := s.saveLocked(); err != nil {
		m.state.Spec.Policy = old
		return err
	}
	if m.policyC != nil {
		// The cutter takes the newest policy; an older unread one is dropped.
		select {
		case <-m.policyC:
		default:
		}
		m.policyC <- p
	}
	s.logger.Info("policy changed", "machine", name, "policy", p.Name, "crashInterval", p.CrashInterval, "retention", p.Retention)
	return nil
}

// StopReplication stops the stream on this side and drops its spool or
// journal; a source's disks stay active.
func (s *Site) StopReplication(ctx context.Context, name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, ok := s.machines[name]
	if !ok {
		return nil
	}
	switch m.state.Role {
	case RoleSource:
		s.pauseLocked(m)
		defer s.resumeLocked(m)
		if err := s.stopSource(m); err != nil {
			return err
		}
		_ = capture.Remove(filepath.Join(s.machineDir(name), "stream"))
		m.state.Role, m.state.Spec, m.state.Fenced = RoleActive, nil, false
		if err := s.openFiles(m); err != nil {
			return err
		}
		return s.saveLocked()
	case RoleTarget:
		if m.act != nil {
			return rebound.Errorf(rebound.ECONFLICT, "machine %q is failed over at site %s; commit or cancel first", name, s.cfg.Name)
		}
		err := s.closeMachine(m)
		delete(s.machines, name)
		return errors.Join(err, s.saveLocked(), os.RemoveAll(s.machineDir(name)))
	}
	return nil
}

// CutPoint appends a point mark to the source stream, around the freeze
// and thaw hooks for an app-consistent point.
func (s *Site) CutPoint(ctx context.Context, name string, kind rebound.PointKind) (rebound.RecoveryPoint, error) {
	s.mu.Lock()
	m, err := s.getLocked(name)
	var stream *capture.Stream
	if err == nil {
		if m.state.Role != RoleSource || m.stream == nil {
			err = rebound.Errorf(rebound.ECONFLICT, "machine %q is not replicated from site %s", name, s.cfg.Name)
		} else {
			stream = m.stream
		}
	}
	s.mu.Unlock()
	if err != nil {
		return rebound.RecoveryPoint{}, err
	}
	if st := stream.Stats().State; st == "syncing" || st == "resyncing" || st == "overflow" {
		return rebound.RecoveryPoint{}, rebound.Errorf(rebound.ECONFLICT, "machine %q is %s: no consistent point can be cut until it completes", name, st)
	}
	switch kind {
	case rebound.PointCrash:
		return stream.Mark(kind)
	case rebound.PointApp:
		s.mu.Lock()
		vm, hooks := m.vm, m.state.Hooks
		s.mu.Unlock()
		if hooks.Freeze != "" || hooks.Thaw != "" {
			return s.cutWithHooks(ctx, name, stream, hooks)
		}
		if vm != nil && vm.Running() {
			// The guest agent freezes the guest's filesystems around the
			// mark, and thaws them whatever happens.
			var p rebound.RecoveryPoint
			fctx, cancel := context.WithTimeout(ctx, s.cfg.HookTimeout)
			defer cancel()
			err := vm.FreezeThaw(fctx, func() (err error) {
				p, err = stream.Mark(kind)
				return err
			})
			if err != nil {
				return rebound.RecoveryPoint{}, rebound.Errorf(rebound.ECONFLICT, "app-consistent point of %s: %s", name, rebound.ErrorMessage(err))
			}
			return p, nil
		}
		if s.cfg.FreezeHook == "" {
			return rebound.RecoveryPoint{}, rebound.Errorf(rebound.ECONFLICT, "machine %q has no freeze hook and no running guest agent at site %s: set its hooks with rebound machine set %s --freeze-hook CMD --thaw-hook CMD", name, s.cfg.Name, name)
		}
		return s.cutWithHooks(ctx, name, stream, rebound.Hooks{Freeze: s.cfg.FreezeHook, Thaw: s.cfg.ThawHook})
	}
	return rebound.RecoveryPoint{}, rebound.Errorf(rebound.EINVALID, "unknown point kind %q", kind)
}

// cutWithHooks cuts an app-consistent point between the freeze and the
// thaw hook; the thaw hook runs whatever happens.
func (s *Site) cutWithHooks(ctx context.Context, name string, stream *capture.Stream, h rebound.Hooks) (rebound.RecoveryPoint, error) {
	if err := s.runHook(ctx, h.Freeze, name); err != nil {
		// Thaw even after a failed freeze: part of it may have frozen.
		_ = s.runHook(context.Background(), h.Thaw, name)
		return rebound.RecoveryPoint{}, rebound.Errorf(rebound.ECONFLICT, "freeze for app-consistent point failed: %v", err)
	}
	p, err := stream.Mark(rebound.PointApp)
	if terr := s.runHook(context.Background(), h.Thaw, name); terr != nil {
		s.logger.Error("thaw hook failed", "machine", name, "err", terr)
		if err == nil {
			err = rebound.Errorf(rebound.EINTERNAL, "thaw after app-consistent point failed: %v", terr)
		}
	}
	return p, err
}

// SetHooks sets a machine's own freeze and thaw hooks.
func (s *Site) SetHooks(ctx context.Context, name string, hooks rebound.Hooks) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, err := s.getLocked(name)
	if err != nil {
		return err
	}
	if m.state.Hooks == hooks {
		return nil
	}
	m.state.Hooks = hooks
	return s.saveLocked()
}

func (s *Site) targetJournal(name string) (*journal.Journal, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, err := s.getLocked(name)
	if err != nil {
		return nil, err
	}
	if m.state.Role != RoleTarget || m.journal == nil {
		return nil, rebound.Errorf(rebound.ECONFLICT, "site %s is not the recovery site of machine %q", s.cfg.Name, name)
	}
	return m.journal, nil
}

// ListPoints returns the target journal's points.
func (s *Site) ListPoints(ctx context.Context, name string) (*rebound.PointList, error) {
	j, err := s.targetJournal(name)
	if err != nil {
		return nil, err
	}
	pl := j.Points()
	return &pl, nil
}

// ResolvePoint turns a selector into a point of the target journal.
func (s *Site) ResolvePoint(ctx context.Context, name, selector string) (rebound.RecoveryPoint, error) {
	j, err := s.targetJournal(name)
	if err != nil {
		return rebound.RecoveryPoint{}, err
	}
	return j.Resolve(selector)
}

// Fence stops I/O on the source's exports and flushes.
func (s *Site) Fence(ctx context.Context, name string) (uint64, error) {
	s.mu.Lock()
	m, err := s.getLocked(name)
	if err != nil {
		s.mu.Unlock()
		return 0, err
	}
	if m.state.Role != RoleSource && m.state.Role != RoleActive {
		s.mu.Unlock()
		return 0, rebound.Errorf(rebound.ECONFLICT, "machine %q is not served at site %s", name, s.cfg.Name)
	}
	m.state.Fenced = true
	if err := s.saveLocked(); err != nil {
		s.mu.Unlock()
		return 0, err
	}
	disks := len(m.state.Disks)
	s.mu.Unlock()
	// Disconnect waits for in-flight requests, so the head below is final.
	for i := 0; i < disks; i++ {
		s.NBD.Disconnect(exportName(name, i, false))
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if m.stream != nil {
		if err := m.stream.Flush(); err != nil {
			return 0, err
		}
		return m.stream.Head(), nil
	}
	for _, f := range m.files {
		if err := f.Flush(); err != nil {
			return 0, err
		}
	}
	return 0, nil
}

// Unfence serves the machine's exports again.
func (s *Site) Unfence(ctx context.Context, name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, err := s.getLocked(name)
	if err != nil {
		return err
	}
	if !m.state.Fenced {
		return nil
	}
	m.state.Fenced = false
	return s.saveLocked()
}

// Replicated returns the highest sequence the target holds durably.
func (s *Site) Replicated(ctx context.Context, name string) (uint64, error) {
	j, err := s.targetJournal(name)
	if err != nil {
		return 0, err
	}
	return j.Durable(), nil
}

// Activate exports the journal's state at a point, with writes going to a
// new active copy.
func (s *Site) Activate(ctx context.Context, spec rebound.ActivateSpec) ([]rebound.Disk, error) {
	s.mu.Lock()
	m, err := s.getLocked(spec.Machine)
	if err == nil && (m.state.Role != RoleTarget || m.journal == nil) {
		err = rebound.Errorf(rebound.ECONFLICT, "site %s is not the recovery site of machine %q", s.cfg.Name, spec.Machine)
	}
	if err != nil {
		s.mu.Unlock()
		return nil, err
	}
	cur := m.act
	if spec.Test {
		cur = m.test
	}
	if cur != nil && cur.spec.Seq == spec.Seq && cur.spec.PointID == spec.PointID {
		s.mu.Unlock()
		return s.disksWithURIs(spec.Machine, m.state.Disks, spec.Test), nil
	}
	s.mu.Unlock()
	// Replace an earlier activation: its clients go, its writes are dropped.
	if cur != nil {
		if err := s.Deactivate(ctx, spec.Machine, spec.Test); err != nil {
			return nil, err
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := s.getLocked(spec.Machine); err != nil {
		return nil, err
	}
	if !spec.Test {
		// A new point: writes made on the previous one are gone, and so is
		// their tracking.
		s.removeTrackers(m.state.Name, len(m.state.Disks))
	}
	a, err := s.activate(m, spec)
	if err != nil {
		return nil, err
	}
	sp := spec
	if spec.Test {
		m.test, m.state.Test = a, &sp
	} else {
		m.act, m.state.Act = a, &sp
		s.setLiveLocked(m)
	}
	if err := s.saveLocked(); err != nil {
		return nil, err
	}
	return s.disksWithURIs(spec.Machine, m.state.Disks, spec.Test), nil
}

func (s *Site) activationDir(name string, test bool) string {
	if test {
		return filepath.Join(s.machineDir(name), "test-failover")
	}
	return filepath.Join(s.machineDir(name), "failover")
}

// activate opens a view of the journal at spec.Seq and overlays over it.
// Overlay files left by an earlier run are reopened, keeping their writes.
func (s *Site) activate(m *machine, spec rebound.ActivateSpec) (*activation, error) {
	view, err := m.journal.View(spec.Seq)
	if err != nil {
		return nil, err
	}
	a := &activation{spec: spec, view: view}
	dir := s.activationDir(m.state.Name, spec.Test)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		a.close()
		return nil, err
	}
	for i, d := range m.state.Disks {
		o, err := overlay.Open(filepath.Join(dir, fmt.Sprintf("disk%d.raw", i)), view.Disk(i), d.Size)
		if err != nil {
			a.close()
			return nil, err
		}
		a.disks = append(a.disks, o)
		if !spec.Test {
			t, err := capture.OpenTracker(s.trackerPath(m.state.Name, i), d.Size, 4096)
			if err != nil {
				a.close()
				return nil, err
			}
			a.trackers = append(a.trackers, t)
		}
	}
	return a, nil
}

// Deactivate drops an activation and everything written to it.
func (s *Site) Deactivate(ctx context.Context, name string, test bool) error {
	s.mu.Lock()
	m, ok := s.machines[name]
	if !ok {
		s.mu.Unlock()
		return nil
	}
	a := m.act
	if test {
		a = m.test
	}
	if a == nil {
		s.mu.Unlock()
		return nil
	}
	if test {
		m.test, m.state.Test = nil, nil
	} else {
		m.act, m.state.Act = nil, nil
		s.setLiveLocked(m)
	}
	// The VM on those disks goes with them.
	s.killVMLocked(m, test)
	err := s.saveLocked()
	s.mu.Unlock()
	for i := range m.state.Disks {
		s.NBD.Disconnect(exportName(name, i, test))
	}
	return errors.Join(err, a.close(), os.RemoveAll(s.activationDir(name, test)))
}

// Commit flattens the activation into the machine's disks at this site and
// drops the journal. The machine is then active here.
func (s *Site) Commit(ctx context.Context, name string, progress func(done, total int64)) error {
	s.mu.Lock()
	m, err := s.getLocked(name)
	if err != nil {
		s.mu.Unlock()
		return err
	}
	if m.state.Role == RoleActive {
		s.mu.Unlock()
		return nil // already committed
	}
	if m.state.Role != RoleTarget || m.act == nil {
		s.mu.Unlock()
		return rebound.Errorf(rebound.ECONFLICT, "machine %q is not failed over to site %s", name, s.cfg.Name)
	}
	a := m.act
	// What the old source wrote after the point (and the journal holds)
	// differs from this copy too: a reprotect must send it back.
	after := m.journal.RegionsAfter(a.spec.Seq)
	s.mu.Unlock()
	for i, t := range a.trackers {
		if i < len(after) {
			if err := t.MarkRegions(after[i]); err != nil {
				return err
			}
		}
		if err := t.Sync(); err != nil {
			return err
		}
	}

	var total int64
	for _, d := range m.state.Disks {
		total += d.Size
	}
	var base int64
	var last time.Time
	for i, d := range a.disks {
		err := d.Flatten(ctx, func(done, size int64) {
			// Each report crosses the control channel: a few a second.
			if progress != nil && (time.Since(last) > 200*time.Millisecond || done == size) {
				last = time.Now()
				progress(base+done, total)
			}
		})
		if err != nil {
			return fmt.Errorf("flatten disk %d: %w", i, err)
		}
		if err := d.Flush(); err != nil {
			return err
		}
		base += m.state.Disks[i].Size
	}

	// The flattened overlays become the active disks. Clients of the
	// failover exports (the VM) wait while the backends switch; test
	// failover clients go with their activation.
	for i := range m.state.Disks {
		s.NBD.Disconnect(exportName(name, i, true))
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pauseLocked(m)
	defer s.resumeLocked(m)
	var errs []error
	for _, x := range []*activation{m.act, m.test} {
		if x != nil {
			errs = append(errs, x.close())
		}
	}
	m.act, m.test = nil, nil
	if err := errors.Join(errs...); err != nil {
		return err
	}
	dir := s.activationDir(name, false)
	for i := range m.state.Disks {
		src := filepath.Join(dir, fmt.Sprintf("disk%d.raw", i))
		if err := os.Rename(src, s.diskPath(name, i)); err != nil {
			return err
		}
	}
	if err := m.journal.Close(); err != nil {
		return err
	}
	m.journal = nil
	m.state.Role, m.state.Spec, m.state.Act, m.state.Test, m.state.Fenced = RoleActive, nil, nil, nil, false
	// The committed copy starts a new history that descends from the one it
	// replicated.
	m.state.Parent, m.state.Generation = m.state.Generation, newGeneration()
	if err := s.openFiles(m); err != nil {
		return err
	}
	if err := s.saveLocked(); err != nil {
		return err
	}
	_ = os.RemoveAll(dir)
	_ = os.RemoveAll(s.activationDir(name, true))
	return journal.Remove(filepath.Join(s.machineDir(name), "journal"))
}

// Release stops serving and capturing a machine that was failed over
// elsewhere and committed. Its disks and stream stay, the seed for reprotect.
func (s *Site) Release(ctx context.Context, name string, failoverTime time.Time) error {
	s.mu.Lock()
	m, err := s.getLocked(name)
	if err != nil {
		s.mu.Unlock()
		if rebound.ErrorCode(err) == rebound.ENOTFOUND {
			return nil
		}
		return err
	}
	if m.state.Role == RoleReleased {
		s.mu.Unlock()
		return nil
	}
	m.state.Fenced = true
	s.killVMLocked(m, false)
	disks := len(m.state.Disks)
	s.mu.Unlock()
	s.disconnectAll(name, disks)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pauseLocked(m)
	err = errors.Join(s.closeFiles(m), s.stopSource(m))
	m.state.Role = RoleReleased
	s.resumeLocked(m)
	// A copy written after the failover diverged from the one that took
	// over: it is a new history, and reprotect must not trust it blindly.
	_, last, perr := capture.PendingRegions(s.streamDir(name), s.diskSpecs(m))
	s.spoolDamaged(name, perr) // then whether it took writes after the failover is unknown
	if perr == nil && !failoverTime.IsZero() && last.After(failoverTime) {
		m.state.Parent, m.state.Generation, m.state.Diverged = m.state.Generation, newGeneration(), true
		s.logger.Warn("released copy took writes after the failover: split brain", "machine", name, "lastWrite", last, "failover", failoverTime)
	}
	return errors.Join(err, s.saveLocked())
}
