package rebound

import (
	"context"
	"time"
)

// SiteService is what the server asks of a site appliance. The site
// implements it locally; the server reaches it through the control channel
// the site opened outbound (grpc.ControlServer hands the server one
// SiteService per connected site). Methods are idempotent: repeating a call
// whose effect already holds succeeds and changes nothing.
type SiteService interface {
	// Status reports the site and the machines it holds.
	Status(ctx context.Context) (*SiteStatus, error)

	// CreateMachine creates the machine's disks (empty, sparse) and serves
	// them over NBD. The machine is then active at this site.
	CreateMachine(ctx context.Context, m SiteMachine) error
	// DeleteMachine stops serving and removes everything the site holds
	// for the machine.
	DeleteMachine(ctx context.Context, name string) error

	// StartReplication makes this site the source or the target of a
	// machine's replication stream. A source captures every write and
	// ships it to PeerAddr; a fresh source first copies its disks (initial
	// replication). A target opens a journal the source's stream lands in.
	StartReplication(ctx context.Context, spec ReplicationSpec) error
	// StopReplication stops the stream on this side and drops its spool or
	// journal. The machine's active disks are kept.
	StopReplication(ctx context.Context, machine string) error

	// CutPoint appends a recovery point mark to the source stream. For
	// PointApp it runs the freeze hook first and the thaw hook always.
	CutPoint(ctx context.Context, machine string, kind PointKind) (RecoveryPoint, error)
	// ListPoints returns the target journal's recovery points, oldest first.
	ListPoints(ctx context.Context, machine string) (*PointList, error)
	// QueryPoints returns one page of them: the points after q.After that
	// pass q's filters, at most q.Limit, and Next when more pass. Over the
	// control channel it is ListPoints with the query in its arguments: a
	// site from before the query ignores it and sends every point, so the
	// caller pages the answer again (docs/design/wire.md).
	QueryPoints(ctx context.Context, machine string, q PointQuery) (*PointList, error)
	// ResolvePoint turns a selector ("latest", "latest-processed",
	// "latest-app-consistent", a point ID, an RFC 3339 time) into a point
	// of the target journal.
	ResolvePoint(ctx context.Context, machine, selector string) (RecoveryPoint, error)

	// Fence stops I/O on the source's exports (clients are disconnected and
	// new ones refused), flushes, and returns the stream's head sequence.
	Fence(ctx context.Context, machine string) (uint64, error)
	// Unfence serves the machine's exports again.
	Unfence(ctx context.Context, machine string) error
	// Replicated returns the highest sequence the target holds durably.
	Replicated(ctx context.Context, machine string) (uint64, error)

	// Activate exports the target journal's state at a point over NBD, at
	// once, without copying the disk. Writes go to a new active copy. A
	// test activation uses separate export names and leaves replication
	// running. Activating again at another point replaces the previous one.
	Activate(ctx context.Context, spec ActivateSpec) ([]Disk, error)
	// Deactivate drops an activation and everything written to it.
	Deactivate(ctx context.Context, machine string, test bool) error
	// Commit makes the (non-test) activation the machine's active disks at
	// this site: the point view plus the writes are flattened into plain
	// disks, progress is reported through the callback, and the journal is
	// dropped.
	Commit(ctx context.Context, machine string, progress func(done, total int64)) error
	// Release is sent to the old source after commit: it stops serving and
	// capturing the machine but keeps its disks, the seed for reprotect.
	// failoverTime is when the failover happened: a copy that took writes
	// after it diverged (split brain) and gets a new generation.
	Release(ctx context.Context, machine string, failoverTime time.Time) error

	// CopyInfo describes the site's copy of a machine for a reprotect.
	CopyInfo(ctx context.Context, machine string) (*CopyInfo, error)
	// Digests returns block digests of the site's copy of each disk of a
	// machine. Both sites of a reprotect compute them at the same time.
	Digests(ctx context.Context, machine string, blockSize int64) ([]BlockDigests, error)
	// Activate makes a released copy the active one again (reprotect with
	// Keep naming this site); it gets a new generation.
	Reactivate(ctx context.Context, machine string) error
	// Detach turns the target's replica into a detached copy: the
	// journal's state at position seq becomes plain disk files, the journal
	// is dropped, and the copy is kept, neither replicated nor served
	// (unprotect --keep-replica). It returns the files' paths at the site;
	// a copy already detached answers with its paths.
	Detach(ctx context.Context, machine string, seq uint64) ([]string, error)

	// Power sets the VM of a qemu machine at this site: PowerOn starts it on
	// the machine's exports here (or the activation's, or the test
	// activation's on the isolated network), PowerOff shuts it down cleanly
	// (guest agent, else ACPI) and PowerKill stops it at once. A machine
	// without a VM answers with no error and no effect.
	Power(ctx context.Context, machine, state string, test bool) error
	// Console returns up to tail bytes of the end of the VM's serial log.
	Console(ctx context.Context, machine string, tail int, test bool) ([]byte, error)

	// SetPolicy replaces the policy of the machine's stream on this side: a
	// source cuts points at the new intervals, a target keeps the new
	// retention window. A machine not replicating here is left as it is.
	SetPolicy(ctx context.Context, machine string, p Policy) error
	// SetHooks sets a machine's freeze and thaw hooks at this site; they
	// run around its app-consistent points while it replicates from here.
	// Empty hooks clear them.
	SetHooks(ctx context.Context, machine string, hooks Hooks) error
	// Shutdown stops a machine's VM for a planned failover or failback:
	// cleanly (guest agent, else ACPI) within opts.Timeout. If the guest
	// is still running then, ShutdownForce powers it off and succeeds;
	// ShutdownGraceful leaves it running and fails with EUNAVAILABLE. A
	// machine without a VM, or whose VM is stopped, succeeds at once.
	Shutdown(ctx context.Context, machine string, opts ShutdownOptions) error
}

