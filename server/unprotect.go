package server

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/rebound-dr/rebound"
)

// Unprotect stops a machine's replication at both sites and removes the
// replica (the target's journal and disks), or with KeepReplica keeps it
// as a detached copy. The machine stays active where it is, unprotected;
// it can then be deleted or protected again.
func (s *Server) Unprotect(ctx context.Context, req rebound.UnprotectRequest) (*rebound.Job, error) {
	name := req.Machine
	m, err := s.DB.GetMachine(ctx, name)
	if err != nil {
		return nil, err
	}
	if err := memberRefused(m); err != nil {
		return nil, err
	}
	if len(m.Members) > 0 && req.KeepReplica {
		return nil, rebound.Errorf(rebound.EINVALID, "--keep-replica keeps one machine's replica; take the machines out of group %s first (rebound group remove-machine %s NAME)", name, name)
	}
	if err := s.checkIdle(ctx, name); err != nil {
		return nil, err
	}
	switch {
	case m.State == rebound.MachineUnprotected && m.Protection == nil:
		return s.doneJob(ctx, "unprotect", name, fmt.Sprintf("machine %s is not protected; it is active at %s", name, m.ActiveSite))
	case m.State != rebound.MachineProtected && m.State != rebound.MachineSyncing || m.Protection == nil:
		// A failover holds the only other copy: it is decided by commit
		// or cancel, not dropped.
		return nil, stateConflict(m, "be unprotected")
	case m.TestFailover != nil:
		return nil, rebound.Errorf(rebound.ECONFLICT, "machine %s has a test failover; clean it up first (rebound test-failover cleanup %s)", name, name)
	case req.KeepReplica && m.State == rebound.MachineSyncing:
		return nil, rebound.Errorf(rebound.ECONFLICT, "machine %s is still syncing: its replica holds no consistent point to keep; wait for the first point (rebound protect %s --to %s --wait), or drop --keep-replica", name, name, m.Protection.TargetSite)
	}
	p := *m.Protection
	src, err := s.site(p.SourceSite)
	if err != nil {
		return nil, err
	}
	dst, err := s.site(p.TargetSite)
	if err != nil {
		return nil, err
	}
	if req.KeepReplica {
		return s.startJob(ctx, "unprotect", name, []string{"drain", "stop source", "keep replica"}, func(ctx context.Context, r *jobRun) error {
			return s.keepReplica(ctx, r, name, p, src, dst)
		})
	}
	return s.startJob(ctx, "unprotect", name, []string{"stop source", "remove replica"}, func(ctx context.Context, r *jobRun) error {
		if err := s.stopProtection(ctx, name, p, src, dst, r.Step, func(msg string) { r.Message("%s", msg) }); err != nil {
			return err
		}
		if len(m.Members) > 0 {
			return s.dissolveGroup(ctx, name)
		}
		s.event(name, p.TargetSite, "protection.stopped", fmt.Sprintf("replication of %s from %s to %s stopped; the replica at %s is removed", name, p.SourceSite, p.TargetSite, p.TargetSite))
		return nil
	})
}

// keepReplica cuts a point at the source and waits until the target holds
// it, stops the source, and has the target write its replica at that point
// out as plain disks: the detached copy. Until the source stops nothing is
// changed, so a drain that does not finish leaves the machine protected.
func (s *Server) keepReplica(ctx context.Context, r *jobRun, name string, p rebound.Protection, src, dst rebound.SiteService) error {
	r.Step("drain")
	var point rebound.RecoveryPoint
	if ci, err := src.CopyInfo(ctx, name); err == nil && ci.Role == "active" {
		// An earlier run stopped the source, then failed: the target
		// holds all the source sent, and its newest point is kept.
		pt, err := resolvePoint(ctx, dst, name, rebound.PointLatest)
		if err != nil {
			return err
		}
		r.Message("%s no longer replicates %s: keeping the newest point %s holds (%s)", p.SourceSite, name, p.TargetSite, pt.ID)
		point = pt
	} else {
		head, err := src.CutPoint(ctx, name, rebound.PointCrash)
		if err != nil {
			return fmt.Errorf("cut a point at %s: %w", p.SourceSite, err)
		}
		wctx, cancel := context.WithTimeout(ctx, s.WaitTimeout)
		err = waitReplicated(wctx, dst, name, head.Seq, func(got uint64) { r.Message("%s holds %d of %d records", p.TargetSite, got, head.Seq) })
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return rebound.Errorf(rebound.EUNAVAILABLE, "%s has not received the source's writes up to point %s within %s: %s; the machine is still protected: retry, or remove the replica (rebound unprotect %s)",
				p.TargetSite, head.ID, s.WaitTimeout, rebound.ErrorMessage(err), name)
		}
		if point, err = resolvePoint(ctx, dst, name, head.ID); err != nil {
			return err
		}
		r.Message("%s holds everything %s acknowledged before the command (point %s)", p.TargetSite, p.SourceSite, point.ID)
	}
	r.Step("stop source")
	if err := src.StopReplication(ctx, name); err != nil {
		return fmt.Errorf("stop replication at %s: %w", p.SourceSite, err)
	}
	r.Message("%s serves %s without replicating it", p.SourceSite, name)
	r.Step("keep replica")
	paths, err := dst.Detach(ctx, name, point.Seq)
	if err != nil {
		return fmt.Errorf("keep the replica at %s: %w; retry with rebound unprotect %s --keep-replica", p.TargetSite, err, name)
	}
	r.Message("replica at %s kept as a detached copy at point %s", p.TargetSite, point.ID)
	r.SetResult(point)
	dc := rebound.DetachedCopy{Site: p.TargetSite, Time: time.Now().UTC(), Point: point, Paths: paths}
	disks := siteDisks(ctx, src, name)
	if err := s.updateMachine(ctx, name, func(m *rebound.Machine) {
		m.State, m.Protection = rebound.MachineUnprotected, nil
		applyDisks(m, disks)
		m.DetachedCopies = append(withoutCopy(m.DetachedCopies, dc.Site), dc)
		s.setHealth(ctx, m)
	}); err != nil {
		return err
	}
	s.event(name, p.TargetSite, "protection.stopped", fmt.Sprintf("replication of %s from %s to %s stopped; the replica at %s is kept as a detached copy at point %s (%s)",
		name, p.SourceSite, p.TargetSite, p.TargetSite, point.ID, point.Time.Format(time.RFC3339)))
	return nil
}

