package server

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/rebound-dr/rebound"
)

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_.]*(?:-[a-z0-9_.]+)*$`)

func validName(name string) error {
	if len(name) == 0 || len(name) > 63 || !nameRE.MatchString(name) {
		return rebound.Errorf(rebound.EINVALID, "invalid name %q: use 1-63 lower-case letters, digits, '.', '_' and single '-'", name)
	}
	return nil
}

// CreateMachine creates a machine with empty disks at a site.
func (s *Server) CreateMachine(ctx context.Context, req rebound.CreateMachineRequest) (*rebound.Machine, error) {
	if err := validName(req.Name); err != nil {
		return nil, err
	}
	m, err := newMachine(req)
	if err != nil {
		return nil, err
	}
	site, err := s.site(req.Site)
	if err != nil {
		return nil, err
	}
	if err := s.DB.CreateMachine(ctx, m); err != nil {
		return nil, err
	}
	if err := site.CreateMachine(ctx, rebound.SiteMachine{Name: m.Name, Disks: m.Disks, VM: m.VM, Import: req.Import}); err != nil {
		_ = s.DB.DeleteMachine(context.Background(), m.Name)
		return nil, err
	}
	disks := siteDisks(ctx, site, m.Name)
	if err := s.updateMachine(ctx, m.Name, func(sm *rebound.Machine) {
		applyDisks(sm, disks)
		*m = *sm
	}); err != nil {
		return nil, err
	}
	s.event(m.Name, req.Site, "machine.created", fmt.Sprintf("machine %s created at %s with %d disk(s)", m.Name, req.Site, len(m.Disks)))
	return m, nil
}

// siteDisks returns the disks a site reports for a machine (NBD URIs,
// sizes), or nil. Call it outside updateMachine: the site's answer comes on
// the control channel that also carries the reports updateMachine waits on.
func siteDisks(ctx context.Context, site rebound.SiteService, name string) []rebound.Disk {
	st, err := site.Status(ctx)
	if err != nil {
		return nil
	}
	for _, ms := range st.Machines {
		if ms.Name == name {
			return ms.Disks
		}
	}
	return nil
}

// applyDisks copies reported NBD URIs (and sizes of imported disks) into m.
func applyDisks(m *rebound.Machine, disks []rebound.Disk) {
	if len(disks) != len(m.Disks) {
		return
	}
	for i := range m.Disks {
		m.Disks[i].NBD = disks[i].NBD
		if m.Disks[i].Size == 0 { // imported: the image's size
			m.Disks[i].Size = disks[i].Size
		}
	}
}

// ListMachines returns every machine.
func (s *Server) ListMachines(ctx context.Context) ([]rebound.Machine, error) {
	ms, err := s.listMachines(ctx)
	// A group's own record is served as a Group.
	return slices.DeleteFunc(ms, func(m rebound.Machine) bool { return len(m.Members) > 0 }), err
}

// GetMachine returns a machine.
func (s *Server) GetMachine(ctx context.Context, name string) (*rebound.Machine, error) {
	m, err := s.getMachine(ctx, name)
	if err == nil && len(m.Members) > 0 {
		return nil, rebound.Errorf(rebound.ENOTFOUND, "machine %q not found: %s is a replication group (rebound group show %s)", name, name, name)
	}
	return m, err
}

// DeleteMachine removes an unprotected machine and its disks.
func (s *Server) DeleteMachine(ctx context.Context, name string) error {
	m, err := s.DB.GetMachine(ctx, name)
	if err != nil {
		return err
	}
	switch m.State {
	case rebound.MachineUnprotected:
	case rebound.MachineProtected, rebound.MachineSyncing:
		return rebound.Errorf(rebound.ECONFLICT, "machine %s is %s; stop its replication first (rebound unprotect %s), then delete it", name, m.State, name)
	default:
		return stateConflict(m, "be deleted")
	}
	if err := s.lockMachine(name); err != nil {
		return err
	}
	defer s.unlockMachine(name)
	sites := []string{m.ActiveSite}
	if m.HomeSite != m.ActiveSite {
		sites = append(sites, m.HomeSite)
	}
	for _, c := range m.DetachedCopies {
		if !slices.Contains(sites, c.Site) {
			sites = append(sites, c.Site)
		}
	}
	for _, sn := range sites {
		site, err := s.site(sn)
		if err != nil {
			return err
		}
		if err := site.DeleteMachine(ctx, name); err != nil {
			return err
		}
	}
	if err := s.DB.DeleteMachine(ctx, name); err != nil {
		return err
	}
	s.metrics.forget(name)
	s.live.forget(name)
	s.event(name, "", "machine.deleted", "machine "+name+" deleted")
	return nil
}

// checkIdle refuses a verb while a job runs on the machine, naming the job,
// before any state check could give a less helpful answer.
//
// Another server's job is found in the store: the machine's newest job not
// ended.
func (s *Server) checkIdle(ctx context.Context, name string) error {
	s.mu.Lock()
	id, ok := s.busy[name]
	s.mu.Unlock()
	if ok {
		return rebound.Errorf(rebound.ECONFLICT, "machine %q has job %s running; wait for it (rebound job wait %s) or cancel it", name, id, id)
	}
	if js, err := s.DB.ListJobs(ctx, name, 1); err == nil && len(js) == 1 && js[0].EndedAt == nil && js[0].LockKey() == name {
		return rebound.BusyError(name, js[0].ID)
	}
	return nil
}

func (s *Server) lockMachine(name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if id, ok := s.busy[name]; ok {
		return rebound.Errorf(rebound.ECONFLICT, "machine %q has job %s running", name, id)
	}
	s.busy[name] = "(api)"
	return nil
}

func (s *Server) unlockMachine(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.busy, name)
}

// Protect starts replication of a machine to a site.
func (s *Server) Protect(ctx context.Context, req rebound.ProtectRequest) (*rebound.Job, error) {
	if req.Group != "" {
		return s.protectGroup(ctx, req)
	}
	m, err := s.DB.GetMachine(ctx, req.Machine)
	if err != nil {
		return nil, err
	}
	if err := memberRefused(m); err != nil {
		return nil, err
	}
	if len(m.Members) > 0 {
		return nil, rebound.Errorf(rebound.EINVALID, "%s is a group; add machines with rebound protect NAME --to SITE --group %s", m.Name, m.Name)
	}
	if err := s.checkIdle(ctx, m.Name); err != nil {
		return nil, err
	}
	explicit := req.Policy != "" // only a named policy changes a protected machine's
	if req.Policy == "" {
		req.Policy = "default"
	}
	pol, err := s.DB.GetPolicy(ctx, req.Policy)
	if err != nil {
		return nil, err
	}
	switch {
	case req.To == "":
		return nil, rebound.Errorf(rebound.EINVALID, "protect needs a target site (--to)")
	case explicit && m.Protection != nil && m.Protection.TargetSite == req.To && m.Protection.Policy != pol.Name &&
		(m.State == rebound.MachineProtected || m.State == rebound.MachineSyncing):
		return s.changePolicy(ctx, m, pol)
	case m.Protection != nil && m.Protection.TargetSite == req.To && m.State == rebound.MachineProtected:
		return s.doneJob(ctx, "protect", m.Name, fmt.Sprintf("machine %s is already protected to %s", m.Name, req.To))
	case m.Protection != nil && m.Protection.TargetSite == req.To && m.State == rebound.MachineSyncing:
		return s.resumeProtect(ctx, m)
	case m.State != rebound.MachineUnprotected:
		return nil, stateConflict(m, "be protected again")
	case req.To == m.ActiveSite:
		return nil, rebound.Errorf(rebound.EINVALID, "machine %q is active at %s; protect it to another site", m.Name, req.To)
	}
	src, dst, dstSite, err := s.streamSites(ctx, m.ActiveSite, req.To)
	if err != nil {
		return nil, err
	}
	var need int64
	for _, d := range m.Disks {
		need += d.Size
	}
	if dstSite.FreeBytes > 0 && dstSite.FreeBytes < need {
		return nil, rebound.Errorf(rebound.ECONFLICT, "site %q has %d bytes free; machine %q needs at least %d", req.To, dstSite.FreeBytes, m.Name, need)
	}
	streamID := fmt.Sprintf("%s.%d", m.Name, time.Now().UnixNano())
	prot := rebound.Protection{SourceSite: m.ActiveSite, TargetSite: req.To, Policy: pol.Name}
	return s.startJob(ctx, "protect", m.Name, []string{"prepare target", "start source", "initial copy"}, func(ctx context.Context, r *jobRun) error {
		// A cancel stops what the job started, at both sites.
		return s.undoCancelled(ctx, r, m.Name, prot, src, dst, s.protect(ctx, r, m, req, pol, streamID, src, dst, dstSite))
	})
}

// streamSites returns the sites of a new stream and the target's record,
// refusing a target that has not reported its replication address yet.
func (s *Server) streamSites(ctx context.Context, from, to string) (src, dst rebound.SiteService, dstSite *rebound.Site, err error) {
	if src, err = s.site(from); err != nil {
		return nil, nil, nil, err
	}
	if dst, err = s.site(to); err != nil {
		return nil, nil, nil, err
	}
	if dstSite, err = s.DB.GetSite(ctx, to); err != nil {
		return nil, nil, nil, err
	}
	if dstSite.ReplAddr == "" {
		return nil, nil, nil, rebound.Errorf(rebound.EUNAVAILABLE, "site %q has not reported its replication address yet; retry in a few seconds", to)
	}
	return src, dst, dstSite, nil
}

func (s *Server) protect(ctx context.Context, r *jobRun, m *rebound.Machine, req rebound.ProtectRequest, pol *rebound.Policy, streamID string, src, dst rebound.SiteService, dstSite *rebound.Site) error {
	{
		r.Step("prepare target")
		ci, err := src.CopyInfo(ctx, m.Name)
		if err != nil {
			return err
		}
		if err := s.dropDetachedCopy(ctx, r, m.Name, req.To, dst); err != nil {
			return err
		}
		spec, err := s.streamSpec(ctx, m)
		if err != nil {
			return err
		}
		spec.StreamID, spec.Policy, spec.Generation = streamID, *pol, ci.Generation
		tspec := spec
		tspec.Role, tspec.PeerSite = "target", m.ActiveSite
		if err := dst.StartReplication(ctx, tspec); err != nil {
			return err
		}
		r.Step("start source")
		sspec := spec
		sspec.Role, sspec.PeerSite, sspec.PeerAddr = "source", req.To, dstSite.ReplAddr
		if err := src.StartReplication(ctx, sspec); err != nil {
			return err
		}
		if err := s.updateMachine(ctx, m.Name, func(m *rebound.Machine) {
			m.State = rebound.MachineSyncing
			m.Protection = &rebound.Protection{SourceSite: m.ActiveSite, TargetSite: req.To, Policy: pol.Name, ReplState: "syncing"}
		}); err != nil {
			return err
		}
		s.event(m.Name, req.To, "protection.started", fmt.Sprintf("protecting %s from %s to %s", m.Name, m.ActiveSite, req.To))
		r.Step("initial copy")
		return s.finishProtect(ctx, r, m.Name, req.To, src, dst)
	}
}

// resumeProtect follows an initial copy whose protect job ended early (a
// server restart, a cancel): the sites went on replicating, so running the
// command again waits for the first point.
func (s *Server) resumeProtect(ctx context.Context, m *rebound.Machine) (*rebound.Job, error) {
	p := m.Protection
	src, err := s.site(p.SourceSite)
	if err != nil {
		return nil, err
	}
	dst, err := s.site(p.TargetSite)
	if err != nil {
		return nil, err
	}
	return s.startJob(ctx, "protect", m.Name, []string{"initial copy"}, func(ctx context.Context, r *jobRun) error {
		r.Step("initial copy")
		return s.undoCancelled(ctx, r, m.Name, *p, src, dst, s.finishProtect(ctx, r, m.Name, p.TargetSite, src, dst))
	})
}

// finishProtect waits for the first point and marks the machine protected.
func (s *Server) finishProtect(ctx context.Context, r *jobRun, name, to string, src, dst rebound.SiteService) error {
	if err := s.waitFirstPoint(ctx, r, name, src, dst); err != nil {
		return err
	}
	if err := s.updateMachine(ctx, name, func(m *rebound.Machine) {
		m.State = rebound.MachineProtected
		if m.Protection != nil {
			m.Protection.SyncProgress = 1
		}
	}); err != nil {
		return err
	}
	s.event(name, to, "protection.protected", "initial replication complete; recovery points are available")
	return nil
}

// waitFirstPoint follows the initial copy until the target has a point.
func (s *Server) waitFirstPoint(ctx context.Context, r *jobRun, name string, src, dst rebound.SiteService) error {
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		if st, err := src.Status(ctx); err == nil {
			for _, ms := range st.Machines {
				if ms.Name == name && ms.SyncTotal > 0 {
					r.Progress(float64(ms.SyncDone) / float64(ms.SyncTotal) * 0.99)
					r.Message("%s of %s copied", humanBytes(ms.SyncDone), humanBytes(ms.SyncTotal))
				}
			}
		}
		if pl, err := dst.ListPoints(ctx, name); err == nil && len(pl.Points) > 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return strconv.FormatInt(n, 10) + " B"
	}
	div, exp := int64(unit), 0
	for x := n / unit; x >= unit; x /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// updateMachine reads, changes and writes a machine. It is the only
// read-modify-write path, so reports and jobs do not lose each other's updates.
func (s *Server) updateMachine(ctx context.Context, name string, fn func(m *rebound.Machine)) error {
	return s.updateMachineLive(ctx, name, fn, false)
}

// updateLive is updateMachine for live status (a site's report, health):
// its result is served even when the store cannot take it (live.go).
func (s *Server) updateLive(ctx context.Context, name string, fn func(m *rebound.Machine)) error {
	return s.updateMachineLive(ctx, name, fn, true)
}

// updateMachineLive is the one place machines are written. fn sees the
// stored machine with its live part; the result becomes the live part once
// stored, or at once for a live update. A live update that changes only
// telemetry (lag, backlog, throughput: telemetryOnly) is not written: the
// sites report every 2 s, and a machine's durable record changes only with
// its state, health or replication state (docs/design/store.md).
//
// The store's write is a compare-and-swap on the machine's revision: when
// another server changed the machine since it was read, the change is
// applied again to the new record (fn is a function of the record, so
// running it again is safe), a few times before giving up.
func (s *Server) updateMachineLive(ctx context.Context, name string, fn func(m *rebound.Machine), live bool) error {
	s.machMu.Lock()
	defer s.machMu.Unlock()
	var err error
	for try := 0; try < machineRetries; try++ {
		if err = s.updateMachineOnce(ctx, name, fn, live); !isMachineChanged(err) {
			return err
		}
		s.Logger.Debug("machine changed by another server; applying the change again", "machine", name)
	}
	return err
}

// machineRetries bounds updateMachineLive's retries of a conflict.
const machineRetries = 5

// isMachineChanged says whether err is a lost compare-and-swap on a
// machine (the store's ECONFLICT of UpdateMachine).
func isMachineChanged(err error) bool {
	return err != nil && rebound.ErrorCode(err) == rebound.ECONFLICT && strings.Contains(err.Error(), "changed by another server")
}

func (s *Server) updateMachineOnce(ctx context.Context, name string, fn func(m *rebound.Machine), live bool) error {
	if err := checkLease(ctx); err != nil {
		return err
	}
	m, err := s.DB.GetMachine(ctx, name)
	if err != nil {
		return err
	}
	s.live.overlay(m)
	var before rebound.Machine
	if live {
		before = durablePart(m)
	}
	fn(m)
	if live && reflect.DeepEqual(before, durablePart(m)) {
		s.live.record(m)
		return nil
	}
	err = s.DB.UpdateMachine(ctx, m)
	if isMachineChanged(err) {
		return err
	}
	if err == nil || live && rebound.ErrorCode(err) != rebound.ENOTFOUND {
		s.live.record(m)
	}
	if err == nil && !live && len(m.Members) > 0 {
		err = s.mirrorMembers(ctx, m)
	}
	return err
}

// durablePart is m without its telemetry: what a store write must keep.
// The telemetry is served from memory (live.go) and is in the store only
// as of the machine's last durable change.
func durablePart(m *rebound.Machine) rebound.Machine {
	d := *m
	if m.Protection != nil {
		p := *m.Protection
		p.SyncProgress, p.LagSeconds, p.BacklogBytes, p.DirtyBytes = 0, 0, 0, 0
		p.ThroughputBps, p.ThrottledWrites = 0, 0
		p.LastPointTime, p.ReportedAt = time.Time{}, time.Time{}
		d.Protection = &p
	}
	return d
}

// protection returns a machine that has a protection, or refuses verb
// with what to do first.
func (s *Server) protection(ctx context.Context, name, verb string) (*rebound.Machine, error) {
	m, err := s.DB.GetMachine(ctx, name)
	if err != nil {
		return nil, err
	}
	if err := memberRefused(m); err != nil {
		return nil, err
	}
	if m.Protection == nil {
		return nil, stateConflict(m, verb)
	}
	return m, nil
}

// idleProtection is protection for a verb that starts a job: it also
// refuses while another job runs on the machine.
func (s *Server) idleProtection(ctx context.Context, name, verb string) (*rebound.Machine, error) {
	m, err := s.protection(ctx, name, verb)
	if err != nil {
		return nil, err
	}
	if err := s.checkIdle(ctx, name); err != nil {
		return nil, err
	}
	return m, nil
}

// checkSelector resolves a point selector at the recovery site before a job
// starts, so a bad or unknown selector is refused at once with the reason
// (and the retained window).
func checkSelector(ctx context.Context, dst rebound.SiteService, name, sel string) error {
	_, err := resolvePoint(ctx, dst, name, sel)
	return err
}

// resolvePoint resolves a selector at the recovery site; a point it does
// not hold is refused with the command that lists the ones it does.
func resolvePoint(ctx context.Context, dst rebound.SiteService, name, sel string) (rebound.RecoveryPoint, error) {
	p, err := dst.ResolvePoint(ctx, name, sel)
	if err != nil && rebound.ErrorCode(err) == rebound.ENOTFOUND {
		return p, rebound.Errorf(rebound.ENOTFOUND, "%s; rebound points %s lists the recovery points", rebound.ErrorMessage(err), name)
	}
	return p, err
}

// pointsSite is the site that holds a protected machine's points.
func (s *Server) pointsSite(ctx context.Context, name string) (rebound.SiteService, error) {
	m, err := s.protection(ctx, name, "list recovery points")
	if err != nil {
		return nil, err
	}
	return s.site(m.Protection.TargetSite)
}

// ListPoints returns the recovery points the target site holds.
func (s *Server) ListPoints(ctx context.Context, name string) ([]rebound.RecoveryPoint, error) {
	dst, err := s.pointsSite(ctx, name)
	if err != nil {
		return nil, err
	}
	pl, err := dst.ListPoints(ctx, name)
	if err != nil {
		return nil, err
	}
	if pl.Points == nil {
		return []rebound.RecoveryPoint{}, nil
	}
	return pl.Points, nil
}

// CreatePoint cuts a point at the source and returns it once the target
// holds it durably.
func (s *Server) CreatePoint(ctx context.Context, name string, app bool) (*rebound.RecoveryPoint, error) {
	m, err := s.protection(ctx, name, "cut a recovery point")
	if err != nil {
		return nil, err
	}
	if m.State != rebound.MachineProtected {
		return nil, stateConflict(m, "cut a recovery point")
	}
	src, err := s.site(m.Protection.SourceSite)
	if err != nil {
		return nil, err
	}
	dst, err := s.site(m.Protection.TargetSite)
	if err != nil {
		return nil, err
	}
	kind := rebound.PointCrash
	if app {
		kind = rebound.PointApp
	}
	if app {
		// The site may have missed a `machine set` while it was away; a
		// group's members each have their own hooks.
		hooked := []*rebound.Machine{m}
		if len(m.Members) > 0 {
			hooked = nil
			for _, n := range m.Members {
				if mm, err := s.DB.GetMachine(ctx, n); err == nil {
					hooked = append(hooked, mm)
				}
			}
		}
		for _, hm := range hooked {
			if err := src.SetHooks(ctx, hm.Name, hm.Settings.Hooks()); err != nil && hm.Settings.Hooks() != (rebound.Hooks{}) {
				return nil, fmt.Errorf("pass the hooks of %s to %s: %w", hm.Name, m.Protection.SourceSite, err)
			}
		}
	}
	p, err := src.CutPoint(ctx, name, kind)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, s.WaitTimeout)
	defer cancel()
	if err := waitReplicated(ctx, dst, name, p.Seq, nil); err != nil {
		return nil, rebound.Errorf(rebound.EUNAVAILABLE, "point %s was cut at %s but has not reached %s yet: %v", p.ID, m.Protection.SourceSite, m.Protection.TargetSite, rebound.ErrorMessage(err))
	}
	s.event(name, "", "point.created", fmt.Sprintf("%s point %s cut", kind, p.ID))
	return &p, nil
}

// waitReplicated waits until the target holds seq durably.
func waitReplicated(ctx context.Context, dst rebound.SiteService, name string, seq uint64, progress func(got uint64)) error {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		got, err := dst.Replicated(ctx, name)
		if err == nil && got >= seq {
			return nil
		}
		if progress != nil && err == nil {
			progress(got)
		}
		select {
		case <-ctx.Done():
			if err != nil {
				return err
			}
			return ctx.Err()
		case <-t.C:
		}
	}
}

// Failover fails a protected machine over to its target site.
func (s *Server) Failover(ctx context.Context, req rebound.FailoverRequest) (*rebound.Job, error) {
	return s.failover(ctx, req, "failover")
}

// failover runs a failover job of type typ ("failover" or "failback").
func (s *Server) failover(ctx context.Context, req rebound.FailoverRequest, typ string) (*rebound.Job, error) {
	verb := map[string]string{"failover": "fail over", "failback": "fail back"}[typ]
	m, err := s.idleProtection(ctx, req.Machine, verb)
	if err != nil {
		return nil, err
	}
	if req.Point == "" {
		req.Point = rebound.PointLatest
	}
	if req.Planned && req.Point != rebound.PointLatest {
		return nil, rebound.Errorf(rebound.EINVALID, "a planned failover always goes to the latest state; drop --point")
	}
	if !req.Planned && req.Shutdown != (rebound.ShutdownOptions{}) {
		return nil, rebound.Errorf(rebound.EINVALID, "--shutdown and --shutdown-timeout are for a planned %s; an unplanned one stops the VM at once", typ)
	}
	shutdown, err := shutdownOptions(req.Shutdown, m.Settings)
	if err != nil {
		return nil, err
	}
	switch m.State {
	case rebound.MachineFailedOver:
		return s.doneJob(ctx, "failover", m.Name, fmt.Sprintf("machine %s is already failed over to %s at point %s", m.Name, m.Failover.ToSite, m.Failover.Point.ID))
	case rebound.MachineProtected:
	case rebound.MachineFailingOver:
		// No job runs (idleProtection): a server restart interrupted the
		// failover. Fence and activate are idempotent, so it runs again.
	default:
		return nil, stateConflict(m, verb)
	}
	if m.TestFailover != nil {
		return nil, rebound.Errorf(rebound.ECONFLICT, "machine %q has a test failover; clean it up first (rebound test-failover cleanup %s)", m.Name, m.Name)
	}
	from, to := m.Protection.SourceSite, m.Protection.TargetSite
	dst, err := s.site(to)
	if err != nil {
		return nil, err
	}
	if err := checkSelector(ctx, dst, m.Name, req.Point); err != nil {
		return nil, err
	}
	var src rebound.SiteService
	if req.Planned {
		if src, err = s.site(from); err != nil {
			return nil, rebound.Errorf(rebound.EUNAVAILABLE, "planned failover needs the source site %q, which is not connected; run an unplanned failover instead (rebound failover %s --point latest)", from, m.Name)
		}
	} else {
		src, _ = s.site(from)
	}
	return s.startJobRequest(ctx, typ, m.Name, []string{"preflight", "drain", "activate"}, req, s.failoverRun(m, req, typ, from, to, src, dst, shutdown))
}

// resumeFailover continues a failover (or failback) job another server
// (or this one's previous life) left: the steps it completed are not run
// again, and the others are idempotent (docs/design/ha.md).
func (s *Server) resumeFailover(ctx context.Context, j rebound.Job) (*rebound.Job, error) {
	req, err := request[rebound.FailoverRequest](j)
	if err != nil {
		return nil, err
	}
	m, err := s.DB.GetMachine(ctx, j.Machine)
	if err != nil {
		return nil, err
	}
	if m.Protection == nil {
		return nil, stateConflict(m, "continue a failover")
	}
	from, to := m.Protection.SourceSite, m.Protection.TargetSite
	if m.Failover != nil {
		from, to = m.Failover.FromSite, m.Failover.ToSite
	}
	shutdown, err := shutdownOptions(req.Shutdown, m.Settings)
	if err != nil {
		return nil, err
	}
	return s.runJob(ctx, j, m.Name, false, func(ctx context.Context, r *jobRun) error {
		// A server that just started (or took the job over) may not have
		// the sites' channels yet: wait for them, as plan members do.
		dst, err := s.waitSite(ctx, r, to, memberSiteWait)
		if err != nil {
			return err
		}
		src, err := s.waitSite(ctx, r, from, memberSiteWait)
		if err != nil && req.Planned {
			return rebound.Errorf(rebound.EUNAVAILABLE, "planned failover needs the source site %q, which is not connected to this server: %s; run an unplanned failover instead (rebound failover %s --point latest)", from, rebound.ErrorMessage(err), m.Name)
		}
		return s.failoverRun(m, req, j.Type, from, to, src, dst, shutdown)(ctx, r)
	})
}

// waitSite returns a site's service once it is connected, waiting up to
// wait for it; the job's message says what it waits for.
func (s *Server) waitSite(ctx context.Context, r *jobRun, name string, wait time.Duration) (rebound.SiteService, error) {
	deadline := time.Now().Add(wait)
	for {
		svc, err := s.site(name)
		if err == nil || !time.Now().Before(deadline) {
			return svc, err
		}
		r.Message("waiting for site %s to connect", name)
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// failoverRun is the failover job's function; a job taken over runs it
// again and skips the steps its previous owner completed.
func (s *Server) failoverRun(m *rebound.Machine, req rebound.FailoverRequest, typ, from, to string, src, dst rebound.SiteService, shutdown rebound.ShutdownOptions) func(ctx context.Context, r *jobRun) error {
	return func(ctx context.Context, r *jobRun) error {
		if r.completed("activate") {
			// Taken over after the activation was recorded: only the
			// power-on is left.
			if cur, err := s.DB.GetMachine(ctx, m.Name); err == nil && cur.State == rebound.MachineFailedOver {
				r.Step("activate")
				return s.powerOn(ctx, r, m, dst, to, false)
			}
		}
		if !r.completed("preflight") {
			if err := s.failoverPrepare(ctx, r, m, req, typ, from, src, shutdown); err != nil {
				return err
			}
		}
		var fenced bool
		point, err := s.drainAndResolve(ctx, r, m.Name, req, src, dst, &fenced)
		if err == nil {
			// Activating the target is the point of no return: a cancel
			// (through any server) wins before it and is refused after.
			err = r.passNoReturn()
		}
		if err != nil {
			return s.rollbackFailover(ctx, m.Name, from, src, err)
		}
		r.Step("activate")
		disks, err := dst.Activate(ctx, rebound.ActivateSpec{Machine: m.Name, PointID: point.ID, Seq: point.Seq})
		if err != nil {
			return s.rollbackFailover(ctx, m.Name, from, src, err)
		}
		r.SetResult(point)
		r.Message("machine active at %s on point %s (%s)", to, point.ID, point.Time.Format(time.RFC3339Nano))
		s.event(m.Name, to, "failover", fmt.Sprintf("failed over to %s at point %s", to, point.ID))
		if err := s.updateMachine(ctx, m.Name, func(m *rebound.Machine) {
			m.State, m.ActiveSite = rebound.MachineFailedOver, to
			m.Failover = &rebound.FailoverInfo{FromSite: from, ToSite: to, Point: point, Planned: req.Planned,
				Time: time.Now().UTC(), SourceFenced: fenced}
			setDisks(m, disks)
			stopped(m.Protection)
			s.setHealth(ctx, m)
		}); err != nil {
			return err
		}
		if err := s.powerOn(ctx, r, m, dst, to, false); err != nil {
			return err
		}
		// A source that was down and came back while this job ran was seen
		// by SiteConnected before the machine was failed over: fence it now.
		if site, err := s.site(from); err == nil && src == nil {
			if _, err := site.Fence(ctx, m.Name); err != nil {
				s.Logger.Warn("fence returned source", "site", from, "machine", m.Name, "err", err)
			}
		}
		return nil
	}
}

// failoverPrepare is a failover's preflight step: the checks, the machine
// marked failing over, and its source VMs stopped.
func (s *Server) failoverPrepare(ctx context.Context, r *jobRun, m *rebound.Machine, req rebound.FailoverRequest, typ, from string, src rebound.SiteService, shutdown rebound.ShutdownOptions) error {
	{
		r.Step("preflight")
		if rep := s.failoverPreflight(ctx, m, typ); !rep.OK {
			return rebound.Errorf(rebound.ECONFLICT, "preflight failed: %s", failedChecks(rep))
		}
		r.Message("preflight passed")
		if err := s.setState(ctx, m.Name, rebound.MachineFailingOver); err != nil {
			return err
		}
		for _, vm := range s.vmMachines(ctx, m) {
			if src == nil {
				break
			}
			// Planned: the guest shuts down cleanly before the drain (or
			// is powered off after the timeout, with --shutdown force);
			// unplanned: the source VM is stopped where it can be reached.
			if req.Planned {
				r.Message("shutting the VM of %s down at %s (%s, timeout %s)", vm.Name, from, shutdown.Mode, shutdown.Timeout)
				if err := src.Shutdown(ctx, vm.Name, shutdown); err != nil {
					return s.rollbackFailover(ctx, m.Name, from, nil, fmt.Errorf("shut down the VM of %s at %s: %w", vm.Name, from, err))
				}
			} else {
				r.Message("stopping the VM of %s at %s (kill)", vm.Name, from)
				if err := src.Power(ctx, vm.Name, rebound.PowerKill, false); err != nil {
					r.Message("VM of %s at %s not stopped: %s", vm.Name, from, rebound.ErrorMessage(err))
				}
			}
		}
		return nil
	}
}

// rollbackFailover undoes a failover that failed before it activated: the
// machine is protected again and its source (if reached) serves again. It
// returns cause joined with what the undo could not do, which is also
// logged and recorded as an event: the operator must know the source may
// still be fenced.
//
// A job that is handed over (its lease lost, or the server closing with a
// resumable job) undoes nothing: the next owner continues it.
func (s *Server) rollbackFailover(jctx context.Context, name, from string, src rebound.SiteService, cause error) error {
	if r := jobOf(jctx); r != nil && (r.stopWrites() || s.ctx.Err() != nil && resumable(&r.job)) {
		return cause
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var errs []error
	if err := s.setState(ctx, name, rebound.MachineProtected); err != nil {
		errs = append(errs, fmt.Errorf("roll back: mark %s protected again: %w", name, err))
	}
	if src != nil {
		if err := src.Unfence(ctx, name); err != nil {
			errs = append(errs, fmt.Errorf("roll back: serve %s at %s again (it is served again when the site reconnects): %w", name, from, err))
		}
	}
	if len(errs) == 0 {
		return cause
	}
	undo := errors.Join(errs...)
	s.Logger.Error("failover rollback incomplete", "machine", name, "err", undo)
	s.event(name, from, "failover.rollback", "failover rollback incomplete: "+rebound.ErrorMessage(undo))
	return errors.Join(cause, undo)
}

// stopped marks a protection whose stream no longer replicates (the
// machine failed over): no lag, backlog or throughput to report.
func stopped(p *rebound.Protection) {
	if p == nil {
		return
	}
	p.ReplState, p.LagSeconds, p.BacklogBytes, p.DirtyBytes, p.ThroughputBps = "stopped", 0, 0, 0, 0
}

func setDisks(m *rebound.Machine, disks []rebound.Disk) {
	for i := range m.Disks {
		if i < len(disks) {
			m.Disks[i].NBD = disks[i].NBD
		}
	}
}

func (s *Server) setState(ctx context.Context, name, state string) error {
	return s.updateMachine(ctx, name, func(m *rebound.Machine) { m.State = state })
}

// drainAndResolve fences the source where it can, waits until the target
// has what the source holds, and resolves the point.
func (s *Server) drainAndResolve(ctx context.Context, r *jobRun, name string, req rebound.FailoverRequest, src, dst rebound.SiteService, fenced *bool) (rebound.RecoveryPoint, error) {
	r.Step("drain")
	sel := req.Point
	if src == nil {
		r.Message("source site unreachable: failing over to what the recovery site holds")
		return resolvePoint(ctx, dst, name, sel)
	}
	fctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	head, err := src.Fence(fctx, name)
	cancel()
	if err != nil {
		if req.Planned {
			return rebound.RecoveryPoint{}, fmt.Errorf("stop I/O at the source: %w", err)
		}
		r.Message("source did not answer (%s): failing over to what the recovery site holds", rebound.ErrorMessage(err))
		return resolvePoint(ctx, dst, name, sel)
	}
	*fenced = true
	if sel == rebound.PointLatest {
		start, _ := dst.Replicated(ctx, name)
		wctx, cancel := context.WithTimeout(ctx, s.WaitTimeout)
		err := waitReplicated(wctx, dst, name, head, func(got uint64) {
			if head > start {
				r.Progress(float64(got-start) / float64(head-start) * 0.9)
			}
			r.Message("received %d of %d records", got, head)
		})
		cancel()
		if err != nil {
			if req.Planned {
				return rebound.RecoveryPoint{}, fmt.Errorf("drain the stream to the recovery site: %w", err)
			}
			r.Message("drain incomplete (%v): failing over to what the recovery site holds", err)
		} else if req.Planned {
			return resolvePoint(ctx, dst, name, "p"+strconv.FormatUint(head, 10))
		}
	}
	return resolvePoint(ctx, dst, name, sel)
}

// ChangePoint moves an uncommitted failover to another point. Writes made
// to the failed-over disks since the failover are discarded.
func (s *Server) ChangePoint(ctx context.Context, name, point string) (*rebound.Job, error) {
	m, err := s.idleProtection(ctx, name, "change the point of a failover")
	if err != nil {
		return nil, err
	}
	if m.State != rebound.MachineFailedOver || m.Failover == nil {
		return nil, stateConflict(m, "change the point of a failover")
	}
	if point == "" {
		return nil, rebound.Errorf(rebound.EINVALID, "change-point needs --point")
	}
	dst, err := s.site(m.Failover.ToSite)
	if err != nil {
		return nil, err
	}
	if err := checkSelector(ctx, dst, name, point); err != nil {
		return nil, err
	}
	return s.startJob(ctx, "change-point", name, []string{"resolve", "activate"}, func(ctx context.Context, r *jobRun) error {
		r.Step("resolve")
		p, err := resolvePoint(ctx, dst, name, point)
		if err != nil {
			return err
		}
		r.Step("activate")
		disks, err := dst.Activate(ctx, rebound.ActivateSpec{Machine: name, PointID: p.ID, Seq: p.Seq})
		if err != nil {
			return err
		}
		r.SetResult(p)
		if err := s.powerOn(ctx, r, m, dst, m.Failover.ToSite, false); err != nil {
			return err
		}
		s.event(name, m.Failover.ToSite, "failover.change-point", "failover moved to point "+p.ID)
		return s.updateMachine(ctx, name, func(m *rebound.Machine) {
			m.Failover.Point = p
			setDisks(m, disks)
		})
	})
}

// CancelFailover drops an uncommitted failover and resumes the machine at
// its source, which lost nothing it wrote.
func (s *Server) CancelFailover(ctx context.Context, name string) (*rebound.Job, error) {
	m, err := s.idleProtection(ctx, name, "cancel a failover")
	if err != nil {
		return nil, err
	}
	if m.State == rebound.MachineProtected && m.Failover == nil {
		return s.doneJob(ctx, "failover-cancel", name, fmt.Sprintf("machine %s has no failover to cancel; it is protected at %s", name, m.ActiveSite))
	}
	// A machine left failing-over (checkIdle: no job runs) had its failover
	// job interrupted by a server restart: the source may be fenced and the
	// target activated; cancel undoes both like the failed job would have.
	from, to := m.Protection.SourceSite, m.Protection.TargetSite
	switch {
	case m.State == rebound.MachineFailedOver && m.Failover != nil:
		from, to = m.Failover.FromSite, m.Failover.ToSite
	case m.State == rebound.MachineFailingOver:
	default:
		return nil, stateConflict(m, "cancel a failover")
	}
	src, err := s.site(from)
	if err != nil {
		return nil, rebound.Errorf(rebound.EUNAVAILABLE, "cancel needs the source site %q to resume the machine, and it is not connected: %s", from, rebound.ErrorMessage(err))
	}
	dst, err := s.site(to)
	if err != nil {
		return nil, err
	}
	return s.startJob(ctx, "failover-cancel", name, []string{"deactivate", "resume source"}, func(ctx context.Context, r *jobRun) error {
		r.Step("deactivate")
		if err := dst.Deactivate(ctx, name, false); err != nil {
			return err
		}
		r.Step("resume source")
		if err := src.Unfence(ctx, name); err != nil {
			return err
		}
		if err := s.powerOn(ctx, r, m, src, from, false); err != nil {
			return err
		}
		s.event(name, from, "failover.cancelled", "failover cancelled; machine active at "+from+" again")
		disks := siteDisks(ctx, src, name)
		return s.updateMachine(ctx, name, func(m *rebound.Machine) {
			m.State, m.ActiveSite, m.Failover = rebound.MachineProtected, from, nil
			applyDisks(m, disks)
			if m.Protection != nil && m.Protection.ReplState == "stopped" {
				m.Protection.ReplState = "" // the source's next report says
			}
			s.setHealth(ctx, m)
		})
	})
}

// Commit makes a failover final.
func (s *Server) Commit(ctx context.Context, name string) (*rebound.Job, error) {
	m, err := s.DB.GetMachine(ctx, name)
	if err != nil {
		return nil, err
	}
	if err := memberRefused(m); err != nil {
		return nil, err
	}
	if err := s.checkIdle(ctx, name); err != nil {
		return nil, err
	}
	if m.State == rebound.MachineUnprotected && m.Protection == nil {
		return s.doneJob(ctx, "commit", name, fmt.Sprintf("nothing to commit: machine %s is active at %s", name, m.ActiveSite))
	}
	if m.State != rebound.MachineFailedOver || m.Failover == nil {
		return nil, stateConflict(m, "commit")
	}
	dst, err := s.site(m.Failover.ToSite)
	if err != nil {
		return nil, err
	}
	fo := *m.Failover
	return s.startJob(ctx, "commit", name, []string{"flatten", "release source"}, func(ctx context.Context, r *jobRun) error {
		r.Step("flatten")
		err := dst.Commit(ctx, name, func(done, total int64) {
			if total > 0 {
				r.Progress(float64(done) / float64(total) * 0.95)
				r.Message("%s of %s", humanBytes(done), humanBytes(total))
			}
		})
		if err != nil {
			return err
		}
		disks := siteDisks(ctx, dst, name)
		if err := s.updateMachine(ctx, name, func(m *rebound.Machine) {
			m.State, m.ActiveSite, m.Protection, m.Failover = rebound.MachineUnprotected, fo.ToSite, nil, nil
			m.PreviousSite = fo.FromSite
			applyDisks(m, disks)
			s.setHealth(ctx, m)
		}); err != nil {
			return err
		}
		r.Step("release source")
		if err := s.DB.PutSetting(ctx, "failover-time/"+name, fo.Time.Format(time.RFC3339Nano)); err != nil {
			return err
		}
		if src, err := s.site(fo.FromSite); err == nil {
			if err := src.Release(ctx, name, fo.Time); err != nil {
				r.Message("source not released yet (%s); it will be when it reconnects", rebound.ErrorMessage(err))
				s.markPendingRelease(ctx, name, fo.FromSite)
			}
		} else {
			r.Message("source site %s is not connected; it will be released when it reconnects", fo.FromSite)
			s.markPendingRelease(ctx, name, fo.FromSite)
		}
		s.event(name, fo.ToSite, "failover.committed", fmt.Sprintf("failover to %s committed at point %s", fo.ToSite, fo.Point.ID))
		return nil
	})
}

func (s *Server) markPendingRelease(ctx context.Context, machine, site string) {
	if err := s.DB.PutSetting(ctx, "pending-release/"+site+"/"+machine, "1"); err != nil {
		s.Logger.Error("record pending release", "err", err)
	}
}

// TestFailover exports a scratch copy of a point while replication goes on.
// "latest" means what it means for every verb: everything the source
// acknowledged before the command. Without fencing, a point is cut at the
// source's head when the command arrives and the job waits until the
// recovery site holds it; only when the source cannot be reached does it
// test the newest state the recovery site holds, and says so.
func (s *Server) TestFailover(ctx context.Context, name, point string) (*rebound.Job, error) {
	m, err := s.idleProtection(ctx, name, "run a test failover")
	if err != nil {
		return nil, err
	}
	if point == "" {
		point = rebound.PointLatestProcessed
	}
	if m.State != rebound.MachineProtected {
		return nil, stateConflict(m, "run a test failover")
	}
	from, to := m.Protection.SourceSite, m.Protection.TargetSite
	dst, err := s.site(to)
	if err != nil {
		return nil, err
	}
	if err := checkSelector(ctx, dst, name, point); err != nil {
		return nil, err
	}
	steps := []string{"resolve", "activate"}
	var head rebound.RecoveryPoint
	var headErr error
	if point == rebound.PointLatest {
		steps = append([]string{"drain"}, steps...)
		// The head is taken now, not when the job gets to run.
		if src, err := s.site(from); err != nil {
			headErr = err
		} else {
			cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			head, headErr = src.CutPoint(cctx, name, rebound.PointCrash)
			cancel()
		}
	}
	return s.startJob(ctx, "test-failover", name, steps, func(ctx context.Context, r *jobRun) error {
		sel := point
		if point == rebound.PointLatest {
			r.Step("drain")
			if headErr != nil {
				msg := fmt.Sprintf("source site %s unreachable (%s): testing the newest state %s holds, which may lack the source's last writes", from, rebound.ErrorMessage(headErr), to)
				r.Message("%s", msg)
				s.event(name, to, "test-failover.undrained", msg)
			} else {
				start, _ := dst.Replicated(ctx, name)
				wctx, cancel := context.WithTimeout(ctx, s.WaitTimeout)
				err := waitReplicated(wctx, dst, name, head.Seq, func(got uint64) {
					if head.Seq > start && got >= start {
						r.Progress(float64(got-start) / float64(head.Seq-start) * 0.9)
					}
					r.Message("%s holds %d of %d records", to, got, head.Seq)
				})
				cancel()
				if err != nil {
					if ctx.Err() != nil {
						return ctx.Err()
					}
					return rebound.Errorf(rebound.EUNAVAILABLE, "%s has not received the source's writes up to point %s within %s: %s; retry, or test what it holds (rebound test-failover %s --point latest-processed)",
						to, head.ID, s.WaitTimeout, rebound.ErrorMessage(err), name)
				}
				r.Message("%s holds everything %s acknowledged before the command (point %s)", to, from, head.ID)
				sel = head.ID
			}
		}
		r.Step("resolve")
		p, err := resolvePoint(ctx, dst, name, sel)
		if err != nil {
			return err
		}
		r.Step("activate")
		disks, err := dst.Activate(ctx, rebound.ActivateSpec{Machine: name, PointID: p.ID, Seq: p.Seq, Test: true})
		if err != nil {
			return err
		}
		r.SetResult(p)
		if err := s.powerOn(ctx, r, m, dst, to, true); err != nil {
			return err
		}
		s.event(name, to, "test-failover", "test failover at point "+p.ID)
		return s.updateMachine(ctx, name, func(m *rebound.Machine) {
			m.TestFailover = &rebound.TestFailover{Site: to, Point: p, Disks: disks}
		})
	})
}

// TestFailoverCleanup removes a test failover.
func (s *Server) TestFailoverCleanup(ctx context.Context, name string) (*rebound.Job, error) {
	m, err := s.DB.GetMachine(ctx, name)
	if err != nil {
		return nil, err
	}
	if err := memberRefused(m); err != nil {
		return nil, err
	}
	if err := s.checkIdle(ctx, name); err != nil {
		return nil, err
	}
	if m.TestFailover == nil {
		return s.doneJob(ctx, "test-failover-cleanup", name, "machine "+name+" has no test failover")
	}
	dst, err := s.site(m.TestFailover.Site)
	if err != nil {
		return nil, err
	}
	return s.startJob(ctx, "test-failover-cleanup", name, []string{"deactivate"}, func(ctx context.Context, r *jobRun) error {
		r.Step("deactivate")
		if err := dst.Deactivate(ctx, name, true); err != nil {
			return err
		}
		s.event(name, m.TestFailover.Site, "test-failover.cleanup", "test failover removed")
		return s.updateMachine(ctx, name, func(m *rebound.Machine) { m.TestFailover = nil })
	})
}
