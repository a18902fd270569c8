package http

import (
	"context"
	"net/http"

	"github.com/rebound-dr/rebound"
)

// groupVerbRoutes are the machine lifecycle routes a group also answers
// under /api/v1/groups/{name}: the same handlers, since every lifecycle verb
// of Service and LoopService takes a group's name in place of a machine's.
var groupVerbRoutes = []struct{ method, path string }{
	{"GET", "points"},
	{"POST", "points"},
	{"POST", "failover"},
	{"POST", "failover/change-point"},
	{"POST", "failover/cancel"},
	{"POST", "commit"},
	{"POST", "test-failover"},
	{"POST", "test-failover/cleanup"},
	{"POST", "reprotect"},
	{"POST", "failback"},
	{"POST", "unprotect"},
	{"GET", "preflight"},
}

func (s *Server) groupRoutes() []route {
	rts := []route{
		{"GET", "/api/v1/groups", viewer, s.listGroups},
		{"GET", "/api/v1/groups/{name}", viewer, s.getGroup},
		{"DELETE", "/api/v1/groups/{name}/machines/{machine}", operator, s.removeGroupMember},
	}
	machine := map[string]route{}
	for _, rt := range s.routes0() {
		machine[rt.method+" "+rt.path] = rt
	}
	for _, v := range groupVerbRoutes {
		rt, ok := machine[v.method+" /api/v1/machines/{name}/"+v.path]
		if !ok {
			panic("http: group route " + v.method + " " + v.path + " has no machine route")
		}
		rts = append(rts, route{v.method, "/api/v1/groups/{name}/" + v.path, rt.role, s.groupAlias("group "+v.path, rt.handle)})
	}
	return rts
}

func (s *Server) groups(what string) (rebound.GroupService, error) {
	if s.Groups == nil {
		return nil, &errNotImplemented{what, "it serves no replication groups"}
	}
	return s.Groups, nil
}

// groupAlias runs a machine handler for the group in the path. The group
// must exist, so a group route never acts on a machine of that name.
func (s *Server) groupAlias(what string, h func(w http.ResponseWriter, r *http.Request) error) func(w http.ResponseWriter, r *http.Request) error {
	return func(w http.ResponseWriter, r *http.Request) error {
		g, err := s.groups(what)
		if err != nil {
			return err
		}
		if _, err := g.GetGroup(r.Context(), r.PathValue("name")); err != nil {
			return err
		}
		return h(w, r)
	}
}

func (s *Server) listGroups(w http.ResponseWriter, r *http.Request) error {
	g, err := s.groups("group list")
	if err != nil {
		return err
	}
	v, err := g.ListGroups(r.Context())
	if err != nil {
		return err
	}
	for i := range v {
		v[i].Machines = nonNil(v[i].Machines)
	}
	writeJSON(w, http.StatusOK, nonNil(v))
	return nil
}

func (s *Server) getGroup(w http.ResponseWriter, r *http.Request) error {
	g, err := s.groups("group show")
	if err != nil {
		return err
	}
	v, err := g.GetGroup(r.Context(), r.PathValue("name"))
	if err != nil {
		return err
	}
	v.Machines = nonNil(v.Machines)
	writeJSON(w, http.StatusOK, v)
	return nil
}

func (s *Server) removeGroupMember(w http.ResponseWriter, r *http.Request) error {
	g, err := s.groups("group remove-machine")
	if err != nil {
		return err
	}
	return s.job(w)(g.RemoveGroupMember(r.Context(), r.PathValue("name"), r.PathValue("machine")))
}

var _ rebound.GroupService = (*Client)(nil)

func (c *Client) ListGroups(ctx context.Context) ([]rebound.Group, error) {
	var v []rebound.Group
	return v, c.do(ctx, "GET", "/api/v1/groups", nil, &v)
}

func (c *Client) GetGroup(ctx context.Context, name string) (*rebound.Group, error) {
	var v rebound.Group
	if err := c.do(ctx, "GET", "/api/v1/groups/"+seg(name), nil, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

// RemoveGroupMember starts the job that takes machine out of group.
func (c *Client) RemoveGroupMember(ctx context.Context, group, machine string) (*rebound.Job, error) {
	var v rebound.Job
	if err := c.do(ctx, "DELETE", "/api/v1/groups/"+seg(group)+"/machines/"+seg(machine), nil, &v); err != nil {
		return nil, err
	}
	return &v, nil
}
