package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/nbd"
	"github.com/rebound-dr/rebound/pki"
)

// TestSiteNBDTLS: a site with --nbd-tls on serves its TCP exports only over
// TLS and lists them as nbds:// in machine show. Its own certificate (the
// credentials directory its VMs use) and another site's get in, with the
// Go client and with qemu-io; plain NBD gets a TLS-required error; an
// agent's certificate, one without client auth and one from another CA are
// refused; the unix socket and the other (loopback, auto) site stay plain.
func TestSiteNBDTLS(t *testing.T) {
	ctx := context.Background()
	m, svc := fixedUp(t, func(c *UpConfig) { c.Sites[0].NBDTLS = nbdTLSOn })
	const size = 4 << 20
	if _, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "primary", Disks: []int64{size}}); err != nil {
		t.Fatal(err)
	}
	r := runCLI(t, svc, "machine", "show", "vm1", "-o", "json")
	shown := decode[rebound.Machine](t, r.stdout)
	primary := m.Sites["primary"]
	want := nbd.TLSURI(primary.NBDAddr, "vm1-disk0")
	if len(shown.Disks) != 1 || shown.Disks[0].NBD != want {
		t.Fatalf("machine show disks %+v, want %s", shown.Disks, want)
	}
	uri := shown.Disks[0].NBD

	dial := func(uri string) (*nbd.Client, error) {
		ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		return nbd.Dial(ctx, uri)
	}
	// The site's certificate names the site, so clients check that name.
	creds := filepath.Join(primary.Config.DataDir, "tls", "nbd-client")
	withCreds := func(dir string) string { return uri + "?tls-certificates=" + dir + "&tls-hostname=primary" }
	pattern := bytes.Repeat([]byte{0xe7}, 64<<10)
	cl, err := dial(withCreds(creds))
	if err != nil {
		t.Fatalf("the site's own credentials: %v", err)
	}
	if _, err := cl.WriteAtFUA(pattern, 1<<20); err != nil {
		t.Fatal(err)
	}
	cl.Close()

	plain := nbd.URI("tcp", primary.NBDAddr, "vm1-disk0")
	if _, err := dial(plain); rebound.ErrorCode(err) != rebound.EUNAUTHORIZED || !strings.Contains(err.Error(), "TLS required") {
		t.Fatalf("plain NBD to primary: %v, want TLS required", err)
	}

	// Another site's certificate gets in; read the bytes back with it.
	recoveryCreds := filepath.Join(t.TempDir(), "recovery")
	writeCreds(t, recoveryCreds, filepath.Join(m.Sites["recovery"].Config.DataDir, "tls"), "site.crt", "site.key")
	cl, err = dial(withCreds(recoveryCreds))
	if err != nil {
		t.Fatalf("recovery's certificate: %v", err)
	}
	got := make([]byte, len(pattern))
	if _, err := cl.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, pattern) {
		t.Fatalf("read over TLS with recovery's certificate: %v", err)
	}
	cl.Close()

	// qemu-io with the directory the site gives its VMs.
	out, err := exec.Command("qemu-io",
		"--object", "tls-creds-x509,id=tls0,dir="+creds+",endpoint=client",
		"--image-opts", "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port="+port(t, primary.NBDAddr)+",export=vm1-disk0,tls-creds=tls0,tls-hostname=primary",
		"-c", "read -P 0xe7 1M 64k", "-c", "read -P 0 0 1M").CombinedOutput()
	if err != nil || strings.Contains(string(out), "failed") {
		t.Fatalf("qemu-io over TLS: %v\n%s", err, out)
	}

	// Refused: an agent's certificate (bound to one machine), one without
	// client auth, one from another CA.
	ca := m.Server.CA
	refused := map[string]func() ([]byte, []byte, []byte){
		"an agent's certificate": func() ([]byte, []byte, []byte) {
			c, k, err := ca.IssueAs("vm1", nil, pki.Site, "vm1")
			mustOK(t, err)
			return c, k, ca.CertPEM()
		},
		"a server-only certificate": func() ([]byte, []byte, []byte) {
			c, k, err := ca.Issue("x", nil, pki.ServerAuth)
			mustOK(t, err)
			return c, k, ca.CertPEM()
		},
		"a certificate from another CA": func() ([]byte, []byte, []byte) {
			other, err := pki.LoadOrCreateCA(t.TempDir())
			mustOK(t, err)
			c, k, err := other.Issue("primary", nil, pki.Site)
			mustOK(t, err)
			return c, k, ca.CertPEM()
		},
	}
	for name, issue := range refused {
		dir := t.TempDir()
		c, k, caPEM := issue()
		mustOK(t, nbd.WriteClientDir(dir, c, k, caPEM))
		if cl, err := dial(withCreds(dir)); err == nil {
			cl.Close()
			t.Errorf("%s opened primary's export", name)
		}
	}

	// The unix socket stays plain, and so does recovery (auto, on loopback).
	cl, err = dial(nbd.URI("unix", primary.Config.NBDSocket, "vm1-disk0"))
	if err != nil {
		t.Fatalf("plain NBD on primary's unix socket: %v", err)
	}
	if _, err := cl.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, pattern) {
		t.Fatalf("read over the unix socket: %v", err)
	}
	cl.Close()
	if _, err := dial(nbd.URI("tcp", m.Sites["recovery"].NBDAddr, "none-disk0")); rebound.ErrorCode(err) != rebound.ENOTFOUND {
		t.Fatalf("plain NBD to recovery (loopback, auto): %v, want the export's not-found error", err)
	}
}

