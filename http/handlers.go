package http

import (
	"net/http"
	"strconv"

	"github.com/rebound-dr/rebound"
)

// Request bodies of the machine verbs. The machine comes from the path, so
// it is not a body field (a body naming another machine would be ambiguous).
type (
	protectBody struct {
		To     string `json:"to"`
		Policy string `json:"policy,omitempty"`
		Group  string `json:"group,omitempty"`
	}
	pointBody struct {
		AppConsistent bool `json:"appConsistent"`
	}
	failoverBody struct {
		Point           string           `json:"point,omitempty"`
		Planned         bool             `json:"planned,omitempty"`
		Shutdown        string           `json:"shutdown,omitempty"`
		ShutdownTimeout rebound.Duration `json:"shutdownTimeout,omitempty"`
	}
	changePointBody struct {
		Point string `json:"point"`
	}
	testFailoverBody struct {
		Point string `json:"point,omitempty"`
	}
	tokenBody struct {
		Token string `json:"token"`
	}
	healthBody struct {
		Status string `json:"status"`
		// Reason and Error say why the status is not "ok".
		Reason string       `json:"reason,omitempty"`
		Error  *errorDetail `json:"error,omitempty"`
	}
)

func (s *Server) healthz(w http.ResponseWriter, r *http.Request) error {
	if s.Healthy != nil {
		if err := s.Healthy(r.Context()); err != nil {
			code, msg := rebound.ErrorCode(err), rebound.ErrorMessage(err)
			status := statusOf(code)
			if status == http.StatusInternalServerError {
				status = http.StatusServiceUnavailable // a reason, not a failure of /healthz
			}
			// The error body too, so clients that read errors read this one.
			writeJSON(w, status, healthBody{Status: code, Reason: msg, Error: &errorDetail{Code: code, Message: msg}})
			return nil
		}
	}
	writeJSON(w, http.StatusOK, healthBody{Status: "ok"})
	return nil
}

func (s *Server) openAPI(w http.ResponseWriter, r *http.Request) error {
	w.Header().Set("Content-Type", "application/json")
	w.Write(openAPI)
	return nil
}

func (s *Server) listSites(w http.ResponseWriter, r *http.Request) error {
	v, err := s.Service.ListSites(r.Context())
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, nonNil(v))
	return nil
}

func (s *Server) createMachine(w http.ResponseWriter, r *http.Request) error {
	var req rebound.CreateMachineRequest
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	auditTarget(r, req.Name)
	m, err := s.Service.CreateMachine(r.Context(), req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, m)
	return nil
}

func (s *Server) listMachines(w http.ResponseWriter, r *http.Request) error {
	v, err := s.Service.ListMachines(r.Context())
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, nonNil(v))
	return nil
}

func (s *Server) getMachine(w http.ResponseWriter, r *http.Request) error {
	m, err := s.Service.GetMachine(r.Context(), r.PathValue("name"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, m)
	return nil
}

func (s *Server) deleteMachine(w http.ResponseWriter, r *http.Request) error {
	if err := s.Service.DeleteMachine(r.Context(), r.PathValue("name")); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) listPolicies(w http.ResponseWriter, r *http.Request) error {
	v, err := s.Service.ListPolicies(r.Context())
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, nonNil(v))
	return nil
}

func (s *Server) putPolicy(w http.ResponseWriter, r *http.Request) error {
	var b policyBody
	if err := decode(w, r, &b, false); err != nil {
		return err
	}
	p, err := b.policy()
	if err != nil {
		return err
	}
	name := r.PathValue("name")
	if p.Name != "" && p.Name != name {
		return rebound.Errorf(rebound.EINVALID, "policy name %q in the body does not match %q in the path", p.Name, name)
	}
	p.Name = name
	out, err := s.Service.PutPolicy(r.Context(), p)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) protect(w http.ResponseWriter, r *http.Request) error {
	var b protectBody
	if err := decode(w, r, &b, false); err != nil {
		return err
	}
	return s.job(w)(s.Service.Protect(r.Context(), rebound.ProtectRequest{Machine: r.PathValue("name"), To: b.To, Policy: b.Policy, Group: b.Group}))
}

func (s *Server) createPoint(w http.ResponseWriter, r *http.Request) error {
	var b pointBody
	if err := decode(w, r, &b, true); err != nil {
		return err
	}
	p, err := s.Service.CreatePoint(r.Context(), r.PathValue("name"), b.AppConsistent)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, p)
	return nil
}

