// Package server is the control plane: it implements rebound.Service on top
// of the store, runs operations as jobs, and drives the sites through the
// rebound.SiteService each connected site offers.
package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/failpoint"
	"github.com/rebound-dr/rebound/internal/lograte"
	"github.com/rebound-dr/rebound/pki"
)

// SiteOfflineAfter is how long a site may stay silent before it counts as
// offline and its machines' health turns critical.
const SiteOfflineAfter = 15 * time.Second

// Server implements rebound.Service.
type Server struct {
	DB rebound.Store
	// ID names this server in the leases of the jobs it runs (several
	// servers on one store); it must differ between live servers.
	ID string
	// LeaseTTL is how long a job's lease lasts unless renewed; the server
	// renews it every LeaseTTL/3 and takes over jobs whose lease expired
	// as often (docs/design/ha.md). Zero means DefaultLeaseTTL.
	LeaseTTL time.Duration
	// Site returns the connected site's service.
	Site   func(name string) (rebound.SiteService, bool)
	Logger *slog.Logger
	// CAFingerprint goes into join tokens so enrolling sites can pin the CA.
	CAFingerprint string
	// WaitTimeout bounds how long a failover waits for the target to
	// receive what the source still holds.
	WaitTimeout time.Duration

	metrics *metrics
	live    *live      // live status, see live.go
	store   storeState // the store's condition (a full disk)

	machMu sync.Mutex // serialises machine read-modify-writes

	mu      sync.Mutex
	busy    map[string]string // machine -> running job ID
	running map[string]*runningJob
	closed  bool // no goroutine starts after Close
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup

	// StepHook, if set, is called by a job as it enters each step, with the
	// job's context; tests block a job inside a step with it.
	StepHook func(ctx context.Context, job *rebound.Job, step string)

	// killed makes Close stop like a kill: running jobs write nothing
	// more, neither their job nor their machine (tests of takeover).
	killed atomic.Bool
	// pauseLeases stops renewing leases, as a paused or partitioned
	// server would (tests of fencing).
	pauseLeases atomic.Bool

	// Revocations is the revocation list the server's listener checks
	// (Open loads it from the store); PushRevocations hands it to the
	// connected sites (grpc.ControlServer.PushRevocations). See sites.go.
	Revocations     *pki.Revocations
	PushRevocations func(ctx context.Context, list []string) error
	removed         map[string]bool      // sites removed since start: their late reports are dropped
	refusedAt       map[string]time.Time // revoked serial -> last refusal reported
}

// DefaultLeaseTTL is a job's lease. The owner renews it every third of
// it, and the others look for expired leases as often, so a job whose
// server died is claimed by another within 4/3 of it (13.3 s): issue 12
// asks for 15 s.
const DefaultLeaseTTL = 10 * time.Second

// runningJob is a job's goroutine as CancelJob sees it.
type runningJob struct {
	run    *jobRun
	cancel context.CancelFunc
	done   chan struct{} // closed once the job's state is saved
	resume chan string   // ResumeJob's signal to a suspended job: who resumed it, and the note
}

var _ rebound.Service = (*Server)(nil)

// interruptedMsg is the error of a job the server stopped under, whether it
// closed cleanly or was killed.
const interruptedMsg = "interrupted: the server restarted while the job ran; run the command again"

// stoppedMsg is the error of a job another server (or this one, restarted)
// took over and cannot continue: its type is not resumable.
const stoppedMsg = "interrupted: the server running it stopped; run the command again"

