package site

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/capture"
	"github.com/rebound-dr/rebound/internal/fsutil"
	"github.com/rebound-dr/rebound/journal"
)

// Regrouping: a ReplicationSpec with Members whose unit does not exist here
// with exactly those members moves the members into a new unit (a group's
// stream) without a full copy. See docs/design/groups.md ("Joining and
// leaving"). The server calls the source first, then the target: the
// source stops the members' old streams before the target folds their
// journals, so no record reaches an old journal after it was folded.

// sameMembers reports whether u's members are the spec's, in order.
func sameMembers(u *unit, ms []rebound.MemberDisks) bool {
	if len(u.members) != len(ms) {
		return false
	}
	for i, m := range u.members {
		if m.state.Name != ms[i].Name {
			return false
		}
	}
	return true
}

// memberSet is the set of a spec's member names.
func memberSet(spec rebound.ReplicationSpec) map[string]bool {
	in := map[string]bool{}
	for _, md := range spec.Members {
		in[md.Name] = true
	}
	return in
}

// checkMembers checks a group spec's shape: members named once, not the
// group's own name, and the stream's disks their disks in member order.
func checkMembers(spec rebound.ReplicationSpec) error {
	var disks []rebound.Disk
	seen := map[string]bool{}
	for _, m := range spec.Members {
		if m.Name == "" || m.Name == spec.Machine || seen[m.Name] || len(m.Disks) == 0 {
			return rebound.Errorf(rebound.EINVALID, "group %s: bad member %q (members need a name of their own, once, and disks)", spec.Machine, m.Name)
		}
		seen[m.Name] = true
		disks = append(disks, m.Disks...)
	}
	if !sameDisks(disks, spec.Disks) {
		return rebound.Errorf(rebound.EINVALID, "group %s: the stream's disks are not its members' disks in order", spec.Machine)
	}
	return nil
}

// oldUnits returns the distinct units the spec's members are in now, and
// the members this site does not hold.
func (s *Site) oldUnits(spec rebound.ReplicationSpec) (olds []*unit, missing []string) {
	for _, md := range spec.Members {
		m, ok := s.machines[md.Name]
		if !ok {
			missing = append(missing, md.Name)
			continue
		}
		if !sameDisks(m.state.Disks, md.Disks) {
			missing = append(missing, md.Name) // caught by the caller as a conflict
			continue
		}
		if !slices.Contains(olds, m.unit) {
			olds = append(olds, m.unit)
		}
	}
	if u, ok := s.units[spec.Machine]; ok && !slices.Contains(olds, u) {
		olds = append(olds, u) // a group losing every member it had
	}
	return olds, missing
}

