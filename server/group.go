package server

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/rebound-dr/rebound"
)

// Replication groups. A group's lifecycle is one record in the machines
// table with Members set: every lifecycle verb given the group's name runs
// the machine job on it, and the sites act on the group's stream unit. Its
// members mirror the record's lifecycle fields (mirrorMembers) and refuse
// verbs of their own (memberRefused). See docs/design/groups.md.

var _ rebound.GroupService = (*Server)(nil)

// groupView is the API's view of a group's record.
func groupView(m *rebound.Machine) rebound.Group {
	g := rebound.Group{
		Name: m.Name, Machines: append([]string{}, m.Members...), State: m.State, ActiveSite: m.ActiveSite,
		Health: m.Health, HealthReason: m.HealthReason, Protection: m.Protection, Failover: m.Failover,
		TestFailover: m.TestFailover, CreatedAt: m.CreatedAt.UTC().Format(time.RFC3339),
	}
	if p := m.Protection; p != nil {
		g.SourceSite, g.TargetSite, g.Policy, g.LagSeconds = p.SourceSite, p.TargetSite, p.Policy, p.LagSeconds
	}
	return g
}

// ListGroups returns every replication group.
func (s *Server) ListGroups(ctx context.Context) ([]rebound.Group, error) {
	ms, err := s.listMachines(ctx)
	if err != nil {
		return nil, err
	}
	out := []rebound.Group{}
	for i := range ms {
		if len(ms[i].Members) > 0 {
			out = append(out, groupView(&ms[i]))
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// GetGroup returns a replication group.
func (s *Server) GetGroup(ctx context.Context, name string) (*rebound.Group, error) {
	m, err := s.getMachine(ctx, name)
	if rebound.ErrorCode(err) == rebound.ENOTFOUND || err == nil && len(m.Members) == 0 {
		return nil, rebound.Errorf(rebound.ENOTFOUND, "group %q not found; rebound group list shows the groups", name)
	}
	if err != nil {
		return nil, err
	}
	g := groupView(m)
	return &g, nil
}

// memberRefused refuses a machine verb on a group's member: the group's
// machines fail over, commit and resync together.
func memberRefused(m *rebound.Machine) error {
	if m.Group == "" {
		return nil
	}
	return rebound.Errorf(rebound.ECONFLICT, "machine %s replicates in group %s, whose lifecycle verbs act on all its machines: give --group %s instead of %s", m.Name, m.Group, m.Group, m.Name)
}

// memberSpecs are the stream members of a group record, from the members'
// records.
func (s *Server) memberSpecs(ctx context.Context, g *rebound.Machine) ([]rebound.MemberDisks, error) {
	var out []rebound.MemberDisks
	for _, name := range g.Members {
		m, err := s.DB.GetMachine(ctx, name)
		if err != nil {
			return nil, fmt.Errorf("group %s: member %s: %w", g.Name, name, err)
		}
		out = append(out, rebound.MemberDisks{Name: m.Name, Disks: diskShapes(m.Disks), VM: m.VM})
	}
	return out, nil
}

// streamSpec is the part of a ReplicationSpec that names a record's
// stream: a machine's own, or a group's with its members.
func (s *Server) streamSpec(ctx context.Context, m *rebound.Machine) (rebound.ReplicationSpec, error) {
	spec := rebound.ReplicationSpec{Machine: m.Name, Disks: diskShapes(m.Disks), VM: m.VM}
	if len(m.Members) == 0 {
		if h := m.Settings.Hooks(); h != (rebound.Hooks{}) {
			spec.Hooks = &h
		}
		return spec, nil
	}
	ms, err := s.memberSpecs(ctx, m)
	if err != nil {
		return spec, err
	}
	spec.Members, spec.Disks, spec.VM = ms, nil, nil
	for _, md := range ms {
		spec.Disks = append(spec.Disks, md.Disks...)
	}
	return spec, nil
}

// vmMachines are the records whose VMs a job on m starts and stops: m, or
// a group's members.
func (s *Server) vmMachines(ctx context.Context, m *rebound.Machine) []*rebound.Machine {
	if len(m.Members) == 0 {
		if m.VM != nil {
			return []*rebound.Machine{m}
		}
		return nil
	}
	var out []*rebound.Machine
	for _, name := range m.Members {
		if mm, err := s.DB.GetMachine(ctx, name); err == nil && mm.VM != nil {
			out = append(out, mm)
		}
	}
	return out
}

// mirrorMembers copies a group record's lifecycle onto its members'
// records; each member's disks are its slice of the group's. Called with
// machMu held, after the group's record was stored.
func (s *Server) mirrorMembers(ctx context.Context, g *rebound.Machine) error {
	off := 0
	for _, name := range g.Members {
		var n int
		var err error
		for try := 0; try < machineRetries; try++ {
			if n, err = s.mirrorMember(ctx, g, name, off); !isMachineChanged(err) {
				break
			}
		}
		if err != nil {
			return err
		}
		off += n
	}
	return nil
}

// mirrorMember is mirrorMembers for one member whose disks start at off in
// the group's; it returns the member's disk count.
func (s *Server) mirrorMember(ctx context.Context, g *rebound.Machine, name string, off int) (int, error) {
	{
		m, err := s.DB.GetMachine(ctx, name)
		if err != nil {
			return 0, fmt.Errorf("group %s: member %s: %w", g.Name, name, err)
		}
		s.live.overlay(m)
		n := len(m.Disks)
		m.Group, m.State, m.ActiveSite, m.PreviousSite = g.Name, g.State, g.ActiveSite, g.PreviousSite
		if off+n <= len(g.Disks) {
			for i := range m.Disks {
				m.Disks[i].NBD = g.Disks[off+i].NBD
			}
		}
		m.Protection = mirrorProtection(g.Protection, m.Protection)
		m.Failover = nil
		if g.Failover != nil {
			f := *g.Failover
			m.Failover = &f
		}
		m.TestFailover = nil
		if t := g.TestFailover; t != nil {
			mt := &rebound.TestFailover{Site: t.Site, Point: t.Point}
			if off+n <= len(t.Disks) {
				mt.Disks = append([]rebound.Disk(nil), t.Disks[off:off+n]...)
			}
			m.TestFailover = mt
		}
		if g.Protection == nil {
			s.setHealth(ctx, m)
		}
		if err := s.DB.UpdateMachine(ctx, m); err != nil {
			return 0, err
		}
		s.live.record(m)
		return n, nil
	}
}

// mirrorProtection is the group's protection with the member's own
// reported figures kept (each member is reported with the stream's).
func mirrorProtection(g, own *rebound.Protection) *rebound.Protection {
	if g == nil {
		return nil
	}
	p := *g
	if own != nil && own.SourceSite == g.SourceSite && own.TargetSite == g.TargetSite {
		p.ReplState, p.LagSeconds, p.BacklogBytes, p.ThroughputBps = own.ReplState, own.LagSeconds, own.BacklogBytes, own.ThroughputBps
	}
	return &p
}

// protectGroup protects req.Machine in group req.Group: it creates the
// group, or moves the machine into the group's stream. A machine already
// protected to the group's target joins without a full copy: its replica
// and the group's are folded and adopted by the new stream, which sends
// only what neither had (site/group.go).
func (s *Server) protectGroup(ctx context.Context, req rebound.ProtectRequest) (*rebound.Job, error) {
	if err := validName(req.Group); err != nil {
		return nil, err
	}
	m, err := s.DB.GetMachine(ctx, req.Machine)
	if err != nil {
		return nil, err
	}
	switch {
	case len(m.Members) > 0:
		return nil, rebound.Errorf(rebound.EINVALID, "%s is a group; protect its machines with --group %s", m.Name, m.Name)
	case m.Group == req.Group && m.State == rebound.MachineProtected:
		g, err := s.DB.GetMachine(ctx, req.Group)
		if err != nil {
			return nil, err
		}
		if req.Policy != "" && g.Protection != nil && g.Protection.Policy != req.Policy {
			// A named policy changes the group's, as it does a machine's.
			pol, err := s.DB.GetPolicy(ctx, req.Policy)
			if err != nil {
				return nil, err
			}
			return s.changePolicy(ctx, g, pol)
		}
		return s.doneJob(ctx, "protect", req.Group, fmt.Sprintf("machine %s is already protected in group %s", m.Name, req.Group))
	case m.Group != "" && m.Group != req.Group:
		return nil, rebound.Errorf(rebound.ECONFLICT, "machine %s replicates in group %s; take it out first: rebound group remove-machine %s %s", m.Name, m.Group, m.Group, m.Name)
	case m.TestFailover != nil:
		return nil, rebound.Errorf(rebound.ECONFLICT, "machine %s has a test failover; clean it up first (rebound test-failover cleanup %s)", m.Name, m.Name)
	}
	joining := m.State == rebound.MachineProtected
	if joining && (m.Protection == nil || m.Protection.TargetSite != req.To) {
		return nil, rebound.Errorf(rebound.ECONFLICT, "machine %s is protected to %s, not %s; a group has one target", m.Name, m.Protection.TargetSite, req.To)
	}
	if !joining && m.State != rebound.MachineUnprotected {
		return nil, stateConflict(m, "join a group")
	}
	if req.To == "" {
		return nil, rebound.Errorf(rebound.EINVALID, "protect needs a target site (--to)")
	}
	if req.To == m.ActiveSite {
		return nil, rebound.Errorf(rebound.EINVALID, "machine %q is active at %s; protect it to another site", m.Name, req.To)
	}
	g, err := s.DB.GetMachine(ctx, req.Group)
	switch {
	case rebound.ErrorCode(err) == rebound.ENOTFOUND:
		g = &rebound.Machine{Name: req.Group, Driver: "group", State: rebound.MachineUnprotected, ActiveSite: m.ActiveSite,
			HomeSite: m.ActiveSite, Health: rebound.HealthNormal, CreatedAt: time.Now().UTC()}
	case err != nil:
		return nil, err
	case len(g.Members) == 0:
		return nil, rebound.Errorf(rebound.ECONFLICT, "%s is a machine; a group needs a name of its own", req.Group)
	case g.State != rebound.MachineProtected:
		return nil, rebound.Errorf(rebound.ECONFLICT, "group %s is %s; machines join a protected group (wait for its first point, or finish its failover)", g.Name, g.State)
	case g.ActiveSite != m.ActiveSite:
		return nil, rebound.Errorf(rebound.ECONFLICT, "group %s is active at %s and machine %s at %s; a group's machines are active at one site", g.Name, g.ActiveSite, m.Name, m.ActiveSite)
	case g.Protection == nil || g.Protection.TargetSite != req.To:
		return nil, rebound.Errorf(rebound.ECONFLICT, "group %s is protected to %s, not %s", g.Name, g.Protection.TargetSite, req.To)
	}
	if err := s.checkIdle(ctx, m.Name); err != nil {
		return nil, err
	}
	polName := req.Policy
	if polName == "" && g.Protection != nil {
		polName = g.Protection.Policy
	}
	if polName == "" {
		polName = "default"
	}
	pol, err := s.DB.GetPolicy(ctx, polName)
	if err != nil {
		return nil, err
	}
	src, dst, dstSite, err := s.streamSites(ctx, m.ActiveSite, req.To)
	if err != nil {
		return nil, err
	}
	members := append(slices.Clone(g.Members), m.Name)
	fresh := len(g.Members) == 0
	if fresh {
		// A new group: its record exists from here on, so it is locked
		// and listed (unprotected, with its first machine) while the job
		// runs.
		g.Members = members
		if err := s.DB.CreateMachine(ctx, g); err != nil {
			return nil, err
		}
	}
	return s.startJob(ctx, "protect", g.Name, []string{"start source", "prepare target", "initial copy"}, func(ctx context.Context, r *jobRun) error {
		if err := s.regroup(ctx, r, g.Name, members, pol, src, dst, dstSite); err != nil {
			if fresh {
				s.dropNewGroup(ctx, g.Name)
			}
			if ctx.Err() != nil {
				return err
			}
			return rebound.Errorf(rebound.ErrorCode(err), "%s; once that is fixed, run the same protect again: it resumes (rebound protect %s --to %s --group %s)", rebound.ErrorMessage(err), m.Name, req.To, g.Name)
		}
		if joining {
			s.event(m.Name, req.To, "group.joined", fmt.Sprintf("%s joined group %s without a full copy; the group's earlier points end here", m.Name, g.Name))
		}
		s.event(g.Name, req.To, "protection.started", fmt.Sprintf("protecting group %s (%v) from %s to %s", g.Name, members, g.ActiveSite, req.To))
		r.Step("initial copy")
		return s.finishProtect(ctx, r, g.Name, req.To, src, dst)
	})
}

// regroup starts the group's stream with members: the source first (it
// stops the members' old streams), then the target (it folds and adopts
// their replicas), and records the group and its members.
func (s *Server) regroup(ctx context.Context, r *jobRun, group string, members []string, pol *rebound.Policy, src, dst rebound.SiteService, dstSite *rebound.Site) error {
	g, err := s.DB.GetMachine(ctx, group)
	if err != nil {
		return err
	}
	g.Members = members
	spec, err := s.streamSpec(ctx, g)
	if err != nil {
		return err
	}
	// A retried regroup (the job failed at the target, the server
	// restarted) reuses its stream ID, so the sites' steps are idempotent.
	key, want := "regroup/"+group, strings.Join(members, ",")
	if v, ok, err := s.DB.GetSetting(ctx, key); err == nil && ok && strings.HasSuffix(v, " "+want) {
		spec.StreamID = strings.TrimSuffix(v, " "+want)
	} else {
		spec.StreamID = fmt.Sprintf("%s.%d", group, time.Now().UnixNano())
		if err := s.DB.PutSetting(ctx, key, spec.StreamID+" "+want); err != nil {
			return err
		}
	}
	spec.Policy = *pol
	r.Step("start source")
	sspec := spec
	sspec.Role, sspec.PeerSite, sspec.PeerAddr, sspec.Seed = "source", dstSite.Name, dstSite.ReplAddr, rebound.SeedDelta
	if err := src.StartReplication(ctx, sspec); err != nil {
		return err
	}
	ci, err := src.CopyInfo(ctx, group)
	if err != nil {
		return err
	}
	r.Step("prepare target")
	tspec := spec
	tspec.Role, tspec.PeerSite, tspec.Generation, tspec.AdoptDisks = "target", g.ActiveSite, ci.Generation, true
	if err := dst.StartReplication(ctx, tspec); err != nil {
		return err
	}
	var disks []rebound.Disk
	for _, md := range spec.Members {
		mm, err := s.DB.GetMachine(ctx, md.Name)
		if err != nil {
			return err
		}
		disks = append(disks, mm.Disks...)
		if err := s.updateMachine(ctx, md.Name, func(x *rebound.Machine) { x.Group = group }); err != nil {
			return err
		}
	}
	if err := s.updateMachine(ctx, group, func(x *rebound.Machine) {
		x.Members, x.Disks, x.State = members, disks, rebound.MachineSyncing
		x.Protection = &rebound.Protection{SourceSite: x.ActiveSite, TargetSite: dstSite.Name, Policy: pol.Name, ReplState: "syncing"}
	}); err != nil {
		return err
	}
	return s.DB.PutSetting(ctx, key, "")
}

// dropNewGroup removes the record of a group whose first protect failed
// before the group was recorded as replicating; running the protect again
// resumes at the sites (regroup).
func (s *Server) dropNewGroup(ctx context.Context, name string) {
	g, err := s.DB.GetMachine(ctx, name)
	if err != nil || g.State != rebound.MachineUnprotected {
		return
	}
	for _, mn := range g.Members {
		_ = s.updateMachine(ctx, mn, func(x *rebound.Machine) {
			if x.Group == name {
				x.Group = ""
			}
		})
	}
	_ = s.DB.DeleteMachine(ctx, name)
	s.live.forget(name)
}

// RemoveGroupMember takes a machine out of its group without a full copy:
// the group's stream restarts without it, and it replicates alone to the
// same target, each side adopting the replica it had.
func (s *Server) RemoveGroupMember(ctx context.Context, group, machine string) (*rebound.Job, error) {
	g, err := s.GetGroup(ctx, group)
	if err != nil {
		return nil, err
	}
	switch {
	case !slices.Contains(g.Machines, machine):
		return nil, rebound.Errorf(rebound.ENOTFOUND, "machine %s is not in group %s (its machines: %v)", machine, group, g.Machines)
	case len(g.Machines) == 1:
		return nil, rebound.Errorf(rebound.ECONFLICT, "%s is the last machine of group %s; unprotect the group instead (rebound unprotect --group %s)", machine, group, group)
	case g.State != rebound.MachineProtected || g.Protection == nil:
		return nil, rebound.Errorf(rebound.ECONFLICT, "group %s is %s; machines leave a protected group (finish its failover or initial copy first)", group, g.State)
	}
	p := *g.Protection
	pol, err := s.DB.GetPolicy(ctx, p.Policy)
	if err != nil {
		return nil, err
	}
	src, dst, dstSite, err := s.streamSites(ctx, p.SourceSite, p.TargetSite)
	if err != nil {
		return nil, err
	}
	rest := slices.DeleteFunc(slices.Clone(g.Machines), func(n string) bool { return n == machine })
	return s.startJob(ctx, "remove-machine", group, []string{"start source", "prepare target", "protect alone", "initial copy"}, func(ctx context.Context, r *jobRun) error {
		if err := s.regroup(ctx, r, group, rest, pol, src, dst, dstSite); err != nil {
			return err
		}
		r.Step("protect alone")
		m, err := s.DB.GetMachine(ctx, machine)
		if err != nil {
			return err
		}
		m.Group = ""
		spec, err := s.streamSpec(ctx, m)
		if err != nil {
			return err
		}
		ci, err := src.CopyInfo(ctx, machine)
		if err != nil {
			return err
		}
		spec.StreamID, spec.Policy, spec.Generation = machine+"."+ci.Generation, *pol, ci.Generation
		tspec := spec
		tspec.Role, tspec.PeerSite, tspec.AdoptDisks = "target", p.SourceSite, true
		if err := dst.StartReplication(ctx, tspec); err != nil {
			return err
		}
		sspec := spec
		sspec.Role, sspec.PeerSite, sspec.PeerAddr, sspec.Seed = "source", p.TargetSite, dstSite.ReplAddr, rebound.SeedDelta
		if err := src.StartReplication(ctx, sspec); err != nil {
			return err
		}
		if err := s.updateMachine(ctx, machine, func(x *rebound.Machine) {
			x.Group, x.State = "", rebound.MachineSyncing
			x.Protection = &rebound.Protection{SourceSite: p.SourceSite, TargetSite: p.TargetSite, Policy: pol.Name, ReplState: "syncing"}
			x.Failover, x.TestFailover = nil, nil
		}); err != nil {
			return err
		}
		s.event(machine, p.TargetSite, "group.left", fmt.Sprintf("%s left group %s without a full copy; it replicates alone to %s", machine, group, p.TargetSite))
		r.Step("initial copy")
		if err := s.finishProtect(ctx, r, group, p.TargetSite, src, dst); err != nil {
			return err
		}
		return s.finishProtect(ctx, r, machine, p.TargetSite, src, dst)
	})
}

// dissolveGroup removes a group whose protection stopped: its members are
// unprotected machines of their own again.
func (s *Server) dissolveGroup(ctx context.Context, name string) error {
	g, err := s.DB.GetMachine(ctx, name)
	if err != nil || len(g.Members) == 0 {
		return err
	}
	for _, mn := range g.Members {
		if err := s.updateMachine(ctx, mn, func(x *rebound.Machine) {
			x.Group, x.State, x.Protection, x.Failover, x.TestFailover = "", rebound.MachineUnprotected, nil, nil, nil
			s.setHealth(ctx, x)
		}); err != nil && rebound.ErrorCode(err) != rebound.ENOTFOUND {
			return err
		}
	}
	if err := s.DB.DeleteMachine(ctx, name); err != nil {
		return err
	}
	s.live.forget(name)
	s.metrics.forget(name)
	s.event(name, "", "group.removed", fmt.Sprintf("group %s removed; its machines %v are unprotected", name, g.Members))
	return nil
}