func (s *Server) failover(w http.ResponseWriter, r *http.Request) error {
	var b failoverBody
	if err := decode(w, r, &b, true); err != nil {
		return err
	}
	return s.job(w)(s.Service.Failover(r.Context(), rebound.FailoverRequest{Machine: r.PathValue("name"), Point: b.Point, Planned: b.Planned,
		Shutdown: rebound.ShutdownOptions{Mode: b.Shutdown, Timeout: b.ShutdownTimeout}}))
}

func (s *Server) changePoint(w http.ResponseWriter, r *http.Request) error {
	var b changePointBody
	if err := decode(w, r, &b, false); err != nil {
		return err
	}
	return s.job(w)(s.Service.ChangePoint(r.Context(), r.PathValue("name"), b.Point))
}

func (s *Server) cancelFailover(w http.ResponseWriter, r *http.Request) error {
	return s.job(w)(s.Service.CancelFailover(r.Context(), r.PathValue("name")))
}

func (s *Server) commit(w http.ResponseWriter, r *http.Request) error {
	return s.job(w)(s.Service.Commit(r.Context(), r.PathValue("name")))
}

func (s *Server) testFailover(w http.ResponseWriter, r *http.Request) error {
	var b testFailoverBody
	if err := decode(w, r, &b, true); err != nil {
		return err
	}
	return s.job(w)(s.Service.TestFailover(r.Context(), r.PathValue("name"), b.Point))
}

func (s *Server) testFailoverCleanup(w http.ResponseWriter, r *http.Request) error {
	return s.job(w)(s.Service.TestFailoverCleanup(r.Context(), r.PathValue("name")))
}

// job answers a job-starting verb: 202 and the job.
func (s *Server) job(w http.ResponseWriter) func(*rebound.Job, error) error {
	return func(j *rebound.Job, err error) error {
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusAccepted, j)
		return nil
	}
}

func (s *Server) listJobs(w http.ResponseWriter, r *http.Request) error {
	v, err := s.Service.ListJobs(r.Context())
	if err != nil {
		return err
	}
	// Service.ListJobs has no filter; the edge applies ?machine=.
	if m := r.URL.Query().Get("machine"); m != "" {
		out := v[:0:0]
		for _, j := range v {
			if j.Machine == m {
				out = append(out, j)
			}
		}
		v = out
	}
	writeJSON(w, http.StatusOK, nonNil(v))
	return nil
}

func (s *Server) getJob(w http.ResponseWriter, r *http.Request) error {
	j, err := s.Service.GetJob(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, j)
	return nil
}

