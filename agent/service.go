package agent

import (
	"context"

	"github.com/rebound-dr/rebound"
)

// service is the agent's rebound.SiteService: the site's, except for the
// agent's machine, whose points are cycles and which is never a target.
type service struct {
	rebound.SiteService
	a *Agent
}

// Service wraps the agent's site for the control channel. It reads the
// machine's fenced state first; Scan cycles only after that.
func (a *Agent) Service(ctx context.Context, site rebound.SiteService) (rebound.SiteService, error) {
	st, err := site.Status(ctx)
	if err != nil {
		return nil, err
	}
	for _, ms := range st.Machines {
		if ms.Name == a.cfg.Machine {
			a.mu.Lock()
			a.fenced = ms.Fenced
			a.mu.Unlock()
		}
	}
	select {
	case <-a.ready:
	default:
		close(a.ready)
	}
	return &service{SiteService: site, a: a}, nil
}

// CreateMachine keeps the agent's one machine; it holds no other.
func (s *service) CreateMachine(ctx context.Context, m rebound.SiteMachine) error {
	if m.Name != s.a.cfg.Machine {
		return rebound.Errorf(rebound.ECONFLICT, "%s is the agent of a server: it holds only machine %s, whose disks are the server's devices", s.a.cfg.Machine, s.a.cfg.Machine)
	}
	if len(m.Import) > 0 {
		return rebound.Errorf(rebound.EINVALID, "machine %s's disks are the server's devices: nothing can be imported into them", m.Name)
	}
	return s.SiteService.CreateMachine(ctx, m)
}

// CutPoint runs a cycle now for the agent's machine.
func (s *service) CutPoint(ctx context.Context, machine string, kind rebound.PointKind) (rebound.RecoveryPoint, error) {
	if machine != s.a.cfg.Machine {
		return s.SiteService.CutPoint(ctx, machine, kind)
	}
	return s.a.Cycle(ctx, kind)
}

// Fence stops the cycles (after the running one) before the site flushes
// the stream, so the head it returns is final. The server's own OS keeps
// writing to its devices: a fence stops capture, not I/O.
func (s *service) Fence(ctx context.Context, machine string) (uint64, error) {
	if machine == s.a.cfg.Machine {
		s.a.mu.Lock()
		s.a.fenced = true
		s.a.mu.Unlock()
		s.a.cycleMu.Lock()
		s.a.cycleMu.Unlock() //nolint:staticcheck // waits for the running cycle
	}
	return s.SiteService.Fence(ctx, machine)
}

// Unfence lets the cycles run again.
func (s *service) Unfence(ctx context.Context, machine string) error {
	if err := s.SiteService.Unfence(ctx, machine); err != nil {
		return err
	}
	if machine == s.a.cfg.Machine {
		s.a.mu.Lock()
		s.a.fenced = false
		s.a.mu.Unlock()
	}
	return nil
}

// StartReplication refuses to make the server's own devices a target: a
// point goes back onto them with `rebound agent restore`.
func (s *service) StartReplication(ctx context.Context, spec rebound.ReplicationSpec) error {
	if spec.Machine == s.a.cfg.Machine && spec.Role != "source" {
		return rebound.Errorf(rebound.ECONFLICT, "machine %q is the server %s's own devices, protected by its agent: it cannot receive a stream; write a point back with rebound agent restore", spec.Machine, s.a.cfg.Machine)
	}
	if spec.Machine != s.a.cfg.Machine {
		return rebound.Errorf(rebound.ECONFLICT, "%s is the agent of a server, not a recovery site: protect machines to a site appliance", s.a.cfg.Machine)
	}
	return s.SiteService.StartReplication(ctx, spec)
}

// Power: the server runs itself.
func (s *service) Power(ctx context.Context, machine, state string, test bool) error {
	if machine == s.a.cfg.Machine && !test {
		return rebound.Errorf(rebound.EINVALID, "machine %q is a server running its own OS; the agent does not power it", machine)
	}
	return s.SiteService.Power(ctx, machine, state, test)
}

// Status reports the site without NBD URIs for the agent's machine: its
// disks are not served (the server's own OS writes them).
func (s *service) Status(ctx context.Context) (*rebound.SiteStatus, error) {
	st, err := s.SiteService.Status(ctx)
	if err != nil {
		return nil, err
	}
	for i := range st.Machines {
		if st.Machines[i].Name == s.a.cfg.Machine {
			for k := range st.Machines[i].Disks {
				st.Machines[i].Disks[k].NBD = ""
			}
		}
	}
	return st, nil
}