func writeCreds(t *testing.T, dst, tlsDir, cert, key string) {
	t.Helper()
	read := func(n string) []byte {
		b, err := os.ReadFile(filepath.Join(tlsDir, n))
		mustOK(t, err)
		return b
	}
	mustOK(t, nbd.WriteClientDir(dst, read(cert), read(key), read("ca.crt")))
}

func port(t *testing.T, addr string) string {
	t.Helper()
	i := strings.LastIndex(addr, ":")
	if i < 0 {
		t.Fatalf("address %q has no port", addr)
	}
	return addr[i+1:]
}

func mustOK(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// TestNBDTLSMode: --nbd-tls takes auto, on and off; anything else stops the
// site before it enrolls, naming the three; which listen addresses count as
// loopback (so auto keeps their URIs plain).
func TestNBDTLSMode(t *testing.T) {
	for in, want := range map[string]string{"": "auto", "auto": "auto", "on": "on", "off": "off"} {
		if got, err := nbdTLSMode(in); err != nil || got != want {
			t.Errorf("nbdTLSMode(%q) = %q, %v", in, got, err)
		}
	}
	r := runCLI(t, nil, "site", "--name", "edge", "--data", t.TempDir(), "--nbd-tls", "yes", "--token", "rbd1.x.y")
	if r.code == 0 || !strings.Contains(r.stderr, `--nbd-tls "yes"`) || !strings.Contains(r.stderr, "auto") || strings.Contains(r.stderr, "enroll") {
		t.Fatalf("site --nbd-tls yes: exit %d\n%s", r.code, r.stderr)
	}
	for addr, want := range map[string]bool{"127.0.0.1:10809": true, "[::1]:1": true, "localhost:10809": true,
		"0.0.0.0:10809": false, ":10809": false, "192.0.2.5:10809": false, "[::]:10809": false, "primary:10809": false} {
		if got := loopbackAddr(addr); got != want {
			t.Errorf("loopbackAddr(%q) = %v", addr, got)
		}
	}
}

// TestNBDCert: `rebound nbd-cert hv1` enrolls with an NBD client token
// (`site token hv1 --nbd`; a site's token is refused) and writes
// the credentials directory qemu reads; qemu-io and the Go client open a
// TLS export with it; `rebound site remove hv1` revokes it and primary's
// NBD port then refuses it at the handshake.
func TestNBDCert(t *testing.T) {
	ctx := context.Background()
	m, svc := fixedUp(t, func(c *UpConfig) { c.Sites[0].NBDTLS = nbdTLSOn })
	if _, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "primary", Disks: []int64{1 << 20}}); err != nil {
		t.Fatal(err)
	}
	// A site's token does not enroll an NBD client: the error names --nbd.
	tok, err := m.Server.JoinToken(ctx, "hv1")
	mustOK(t, err)
	tokFile := filepath.Join(t.TempDir(), "hv1.token")
	mustOK(t, os.WriteFile(tokFile, []byte(tok+"\n"), 0o600))
	dir := filepath.Join(t.TempDir(), "nbd")
	if r := runCLI(t, svc, "nbd-cert", "hv1", "--server-addr", m.Server.GRPCAddr, "--token-file", tokFile, "--out", dir); r.code != ExitUnauthorized || !strings.Contains(r.stderr, "rebound site token hv1 --nbd") {
		t.Fatalf("nbd-cert with a site token: exit %d\n%s", r.code, r.stderr)
	}
	mustOK(t, os.RemoveAll(dir))
	r := runCLI(t, svc, "site", "token", "hv1", "--nbd")
	if r.code != 0 {
		t.Fatalf("site token --nbd: exit %d\n%s", r.code, r.stderr)
	}
	mustOK(t, os.WriteFile(tokFile, []byte(r.stdout), 0o600))
	r = runCLI(t, svc, "nbd-cert", "hv1", "--server-addr", m.Server.GRPCAddr, "--token-file", tokFile, "--out", dir, "-o", "json")
	if r.code != 0 {
		t.Fatalf("nbd-cert: exit %d\n%s", r.code, r.stderr)
	}
	res := decode[NBDCert](t, r.stdout)
	if res.Name != "hv1" || res.Dir != dir || res.Serial == "" {
		t.Fatalf("nbd-cert output %+v", res)
	}
	for _, f := range []string{nbd.TLSCAFile, nbd.TLSCertFile, nbd.TLSKeyFile} {
		st, err := os.Stat(filepath.Join(dir, f))
		if err != nil || st.Mode().Perm() != 0o600 {
			t.Fatalf("%s: %v %v", f, st, err)
		}
	}
	primary := m.Sites["primary"]
	qemuRead := func() ([]byte, error) {
		return exec.Command("qemu-io",
			"--object", "tls-creds-x509,id=tls0,dir="+dir+",endpoint=client",
			"--image-opts", "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port="+port(t, primary.NBDAddr)+",export=vm1-disk0,tls-creds=tls0,tls-hostname=primary",
			"-c", "read -P 0 0 64k").CombinedOutput()
	}
	if out, err := qemuRead(); err != nil || !strings.Contains(string(out), "read 65536/65536") {
		t.Fatalf("qemu-io with nbd-cert's directory: %v\n%s", err, out)
	}
	uri := nbd.TLSURI(primary.NBDAddr, "vm1-disk0") + "?tls-certificates=" + dir + "&tls-hostname=primary"
	dctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	open, err := nbd.Dial(dctx, uri) // stays open across the revocation
	if err != nil {
		t.Fatalf("Go client with nbd-cert's directory: %v", err)
	}
	defer open.Close()
	if _, err := open.ReadAt(make([]byte, 512), 0); err != nil {
		t.Fatal(err)
	}

	// No token: the command to get one.
	t.Setenv("REBOUND_JOIN_TOKEN", "")
	if r := runCLI(t, svc, "nbd-cert", "hv2", "--out", t.TempDir()); r.code != 2 || !strings.Contains(r.stderr, "rebound site token hv2 --nbd") {
		t.Fatalf("nbd-cert without a token: exit %d\n%s", r.code, r.stderr)
	}
	// A second run does not overwrite the key.
	if r := runCLI(t, svc, "nbd-cert", "hv1", "--server-addr", m.Server.GRPCAddr, "--token", "rbd1.x.y", "--out", dir); r.code != 4 || !strings.Contains(r.stderr, "already holds a client key") {
		t.Fatalf("nbd-cert into a used directory: exit %d\n%s", r.code, r.stderr)
	}

	// Revoked: primary hears of it before site remove returns, and closes
	// the open connection.
	if r := runCLI(t, svc, "site", "remove", "hv1"); r.code != 0 {
		t.Fatalf("site remove hv1: exit %d\n%s", r.code, r.stderr)
	}
	if _, err := open.ReadAt(make([]byte, 512), 0); err == nil {
		t.Fatal("the revoked certificate's open NBD connection still reads")
	}
	if out, err := qemuRead(); err == nil {
		t.Fatalf("qemu-io with a revoked certificate got in:\n%s", out)
	}
	if cl, err := nbd.Dial(dctx, uri); err == nil {
		cl.Close()
		t.Fatal("Go client with a revoked certificate got in")
	}
}

