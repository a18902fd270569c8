package server

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/digest"
	"github.com/rebound-dr/rebound/internal/failpoint"
)

var _ rebound.LoopService = (*Server)(nil)

// DigestBlockSize is the largest block size of a verifying (digest)
// resync: the block size rsync picks for a disk of a few GiB, so a verify
// never sends more than rsync would.
const DigestBlockSize = 64 << 10

// A verify compares blocks as small as the change trackers' (4 KiB), so it
// sends little more than what differs, as long as the digests of a machine
// stay under maxDigestBlocks per site (16 bytes each, about 27 as JSON on
// the control stream, whose messages are bounded); larger machines use
// larger blocks, up to DigestBlockSize.
const (
	minDigestBlock  = 4 << 10
	maxDigestBlocks = 1 << 20
)

// digestBlockSize picks the block size of a verify of disks of these sizes.
func digestBlockSize(disks []rebound.Disk) int64 {
	bs := int64(minDigestBlock)
	for bs < DigestBlockSize {
		var n int64
		for _, d := range disks {
			n += (d.Size + bs - 1) / bs
		}
		if n <= maxDigestBlocks {
			break
		}
		bs *= 2
	}
	return bs
}

// Resync modes of a reprotect.
const (
	resyncFull    = "full"    // the target holds nothing: copy everything
	resyncTracked = "tracked" // union of both sides' change tracking
	resyncVerify  = "verify"  // compare block digests of both copies
)

// Failback fails a reprotected machine over back to the site it came from.
// Without a point it is planned: zero data loss.
func (s *Server) Failback(ctx context.Context, req rebound.FailoverRequest) (*rebound.Job, error) {
	if req.Point == "" {
		req.Planned = true
	}
	m, err := s.DB.GetMachine(ctx, req.Machine)
	if err != nil {
		return nil, err
	}
	if err := memberRefused(m); err != nil {
		return nil, err
	}
	if err := s.checkIdle(ctx, m.Name); err != nil {
		return nil, err
	}
	switch {
	case m.State == rebound.MachineProtected && !reprotected(m):
		// Protected in its first direction: nothing to come back from.
		return nil, rebound.Errorf(rebound.ECONFLICT, "machine %s has not failed over, so there is nothing to fail back from; %s", m.Name, nextStep(m))
	case m.State == rebound.MachineProtected, m.State == rebound.MachineFailingOver && m.Protection != nil:
		return s.failover(ctx, req, "failback")
	}
	// A failed-over (uncommitted) machine is a conflict, not a success: a
	// failback needs the failover committed and reprotected first.
	return nil, stateConflict(m, "fail back")
}

