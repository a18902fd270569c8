package server

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/failpoint"
)

var _ rebound.PlanService = (*Server)(nil)

// Plan jobs keep their progress (rebound.PlanProgress) in the job, saved
// at every change. A restarted server runs them again from there: every
// member verb is idempotent (a member already done is skipped, one that
// was running is issued again), so a plan job survives a restart.

const (
	defaultScriptTimeout = 5 * time.Minute
	defaultBootTimeout   = 5 * time.Minute
	scriptOutputMax      = 64 << 10
	// memberSiteWait is how long a member waits for its sites to connect
	// (a resumed job starts before the sites are back).
	memberSiteWait = 2 * time.Minute
)

// ApplyPlan creates or replaces a plan. Its machines must exist.
func (s *Server) ApplyPlan(ctx context.Context, p rebound.Plan) (*rebound.Plan, error) {
	if err := validName(p.Name); err != nil {
		return nil, err
	}
	if err := rebound.ValidatePlan(p); err != nil {
		return nil, err
	}
	for _, st := range p.Stages {
		for _, name := range st.Groups {
			if g, err := s.DB.GetMachine(ctx, name); rebound.ErrorCode(err) == rebound.ENOTFOUND || err == nil && len(g.Members) == 0 {
				return nil, rebound.Errorf(rebound.EINVALID, "plan %s, stage %s: replication group %q does not exist (rebound group list shows the groups)", p.Name, st.Name, name)
			} else if err != nil {
				return nil, err
			}
		}
		for _, name := range st.Machines {
			m, err := s.DB.GetMachine(ctx, name)
			switch {
			case rebound.ErrorCode(err) == rebound.ENOTFOUND || err == nil && len(m.Members) > 0:
				return nil, rebound.Errorf(rebound.EINVALID, "plan %s, stage %s: machine %q does not exist (rebound machine list shows the machines; groups go under groups:)", p.Name, st.Name, name)
			case err != nil:
				return nil, err
			case m.Group != "":
				return nil, rebound.Errorf(rebound.EINVALID, "plan %s, stage %s: machine %s replicates in group %s; list the group under groups: (its machines move together)", p.Name, st.Name, name, m.Group)
			}
		}
	}
	old, err := s.DB.GetPlan(ctx, p.Name)
	if err != nil && rebound.ErrorCode(err) != rebound.ENOTFOUND {
		return nil, err
	}
	if old != nil {
		p.UpdatedAt = old.UpdatedAt
		if planEqual(*old, p) {
			return old, nil
		}
	}
	p.UpdatedAt = time.Now().UTC()
	if err := s.DB.PutPlan(ctx, p); err != nil {
		return nil, err
	}
	verb := "created"
	if old != nil {
		verb = "changed"
	}
	s.event("", "", "plan.applied", fmt.Sprintf("plan %s %s: %d stage(s)", p.Name, verb, len(p.Stages)))
	return &p, nil
}

func planEqual(a, b rebound.Plan) bool {
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return bytes.Equal(ja, jb)
}

// ListPlans returns every plan.
func (s *Server) ListPlans(ctx context.Context) ([]rebound.Plan, error) { return s.DB.ListPlans(ctx) }

// GetPlan returns a plan.
func (s *Server) GetPlan(ctx context.Context, name string) (*rebound.Plan, error) {
	return s.DB.GetPlan(ctx, name)
}

// DeletePlan removes a plan that has no job running, on this server or
// (found in the store) on another one sharing the database.
func (s *Server) DeletePlan(ctx context.Context, name string) error {
	s.mu.Lock()
	id, busy := s.busy["plan:"+name]
	s.mu.Unlock()
	if !busy {
		jobs, err := s.DB.PlanJobs(ctx)
		if err != nil {
			return err
		}
		for _, j := range jobs {
			if j.LockKey() == "plan:"+name {
				id, busy = j.ID, true
				break
			}
		}
	}
	if busy {
		return rebound.Errorf(rebound.ECONFLICT, "plan %s has job %s running; wait for it or cancel it (rebound job cancel %s)", name, id, id)
	}
	if err := s.DB.DeletePlan(ctx, name); err != nil {
		return err
	}
	s.event("", "", "plan.deleted", "plan "+name+" deleted")
	return nil
}

