package rebound

import "context"

// Group is a replication group as the API shows it: machines active at one
// site and protected to one target through one ordered stream, so every
// point of the group is crash-consistent across all of them. The group's
// lifecycle state (State, Protection, Failover, ...) is one record, which
// its members mirror (Machine.Group). See docs/design/groups.md.
type Group struct {
	Name     string   `json:"name"`
	Machines []string `json:"machines"`
	// State is a machine state (MachineProtected, MachineFailedOver, ...).
	State        string        `json:"state"`
	ActiveSite   string        `json:"activeSite"`
	SourceSite   string        `json:"sourceSite,omitempty"`
	TargetSite   string        `json:"targetSite,omitempty"`
	Policy       string        `json:"policy,omitempty"`
	Health       string        `json:"health"`
	HealthReason string        `json:"healthReason,omitempty"`
	LagSeconds   float64       `json:"lagSeconds"`
	Protection   *Protection   `json:"protection,omitempty"`
	Failover     *FailoverInfo `json:"failover,omitempty"`
	TestFailover *TestFailover `json:"testFailover,omitempty"`
	CreatedAt    string        `json:"createdAt,omitempty"`
}

// GroupService holds replication groups. A group is created by the first
// `protect --group` (ProtectRequest.Group) and its lifecycle verbs are the
// machine verbs given the group's name (Failover, Commit, Reprotect, ...
// and ListPoints, CreatePoint, Preflight). The server and http.Client
// implement it next to Service.
type GroupService interface {
	ListGroups(ctx context.Context) ([]Group, error)
	GetGroup(ctx context.Context, name string) (*Group, error)
	// RemoveGroupMember takes a machine out of a protected group without a
	// full copy: it goes on replicating alone to the same target. The last
	// member cannot be removed; unprotect the group instead.
	RemoveGroupMember(ctx context.Context, group, machine string) (*Job, error)
}

// MemberDisks is one member of a group's stream (ReplicationSpec.Members).
type MemberDisks struct {
	Name  string  `json:"name"`
	Disks []Disk  `json:"disks"`
	VM    *VMSpec `json:"vm,omitempty"`
}