// regroupSourceLocked makes the active or replicating members one source
// unit. A member that replicated (to this spec's peer) sends only what its
// old stream had not delivered; one that did not sends all of its disks.
// Members of the old units that are not in the spec stay active alone,
// with their undelivered regions in change maps, so protecting them alone
// again is a delta resync.
func (s *Site) regroupSourceLocked(spec rebound.ReplicationSpec) error {
	if err := checkMembers(spec); err != nil {
		return err
	}
	if spec.PeerAddr == "" {
		return rebound.Errorf(rebound.EINVALID, "a source needs the peer's replication address")
	}
	olds, missing := s.oldUnits(spec)
	if len(missing) > 0 {
		return rebound.Errorf(rebound.ECONFLICT, "group %s: site %s does not hold %v with those disks; members must be active here", spec.Machine, s.cfg.Name, missing)
	}
	for _, u := range olds {
		switch {
		case u.state.Role != RoleActive && u.state.Role != RoleSource:
			return rebound.Errorf(rebound.ECONFLICT, "group %s: %s is %s at site %s; only active machines join a group's stream", spec.Machine, u.name, u.state.Role, s.cfg.Name)
		case u.state.Fenced:
			return rebound.Errorf(rebound.ECONFLICT, "group %s: %s is fenced at site %s (a failover runs)", spec.Machine, u.name, s.cfg.Name)
		case u.state.Role == RoleSource && u.state.Spec != nil && u.state.Spec.PeerSite != spec.PeerSite:
			return rebound.Errorf(rebound.ECONFLICT, "group %s: %s replicates to %s, not %s", spec.Machine, u.name, u.state.Spec.PeerSite, spec.PeerSite)
		}
		if name := s.external(u); name != "" {
			return rebound.Errorf(rebound.EINVALID, "machine %s is a server's own disks (rebound agent): it replicates alone, not in a group", name)
		}
	}
	for _, u := range olds {
		s.pauseLocked(u)
	}
	// Every member's exports resume on its new unit's backends.
	var all []*machine
	for _, u := range olds {
		all = append(all, u.members...)
	}
	defer func() {
		for _, m := range all {
			for i, d := range m.live {
				d.b = currentLocked(m, i)
				d.mu.Unlock()
			}
		}
	}()
	// What each member must send, per its own disks.
	send := map[*machine][][]rebound.Region{}
	for _, u := range olds {
		var pending [][]rebound.Region
		if u.state.Role == RoleSource {
			if err := s.stopSource(u); err != nil {
				return err
			}
			p, _, err := capture.PendingRegions(s.streamDir(u), s.diskSpecs(u))
			if err != nil {
				s.logger.Warn("regroup: undelivered regions unknown; sending whole disks", "unit", u.name, "err", err)
				p = nil
				for _, d := range u.disks() {
					p = append(p, []rebound.Region{{Offset: 0, Length: d.Size}})
				}
			}
			pending = p
		}
		for _, m := range u.members {
			rs := make([][]rebound.Region, len(m.state.Disks))
			for i, d := range m.state.Disks {
				switch {
				case pending != nil:
					rs[i] = append(rs[i], pending[m.offset+i]...)
					if i < len(m.trackers) {
						rs[i] = append(rs[i], m.trackers[i].Regions()...)
					}
				default:
					// Never replicated to this peer: the target has nothing.
					rs[i] = []rebound.Region{{Offset: 0, Length: d.Size}}
				}
			}
			send[m] = rs
		}
		if err := s.closeUnitFiles(u); err != nil {
			return err
		}
	}
	// Leftovers keep their undelivered regions in change maps (written
	// before the old stream's spool is removed).
	in := memberSet(spec)
	var left []*unit
	for _, u := range olds {
		for _, m := range u.members {
			if in[m.state.Name] {
				continue
			}
			if err := s.trackRegions(m, send[m]); err != nil {
				return err
			}
			lu := newUnit(m.state.Name, unitFields{Role: RoleActive, Generation: newGeneration()}, []*machine{m})
			if err := s.openUnitFiles(lu); err != nil {
				return err
			}
			left = append(left, lu)
		}
	}
	var members []*machine
	var seed [][]rebound.Region
	for _, md := range spec.Members {
		m := s.machines[md.Name]
		members = append(members, m)
		seed = append(seed, send[m]...)
	}
	for _, u := range olds {
		_ = capture.Remove(s.streamDir(u))
		s.dropUnitLocked(u)
		if !u.lone() && u.name != spec.Machine {
			_ = os.RemoveAll(s.unitDir(u))
		}
	}
	sp := spec
	gen := spec.Generation
	if gen == "" {
		gen = newGeneration()
	}
	sp.Generation, sp.Regions, sp.Seed = gen, nil, rebound.SeedDelta
	u := newUnit(spec.Machine, unitFields{Role: RoleSource, Spec: &sp, Generation: gen}, members)
	if err := os.MkdirAll(s.unitDir(u), 0o700); err != nil {
		return err
	}
	_ = capture.Remove(s.streamDir(u))
	for i := range seed {
		seed[i] = rebound.MergeRegions(seed[i])
		if seed[i] == nil {
			seed[i] = []rebound.Region{}
		}
	}
	if err := s.startSourceSeed(u, seed); err != nil {
		return err
	}
	s.addUnitLocked(u)
	for _, lu := range left {
		s.addUnitLocked(lu)
	}
	if err := s.saveLocked(u); err != nil {
		return err
	}
	// The stream's dirty map holds the members' tracked regions now.
	s.removeUnitTrackers(u)
	s.logger.Info("regrouped stream", "group", spec.Machine, "members", len(members), "left", len(left))
	return nil
}

// trackRegions writes regions into m's change maps (created if missing),
// synced: a later delta resync of m alone sends them.
func (s *Site) trackRegions(m *machine, rs [][]rebound.Region) error {
	for i, d := range m.state.Disks {
		t, err := capture.OpenTracker(s.trackerPath(m.state.Name, i), d.Size, 4096)
		if err != nil {
			return err
		}
		if i < len(rs) {
			err = t.MarkRegions(rs[i])
		}
		err = errors.Join(err, t.Sync(), t.Close())
		if err != nil {
			return err
		}
	}
	return nil
}

