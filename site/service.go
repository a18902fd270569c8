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
		u := m.unit
		ms := rebound.MachineStatus{Name: m.state.Name, Role: u.state.Role, Fenced: u.state.Fenced,
			VM: s.vmStatusLocked(m, false), TestVM: s.vmStatusLocked(m, true)}
		switch u.state.Role {
		case RoleActive, RoleSource:
			ms.Disks = s.disksWithURIs(m.state.Name, m.state.Disks, false)
		case RoleTarget:
			if u.act != nil {
				ms.Disks = s.disksWithURIs(m.state.Name, m.state.Disks, false)
			}
		}
		if u.stream != nil {
			cs := u.stream.Stats()
			ms.ReplState = cs.State
			ms.SyncDone, ms.SyncTotal = cs.SyncDone, cs.SyncTotal
			ms.HeadSeq, ms.AckedSeq = cs.HeadSeq, cs.AckedSeq
			ms.BacklogBytes, ms.DirtyBytes = cs.BacklogBytes, cs.DirtyBytes
			ms.LagSeconds, ms.ThroughputBps = cs.LagSeconds, cs.ThroughputBps
			ms.ThrottledWrites = cs.Throttled
			ms.ReplError = cs.Error
			if u.sender != nil {
				switch ss := u.sender.Stats(); {
				case ss.Stopped != "":
					// The stream cannot go on without a resync: say so.
					to := "SITE"
					if u.state.Spec != nil {
						to = u.state.Spec.PeerSite
					}
					ms.ReplState = "broken"
					ms.ReplError = strings.TrimSpace(fmt.Sprintf("%s %s: run `rebound unprotect %s --wait`, then `rebound protect %s --to %s --wait`",
						ms.ReplError, ss.Stopped, u.name, u.name, to))
				case !ss.Connected && ms.ReplState == "streaming":
					ms.ReplState = "spooling"
				}
			}
		}
		if u.journal != nil {
			ms.DurableSeq = u.journal.Durable()
			if p, ok := u.journal.NewestPoint(); ok {
				ms.Consistent, ms.LastPointTime = true, p.Time
			}
			ms.Activated, ms.TestActivated = u.act != nil, u.test != nil
			if _, _, _, repairing := u.journal.Repairing(); repairing || u.journal.Corrupt() != nil {
				ms.ReplError = journalDamage(s.cfg.Name, u, u.journal)
			}
		}
		st.Machines = append(st.Machines, ms)
	}
	// A group's stream is reported under the group's name too: its
	// members' entries carry the stream's figures; the disks are theirs in
	// unit order.
	byName := map[string]rebound.MachineStatus{}
	for _, e := range st.Machines {
		byName[e.Name] = e
	}
	for _, u := range s.units {
		if u.lone() {
			continue
		}
		ms := byName[u.members[0].state.Name]
		ms.Name, ms.VM, ms.TestVM, ms.Disks = u.name, nil, nil, nil
		for _, m := range u.members {
			ms.Disks = append(ms.Disks, byName[m.state.Name].Disks...)
		}
		ms.Members = memberNames(u)
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
	m := &machine{state: machineState{Name: req.Name, Disks: disks, VM: req.VM}}
	u := newUnit(req.Name, unitFields{Role: RoleActive, Generation: newGeneration()}, []*machine{m})
	if err := s.openFiles(m); err != nil {
		s.closeFiles(m)
		return err
	}
	s.addUnitLocked(u)
	return s.saveLocked(u)
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

// DeleteMachine stops serving the machine and removes its files, and its
// unit's.
func (s *Site) DeleteMachine(ctx context.Context, name string) error {
	s.mu.Lock()
	m, ok := s.machines[name]
	if !ok {
		s.mu.Unlock()
		return nil
	}
	u := m.unit
	if !u.lone() {
		s.mu.Unlock()
		return rebound.Errorf(rebound.ECONFLICT, "machine %q is a member of group %s at site %s; remove it from the group first", name, u.name, s.cfg.Name)
	}
	s.dropUnitLocked(u)
	s.killVMLocked(m, false)
	s.killVMLocked(m, true)
	err := s.saveLocked()
	s.mu.Unlock()
	s.disconnectAll(name, len(m.state.Disks))
	s.mu.Lock()
	err = errors.Join(err, s.closeUnit(u))
	s.mu.Unlock()
	return errors.Join(err, os.RemoveAll(s.machineDir(name)))
}

// disconnectUnit disconnects the exports of every member of u.
func (s *Site) disconnectUnit(u *unit) {
	for _, m := range u.members {
		s.disconnectAll(m.state.Name, len(m.state.Disks))
	}
}

func (s *Site) disconnectAll(name string, disks int) {
	for i := 0; i < disks; i++ {
		s.NBD.Disconnect(exportName(name, i, false))
		s.NBD.Disconnect(exportName(name, i, true))
	}
}

// StartReplication makes this site the source or target of a stream. The
// stream is the unit's of spec.Machine: a source captures all its members'
// disks into it.
func (s *Site) StartReplication(ctx context.Context, spec rebound.ReplicationSpec) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch spec.Role {
	case RoleSource:
		if len(spec.Members) > 0 {
			if u, ok := s.units[spec.Machine]; !ok || !sameMembers(u, spec.Members) {
				return s.regroupSourceLocked(spec)
			}
		}
		m, u, err := s.unitLocked(spec.Machine)
		if err != nil {
			return err
		}
		if len(spec.Members) == 0 && spec.Hooks != nil && m.state.Hooks != *spec.Hooks {
			m.state.Hooks = *spec.Hooks
			if err := s.saveLocked(m.unit); err != nil {
				return err
			}
		}
		if u.state.Role == RoleSource {
			if u.state.Spec != nil && u.state.Spec.StreamID == spec.StreamID {
				return nil
			}
			return rebound.Errorf(rebound.ECONFLICT, "machine %q already replicates as stream %q", spec.Machine, u.state.Spec.StreamID)
		}
		if u.state.Role != RoleActive {
			return rebound.Errorf(rebound.ECONFLICT, "machine %q is %s at site %s; only an active machine can be a source", spec.Machine, u.state.Role, s.cfg.Name)
		}
		if spec.PeerAddr == "" {
			return rebound.Errorf(rebound.EINVALID, "a source needs the peer's replication address")
		}
		// A fresh stream starts with a full copy, or for a delta seed with
		// the given regions plus every write tracked since the failover.
		seed := allDisks
		if spec.Seed == rebound.SeedDelta {
			seed = s.deltaSeed(u, spec.Regions)
		}
		_ = capture.Remove(s.streamDir(u))
		// Connected clients (a running VM) wait while the disks move from
		// plain files to the capture stream.
		s.pauseLocked(u)
		defer s.resumeLocked(u)
		if err := s.closeUnitFiles(u); err != nil {
			return err
		}
		sp := spec
		u.state.Role, u.state.Spec = RoleSource, &sp
		if err := s.startSourceSeed(u, seed); err != nil {
			u.state.Role, u.state.Spec = RoleActive, nil
			return errors.Join(err, s.openUnitFiles(u))
		}
		if err := s.saveLocked(u); err != nil {
			return err
		}
		// The stream's dirty map holds the regions now.
		s.removeUnitTrackers(u)
		return nil
	case RoleTarget:
		if len(spec.Members) > 0 {
			if u, ok := s.units[spec.Machine]; !ok || !sameMembers(u, spec.Members) {
				return s.regroupTargetLocked(spec)
			}
		}
		var adopt []string // the released disks that become the journal's base
		var old *unit
		if u, ok := s.unitOf(spec.Machine); ok {
			if u.state.Role == RoleTarget && u.state.Spec != nil && u.state.Spec.StreamID == spec.StreamID {
				return nil
			}
			if !spec.AdoptDisks || u.state.Role != RoleReleased {
				return rebound.Errorf(rebound.ECONFLICT, "site %s already holds machine %q as %s", s.cfg.Name, spec.Machine, u.state.Role)
			}
			if u.name != spec.Machine {
				return rebound.Errorf(rebound.ECONFLICT, "machine %q is a member of group %s at site %s; its disks are adopted with the group's", spec.Machine, u.name, s.cfg.Name)
			}
			adopt, old = s.detachedPaths(u), u
		} else if spec.AdoptDisks {
			return rebound.Errorf(rebound.ECONFLICT, "site %s holds no disks of machine %q to adopt", s.cfg.Name, spec.Machine)
		}
		sp := spec
		u := newUnit(spec.Machine, unitFields{Role: RoleTarget, Spec: &sp, Generation: spec.Generation}, specMachines(spec))
		if err := s.startTarget(u, adopt); err != nil {
			return err
		}
		if old != nil {
			s.dropUnitLocked(old)
		}
		s.addUnitLocked(u)
		return s.saveLocked(u)
	}
	return rebound.Errorf(rebound.EINVALID, "unknown replication role %q", spec.Role)
}

