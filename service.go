package rebound

import "context"

// Service is the control plane as clients see it. The server implements it;
// http.Client implements it over the REST API, so the CLI and tests drive a
// server the same way in-process or remote. Every method is idempotent where
// its doc says so; errors carry a code (see ErrorCode).
type Service interface {
	ListSites(ctx context.Context) ([]Site, error)
	// CreateEnrollToken returns a one-time token a site or agent enrolls with.
	CreateEnrollToken(ctx context.Context, site string) (string, error)

	CreateMachine(ctx context.Context, req CreateMachineRequest) (*Machine, error)
	ListMachines(ctx context.Context) ([]Machine, error)
	GetMachine(ctx context.Context, name string) (*Machine, error)
	DeleteMachine(ctx context.Context, name string) error

	ListPolicies(ctx context.Context) ([]Policy, error)
	PutPolicy(ctx context.Context, p Policy) (*Policy, error)

	// Protect starts replication of a machine to a site. It returns the job.
	Protect(ctx context.Context, req ProtectRequest) (*Job, error)
	ListPoints(ctx context.Context, machine string) ([]RecoveryPoint, error)
	// CreatePoint cuts a point now and returns it once the receiving site
	// holds it durably.
	CreatePoint(ctx context.Context, machine string, app bool) (*RecoveryPoint, error)

	Failover(ctx context.Context, req FailoverRequest) (*Job, error)
	ChangePoint(ctx context.Context, machine, point string) (*Job, error)
	CancelFailover(ctx context.Context, machine string) (*Job, error)
	Commit(ctx context.Context, machine string) (*Job, error)
	TestFailover(ctx context.Context, machine, point string) (*Job, error)
	TestFailoverCleanup(ctx context.Context, machine string) (*Job, error)

	ListJobs(ctx context.Context) ([]Job, error)
	GetJob(ctx context.Context, id string) (*Job, error)
	CancelJob(ctx context.Context, id string) (*Job, error)
	ListEvents(ctx context.Context, machine string) ([]Event, error)

	// SetMachine changes a machine's settings (only the fields given) and
	// returns the machine.
	SetMachine(ctx context.Context, req SetMachineRequest) (*Machine, error)
}

// CreateMachineRequest creates a machine with empty disks at a site.
type CreateMachineRequest struct {
	Name   string  `json:"name"`
	Site   string  `json:"site"`
	Driver string  `json:"driver,omitempty"` // default "none"
	Disks  []int64 `json:"disks"`            // sizes in bytes; 0 with an Import takes the image's size
	// Import, per disk, is a raw or qcow2 image at the site converted into
	// the disk (--import FILE).
	Import []string `json:"import,omitempty"`
	// VM settings for the qemu driver.
	VM *VMSpec `json:"vm,omitempty"`
}

// ProtectRequest protects a machine to a target site.
type ProtectRequest struct {
	Machine string `json:"machine"`
	To      string `json:"to"`
	Policy  string `json:"policy,omitempty"` // default "default"
	// Group, if set, protects the machine in that replication group,
	// creating it or adding the machine to its stream.
	Group string `json:"group,omitempty"`
}

// FailoverRequest fails a machine over to its protection's target site.
// Point is "latest", "latest-processed", "latest-app-consistent", a point ID
// or an RFC 3339 time.
type FailoverRequest struct {
	Machine string `json:"machine"`
	Point   string `json:"point,omitempty"`
	Planned bool   `json:"planned,omitempty"`
	// Shutdown says how a planned failover stops the VM; zero fields take
	// the machine's settings, then the defaults.
	Shutdown ShutdownOptions `json:"shutdown,omitempty"`
}

// Point selectors.
const (
	PointLatest              = "latest"
	PointLatestProcessed     = "latest-processed"
	PointLatestAppConsistent = "latest-app-consistent"
)
