package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/rebound-dr/rebound"
)

// A job's lease is in its columns (owner, lease_until, fence), which win
// over the copy in its document; lock_key is set at creation.
const jobCols = `doc, owner, lease_until, fence, cancel`

// active is the SQL list of the states of a job that has not ended.
const active = `('queued', 'running', 'suspended')`

func scanJob(row interface{ Scan(...any) error }) (*rebound.Job, error) {
	var doc, owner, cancel string
	var until, fence int64
	if err := row.Scan(&doc, &owner, &until, &fence, &cancel); err != nil {
		return nil, err
	}
	var j rebound.Job
	if err := unmarshal(doc, &j); err != nil {
		return nil, err
	}
	j.Owner, j.Fence, j.LeaseUntil, j.Cancel = owner, fence, nil, cancel
	if until != 0 {
		t := unixNano(until)
		j.LeaseUntil = &t
	}
	return &j, nil
}

func (db *DB) jobs(ctx context.Context, q string, args ...any) ([]rebound.Job, error) {
	rows, err := db.db.QueryContext(ctx, `SELECT `+jobCols+` FROM jobs `+q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := []rebound.Job{}
	for rows.Next() {
		j, err := scanJob(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, *j)
	}
	return out, rows.Err()
}

// busyError names the job that holds key.
func (db *DB) busyError(ctx context.Context, key string) error {
	var id string
	if err := db.db.QueryRowContext(ctx, `SELECT id FROM jobs WHERE lock_key = ? AND state IN `+active, key).Scan(&id); err != nil {
		id = "(ended meanwhile)"
	}
	return rebound.BusyError(key, id)
}

// CreateJob inserts a job (see rebound.Store).
func (db *DB) CreateJob(ctx context.Context, j *rebound.Job) error {
	if err := rebound.PrepareJob(j, db.now().UTC()); err != nil {
		return err
	}
	doc, err := marshal(j)
	if err != nil {
		return err
	}
	_, err = db.exec(ctx, `INSERT INTO jobs (id, machine, state, created_at, doc, lock_key) VALUES (?, ?, ?, ?, ?, ?)`,
		j.ID, j.Machine, j.State, j.CreatedAt.UnixNano(), doc, j.LockKey())
	switch {
	case isUniqueViolation(err) && strings.Contains(err.Error(), "lock_key"):
		return db.busyError(ctx, j.LockKey())
	case isUniqueViolation(err):
		return rebound.Errorf(rebound.ECONFLICT, "job %q already exists", j.ID)
	case err != nil:
		return fmt.Errorf("create job %q: %w", j.ID, err)
	}
	return nil
}

// UpdateJob replaces a stored job (see rebound.Store).
func (db *DB) UpdateJob(ctx context.Context, j *rebound.Job) error {
	j.UpdatedAt = db.now().UTC()
	doc, err := marshal(j)
	if err != nil {
		return err
	}
	q, args := `UPDATE jobs SET machine = ?, state = ?, doc = ? WHERE id = ?`, []any{j.Machine, j.State, doc, j.ID}
	if j.Fence != 0 {
		q, args = q+` AND fence = ?`, append(args, j.Fence)
	}
	res, err := db.exec(ctx, q, args...)
	if err != nil {
		return fmt.Errorf("update job %q: %w", j.ID, err)
	}
	if n, _ := res.RowsAffected(); n == 0 && j.Fence != 0 {
		if _, err := db.GetJob(ctx, j.ID); err != nil {
			return err
		}
		return rebound.LeaseLostError(j.ID)
	}
	return notFoundIfNone(res, "job %q not found", j.ID)
}

// GetJob returns a job or ENOTFOUND.
func (db *DB) GetJob(ctx context.Context, id string) (*rebound.Job, error) {
	j, err := scanJob(db.db.QueryRowContext(ctx, `SELECT `+jobCols+` FROM jobs WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, rebound.Errorf(rebound.ENOTFOUND, "job %q not found", id)
	} else if err != nil {
		return nil, fmt.Errorf("get job %q: %w", id, err)
	}
	return j, nil
}

// ListJobs returns jobs newest first, only those of machine unless it is
// empty, at most limit unless limit <= 0.
func (db *DB) ListJobs(ctx context.Context, machine string, limit int) ([]rebound.Job, error) {
	q, args := ``, []any{}
	if machine != "" {
		q += `WHERE machine = ?`
		args = append(args, machine)
	}
	q += ` ORDER BY seq DESC`
	if limit > 0 {
		q += ` LIMIT ?`
		args = append(args, limit)
	}
	out, err := db.jobs(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("list jobs: %w", err)
	}
	return out, nil
}

// ActiveJobs returns the jobs that have not ended, oldest first.
func (db *DB) ActiveJobs(ctx context.Context) ([]rebound.Job, error) {
	out, err := db.jobs(ctx, `WHERE state IN `+active+` ORDER BY seq`)
	if err != nil {
		return nil, fmt.Errorf("list active jobs: %w", err)
	}
	return out, nil
}

// PlanJobs returns the plan jobs that have not ended, oldest first.
func (db *DB) PlanJobs(ctx context.Context) ([]rebound.Job, error) {
	all, err := db.jobs(ctx, `WHERE state IN `+active+` ORDER BY seq`)
	if err != nil {
		return nil, fmt.Errorf("list plan jobs: %w", err)
	}
	out := []rebound.Job{}
	for _, j := range all {
		if j.Plan != nil {
			out = append(out, j)
		}
	}
	return out, nil
}

// FailInterruptedJobs marks every queued or running job but plans' failed
// with reason (their running steps too). The server calls it at start.
func (db *DB) FailInterruptedJobs(ctx context.Context, reason string) (int, error) {
	n := 0
	err := db.tx(ctx, func(tx *sql.Tx) error {
		rows, err := tx.QueryContext(ctx, `SELECT `+jobCols+` FROM jobs WHERE state IN ('queued', 'running')`)
		if err != nil {
			return err
		}
		var jobs []rebound.Job
		for rows.Next() {
			j, err := scanJob(rows)
			if err != nil {
				rows.Close()
				return err
			}
			if j.Plan == nil {
				jobs = append(jobs, *j)
			}
		}
		if err := rows.Close(); err != nil {
			return err
		}
		if err := rows.Err(); err != nil {
			return err
		}
		now := db.now().UTC()
		for _, j := range jobs {
			rebound.FailJob(&j, reason, now)
			doc, err := marshal(j)
			if err != nil {
				return err
			}
			if _, err := tx.ExecContext(ctx, `UPDATE jobs SET state = ?, doc = ? WHERE id = ?`, j.State, doc, j.ID); err != nil {
				return err
			}
			n++
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("fail interrupted jobs: %w", err)
	}
	return n, nil
}

// ClaimJob makes owner the job's runner (see rebound.Store).
func (db *DB) ClaimJob(ctx context.Context, id, owner string, ttl time.Duration) (*rebound.Job, error) {
	if owner == "" || ttl <= 0 {
		return nil, rebound.Errorf(rebound.EINVALID, "claim job %s: an owner and a positive lease are needed", id)
	}
	var out *rebound.Job
	err := db.tx(ctx, func(tx *sql.Tx) error {
		j, err := scanJob(tx.QueryRowContext(ctx, `SELECT `+jobCols+` FROM jobs WHERE id = ?`, id))
		if errors.Is(err, sql.ErrNoRows) {
			return rebound.Errorf(rebound.ENOTFOUND, "job %q not found", id)
		} else if err != nil {
			return err
		}
		now := db.now()
		if err := rebound.Claimable(j, owner, now); err != nil {
			return err
		}
		until := now.Add(ttl).UTC()
		j.Owner, j.LeaseUntil, j.Fence = owner, &until, j.Fence+1
		if _, err := tx.ExecContext(ctx, `UPDATE jobs SET owner = ?, lease_until = ?, fence = ? WHERE id = ?`,
			owner, until.UnixNano(), j.Fence, id); err != nil {
			return err
		}
		out = j
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("claim job %s: %w", id, err)
	}
	return out, nil
}

// RenewJob extends owner's lease (see rebound.Store).
func (db *DB) RenewJob(ctx context.Context, id, owner string, fence int64, ttl time.Duration) (bool, error) {
	var cancel string
	err := db.note(db.db.QueryRowContext(ctx, `UPDATE jobs SET lease_until = ? WHERE id = ? AND owner = ? AND fence = ? RETURNING cancel`,
		db.now().Add(ttl).UnixNano(), id, owner, fence).Scan(&cancel))
	if errors.Is(err, sql.ErrNoRows) {
		if _, err := db.GetJob(ctx, id); err != nil {
			return false, err
		}
		return false, rebound.LeaseLostError(id)
	} else if err != nil {
		return false, fmt.Errorf("renew the lease of job %s: %w", id, err)
	}
	return cancel == rebound.CancelRequested, nil
}

// RequestCancel asks the job's owner to cancel it (see rebound.Store).
func (db *DB) RequestCancel(ctx context.Context, id string) (*rebound.Job, error) {
	if _, err := db.exec(ctx, `UPDATE jobs SET cancel = ? WHERE id = ? AND state IN `+active+` AND cancel = ''`,
		rebound.CancelRequested, id); err != nil {
		return nil, fmt.Errorf("request the cancel of job %s: %w", id, err)
	}
	return rebound.RequestedCancel(db.GetJob(ctx, id))
}

// PassNoReturn records the job's point of no return (see rebound.Store).
func (db *DB) PassNoReturn(ctx context.Context, id, owner string, fence int64) (bool, error) {
	res, err := db.exec(ctx, `UPDATE jobs SET cancel = ? WHERE id = ? AND owner = ? AND fence = ? AND cancel != ?`,
		rebound.CancelRefused, id, owner, fence, rebound.CancelRequested)
	if err != nil {
		return false, fmt.Errorf("record the point of no return of job %s: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 1 {
		return false, nil
	}
	return rebound.PassedNoReturn(db.GetJob(ctx, id))
}

// ExpiredJobs lists the jobs not ended whose lease expired or was
// released, oldest first. A job never claimed (fence 0) has no owner
// either: it is its creator's, or from before leases.
func (db *DB) ExpiredJobs(ctx context.Context) ([]rebound.Job, error) {
	out, err := db.jobs(ctx, `WHERE state IN `+active+` AND (owner != '' AND lease_until <= ? OR owner = '' AND fence > 0) ORDER BY seq`, db.now().UnixNano())
	if err != nil {
		return nil, fmt.Errorf("expired jobs: %w", err)
	}
	return out, nil
}

// ReleaseJob hands owner's lease over at once (see rebound.Store).
func (db *DB) ReleaseJob(ctx context.Context, id, owner string, fence int64) error {
	res, err := db.exec(ctx, `UPDATE jobs SET owner = '', lease_until = 0, fence = fence + 1 WHERE id = ? AND owner = ? AND fence = ? AND state IN `+active, id, owner, fence)
	if err != nil {
		return fmt.Errorf("release the lease of job %s: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		if _, err := db.GetJob(ctx, id); err != nil {
			return err
		}
		return rebound.LeaseLostError(id)
	}
	return nil
}