// specMachines are the machines a target unit of spec holds: its members,
// or the one machine it names.
func specMachines(spec rebound.ReplicationSpec) []*machine {
	if len(spec.Members) == 0 {
		return []*machine{{state: machineState{Name: spec.Machine, Disks: spec.Disks, VM: spec.VM}}}
	}
	var ms []*machine
	for _, md := range spec.Members {
		ms = append(ms, &machine{state: machineState{Name: md.Name, Disks: md.Disks, VM: md.VM}})
	}
	return ms
}

// startTarget opens a new journal for the target unit u over its disks,
// empty or (adopt) over the released disk files at those paths.
func (s *Site) startTarget(u *unit, adopt []string) error {
	dir := filepath.Join(s.unitDir(u), "journal")
	if adopt != nil {
		// The old disks become the journal's base: the delta resync
		// lands on top of them. A journal directory is removed only
		// while every disk is still in place (then it is stale): after
		// a crash between Adopt and the state save it holds the
		// adopted disks, the only seed. Adopt resumes a partial move,
		// and a complete one (meta written; no stream could land
		// before the save) is opened as it is.
		inPlace := true
		for _, p := range adopt {
			if _, err := os.Stat(p); err != nil {
				inPlace = false
			}
		}
		if inPlace {
			_ = journal.Remove(dir)
		}
		if err := journal.Adopt(dir, u.disks(), adopt); err != nil {
			if _, serr := os.Stat(filepath.Join(dir, "meta.json")); serr != nil || rebound.ErrorCode(err) != rebound.ECONFLICT {
				return err
			}
			s.logger.Warn("reusing the journal an interrupted adopt left", "machine", u.name)
		}
	} else {
		_ = journal.Remove(dir)
	}
	for _, d := range append([]string{s.unitDir(u)}, memberDirs(s, u)...) {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}
	j, err := journal.Open(dir, u.disks(), s.journalOptions(u.name))
	if err != nil {
		return err
	}
	u.journal = j
	s.startExpiry(u, j)
	return nil
}

