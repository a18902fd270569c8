package rebound

import (
	"context"
	"fmt"
	"slices"
	"time"
)

// Plan is a recovery plan: an ordered list of stages. The machines and
// groups of one stage fail over, boot or shut down in parallel; stages run
// one after the other (in reverse order when a planned move shuts them down).
type Plan struct {
	Name      string      `json:"name"`
	Stages    []PlanStage `json:"stages"`
	UpdatedAt time.Time   `json:"updatedAt,omitempty"`
}

// PlanStage is one stage of a plan.
type PlanStage struct {
	Name     string   `json:"name"`
	Groups   []string `json:"groups,omitempty"`   // replication groups
	Machines []string `json:"machines,omitempty"` // lone machines
	// Before and After run, in order, around the stage's members.
	Before []PlanAction `json:"before,omitempty"`
	After  []PlanAction `json:"after,omitempty"`
	// Boot, for the stage's qemu machines, says when a started VM counts
	// as booted; the next stage waits for it.
	Boot *BootCheck `json:"boot,omitempty"`
}

// BootCheck says when a VM counts as booted.
type BootCheck struct {
	// Pattern is a string its serial console must show; empty: the VM
	// running is enough.
	Pattern string `json:"pattern,omitempty"`
	// Timeout bounds the wait; default 5m.
	Timeout Duration `json:"timeout,omitempty"`
}

// PlanAction is a script or a manual step around a stage. Exactly one of
// Script and Manual is set.
type PlanAction struct {
	// Script is an executable on the server (an absolute path; plan apply
	// resolves a relative one against the plan file's folder). It gets
	// REBOUND_PLAN, REBOUND_STAGE, REBOUND_VERB, REBOUND_DIRECTION,
	// REBOUND_POINT and REBOUND_MACHINES; exit status != 0 fails the stage.
	Script string   `json:"script,omitempty"`
	Args   []string `json:"args,omitempty"`
	// Timeout bounds a script; default 5m.
	Timeout Duration `json:"timeout,omitempty"`
	// Manual suspends the plan's job with this instruction until
	// `rebound job resume ID`.
	Manual string `json:"manual,omitempty"`
	// Verbs and Directions filter when the action runs; empty: always.
	Verbs      []string `json:"verbs,omitempty"`
	Directions []string `json:"directions,omitempty"`
}

// Plan verbs: what a plan job does to every member.
const (
	PlanFailover            = "failover"
	PlanTestFailover        = "test-failover"
	PlanTestFailoverCleanup = "test-failover-cleanup"
	PlanChangePoint         = "change-point"
	PlanCancel              = "cancel"
	PlanCommit              = "commit"
	PlanReprotect           = "reprotect"
	PlanFailback            = "failback"
)

// PlanVerbs lists the verbs a plan runs.
var PlanVerbs = []string{PlanFailover, PlanTestFailover, PlanTestFailoverCleanup, PlanChangePoint, PlanCancel, PlanCommit, PlanReprotect, PlanFailback}

// Directions of a plan run: away from the machines' home site, or home.
const (
	DirectionAway = "away"
	DirectionHome = "home"
)

// Plan point selectors, next to the machine ones.
const (
	PointLatestMultiVMProcessed     = "latest-multi-vm-processed"
	PointLatestMultiVMAppConsistent = "latest-multi-vm-app-consistent"
)

// ValidatePlan checks a plan's form (names, verbs, directions, actions);
// whether its machines and groups exist is the server's check.
func ValidatePlan(p Plan) error {
	if p.Name == "" {
		return Errorf(EINVALID, "the plan has no name: add name: NAME")
	}
	if len(p.Stages) == 0 {
		return Errorf(EINVALID, "plan %s has no stages: add stages: [{name: ..., machines: [...]}]", p.Name)
	}
	stages := map[string]bool{}
	members := map[string]string{}
	for i, st := range p.Stages {
		where := fmt.Sprintf("plan %s, stage %d", p.Name, i+1)
		if st.Name == "" {
			return Errorf(EINVALID, "%s has no name", where)
		}
		where = fmt.Sprintf("plan %s, stage %s", p.Name, st.Name)
		if stages[st.Name] {
			return Errorf(EINVALID, "%s: two stages have that name", where)
		}
		stages[st.Name] = true
		if len(st.Groups)+len(st.Machines) == 0 {
			return Errorf(EINVALID, "%s has no machines or groups", where)
		}
		for _, list := range []struct {
			kind  string
			names []string
		}{{"group", st.Groups}, {"machine", st.Machines}} {
			for _, n := range list.names {
				key := list.kind + " " + n
				if prev, ok := members[key]; ok {
					return Errorf(EINVALID, "%s: %s is already in stage %s; a member belongs to one stage", where, key, prev)
				}
				members[key] = st.Name
			}
		}
		for _, a := range append(slices.Clone(st.Before), st.After...) {
			if (a.Script == "") == (a.Manual == "") {
				return Errorf(EINVALID, "%s: an action has either script: or manual:", where)
			}
			if a.Timeout < 0 {
				return Errorf(EINVALID, "%s: a negative timeout", where)
			}
			for _, v := range a.Verbs {
				if !slices.Contains(PlanVerbs, v) {
					return Errorf(EINVALID, "%s: unknown verb %q in verbs: use %v", where, v, PlanVerbs)
				}
			}
			for _, d := range a.Directions {
				if d != DirectionAway && d != DirectionHome {
					return Errorf(EINVALID, "%s: unknown direction %q: use away or home", where, d)
				}
			}
		}
		if st.Boot != nil && st.Boot.Timeout < 0 {
			return Errorf(EINVALID, "%s: a negative boot timeout", where)
		}
	}
	return nil
}