// readiness checks that the machine's active site, the capture side of a
// reprotect, is connected and reporting. It waits up to wait.
func (s *Server) readiness(ctx context.Context, site string, wait time.Duration) (rebound.SiteService, error) {
	deadline := time.Now().Add(wait)
	for {
		svc, err := s.site(site)
		if err == nil && !s.siteOffline(ctx, site) {
			return svc, nil
		}
		if !time.Now().Before(deadline) {
			how := "retry when it is back, or pass --wait-ready 15m to wait for it"
			if wait > 0 {
				how = fmt.Sprintf("waited %s; retry when it is back", wait)
			}
			return nil, rebound.Errorf(rebound.EUNAVAILABLE,
				"reprotect needs the capture side of the machine at site %q (its site appliance, or the agent for a server), and it is not connected: start it (rebound site --name %s ..., or rebound agent --name %s ... on the server) and make sure it reaches the server; %s",
				site, site, site, how)
		}
		failpoint.Hit(ctx, "server/readiness/wait") // tests count the waits
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// Reprotect replicates a committed machine from its active site back to
// the site that still holds its old disks (or to any site, with a full copy).
func (s *Server) Reprotect(ctx context.Context, req rebound.ReprotectRequest) (*rebound.Job, error) {
	m, err := s.DB.GetMachine(ctx, req.Machine)
	if err != nil {
		return nil, err
	}
	if err := memberRefused(m); err != nil {
		return nil, err
	}
	if err := s.checkIdle(ctx, m.Name); err != nil {
		return nil, err
	}
	target := req.To
	if target == "" {
		target = m.PreviousSite
	}
	if target == "" && m.HomeSite != m.ActiveSite {
		target = m.HomeSite
	}
	if m.Protection != nil && m.State == rebound.MachineProtected && (target == "" || m.Protection.TargetSite == target) {
		return s.doneJob(ctx, "reprotect", m.Name, fmt.Sprintf("machine %s is already protected from %s to %s", m.Name, m.Protection.SourceSite, m.Protection.TargetSite))
	}
	if m.Protection != nil && m.State == rebound.MachineSyncing && (target == "" || m.Protection.TargetSite == target) {
		// An earlier reprotect job ended (failed, cancelled, server
		// restart) after the stream started: the sites go on resyncing,
		// so running it again follows the resync to its first point.
		return s.resumeReprotect(ctx, m)
	}
	switch {
	case m.State != rebound.MachineUnprotected:
		return nil, stateConflict(m, "be reprotected")
	case target == "":
		return nil, rebound.Errorf(rebound.EINVALID, "machine %s has never failed over, so it has no previous site: name the target (rebound reprotect %s --to SITE) or protect it (rebound protect %s --to SITE)", m.Name, m.Name, m.Name)
	case target == m.ActiveSite:
		return nil, rebound.Errorf(rebound.EINVALID, "machine %q is active at %s; reprotect it to another site", m.Name, target)
	case req.Keep != "" && req.Keep != target && req.Keep != m.ActiveSite:
		return nil, rebound.Errorf(rebound.EINVALID, "--keep must name %s or %s", m.ActiveSite, target)
	}
	if req.Policy == "" {
		req.Policy = "default"
	}
	pol, err := s.DB.GetPolicy(ctx, req.Policy)
	if err != nil {
		return nil, err
	}
	wait := time.Duration(req.WaitReady)
	if wait <= 0 {
		// Without --wait-ready the command fails at once.
		if _, err := s.readiness(ctx, m.ActiveSite, 0); err != nil {
			return nil, err
		}
	}
	if _, err := s.site(target); err != nil && wait <= 0 {
		return nil, rebound.Errorf(rebound.EUNAVAILABLE, "preflight failed: peer reachable: %s (or pass --wait-ready 15m to wait for it)", rebound.ErrorMessage(err))
	}
	steps := []string{"readiness", "preflight", "compare", "prepare target", "start source", "resync"}
	req.To = target // stored in the job: a server taking it over needs it
	return s.startJobRequest(ctx, "reprotect", m.Name, steps, req, s.reprotectRun(m, req, target, pol, wait))
}

// takeOverReprotect continues a reprotect job another server (or this
// one's previous life) left. Once the stream started (the machine is
// syncing) it follows the resync, which the sites carry on by themselves;
// before that it runs the reprotect again, whose steps are idempotent (the
// stream is named after the source copy's generation).
func (s *Server) takeOverReprotect(ctx context.Context, j rebound.Job) (*rebound.Job, error) {
	req, err := request[rebound.ReprotectRequest](j)
	if err != nil {
		return nil, err
	}
	m, err := s.DB.GetMachine(ctx, j.Machine)
	if err != nil {
		return nil, err
	}
	if m.State == rebound.MachineSyncing && m.Protection != nil {
		return s.runJob(ctx, j, m.Name, false, s.resyncRun(*m.Protection, memberSiteWait))
	}
	if m.State != rebound.MachineUnprotected || req.To == "" || req.To == m.ActiveSite {
		return nil, stateConflict(m, "continue a reprotect")
	}
	pol, err := s.DB.GetPolicy(ctx, req.Policy)
	if err != nil {
		return nil, err
	}
	// The sites may not be connected to this server yet.
	return s.runJob(ctx, j, m.Name, false, s.reprotectRun(m, req, req.To, pol, max(time.Duration(req.WaitReady), memberSiteWait)))
}

// reprotectRun is the reprotect job's function.
func (s *Server) reprotectRun(m *rebound.Machine, req rebound.ReprotectRequest, target string, pol *rebound.Policy, wait time.Duration) func(ctx context.Context, r *jobRun) error {
	return func(ctx context.Context, r *jobRun) error {
		r.Step("readiness")
		active := m.ActiveSite
		src, err := s.readiness(ctx, active, wait)
		if err != nil {
			return err
		}
		dst, err := s.readiness(ctx, target, wait)
		if err != nil {
			return rebound.Errorf(rebound.EUNAVAILABLE, "preflight failed: peer reachable: the target site %q is not connected: %s", target, rebound.ErrorMessage(err))
		}

		r.Step("preflight")
		report, plan, err := s.reprotectPlan(ctx, m, active, target, req, src, dst)
		if err != nil {
			return err
		}
		if !report.OK {
			return rebound.Errorf(rebound.ECONFLICT, "preflight failed: %s", failedChecks(report))
		}
		if plan.keepTarget {
			// The target's copy wins a split brain: it becomes active, the
			// current active copy is released and becomes the seed.
			r.Message("keeping the copy at %s: it becomes the active copy", target)
			if err := dst.Reactivate(ctx, m.Name); err != nil {
				return err
			}
			if err := src.Release(ctx, m.Name, time.Time{}); err != nil {
				return err
			}
			active, target, src, dst = target, active, dst, src
			disks := siteDisks(ctx, src, m.Name)
			if err := s.updateMachine(ctx, m.Name, func(x *rebound.Machine) {
				x.ActiveSite, x.PreviousSite = active, target
				applyDisks(x, disks)
			}); err != nil {
				return err
			}
		}
		r.Message("%s", plan.why)

		r.Step("compare")
		regions, compared, err := s.compare(ctx, r, m, plan, src, dst)
		if err != nil {
			return err
		}
		r.setBytes(compared, 0, regionBytes(regions))

		dstSite, err := s.DB.GetSite(ctx, target)
		if err != nil {
			return err
		}
		srcInfo, err := src.CopyInfo(ctx, m.Name)
		if err != nil {
			return err
		}
		// The stream is named after the source copy's generation, so a
		// retry after a failed attempt finds the target it prepared (and
		// the disks it adopted) and StartReplication is idempotent.
		streamID := m.Name + "." + srcInfo.Generation
		spec, err := s.streamSpec(ctx, m)
		if err != nil {
			return err
		}
		spec.StreamID, spec.Policy, spec.Generation = streamID, *pol, srcInfo.Generation

		r.Step("prepare target")
		tspec := spec
		tspec.Role, tspec.PeerSite, tspec.AdoptDisks = "target", active, plan.mode != resyncFull
		if err := dst.StartReplication(ctx, tspec); err != nil {
			return err
		}
		r.Step("start source")
		sspec := spec
		sspec.Role, sspec.PeerSite, sspec.PeerAddr = "source", target, dstSite.ReplAddr
		sspec.Seed = rebound.SeedFull
		if plan.mode != resyncFull {
			sspec.Seed, sspec.Regions = rebound.SeedDelta, regions
		}
		if err := src.StartReplication(ctx, sspec); err != nil {
			return err
		}
		if err := s.updateMachine(ctx, m.Name, func(x *rebound.Machine) {
			x.State = rebound.MachineSyncing
			x.Protection = &rebound.Protection{SourceSite: active, TargetSite: target, Policy: pol.Name, ReplState: "resyncing"}
		}); err != nil {
			return err
		}
		s.event(m.Name, target, "reprotect.started", fmt.Sprintf("reprotecting %s from %s to %s (%s)", m.Name, active, target, plan.why))

		return s.finishResync(ctx, r, m.Name, active, target, src, dst)
	}
}

// diskShapes returns the disks without their NBD URIs.
func diskShapes(disks []rebound.Disk) []rebound.Disk {
	out := make([]rebound.Disk, len(disks))
	for i, d := range disks {
		out[i] = rebound.Disk{Name: d.Name, Size: d.Size}
	}
	return out
}

// resyncPlan is how a reprotect brings the target up to date.
type resyncPlan struct {
	mode       string
	why        string
	keepTarget bool
	src, dst   *rebound.CopyInfo
}

// reprotectPlan runs the reprotect preflight and chooses the resync mode.
func (s *Server) reprotectPlan(ctx context.Context, m *rebound.Machine, active, target string, req rebound.ReprotectRequest, src, dst rebound.SiteService) (*rebound.PreflightReport, *resyncPlan, error) {
	rep := &rebound.PreflightReport{Machine: m.Name, Operation: "reprotect", OK: true}
	add := func(name string, ok bool, format string, args ...any) {
		rep.Checks = append(rep.Checks, rebound.PreflightCheck{Name: name, OK: ok, Message: fmt.Sprintf(format, args...)})
		rep.OK = rep.OK && ok
	}
	add("capture side", true, "site %s is connected and reporting", active)
	add("peer reachable", true, "site %s is connected", target)
	si, err := src.CopyInfo(ctx, m.Name)
	if err != nil {
		return nil, nil, err
	}
	di, err := dst.CopyInfo(ctx, m.Name)
	if err != nil {
		return nil, nil, err
	}
	plan := &resyncPlan{src: si, dst: di}
	var need int64
	for _, d := range m.Disks {
		need += d.Size
	}
	switch {
	case di.Role == "":
		plan.mode = resyncFull
		plan.why = fmt.Sprintf("full copy to new disks at %s: it holds no copy of %s", target, m.Name)
		add("generations", true, "%s holds no copy: nothing to reconcile", target)
	case di.Role == "target" && si.Generation != "" && di.Generation == si.Generation:
		// An earlier attempt of this reprotect prepared the target (its
		// stream follows this generation) and stopped before the first
		// point: resume it on what the target holds.
		switch {
		case si.Role == "source":
			plan.mode = resyncTracked
			plan.why = fmt.Sprintf("resuming the reprotect to %s: the stream from %s runs, following its resync", target, active)
		case di.Tracked && si.Tracked:
			plan.mode = resyncTracked
			plan.why = fmt.Sprintf("resuming the reprotect to %s: delta resync to the disks it already adopted (generation %s)", target, di.Generation)
		default:
			why := si.Untrusted
			if why == "" {
				why = di.Untrusted
			}
			plan.mode = resyncFull
			plan.why = fmt.Sprintf("resuming the reprotect to %s with a full copy: change tracking unavailable (%s)", target, why)
		}
		add("generations", true, "%s follows %s's generation %s (an earlier attempt prepared it)", target, active, si.Generation)
	case di.Role == "detached":
		add("generations", false, "site %s holds a detached copy of %s (unprotect --keep-replica), not a released copy to resync; rebound protect %s --to %s replaces it with a full copy", target, m.Name, m.Name, target)
	case di.Role != "released":
		add("generations", false, "site %s holds %s as %s, not as a released copy; stop that first", target, m.Name, di.Role)
	case si.Parent != "" && di.Generation == si.Parent:
		plan.mode = resyncTracked
		plan.why = fmt.Sprintf("delta resync to the disks still held at %s (generation %s is the parent of %s)", target, di.Generation, si.Generation)
		if req.Verify {
			plan.mode, plan.why = resyncVerify, plan.why+"; --verify: block digests are compared"
		} else if !si.Tracked || !di.Tracked {
			why := si.Untrusted
			if why == "" {
				why = di.Untrusted
			}
			plan.mode, plan.why = resyncVerify, plan.why+"; change tracking unavailable ("+why+"): block digests are compared"
		}
		add("generations", true, "%s (%s) descends from %s (%s)", active, si.Generation, target, di.Generation)
	default:
		// Both copies changed since they parted, or they are unrelated.
		msg := fmt.Sprintf("split brain: the copies at %s (generation %s, from %s) and %s (generation %s, from %s) both changed since they parted; a reprotect would lose the changes of one",
			active, si.Generation, orNone(si.Parent), target, di.Generation, orNone(di.Parent))
		if req.Keep == "" {
			add("generations", false, "%s; name the copy to keep with --keep %s (overwrites %s's changes) or --keep %s", msg, active, target, target)
			break
		}
		plan.mode, plan.keepTarget = resyncVerify, req.Keep == target
		plan.why = fmt.Sprintf("%s; keeping %s's copy as asked: block digests are compared", msg, req.Keep)
		add("generations", true, "%s; --keep %s", msg, req.Keep)
	}
	if st, err := s.DB.GetSite(ctx, target); err == nil && st.FreeBytes > 0 {
		want := int64(0)
		if plan.mode == resyncFull {
			want = need
		}
		add("target space", st.FreeBytes >= want, "%s free at %s, %s needed", humanBytes(st.FreeBytes), target, humanBytes(want))
	}
	return rep, plan, nil
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

func failedChecks(r *rebound.PreflightReport) string {
	var out string
	for _, c := range r.Checks {
		if !c.OK {
			if out != "" {
				out += "; "
			}
			out += c.Name + ": " + c.Message
		}
	}
	return out
}

// compare returns the regions to send and the bytes compared.
func (s *Server) compare(ctx context.Context, r *jobRun, m *rebound.Machine, plan *resyncPlan, src, dst rebound.SiteService) ([][]rebound.Region, int64, error) {
	switch plan.mode {
	case resyncFull:
		return nil, 0, nil
	case resyncTracked:
		out := make([][]rebound.Region, len(m.Disks))
		for i := range out {
			var rs []rebound.Region
			if i < len(plan.src.Changed) {
				rs = append(rs, plan.src.Changed[i]...)
			}
			if i < len(plan.dst.Changed) {
				rs = append(rs, plan.dst.Changed[i]...)
			}
			out[i] = rebound.MergeRegions(rs)
		}
		r.Message("tracked changes: %s at the active copy, %s at the old one", humanBytes(plan.src.ChangedBytes), humanBytes(plan.dst.ChangedBytes))
		return out, 0, nil
	}
	// Both sides read and hash at the same time.
	bs := digestBlockSize(m.Disks)
	var wg sync.WaitGroup
	var sd, dd []rebound.BlockDigests
	var serr, derr error
	wg.Add(2)
	go func() { defer wg.Done(); sd, serr = src.Digests(ctx, m.Name, bs) }()
	go func() { defer wg.Done(); dd, derr = dst.Digests(ctx, m.Name, bs) }()
	wg.Wait()
	if serr != nil {
		return nil, 0, fmt.Errorf("digests at the active site: %w", serr)
	}
	if derr != nil {
		return nil, 0, fmt.Errorf("digests at the target: %w", derr)
	}
	if len(sd) != len(m.Disks) || len(dd) != len(m.Disks) {
		return nil, 0, rebound.Errorf(rebound.EINTERNAL, "digests cover %d and %d disks, machine has %d", len(sd), len(dd), len(m.Disks))
	}
	out := make([][]rebound.Region, len(m.Disks))
	var compared int64
	for i := range m.Disks {
		a, err := unpackDigests(sd[i], m.Disks[i].Size, bs)
		if err != nil {
			return nil, 0, fmt.Errorf("digests at the active site: %w", err)
		}
		b, err := unpackDigests(dd[i], m.Disks[i].Size, bs)
		if err != nil {
			return nil, 0, fmt.Errorf("digests at the target: %w", err)
		}
		out[i] = digest.Diff(a, b, bs, m.Disks[i].Size)
		compared += m.Disks[i].Size
	}
	r.Message("compared %s of %s block digests on both sides: %s differ", humanBytes(compared), humanBytes(bs), humanBytes(regionBytes(out)))
	return out, compared, nil
}

// unpackDigests returns a disk's block digests from Sums or Packed.
func unpackDigests(d rebound.BlockDigests, size, bs int64) ([][]byte, error) {
	if len(d.Packed) == 0 {
		return d.Sums, nil
	}
	n := (size + bs - 1) / bs
	if d.BlockSize != bs || int64(len(d.Packed)) != n*digest.Size {
		return nil, rebound.Errorf(rebound.EINTERNAL, "%d bytes of packed digests of %d-byte blocks, want %d of %d-byte blocks", len(d.Packed), d.BlockSize, n*digest.Size, bs)
	}
	sums := make([][]byte, n)
	for i := range sums {
		sums[i] = d.Packed[i*digest.Size : (i+1)*digest.Size : (i+1)*digest.Size]
	}
	return sums, nil
}

func regionBytes(rs [][]rebound.Region) int64 {
	var n int64
	for _, d := range rs {
		for _, r := range d {
			n += r.Length
		}
	}
	return n
}

// waitResync follows the resync until the target has its first point,
// reporting bytes sent and an ETA.
func (s *Server) waitResync(ctx context.Context, r *jobRun, name string, src, dst rebound.SiteService) error {
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	start := time.Now()
	for {
		// The point is looked for first, so the figures read after it
		// are final: a resync that ends between the two reads would
		// otherwise report the bytes of the tick before.
		pl, perr := dst.ListPoints(ctx, name)
		done := perr == nil && len(pl.Points) > 0
		if st, err := src.Status(ctx); err == nil {
			for _, ms := range st.Machines {
				if ms.Name != name {
					continue
				}
				r.mu.Lock()
				r.job.BytesSent, r.job.BytesTotal = ms.SyncDone, max(ms.SyncTotal, r.job.BytesTotal)
				if el := time.Since(start).Seconds(); ms.SyncDone > 0 && el > 0 {
					r.job.ETASeconds = float64(ms.SyncTotal-ms.SyncDone) / (float64(ms.SyncDone) / el)
				}
				r.mu.Unlock()
				if ms.SyncTotal > 0 {
					r.Progress(float64(ms.SyncDone) / float64(ms.SyncTotal) * 0.99)
				}
				r.Message("sent %s of %s", humanBytes(ms.SyncDone), humanBytes(ms.SyncTotal))
			}
		}
		if done {
			r.mu.Lock()
			r.job.ETASeconds = 0
			r.mu.Unlock()
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// setBytes records resync figures on the job.
func (r *jobRun) setBytes(compared, sent, total int64) {
	r.mu.Lock()
	r.job.BytesCompared, r.job.BytesSent, r.job.BytesTotal = compared, sent, total
	r.mu.Unlock()
	r.save(true)
}

// Preflight operations.
const (
	opProtect   = "protect"
	opFailover  = "failover"
	opFailback  = "failback"
	opCommit    = "commit"
	opReprotect = "reprotect"
)

// nextOperation is the operation a machine's state allows next: what a
// bare preflight checks.
func nextOperation(m *rebound.Machine) string {
	switch m.State {
	case rebound.MachineFailedOver:
		return opCommit
	case rebound.MachineUnprotected:
		if m.PreviousSite != "" && m.PreviousSite != m.ActiveSite {
			return opReprotect
		}
		return opProtect
	}
	if goesHome(m) {
		return opFailback
	}
	return opFailover
}

// Preflight runs the checks of an operation without changing anything;
// without one, of the operation the machine's state allows next.
func (s *Server) Preflight(ctx context.Context, name, op string) (*rebound.PreflightReport, error) {
	m, err := s.DB.GetMachine(ctx, name)
	if err != nil {
		return nil, err
	}
	if err := memberRefused(m); err != nil {
		return nil, err
	}
	if op == "" {
		op = nextOperation(m)
	}
	// An operation the state does not allow fails one check that says
	// what comes next.
	wrongState := func(ok bool, verb string) *rebound.PreflightReport {
		if ok {
			return nil
		}
		return &rebound.PreflightReport{Machine: name, Operation: op, Checks: []rebound.PreflightCheck{{Name: "state",
			Message: rebound.ErrorMessage(stateConflict(m, verb))}}}
	}
	switch op {
	case opProtect:
		if rep := wrongState(m.State == rebound.MachineUnprotected, "be protected"); rep != nil {
			return rep, nil
		}
		return s.protectPreflight(ctx, m), nil
	case opCommit:
		if rep := wrongState(m.State == rebound.MachineFailedOver && m.Failover != nil, "commit"); rep != nil {
			return rep, nil
		}
		return s.commitPreflight(ctx, m), nil
	case opReprotect:
		if rep := wrongState(m.State == rebound.MachineUnprotected, "be reprotected"); rep != nil {
			return rep, nil
		}
		target := m.PreviousSite
		if target == "" || target == m.ActiveSite {
			return &rebound.PreflightReport{Machine: name, Operation: op, Checks: []rebound.PreflightCheck{{Name: "previous site",
				Message: fmt.Sprintf("machine %s has never failed over, so it has no previous site to reprotect to; %s", name, nextStep(m))}}}, nil
		}
		rep := &rebound.PreflightReport{Machine: name, Operation: op, OK: true}
		src, serr := s.site(m.ActiveSite)
		dst, derr := s.site(target)
		if serr != nil || derr != nil {
			rep.OK = false
			rep.Checks = append(rep.Checks,
				rebound.PreflightCheck{Name: "capture side", OK: serr == nil, Message: msgOr(serr, "site "+m.ActiveSite+" is connected")},
				rebound.PreflightCheck{Name: "peer reachable", OK: derr == nil, Message: msgOr(derr, "site "+target+" is connected")})
			return rep, nil
		}
		rep, _, err := s.reprotectPlan(ctx, m, m.ActiveSite, target, rebound.ReprotectRequest{Machine: name}, src, dst)
		return rep, err
	case opFailover, opFailback:
		verb := map[string]string{opFailover: "fail over", opFailback: "fail back"}[op]
		if rep := wrongState(m.Protection != nil && m.State == rebound.MachineProtected, verb); rep != nil {
			return rep, nil
		}
		return s.failoverPreflight(ctx, m, op), nil
	}
	return nil, rebound.Errorf(rebound.EINVALID, "unknown operation %q: use protect, failover, failback, commit or reprotect", op)
}

// protectPreflight checks a protect of an unprotected machine: its site is
// connected and another site is there to protect it to.
func (s *Server) protectPreflight(ctx context.Context, m *rebound.Machine) *rebound.PreflightReport {
	rep := &rebound.PreflightReport{Machine: m.Name, Operation: opProtect, OK: true}
	add := func(n string, ok bool, msg string) {
		rep.Checks = append(rep.Checks, rebound.PreflightCheck{Name: n, OK: ok, Message: msg})
		rep.OK = rep.OK && ok
	}
	_, err := s.site(m.ActiveSite)
	add("capture side", err == nil, msgOr(err, "site "+m.ActiveSite+" is connected"))
	var others []string
	if sites, err := s.DB.ListSites(ctx); err == nil {
		for _, st := range sites {
			if st.Name == m.ActiveSite {
				continue
			}
			if _, err := s.site(st.Name); err == nil {
				others = append(others, st.Name)
			}
		}
	}
	if len(others) == 0 {
		add("recovery site", false, "no other site is connected to protect "+m.Name+" to: start one (rebound site --name NAME ...)")
	} else {
		add("recovery site", true, fmt.Sprintf("connected: %s; rebound protect %s --to %s", strings.Join(others, ", "), m.Name, others[0]))
	}
	return rep
}

// commitPreflight checks a commit of a failed-over machine: the recovery
// site is reachable and has room for the flattened disks.
func (s *Server) commitPreflight(ctx context.Context, m *rebound.Machine) *rebound.PreflightReport {
	rep := &rebound.PreflightReport{Machine: m.Name, Operation: opCommit, OK: true}
	add := func(n string, ok bool, msg string) {
		rep.Checks = append(rep.Checks, rebound.PreflightCheck{Name: n, OK: ok, Message: msg})
		rep.OK = rep.OK && ok
	}
	fo := m.Failover
	add("failover", true, fmt.Sprintf("failed over from %s to %s at point %s", fo.FromSite, fo.ToSite, fo.Point.ID))
	_, err := s.site(fo.ToSite)
	add("peer reachable", err == nil, msgOr(err, "recovery site "+fo.ToSite+" is connected"))
	if _, err := s.site(fo.FromSite); err != nil {
		add("source reachable", true, "source site "+fo.FromSite+" is not connected: it is released when it reconnects")
	} else {
		add("source reachable", true, "source site "+fo.FromSite+" is connected: its disks are kept, released, as the base of a reprotect")
	}
	var need int64
	for _, d := range m.Disks {
		need += d.Size
	}
	if st, err := s.DB.GetSite(ctx, fo.ToSite); err == nil && st.FreeBytes > 0 {
		add("target space", st.FreeBytes >= need, fmt.Sprintf("%s free at %s, %s needed to commit", humanBytes(st.FreeBytes), fo.ToSite, humanBytes(need)))
	}
	return rep
}

func msgOr(err error, ok string) string {
	if err != nil {
		return rebound.ErrorMessage(err)
	}
	return ok
}

// failoverPreflight runs the checks of a failover or failback of a machine
// with protection: the recovery site is reachable and holds points, it has
// room for the committed disks, and its copy follows the source's
// generation.
func (s *Server) failoverPreflight(ctx context.Context, m *rebound.Machine, op string) *rebound.PreflightReport {
	rep := &rebound.PreflightReport{Machine: m.Name, Operation: op, OK: true}
	add := func(n string, ok bool, msg string) {
		rep.Checks = append(rep.Checks, rebound.PreflightCheck{Name: n, OK: ok, Message: msg})
		rep.OK = rep.OK && ok
	}
	from, to := m.Protection.SourceSite, m.Protection.TargetSite
	dst, err := s.site(to)
	add("peer reachable", err == nil, msgOr(err, "recovery site "+to+" is connected"))
	src, serr := s.site(from)
	if serr != nil {
		add("source reachable", true, "source site "+from+" is not connected: only an unplanned "+op+" is possible")
	} else {
		add("source reachable", true, "source site "+from+" is connected: a planned "+op+" loses no data")
	}
	if dst != nil {
		pl, err := dst.ListPoints(ctx, m.Name)
		ok := err == nil && len(pl.Points) > 0
		msg := msgOr(err, "")
		if ok {
			msg = fmt.Sprintf("%d points, newest %s", len(pl.Points), pl.Points[len(pl.Points)-1].Time.Format(time.RFC3339))
		} else if err == nil {
			msg = "no recovery point yet"
		}
		add("recovery points", ok, msg)
		// The recovery copy follows the generation of the copy it
		// replicates; anything else means it holds another history.
		if di, err := dst.CopyInfo(ctx, m.Name); err != nil {
			add("generations", false, "read the copy at "+to+": "+rebound.ErrorMessage(err))
		} else if src == nil {
			add("generations", true, fmt.Sprintf("the copy at %s follows generation %s; %s is not connected to compare", to, orNone(di.Generation), from))
		} else if si, err := src.CopyInfo(ctx, m.Name); err != nil {
			add("generations", false, "read the copy at "+from+": "+rebound.ErrorMessage(err))
		} else {
			add("generations", si.Generation == di.Generation, fmt.Sprintf("the copy at %s (generation %s) follows %s (generation %s)", to, orNone(di.Generation), from, orNone(si.Generation)))
		}
	}
	if e := m.Protection.JournalError; e != "" {
		// The points before the damage are sound and a disaster may need
		// them, so a failover goes on; a failback promises every write.
		add("journal", op != "failback", e)
	} else {
		add("journal", true, "the journal at "+to+" reads back whole")
	}
	var need int64
	for _, d := range m.Disks {
		need += d.Size
	}
	if st, err := s.DB.GetSite(ctx, to); err == nil && st.FreeBytes > 0 {
		add("target space", st.FreeBytes >= need, fmt.Sprintf("%s free at %s, %s needed to commit", humanBytes(st.FreeBytes), to, humanBytes(need)))
	}
	return rep
}

// resumeReprotect follows the resync of a reprotect whose job ended before
// the first point and marks the machine protected.
func (s *Server) resumeReprotect(ctx context.Context, m *rebound.Machine) (*rebound.Job, error) {
	return s.startJob(ctx, "reprotect", m.Name, []string{"readiness", "resync"}, s.resyncRun(*m.Protection, 0))
}

// resyncRun follows a resync the sites carry on by themselves, waiting up
// to wait for them to be connected.
func (s *Server) resyncRun(p rebound.Protection, wait time.Duration) func(ctx context.Context, r *jobRun) error {
	return func(ctx context.Context, r *jobRun) error {
		name := jobOf(ctx).job.Machine
		if !r.completed("readiness") {
			r.Step("readiness")
		}
		src, err := s.readiness(ctx, p.SourceSite, wait)
		if err != nil {
			return err
		}
		dst, err := s.readiness(ctx, p.TargetSite, wait)
		if err != nil {
			return rebound.Errorf(rebound.EUNAVAILABLE, "the target site %q is not connected: %s", p.TargetSite, rebound.ErrorMessage(err))
		}
		r.Message("resuming the resync from %s to %s started by an earlier reprotect", p.SourceSite, p.TargetSite)
		return s.finishResync(ctx, r, name, p.SourceSite, p.TargetSite, src, dst)
	}
}

// finishResync follows a reprotect's resync to the target's first point and
// marks the machine protected.
func (s *Server) finishResync(ctx context.Context, r *jobRun, name, from, to string, src, dst rebound.SiteService) error {
	r.Step("resync")
	if err := s.waitResync(ctx, r, name, src, dst); err != nil {
		return err
	}
	if err := s.updateMachine(ctx, name, func(x *rebound.Machine) {
		x.State = rebound.MachineProtected
		if x.Protection != nil {
			x.Protection.SyncProgress = 1
		}
	}); err != nil {
		return err
	}
	s.event(name, to, "protection.protected", fmt.Sprintf("reprotect complete: %s protected from %s to %s", name, from, to))
	return nil
}
