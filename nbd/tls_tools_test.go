package nbd

import (
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"testing"
)

// qemuTLSArgs are qemu-io's arguments for an export over TLS with the
// certificates in dir.
func qemuTLSArgs(addr, export, dir string) []string {
	host, port, _ := net.SplitHostPort(addr)
	return []string{
		"--object", "tls-creds-x509,id=tls0,dir=" + dir + ",endpoint=client",
		"--image-opts", fmt.Sprintf("driver=nbd,server.type=inet,server.host=%s,server.port=%s,export=%s,tls-creds=tls0", host, port, export),
	}
}

// TestTLSNbdinfo: libnbd's nbdinfo reads a Rebound export over TLS with a
// certificate from the server's CA; without TLS, or with a certificate from
// another CA, it is refused.
func TestTLSNbdinfo(t *testing.T) {
	f := newTLSFixture(t)
	ts := startServerWith(t, serverOpts{tls: f.server, offLoopback: true}, exportSpec{Name: "disk0", Size: 3 << 20})

	out := run(t, "nbdinfo", "--json", tlsURI(ts.tcp, "disk0", f.good))
	var info struct {
		TLS     bool `json:"TLS"`
		Exports []struct {
			Name string `json:"export-name"`
			Size int64  `json:"export-size"`
		} `json:"exports"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("nbdinfo --json: %v\n%s", err, out)
	}
	if !info.TLS || len(info.Exports) != 1 || info.Exports[0].Name != "disk0" || info.Exports[0].Size != 3<<20 {
		t.Fatalf("nbdinfo over TLS: %s", out)
	}
	run(t, "nbdinfo", "--is", "tls", tlsURI(ts.tcp, "disk0", f.good))
	// Structured replies and block status are negotiated inside TLS: the
	// empty disk maps as one hole.
	if out := run(t, "nbdinfo", "--map", tlsURI(ts.tcp, "disk0", f.good)); !strings.Contains(out, "hole,zero") || strings.Contains(out, "data") {
		t.Fatalf("nbdinfo --map over TLS:\n%s", out)
	}
	// --list is answered inside TLS only.
	if out := run(t, "nbdinfo", "--list", tlsURI(ts.tcp, "", f.good)); !strings.Contains(out, "disk0") {
		t.Fatalf("nbdinfo --list over TLS:\n%s", out)
	}

	// Plain: refused (libnbd 1.14 shows NBD_REP_ERR_TLS_REQD as "not
	// supported ... without TLS"; the server logs the reason).
	out, err := runErr(t, "nbdinfo", ts.tcpURI("disk0"))
	if err == nil || !strings.Contains(out, "without TLS") || !strings.Contains(ts.logs.String(), "TLS required") {
		t.Fatalf("plain nbdinfo off loopback: %v\n%s\nserver log:\n%s", err, out, ts.logs.String())
	}
	out, err = runErr(t, "nbdinfo", "--list", ts.tcpURI(""))
	if err == nil || strings.Contains(out, "disk0") {
		t.Fatalf("plain nbdinfo --list off loopback: %v\n%s", err, out)
	}
	for name, dir := range map[string]string{"another CA": f.wrongCA, "no client certificate": f.noCli} {
		if out, err := runErr(t, "nbdinfo", tlsURI(ts.tcp, "disk0", dir)); err == nil {
			t.Errorf("nbdinfo with %s got in:\n%s", name, out)
		}
	}
	// The unix socket stays plain.
	if out := run(t, "nbdinfo", "--json", ts.unixURI("disk0")); !strings.Contains(out, `"TLS": false`) {
		t.Fatalf("nbdinfo on the unix socket:\n%s", out)
	}
}

// TestTLSQemuIO: qemu-io writes and reads an export over TLS with
// tls-creds-x509; the bytes land in the backing file. Without TLS, or with
// a certificate from another CA, qemu-io cannot open it.
func TestTLSQemuIO(t *testing.T) {
	f := newTLSFixture(t)
	ts := startServerWith(t, serverOpts{tls: f.server, offLoopback: true}, exportSpec{Name: "disk0", Size: 8 << 20})
	args := append(qemuTLSArgs(ts.tcp, "disk0", f.good),
		"-c", "write -P 0xa5 0 1M",
		"-c", "aio_write -P 0x5a 2M 512k",
		"-c", "aio_flush",
		"-c", "write -z 4M 64k",
		"-c", "flush",
		"-c", "read -P 0xa5 0 1M",
		"-c", "read -P 0x5a 2M 512k")
	out := run(t, "qemu-io", args...)
	if strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "error") {
		t.Fatalf("qemu-io over TLS:\n%s", out)
	}
	b := readFile(t, ts.files["disk0"])
	checkRange(t, b, 0, 1<<20, 0xa5)
	checkRange(t, b, 2<<20, 512<<10, 0x5a)

	// tls-hostname picks the name the server's certificate must carry (a
	// site's certificate names the site): the right one works, another is
	// refused.
	withHost := func(h string) []string {
		a := qemuTLSArgs(ts.tcp, "disk0", f.good)
		a[len(a)-1] += ",tls-hostname=" + h
		return append(a, "-c", "read -P 0xa5 0 4k")
	}
	run(t, "qemu-io", withHost("site1")...)
	if out, err := runErr(t, "qemu-io", withHost("elsewhere")...); err == nil {
		t.Fatalf("qemu-io with tls-hostname=elsewhere got in:\n%s", out)
	}

	out, err := runErr(t, "qemu-io", "-f", "raw", "-c", "read 0 4k", ts.tcpURI("disk0"))
	if err == nil || !strings.Contains(out, "TLS required") {
		t.Fatalf("plain qemu-io off loopback: %v\n%s", err, out)
	}
	out, err = runErr(t, "qemu-io", append(qemuTLSArgs(ts.tcp, "disk0", f.wrongCA), "-c", "read 0 4k")...)
	if err == nil || strings.Contains(out, "read 4096/4096") {
		t.Fatalf("qemu-io with a certificate from another CA: %v\n%s", err, out)
	}
}
