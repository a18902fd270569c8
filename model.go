package rebound

import (
	"encoding/json"
	"time"
)

// Site is one Rebound site appliance, enrolled with the server.
type Site struct {
	Name      string    `json:"name"`
	Status    string    `json:"status"` // SiteOnline or SiteOffline
	NBDAddr   string    `json:"nbdAddr,omitempty"`
	ReplAddr  string    `json:"replAddr,omitempty"`
	FreeBytes int64     `json:"freeBytes,omitempty"`
	LastSeen  time.Time `json:"lastSeen,omitempty"`
	Version   string    `json:"version,omitempty"`
}

const (
	SiteOnline  = "online"
	SiteOffline = "offline"
)

// Machine states. The protection state and the replication health are
// separate fields: a protected machine can be in critical health.
const (
	MachineUnprotected = "unprotected"  // active at ActiveSite, not replicated
	MachineSyncing     = "syncing"      // initial replication running
	MachineProtected   = "protected"    // replicating, recovery points exist
	MachineFailingOver = "failing-over" // a failover job is running
	MachineFailedOver  = "failed-over"  // active at the recovery site, not committed
)

// Replication health.
const (
	HealthNormal   = "normal"
	HealthWarning  = "warning"  // lag above the policy's RPO threshold
	HealthCritical = "critical" // replication stopped or overflowed
)

// Machine is what users protect: a set of disks active at one site.
type Machine struct {
	Name       string `json:"name"`
	Driver     string `json:"driver"` // DriverNone or DriverQEMU
	State      string `json:"state"`
	ActiveSite string `json:"activeSite"`
	// HomeSite is where the machine was created.
	HomeSite string `json:"homeSite"`
	// PreviousSite is where the machine was active before its last
	// committed failover: the default target of a reprotect.
	PreviousSite string        `json:"previousSite,omitempty"`
	Health       string        `json:"health"`
	HealthReason string        `json:"healthReason,omitempty"`
	Disks        []Disk        `json:"disks"`
	VM           *VMSpec       `json:"vm,omitempty"`
	VMStatus     *VMStatus     `json:"vmStatus,omitempty"`
	Protection   *Protection   `json:"protection,omitempty"`
	Failover     *FailoverInfo `json:"failover,omitempty"`
	TestFailover *TestFailover `json:"testFailover,omitempty"`
	CreatedAt    time.Time     `json:"createdAt"`
	// Settings are set with `rebound machine set`.
	Settings MachineSettings `json:"settings"`
	// DetachedCopies are replicas unprotect --keep-replica kept: plain
	// disks at a site, neither replicated nor served, one per site.
	DetachedCopies []DetachedCopy `json:"detachedCopies,omitempty"`
	// Group is the replication group the machine replicates in; its
	// lifecycle fields mirror the group's, and its verbs take --group.
	Group string `json:"group,omitempty"`
	// Members is set on a group's own record (the server stores a group's
	// lifecycle like a machine's; the API shows it as a Group).
	Members []string `json:"members,omitempty"`
	// Revision goes up with every stored change; an update carrying an
	// older one is refused (compare-and-swap between servers).
	Revision int64 `json:"revision"`
}

// DetachedCopy is a machine's replica kept at a site when its protection
// stopped: the disks as of Point, as plain files at that site.
type DetachedCopy struct {
	Site  string        `json:"site"`
	Time  time.Time     `json:"time"` // when it was detached
	Point RecoveryPoint `json:"point"`
	// Paths are the disk files at the site, in disk order.
	Paths []string `json:"paths,omitempty"`
}

// Disk is one disk of a machine. NBD is an NBD URI at the active site.
type Disk struct {
	Name string `json:"name"`
	Size int64  `json:"size"`
	NBD  string `json:"nbd,omitempty"`
}

// Policy says how a protection replicates and what it keeps.
type Policy struct {
	Name string `json:"name"`
	// RPOThreshold: health turns warning when lag passes it.
	RPOThreshold Duration `json:"rpoThreshold"`
	// Retention: how far back any point in time can be recovered.
	Retention Duration `json:"retention"`
	// CrashInterval: a crash-consistent point is cut this often.
	CrashInterval Duration `json:"crashInterval"`
	// AppInterval: an app-consistent point is cut this often; 0 is never.
	AppInterval Duration `json:"appInterval"`
	// Congestion: what the source does when the target falls behind and
	// the spool fills: CongestionTrack (default; "" means it) or
	// CongestionThrottle.
	Congestion string `json:"congestion,omitempty"`
}

// Congestion policies (Policy.Congestion).
const (
	// CongestionTrack: writes never wait; a full spool switches to
	// dirty-region tracking and a resync, during which no point is cut.
	CongestionTrack = "track"
	// CongestionThrottle: writes wait before they are acknowledged while
	// the spool is above its high-water mark, so the lag stays bounded.
	CongestionThrottle = "throttle"
)

// DefaultPolicy is the policy named "default".
func DefaultPolicy() Policy {
	return Policy{
		Name:          "default",
		RPOThreshold:  Duration(30 * time.Second),
		Retention:     Duration(24 * time.Hour),
		CrashInterval: Duration(5 * time.Second),
	}
}