// planMembers lists a plan's members, stage by stage: its groups, then
// its lone machines. A group is one member: its verbs act on all of its
// machines at one point.
func planMembers(p rebound.Plan) [][]string {
	out := make([][]string, len(p.Stages))
	for i, st := range p.Stages {
		out[i] = append(slices.Clone(st.Groups), st.Machines...)
	}
	return out
}

// preflightOp is the machine preflight a plan verb runs.
func preflightOp(verb string) string {
	switch verb {
	case rebound.PlanFailover, rebound.PlanTestFailover, rebound.PlanChangePoint:
		return opFailover
	case rebound.PlanFailback:
		return opFailback
	case rebound.PlanCommit:
		return opCommit
	case rebound.PlanReprotect:
		return opReprotect
	}
	return ""
}

// PreflightPlan checks every member of a plan for verb.
func (s *Server) PreflightPlan(ctx context.Context, name, verb string) (*rebound.PlanPreflight, error) {
	p, err := s.DB.GetPlan(ctx, name)
	if err != nil {
		return nil, err
	}
	if verb == "" {
		verb = rebound.PlanFailover
	}
	if !slices.Contains(rebound.PlanVerbs, verb) {
		return nil, rebound.Errorf(rebound.EINVALID, "unknown plan verb %q: use %s", verb, strings.Join(rebound.PlanVerbs, ", "))
	}
	rep := &rebound.PlanPreflight{Plan: name, Operation: verb, OK: true, Machines: []rebound.PreflightReport{}}
	for i, ms := range planMembers(*p) {
		rep.Stages = append(rep.Stages, rebound.PlanPreflightRow{Stage: p.Stages[i].Name, Machines: ms})
		for _, m := range ms {
			if _, err := s.DB.GetMachine(ctx, m); rebound.ErrorCode(err) == rebound.ENOTFOUND {
				rep.Missing = append(rep.Missing, m)
				rep.OK = false
				continue
			}
			op := preflightOp(verb)
			if op == "" {
				continue
			}
			mr, err := s.Preflight(ctx, m, op)
			if err != nil {
				return nil, err
			}
			rep.Machines = append(rep.Machines, *mr)
			rep.OK = rep.OK && mr.OK
		}
	}
	return rep, nil
}

// needsReadiness says whether a verb checks readiness before it starts.
func needsReadiness(verb string) bool {
	return verb == rebound.PlanFailover || verb == rebound.PlanFailback || verb == rebound.PlanTestFailover
}

