package rebound

import "time"

// Shutdown modes of a planned failover or failback (--shutdown).
const (
	// ShutdownGraceful waits for the guest to power off (guest agent, then
	// ACPI) and fails the operation, VM left running, if it does not in time.
	ShutdownGraceful = "graceful"
	// ShutdownForce powers the VM off once the timeout passes, then goes on:
	// the source's exports are drained as for a clean shutdown, so every
	// write the VM had acknowledged reaches the target.
	ShutdownForce = "force"
)

// DefaultShutdownTimeout is how long a planned failover or failback waits
// for a guest to shut down when neither the request nor the machine says.
const DefaultShutdownTimeout = time.Minute

// ShutdownOptions say how a planned failover or failback stops a VM.
type ShutdownOptions struct {
	Mode    string   `json:"mode,omitempty"`    // ShutdownGraceful (default) or ShutdownForce
	Timeout Duration `json:"timeout,omitempty"` // default DefaultShutdownTimeout
}

// Hooks are commands a site runs around a machine's app-consistent points
// while it replicates from there: Freeze before the mark, Thaw after it,
// always. Each is an executable path at the site, run with the machine's
// name as its argument.
type Hooks struct {
	Freeze string `json:"freeze,omitempty"`
	Thaw   string `json:"thaw,omitempty"`
}

// MachineSettings are a machine's settings that `rebound machine set`
// changes; the server keeps them with the machine.
type MachineSettings struct {
	FreezeHook string `json:"freezeHook,omitempty"`
	ThawHook   string `json:"thawHook,omitempty"`
	// Shutdown and ShutdownTimeout are the machine's defaults for planned
	// failovers and failbacks; a request's own options win.
	Shutdown        string   `json:"shutdown,omitempty"`
	ShutdownTimeout Duration `json:"shutdownTimeout,omitempty"`
}

// Hooks returns the machine's freeze and thaw hooks.
func (s MachineSettings) Hooks() Hooks { return Hooks{Freeze: s.FreezeHook, Thaw: s.ThawHook} }

// SetMachineRequest changes a machine's settings: only the fields given
// (non-nil) change; an empty string clears a hook or the shutdown default.
type SetMachineRequest struct {
	Name            string    `json:"name"`
	FreezeHook      *string   `json:"freezeHook,omitempty"`
	ThawHook        *string   `json:"thawHook,omitempty"`
	Shutdown        *string   `json:"shutdown,omitempty"`
	ShutdownTimeout *Duration `json:"shutdownTimeout,omitempty"`
}
