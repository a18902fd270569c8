package server

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/rebound-dr/rebound"
)

// Unprotect stops a machine's replication at both sites and removes the
// replica (the target's journal and disks). The machine stays active
// where it is, unprotected; it can then be deleted or protected again.
func (s *Server) Unprotect(ctx context.Context, name string) (*rebound.Job, error) {
	m, err := s.DB.GetMachine(ctx, name)
	if err != nil {
		return nil, err
	}
	if err := s.checkIdle(name); err != nil {
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
	return s.startJob(ctx, "unprotect", name, []string{"stop source", "remove replica"}, func(ctx context.Context, r *jobRun) error {
		if err := s.stopProtection(ctx, name, p, src, dst, r.Step, func(msg string) { r.Message("%s", msg) }); err != nil {
			return err
		}
		s.event(name, p.TargetSite, "protection.stopped", fmt.Sprintf("replication of %s from %s to %s stopped; the replica at %s is removed", name, p.SourceSite, p.TargetSite, p.TargetSite))
		return nil
	})
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
