package main

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/rebound-dr/rebound"
)

// fakeService is a rebound.Service whose methods record their call and
// defer to an optional function; a method without one fails the call.
type fakeService struct {
	mu    sync.Mutex
	calls []string

	ListSitesFn           func() ([]rebound.Site, error)
	CreateEnrollTokenFn   func(site string) (string, error)
	CreateMachineFn       func(req rebound.CreateMachineRequest) (*rebound.Machine, error)
	ListMachinesFn        func() ([]rebound.Machine, error)
	GetMachineFn          func(name string) (*rebound.Machine, error)
	DeleteMachineFn       func(name string) error
	ListPoliciesFn        func() ([]rebound.Policy, error)
	PutPolicyFn           func(p rebound.Policy) (*rebound.Policy, error)
	ProtectFn             func(req rebound.ProtectRequest) (*rebound.Job, error)
	ListPointsFn          func(machine string) ([]rebound.RecoveryPoint, error)
	CreatePointFn         func(machine string, app bool) (*rebound.RecoveryPoint, error)
	FailoverFn            func(req rebound.FailoverRequest) (*rebound.Job, error)
	ChangePointFn         func(machine, point string) (*rebound.Job, error)
	CancelFailoverFn      func(machine string) (*rebound.Job, error)
	CommitFn              func(machine string) (*rebound.Job, error)
	TestFailoverFn        func(machine, point string) (*rebound.Job, error)
	TestFailoverCleanupFn func(machine string) (*rebound.Job, error)
	ListJobsFn            func() ([]rebound.Job, error)
	GetJobFn              func(id string) (*rebound.Job, error)
	CancelJobFn           func(id string) (*rebound.Job, error)
	ListEventsFn          func(machine string) ([]rebound.Event, error)

	ReprotectFn func(req rebound.ReprotectRequest) (*rebound.Job, error)
	FailbackFn  func(req rebound.FailoverRequest) (*rebound.Job, error)
	UnprotectFn func(req rebound.UnprotectRequest) (*rebound.Job, error)
	PreflightFn func(machine, operation string) (*rebound.PreflightReport, error)

	StartMachineFn func(name string) (*rebound.Job, error)
	StopMachineFn  func(name string) (*rebound.Job, error)
	ConsoleFn      func(name string, tail int) ([]byte, error)

	GetSiteFn      func(name string) (*rebound.SiteDetail, error)
	DeletePolicyFn func(name string) error
	QueryPointsFn  func(machine string, q rebound.ListQuery) (*rebound.PointPage, error)
	QueryEventsFn  func(q rebound.ListQuery) (*rebound.EventPage, error)
	SetMachineFn   func(req rebound.SetMachineRequest) (*rebound.Machine, error)

	ListGroupsFn        func() ([]rebound.Group, error)
	GetGroupFn          func(name string) (*rebound.Group, error)
	RemoveGroupMemberFn func(group, machine string) (*rebound.Job, error)
}

var (
	_ rebound.Service      = (*fakeService)(nil)
	_ rebound.LoopService  = (*fakeService)(nil)
	_ rebound.PowerService = (*fakeService)(nil)
	_ rebound.GroupService = (*fakeService)(nil)
)

func (f *fakeService) record(format string, args ...any) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, fmt.Sprintf(format, args...))
}

func (f *fakeService) Calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.calls...)
}

func unexpected(name string) error {
	return rebound.Errorf(rebound.EINTERNAL, "fake: unexpected call %s", name)
}

// jobFn returns a job-starting func that returns a running job of type typ.
func jobFn(typ, machine string) *rebound.Job {
	return &rebound.Job{ID: "j1", Type: typ, Machine: machine, State: rebound.JobRunning, Steps: []rebound.JobStep{}}
}

func (f *fakeService) ListSites(ctx context.Context) ([]rebound.Site, error) {
	f.record("ListSites")
	if f.ListSitesFn == nil {
		return nil, unexpected("ListSites")
	}
	return f.ListSitesFn()
}

