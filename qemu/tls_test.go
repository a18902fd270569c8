package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/nbd"
	"github.com/rebound-dr/rebound/pki"
)

// memDisk is an in-memory NBD backend.
type memDisk struct {
	mu sync.Mutex
	b  []byte
}

func (m *memDisk) Size() int64 { return int64(len(m.b)) }
func (m *memDisk) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(p, m.b[off:]), nil
}
func (m *memDisk) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(m.b[off:], p), nil
}
func (m *memDisk) Flush() error { return nil }
func (m *memDisk) Trim(off, n int64) error {
	return m.WriteZeroes(off, n)
}
func (m *memDisk) WriteZeroes(off, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.b[off : off+n])
	return nil
}
func (m *memDisk) WriteZeroesNoHole(off, n int64) error { return m.WriteZeroes(off, n) }

// TestArgsNBDTLS: an nbds:// disk gets one tls-creds-x509 object (client
// endpoint, the credentials directory) and its blockdev names it with the
// site's name as tls-hostname; plain disks next to it stay plain; an nbds://
// disk without credentials is refused. The same object and blockdev then
// open a real export over TLS with qemu-io.
func TestArgsNBDTLS(t *testing.T) {
	dir := shortDir(t)
	ca, err := pki.LoadOrCreateCA(filepath.Join(dir, "ca"))
	if err != nil {
		t.Fatal(err)
	}
	scert, skey, err := ca.Issue("primary", nil, pki.Site) // a site's certificate names only the site
	if err != nil {
		t.Fatal(err)
	}
	creds := filepath.Join(dir, "nbd,tls") // commas must be escaped
	if err := nbd.WriteClientDir(creds, scert, skey, ca.CertPEM()); err != nil {
		t.Fatal(err)
	}
	conf, err := nbd.ServerTLSConfig(scert, skey, ca.CertPEM())
	if err != nil {
		t.Fatal(err)
	}
	disk := &memDisk{b: bytes.Repeat([]byte{0x3c}, 1<<20)}
	srv := &nbd.Server{
		Lookup:     func(string) (*nbd.Export, error) { return &nbd.Export{Name: "vm1-disk0", Backend: disk}, nil },
		TLSConfig:  conf,
		RequireTLS: func(net.Addr) bool { return true },
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	uri := nbd.TLSURI(l.Addr().String(), "vm1-disk0")

	d := &Driver{accel: "tcg"}
	d.accelOnce.Do(func() {})
	cfg := VMConfig{Name: "vm1", Dir: dir, NoAgent: true,
		Disks:  []string{uri, "nbd+unix:///vm1-disk1?socket=/run/n.sock", nbd.TLSURI("10.0.0.9:10809", "vm1-disk2")},
		NBDTLS: &NBDTLS{Dir: creds, Hostname: "primary"}}
	args, err := d.args(cfg, "tcg")
	if err != nil {
		t.Fatal(err)
	}
	var objects []string
	var blockdevs []map[string]any
	var raw []string
	for i := 0; i < len(args)-1; i++ {
		switch args[i] {
		case "-object":
			objects = append(objects, args[i+1])
		case "-blockdev":
			var m map[string]any
			if err := json.Unmarshal([]byte(args[i+1]), &m); err != nil {
				t.Fatal(err)
			}
			blockdevs = append(blockdevs, m)
			raw = append(raw, args[i+1])
		}
	}
	wantObj := "tls-creds-x509,id=nbdtls0,dir=" + strings.ReplaceAll(creds, ",", ",,") + ",endpoint=client"
	if len(objects) != 1 || objects[0] != wantObj {
		t.Fatalf("objects %q, want one %q", objects, wantObj)
	}
	if len(blockdevs) != 3 {
		t.Fatalf("blockdevs %v", blockdevs)
	}
	for _, i := range []int{0, 2} {
		if blockdevs[i]["tls-creds"] != "nbdtls0" || blockdevs[i]["tls-hostname"] != "primary" || blockdevs[i]["server"].(map[string]any)["type"] != "inet" {
			t.Fatalf("nbds disk %d: %v", i, blockdevs[i])
		}
	}
	if _, ok := blockdevs[1]["tls-creds"]; ok {
		t.Fatalf("unix disk got TLS: %v", blockdevs[1])
	}
	cfg.NBDTLS = nil
	if _, err := d.args(cfg, "tcg"); rebound.ErrorCode(err) != rebound.EINVALID || !strings.Contains(err.Error(), "TLS") {
		t.Fatalf("nbds disk without credentials: %v", err)
	}

	// The exact object and blockdev open the export with QEMU's block layer.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "qemu-io", "--object", objects[0], "-c", "read -P 0x3c 0 64k", "json:"+raw[0]).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "read 65536/65536") {
		t.Fatalf("qemu-io with the VM's TLS blockdev: %v\n%s", err, out)
	}
	// And the pattern check can fail.
	out, _ = exec.CommandContext(ctx, "qemu-io", "--object", objects[0], "-c", "read -P 0x11 0 4k", "json:"+raw[0]).CombinedOutput()
	if !strings.Contains(string(out), "Pattern verification failed") {
		t.Fatalf("qemu-io pattern check did not fail:\n%s", out)
	}
}
