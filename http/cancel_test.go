package http

import (
	"context"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

// TestCancelJobStatus: a cancel answers 202 with the job while it has not
// ended (another server runs it and cancels it shortly), 200 once it has;
// the client takes both.
func TestCancelJobStatus(t *testing.T) {
	e := newEnv(t)
	running := rebound.Job{ID: "j-1", Type: "failover", State: rebound.JobRunning, Cancel: rebound.CancelRequested}
	ended := time.Date(2026, 11, 30, 7, 0, 0, 0, time.UTC)
	done := rebound.Job{ID: "j-1", Type: "failover", State: rebound.JobCancelled, EndedAt: &ended}
	for _, c := range []struct {
		job  rebound.Job
		want int
	}{{running, 202}, {done, 200}} {
		e.fake.job = &c.job
		st, _, er, _ := e.raw(t, "POST", "/api/v1/jobs/j-1/cancel", "Bearer "+testToken, "", nil)
		if st != c.want {
			t.Fatalf("cancel of a %s job: status %d %+v, want %d", c.job.State, st, er, c.want)
		}
		j, err := e.client.CancelJob(context.Background(), "j-1")
		if err != nil || j.State != c.job.State || j.Cancel != c.job.Cancel {
			t.Fatalf("client: %+v %v", j, err)
		}
	}
}
