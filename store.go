package rebound

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Store is everything the server keeps: sites, machines, policies, jobs,
// events, settings, plans, enrolment (join tokens and certificates),
// users, API tokens, sessions and the audit log. sqlite.DB (the embedded
// default) and postgres.DB (several servers on one database) implement it,
// and both pass the contract suite in internal/storetest.
//
// Objects are whole documents: Put and Update replace them. Names are
// compared exactly. Errors carry codes: ENOTFOUND for a missing object,
// ECONFLICT for a name taken, EINVALID for a bad argument; a store that
// cannot be written answers ENOSPACE where it can tell (a full disk).
type Store interface {
	// PutSite creates or replaces a site's record (its last report).
	PutSite(ctx context.Context, s Site) error
	GetSite(ctx context.Context, name string) (*Site, error)
	// ListSites lists the sites by name.
	ListSites(ctx context.Context) ([]Site, error)
	// DeleteSite forgets a site's record; its certificates stay, revoked,
	// for the revocation list. A missing site is not an error.
	DeleteSite(ctx context.Context, name string) error

	// CreateMachine inserts m (ECONFLICT if the name is taken); a zero
	// CreatedAt is set to now.
	CreateMachine(ctx context.Context, m *Machine) error
	GetMachine(ctx context.Context, name string) (*Machine, error)
	// ListMachines lists the machines by name.
	ListMachines(ctx context.Context) ([]Machine, error)
	// UpdateMachine replaces a stored machine (ENOTFOUND if none) if its
	// stored Revision is still m.Revision, and bumps m.Revision; ECONFLICT
	// (MachineChangedError) when another writer changed it since it was
	// read: read it again and redo the change.
	UpdateMachine(ctx context.Context, m *Machine) error
	// DeleteMachine removes a machine; its jobs and events stay.
	DeleteMachine(ctx context.Context, name string) error

	// PutPolicy creates or replaces a policy.
	PutPolicy(ctx context.Context, p Policy) error
	GetPolicy(ctx context.Context, name string) (*Policy, error)
	// ListPolicies lists the policies by name; "default" always exists.
	ListPolicies(ctx context.Context) ([]Policy, error)
	DeletePolicy(ctx context.Context, name string) error

	// CreateJob inserts j: an empty ID is set to "j-" and 8 hex digits, a
	// zero CreatedAt to now, UpdatedAt to now, an empty State to queued.
	// While a job of the same LockKey is queued, running or suspended, j
	// is refused (ECONFLICT naming that job): one job per machine, among
	// all the servers on the store.
	CreateJob(ctx context.Context, j *Job) error
	// UpdateJob replaces a stored job and sets UpdatedAt (ENOTFOUND if
	// none). A job with a Fence is written only while the stored fence
	// is the same: ECONFLICT means another server claimed the job, and
	// the caller must stop running it. Owner, LeaseUntil and Fence are
	// the store's: UpdateJob does not change them.
	UpdateJob(ctx context.Context, j *Job) error
	// ClaimJob makes owner the runner of a job that is not ended and has
	// no owner, the same owner, or an expired lease, until now+ttl. It
	// returns the job with its new Fence; ECONFLICT if another owner's
	// lease is live or the job ended.
	ClaimJob(ctx context.Context, id, owner string, ttl time.Duration) (*Job, error)
	// RenewJob extends owner's lease to now+ttl while fence is the job's
	// (ECONFLICT otherwise: the lease was lost), and says whether a cancel
	// was requested (RequestCancel): the owner then cancels the job.
	RenewJob(ctx context.Context, id, owner string, fence int64, ttl time.Duration) (cancel bool, err error)
	// RequestCancel asks whichever server runs job id to cancel it
	// (Job.Cancel CancelRequested) and returns the job; an ended job is
	// returned unchanged. ECONFLICT once the job passed its point of no
	// return (PassNoReturn).
	RequestCancel(ctx context.Context, id string) (*Job, error)
	// PassNoReturn records that owner's job (while fence is its) passed
	// its point of no return: RequestCancel is refused from then on. When
	// a cancel was requested first, nothing is recorded and cancel is
	// true: the job must stop. Of a cancel and the point of no return,
	// exactly one wins, whichever servers they come through.
	PassNoReturn(ctx context.Context, id, owner string, fence int64) (cancel bool, err error)
	// ReleaseJob hands owner's lease on a job over at once (a server
	// stopping cleanly): owner and lease end are cleared and the fence is
	// incremented, so the releasing server's later writes are refused and
	// the next claim takes it without waiting for the lease to expire.
	// ECONFLICT (the lease was lost) unless owner holds fence.
	ReleaseJob(ctx context.Context, id, owner string, fence int64) error
	// ExpiredJobs lists the jobs not ended whose owner's lease expired or
	// was released, oldest first: the jobs another server takes over.
	ExpiredJobs(ctx context.Context) ([]Job, error)
	GetJob(ctx context.Context, id string) (*Job, error)
	// ListJobs lists jobs newest first, of machine unless "", at most
	// limit unless limit <= 0.
	ListJobs(ctx context.Context, machine string, limit int) ([]Job, error)
	// FailInterruptedJobs fails every queued or running job that is not
	// a plan's, with reason, and returns how many.
	FailInterruptedJobs(ctx context.Context, reason string) (int, error)
	// ActiveJobs lists the jobs not ended (queued, running or
	// suspended), oldest first: at start a server takes back its own.
	ActiveJobs(ctx context.Context) ([]Job, error)
	// PlanJobs lists the plan jobs not ended (queued, running or
	// suspended), oldest first.
	PlanJobs(ctx context.Context) ([]Job, error)

	// AddEvent appends an event; its ID is assigned, a zero Time is now.
	// An event whose EventID the store already holds is not added again
	// and the answer is nil: exactly once, even when two servers add it
	// at the same time (a unique index, not a read before the write).
	// Events without an EventID are all kept.
	AddEvent(ctx context.Context, e Event) error
	// ListEvents lists events newest first, of machine unless "", at most
	// limit unless limit <= 0.
	ListEvents(ctx context.Context, machine string, limit int) ([]Event, error)
	// QueryEvents returns a page of events newest first; the cursor is
	// the ID of the previous page's last event. q.Limit must be positive.
	QueryEvents(ctx context.Context, q ListQuery) (*EventPage, error)

	// GetSetting returns a server setting and whether it is set.
	GetSetting(ctx context.Context, key string) (string, bool, error)
	PutSetting(ctx context.Context, key, value string) error

	// PutPlan creates or replaces a plan.
	PutPlan(ctx context.Context, p Plan) error
	GetPlan(ctx context.Context, name string) (*Plan, error)
	ListPlans(ctx context.Context) ([]Plan, error)
	DeletePlan(ctx context.Context, name string) error

	// CreateJoinToken creates a one-time token that enrolls site with a
	// certificate of role ("site", "agent" or "nbd") within ttl, and
	// returns its secret (only its hash is kept).
	CreateJoinToken(ctx context.Context, site, role string, rotate bool, ttl time.Duration) (string, error)
	// Enroll consumes a join token for site and records the certificate
	// serial, in one transaction; a token of another role, site, used or
	// expired is EUNAUTHORIZED and stays as it was.
	Enroll(ctx context.Context, secret, site, role, serial string) error
	// CertUsed records a connection with serial; on the first use of a
	// rotating certificate the site's others are revoked and returned.
	CertUsed(ctx context.Context, serial, site, role string) (revoked []string, err error)
	// RevokeSite revokes every live certificate of site and drops its
	// unused join tokens; it returns the serials revoked now.
	RevokeSite(ctx context.Context, site, reason string) (revoked []string, err error)
	// Certs lists the certificates of site ("" for all), oldest first.
	Certs(ctx context.Context, site string) ([]Cert, error)
	// RevokedSerials is the revocation list.
	RevokedSerials(ctx context.Context) ([]string, error)
	// PendingTokens lists the sites with a join token unused and not
	// expired.
	PendingTokens(ctx context.Context) ([]string, error)

	UserService
	AuditService
	// GetUser returns a user or ENOTFOUND.
	GetUser(ctx context.Context, name string) (*User, error)
	// EnsureUser creates name with role and no password unless it
	// exists, and says whether it did.
	EnsureUser(ctx context.Context, name string, role Role) (bool, error)

	// SchemaVersion is the number of migrations applied.
	SchemaVersion(ctx context.Context) (int, error)
	Close() error
}