func (s *Server) cancelJob(w http.ResponseWriter, r *http.Request) error {
	j, err := s.Service.CancelJob(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	// A job not ended yet (another server runs it) is cancelled by its
	// owner shortly: the cancel is accepted.
	status := http.StatusOK
	if j.EndedAt == nil {
		status = http.StatusAccepted
	}
	writeJSON(w, status, j)
	return nil
}

// nonNil makes an empty list encode as [] rather than null.
func nonNil[T any](v []T) []T {
	if v == nil {
		return []T{}
	}
	return v
}

// Bodies of the loop verbs (rebound.LoopService).
type (
	reprotectBody struct {
		To        string           `json:"to,omitempty"`
		Policy    string           `json:"policy,omitempty"`
		Verify    bool             `json:"verify,omitempty"`
		WaitReady rebound.Duration `json:"waitReady,omitempty"`
		Keep      string           `json:"keep,omitempty"`
	}
	failbackBody struct {
		Point           string           `json:"point,omitempty"`
		Planned         bool             `json:"planned,omitempty"`
		Shutdown        string           `json:"shutdown,omitempty"`
		ShutdownTimeout rebound.Duration `json:"shutdownTimeout,omitempty"`
	}
	unprotectBody struct {
		KeepReplica bool `json:"keepReplica,omitempty"`
	}
)

// Preflight operations a client may ask for; "" lets the server choose.
var preflightOps = map[string]bool{"": true, "failover": true, "failback": true, "reprotect": true, "commit": true, "protect": true}

func (s *Server) loop(what string) (rebound.LoopService, error) {
	if s.Loop == nil {
		return nil, &errNotImplemented{what, "it serves no reprotect, failback or preflight"}
	}
	return s.Loop, nil
}

func (s *Server) reprotect(w http.ResponseWriter, r *http.Request) error {
	l, err := s.loop("reprotect")
	if err != nil {
		return err
	}
	var b reprotectBody
	if err := decode(w, r, &b, true); err != nil {
		return err
	}
	if b.WaitReady < 0 {
		return rebound.Errorf(rebound.EINVALID, "waitReady must not be negative, not %s", b.WaitReady)
	}
	return s.job(w)(l.Reprotect(r.Context(), rebound.ReprotectRequest{Machine: r.PathValue("name"),
		To: b.To, Policy: b.Policy, Verify: b.Verify, WaitReady: b.WaitReady, Keep: b.Keep}))
}

func (s *Server) failback(w http.ResponseWriter, r *http.Request) error {
	l, err := s.loop("failback")
	if err != nil {
		return err
	}
	var b failbackBody
	if err := decode(w, r, &b, true); err != nil {
		return err
	}
	return s.job(w)(l.Failback(r.Context(), rebound.FailoverRequest{Machine: r.PathValue("name"), Point: b.Point, Planned: b.Planned,
		Shutdown: rebound.ShutdownOptions{Mode: b.Shutdown, Timeout: b.ShutdownTimeout}}))
}

// unprotect takes an optional body: the machine is in the path.
func (s *Server) unprotect(w http.ResponseWriter, r *http.Request) error {
	l, err := s.loop("unprotect")
	if err != nil {
		return err
	}
	var b unprotectBody
	if err := decode(w, r, &b, true); err != nil {
		return err
	}
	return s.job(w)(l.Unprotect(r.Context(), rebound.UnprotectRequest{Machine: r.PathValue("name"), KeepReplica: b.KeepReplica}))
}

func (s *Server) preflight(w http.ResponseWriter, r *http.Request) error {
	l, err := s.loop("preflight")
	if err != nil {
		return err
	}
	op := r.URL.Query().Get("operation")
	if !preflightOps[op] {
		return rebound.Errorf(rebound.EINVALID, "operation must be protect, failover, failback, commit or reprotect, not %q", op)
	}
	rep, err := l.Preflight(r.Context(), r.PathValue("name"), op)
	if err != nil {
		return err
	}
	if rep.Checks == nil {
		rep.Checks = []rebound.PreflightCheck{}
	}
	writeJSON(w, http.StatusOK, rep)
	return nil
}

// Console tails: what GET .../console sends without ?tail=, and the most it
// sends (a serial log is text; more than this is for the site's own file).
const (
	DefaultConsoleTail = 64 << 10
	MaxConsoleTail     = 4 << 20
)

func (s *Server) power(what string) (rebound.PowerService, error) {
	if s.Power == nil {
		return nil, &errNotImplemented{what, "it runs no virtual machines"}
	}
	return s.Power, nil
}

// startMachine and stopMachine take no body: the machine is in the path and
// the VM's settings are the machine's.
func (s *Server) startMachine(w http.ResponseWriter, r *http.Request) error {
	p, err := s.power("machine start")
	if err != nil {
		return err
	}
	return s.job(w)(p.StartMachine(r.Context(), r.PathValue("name")))
}

func (s *Server) stopMachine(w http.ResponseWriter, r *http.Request) error {
	p, err := s.power("machine stop")
	if err != nil {
		return err
	}
	return s.job(w)(p.StopMachine(r.Context(), r.PathValue("name")))
}

// console answers the tail of the serial log as the guest wrote it: bytes,
// not validated as UTF-8, never more than the tail asked for.
func (s *Server) console(w http.ResponseWriter, r *http.Request) error {
	p, err := s.power("machine console")
	if err != nil {
		return err
	}
	tail := DefaultConsoleTail
	if q := r.URL.Query(); q.Has("tail") {
		n, err := strconv.Atoi(q.Get("tail"))
		if err != nil || n < 1 || n > MaxConsoleTail {
			return rebound.Errorf(rebound.EINVALID, "tail must be a number of bytes from 1 to %d, not %q", MaxConsoleTail, q.Get("tail"))
		}
		tail = n
	}
	b, err := p.Console(r.Context(), r.PathValue("name"), tail)
	if err != nil {
		return err
	}
	if len(b) > tail {
		b = b[len(b)-tail:]
	}
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("Content-Length", strconv.Itoa(len(b)))
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	w.Write(b)
	return nil
}

// setMachineBody is PATCH /api/v1/machines/{name}: only the fields given
// change.
type setMachineBody struct {
	FreezeHook      *string           `json:"freezeHook,omitempty"`
	ThawHook        *string           `json:"thawHook,omitempty"`
	Shutdown        *string           `json:"shutdown,omitempty"`
	ShutdownTimeout *rebound.Duration `json:"shutdownTimeout,omitempty"`
}

func (s *Server) setMachine(w http.ResponseWriter, r *http.Request) error {
	var b setMachineBody
	if err := decode(w, r, &b, false); err != nil {
		return err
	}
	m, err := s.Service.SetMachine(r.Context(), rebound.SetMachineRequest{Name: r.PathValue("name"),
		FreezeHook: b.FreezeHook, ThawHook: b.ThawHook, Shutdown: b.Shutdown, ShutdownTimeout: b.ShutdownTimeout})
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, m)
	return nil
}
