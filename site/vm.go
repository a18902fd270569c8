package site

import (
	"context"

	"github.com/rebound-dr/rebound"
)

// Power sets the VM of a qemu machine at this site.
func (s *Site) Power(ctx context.Context, name, state string, test bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := s.getLocked(name); err != nil {
		return err
	}
	switch state {
	case rebound.PowerOn, rebound.PowerOff, rebound.PowerKill:
	default:
		return rebound.Errorf(rebound.EINVALID, "unknown power state %q: use on, off or kill", state)
	}
	return nil // machines without a VM: nothing to power
}

// Console returns the end of the VM's serial console log.
func (s *Site) Console(ctx context.Context, name string, tail int, test bool) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := s.getLocked(name); err != nil {
		return nil, err
	}
	return nil, rebound.Errorf(rebound.ENOTFOUND, "machine %q has no VM at site %s", name, s.cfg.Name)
}