// RunPlan starts a plan job.
func (s *Server) RunPlan(ctx context.Context, req rebound.PlanRequest) (*rebound.Job, error) {
	if !slices.Contains(rebound.PlanVerbs, req.Verb) {
		return nil, rebound.Errorf(rebound.EINVALID, "unknown plan verb %q: use %s", req.Verb, strings.Join(rebound.PlanVerbs, ", "))
	}
	p, err := s.DB.GetPlan(ctx, req.Plan)
	if err != nil {
		return nil, err
	}
	switch req.Verb {
	case rebound.PlanFailover, rebound.PlanFailback, rebound.PlanTestFailover, rebound.PlanChangePoint:
		if req.Planned && req.Point != "" && req.Point != rebound.PointLatest {
			return nil, rebound.Errorf(rebound.EINVALID, "a planned %s always goes to the latest state; drop --point", req.Verb)
		}
		if req.Verb == rebound.PlanChangePoint && req.Point == "" {
			return nil, rebound.Errorf(rebound.EINVALID, "plan change-point needs --point SELECTOR")
		}
	default:
		if req.Point != "" || req.Planned {
			return nil, rebound.Errorf(rebound.EINVALID, "plan %s takes no --point or --planned", req.Verb)
		}
	}
	prog := &rebound.PlanProgress{Name: p.Name, Verb: req.Verb, Point: req.Point, Planned: req.Planned, Verify: req.Verify, SkipUnready: req.SkipUnready, Plan: *p}
	members := planMembers(*p)
	var all []string
	for _, ms := range members {
		all = append(all, ms...)
	}
	for _, n := range req.SkipUnready {
		if !slices.Contains(all, n) {
			return nil, rebound.Errorf(rebound.EINVALID, "--skip-unready %s: no such member of plan %s", n, p.Name)
		}
	}
	skip := map[string]string{}
	if needsReadiness(req.Verb) {
		rep, err := s.PreflightPlan(ctx, p.Name, req.Verb)
		if err != nil {
			return nil, err
		}
		if len(rep.Missing) > 0 {
			return nil, rebound.Errorf(rebound.ECONFLICT, "plan %s names machines that do not exist: %s; fix the plan (rebound plan apply -f FILE)", p.Name, strings.Join(rep.Missing, ", "))
		}
		var unready []string
		for _, mr := range rep.Machines {
			if mr.OK {
				continue
			}
			why := failedChecks(&mr)
			if slices.Contains(req.SkipUnready, mr.Machine) {
				skip[mr.Machine] = "left behind (--skip-unready): " + why
				continue
			}
			unready = append(unready, mr.Machine+": "+why)
		}
		if len(unready) > 0 {
			return nil, rebound.Errorf(rebound.ECONFLICT, "plan %s is not ready to %s, so nothing started: %s. Fix them (rebound plan preflight %s --operation %s), or leave them behind with --skip-unready NAME", p.Name, req.Verb, strings.Join(unready, "; "), p.Name, req.Verb)
		}
	}
	prog.Direction = rebound.DirectionAway
	if len(all) > 0 {
		if m, err := s.DB.GetMachine(ctx, all[0]); err == nil {
			prog.Direction = direction(req.Verb, m)
		}
	}
	steps := []string{}
	if planShutsDown(prog) {
		steps = append(steps, "shutdown")
	}
	for i, st := range p.Stages {
		sp := rebound.StageProgress{Name: st.Name, State: rebound.JobQueued, Members: []rebound.MemberProgress{}}
		for _, m := range members[i] {
			mp := rebound.MemberProgress{Machine: m, State: rebound.JobQueued}
			if why, ok := skip[m]; ok {
				mp.State, mp.Error = rebound.MemberSkipped, why
			}
			sp.Members = append(sp.Members, mp)
		}
		for _, ph := range []struct {
			name string
			acts []rebound.PlanAction
		}{{"before", st.Before}, {"after", st.After}} {
			for n, a := range ph.acts {
				if a.Runs(req.Verb, prog.Direction) {
					sp.Actions = append(sp.Actions, rebound.ActionProgress{Phase: ph.name, Index: n, Script: a.Script, Manual: a.Manual, State: rebound.JobQueued})
				}
			}
		}
		prog.Stages = append(prog.Stages, sp)
		steps = append(steps, "stage "+st.Name)
	}
	now := time.Now().UTC()
	job := rebound.Job{Type: "plan-" + req.Verb, State: rebound.JobRunning, CreatedAt: now, UpdatedAt: now, Plan: prog}
	for _, name := range steps {
		job.Steps = append(job.Steps, rebound.JobStep{Name: name, State: rebound.JobQueued})
	}
	return s.runJob(ctx, job, "plan:"+p.Name, true, s.runPlan)
}

// direction says whether verb takes m away from its home site or home.
func direction(verb string, m *rebound.Machine) string {
	to := m.ActiveSite
	switch verb {
	case rebound.PlanFailover, rebound.PlanFailback, rebound.PlanTestFailover:
		if m.Protection != nil {
			to = m.Protection.TargetSite
		}
	case rebound.PlanCommit, rebound.PlanCancel, rebound.PlanChangePoint, rebound.PlanTestFailoverCleanup:
		if m.Failover != nil {
			to = m.Failover.ToSite
		} else if m.TestFailover != nil {
			to = m.TestFailover.Site
		}
	}
	if to == m.HomeSite {
		return rebound.DirectionHome
	}
	return rebound.DirectionAway
}

// planShutsDown: a planned failover or failback first stops the VMs,
// stages in reverse order.
func planShutsDown(p *rebound.PlanProgress) bool {
	return p.Planned && (p.Verb == rebound.PlanFailover || p.Verb == rebound.PlanFailback)
}