// TestSiteNBDTLSNbdinfo: libnbd checks the URI's host against the site's
// certificate, which names the site; a site reached by its name (here a
// site named localhost) is read over TLS by nbdinfo and nbdcopy with its
// nbd-client directory, and nbdinfo by address is refused (the name does
// not match).
func TestSiteNBDTLSNbdinfo(t *testing.T) {
	ctx := context.Background()
	m, svc := fixedUp(t, func(c *UpConfig) { c.Sites[0].Name, c.Sites[0].NBDTLS = "localhost", nbdTLSOn })
	if _, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "localhost", Disks: []int64{2 << 20}}); err != nil {
		t.Fatal(err)
	}
	site := m.Sites["localhost"]
	creds := filepath.Join(site.Config.DataDir, "tls", "nbd-client")
	pattern := bytes.Repeat([]byte{0x4b}, 128<<10)
	dctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	cl, err := nbd.Dial(dctx, nbd.TLSURI(site.NBDAddr, "vm1-disk0")+"?tls-certificates="+creds+"&tls-hostname=localhost")
	mustOK(t, err)
	_, err = cl.WriteAtFUA(pattern, 0)
	mustOK(t, err)
	cl.Close()

	byName := "nbds://localhost:" + port(t, site.NBDAddr) + "/vm1-disk0?tls-certificates=" + creds
	out, err := exec.Command("nbdinfo", "--json", byName).CombinedOutput()
	if err != nil || !strings.Contains(string(out), `"TLS": true`) || !strings.Contains(string(out), `"export-size": 2097152`) {
		t.Fatalf("nbdinfo by the site's name: %v\n%s", err, out)
	}
	img := filepath.Join(t.TempDir(), "copy.raw")
	if out, err := exec.Command("nbdcopy", byName, img).CombinedOutput(); err != nil {
		t.Fatalf("nbdcopy over TLS: %v\n%s", err, out)
	}
	b, err := os.ReadFile(img)
	mustOK(t, err)
	if len(b) != 2<<20 || !bytes.Equal(b[:len(pattern)], pattern) || !bytes.Equal(b[len(pattern):], make([]byte, len(b)-len(pattern))) {
		t.Fatal("nbdcopy over TLS copied other bytes than the disk holds")
	}
	byAddr := nbd.TLSURI(site.NBDAddr, "vm1-disk0") + "?tls-certificates=" + creds
	if out, err := exec.Command("nbdinfo", byAddr).CombinedOutput(); err == nil {
		t.Fatalf("nbdinfo by address accepted a certificate that names the site only:\n%s", out)
	}
}
