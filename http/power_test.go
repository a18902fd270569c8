package http

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/rebound-dr/rebound"
)

func vmMachine() *rebound.Machine {
	m := testMachine()
	m.Driver = rebound.DriverQEMU
	m.VM = &rebound.VMSpec{CPUs: 2, MemoryMiB: 512, Kernel: "/srv/guest/vmlinux", Initrd: "/srv/guest/initramfs.cpio.gz",
		Append: "console=ttyS0 quiet", Network: "lan"}
	m.VMStatus = &rebound.VMStatus{Running: true, Accel: "tcg", PID: 4242, Network: "br-lan"}
	return m
}

// binaryConsole is every byte value, invalid UTF-8, NULs and CRLFs: what a
// serial line may carry.
func binaryConsole() []byte {
	var b bytes.Buffer
	b.WriteString("SeaBIOS\r\n\x1b[2J")
	for i := range 256 {
		b.WriteByte(byte(i))
	}
	b.Write([]byte{0xff, 0xfe, 0xc3, 0x28, 0x00, 0x00, '\r', '\n'})
	b.WriteString("rebound-guest: verdict OK 1234 records\n")
	return b.Bytes()
}

func TestPowerRoundTrip(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	c, f := e.client, e.fake
	f.job = testJob()
	f.job.Type = "start"

	j, err := c.StartMachine(ctx, "web/1 ?x")
	if err != nil {
		t.Fatal(err)
	}
	same(t, j, f.job)
	check(t, f, "StartMachine", "web/1 ?x")
	j, err = c.StopMachine(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	same(t, j, f.job)
	check(t, f, "StopMachine", "web")

	f.console = binaryConsole()
	b, err := c.Console(ctx, "web", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, f.console) {
		t.Fatalf("console bytes differ:\n got %q\nwant %q", b, f.console)
	}
	check(t, f, "Console", "web", 1<<20)
	// No tail: the server's default reaches the service.
	if _, err := c.Console(ctx, "web", 0); err != nil {
		t.Fatal(err)
	}
	check(t, f, "Console", "web", DefaultConsoleTail)
	// The answer never exceeds the tail, even when the service sends more.
	b, err = c.Console(ctx, "web", 10)
	if err != nil || string(b) != "4 records\n" {
		t.Fatalf("tail 10: %q %v", b, err)
	}
	// Nothing logged yet: empty, not an error.
	f.console = nil
	if b, err := c.Console(ctx, "web", 0); err != nil || b == nil || len(b) != 0 {
		t.Fatalf("empty console: %q %v", b, err)
	}

	// The wire form: text/plain bytes, not JSON.
	f.console = []byte("hello\x00\xff")
	st, h, _, body := e.raw(t, "GET", "/api/v1/machines/web/console?tail=4194304", "Bearer "+testToken, "", nil)
	if st != 200 || !strings.HasPrefix(h.Get("Content-Type"), "text/plain") || string(body) != "hello\x00\xff" ||
		h.Get("Content-Length") != "7" || h.Get("X-Content-Type-Options") != "nosniff" {
		t.Fatalf("raw console: %d %v %q", st, h, body)
	}
	check(t, f, "Console", "web", MaxConsoleTail)

	// The largest tail round trips byte for byte.
	f.console = make([]byte, MaxConsoleTail)
	rand.Read(f.console)
	b, err = c.Console(ctx, "web", MaxConsoleTail)
	if err != nil || sha256.Sum256(b) != sha256.Sum256(f.console) {
		t.Fatalf("4 MiB console: %d bytes, %v", len(b), err)
	}

	// Machines carry their VM spec and status; creation its VM and imports.
	f.machine = vmMachine()
	m, err := c.GetMachine(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	same(t, m, f.machine)
	req := rebound.CreateMachineRequest{Name: "vm1", Site: "a", Driver: rebound.DriverQEMU, Disks: []int64{0, 1 << 30},
		Import: []string{"/srv/images/debian.qcow2", ""}, VM: f.machine.VM}
	if _, err := c.CreateMachine(ctx, req); err != nil {
		t.Fatal(err)
	}
	check(t, f, "CreateMachine", req)

	// Error codes survive.
	for _, code := range []string{rebound.ENOTFOUND, rebound.ECONFLICT, rebound.EUNAVAILABLE} {
		f.err = rebound.Errorf(code, "machine web: %s", code)
		if _, err := c.StartMachine(ctx, "web"); rebound.ErrorCode(err) != code || err.Error() != "machine web: "+code {
			t.Fatalf("start %s: %v", code, err)
		}
		if _, err := c.StopMachine(ctx, "web"); rebound.ErrorCode(err) != code {
			t.Fatalf("stop %s: %v", code, err)
		}
		if b, err := c.Console(ctx, "web", 0); rebound.ErrorCode(err) != code || b != nil {
			t.Fatalf("console %s: %q %v", code, b, err)
		}
	}
}

func TestPowerBadRequests(t *testing.T) {
	e := newEnv(t)
	auth := "Bearer " + testToken
	e.fake.job, e.fake.console = testJob(), []byte("x")
	for _, tc := range []struct {
		name, method, path string
		status             int
		msg                string
	}{
		{"tail word", "GET", "/api/v1/machines/web/console?tail=all", 400, `not "all"`},
		{"tail empty", "GET", "/api/v1/machines/web/console?tail=", 400, `not ""`},
		{"tail zero", "GET", "/api/v1/machines/web/console?tail=0", 400, "from 1 to 4194304"},
		{"tail negative", "GET", "/api/v1/machines/web/console?tail=-5", 400, "from 1 to 4194304"},
		{"tail too big", "GET", "/api/v1/machines/web/console?tail=4194305", 400, `not "4194305"`},
		{"tail size suffix", "GET", "/api/v1/machines/web/console?tail=64K", 400, `not "64K"`},
		{"start by GET", "GET", "/api/v1/machines/web/start", 405, "method GET is not allowed"},
		{"console by POST", "POST", "/api/v1/machines/web/console", 405, "method POST is not allowed"},
	} {
		e.fake.call = ""
		st, _, er, body := e.raw(t, tc.method, tc.path, auth, "", nil)
		if st != tc.status || !strings.Contains(er.Error.Message, tc.msg) {
			t.Errorf("%s: %d %s, want %d containing %q", tc.name, st, body, tc.status, tc.msg)
		}
		if c, _ := e.fake.last(); c != "" {
			t.Errorf("%s: service was called (%s)", tc.name, c)
		}
	}
	// The client refuses an empty name before the network.
	if _, err := e.client.Console(context.Background(), "", 0); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("empty name: %v", err)
	}
	// Unauthenticated requests never reach the PowerService.
	for _, p := range []string{"/api/v1/machines/web/start", "/api/v1/machines/web/stop"} {
		if st, _, _, _ := e.raw(t, "POST", p, "", "", nil); st != 401 {
			t.Fatalf("%s without token: %d", p, st)
		}
	}
	if st, _, er, body := e.raw(t, "GET", "/api/v1/machines/web/console", "Bearer nope", "", nil); st != 401 || er.Error.Code != rebound.EUNAUTHORIZED {
		t.Fatalf("console with a bad token: %d %q", st, body)
	}
	if c, _ := e.fake.last(); c != "" {
		t.Fatalf("called without auth: %s", c)
	}
	// Still serving.
	if b, err := e.client.Console(context.Background(), "web", 0); err != nil || string(b) != "x" {
		t.Fatalf("after bad requests: %q %v", b, err)
	}
}

// TestPowerNotImplemented: a Server without Power answers 501 with a clear
// message on the power routes, and the other routes keep working.
func TestPowerNotImplemented(t *testing.T) {
	f := &fakeService{job: testJob(), console: []byte("x")}
	s := &Server{Service: f, Loop: f, Authenticate: func(context.Context, string) (rebound.Principal, error) {
		return rebound.Principal{User: "admin", Role: rebound.RoleAdmin, Via: "token"}, nil
	}}
	srv := httptest.NewTLSServer(s.Handler())
	defer srv.Close()
	c := &Client{BaseURL: srv.URL, Token: "t", HTTPClient: srv.Client()}
	ctx := context.Background()
	checkErr := func(what string, err error) {
		t.Helper()
		want := what + " is not implemented by this server (it runs no virtual machines)"
		if rebound.ErrorCode(err) != CodeNotImplemented || err.Error() != want {
			t.Fatalf("%s: %q %v", what, rebound.ErrorCode(err), err)
		}
	}
	_, err := c.StartMachine(ctx, "web")
	checkErr("machine start", err)
	_, err = c.StopMachine(ctx, "web")
	checkErr("machine stop", err)
	b, err := c.Console(ctx, "web", 0)
	checkErr("machine console", err)
	if b != nil {
		t.Fatalf("console bytes with an error: %q", b)
	}
	// 501 comes before the tail is checked: the route is not served at all.
	_, err = c.Console(ctx, "web", MaxConsoleTail+1)
	checkErr("machine console", err)
	if c, _ := f.last(); c != "" {
		t.Fatalf("service called: %s", c)
	}
	if _, err := c.Reprotect(ctx, rebound.ReprotectRequest{Machine: "web"}); err != nil {
		t.Fatalf("reprotect without Power: %v", err)
	}
	if _, err := c.Commit(ctx, "web"); err != nil {
		t.Fatalf("commit without Power: %v", err)
	}
	// And the loop's 501 names what it lacks.
	s.Loop = nil
	srv2 := httptest.NewTLSServer(s.Handler())
	defer srv2.Close()
	c.BaseURL, c.HTTPClient = srv2.URL, srv2.Client()
	if _, err := c.Failback(ctx, rebound.FailoverRequest{Machine: "web"}); err == nil ||
		err.Error() != "failback is not implemented by this server (it serves no reprotect, failback or preflight)" {
		t.Fatalf("failback: %v", err)
	}
}