// ResumeJob continues a job suspended at a manual step.
func (s *Server) ResumeJob(ctx context.Context, id, note string) (*rebound.Job, error) {
	j, err := s.DB.GetJob(ctx, id)
	if err != nil {
		return nil, err
	}
	if j.State != rebound.JobSuspended {
		return nil, rebound.Errorf(rebound.ECONFLICT, "job %s is %s, not suspended; only a plan job waiting at a manual step resumes", id, j.State)
	}
	s.mu.Lock()
	rj, ok := s.running[id]
	s.mu.Unlock()
	if !ok {
		return nil, rebound.Errorf(rebound.EUNAVAILABLE, "job %s is suspended but not loaded yet (the server is starting); retry in a moment", id)
	}
	who := "an operator"
	if p, ok := rebound.PrincipalFrom(ctx); ok && p.User != "" {
		who = p.User
	}
	msg := "resumed by " + who
	if note = strings.TrimSpace(note); note != "" {
		msg += ": " + note
	}
	select {
	case rj.resume <- msg:
	default: // a resume is already pending
	}
	s.event("", "", "job."+j.Type, fmt.Sprintf("job %s %s", id, msg))
	return j, nil
}

// RetryJob runs a failed or cancelled plan job again from where it
// stopped.
func (s *Server) RetryJob(ctx context.Context, id string) (*rebound.Job, error) {
	j, err := s.DB.GetJob(ctx, id)
	if err != nil {
		return nil, err
	}
	if j.Plan == nil {
		return nil, rebound.Errorf(rebound.ECONFLICT, "job %s (%s) is not a plan job; run its command again instead", id, j.Type)
	}
	if j.State != rebound.JobFailed && j.State != rebound.JobCancelled {
		return nil, rebound.Errorf(rebound.ECONFLICT, "job %s is %s; only a failed or cancelled plan job is retried", id, j.State)
	}
	requeue := func(st *string) {
		if *st == rebound.JobFailed || *st == rebound.JobCancelled || *st == rebound.JobRunning {
			*st = rebound.JobQueued
		}
	}
	for i := range j.Plan.Stages {
		st := &j.Plan.Stages[i]
		requeue(&st.State)
		for k := range st.Members {
			requeue(&st.Members[k].State)
			if st.Members[k].State == rebound.JobQueued {
				st.Members[k].Error = ""
			}
		}
		for k := range st.Actions {
			requeue(&st.Actions[k].State)
		}
	}
	for i := range j.Steps {
		requeue(&j.Steps[i].State)
	}
	j.State, j.Error, j.EndedAt = rebound.JobRunning, "", nil
	return s.runJob(ctx, *j, "plan:"+j.Plan.Name, false, s.runPlan)
}

// planUpdate changes the job's plan progress under its lock and saves it.
func (r *jobRun) planUpdate(fn func(p *rebound.PlanProgress)) {
	r.mu.Lock()
	fn(r.job.Plan)
	r.mu.Unlock()
	r.save(true)
}

func (r *jobRun) planSnapshot() rebound.PlanProgress {
	r.mu.Lock()
	defer r.mu.Unlock()
	return clonePlan(r.job.Plan)
}

// runPlan is a plan job: a planned move first stops the VMs stage by stage
// in reverse order; then each stage runs its before actions, its members
// in parallel (and waits for their VMs to boot), and its after actions.
func (s *Server) runPlan(ctx context.Context, r *jobRun) error {
	p := r.planSnapshot()
	if planShutsDown(&p) {
		r.Step("shutdown")
		for i := len(p.Stages) - 1; i >= 0; i-- {
			if err := s.shutdownStage(ctx, r, &p, i); err != nil {
				return err
			}
		}
	}
	for i := range p.Stages {
		if p.Stages[i].State == rebound.JobSucceeded {
			continue
		}
		r.Step("stage " + p.Stages[i].Name)
		if err := s.runStage(ctx, r, i); err != nil {
			r.planUpdate(func(pp *rebound.PlanProgress) { pp.Stages[i].State = rebound.JobFailed })
			return fmt.Errorf("stage %s: %w", p.Stages[i].Name, err)
		}
	}
	return nil
}

