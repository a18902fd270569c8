package server

import (
	"fmt"

	"github.com/rebound-dr/rebound"
)

// nextStep names, for a machine's state, what the operator can do next
// and the command for it. Every refusal of a verb the state does not
// allow ends with it, so hints never send the operator in a circle.
func nextStep(m *rebound.Machine) string {
	n := m.Name
	switch m.State {
	case rebound.MachineUnprotected:
		if m.PreviousSite != "" && m.PreviousSite != m.ActiveSite {
			return fmt.Sprintf("it runs at %s since a committed failover; protect it back to %s: rebound reprotect %s", m.ActiveSite, m.PreviousSite, n)
		}
		return fmt.Sprintf("protect it first: rebound protect %s --to SITE", n)
	case rebound.MachineSyncing:
		to := "SITE"
		if m.Protection != nil {
			to = m.Protection.TargetSite
		}
		return fmt.Sprintf("its initial replication runs; follow it to the first recovery point: rebound protect %s --to %s --wait (or stop it: rebound unprotect %s)", n, to, n)
	case rebound.MachineProtected:
		if goesHome(m) {
			return fmt.Sprintf("fail it back to %s: rebound failback %s", m.Protection.TargetSite, n)
		}
		to := "its recovery site"
		if m.Protection != nil {
			to = m.Protection.TargetSite
		}
		return fmt.Sprintf("fail it over to %s: rebound failover %s", to, n)
	case rebound.MachineFailedOver:
		to := m.ActiveSite
		if m.Failover != nil {
			to = m.Failover.ToSite
		}
		return fmt.Sprintf("it is failed over to %s and not committed: commit it (rebound commit %s) or cancel the failover (rebound failover cancel %s)", to, n, n)
	case rebound.MachineFailingOver:
		return fmt.Sprintf("a failover was interrupted: run it again (rebound failover %s) or cancel it (rebound failover cancel %s)", n, n)
	}
	return "rebound machine show " + n + " shows its state"
}

// reprotected says whether a protected machine's protection was set up by a
// reprotect (it has a committed failover behind it), so a failback applies.
func reprotected(m *rebound.Machine) bool {
	return m.Protection != nil && m.PreviousSite != ""
}

// goesHome says whether the next failover of a reprotected machine takes
// it back to the site it was created at: that one is called a failback.
func goesHome(m *rebound.Machine) bool {
	return reprotected(m) && m.ActiveSite != m.HomeSite
}

// stateConflict refuses a verb the machine's state does not allow, naming
// what comes next.
func stateConflict(m *rebound.Machine, verb string) error {
	if m.State == rebound.MachineUnprotected {
		return rebound.Errorf(rebound.ECONFLICT, "machine %s is not protected, so it cannot %s; %s", m.Name, verb, nextStep(m))
	}
	return rebound.Errorf(rebound.ECONFLICT, "machine %s is %s, so it cannot %s; %s", m.Name, m.State, verb, nextStep(m))
}