// Power states.
const (
	PowerOn   = "on"
	PowerOff  = "off"
	PowerKill = "kill"
)

// SiteStatus is a site's report.
type SiteStatus struct {
	Site      string          `json:"site"`
	Version   string          `json:"version"`
	NBDAddr   string          `json:"nbdAddr"`
	ReplAddr  string          `json:"replAddr"`
	FreeBytes int64           `json:"freeBytes"`
	Machines  []MachineStatus `json:"machines"`
	Time      time.Time       `json:"time"`
}

// MachineStatus is a site's view of one machine.
type MachineStatus struct {
	Name string `json:"name"`
	// Role: "active" (served, not replicated), "source" or "target".
	Role   string    `json:"role"`
	Disks  []Disk    `json:"disks,omitempty"`
	Fenced bool      `json:"fenced,omitempty"`
	VM     *VMStatus `json:"vm,omitempty"`
	TestVM *VMStatus `json:"testVm,omitempty"`
	// Members is set on a group's stream: its machines, in disk order.
	Members []string `json:"members,omitempty"`

	// Source side.
	ReplState     string  `json:"replState,omitempty"`
	SyncDone      int64   `json:"syncDone,omitempty"`  // bytes of initial copy done
	SyncTotal     int64   `json:"syncTotal,omitempty"` // bytes to copy
	HeadSeq       uint64  `json:"headSeq,omitempty"`
	AckedSeq      uint64  `json:"ackedSeq,omitempty"`
	BacklogBytes  int64   `json:"backlogBytes,omitempty"`
	DirtyBytes    int64   `json:"dirtyBytes,omitempty"`
	LagSeconds    float64 `json:"lagSeconds,omitempty"`
	ThroughputBps float64 `json:"throughputBps,omitempty"`
	// ThrottledWrites counts the writes the congestion policy throttle
	// held back since the stream opened.
	ThrottledWrites int64 `json:"throttledWrites,omitempty"`
	// ReplError says why writes are failing with EIO: neither the spool nor
	// the dirty map can record them (the site's state directory is full or
	// failing). Empty when writes are recorded.
	ReplError string `json:"replError,omitempty"`

	// Target side.
	DurableSeq    uint64    `json:"durableSeq,omitempty"`
	Consistent    bool      `json:"consistent,omitempty"` // a point exists
	LastPointTime time.Time `json:"lastPointTime,omitempty"`
	Activated     bool      `json:"activated,omitempty"`
	TestActivated bool      `json:"testActivated,omitempty"`
}

// SiteMachine is a machine as a site holds it.
type SiteMachine struct {
	Name  string `json:"name"`
	Disks []Disk `json:"disks"` // Name and Size
	// VM runs the machine under QEMU (driver qemu).
	VM *VMSpec `json:"vm,omitempty"`
	// Import, per disk, is a raw or qcow2 image (a path at the site) the
	// disk is converted from; empty for an empty disk.
	Import []string `json:"import,omitempty"`
}