// Open prepares the server: jobs of its previous life (its ID) and jobs
// without an owner are continued or failed (lease.go), and the lease loop
// and the health watchdog start.
func (s *Server) Open(reg prometheus.Registerer) error {
	if s.Logger == nil {
		s.Logger = slog.Default()
	}
	if s.WaitTimeout == 0 {
		s.WaitTimeout = 2 * time.Minute
	}
	if s.ID == "" {
		s.ID = "server"
	}
	if s.LeaseTTL <= 0 {
		s.LeaseTTL = DefaultLeaseTTL
	}
	s.busy = map[string]string{}
	s.running = map[string]*runningJob{}
	s.live = newLive()
	s.store.remind = lograte.Limiter{Every: time.Minute, Burst: 1}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.metrics = newMetrics(reg)
	// Jobs of this server's previous life, and jobs from before leases,
	// are taken over at once; others' when their lease expires.
	if err := s.takeOverJobs(s.ctx, true); err != nil {
		return err
	}
	if err := s.loadRevocations(s.ctx); err != nil {
		return err
	}
	s.wg.Add(3)
	go func() {
		defer s.wg.Done()
		s.leaseLoop()
	}()
	go func() {
		defer s.wg.Done()
		s.watchdog()
	}()
	go func() {
		defer s.wg.Done()
		s.watchStore()
	}()
	return nil
}

// Close cancels running jobs and the server's other goroutines and waits
// for them. Resumable jobs are left running and their leases released
// for another server to continue them at once (finishJob).
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	if s.cancel != nil {
		s.cancel()
	}
	s.wg.Wait()
	return nil
}

// goOwnedLocked runs fn in a goroutine Close waits for, with the server's
// context; it returns false (and runs nothing) once Close has begun.
// s.mu must be held.
func (s *Server) goOwnedLocked(fn func(ctx context.Context)) bool {
	if s.closed || s.ctx == nil {
		return false
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		fn(s.ctx)
	}()
	return true
}

// site returns a connected site or an unavailable error that says how to fix it.
func (s *Server) site(name string) (rebound.SiteService, error) {
	if s.Site != nil {
		if svc, ok := s.Site(name); ok {
			return svc, nil
		}
	}
	return nil, rebound.Errorf(rebound.EUNAVAILABLE, "site %q is not connected to the server: start it (rebound site --name %s ...) and retry", name, name)
}

// jobRun is the handle a running job's function reports through.
type jobRun struct {
	s        *Server
	ctx      context.Context
	cancel   context.CancelFunc
	mu       sync.Mutex
	job      rebound.Job
	lastSave time.Time
	resume   <-chan string
	// done holds the steps a previous owner completed (a job taken over).
	done map[string]bool
	// lost is set once another server holds the job's lease: the job
	// stops and writes nothing more.
	lost atomic.Bool
}

type jobRunKey struct{}

// jobOf returns the job running under ctx, or nil.
func jobOf(ctx context.Context) *jobRun {
	r, _ := ctx.Value(jobRunKey{}).(*jobRun)
	return r
}

// completed says whether step was completed before this server took the
// job over: a resumed job skips it.
func (r *jobRun) completed(step string) bool { return r.done[step] }

// loseLease stops the job at once: another server runs it now.
func (r *jobRun) loseLease(err error) {
	if r.lost.Swap(true) {
		return
	}
	r.s.Logger.Warn("job lease lost: stopping the job without writing it", "job", r.job.ID, "server", r.s.ID, "err", err)
	r.cancel()
}

// release hands the job's lease over (a clean stop): the job writes
// nothing more.
func (r *jobRun) release() {
	if r.stopWrites() {
		return
	}
	r.mu.Lock()
	id, fence := r.job.ID, r.job.Fence
	r.mu.Unlock()
	if fence == 0 {
		return
	}
	r.lost.Store(true)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := r.s.DB.ReleaseJob(ctx, id, r.s.ID, fence); err != nil {
		r.s.Logger.Warn("release job lease: the next owner waits for it to expire", "job", id, "err", err)
		return
	}
	r.s.Logger.Info("job lease released for another server to continue it", "job", id, "server", r.s.ID)
}

// stopWrites says whether the job must not write anything more: its lease
// is lost, or the server was killed (a test's stand-in for kill -9).
func (r *jobRun) stopWrites() bool { return r.lost.Load() || r.s.killed.Load() }

