package server

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/rebound-dr/rebound"
)

// SetMachine changes a machine's settings; only the fields given change.
// Changed hooks are passed on to the machine's active site at once when it
// is connected, and again before every app-consistent point and with every
// replication start, so a site that was away catches up.
func (s *Server) SetMachine(ctx context.Context, req rebound.SetMachineRequest) (*rebound.Machine, error) {
	if _, err := s.DB.GetMachine(ctx, req.Name); err != nil {
		return nil, err
	}
	var changed []string
	check := func(flag string, v *string) error {
		if v == nil {
			return nil
		}
		if strings.ContainsAny(*v, " \t\n") {
			return rebound.Errorf(rebound.EINVALID, "%s %q: a hook is one executable's path at the site, run with the machine's name as its argument; put a command with arguments in a script", flag, *v)
		}
		changed = append(changed, fmt.Sprintf("%s=%q", flag, *v))
		return nil
	}
	if err := check("freeze-hook", req.FreezeHook); err != nil {
		return nil, err
	}
	if err := check("thaw-hook", req.ThawHook); err != nil {
		return nil, err
	}
	if v := req.Shutdown; v != nil {
		switch *v {
		case "", rebound.ShutdownGraceful, rebound.ShutdownForce:
		default:
			return nil, rebound.Errorf(rebound.EINVALID, "shutdown must be graceful or force, not %q", *v)
		}
		changed = append(changed, "shutdown="+*v)
	}
	if v := req.ShutdownTimeout; v != nil {
		if d := time.Duration(*v); d < 0 || d > 24*time.Hour || (d > 0 && d < time.Second) {
			return nil, rebound.Errorf(rebound.EINVALID, "shutdown timeout must be 1s to 24h (0 for the default %s), not %s", rebound.DefaultShutdownTimeout, d)
		}
		changed = append(changed, "shutdown-timeout="+v.String())
	}
	if len(changed) == 0 {
		return nil, rebound.Errorf(rebound.EINVALID, "nothing to set: give --freeze-hook, --thaw-hook, --shutdown or --shutdown-timeout")
	}
	var m *rebound.Machine
	err := s.updateMachine(ctx, req.Name, func(mm *rebound.Machine) {
		st := &mm.Settings
		if req.FreezeHook != nil {
			st.FreezeHook = *req.FreezeHook
		}
		if req.ThawHook != nil {
			st.ThawHook = *req.ThawHook
		}
		if req.Shutdown != nil {
			st.Shutdown = *req.Shutdown
		}
		if req.ShutdownTimeout != nil {
			st.ShutdownTimeout = *req.ShutdownTimeout
		}
		m = mm
	})
	if err != nil {
		return nil, err
	}
	if req.FreezeHook != nil || req.ThawHook != nil {
		if site, err := s.site(m.ActiveSite); err == nil {
			if err := site.SetHooks(ctx, m.Name, m.Settings.Hooks()); err != nil {
				s.Logger.Warn("pass hooks to site", "machine", m.Name, "site", m.ActiveSite, "err", err)
			}
		}
	}
	s.event(m.Name, "", "machine.set", "settings changed: "+strings.Join(changed, " "))
	return m, nil
}

// shutdownOptions are a planned operation's shutdown options: the
// request's, else the machine's settings, else the defaults.
func shutdownOptions(req rebound.ShutdownOptions, st rebound.MachineSettings) (rebound.ShutdownOptions, error) {
	o := req
	if o.Mode == "" {
		o.Mode = st.Shutdown
	}
	if o.Mode == "" {
		o.Mode = rebound.ShutdownGraceful
	}
	if o.Mode != rebound.ShutdownGraceful && o.Mode != rebound.ShutdownForce {
		return o, rebound.Errorf(rebound.EINVALID, "--shutdown must be graceful or force, not %q", o.Mode)
	}
	if o.Timeout < 0 {
		return o, rebound.Errorf(rebound.EINVALID, "--shutdown-timeout must not be negative")
	}
	if o.Timeout == 0 {
		o.Timeout = st.ShutdownTimeout
	}
	if o.Timeout == 0 {
		o.Timeout = rebound.Duration(rebound.DefaultShutdownTimeout)
	}
	return o, nil
}