// Runs reports whether the action runs for verb and direction.
func (a PlanAction) Runs(verb, direction string) bool {
	return (len(a.Verbs) == 0 || slices.Contains(a.Verbs, verb)) &&
		(len(a.Directions) == 0 || slices.Contains(a.Directions, direction))
}

// PlanRequest runs a verb on every member of a plan.
type PlanRequest struct {
	Plan string `json:"plan"`
	Verb string `json:"verb"`
	// Point is a selector for failover, test-failover, change-point and
	// failback (default latest).
	Point   string `json:"point,omitempty"`
	Planned bool   `json:"planned,omitempty"`
	// SkipUnready names the members a failing readiness check leaves
	// behind instead of stopping the plan.
	SkipUnready []string `json:"skipUnready,omitempty"`
	// Verify is reprotect's digest compare.
	Verify bool `json:"verify,omitempty"`
}

// PlanPreflight is a plan's readiness for a verb, per member.
type PlanPreflight struct {
	Plan      string             `json:"plan"`
	Operation string             `json:"operation"`
	OK        bool               `json:"ok"`
	Machines  []PreflightReport  `json:"machines"`
	Missing   []string           `json:"missing,omitempty"` // members that do not exist
	Stages    []PlanPreflightRow `json:"stages"`
}

// PlanPreflightRow is one stage's members in a plan preflight.
type PlanPreflightRow struct {
	Stage    string   `json:"stage"`
	Machines []string `json:"machines"`
}

// PlanProgress is the part of a plan job that says where it is; it is
// saved with the job, so a restarted server resumes from it.
type PlanProgress struct {
	Name        string          `json:"name"`
	Verb        string          `json:"verb"`
	Direction   string          `json:"direction"`
	Point       string          `json:"point,omitempty"`
	Planned     bool            `json:"planned,omitempty"`
	Verify      bool            `json:"verify,omitempty"`
	SkipUnready []string        `json:"skipUnready,omitempty"`
	Plan        Plan            `json:"plan"` // as it was when the job started
	Stages      []StageProgress `json:"stages"`
}

// StageProgress is a stage of a plan job.
type StageProgress struct {
	Name    string           `json:"name"`
	State   string           `json:"state"` // job states
	Seconds float64          `json:"seconds,omitempty"`
	Members []MemberProgress `json:"members"`
	Actions []ActionProgress `json:"actions,omitempty"`
}

// MemberProgress is one machine of a stage in a plan job.
type MemberProgress struct {
	Machine string  `json:"machine"`
	Group   string  `json:"group,omitempty"`
	State   string  `json:"state"` // job states, or "skipped"
	JobID   string  `json:"jobId,omitempty"`
	Point   string  `json:"point,omitempty"`
	Seconds float64 `json:"seconds,omitempty"`
	Error   string  `json:"error,omitempty"`
}

// ActionProgress is a script or manual step of a plan job.
type ActionProgress struct {
	Phase    string  `json:"phase"` // before, after
	Index    int     `json:"index"` // in the stage's list of that phase
	Script   string  `json:"script,omitempty"`
	Manual   string  `json:"manual,omitempty"`
	State    string  `json:"state"`
	ExitCode int     `json:"exitCode,omitempty"`
	Output   string  `json:"output,omitempty"`
	Seconds  float64 `json:"seconds,omitempty"`
}

// MemberSkipped is the state of a member a plan job left behind.
const MemberSkipped = "skipped"

// PlanService holds recovery plans and their jobs. The server and
// http.Client implement it next to Service.
type PlanService interface {
	// ApplyPlan creates or replaces a plan (idempotent).
	ApplyPlan(ctx context.Context, p Plan) (*Plan, error)
	ListPlans(ctx context.Context) ([]Plan, error)
	GetPlan(ctx context.Context, name string) (*Plan, error)
	DeletePlan(ctx context.Context, name string) error
	// RunPlan starts a plan job that runs req.Verb on every member, stage by
	// stage. Plan jobs survive a server restart.
	RunPlan(ctx context.Context, req PlanRequest) (*Job, error)
	// PreflightPlan checks every member's readiness for a verb.
	PreflightPlan(ctx context.Context, name, verb string) (*PlanPreflight, error)
	// ResumeJob continues a job suspended at a manual step. note (may be
	// empty) says what was done; it is kept, with who resumed, as the
	// manual step's output and in an event.
	ResumeJob(ctx context.Context, id, note string) (*Job, error)
	// RetryJob continues a failed plan job from its failed member; members
	// already done are not redone.
	RetryJob(ctx context.Context, id string) (*Job, error)
}