func (f *fakeService) CreateEnrollToken(ctx context.Context, site string) (string, error) {
	f.record("CreateEnrollToken %s", site)
	if f.CreateEnrollTokenFn == nil {
		return "", unexpected("CreateEnrollToken")
	}
	return f.CreateEnrollTokenFn(site)
}

func (f *fakeService) CreateMachine(ctx context.Context, req rebound.CreateMachineRequest) (*rebound.Machine, error) {
	f.record("CreateMachine %+v", req)
	if f.CreateMachineFn == nil {
		return nil, unexpected("CreateMachine")
	}
	return f.CreateMachineFn(req)
}

func (f *fakeService) ListMachines(ctx context.Context) ([]rebound.Machine, error) {
	f.record("ListMachines")
	if f.ListMachinesFn == nil {
		return nil, unexpected("ListMachines")
	}
	return f.ListMachinesFn()
}

func (f *fakeService) GetMachine(ctx context.Context, name string) (*rebound.Machine, error) {
	f.record("GetMachine %s", name)
	if f.GetMachineFn == nil {
		return nil, unexpected("GetMachine")
	}
	return f.GetMachineFn(name)
}

func (f *fakeService) DeleteMachine(ctx context.Context, name string) error {
	f.record("DeleteMachine %s", name)
	if f.DeleteMachineFn == nil {
		return unexpected("DeleteMachine")
	}
	return f.DeleteMachineFn(name)
}

func (f *fakeService) ListPolicies(ctx context.Context) ([]rebound.Policy, error) {
	f.record("ListPolicies")
	if f.ListPoliciesFn == nil {
		return nil, unexpected("ListPolicies")
	}
	return f.ListPoliciesFn()
}

func (f *fakeService) PutPolicy(ctx context.Context, p rebound.Policy) (*rebound.Policy, error) {
	f.record("PutPolicy %s rpo=%s retention=%s crash=%s app=%s", p.Name, p.RPOThreshold, p.Retention, p.CrashInterval, p.AppInterval)
	if f.PutPolicyFn == nil {
		return nil, unexpected("PutPolicy")
	}
	return f.PutPolicyFn(p)
}

func (f *fakeService) Protect(ctx context.Context, req rebound.ProtectRequest) (*rebound.Job, error) {
	f.record("Protect %s", protectCall(req))
	if f.ProtectFn == nil {
		return nil, unexpected("Protect")
	}
	return f.ProtectFn(req)
}

func (f *fakeService) ListPoints(ctx context.Context, machine string) ([]rebound.RecoveryPoint, error) {
	f.record("ListPoints %s", machine)
	if f.ListPointsFn == nil {
		return nil, unexpected("ListPoints")
	}
	return f.ListPointsFn(machine)
}

func (f *fakeService) CreatePoint(ctx context.Context, machine string, app bool) (*rebound.RecoveryPoint, error) {
	f.record("CreatePoint %s app=%v", machine, app)
	if f.CreatePointFn == nil {
		return nil, unexpected("CreatePoint")
	}
	return f.CreatePointFn(machine, app)
}

func (f *fakeService) Failover(ctx context.Context, req rebound.FailoverRequest) (*rebound.Job, error) {
	f.record("Failover %s", failoverCall(req))
	if f.FailoverFn == nil {
		return nil, unexpected("Failover")
	}
	return f.FailoverFn(req)
}

func (f *fakeService) ChangePoint(ctx context.Context, machine, point string) (*rebound.Job, error) {
	f.record("ChangePoint %s %s", machine, point)
	if f.ChangePointFn == nil {
		return nil, unexpected("ChangePoint")
	}
	return f.ChangePointFn(machine, point)
}

func (f *fakeService) CancelFailover(ctx context.Context, machine string) (*rebound.Job, error) {
	f.record("CancelFailover %s", machine)
	if f.CancelFailoverFn == nil {
		return nil, unexpected("CancelFailover")
	}
	return f.CancelFailoverFn(machine)
}

