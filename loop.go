package rebound

import (
	"context"
	"sort"
	"time"
)

// Region is a byte range of a disk.
type Region struct {
	Offset int64 `json:"offset"`
	Length int64 `json:"length"`
}

// Seed modes of a source stream (ReplicationSpec.Seed).
const (
	// SeedFull copies every region of the disks (a target holding nothing).
	SeedFull = "full"
	// SeedDelta copies only ReplicationSpec.Regions plus the regions the
	// source's change tracking holds: the target adopts the disks it
	// already has as the base of its journal.
	SeedDelta = "delta"
)

// CopyInfo is what a site knows of its copy of a machine's disks, used to
// decide how a reprotect resyncs and whether two copies diverged.
type CopyInfo struct {
	Machine string `json:"machine"`
	Site    string `json:"site"`
	Role    string `json:"role"` // active, source, target, released, or "" if none
	Disks   []Disk `json:"disks,omitempty"`
	// Generation identifies the copy's history (DRBD-style): a copy that
	// becomes the active one after a failover gets a new generation whose
	// Parent is the generation it came from.
	Generation string `json:"generation,omitempty"`
	Parent     string `json:"parent,omitempty"`
	// Tracked is true when Changed is complete: every region that may
	// differ from the Parent generation's last common state is in it.
	Tracked bool `json:"tracked"`
	// Changed lists, per disk, the regions written since the copy left the
	// common state (at the active copy: since the failover point; at the
	// old source: writes after that point that are in its spool or dirty map).
	Changed [][]Region `json:"changed,omitempty"`
	// ChangedBytes is the sum of Changed.
	ChangedBytes int64 `json:"changedBytes"`
	// LastWrite is the time of the copy's newest write, if known.
	LastWrite time.Time `json:"lastWrite,omitempty"`
	// Untrusted says why tracking cannot be used, if it cannot.
	Untrusted string `json:"untrusted,omitempty"`
}

// BlockDigests are fixed-size block digests of one disk.
type BlockDigests struct {
	BlockSize int64    `json:"blockSize"`
	Size      int64    `json:"size"`
	Sums      [][]byte `json:"sums"` // one per block, the last may be short
	// Packed, if set, holds the digests of all blocks back to back, 16
	// bytes each, in place of Sums: one string on the JSON control stream
	// instead of a million (decoding those took seconds per 4 GiB disk).
	Packed []byte `json:"packed,omitempty"`
}

// ReprotectRequest starts replication of a failed-over (committed) machine
// from its active site to Target, reusing the disks Target still holds.
type ReprotectRequest struct {
	Machine string `json:"machine"`
	// To is the target site; default: the site the machine came from.
	To     string `json:"to,omitempty"`
	Policy string `json:"policy,omitempty"`
	// Verify compares block digests of both copies instead of trusting
	// change tracking.
	Verify bool `json:"verify,omitempty"`
	// WaitReady waits up to this long for the active site's capture side;
	// 0 fails at once when it is not ready.
	WaitReady Duration `json:"waitReady,omitempty"`
	// Keep names the site whose copy wins when the copies diverged (split
	// brain); without it such a reprotect is refused.
	Keep string `json:"keep,omitempty"`
}

// UnprotectRequest stops a machine's replication.
type UnprotectRequest struct {
	Machine string `json:"machine"`
	// KeepReplica keeps the replica at the target as a detached copy (the
	// disks as of a point cut now) instead of removing it.
	KeepReplica bool `json:"keepReplica,omitempty"`
}

// PreflightReport is the result of the checks run before failover,
// failback and reprotect.
type PreflightReport struct {
	Machine   string           `json:"machine"`
	Operation string           `json:"operation"` // failover, failback, reprotect
	OK        bool             `json:"ok"`
	Checks    []PreflightCheck `json:"checks"`
}

// PreflightCheck is one check.
type PreflightCheck struct {
	Name    string `json:"name"`
	OK      bool   `json:"ok"`
	Message string `json:"message"`
}

// LoopService holds the verbs that bring a machine home. The server and
// http.Client implement it next to Service.
type LoopService interface {
	// Reprotect starts replication in the reverse direction with a delta
	// resync (or a full copy to a site holding nothing).
	Reprotect(ctx context.Context, req ReprotectRequest) (*Job, error)
	// Failback is a failover of a reprotected machine back to the site it
	// came from; Planned is the default when Point is empty.
	Failback(ctx context.Context, req FailoverRequest) (*Job, error)
	// Preflight runs the checks of an operation ("protect", "failover",
	// "failback", "commit", "reprotect"; default: the next one the
	// machine's state allows).
	Preflight(ctx context.Context, machine, operation string) (*PreflightReport, error)
	// Unprotect stops a protected (or syncing) machine's replication at
	// both sites and removes the replica at the target; the machine stays
	// active where it is, unprotected. Refused during a failover. With
	// KeepReplica the target keeps the replica as a detached copy.
	Unprotect(ctx context.Context, req UnprotectRequest) (*Job, error)
}

// MergeRegions sorts regions by offset and merges overlapping or adjacent
// ones, dropping empty ones. It reuses rs.
func MergeRegions(rs []Region) []Region {
	sort.Slice(rs, func(i, j int) bool { return rs[i].Offset < rs[j].Offset })
	out := rs[:0]
	for _, r := range rs {
		if r.Length <= 0 {
			continue
		}
		if n := len(out); n > 0 && r.Offset <= out[n-1].Offset+out[n-1].Length {
			out[n-1].Length = max(out[n-1].Offset+out[n-1].Length, r.Offset+r.Length) - out[n-1].Offset
			continue
		}
		out = append(out, r)
	}
	return out
}
