package http

import (
	"context"
	"net/http"
	"net/url"

	"github.com/rebound-dr/rebound"
)

// planRunBody is the body of the plan verbs; the plan and the verb come from
// the path.
type planRunBody struct {
	Point       string   `json:"point,omitempty"`
	Planned     bool     `json:"planned,omitempty"`
	SkipUnready []string `json:"skipUnready,omitempty"`
	Verify      bool     `json:"verify,omitempty"`
}

// planVerbPaths maps the path of each plan verb to the verb.
var planVerbPaths = map[string]string{
	"failover":              rebound.PlanFailover,
	"test-failover":         rebound.PlanTestFailover,
	"test-failover/cleanup": rebound.PlanTestFailoverCleanup,
	"failover/change-point": rebound.PlanChangePoint,
	"failover/cancel":       rebound.PlanCancel,
	"commit":                rebound.PlanCommit,
	"reprotect":             rebound.PlanReprotect,
	"failback":              rebound.PlanFailback,
}

func (s *Server) planRoutes() []route {
	rts := []route{
		{"GET", "/api/v1/plans", viewer, s.listPlans},
		{"GET", "/api/v1/plans/{name}", viewer, s.getPlan},
		{"PUT", "/api/v1/plans/{name}", operator, s.applyPlan},
		{"DELETE", "/api/v1/plans/{name}", operator, s.deletePlan},
		{"GET", "/api/v1/plans/{name}/preflight", viewer, s.preflightPlan},
		{"POST", "/api/v1/jobs/{id}/resume", operator, s.resumeJob},
		{"POST", "/api/v1/jobs/{id}/retry", operator, s.retryJob},
	}
	for path, verb := range planVerbPaths {
		rts = append(rts, route{"POST", "/api/v1/plans/{name}/" + path, operator, s.runPlan(verb)})
	}
	return rts
}

func (s *Server) plans(what string) (rebound.PlanService, error) {
	if s.Plans == nil {
		return nil, &errNotImplemented{what, "it serves no recovery plans"}
	}
	return s.Plans, nil
}

func (s *Server) listPlans(w http.ResponseWriter, r *http.Request) error {
	p, err := s.plans("plan list")
	if err != nil {
		return err
	}
	v, err := p.ListPlans(r.Context())
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, nonNil(v))
	return nil
}

func (s *Server) getPlan(w http.ResponseWriter, r *http.Request) error {
	p, err := s.plans("plan show")
	if err != nil {
		return err
	}
	v, err := p.GetPlan(r.Context(), r.PathValue("name"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, v)
	return nil
}

func (s *Server) applyPlan(w http.ResponseWriter, r *http.Request) error {
	p, err := s.plans("plan apply")
	if err != nil {
		return err
	}
	var plan rebound.Plan
	if err := decode(w, r, &plan, false); err != nil {
		return err
	}
	name := r.PathValue("name")
	if plan.Name == "" {
		plan.Name = name
	}
	if plan.Name != name {
		return rebound.Errorf(rebound.EINVALID, "the body names plan %q but the path names %q", plan.Name, name)
	}
	v, err := p.ApplyPlan(r.Context(), plan)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, v)
	return nil
}

func (s *Server) deletePlan(w http.ResponseWriter, r *http.Request) error {
	p, err := s.plans("plan delete")
	if err != nil {
		return err
	}
	if err := p.DeletePlan(r.Context(), r.PathValue("name")); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) preflightPlan(w http.ResponseWriter, r *http.Request) error {
	p, err := s.plans("plan preflight")
	if err != nil {
		return err
	}
	v, err := p.PreflightPlan(r.Context(), r.PathValue("name"), r.URL.Query().Get("operation"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, v)
	return nil
}

func (s *Server) runPlan(verb string) func(w http.ResponseWriter, r *http.Request) error {
	return func(w http.ResponseWriter, r *http.Request) error {
		p, err := s.plans("plan " + verb)
		if err != nil {
			return err
		}
		var b planRunBody
		if err := decode(w, r, &b, true); err != nil {
			return err
		}
		return s.job(w)(p.RunPlan(r.Context(), rebound.PlanRequest{Plan: r.PathValue("name"), Verb: verb,
			Point: b.Point, Planned: b.Planned, SkipUnready: b.SkipUnready, Verify: b.Verify}))
	}
}

func (s *Server) resumeJob(w http.ResponseWriter, r *http.Request) error {
	p, err := s.plans("job resume")
	if err != nil {
		return err
	}
	var b struct {
		Note string `json:"note,omitempty"`
	}
	if err := decode(w, r, &b, true); err != nil {
		return err
	}
	return s.job(w)(p.ResumeJob(r.Context(), r.PathValue("id"), b.Note))
}

func (s *Server) retryJob(w http.ResponseWriter, r *http.Request) error {
	p, err := s.plans("job retry")
	if err != nil {
		return err
	}
	return s.job(w)(p.RetryJob(r.Context(), r.PathValue("id")))
}

// Client side.

var _ rebound.PlanService = (*Client)(nil)

func (c *Client) ListPlans(ctx context.Context) ([]rebound.Plan, error) {
	var v []rebound.Plan
	return v, c.do(ctx, "GET", "/api/v1/plans", nil, &v)
}

func (c *Client) GetPlan(ctx context.Context, name string) (*rebound.Plan, error) {
	var v rebound.Plan
	if err := c.do(ctx, "GET", "/api/v1/plans/"+seg(name), nil, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

func (c *Client) ApplyPlan(ctx context.Context, p rebound.Plan) (*rebound.Plan, error) {
	var v rebound.Plan
	if err := c.do(ctx, "PUT", "/api/v1/plans/"+seg(p.Name), p, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

func (c *Client) DeletePlan(ctx context.Context, name string) error {
	return c.do(ctx, "DELETE", "/api/v1/plans/"+seg(name), nil, nil)
}

func (c *Client) PreflightPlan(ctx context.Context, name, verb string) (*rebound.PlanPreflight, error) {
	var v rebound.PlanPreflight
	q := url.Values{}
	if verb != "" {
		q.Set("operation", verb)
	}
	path := "/api/v1/plans/" + seg(name) + "/preflight"
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	if err := c.do(ctx, "GET", path, nil, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

func (c *Client) RunPlan(ctx context.Context, req rebound.PlanRequest) (*rebound.Job, error) {
	for path, verb := range planVerbPaths {
		if verb == req.Verb {
			return c.job(ctx, "/api/v1/plans/"+seg(req.Plan)+"/"+path, planRunBody{Point: req.Point, Planned: req.Planned, SkipUnready: req.SkipUnready, Verify: req.Verify})
		}
	}
	return nil, rebound.Errorf(rebound.EINVALID, "unknown plan verb %q", req.Verb)
}

func (c *Client) ResumeJob(ctx context.Context, id, note string) (*rebound.Job, error) {
	if note == "" {
		return c.job(ctx, "/api/v1/jobs/"+seg(id)+"/resume", nil)
	}
	return c.job(ctx, "/api/v1/jobs/"+seg(id)+"/resume", map[string]string{"note": note})
}

func (c *Client) RetryJob(ctx context.Context, id string) (*rebound.Job, error) {
	return c.job(ctx, "/api/v1/jobs/"+seg(id)+"/retry", nil)
}