func (f *fakeService) Commit(ctx context.Context, machine string) (*rebound.Job, error) {
	f.record("Commit %s", machine)
	if f.CommitFn == nil {
		return nil, unexpected("Commit")
	}
	return f.CommitFn(machine)
}

func (f *fakeService) TestFailover(ctx context.Context, machine, point string) (*rebound.Job, error) {
	f.record("TestFailover %s %s", machine, point)
	if f.TestFailoverFn == nil {
		return nil, unexpected("TestFailover")
	}
	return f.TestFailoverFn(machine, point)
}

func (f *fakeService) TestFailoverCleanup(ctx context.Context, machine string) (*rebound.Job, error) {
	f.record("TestFailoverCleanup %s", machine)
	if f.TestFailoverCleanupFn == nil {
		return nil, unexpected("TestFailoverCleanup")
	}
	return f.TestFailoverCleanupFn(machine)
}

func (f *fakeService) ListJobs(ctx context.Context) ([]rebound.Job, error) {
	f.record("ListJobs")
	if f.ListJobsFn == nil {
		return nil, unexpected("ListJobs")
	}
	return f.ListJobsFn()
}

func (f *fakeService) GetJob(ctx context.Context, id string) (*rebound.Job, error) {
	f.record("GetJob %s", id)
	if f.GetJobFn == nil {
		return nil, unexpected("GetJob")
	}
	return f.GetJobFn(id)
}

func (f *fakeService) CancelJob(ctx context.Context, id string) (*rebound.Job, error) {
	f.record("CancelJob %s", id)
	if f.CancelJobFn == nil {
		return nil, unexpected("CancelJob")
	}
	return f.CancelJobFn(id)
}

func (f *fakeService) ListEvents(ctx context.Context, machine string) ([]rebound.Event, error) {
	f.record("ListEvents %s", machine)
	if f.ListEventsFn == nil {
		return nil, unexpected("ListEvents")
	}
	return f.ListEventsFn(machine)
}

func (f *fakeService) Reprotect(ctx context.Context, req rebound.ReprotectRequest) (*rebound.Job, error) {
	f.record("Reprotect %+v", req)
	if f.ReprotectFn == nil {
		return nil, unexpected("Reprotect")
	}
	return f.ReprotectFn(req)
}

func (f *fakeService) Unprotect(ctx context.Context, req rebound.UnprotectRequest) (*rebound.Job, error) {
	f.record("Unprotect %+v", req)
	if f.UnprotectFn == nil {
		return nil, unexpected("Unprotect")
	}
	return f.UnprotectFn(req)
}

func (f *fakeService) Failback(ctx context.Context, req rebound.FailoverRequest) (*rebound.Job, error) {
	f.record("Failback %s", failoverCall(req))
	if f.FailbackFn == nil {
		return nil, unexpected("Failback")
	}
	return f.FailbackFn(req)
}

func (f *fakeService) Preflight(ctx context.Context, machine, operation string) (*rebound.PreflightReport, error) {
	f.record("Preflight %s %s", machine, operation)
	if f.PreflightFn == nil {
		return nil, unexpected("Preflight")
	}
	return f.PreflightFn(machine, operation)
}

func (f *fakeService) StartMachine(ctx context.Context, name string) (*rebound.Job, error) {
	f.record("StartMachine %s", name)
	if f.StartMachineFn == nil {
		return nil, unexpected("StartMachine")
	}
	return f.StartMachineFn(name)
}

func (f *fakeService) StopMachine(ctx context.Context, name string) (*rebound.Job, error) {
	f.record("StopMachine %s", name)
	if f.StopMachineFn == nil {
		return nil, unexpected("StopMachine")
	}
	return f.StopMachineFn(name)
}

func (f *fakeService) Console(ctx context.Context, name string, tail int) ([]byte, error) {
	f.record("Console %s %d", name, tail)
	if f.ConsoleFn == nil {
		return nil, unexpected("Console")
	}
	return f.ConsoleFn(name, tail)
}

