package http

import (
	"context"
	"fmt"
	"sync"

	"github.com/rebound-dr/rebound"
)

// fakeService records the last call's arguments and answers with canned
// values, or with err when set.
type fakeService struct {
	mu   sync.Mutex
	call string
	args []any
	err  error

	sites    []rebound.Site
	machine  *rebound.Machine
	machines []rebound.Machine
	policies []rebound.Policy
	points   []rebound.RecoveryPoint
	point    *rebound.RecoveryPoint
	job      *rebound.Job
	jobs     []rebound.Job
	events   []rebound.Event
	token    string
	report   *rebound.PreflightReport
	console  []byte
	panicky  bool

	siteDetail *rebound.SiteDetail
	pageSize   int    // QueryPoints pages at most this many (0: the limit)
	next       string // QueryEvents' next cursor

	groups []rebound.Group
	group  *rebound.Group
}

var _ rebound.Service = (*fakeService)(nil)

func (f *fakeService) rec(call string, args ...any) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.panicky {
		panic("boom")
	}
	f.call, f.args = call, args
	return f.err
}

func (f *fakeService) last() (string, []any) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.call, f.args
}

func (f *fakeService) ListSites(ctx context.Context) ([]rebound.Site, error) {
	return f.sites, f.rec("ListSites")
}
func (f *fakeService) CreateEnrollToken(ctx context.Context, site string) (string, error) {
	return f.token, f.rec("CreateEnrollToken", site)
}
func (f *fakeService) CreateMachine(ctx context.Context, req rebound.CreateMachineRequest) (*rebound.Machine, error) {
	if err := f.rec("CreateMachine", req); err != nil {
		return nil, err
	}
	return f.machine, nil
}
func (f *fakeService) ListMachines(ctx context.Context) ([]rebound.Machine, error) {
	return f.machines, f.rec("ListMachines")
}
func (f *fakeService) GetMachine(ctx context.Context, name string) (*rebound.Machine, error) {
	if err := f.rec("GetMachine", name); err != nil {
		return nil, err
	}
	return f.machine, nil
}
func (f *fakeService) DeleteMachine(ctx context.Context, name string) error {
	return f.rec("DeleteMachine", name)
}
func (f *fakeService) ListPolicies(ctx context.Context) ([]rebound.Policy, error) {
	return f.policies, f.rec("ListPolicies")
}
func (f *fakeService) PutPolicy(ctx context.Context, p rebound.Policy) (*rebound.Policy, error) {
	if err := f.rec("PutPolicy", p); err != nil {
		return nil, err
	}
	return &p, nil
}
func (f *fakeService) Protect(ctx context.Context, req rebound.ProtectRequest) (*rebound.Job, error) {
	return f.jobOrErr("Protect", req)
}
func (f *fakeService) ListPoints(ctx context.Context, machine string) ([]rebound.RecoveryPoint, error) {
	return f.points, f.rec("ListPoints", machine)
}
func (f *fakeService) CreatePoint(ctx context.Context, machine string, app bool) (*rebound.RecoveryPoint, error) {
	if err := f.rec("CreatePoint", machine, app); err != nil {
		return nil, err
	}
	return f.point, nil
}
func (f *fakeService) Failover(ctx context.Context, req rebound.FailoverRequest) (*rebound.Job, error) {
	return f.jobOrErr("Failover", req)
}
func (f *fakeService) ChangePoint(ctx context.Context, machine, point string) (*rebound.Job, error) {
	return f.jobOrErr("ChangePoint", machine, point)
}
func (f *fakeService) CancelFailover(ctx context.Context, machine string) (*rebound.Job, error) {
	return f.jobOrErr("CancelFailover", machine)
}
func (f *fakeService) Commit(ctx context.Context, machine string) (*rebound.Job, error) {
	return f.jobOrErr("Commit", machine)
}
func (f *fakeService) TestFailover(ctx context.Context, machine, point string) (*rebound.Job, error) {
	return f.jobOrErr("TestFailover", machine, point)
}
func (f *fakeService) TestFailoverCleanup(ctx context.Context, machine string) (*rebound.Job, error) {
	return f.jobOrErr("TestFailoverCleanup", machine)
}
func (f *fakeService) ListJobs(ctx context.Context) ([]rebound.Job, error) {
	return f.jobs, f.rec("ListJobs")
}
func (f *fakeService) GetJob(ctx context.Context, id string) (*rebound.Job, error) {
	return f.jobOrErr("GetJob", id)
}
func (f *fakeService) CancelJob(ctx context.Context, id string) (*rebound.Job, error) {
	return f.jobOrErr("CancelJob", id)
}
func (f *fakeService) ListEvents(ctx context.Context, machine string) ([]rebound.Event, error) {
	return f.events, f.rec("ListEvents", machine)
}