// ReplicationSpec sets up one side of a machine's stream.
type ReplicationSpec struct {
	Machine  string  `json:"machine"`
	Role     string  `json:"role"` // "source" or "target"
	StreamID string  `json:"streamId"`
	Disks    []Disk  `json:"disks"`
	VM       *VMSpec `json:"vm,omitempty"` // the target runs it on failover
	// Hooks, for a source: run around its app-consistent points.
	Hooks    *Hooks `json:"hooks,omitempty"`
	PeerSite string `json:"peerSite"`
	PeerAddr string `json:"peerAddr,omitempty"` // the target's replication address, for a source
	Policy   Policy `json:"policy"`
	// Seed, for a source: SeedFull (default) or SeedDelta.
	Seed string `json:"seed,omitempty"`
	// Regions, for a delta source: per disk, regions to send besides what
	// its own change tracking holds (the target's changes, digest mismatches).
	Regions [][]Region `json:"regions,omitempty"`
	// Generation is the source copy's generation; the target's copy
	// follows it.
	Generation string `json:"generation,omitempty"`
	// AdoptDisks, for a target: use the disks this site already holds for
	// the machine as the journal's base instead of empty ones.
	AdoptDisks bool `json:"adoptDisks,omitempty"`
	// Members, for a group's stream: Machine is the group's name and Disks
	// are the members' disks concatenated in this order. A member already
	// replicating (in a stream of its own or another group's) moves into
	// this stream without a full copy; see docs/design/groups.md.
	Members []MemberDisks `json:"members,omitempty"`
}

// ActivateSpec asks a target to export a point.
type ActivateSpec struct {
	Machine string `json:"machine"`
	PointID string `json:"pointId"` // a resolved point: its ID
	Seq     uint64 `json:"seq"`     // and its position
	Test    bool   `json:"test"`
}

// PointList is a journal's points and its any-point-in-time window.
type PointList struct {
	Points []RecoveryPoint `json:"points"`
	// Any second in [Oldest, Newest] can be recovered.
	Oldest time.Time `json:"oldest"`
	Newest time.Time `json:"newest"`
	// Next, in a page (QueryPoints), is the sequence of its last point
	// when more points pass the query: the next page goes on after it.
	Next uint64 `json:"next,omitempty"`
}

// PointQuery asks a target for one page of its points, oldest first:
// those with a sequence above After, of kind Kind, Since <= time < Until
// (zero fields do not filter), at most Limit (0: all).
type PointQuery struct {
	After uint64    `json:"after,omitempty"`
	Limit int       `json:"limit,omitempty"`
	Kind  PointKind `json:"kind,omitempty"`
	Since time.Time `json:"since,omitzero"`
	Until time.Time `json:"until,omitzero"`
}

// Match reports whether p passes q's filters (not After or Limit).
func (q PointQuery) Match(p RecoveryPoint) bool {
	return (q.Kind == "" || p.Kind == q.Kind) &&
		(q.Since.IsZero() || !p.Time.Before(q.Since)) &&
		(q.Until.IsZero() || p.Time.Before(q.Until))
}

// ReplSource is the sending side of a stream (capture.Stream).
type ReplSource interface {
	// Read blocks until a record with Seq >= from exists or ctx is done, and
	// returns consecutive records starting at from, about maxBytes of
	// payload at most (at least one record). Records are not modified by
	// the caller, and the source must not modify or reuse them or their
	// Data afterwards: the sender hands Data to gRPC without a copy, and
	// gRPC may write it after Send returns, until the peer acks it.
	Read(ctx context.Context, from uint64, maxBytes int) ([]*Record, error)
	// Acked tells the source the peer holds every record <= seq durably, so
	// its spool may drop them.
	Acked(seq uint64)
}

// ReplSink is the receiving side of a stream (journal.Journal).
type ReplSink interface {
	// Durable returns the highest sequence held durably (0 if none).
	Durable() uint64
	// Append writes records that continue Durable() without a gap and
	// returns once they are durable (fsynced). Records at or below
	// Durable() are ignored, so a resent batch does no harm. Append keeps
	// no record's Data after it returns: the receiver reuses that memory.
	Append(recs []*Record) error
}

// RepairRequest is what a target whose journal dropped damaged records
// (seqs From..To) asks of its source: the block digests of each disk at its
// durable position, after the gap. The source resyncs every block whose
// digest differs from its own, tagging the window's ResyncBegin
// ResyncRepair. See docs/design/journal.md.
type RepairRequest struct {
	From, To  uint64
	BlockSize int64
	Digests   [][]byte // per disk, packed 16-byte block digests
}

// RepairSink is a ReplSink that may need a repair (journal.Journal): a
// nil request means none.
type RepairSink interface {
	RepairRequest(ctx context.Context) (*RepairRequest, error)
}

// RepairSource is a ReplSource that can repair its target (capture.Stream).
type RepairSource interface {
	Repair(ctx context.Context, req *RepairRequest) error
}