// regroupTargetLocked makes the members' replicas one target unit. Each
// old journal is folded to its durable head, whose base files become the
// new journal's base; members this site does not hold start from zeroes
// (their source sends all of their disks). Members of old units that are
// not in the spec are kept as released copies, adopted by their own stream
// next. Old points end here: the new journal has no point until the
// source's delta resync ends.
//
// The file moves are recorded in state.json before the first one (the
// unit's Regroup), so a crash part way is finished at the next open
// (finishRegroup): no replica is lost or left half moved.
func (s *Site) regroupTargetLocked(spec rebound.ReplicationSpec) error {
	if err := checkMembers(spec); err != nil {
		return err
	}
	olds, missing := s.oldUnits(spec)
	for _, name := range missing {
		if _, ok := s.machines[name]; ok {
			return rebound.Errorf(rebound.ECONFLICT, "group %s: site %s holds %s with other disks", spec.Machine, s.cfg.Name, name)
		}
	}
	for _, u := range olds {
		switch {
		case u.state.Role != RoleTarget || u.journal == nil:
			return rebound.Errorf(rebound.ECONFLICT, "group %s: %s is %s at site %s; only replicas join a group's journal", spec.Machine, u.name, u.state.Role, s.cfg.Name)
		case u.act != nil || u.test != nil:
			return rebound.Errorf(rebound.ECONFLICT, "group %s: %s is failed over or in a test failover at site %s; finish it first", spec.Machine, u.name, s.cfg.Name)
		}
	}
	// Fold and close every old journal: its base then holds every
	// acknowledged record. A crash from here until the state is saved
	// reopens the old journals as they are (a fold changes no state).
	for _, u := range olds {
		if err := u.journal.FoldAll(); err != nil {
			return fmt.Errorf("group %s: fold the journal of %s: %w", spec.Machine, u.name, err)
		}
		if err := s.closeUnit(u); err != nil {
			return err
		}
	}
	sp := spec
	members := specMachines(spec)
	u := newUnit(spec.Machine, unitFields{Role: RoleTarget, Spec: &sp, Generation: spec.Generation}, members)
	if err := os.MkdirAll(s.unitDir(u), 0o700); err != nil {
		return err
	}
	// The old journals move aside: the new one may use the same directory
	// (a group changing members).
	in := &regroupIntent{}
	aside := map[*unit]string{}
	where := map[string]*unit{}
	for _, ou := range olds {
		dir := filepath.Join(s.unitDir(ou), "journal")
		aside[ou] = dir + ".regroup"
		if err := os.RemoveAll(aside[ou]); err != nil { // stale: no regroup is under way
			return err
		}
		in.Aside = append(in.Aside, fileMove{From: dir, To: aside[ou]})
		in.Remove = append(in.Remove, aside[ou])
		if !ou.lone() && ou.name != spec.Machine {
			in.Remove = append(in.Remove, s.unitDir(ou))
		}
		for _, m := range ou.members {
			where[m.state.Name] = ou
		}
	}
	for _, m := range members {
		ou, held := where[m.state.Name]
		var om *machine
		if held {
			for _, x := range ou.members {
				if x.state.Name == m.state.Name {
					om = x
				}
			}
		}
		for i, d := range m.state.Disks {
			if held {
				in.Adopt = append(in.Adopt, journal.BasePath(aside[ou], om.offset+i))
				continue
			}
			p := filepath.Join(s.unitDir(u), fmt.Sprintf("new-%s-%d.raw", m.state.Name, i))
			if err := zeroFile(p, d.Size); err != nil {
				return err
			}
			in.Adopt = append(in.Adopt, p)
		}
	}
	// Leftovers: their folded disks become released copies.
	inSpec := memberSet(spec)
	var left []*unit
	for _, ou := range olds {
		for _, m := range ou.members {
			if inSpec[m.state.Name] {
				continue
			}
			if err := os.MkdirAll(s.machineDir(m.state.Name), 0o700); err != nil {
				return err
			}
			for i := range m.state.Disks {
				in.Keep = append(in.Keep, fileMove{From: journal.BasePath(aside[ou], m.offset+i), To: s.diskPath(m.state.Name, i)})
			}
			lm := &machine{state: m.state}
			left = append(left, newUnit(m.state.Name, unitFields{Role: RoleReleased, Generation: ou.state.Generation}, []*machine{lm}))
		}
	}
	// The commit point: from here on the new units are the site's.
	u.state.Regroup = in
	for _, ou := range olds {
		s.dropUnitLocked(ou)
	}
	s.addUnitLocked(u)
	for _, lu := range left {
		s.addUnitLocked(lu)
	}
	if err := s.saveLocked(u); err != nil {
		return err
	}
	if s.regroupCrash != nil && s.regroupCrash() {
		return errRegroupCrash
	}
	remove, err := s.finishRegroup(u)
	if err != nil {
		return err
	}
	if err := s.saveLocked(u); err != nil {
		return err
	}
	if err := s.openTargetJournal(u); err != nil {
		return err
	}
	if err := removeAll(remove); err != nil {
		s.logger.Warn("regroup: remove old journals", "group", spec.Machine, "err", err)
	}
	s.logger.Info("regrouped journal", "group", spec.Machine, "members", len(members), "left", len(left))
	return nil
}