// CatalogService.
var _ rebound.CatalogService = (*fakeService)(nil)

func (f *fakeService) GetSite(ctx context.Context, name string) (*rebound.SiteDetail, error) {
	f.record("GetSite %s", name)
	if f.GetSiteFn == nil {
		return nil, unexpected("GetSite")
	}
	return f.GetSiteFn(name)
}

func (f *fakeService) DeletePolicy(ctx context.Context, name string) error {
	f.record("DeletePolicy %s", name)
	if f.DeletePolicyFn == nil {
		return unexpected("DeletePolicy")
	}
	return f.DeletePolicyFn(name)
}

func (f *fakeService) QueryPoints(ctx context.Context, machine string, q rebound.ListQuery) (*rebound.PointPage, error) {
	f.record("QueryPoints %s %s", machine, fmtQuery(q))
	if f.QueryPointsFn == nil {
		return nil, unexpected("QueryPoints")
	}
	return f.QueryPointsFn(machine, q)
}

func (f *fakeService) QueryEvents(ctx context.Context, q rebound.ListQuery) (*rebound.EventPage, error) {
	f.record("QueryEvents %s", fmtQuery(q))
	if f.QueryEventsFn == nil {
		return nil, unexpected("QueryEvents")
	}
	return f.QueryEventsFn(q)
}

// fmtQuery shows a ListQuery's set fields, times in RFC 3339.
func fmtQuery(q rebound.ListQuery) string {
	var s []string
	add := func(k, v string) {
		if v != "" {
			s = append(s, k+"="+v)
		}
	}
	if !q.Since.IsZero() {
		add("since", q.Since.UTC().Format(time.RFC3339))
	}
	if !q.Until.IsZero() {
		add("until", q.Until.UTC().Format(time.RFC3339))
	}
	add("kind", q.Kind)
	add("machine", q.Machine)
	if q.Limit > 0 {
		add("limit", fmt.Sprint(q.Limit))
	}
	add("cursor", q.Cursor)
	return strings.Join(s, " ")
}

func (f *fakeService) SetMachine(ctx context.Context, req rebound.SetMachineRequest) (*rebound.Machine, error) {
	f.record("SetMachine %s", req.Name)
	if f.SetMachineFn == nil {
		return nil, unexpected("SetMachine")
	}
	return f.SetMachineFn(req)
}

// failoverCall prints a failover request as %+v did before it had shutdown
// options, which it shows only when given.
func failoverCall(req rebound.FailoverRequest) string {
	s := fmt.Sprintf("{Machine:%s Point:%s Planned:%v", req.Machine, req.Point, req.Planned)
	if req.Shutdown != (rebound.ShutdownOptions{}) {
		s += fmt.Sprintf(" Shutdown:%+v", req.Shutdown)
	}
	return s + "}"
}

// protectCall prints a protect request as %+v did before it had a group,
// which it shows only when given.
func protectCall(req rebound.ProtectRequest) string {
	s := fmt.Sprintf("{Machine:%s To:%s Policy:%s", req.Machine, req.To, req.Policy)
	if req.Group != "" {
		s += " Group:" + req.Group
	}
	return s + "}"
}

func (f *fakeService) ListGroups(ctx context.Context) ([]rebound.Group, error) {
	f.record("ListGroups")
	if f.ListGroupsFn == nil {
		return nil, unexpected("ListGroups")
	}
	return f.ListGroupsFn()
}

func (f *fakeService) GetGroup(ctx context.Context, name string) (*rebound.Group, error) {
	f.record("GetGroup %s", name)
	if f.GetGroupFn == nil {
		return nil, unexpected("GetGroup")
	}
	return f.GetGroupFn(name)
}

func (f *fakeService) RemoveGroupMember(ctx context.Context, group, machine string) (*rebound.Job, error) {
	f.record("RemoveGroupMember %s %s", group, machine)
	if f.RemoveGroupMemberFn == nil {
		return nil, unexpected("RemoveGroupMember")
	}
	return f.RemoveGroupMemberFn(group, machine)
}
