package server

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/rebound-dr/rebound"
)

// Jobs run under leases in the store (docs/design/ha.md): the server that
// runs a job renews its lease every LeaseTTL/3; a server that finds a job
// whose lease expired claims it and continues it from its stored request
// and its completed steps, under the same job ID.

// resumer runs a taken-over job again: j is claimed by this server, with
// its request and the steps its previous owner completed.
type resumer func(s *Server, ctx context.Context, j rebound.Job) (*rebound.Job, error)

// resumerOf returns what continues a job of typ when a server takes it
// over, or nil: a job of any other type is failed with stoppedMsg. Plan
// jobs (Job.Plan set) resume from their own progress. The registry is
// listed in docs/design/ha.md.
func resumerOf(typ string) resumer {
	switch typ {
	case "failover", "failback":
		return (*Server).resumeFailover
	case "reprotect":
		return (*Server).takeOverReprotect
	}
	return nil
}

// resumable says whether j can be continued by another server.
func resumable(j *rebound.Job) bool {
	if j.Plan != nil {
		return true
	}
	return resumerOf(j.Type) != nil && len(j.Request) > 0
}

// leaseLoop renews the leases of the jobs this server runs and takes over
// the jobs whose lease expired, every LeaseTTL/3, until Close.
func (s *Server) leaseLoop() {
	t := time.NewTicker(s.LeaseTTL / 3)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
		s.renewLeases(s.ctx)
		if err := s.takeOverJobs(s.ctx, false); err != nil && s.ctx.Err() == nil {
			s.Logger.Warn("take over jobs", "err", err)
		}
	}
}

// renewLeases extends the lease of every job this server runs; a job whose
// lease another server took is stopped at once, and a job whose cancel was
// asked through another server (RequestCancel) is cancelled.
func (s *Server) renewLeases(ctx context.Context) {
	if s.pauseLeases.Load() {
		return
	}
	s.mu.Lock()
	runs := make([]*jobRun, 0, len(s.running))
	for _, rj := range s.running {
		if rj.run != nil {
			runs = append(runs, rj.run)
		}
	}
	s.mu.Unlock()
	for _, r := range runs {
		if r.stopWrites() {
			continue
		}
		r.mu.Lock()
		id, fence := r.job.ID, r.job.Fence
		r.mu.Unlock()
		cancel, err := s.DB.RenewJob(ctx, id, s.ID, fence, s.LeaseTTL)
		switch {
		case err == nil:
			if cancel {
				r.cancelRequested()
			}
		case rebound.ErrorCode(err) == rebound.ECONFLICT:
			r.loseLease(err)
		default:
			s.Logger.Warn("renew job lease", "job", id, "err", err)
		}
	}
}

// takeOverJobs claims the jobs whose lease expired and continues or fails
// them. At start (open) it also takes the jobs that have no owner (from
// before leases) and those of this server's ID (its previous life).
func (s *Server) takeOverJobs(ctx context.Context, open bool) error {
	jobs, err := s.DB.ExpiredJobs(ctx)
	if err != nil {
		return err
	}
	if open {
		all, err := s.DB.ActiveJobs(ctx)
		if err != nil {
			return err
		}
		seen := map[string]bool{}
		for _, j := range jobs {
			seen[j.ID] = true
		}
		for _, j := range all {
			if !seen[j.ID] && (j.Owner == "" || j.Owner == s.ID) {
				seen[j.ID] = true
				jobs = append(jobs, j)
			}
		}
	}
	for _, j := range jobs {
		s.mu.Lock()
		_, mine := s.running[j.ID]
		s.mu.Unlock()
		if mine {
			continue
		}
		c, err := s.DB.ClaimJob(ctx, j.ID, s.ID, s.LeaseTTL)
		if err != nil {
			// Another server was faster, or the job ended meanwhile.
			s.Logger.Debug("job not taken over", "job", j.ID, "err", err)
			continue
		}
		s.takeOver(ctx, *c, j.Owner)
	}
	return nil
}

// takeOver continues a job this server claimed, or fails it when its type
// cannot be continued.
func (s *Server) takeOver(ctx context.Context, j rebound.Job, from string) {
	log := s.Logger.With("job", j.ID, "type", j.Type, "from", from, "server", s.ID)
	var err error
	switch {
	case j.Plan != nil:
		if j.State != rebound.JobSuspended {
			j.State = rebound.JobRunning
		}
		_, err = s.runJob(ctx, j, "plan:"+j.Plan.Name, false, s.runPlan)
	case resumable(&j):
		j.State = rebound.JobRunning
		_, err = resumerOf(j.Type)(s, ctx, j)
	default:
		err = rebound.Errorf(rebound.EUNAVAILABLE, "%s", stoppedMsg)
	}
	if err == nil {
		log.Info("job taken over: continuing it from its last completed step")
		return
	}
	log.Warn("job taken over cannot continue: failing it", "err", err)
	msg := stoppedMsg
	if rebound.ErrorMessage(err) != stoppedMsg {
		msg = stoppedMsg + " (continuing it failed: " + rebound.ErrorMessage(err) + ")"
	}
	rebound.FailJob(&j, msg, time.Now().UTC())
	if err := s.DB.UpdateJob(ctx, &j); err != nil {
		log.Warn("fail job taken over", "err", err)
		return
	}
	s.event(j.Machine, "", "job."+j.Type, fmt.Sprintf("job %s (%s) failed: %s", j.ID, j.Type, msg))
}

// request decodes a job's stored request.
func request[T any](j rebound.Job) (T, error) {
	var v T
	if err := json.Unmarshal(j.Request, &v); err != nil {
		return v, fmt.Errorf("job %s: read its request: %w", j.ID, err)
	}
	return v, nil
}