// fileMove is a rename a regroup still has to do.
type fileMove struct {
	From string `json:"from"`
	To   string `json:"to"`
}

// regroupIntent is what a target regroup still has to do, saved before it
// starts moving files.
type regroupIntent struct {
	Aside  []fileMove `json:"aside,omitempty"`  // old journal directories, out of the way
	Keep   []fileMove `json:"keep,omitempty"`   // leftovers' folded disks to their machines' files
	Adopt  []string   `json:"adopt"`            // the new journal's base files, in disk order
	Remove []string   `json:"remove,omitempty"` // left over once adopted
}

// moveOnce renames m.From to m.To unless an earlier run did. For a keep
// (a file that never comes back once moved) that is From gone and To
// there; a stale To is replaced. For an aside (a journal directory whose
// path the new journal may take again) it is To there: the regroup
// removed stale asides before it saved its intent.
func moveOnce(m fileMove, aside bool) error {
	_, ferr := os.Stat(m.From)
	_, terr := os.Stat(m.To)
	switch {
	case aside && terr == nil, os.IsNotExist(ferr) && terr == nil:
		return nil
	case os.IsNotExist(ferr):
		return rebound.Errorf(rebound.EINTERNAL, "regroup: neither %s nor %s exists", m.From, m.To)
	}
	if err := os.RemoveAll(m.To); err != nil {
		return err
	}
	if err := os.Rename(m.From, m.To); err != nil {
		return err
	}
	return fsutil.SyncDir(filepath.Dir(m.To))
}