// checkLease renews the job's lease before a write of its machine, so a
// job whose lease another server took does not write it. ctx not of a
// job passes.
func checkLease(ctx context.Context) error {
	r := jobOf(ctx)
	if r == nil {
		return nil
	}
	if r.stopWrites() {
		return rebound.LeaseLostError(r.job.ID)
	}
	r.mu.Lock()
	id, fence := r.job.ID, r.job.Fence
	r.mu.Unlock()
	if fence == 0 {
		return nil
	}
	cancel, err := r.s.DB.RenewJob(context.WithoutCancel(ctx), id, r.s.ID, fence, r.s.LeaseTTL)
	if err != nil {
		if rebound.ErrorCode(err) == rebound.ECONFLICT {
			r.loseLease(err)
		}
		return err
	}
	if cancel {
		// The job's context ends; a write under another context (an
		// undo's) goes on, as after a cancel on this server.
		r.cancelRequested()
	}
	return nil
}

// cancelRequested cancels the job: a cancel was asked for it through any
// server (RequestCancel), and this server owns it.
func (r *jobRun) cancelRequested() {
	if r.ctx.Err() == nil {
		r.s.Logger.Info("job cancel requested: cancelling it", "job", r.job.ID, "server", r.s.ID)
	}
	r.cancel()
}

// passNoReturn records that the job passed its point of no return (a
// failover about to activate its target): from then on a cancel is
// refused through every server. A cancel asked before wins: the job's
// context ends and context.Canceled is returned, for the job to undo what
// it did and end cancelled.
func (r *jobRun) passNoReturn() error {
	if r.stopWrites() {
		return rebound.LeaseLostError(r.job.ID)
	}
	r.mu.Lock()
	id, fence := r.job.ID, r.job.Fence
	r.mu.Unlock()
	cancel, err := r.s.DB.PassNoReturn(context.WithoutCancel(r.ctx), id, r.s.ID, fence)
	switch {
	case err != nil:
		if rebound.ErrorCode(err) == rebound.ECONFLICT {
			r.loseLease(err)
		}
		return err
	case cancel:
		r.cancelRequested()
		return fmt.Errorf("job %s cancelled before its point of no return: %w", id, context.Canceled)
	}
	return r.ctx.Err()
}

// Step marks the current step done and starts the named one.
//
// A step begins under a live lease: a job paused here (a stopped process,
// a step hook) whose lease another server took meanwhile stops before it
// calls a site again (checkLease cancels its context).
func (r *jobRun) Step(name string) {
	defer func() {
		if h := r.s.StepHook; h != nil {
			r.mu.Lock()
			j := cloneJob(r.job)
			r.mu.Unlock()
			h(r.ctx, &j, name)
		}
		_ = checkLease(r.ctx)
	}()
	r.mu.Lock()
	for i := range r.job.Steps {
		if r.job.Steps[i].State == rebound.JobRunning {
			r.job.Steps[i].State = rebound.JobSucceeded
		}
	}
	found := false
	for i := range r.job.Steps {
		if r.job.Steps[i].Name == name {
			r.job.Steps[i].State, found = rebound.JobRunning, true
		}
	}
	if !found {
		r.job.Steps = append(r.job.Steps, rebound.JobStep{Name: name, State: rebound.JobRunning})
	}
	r.job.Step = name
	typ := r.job.Type
	r.mu.Unlock()
	r.save(true)
	failpoint.Hit(r.ctx, "server/job/"+typ+"/"+name) // tests stop or kill the server here
}

// Message sets the message of the current step; saves are rate-limited.
func (r *jobRun) Message(format string, args ...any) {
	r.mu.Lock()
	for i := range r.job.Steps {
		if r.job.Steps[i].State == rebound.JobRunning {
			r.job.Steps[i].Message = fmt.Sprintf(format, args...)
		}
	}
	r.mu.Unlock()
	r.save(false) // progress messages come often; the end of the job saves them all
}

// Progress sets the job's progress, 0..1; saves are rate-limited.
func (r *jobRun) Progress(f float64) {
	r.mu.Lock()
	r.job.Progress = f
	r.mu.Unlock()
	r.save(false)
}

// SetResult records the job's result.
func (r *jobRun) SetResult(v any) {
	r.mu.Lock()
	r.job.Result = v
	r.mu.Unlock()
}