// LocalStore is a Store kept on the server's own disk (SQLite): the server
// watches that disk and keeps working in memory while it is full.
type LocalStore interface {
	// Dir is the directory to free space in.
	Dir() string
	// FullError is the error that names the full disk.
	FullError() error
	// DiskFull signals each time a write failed for want of space.
	DiskFull() <-chan struct{}
	// FreeBytes is the space left in Dir.
	FreeBytes() (int64, error)
}

// Cert is a certificate the server's CA issued, as the store records it
// for revocation.
type Cert struct {
	Serial   string
	Site     string
	Role     string
	IssuedAt time.Time
	// UsedAt is the first control connection with it; zero if never.
	UsedAt time.Time
	// Rotates: on first use, the site's other certificates are revoked.
	Rotates   bool
	RevokedAt time.Time
	Reason    string
}

// PrepareJob fills in what CreateJob sets on a new job: an ID ("j-" and
// 8 hex digits) when empty, CreatedAt when zero and UpdatedAt to now, the
// state queued when empty, no steps as an empty list; and no lease.
func PrepareJob(j *Job, now time.Time) error {
	if j.ID == "" {
		var b [4]byte
		if _, err := rand.Read(b[:]); err != nil {
			return fmt.Errorf("job id: %w", err)
		}
		j.ID = "j-" + hex.EncodeToString(b[:])
	}
	if j.CreatedAt.IsZero() {
		j.CreatedAt = now
	}
	j.UpdatedAt = now
	if j.State == "" {
		j.State = JobQueued
	}
	if j.Steps == nil {
		j.Steps = []JobStep{}
	}
	j.Owner, j.LeaseUntil, j.Fence, j.Cancel = "", nil, 0, ""
	return nil
}

