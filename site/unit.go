package site

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/capture"
	rgrpc "github.com/rebound-dr/rebound/grpc"
	"github.com/rebound-dr/rebound/journal"
)

// unit is a stream unit: what one replication stream holds at this site.
// Its members are machines; its disks are the members' disks concatenated
// in member order, so a record's disk index is an index in that list and a
// member's disk i is the unit's disk m.offset+i. A lone machine is a unit
// of one, named like the machine. Fields are guarded by Site.mu.
// See docs/design/groups.md ("Site: stream units").
type unit struct {
	name    string
	state   unitFields
	members []*machine

	stream  *capture.Stream     // RoleSource
	stop    context.CancelFunc  // stops the source's sender and tickers
	policyC chan rebound.Policy // RoleSource: policy changes for the point cutter
	sender  *rgrpc.Sender
	sent    chan struct{} // closed when the sender's goroutine has returned

	journal *journal.Journal // RoleTarget
	act     *activation      // failover activation
	test    *activation      // test failover activation
}

// unitFields is what survives a restart of a unit: its role and stream.
type unitFields struct {
	Role   string                   `json:"role"`
	Fenced bool                     `json:"fenced,omitempty"`
	Spec   *rebound.ReplicationSpec `json:"spec,omitempty"`
	Act    *rebound.ActivateSpec    `json:"act,omitempty"`
	Test   *rebound.ActivateSpec    `json:"test,omitempty"`

	// Generation identifies this copy's history; Parent is the generation
	// it came from (see rebound.CopyInfo). Diverged marks a released copy
	// that took writes after the failover that released it.
	Generation string `json:"generation,omitempty"`
	Parent     string `json:"parent,omitempty"`
	Diverged   bool   `json:"diverged,omitempty"`

	// Regroup, on a target unit made from other units' replicas, holds
	// the file moves still to do (site/group.go).
	Regroup *regroupIntent `json:"regroup,omitempty"`
}

// unitState is a unit as the state files hold it (state.go).
type unitState struct {
	Name    string         `json:"name"`
	Members []machineState `json:"members"`
	unitFields
}

// siteState is state.json, the snapshot (state.go). Version 3 adds Seq,
// the last change of state.log it holds. Version 2 (the whole state, no
// log) and version 1 (a JSON array of machines, each with its stream's
// fields) are read and rewritten as version 3.
type siteState struct {
	Version int         `json:"version"`
	Seq     uint64      `json:"seq,omitempty"`
	Units   []unitState `json:"units"`
}

// legacyState is a machine of a version 1 state.json.
type legacyState struct {
	machineState
	unitFields
}

// decodeState reads state.json of any version.
func decodeState(b []byte) (units []unitState, version int, seq uint64, err error) {
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		return nil, 0, 0, err
	}
	if _, ok := v.([]any); ok {
		var old []legacyState
		if err := json.Unmarshal(b, &old); err != nil {
			return nil, 0, 0, err
		}
		for _, o := range old {
			units = append(units, unitState{Name: o.Name, Members: []machineState{o.machineState}, unitFields: o.unitFields})
		}
		return units, 1, 0, nil
	}
	var st siteState
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, 0, 0, err
	}
	if st.Version != 2 && st.Version != stateVersion {
		return nil, 0, 0, fmt.Errorf("state version %d is not %d: this site was written by another rebound version", st.Version, stateVersion)
	}
	return st.Units, st.Version, st.Seq, nil
}

// newUnit links a unit and its members and sets their disk offsets.
func newUnit(name string, f unitFields, members []*machine) *unit {
	u := &unit{name: name, state: f, members: members}
	off := 0
	for _, m := range members {
		m.unit, m.offset = u, off
		off += len(m.state.Disks)
	}
	return u
}

// disks are the unit's disks: its members' in member order.
func (u *unit) disks() []rebound.Disk {
	var ds []rebound.Disk
	for _, m := range u.members {
		ds = append(ds, m.state.Disks...)
	}
	return ds
}

// locate maps disk i of the unit to a member and the member's disk index.
func (u *unit) locate(i int) (*machine, int) {
	for _, m := range u.members {
		if i >= m.offset && i < m.offset+len(m.state.Disks) {
			return m, i - m.offset
		}
	}
	return nil, -1
}

// lone reports a unit of one named like its machine (every unit today).
func (u *unit) lone() bool {
	return len(u.members) == 1 && u.members[0].state.Name == u.name
}

// unitDir is where a unit's stream, journal and activations live: the
// machine's directory for a unit of one (the layout before units), else
// groups/NAME.
func (s *Site) unitDir(u *unit) string {
	if u.lone() {
		return s.machineDir(u.name)
	}
	return filepath.Join(s.cfg.DataDir, "groups", u.name)
}

// unitDiskPath is the file of disk i of the unit (its member's file).
func (s *Site) unitDiskPath(u *unit, i int) string {
	m, j := u.locate(i)
	return s.diskPath(m.state.Name, j)
}

// unitOf resolves a name to a unit: a unit's own name (a group, or a lone
// machine), else the unit of the machine so named.
func (s *Site) unitOf(name string) (*unit, bool) {
	if u, ok := s.units[name]; ok {
		return u, true
	}
	if m, ok := s.machines[name]; ok {
		return m.unit, true
	}
	return nil, false
}

// unitLocked returns the unit a name resolves to (unitOf) and the machine
// so named, or the unit's first member for a group's name.
func (s *Site) unitLocked(name string) (*machine, *unit, error) {
	if m, ok := s.machines[name]; ok {
		return m, m.unit, nil
	}
	if u, ok := s.units[name]; ok && len(u.members) > 0 {
		return u.members[0], u, nil
	}
	return nil, nil, rebound.Errorf(rebound.ENOTFOUND, "machine %q is not held at site %s", name, s.cfg.Name)
}

// scopeLocked resolves a name to the machines a per-copy call covers: a
// unit's name covers all its members, a member's name only itself.
func (s *Site) scopeLocked(name string) (*unit, []*machine, bool) {
	if m, ok := s.machines[name]; ok {
		return m.unit, []*machine{m}, true
	}
	if u, ok := s.units[name]; ok {
		return u, u.members, true
	}
	return nil, nil, false
}

// addUnitLocked holds a unit and its members (not yet opened).
func (s *Site) addUnitLocked(u *unit) {
	s.units[u.name] = u
	s.dirty[u.name] = true
	for _, m := range u.members {
		s.machines[m.state.Name] = m
	}
}

// dropUnitLocked forgets a unit and its members.
func (s *Site) dropUnitLocked(u *unit) {
	if s.units[u.name] == u {
		delete(s.units, u.name)
		s.dirty[u.name] = true
	}
	for _, m := range u.members {
		if s.machines[m.state.Name] == m {
			delete(s.machines, m.state.Name)
		}
	}
}

// memberNames are the names of u's members, in unit order.
func memberNames(u *unit) []string {
	var names []string
	for _, m := range u.members {
		names = append(names, m.state.Name)
	}
	return names
}