func (r *jobRun) save(force bool) {
	if r.stopWrites() {
		return
	}
	r.mu.Lock()
	if !force && time.Since(r.lastSave) < 300*time.Millisecond {
		r.mu.Unlock()
		return
	}
	r.lastSave = time.Now()
	r.job.UpdatedAt = time.Now().UTC()
	j := cloneJob(r.job)
	r.mu.Unlock()
	if err := r.s.DB.UpdateJob(context.Background(), &j); err != nil {
		if rebound.ErrorCode(err) == rebound.ECONFLICT {
			r.loseLease(err)
			return
		}
		r.s.storeFailed("save job", err, "job", j.ID)
	}
}

// startJob creates a job, reserves its machine and runs fn in the
// background. Only one job runs per machine at a time.
func (s *Server) startJob(ctx context.Context, typ, machine string, steps []string, fn func(ctx context.Context, r *jobRun) error) (*rebound.Job, error) {
	return s.startJobRequest(ctx, typ, machine, steps, nil, fn)
}

// startJobRequest is startJob for a resumable job: req is stored in the
// job, and the resumers entry of typ runs it again from there on the
// server that takes the job over.
func (s *Server) startJobRequest(ctx context.Context, typ, machine string, steps []string, req any, fn func(ctx context.Context, r *jobRun) error) (*rebound.Job, error) {
	now := time.Now().UTC()
	job := rebound.Job{Type: typ, Machine: machine, State: rebound.JobRunning, CreatedAt: now, UpdatedAt: now}
	if req != nil {
		b, err := json.Marshal(req)
		if err != nil {
			return nil, fmt.Errorf("job request: %w", err)
		}
		job.Request = b
	}
	for _, name := range steps {
		job.Steps = append(job.Steps, rebound.JobStep{Name: name, State: rebound.JobQueued})
	}
	return s.runJob(ctx, job, machine, true, fn)
}

// runJob runs fn for job in the background, holding key (a machine name,
// or "plan:NAME") busy while it runs. create stores a new job; without it
// the job exists already (a plan job resumed or retried).
func (s *Server) runJob(ctx context.Context, job rebound.Job, key string, create bool, fn func(ctx context.Context, r *jobRun) error) (*rebound.Job, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, rebound.Errorf(rebound.EUNAVAILABLE, "the server is shutting down; run the command again once it is back")
	}
	if id, ok := s.busy[key]; ok && key != "" {
		what := "machine " + strconv.Quote(key)
		if p, ok := strings.CutPrefix(key, "plan:"); ok {
			what = "plan " + strconv.Quote(p)
		}
		return nil, rebound.Errorf(rebound.ECONFLICT, "%s has job %s running; wait for it (rebound job wait %s) or cancel it", what, id, id)
	}
	done := map[string]bool{}
	if create {
		if err := s.DB.CreateJob(ctx, &job); err != nil {
			return nil, err
		}
	} else {
		job.Steps = slices.Clone(job.Steps)
		for i, st := range job.Steps {
			done[st.Name] = st.State == rebound.JobSucceeded
			if st.State == rebound.JobRunning && job.Plan == nil {
				// The step a previous owner was in runs again.
				job.Steps[i].State = rebound.JobQueued
			}
		}
		if err := s.DB.UpdateJob(ctx, &job); err != nil {
			return nil, err
		}
	}
	// The job runs under this server's lease (docs/design/ha.md).
	c, err := s.DB.ClaimJob(ctx, job.ID, s.ID, s.LeaseTTL)
	if err != nil {
		if create {
			now := time.Now().UTC()
			rebound.FailJob(&job, "claim the job: "+rebound.ErrorMessage(err), now)
			_ = s.DB.UpdateJob(context.WithoutCancel(ctx), &job)
		}
		return nil, err
	}
	job.Owner, job.LeaseUntil, job.Fence, job.Cancel = c.Owner, c.LeaseUntil, c.Fence, c.Cancel
	jctx, cancel := context.WithCancel(s.ctx)
	if c.Cancel == rebound.CancelRequested {
		cancel() // asked before this server claimed it
	}
	if key != "" {
		s.busy[key] = job.ID
	}
	rj := &runningJob{cancel: cancel, done: make(chan struct{}), resume: make(chan string, 1)}
	s.running[job.ID] = rj

	// The job goroutine owns r.job.Steps; the caller gets its own copy.
	out := cloneJob(job)
	r := &jobRun{s: s, job: job, resume: rj.resume, cancel: cancel, done: done}
	r.ctx = context.WithValue(jctx, jobRunKey{}, r)
	jctx = r.ctx
	rj.run = r
	verb := "started"
	if !create {
		verb = "resumed"
	}
	s.event(job.Machine, "", "job."+job.Type, fmt.Sprintf("job %s (%s) %s", job.ID, job.Type, verb))
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer cancel()
		err := fn(jctx, r)
		s.finishJob(r, key, err, jctx.Err())
		s.mu.Lock()
		s.unbusyLocked(key, job.ID)
		delete(s.running, job.ID)
		s.mu.Unlock()
		close(rj.done)
	}()
	return &out, nil
}