// shutdownStage stops the running VMs of stage i's members.
func (s *Server) shutdownStage(ctx context.Context, r *jobRun, p *rebound.PlanProgress, i int) error {
	st := p.Stages[i]
	if st.State == rebound.JobSucceeded {
		return nil
	}
	var names []string
	for _, mp := range st.Members {
		if mp.State != rebound.JobQueued {
			continue
		}
		m, err := s.DB.GetMachine(ctx, mp.Machine)
		if err != nil {
			return err
		}
		for _, vm := range s.vmMachines(ctx, m) {
			s.live.overlay(vm)
			if vm.VMStatus != nil && vm.VMStatus.Running {
				names = append(names, vm.Name)
			}
		}
	}
	if len(names) == 0 {
		return nil
	}
	r.Message("stopping the VMs of stage %s: %s", st.Name, strings.Join(names, ", "))
	return parallel(names, func(name string) error {
		j, err := s.StopMachine(ctx, name)
		if err != nil {
			return fmt.Errorf("stop %s: %w", name, err)
		}
		j, err = s.awaitJob(ctx, j.ID)
		if err != nil {
			return err
		}
		if j.State != rebound.JobSucceeded {
			return fmt.Errorf("stop %s: job %s %s: %s", name, j.ID, j.State, j.Error)
		}
		return nil
	})
}