func (f *fakeService) jobOrErr(call string, args ...any) (*rebound.Job, error) {
	if err := f.rec(call, args...); err != nil {
		return nil, err
	}
	return f.job, nil
}

var _ rebound.LoopService = (*fakeService)(nil)

func (f *fakeService) Reprotect(ctx context.Context, req rebound.ReprotectRequest) (*rebound.Job, error) {
	return f.jobOrErr("Reprotect", req)
}
func (f *fakeService) Unprotect(ctx context.Context, req rebound.UnprotectRequest) (*rebound.Job, error) {
	return f.jobOrErr("Unprotect", req)
}

func (f *fakeService) Failback(ctx context.Context, req rebound.FailoverRequest) (*rebound.Job, error) {
	return f.jobOrErr("Failback", req)
}
func (f *fakeService) Preflight(ctx context.Context, machine, operation string) (*rebound.PreflightReport, error) {
	if err := f.rec("Preflight", machine, operation); err != nil {
		return nil, err
	}
	return f.report, nil
}

var _ rebound.PowerService = (*fakeService)(nil)

func (f *fakeService) StartMachine(ctx context.Context, name string) (*rebound.Job, error) {
	return f.jobOrErr("StartMachine", name)
}
func (f *fakeService) StopMachine(ctx context.Context, name string) (*rebound.Job, error) {
	return f.jobOrErr("StopMachine", name)
}
func (f *fakeService) Console(ctx context.Context, name string, tail int) ([]byte, error) {
	if err := f.rec("Console", name, tail); err != nil {
		return nil, err
	}
	return f.console, nil
}

// The CatalogService side: points and events page like the server does
// (oldest first by seq, newest first by ID), pageSize capping a page.
var _ rebound.CatalogService = (*fakeService)(nil)

func (f *fakeService) GetSite(ctx context.Context, name string) (*rebound.SiteDetail, error) {
	if err := f.rec("GetSite", name); err != nil {
		return nil, err
	}
	return f.siteDetail, nil
}

func (f *fakeService) DeletePolicy(ctx context.Context, name string) error {
	return f.rec("DeletePolicy", name)
}

func (f *fakeService) QueryPoints(ctx context.Context, machine string, q rebound.ListQuery) (*rebound.PointPage, error) {
	if err := f.rec("QueryPoints", machine, q); err != nil {
		return nil, err
	}
	var after uint64
	fmt.Sscan(q.Cursor, &after)
	limit := q.Limit
	if f.pageSize > 0 && (limit == 0 || f.pageSize < limit) {
		limit = f.pageSize
	}
	p := &rebound.PointPage{}
	for _, pt := range f.points {
		if pt.Seq <= after || q.Kind != "" && string(pt.Kind) != q.Kind {
			continue
		}
		if limit > 0 && len(p.Points) == limit {
			p.Next = fmt.Sprint(p.Points[limit-1].Seq)
			break
		}
		p.Points = append(p.Points, pt)
	}
	return p, nil
}

func (f *fakeService) QueryEvents(ctx context.Context, q rebound.ListQuery) (*rebound.EventPage, error) {
	if err := f.rec("QueryEvents", q); err != nil {
		return nil, err
	}
	return &rebound.EventPage{Events: f.events, Next: f.next}, nil
}

func (f *fakeService) SetMachine(ctx context.Context, req rebound.SetMachineRequest) (*rebound.Machine, error) {
	return f.machine, f.rec("SetMachine", req)
}

// The GroupService side: GetGroup knows only f.group.
var _ rebound.GroupService = (*fakeService)(nil)

func (f *fakeService) ListGroups(ctx context.Context) ([]rebound.Group, error) {
	return f.groups, f.rec("ListGroups")
}

func (f *fakeService) GetGroup(ctx context.Context, name string) (*rebound.Group, error) {
	if err := f.rec("GetGroup", name); err != nil {
		return nil, err
	}
	if f.group == nil || f.group.Name != name {
		return nil, rebound.Errorf(rebound.ENOTFOUND, "group %q not found", name)
	}
	return f.group, nil
}

func (f *fakeService) RemoveGroupMember(ctx context.Context, group, machine string) (*rebound.Job, error) {
	return f.jobOrErr("RemoveGroupMember", group, machine)
}