// unbusyLocked frees key if job still holds it (a job started on the key
// since it was freed keeps it). Called with s.mu held.
func (s *Server) unbusyLocked(key, job string) {
	if key != "" && s.busy[key] == job {
		delete(s.busy, key)
	}
}

func (s *Server) finishJob(r *jobRun, key string, err, ctxErr error) {
	if r.stopWrites() {
		// Another server runs the job now, or this one was killed: the
		// job's record is theirs.
		s.Logger.Warn("job stopped without saving: its lease is lost or the server was killed", "job", r.job.ID, "err", err)
		return
	}
	r.mu.Lock()
	if s.ctx.Err() != nil && resumable(&r.job) {
		// The server is closing: a resumable job stays as it is (running
		// or suspended), and its lease is handed over at once, so another
		// server's next scan (or this one's next start) continues it
		// without waiting for the lease to expire.
		r.mu.Unlock()
		r.save(true)
		r.release()
		return
	}
	now := time.Now().UTC()
	r.job.EndedAt = &now
	state := rebound.JobSucceeded
	switch {
	case err == nil:
		r.job.Progress = 1
	case s.ctx.Err() != nil:
		// The server is closing, not the operator cancelling: the same
		// outcome as a kill, which Open reports at the next start.
		state, r.job.Error = rebound.JobFailed, interruptedMsg
	case ctxErr != nil && errors.Is(err, context.Canceled):
		state, r.job.Error = rebound.JobCancelled, "cancelled"
	default:
		state, r.job.Error = rebound.JobFailed, rebound.ErrorMessage(err)
	}
	r.job.State = state
	for i := range r.job.Steps {
		if r.job.Steps[i].State == rebound.JobRunning {
			r.job.Steps[i].State = state
		}
	}
	typ, machine, id := r.job.Type, r.job.Machine, r.job.ID
	r.mu.Unlock()
	// The machine is free before the job reads as ended: whoever waits for
	// the end may start the next verb at once. Until the save, a verb is
	// still refused by the store's not-ended job (checkIdle).
	s.mu.Lock()
	s.unbusyLocked(key, id)
	s.mu.Unlock()
	r.save(true)
	failpoint.Hit(r.ctx, "server/job/ended") // the job reads as ended from here
	s.metrics.jobs.WithLabelValues(typ, state).Inc()
	msg := fmt.Sprintf("job %s (%s) %s", id, typ, state)
	if err != nil {
		msg += ": " + rebound.ErrorMessage(err)
		s.Logger.Warn("job ended", "job", id, "type", typ, "state", state, "err", err)
	}
	s.event(machine, "", "job."+typ, msg)
}

// doneJob records a job that had nothing to do: the step already holds.
func (s *Server) doneJob(ctx context.Context, typ, machine, msg string) (*rebound.Job, error) {
	now := time.Now().UTC()
	job := rebound.Job{
		Type: typ, Machine: machine, State: rebound.JobSucceeded, Progress: 1,
		Steps:     []rebound.JobStep{{Name: "check", State: rebound.JobSucceeded, Message: msg}},
		Step:      "check",
		CreatedAt: now, UpdatedAt: now, EndedAt: &now,
	}
	if err := s.DB.CreateJob(ctx, &job); err != nil {
		return nil, err
	}
	return &job, nil
}