func memberDirs(s *Site, u *unit) []string {
	var dirs []string
	for _, m := range u.members {
		dirs = append(dirs, s.machineDir(m.state.Name))
	}
	return dirs
}

// startExpiry folds records older than the retention window into the base.
// The window is read at every pass, so a policy change (SetPolicy) applies
// without reopening the journal.
func (s *Site) startExpiry(u *unit, j *journal.Journal) {
	name := u.name
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
			cur, ok := s.units[name]
			live := ok && cur == u && u.journal == j
			var retention time.Duration
			if live && u.state.Spec != nil {
				retention = time.Duration(u.state.Spec.Policy.Retention)
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
	u, ok := s.unitOf(name)
	if !ok {
		return rebound.Errorf(rebound.ENOTFOUND, "site %s holds no machine %q", s.cfg.Name, name)
	}
	if u.state.Spec == nil || u.state.Spec.Policy == p {
		return nil
	}
	old := u.state.Spec.Policy
	u.state.Spec.Policy = p
	if err := s.saveLocked(u); err != nil {
		u.state.Spec.Policy = old
		return err
	}
	if u.stream != nil {
		if err := u.stream.SetCongestion(p.Congestion); err != nil {
			return err
		}
	}
	if u.policyC != nil {
		// The cutter takes the newest policy; an older unread one is dropped.
		select {
		case <-u.policyC:
		default:
		}
		u.policyC <- p
	}
	s.logger.Info("policy changed", "machine", name, "policy", p.Name, "crashInterval", p.CrashInterval, "retention", p.Retention, "congestion", p.Congestion)
	return nil
}

// StopReplication stops the stream on this side and drops its spool or
// journal; a source's disks stay active.
func (s *Site) StopReplication(ctx context.Context, name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	u, ok := s.unitOf(name)
	if !ok {
		return nil
	}
	switch u.state.Role {
	case RoleActive:
		if !u.lone() {
			return s.splitLocked(u)
		}
	case RoleSource:
		s.pauseLocked(u)
		defer s.resumeLocked(u)
		if err := s.stopSource(u); err != nil {
			return err
		}
		_ = capture.Remove(s.streamDir(u))
		u.state.Role, u.state.Spec, u.state.Fenced = RoleActive, nil, false
		if err := s.openUnitFiles(u); err != nil {
			return err
		}
		if err := s.saveLocked(u); err != nil {
			return err
		}
		if !u.lone() {
			// A group no longer replicated is its machines again.
			return s.splitLocked(u)
		}
		return nil
	case RoleTarget:
		if u.act != nil {
			return rebound.Errorf(rebound.ECONFLICT, "machine %q is failed over at site %s; commit or cancel first", name, s.cfg.Name)
		}
		err := s.closeUnit(u)
		s.dropUnitLocked(u)
		errs := []error{err, s.saveLocked()}
		for _, d := range append(memberDirs(s, u), s.unitDir(u)) {
			errs = append(errs, os.RemoveAll(d))
		}
		return errors.Join(errs...)
	}
	return nil
}

// CutPoint appends a point mark to the source stream, around the freeze
// and thaw hooks for an app-consistent point.
func (s *Site) CutPoint(ctx context.Context, name string, kind rebound.PointKind) (rebound.RecoveryPoint, error) {
	s.mu.Lock()
	m, u, err := s.unitLocked(name)
	var stream *capture.Stream
	lone := false
	if err == nil {
		if u.state.Role != RoleSource || u.stream == nil {
			err = rebound.Errorf(rebound.ECONFLICT, "machine %q is not replicated from site %s", name, s.cfg.Name)
		} else {
			stream, lone = u.stream, u.lone()
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
		if !lone {
			return s.cutGroupApp(ctx, u, stream)
		}
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
	return s.saveLocked(m.unit)
}

func (s *Site) targetJournal(name string) (*journal.Journal, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, u, err := s.unitLocked(name)
	if err != nil {
		return nil, err
	}
	if u.state.Role != RoleTarget || u.journal == nil {
		return nil, rebound.Errorf(rebound.ECONFLICT, "site %s is not the recovery site of machine %q", s.cfg.Name, name)
	}
	return u.journal, nil
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

// QueryPoints returns one page of the target journal's points.
func (s *Site) QueryPoints(ctx context.Context, name string, q rebound.PointQuery) (*rebound.PointList, error) {
	j, err := s.targetJournal(name)
	if err != nil {
		return nil, err
	}
	pl := j.PointsPage(q)
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

// Fence stops I/O on the exports of the machine's unit (every member) and
// flushes: a unit fails over as a whole.
func (s *Site) Fence(ctx context.Context, name string) (uint64, error) {
	s.mu.Lock()
	_, u, err := s.unitLocked(name)
	if err != nil {
		s.mu.Unlock()
		return 0, err
	}
	if u.state.Role != RoleSource && u.state.Role != RoleActive {
		s.mu.Unlock()
		return 0, rebound.Errorf(rebound.ECONFLICT, "machine %q is not served at site %s", name, s.cfg.Name)
	}
	u.state.Fenced = true
	if err := s.saveLocked(u); err != nil {
		s.mu.Unlock()
		return 0, err
	}
	s.mu.Unlock()
	// Disconnect waits for in-flight requests, so the head below is final.
	for _, m := range u.members {
		for i := range m.state.Disks {
			s.NBD.Disconnect(exportName(m.state.Name, i, false))
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if u.stream != nil {
		if err := u.stream.Flush(); err != nil {
			return 0, err
		}
		return u.stream.Head(), nil
	}
	for _, m := range u.members {
		for _, f := range m.files {
			if err := f.Flush(); err != nil {
				return 0, err
			}
		}
	}
	return 0, nil
}

// Unfence serves the exports of the machine's unit again.
func (s *Site) Unfence(ctx context.Context, name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, u, err := s.unitLocked(name)
	if err != nil {
		return err
	}
	if !u.state.Fenced {
		return nil
	}
	u.state.Fenced = false
	return s.saveLocked(u)
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
// new active copy. It activates the machine's unit: every member's disks,
// which it returns in unit order.
func (s *Site) Activate(ctx context.Context, spec rebound.ActivateSpec) ([]rebound.Disk, error) {
	s.mu.Lock()
	_, u, err := s.unitLocked(spec.Machine)
	if err == nil && (u.state.Role != RoleTarget || u.journal == nil) {
		err = rebound.Errorf(rebound.ECONFLICT, "site %s is not the recovery site of machine %q", s.cfg.Name, spec.Machine)
	}
	if err != nil {
		s.mu.Unlock()
		return nil, err
	}
	cur := u.act
	if spec.Test {
		cur = u.test
	}
	if cur != nil && cur.spec.Seq == spec.Seq && cur.spec.PointID == spec.PointID {
		s.mu.Unlock()
		return s.unitDisksWithURIs(u, spec.Test), nil
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
	if cur, ok := s.unitOf(spec.Machine); !ok || cur != u {
		return nil, rebound.Errorf(rebound.ENOTFOUND, "machine %q is not held at site %s", spec.Machine, s.cfg.Name)
	}
	if !spec.Test {
		// A new point: writes made on the previous one are gone, and so is
		// their tracking.
		s.removeUnitTrackers(u)
	}
	a, err := s.activate(u, spec)
	if err != nil {
		return nil, err
	}
	sp := spec
	if spec.Test {
		u.test, u.state.Test = a, &sp
	} else {
		u.act, u.state.Act = a, &sp
		s.setLiveLocked(u)
	}
	if err := s.saveLocked(u); err != nil {
		return nil, err
	}
	return s.unitDisksWithURIs(u, spec.Test), nil
}

func (s *Site) activationDir(u *unit, test bool) string {
	if test {
		return filepath.Join(s.unitDir(u), "test-failover")
	}
	return filepath.Join(s.unitDir(u), "failover")
}

// activate opens a view of the journal at spec.Seq and overlays over it,
// one per disk of the unit (a member's disk i is overlay m.offset+i).
// Overlay files left by an earlier run are reopened, keeping their writes.
func (s *Site) activate(u *unit, spec rebound.ActivateSpec) (*activation, error) {
	view, err := u.journal.View(spec.Seq)
	if err != nil {
		return nil, err
	}
	a := &activation{spec: spec, view: view}
	dir := s.activationDir(u, spec.Test)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		a.close()
		return nil, err
	}
	for i, d := range u.disks() {
		o, err := overlay.Open(filepath.Join(dir, fmt.Sprintf("disk%d.raw", i)), view.Disk(i), d.Size)
		if err != nil {
			a.close()
			return nil, err
		}
		a.disks = append(a.disks, o)
		if !spec.Test {
			m, j := u.locate(i)
			t, err := capture.OpenTracker(s.trackerPath(m.state.Name, j), d.Size, 4096)
			if err != nil {
				a.close()
				return nil, err
			}
			a.trackers = append(a.trackers, t)
		}
	}
	return a, nil
}

// Deactivate drops an activation of the machine's unit and everything
// written to it.
func (s *Site) Deactivate(ctx context.Context, name string, test bool) error {
	s.mu.Lock()
	u, ok := s.unitOf(name)
	if !ok {
		s.mu.Unlock()
		return nil
	}
	a := u.act
	if test {
		a = u.test
	}
	if a == nil {
		s.mu.Unlock()
		return nil
	}
	if test {
		u.test, u.state.Test = nil, nil
	} else {
		u.act, u.state.Act = nil, nil
		s.setLiveLocked(u)
	}
	// The VMs on those disks go with them.
	for _, m := range u.members {
		s.killVMLocked(m, test)
	}
	err := s.saveLocked(u)
	dir := s.activationDir(u, test)
	s.mu.Unlock()
	for _, m := range u.members {
		for i := range m.state.Disks {
			s.NBD.Disconnect(exportName(m.state.Name, i, test))
		}
	}
	return errors.Join(err, a.close(), os.RemoveAll(dir))
}

// Commit flattens the activation into the disks of the machine's unit at
// this site and drops the journal. The unit is then active here.
func (s *Site) Commit(ctx context.Context, name string, progress func(done, total int64)) error {
	s.mu.Lock()
	_, u, err := s.unitLocked(name)
	if err != nil {
		s.mu.Unlock()
		return err
	}
	if u.state.Role == RoleActive {
		s.mu.Unlock()
		return nil // already committed
	}
	if u.state.Role != RoleTarget || u.act == nil {
		s.mu.Unlock()
		return rebound.Errorf(rebound.ECONFLICT, "machine %q is not failed over to site %s", name, s.cfg.Name)
	}
	a := u.act
	disks := u.disks()
	// What the old source wrote after the point (and the journal holds)
	// differs from this copy too: a reprotect must send it back.
	after := u.journal.RegionsAfter(a.spec.Seq)
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
	for _, d := range disks {
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
		base += disks[i].Size
	}

	// The flattened overlays become the active disks. Clients of the
	// failover exports (the VMs) wait while the backends switch; test
	// failover clients go with their activation.
	for _, m := range u.members {
		for i := range m.state.Disks {
			s.NBD.Disconnect(exportName(m.state.Name, i, true))
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pauseLocked(u)
	defer s.resumeLocked(u)
	var errs []error
	for _, x := range []*activation{u.act, u.test} {
		if x != nil {
			errs = append(errs, x.close())
		}
	}
	u.act, u.test = nil, nil
	if err := errors.Join(errs...); err != nil {
		return err
	}
	dir := s.activationDir(u, false)
	for i := range disks {
		src := filepath.Join(dir, fmt.Sprintf("disk%d.raw", i))
		if err := os.Rename(src, s.unitDiskPath(u, i)); err != nil {
			return err
		}
	}
	if err := u.journal.Close(); err != nil {
		return err
	}
	u.journal = nil
	u.state.Role, u.state.Spec, u.state.Act, u.state.Test, u.state.Fenced = RoleActive, nil, nil, nil, false
	// The committed copy starts a new history that descends from the one it
	// replicated.
	u.state.Parent, u.state.Generation = u.state.Generation, newGeneration()
	if err := s.openUnitFiles(u); err != nil {
		return err
	}
	if err := s.saveLocked(u); err != nil {
		return err
	}
	_ = os.RemoveAll(dir)
	_ = os.RemoveAll(s.activationDir(u, true))
	return journal.Remove(filepath.Join(s.unitDir(u), "journal"))
}

// Release stops serving and capturing the machine's unit, failed over
// elsewhere and committed. Its disks and stream stay, the seed for
// reprotect.
func (s *Site) Release(ctx context.Context, name string, failoverTime time.Time) error {
	s.mu.Lock()
	_, u, err := s.unitLocked(name)
	if err != nil {
		s.mu.Unlock()
		if rebound.ErrorCode(err) == rebound.ENOTFOUND {
			return nil
		}
		return err
	}
	if u.state.Role == RoleReleased {
		s.mu.Unlock()
		return nil
	}
	u.state.Fenced = true
	for _, m := range u.members {
		s.killVMLocked(m, false)
	}
	s.mu.Unlock()
	s.disconnectUnit(u)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pauseLocked(u)
	err = errors.Join(s.closeUnitFiles(u), s.stopSource(u))
	u.state.Role = RoleReleased
	s.resumeLocked(u)
	// A copy written after the failover diverged from the one that took
	// over: it is a new history, and reprotect must not trust it blindly.
	_, last, perr := capture.PendingRegions(s.streamDir(u), s.diskSpecs(u))
	s.spoolDamaged(u.name, perr) // then whether it took writes after the failover is unknown
	if perr == nil && !failoverTime.IsZero() && last.After(failoverTime) {
		u.state.Parent, u.state.Generation, u.state.Diverged = u.state.Generation, newGeneration(), true
		s.logger.Warn("released copy took writes after the failover: split brain", "machine", u.name, "lastWrite", last, "failover", failoverTime)
	}
	return errors.Join(err, s.saveLocked(u))
}
