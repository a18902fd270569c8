package site

import (
	"crypto/tls"
	"io"
	"log/slog"
	"testing"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/qemu"
)

// TestNBDTLSURIs: a site whose TCP NBD listener requires TLS gives nbds://
// URIs, and a VM reaching its disks over TCP gets the site's TLS
// credentials; over the unix socket, or on a plain site, it stays nbd.
func TestNBDTLSURIs(t *testing.T) {
	creds := &qemu.NBDTLS{Dir: "/data/tls/nbd-client", Hostname: "edge"}
	m := &machine{state: machineState{Name: "vm1", VM: &rebound.VMSpec{}, Disks: []rebound.Disk{{Name: "a", Size: 1}, {Name: "b", Size: 1}}}}
	for _, tc := range []struct {
		name         string
		tls          *qemu.NBDTLS
		socket       string
		uri, vmDisk1 string
		vmTLS        bool
	}{
		{"tls over tcp", creds, "", "nbds://192.0.2.5:10809/vm1-disk0", "nbds://192.0.2.5:10809/vm1-disk1", true},
		{"tls, VM on the socket", creds, "/data/nbd.sock", "nbds://192.0.2.5:10809/vm1-disk0", "nbd+unix:///vm1-disk1?socket=/data/nbd.sock", false},
		{"plain", nil, "", "nbd://192.0.2.5:10809/vm1-disk0", "nbd://192.0.2.5:10809/vm1-disk1", false},
	} {
		s := New(Config{Name: "edge", DataDir: t.TempDir(), PeerTLS: &tls.Config{}, NBDTLS: tc.tls, NBDSocket: tc.socket,
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		s.SetAddrs("192.0.2.5:10809", "192.0.2.5:8451")
		if got := s.disksWithURIs("vm1", m.state.Disks, false)[0].NBD; got != tc.uri {
			t.Errorf("%s: disk URI %s, want %s", tc.name, got, tc.uri)
		}
		cfg := s.vmConfigLocked(m, false)
		if len(cfg.Disks) != 2 || cfg.Disks[1] != tc.vmDisk1 {
			t.Errorf("%s: VM disks %q, want disk 1 %s", tc.name, cfg.Disks, tc.vmDisk1)
		}
		if (cfg.NBDTLS != nil) != tc.vmTLS || (tc.vmTLS && *cfg.NBDTLS != *creds) {
			t.Errorf("%s: VM TLS credentials %+v, want them: %v", tc.name, cfg.NBDTLS, tc.vmTLS)
		}
	}
}