func (s *Server) event(machine, site, kind, msg string) {
	s.addEvent(rebound.Event{Time: time.Now().UTC(), Machine: machine, Site: site, Kind: kind, Message: msg})
}

// ListJobs returns recent jobs, newest first.
func (s *Server) ListJobs(ctx context.Context) ([]rebound.Job, error) {
	return s.DB.ListJobs(ctx, "", 200)
}

// GetJob returns a job.
func (s *Server) GetJob(ctx context.Context, id string) (*rebound.Job, error) {
	return s.DB.GetJob(ctx, id)
}

// CancelJob cancels a running job and returns it once it has ended (its
// undo included), or as it is when ctx ends first; an ended job is
// returned unchanged. The cancel is recorded in the store first
// (RequestCancel), so it works through any server: a job another server
// runs is returned at once, not ended, and its owner cancels it at its
// next lease renewal or step. A job past its point of no return is not
// cancelled: ECONFLICT.
func (s *Server) CancelJob(ctx context.Context, id string) (*rebound.Job, error) {
	j, err := s.DB.RequestCancel(context.WithoutCancel(ctx), id)
	if err != nil || j.EndedAt != nil {
		return j, err
	}
	s.mu.Lock()
	rj, ok := s.running[id]
	s.mu.Unlock()
	if ok {
		rj.cancel()
		t := time.NewTimer(time.Minute)
		defer t.Stop()
		select {
		case <-rj.done:
		case <-ctx.Done():
			// The caller stopped waiting; the job still ends on its own.
		case <-t.C:
			// A step that does not heed its context: report it running.
		}
	}
	return s.DB.GetJob(context.WithoutCancel(ctx), id)
}

// ListEvents returns recent events.
func (s *Server) ListEvents(ctx context.Context, machine string) ([]rebound.Event, error) {
	return s.DB.ListEvents(ctx, machine, 500)
}

// ListSites returns the enrolled sites, those that never connected
// included (see sites.go).
func (s *Server) ListSites(ctx context.Context) ([]rebound.Site, error) {
	return s.listEnrolledSites(ctx)
}

// CreateEnrollToken returns a one-time token a new site enrolls with
// (CreateJoinToken without options).
func (s *Server) CreateEnrollToken(ctx context.Context, site string) (string, error) {
	return s.CreateJoinToken(ctx, site, rebound.JoinTokenRequest{})
}

// ListPolicies returns the policies.
func (s *Server) ListPolicies(ctx context.Context) ([]rebound.Policy, error) {
	return s.DB.ListPolicies(ctx)
}

// PutPolicy creates or replaces a policy. Zero durations take the
// default policy's values (the REST edge refuses an explicit zero); other
// invalid values are refused. A changed policy reaches the sites of every
// machine that uses it: sources cut points at the new intervals, targets
// keep the new retention.
func (s *Server) PutPolicy(ctx context.Context, p rebound.Policy) (*rebound.Policy, error) {
	if err := validName(p.Name); err != nil {
		return nil, err
	}
	def := rebound.DefaultPolicy()
	if p.CrashInterval == 0 {
		p.CrashInterval = def.CrashInterval
	}
	if p.RPOThreshold == 0 {
		p.RPOThreshold = def.RPOThreshold
	}
	if p.Retention == 0 {
		p.Retention = def.Retention
	}
	if err := rebound.ValidatePolicy(p); err != nil {
		return nil, err
	}
	old, err := s.DB.GetPolicy(ctx, p.Name)
	if err != nil && rebound.ErrorCode(err) != rebound.ENOTFOUND {
		return nil, err
	}
	if err := s.DB.PutPolicy(ctx, p); err != nil {
		return nil, err
	}
	if old != nil && *old != p {
		s.applyPolicy(ctx, p)
	}
	return &p, nil
}
