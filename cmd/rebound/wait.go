package main

import (
	"context"
	"fmt"
	"io"
	"sync/atomic"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/spf13/cobra"
	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
)

// jobError is returned when a waited-for job ends failed or cancelled
// (exit code 1). The job has already been printed.
type jobError struct{ job *rebound.Job }

func (e *jobError) Error() string {
	msg := fmt.Sprintf("job %s (%s", e.job.ID, e.job.Type)
	if e.job.Machine != "" {
		msg += " " + e.job.Machine
	}
	msg += ") " + e.job.State
	if e.job.Error != "" {
		msg += ": " + e.job.Error
	}
	return msg
}

func jobDone(j *rebound.Job) bool {
	return j.State == rebound.JobSucceeded || j.State == rebound.JobFailed || j.State == rebound.JobCancelled
}

// maxPollErrors is how many polls in a row may find the server unavailable
// before --wait gives up (the job keeps running on the server).
const maxPollErrors = 20

// WaitJob polls the job every PollInterval until it ends, showing a
// progress bar on a terminal stderr and step changes as lines otherwise.
// It returns the final job.
func (c *CLI) WaitJob(ctx context.Context, svc rebound.Service, job *rebound.Job) (*rebound.Job, error) {
	var show func(j *rebound.Job)
	stop := func(j *rebound.Job) {}
	if c.IsTerminal != nil && c.IsTerminal(c.Stderr) {
		show, stop = c.progressBar(ctx, job)
	} else {
		var last string
		show = func(j *rebound.Job) {
			line := j.State
			if j.Step != "" {
				line += ": " + j.Step
			}
			if line != last {
				extra := ""
				if r := fmtResync(j); r != "" {
					extra = ", " + r
				}
				fmt.Fprintf(c.Stderr, "job %s %s (%s%s)\n", j.ID, line, fmtPercent(j.Progress), extra)
				if j.State == rebound.JobSuspended {
					fmt.Fprintf(c.Stderr, "%s\n", suspendedHint(j))
				}
				last = line
			}
		}
	}
	interval := c.PollInterval
	if interval <= 0 {
		interval = DefaultPollInterval
	}
	show(job)
	t := time.NewTicker(interval)
	defer t.Stop()
	errs := 0
	for !jobDone(job) {
		select {
		case <-ctx.Done():
			stop(nil)
			return job, fmt.Errorf("stopped waiting; job %s continues on the server (rebound job wait %s): %w", job.ID, job.ID, ctx.Err())
		case <-t.C:
		}
		j, err := svc.GetJob(ctx, job.ID)
		if err != nil {
			if rebound.ErrorCode(err) == rebound.EUNAVAILABLE && errs < maxPollErrors && ctx.Err() == nil {
				errs++
				continue
			}
			stop(nil)
			return job, err
		}
		errs = 0
		job = j
		show(job)
	}
	stop(job)
	return job, nil
}

// progressBar draws the job's progress and step on stderr.
func (c *CLI) progressBar(ctx context.Context, job *rebound.Job) (show, stop func(*rebound.Job)) {
	const total = 1000
	// The line is as wide as the terminal; 120 is its width when mpb
	// cannot tell (IsTerminal overridden). The bar itself is 40 wide.
	p := mpb.NewWithContext(ctx, mpb.WithOutput(c.Stderr), mpb.WithWidth(120),
		mpb.WithAutoRefresh()) // render even when IsTerminal was overridden
	var step atomic.Pointer[string] // written by show, read by mpb's goroutine
	first := barStep(job)
	step.Store(&first)
	bar := p.AddBar(total, mpb.BarWidth(40),
		mpb.PrependDecorators(decor.Name(job.Type+" "+job.Machine, decor.WCSyncSpaceR)),
		mpb.AppendDecorators(
			decor.Percentage(decor.WCSyncSpace),
			decor.Any(func(decor.Statistics) string { return " " + *step.Load() }),
		),
	)
	show = func(j *rebound.Job) {
		s := barStep(j)
		step.Store(&s)
		cur := int64(j.Progress * total)
		cur = max(0, min(cur, total-1)) // reaching total would complete the bar early
		bar.SetCurrent(cur)
	}
	stop = func(j *rebound.Job) {
		if j != nil && j.State == rebound.JobSucceeded {
			bar.SetTotal(total, true)
		} else {
			bar.Abort(false)
		}
		p.Wait()
	}
	return show, stop
}

// barStep is the text after the bar: the step, and for a resync the bytes
// sent and the ETA.
func barStep(j *rebound.Job) string {
	if j.State == rebound.JobSuspended {
		return suspendedHint(j)
	}
	if r := fmtResync(j); r != "" {
		if j.Step == "" {
			return r
		}
		return j.Step + " (" + r + ")"
	}
	return j.Step
}

// startJob runs a job-starting call and prints the job; with --wait it
// follows the job first and fails (exit 1) unless it succeeded.
func (c *CLI) startJob(cmd *cobra.Command, wait bool, start func(ctx context.Context, svc rebound.Service) (*rebound.Job, error)) error {
	svc, err := c.Service()
	if err != nil {
		return err
	}
	ctx := cmd.Context()
	job, err := start(ctx, svc)
	if err != nil {
		return err
	}
	if wait {
		return c.waitAndPrint(ctx, svc, job)
	}
	return c.print(job, func(w io.Writer) { writeJob(w, job) })
}

func (c *CLI) waitAndPrint(ctx context.Context, svc rebound.Service, job *rebound.Job) error {
	job, err := c.WaitJob(ctx, svc, job)
	if err != nil {
		return err
	}
	if err := c.print(job, func(w io.Writer) { writeJob(w, job) }); err != nil {
		return err
	}
	if job.State != rebound.JobSucceeded {
		return &jobError{job}
	}
	return nil
}

// suspendedHint says what a suspended plan job waits for and how to go on.
func suspendedHint(j *rebound.Job) string {
	msg := "waiting"
	for _, st := range j.Steps {
		if st.State == rebound.JobRunning && st.Message != "" {
			msg = st.Message
		}
	}
	return fmt.Sprintf("%s; then: rebound job resume %s", msg, j.ID)
}