// BusyError is the ECONFLICT of a job refused because job id holds key
// (Job.LockKey): the same words whichever server holds it.
func BusyError(key, id string) error {
	what := "machine " + strconv.Quote(key)
	if p, ok := strings.CutPrefix(key, "plan:"); ok {
		what = "plan " + strconv.Quote(p)
	}
	return Errorf(ECONFLICT, "%s has job %s running; wait for it (rebound job wait %s) or cancel it", what, id, id)
}

// MachineChangedError is the ECONFLICT of an UpdateMachine whose revision
// is no longer the stored one.
func MachineChangedError(name string) error {
	return Errorf(ECONFLICT, "machine %q was changed by another server meanwhile; retry the command", name)
}

// NoReturnError is the ECONFLICT of a cancel that came after job id
// passed its point of no return.
func NoReturnError(id string) error {
	return Errorf(ECONFLICT, "job %s is past its point of no return and can no longer be cancelled; wait for it (rebound job wait %s) and undo its result (for a failover: rebound failover cancel MACHINE)", id, id)
}

// RequestedCancel is a store's RequestCancel answer from the job it read
// after its update: a job not ended whose cancel was refused passed its
// point of no return (NoReturnError).
func RequestedCancel(j *Job, err error) (*Job, error) {
	if err != nil {
		return nil, err
	}
	if j.EndedAt == nil && j.Cancel == CancelRefused {
		return nil, NoReturnError(j.ID)
	}
	return j, nil
}

// PassedNoReturn is a store's PassNoReturn answer, from the job it read,
// when its update matched no row: a cancel came first (true), or the
// lease was lost.
func PassedNoReturn(j *Job, err error) (bool, error) {
	switch {
	case err != nil:
		return false, err
	case j.Cancel == CancelRequested:
		return true, nil
	}
	return false, LeaseLostError(j.ID)
}

// LeaseLostError is the ECONFLICT of a write by a server whose lease on
// job id another server took over.
func LeaseLostError(id string) error {
	return Errorf(ECONFLICT, "the lease on job %s was lost: another server runs it now (rebound job show %s)", id, id)
}

// Claimable says whether owner may claim j at now: j has not ended and
// has no owner, owner's own lease, or an expired one.
func Claimable(j *Job, owner string, now time.Time) error {
	switch j.State {
	case JobQueued, JobRunning, JobSuspended:
	default:
		return Errorf(ECONFLICT, "job %s has ended (%s)", j.ID, j.State)
	}
	if j.Owner != "" && j.Owner != owner && j.LeaseUntil != nil && now.Before(*j.LeaseUntil) {
		return Errorf(ECONFLICT, "job %s is run by server %s until %s", j.ID, j.Owner, j.LeaseUntil.Format(time.RFC3339))
	}
	return nil
}

// FailJob ends j as failed with reason at now, and its unfinished steps.
func FailJob(j *Job, reason string, now time.Time) {
	j.State, j.Error, j.UpdatedAt, j.EndedAt = JobFailed, reason, now, &now
	for i := range j.Steps {
		if s := j.Steps[i].State; s == JobRunning || s == JobQueued {
			j.Steps[i].State = JobFailed
		}
	}
}
