package rebound

import "context"

// Machine drivers.
const (
	DriverNone = "none" // only the NBD exports
	DriverQEMU = "qemu" // a QEMU virtual machine on the exports
)

// VMSpec is how a site runs a machine with the qemu driver.
type VMSpec struct {
	CPUs      int `json:"cpus"`
	MemoryMiB int `json:"memoryMiB"`
	// Direct kernel boot (the site's local paths); empty Kernel boots the
	// first disk through the BIOS.
	Kernel string `json:"kernel,omitempty"`
	Initrd string `json:"initrd,omitempty"`
	Append string `json:"append,omitempty"`
	// Network is the logical network of the NIC; each site maps it to a
	// local one (its network mapping). Empty: no NIC.
	Network string `json:"network,omitempty"`
}

// VMStatus is what a site reports of a machine's VM.
type VMStatus struct {
	Running bool   `json:"running"`
	Accel   string `json:"accel,omitempty"` // kvm or tcg
	PID     int    `json:"pid,omitempty"`
	// Network is the local network the NIC is on ("isolated" for a test
	// failover).
	Network string `json:"network,omitempty"`
}

// PowerService holds the verbs of machines that run (qemu driver). The
// server and http.Client implement it next to Service.
type PowerService interface {
	StartMachine(ctx context.Context, name string) (*Job, error)
	StopMachine(ctx context.Context, name string) (*Job, error)
	// Console returns the tail of the machine's serial console log, kept at
	// the site where it runs.
	Console(ctx context.Context, name string, tailBytes int) ([]byte, error)
}