func parallel(names []string, fn func(name string) error) error {
	errs := make([]error, len(names))
	var wg sync.WaitGroup
	for i, n := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = fn(n)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

func (s *Server) runStage(ctx context.Context, r *jobRun, i int) error {
	start := time.Now()
	r.planUpdate(func(p *rebound.PlanProgress) { p.Stages[i].State = rebound.JobRunning })
	if err := s.runActions(ctx, r, i, "before"); err != nil {
		return err
	}
	p := r.planSnapshot()
	var idx []int
	for k, mp := range p.Stages[i].Members {
		if mp.State != rebound.JobSucceeded && mp.State != rebound.MemberSkipped {
			idx = append(idx, k)
		}
	}
	errs := make([]error, len(idx))
	var wg sync.WaitGroup
	for n, k := range idx {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[n] = s.runMember(ctx, r, i, k)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if err := s.waitBooted(ctx, r, i); err != nil {
		return err
	}
	if err := s.runActions(ctx, r, i, "after"); err != nil {
		return err
	}
	r.planUpdate(func(p *rebound.PlanProgress) {
		p.Stages[i].State = rebound.JobSucceeded
		p.Stages[i].Seconds += time.Since(start).Seconds()
	})
	return nil
}

// memberPoint is the selector a plan selector means for a member: for a
// group, its newest point of that kind is its newest common point (one
// stream); for a lone machine, its own newest.
func memberPoint(sel string) string {
	switch sel {
	case rebound.PointLatestMultiVMProcessed:
		return rebound.PointLatestProcessed
	case rebound.PointLatestMultiVMAppConsistent:
		return rebound.PointLatestAppConsistent
	}
	return sel
}

// runMember runs the plan's verb on member k of stage i and waits for its
// job. A member whose verb already holds (a resumed job) is done at once.
func (s *Server) runMember(ctx context.Context, r *jobRun, i, k int) error {
	p := r.planSnapshot()
	name := p.Stages[i].Members[k].Machine
	set := func(fn func(mp *rebound.MemberProgress)) {
		r.planUpdate(func(pp *rebound.PlanProgress) { fn(&pp.Stages[i].Members[k]) })
	}
	start := time.Now()
	set(func(mp *rebound.MemberProgress) { mp.State, mp.Error = rebound.JobRunning, "" })
	fail := func(err error) error {
		set(func(mp *rebound.MemberProgress) {
			mp.State, mp.Error = rebound.JobFailed, rebound.ErrorMessage(err)
			mp.Seconds += time.Since(start).Seconds()
		})
		return fmt.Errorf("machine %s: %w", name, err)
	}
	var job *rebound.Job
	// A member job the plan started before it was taken over (or its
	// server restarted) is itself continued: wait for it.
	if id := p.Stages[i].Members[k].JobID; id != "" {
		if j, err := s.DB.GetJob(ctx, id); err == nil && j.EndedAt == nil {
			job = j
		}
	}
	deadline := time.Now().Add(memberSiteWait)
	for job == nil {
		m, err := s.DB.GetMachine(ctx, name)
		if err != nil {
			return fail(err)
		}
		if memberDone(p.Verb, m) {
			break
		}
		job, err = s.startMember(ctx, &p, m)
		// A resumed job may start before the sites reconnect.
		if rebound.ErrorCode(err) == rebound.EUNAVAILABLE && time.Now().Before(deadline) {
			r.Message("machine %s waits for its sites: %s", name, rebound.ErrorMessage(err))
			select {
			case <-ctx.Done():
				return fail(ctx.Err())
			case <-time.After(time.Second):
			}
			continue
		}
		if err != nil {
			return fail(err)
		}
		break
	}
	if job != nil {
		set(func(mp *rebound.MemberProgress) { mp.JobID = job.ID })
		j, err := s.awaitJob(ctx, job.ID)
		if err != nil {
			return fail(err)
		}
		if j.State != rebound.JobSucceeded {
			return fail(fmt.Errorf("job %s %s: %s", j.ID, j.State, j.Error))
		}
	}
	m, err := s.DB.GetMachine(ctx, name)
	if err != nil {
		return fail(err)
	}
	set(func(mp *rebound.MemberProgress) {
		mp.State = rebound.JobSucceeded
		mp.Seconds += time.Since(start).Seconds()
		switch {
		case m.Failover != nil:
			mp.Point = m.Failover.Point.ID
		case m.TestFailover != nil:
			mp.Point = m.TestFailover.Point.ID
		}
	})
	return nil
}

// memberDone says whether verb already holds for m, so a resumed plan job
// does not run it twice. Verbs whose server call answers "nothing to do"
// by itself are not listed.
func memberDone(verb string, m *rebound.Machine) bool {
	switch verb {
	case rebound.PlanFailback:
		// A failback starts from a protected machine and ends failed over.
		return m.State == rebound.MachineFailedOver
	case rebound.PlanTestFailover:
		return m.TestFailover != nil
	}
	return false
}

func (s *Server) startMember(ctx context.Context, p *rebound.PlanProgress, m *rebound.Machine) (*rebound.Job, error) {
	point := memberPoint(p.Point)
	switch p.Verb {
	case rebound.PlanFailover:
		return s.Failover(ctx, rebound.FailoverRequest{Machine: m.Name, Point: point, Planned: p.Planned})
	case rebound.PlanFailback:
		return s.Failback(ctx, rebound.FailoverRequest{Machine: m.Name, Point: point, Planned: p.Planned || point == ""})
	case rebound.PlanTestFailover:
		return s.TestFailover(ctx, m.Name, point)
	case rebound.PlanTestFailoverCleanup:
		return s.TestFailoverCleanup(ctx, m.Name)
	case rebound.PlanChangePoint:
		if m.Failover != nil && m.Failover.Point.ID == point {
			return nil, nil
		}
		return s.ChangePoint(ctx, m.Name, point)
	case rebound.PlanCancel:
		return s.CancelFailover(ctx, m.Name)
	case rebound.PlanCommit:
		return s.Commit(ctx, m.Name)
	case rebound.PlanReprotect:
		return s.Reprotect(ctx, rebound.ReprotectRequest{Machine: m.Name, Verify: p.Verify})
	}
	return nil, rebound.Errorf(rebound.EINVALID, "unknown plan verb %q", p.Verb)
}

// awaitJob waits for a job to end and returns it. A job this server does
// not run (another server's, or one not taken over yet) is read from the
// store until it ends.
func (s *Server) awaitJob(ctx context.Context, id string) (*rebound.Job, error) {
	for {
		s.mu.Lock()
		rj, ok := s.running[id]
		s.mu.Unlock()
		if ok {
			select {
			case <-rj.done:
			case <-ctx.Done():
				// Cancelling the plan cancels the member's job too.
				rj.cancel()
				<-rj.done
				return nil, ctx.Err()
			}
		}
		j, err := s.DB.GetJob(context.WithoutCancel(ctx), id)
		if err != nil || j.EndedAt != nil {
			return j, err
		}
		if ok && s.ctx.Err() != nil {
			return nil, context.Canceled // closing: the job stays to be continued
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(s.LeaseTTL / 3):
		}
	}
}

// waitBooted waits until the VMs of stage i's qemu members count as booted.
func (s *Server) waitBooted(ctx context.Context, r *jobRun, i int) error {
	p := r.planSnapshot()
	switch p.Verb {
	case rebound.PlanFailover, rebound.PlanFailback, rebound.PlanTestFailover, rebound.PlanChangePoint:
	default:
		return nil
	}
	boot := p.Plan.Stages[i].Boot
	if boot == nil || boot.Pattern == "" {
		return nil
	}
	timeout := time.Duration(boot.Timeout)
	if timeout == 0 {
		timeout = defaultBootTimeout
	}
	test := p.Verb == rebound.PlanTestFailover
	var names []string
	for _, mp := range p.Stages[i].Members {
		if mp.State == rebound.JobSucceeded {
			if m, err := s.DB.GetMachine(ctx, mp.Machine); err == nil {
				for _, vm := range s.vmMachines(ctx, m) {
					names = append(names, vm.Name)
				}
			}
		}
	}
	if len(names) == 0 {
		return nil
	}
	r.Message("waiting for %s to boot (console shows %q)", strings.Join(names, ", "), boot.Pattern)
	return parallel(names, func(name string) error {
		deadline := time.Now().Add(timeout)
		for {
			m, site, err := s.vmMachine(ctx, name)
			if err == nil {
				at := m.ActiveSite
				if test && m.TestFailover != nil {
					at = m.TestFailover.Site
					site, err = s.site(at)
				}
				if err == nil {
					out, cerr := site.Console(ctx, name, 256<<10, test)
					if cerr == nil && bytes.Contains(out, []byte(boot.Pattern)) {
						s.event(name, at, "plan.booted", fmt.Sprintf("plan %s: machine %s booted at %s", p.Name, name, at))
						return nil
					}
				}
			}
			if !time.Now().Before(deadline) {
				return rebound.Errorf(rebound.EUNAVAILABLE, "machine %s: its console did not show %q within %s; look at it (rebound machine console %s), then rebound job retry", name, boot.Pattern, timeout, name)
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(500 * time.Millisecond):
			}
		}
	})
}

// runActions runs stage i's actions of a phase that have not succeeded.
func (s *Server) runActions(ctx context.Context, r *jobRun, i int, phase string) error {
	p := r.planSnapshot()
	for k, a := range p.Stages[i].Actions {
		if a.Phase != phase || a.State == rebound.JobSucceeded {
			continue
		}
		var err error
		if a.Manual != "" {
			err = s.manualStep(ctx, r, i, k)
		} else {
			err = s.runScript(ctx, r, i, k)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// manualStep suspends the job with the instruction until ResumeJob.
func (s *Server) manualStep(ctx context.Context, r *jobRun, i, k int) error {
	var text string
	r.mu.Lock()
	text = r.job.Plan.Stages[i].Actions[k].Manual
	r.job.Plan.Stages[i].Actions[k].State = rebound.JobSuspended
	r.job.State = rebound.JobSuspended
	for n := range r.job.Steps {
		if r.job.Steps[n].State == rebound.JobRunning {
			r.job.Steps[n].Message = "manual step: " + text
		}
	}
	id, name := r.job.ID, r.job.Plan.Name
	r.mu.Unlock()
	r.save(true)
	s.event("", "", "plan.suspended", fmt.Sprintf("plan %s, job %s waits for a manual step: %s (then rebound job resume %s)", name, id, text, id))
	failpoint.Hit(ctx, "server/plan/suspended")
	var msg string
	select {
	case <-ctx.Done():
		return ctx.Err()
	case msg = <-r.resume:
	}
	r.mu.Lock()
	r.job.Plan.Stages[i].Actions[k].Output = msg // who resumed it, and the note
	r.job.Plan.Stages[i].Actions[k].State = rebound.JobSucceeded
	r.job.State = rebound.JobRunning
	r.mu.Unlock()
	r.save(true)
	return nil
}

// runScript runs a script action with the plan's environment and saves its
// output in the job.
func (s *Server) runScript(ctx context.Context, r *jobRun, i, k int) error {
	p := r.planSnapshot()
	a := p.Stages[i].Actions[k]
	spec := p.Plan.Stages[i].Before
	if a.Phase == "after" {
		spec = p.Plan.Stages[i].After
	}
	if a.Index >= len(spec) {
		return fmt.Errorf("plan job: action %d of stage %s is not in the plan it started with", a.Index, p.Stages[i].Name)
	}
	args, timeout := spec[a.Index].Args, time.Duration(spec[a.Index].Timeout)
	if timeout == 0 {
		timeout = defaultScriptTimeout
	}
	// A group's machines are listed in REBOUND_MACHINES, the group in
	// REBOUND_GROUPS.
	var machines, groups []string
	for _, mp := range p.Stages[i].Members {
		if mp.State == rebound.MemberSkipped {
			continue
		}
		if slices.Contains(p.Plan.Stages[i].Groups, mp.Machine) {
			groups = append(groups, mp.Machine)
			if g, err := s.DB.GetMachine(ctx, mp.Machine); err == nil {
				machines = append(machines, g.Members...)
			}
			continue
		}
		machines = append(machines, mp.Machine)
	}
	point := p.Point
	if point == "" {
		point = rebound.PointLatest
	}
	set := func(fn func(ap *rebound.ActionProgress)) {
		r.planUpdate(func(pp *rebound.PlanProgress) { fn(&pp.Stages[i].Actions[k]) })
	}
	set(func(ap *rebound.ActionProgress) { ap.State = rebound.JobRunning })
	r.Message("running %s", a.Script)
	sctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(sctx, a.Script, args...)
	cmd.Dir = filepath.Dir(a.Script)
	// A clean environment: the server's own (tokens, credentials) stays
	// out of scripts and so out of the output the job keeps.
	cmd.Env = append(scriptBaseEnv(),
		"REBOUND_PLAN="+p.Name, "REBOUND_STAGE="+p.Stages[i].Name, "REBOUND_VERB="+p.Verb,
		"REBOUND_DIRECTION="+p.Direction, "REBOUND_POINT="+point, "REBOUND_MACHINES="+strings.Join(machines, " "), "REBOUND_GROUPS="+strings.Join(groups, " "),
		"REBOUND_JOB="+r.job.ID)
	var out limitedBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = 5 * time.Second
	start := time.Now()
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	}
	state := rebound.JobSucceeded
	if err != nil {
		state = rebound.JobFailed
	}
	set(func(ap *rebound.ActionProgress) {
		ap.State, ap.ExitCode, ap.Output, ap.Seconds = state, code, out.String(), time.Since(start).Seconds()
	})
	switch {
	case err == nil:
		return nil
	case ctx.Err() != nil:
		return ctx.Err()
	case sctx.Err() != nil:
		return rebound.Errorf(rebound.EUNAVAILABLE, "script %s did not end within %s; fix it or raise its timeout:, then rebound job retry %s", a.Script, timeout, r.job.ID)
	case code != 0:
		return rebound.Errorf(rebound.ECONFLICT, "script %s exited with status %d (its output is in the job: rebound job show %s); fix the cause, then rebound job retry %s", a.Script, code, r.job.ID, r.job.ID)
	}
	return fmt.Errorf("script %s: %w; make sure it exists on the server and is executable, then rebound job retry %s", a.Script, err, r.job.ID)
}

// limitedBuffer keeps the first scriptOutputMax bytes written to it.
type limitedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
	cut bool
}

func (b *limitedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if room := scriptOutputMax - b.buf.Len(); room < len(p) {
		b.buf.Write(p[:max(room, 0)])
		b.cut = true
	} else {
		b.buf.Write(p)
	}
	return len(p), nil
}

func (b *limitedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.cut {
		return b.buf.String() + "\n[output cut at 64 KiB]"
	}
	return b.buf.String()
}

// cloneJob copies a job deeply enough that the copy can be read while the
// job's goroutine changes the original.
func cloneJob(j rebound.Job) rebound.Job {
	j.Steps = append([]rebound.JobStep(nil), j.Steps...)
	if j.Plan != nil {
		p := clonePlan(j.Plan)
		j.Plan = &p
	}
	return j
}

func clonePlan(p *rebound.PlanProgress) rebound.PlanProgress {
	out := *p
	out.Stages = make([]rebound.StageProgress, len(p.Stages))
	for i, st := range p.Stages {
		st.Members = slices.Clone(st.Members)
		st.Actions = slices.Clone(st.Actions)
		out.Stages[i] = st
	}
	return out
}

// scriptBaseEnv is what a plan script inherits from the server's
// environment.
func scriptBaseEnv() []string {
	var env []string
	for _, k := range []string{"PATH", "HOME", "LANG", "LC_ALL", "TZ"} {
		if v, ok := os.LookupEnv(k); ok {
			env = append(env, k+"="+v)
		}
	}
	return env
}