// finishRegroup does the moves of u's saved regroup intent, each at most
// once, adopts the base files into u's journal, and clears the intent in
// memory; the caller saves the state, then removes the returned leftover
// directories. It runs right after the intent is saved and again at open
// after a crash.
func (s *Site) finishRegroup(u *unit) (remove []string, err error) {
	in := u.state.Regroup
	if in == nil {
		return nil, nil
	}
	for _, m := range in.Aside {
		if err := moveOnce(m, true); err != nil {
			return nil, fmt.Errorf("group %s: %w", u.name, err)
		}
	}
	for _, m := range in.Keep {
		if err := moveOnce(m, false); err != nil {
			return nil, fmt.Errorf("group %s: %w", u.name, err)
		}
	}
	dir := filepath.Join(s.unitDir(u), "journal")
	if _, err := os.Stat(filepath.Join(dir, "meta.json")); err != nil {
		if err := journal.Adopt(dir, u.disks(), in.Adopt); err != nil {
			return nil, fmt.Errorf("group %s: %w", u.name, err)
		}
	}
	for _, d := range memberDirs(s, u) {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	u.state.Regroup = nil
	return in.Remove, nil
}

// removeAll removes leftover directories of a finished regroup.
func removeAll(dirs []string) error {
	var errs []error
	for _, d := range dirs {
		errs = append(errs, os.RemoveAll(d))
	}
	return errors.Join(errs...)
}

// openTargetJournal opens a target unit's existing journal.
func (s *Site) openTargetJournal(u *unit) error {
	j, err := journal.Open(filepath.Join(s.unitDir(u), "journal"), u.disks(), s.journalOptions(u.name))
	if err != nil {
		return err
	}
	u.journal = j
	s.startExpiry(u, j)
	return nil
}

// zeroFile creates a sparse file of size bytes.
func zeroFile(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	return errors.Join(f.Truncate(size), f.Sync(), f.Close())
}

// splitLocked makes the members of an active unit lone units again (a
// group that stopped replicating). Their files stay open: the exports
// keep serving them.
func (s *Site) splitLocked(u *unit) error {
	s.dropUnitLocked(u)
	for _, m := range u.members {
		lu := &unit{name: m.state.Name, state: unitFields{Role: RoleActive, Generation: newGeneration()}, members: []*machine{m}}
		m.unit, m.offset = lu, 0
		s.addUnitLocked(lu)
	}
	err := s.saveLocked()
	return errors.Join(err, os.RemoveAll(s.unitDir(u)))
}

// cutGroupApp cuts one app-consistent point of a group: every member is
// frozen in parallel (its hooks, its VM's guest agent, or the site's
// hooks) within one time budget, one mark is cut, and every member is
// thawed, also when another's freeze failed. A member that cannot freeze
// fails the point, named in the error.
func (s *Site) cutGroupApp(ctx context.Context, u *unit, stream *capture.Stream) (rebound.RecoveryPoint, error) {
	type member struct {
		name   string
		freeze func(ctx context.Context, cut func() error) error
	}
	s.mu.Lock()
	var ms []member
	var missing []string
	for _, m := range u.members {
		name, vm, hooks := m.state.Name, m.vm, m.state.Hooks
		switch {
		case hooks.Freeze != "" || hooks.Thaw != "":
		case vm != nil && vm.Running():
			ms = append(ms, member{name, vm.FreezeThaw})
			continue
		case s.cfg.FreezeHook != "":
			hooks = rebound.Hooks{Freeze: s.cfg.FreezeHook, Thaw: s.cfg.ThawHook}
		default:
			missing = append(missing, name)
			continue
		}
		ms = append(ms, member{name, func(ctx context.Context, cut func() error) error {
			if err := s.runHook(ctx, hooks.Freeze, name); err != nil {
				// Thaw even after a failed freeze: part of it may have frozen.
				_ = s.runHook(context.Background(), hooks.Thaw, name)
				return fmt.Errorf("freeze hook: %w", err)
			}
			err := cut()
			if terr := s.runHook(context.Background(), hooks.Thaw, name); terr != nil {
				s.logger.Error("thaw hook failed", "machine", name, "err", terr)
				err = errors.Join(err, fmt.Errorf("thaw hook: %w", terr))
			}
			return err
		}})
	}
	s.mu.Unlock()
	if len(missing) > 0 {
		return rebound.RecoveryPoint{}, rebound.Errorf(rebound.ECONFLICT, "app-consistent point of group %s: %s have no freeze hook and no running guest agent at site %s: set hooks with rebound machine set NAME --freeze-hook CMD --thaw-hook CMD",
			u.name, strings.Join(missing, ", "), s.cfg.Name)
	}
	// One budget for every freeze; thaws run whatever happens (each
	// member's freeze func thaws on its own context).
	fctx, cancel := context.WithTimeout(ctx, s.cfg.HookTimeout)
	defer cancel()
	release := make(chan struct{})
	frozen := make(chan int, len(ms))
	errs := make([]error, len(ms))
	returned := make(chan int, len(ms))
	var wg sync.WaitGroup
	for i, m := range ms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = m.freeze(fctx, func() error {
				frozen <- i
				<-release
				return nil
			})
			returned <- i
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	// Wait until every member is frozen, one returns before the cut (its
	// freeze failed), or the budget ends.
	n := 0
	failed := false
	for n < len(ms) && !failed {
		select {
		case <-frozen:
			n++
		case <-returned:
			failed = true
		case <-fctx.Done():
			failed = true
		}
	}
	var p rebound.RecoveryPoint
	var cutErr error
	if !failed {
		p, cutErr = stream.Mark(rebound.PointApp)
	}
	close(release)
	<-done
	var bad []string
	for i, err := range errs {
		if err != nil {
			bad = append(bad, fmt.Sprintf("%s: %s", ms[i].name, rebound.ErrorMessage(err)))
		}
	}
	if failed && len(bad) == 0 {
		bad = append(bad, fmt.Sprintf("the freezes did not finish within %s", s.cfg.HookTimeout))
	}
	if len(bad) > 0 || cutErr != nil {
		if cutErr != nil {
			bad = append(bad, cutErr.Error())
		}
		return rebound.RecoveryPoint{}, rebound.Errorf(rebound.ECONFLICT, "app-consistent point of group %s failed (every member was thawed): %s", u.name, strings.Join(bad, "; "))
	}
	return p, nil
}

// errRegroupCrash is returned where a test stops a regroup as a crash
// would (Site.regroupCrash).
var errRegroupCrash = errors.New("site: simulated crash in a regroup")