// Protection is the replication of a machine from its active site to a
// target site.
type Protection struct {
	SourceSite string `json:"sourceSite"`
	TargetSite string `json:"targetSite"`
	Policy     string `json:"policy"`
	// Replication state as the source site reports it: "syncing",
	// "streaming", "spooling" (peer unreachable, spool below its bound),
	// "overflow" (spool full, only a dirty-region map kept) or "resyncing";
	// "stopped" once the machine failed over (the stream replicates
	// nothing until a commit and reprotect, or a cancel).
	ReplState     string  `json:"replState,omitempty"`
	SyncProgress  float64 `json:"syncProgress,omitempty"` // 0..1 during initial copy or a resync
	LagSeconds    float64 `json:"lagSeconds"`
	BacklogBytes  int64   `json:"backlogBytes"`
	DirtyBytes    int64   `json:"dirtyBytes,omitempty"`
	ThroughputBps float64 `json:"throughputBps"`
	// ThrottledWrites counts the writes the congestion policy throttle
	// held back until the target caught up (since the source stream
	// opened): writers were slowed so the lag stays bounded.
	ThrottledWrites int64     `json:"throttledWrites,omitempty"`
	LastPointTime   time.Time `json:"lastPointTime,omitempty"`
	ReportedAt      time.Time `json:"reportedAt,omitempty"`
	// ReplError, as the source reports it, says why writes fail or why the
	// stream stopped (e.g. the target acked records this source never
	// wrote); the machine's health is critical while it is set.
	ReplError string `json:"replError,omitempty"`
	// JournalError, as the target reports it, says its journal is damaged:
	// the points past the damage are lost and are not served.
	JournalError string `json:"journalError,omitempty"`
}

// FailoverInfo describes an uncommitted failover.
type FailoverInfo struct {
	FromSite string        `json:"fromSite"`
	ToSite   string        `json:"toSite"`
	Point    RecoveryPoint `json:"point"`
	Planned  bool          `json:"planned"`
	// Time is when the failover activated the point; SourceFenced says
	// whether the source's I/O was stopped then.
	Time         time.Time `json:"time"`
	SourceFenced bool      `json:"sourceFenced"`
}

// TestFailover describes a running test failover.
type TestFailover struct {
	Site  string        `json:"site"`
	Point RecoveryPoint `json:"point"`
	Disks []Disk        `json:"disks"`
}

// RecoveryPoint is a position in a machine's replicated history.
type RecoveryPoint struct {
	ID   string    `json:"id"`
	Time time.Time `json:"time"`
	Kind PointKind `json:"kind"`
	Seq  uint64    `json:"seq"`
}

// Job states.
const (
	JobQueued    = "queued"
	JobRunning   = "running"
	JobSucceeded = "succeeded"
	JobFailed    = "failed"
	JobCancelled = "cancelled"
	// JobSuspended: a plan job waits at a manual step for
	// `rebound job resume`.
	JobSuspended = "suspended"
)

// Job is one operation with steps and progress.
type Job struct {
	ID       string    `json:"id"`
	Type     string    `json:"type"` // protect, failover, commit, ...
	Machine  string    `json:"machine,omitempty"`
	State    string    `json:"state"`
	Progress float64   `json:"progress"` // 0..1
	Step     string    `json:"step,omitempty"`
	Steps    []JobStep `json:"steps"`
	Error    string    `json:"error,omitempty"`
	Result   any       `json:"result,omitempty"`
	// Resync figures, for reprotect: bytes whose digests were compared,
	// bytes sent, and the estimated seconds left.
	BytesCompared int64      `json:"bytesCompared,omitempty"`
	BytesSent     int64      `json:"bytesSent,omitempty"`
	BytesTotal    int64      `json:"bytesTotal,omitempty"`
	ETASeconds    float64    `json:"etaSeconds,omitempty"`
	CreatedAt     time.Time  `json:"createdAt"`
	UpdatedAt     time.Time  `json:"updatedAt"`
	EndedAt       *time.Time `json:"endedAt,omitempty"`
	// Plan is set on plan jobs: their stages and members.
	Plan *PlanProgress `json:"plan,omitempty"`
	// Owner is the server that runs the job, until LeaseUntil unless it
	// renews its lease; Fence goes up with every claim, and a write
	// carrying an older one is refused (docs/design/ha.md).
	Owner      string     `json:"owner,omitempty"`
	LeaseUntil *time.Time `json:"leaseUntil,omitempty"`
	Fence      int64      `json:"fence,omitempty"`
	// Cancel is CancelRequested once a cancel was asked through any
	// server (the owner cancels the job at its next lease renewal or
	// step), or CancelRefused once the job passed its point of no return
	// (a failover's activation): a cancel is refused from then on.
	Cancel string `json:"cancel,omitempty"`
	// Request is the verb's request, from which a server that takes the
	// job over runs it again (docs/design/ha.md).
	Request json.RawMessage `json:"request,omitempty"`
}

// Job.Cancel values.
const (
	CancelRequested = "requested"
	CancelRefused   = "refused"
)

// LockKey is what a job holds while it has not ended: its machine (or
// group), "plan:NAME" for a plan job, or "" for a job that holds nothing.
// A store keeps one job per key queued, running or suspended.
func (j *Job) LockKey() string {
	switch {
	case j.Machine != "":
		return j.Machine
	case j.Plan != nil && j.Plan.Name != "":
		return "plan:" + j.Plan.Name
	}
	return ""
}

// JobStep is one step of a job.
type JobStep struct {
	Name    string `json:"name"`
	State   string `json:"state"` // job states
	Message string `json:"message,omitempty"`
}

// Event is an entry of the audit and health history.
type Event struct {
	ID      int64     `json:"id"`
	Time    time.Time `json:"time"`
	Machine string    `json:"machine,omitempty"`
	Site    string    `json:"site,omitempty"`
	Kind    string    `json:"kind"`
	Message string    `json:"message"`
	// EventID is the ID its emitter gave it ("SITE/" and the site's own
	// ID, for a site's or agent's event): the store keeps one event per
	// EventID, so a resent event is recorded once. Empty for the
	// server's own events and older sites'. Written, not listed.
	EventID string `json:"-"`
}