// withoutCopy drops the detached copy at site from copies.
func withoutCopy(copies []rebound.DetachedCopy, site string) []rebound.DetachedCopy {
	var out []rebound.DetachedCopy
	for _, c := range copies {
		if c.Site != site {
			out = append(out, c)
		}
	}
	return out
}

// stopProtection stops the stream at the source (its disks stay active and
// served), then drops the replica at the target, and marks the machine
// unprotected. The source goes first, so nothing it sends lands in a
// replica being removed.
func (s *Server) stopProtection(ctx context.Context, name string, p rebound.Protection, src, dst rebound.SiteService, step, msg func(string)) error {
	step("stop source")
	if err := src.StopReplication(ctx, name); err != nil {
		return fmt.Errorf("stop replication at %s: %w", p.SourceSite, err)
	}
	msg(fmt.Sprintf("%s serves %s without replicating it", p.SourceSite, name))
	step("remove replica")
	if err := dst.StopReplication(ctx, name); err != nil {
		return fmt.Errorf("remove the replica at %s: %w", p.TargetSite, err)
	}
	msg(fmt.Sprintf("replica at %s removed", p.TargetSite))
	disks := siteDisks(ctx, src, name)
	return s.updateMachine(ctx, name, func(m *rebound.Machine) {
		m.State, m.Protection = rebound.MachineUnprotected, nil
		applyDisks(m, disks)
		s.setHealth(ctx, m)
	})
}

// undoCancelled undoes what a cancelled protect started: the job's context
// is done, so the undo gets its own. A server that is closing undoes
// nothing: its sites go on replicating and running protect again resumes.
func (s *Server) undoCancelled(jctx context.Context, r *jobRun, name string, p rebound.Protection, src, dst rebound.SiteService, cause error) error {
	if cause == nil || jctx.Err() == nil || s.ctx.Err() != nil {
		return cause
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(jctx), time.Minute)
	defer cancel()
	// The undo reports on the step the cancel interrupted.
	say := func(m string) { r.Message("cancelled: %s", m) }
	if err := s.stopProtection(ctx, name, p, src, dst, func(string) {}, say); err != nil {
		msg := fmt.Sprintf("protect cancelled, but replication could not be stopped: %s; stop it with rebound unprotect %s", rebound.ErrorMessage(err), name)
		s.event(name, p.TargetSite, "protection.cancelled", msg)
		return errors.Join(cause, rebound.Errorf(rebound.EUNAVAILABLE, "%s", msg))
	}
	say("replication stopped at both sites; " + name + " is unprotected")
	s.event(name, p.TargetSite, "protection.cancelled", fmt.Sprintf("protect cancelled: replication from %s to %s stopped, the replica at %s removed; %s is unprotected at %s (rebound protect %s --to %s starts again)",
		p.SourceSite, p.TargetSite, p.TargetSite, name, p.SourceSite, name, p.TargetSite))
	return cause
}

// dropDetachedCopy removes the detached copy site holds before a protect
// to that site: the initial copy is a full one and replaces it.
func (s *Server) dropDetachedCopy(ctx context.Context, r *jobRun, name, site string, dst rebound.SiteService) error {
	m, err := s.DB.GetMachine(ctx, name)
	if err != nil {
		return err
	}
	if !slices.ContainsFunc(m.DetachedCopies, func(c rebound.DetachedCopy) bool { return c.Site == site }) {
		return nil
	}
	ci, err := dst.CopyInfo(ctx, name)
	if err != nil {
		return err
	}
	if ci.Role == "detached" {
		r.Message("the detached copy at %s is replaced by a full copy", site)
		if err := dst.DeleteMachine(ctx, name); err != nil {
			return fmt.Errorf("remove the detached copy at %s: %w", site, err)
		}
		s.event(name, site, "detached-copy.removed", fmt.Sprintf("detached copy of %s at %s removed: rebound protect %s --to %s makes a full copy", name, site, name, site))
	}
	return s.updateMachine(ctx, name, func(m *rebound.Machine) { m.DetachedCopies = withoutCopy(m.DetachedCopies, site) })
}
