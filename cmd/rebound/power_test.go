package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/pem"
	"io"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	rhttp "github.com/rebound-dr/rebound/http"
)

// createFake answers CreateMachine with a machine built from the request
// and keeps the request.
func createFake(got *rebound.CreateMachineRequest) *fakeService {
	return &fakeService{CreateMachineFn: func(req rebound.CreateMachineRequest) (*rebound.Machine, error) {
		*got = req
		m := &rebound.Machine{Name: req.Name, Driver: req.Driver, State: rebound.MachineUnprotected, ActiveSite: req.Site,
			HomeSite: req.Site, Health: rebound.HealthNormal, VM: req.VM, VMStatus: &rebound.VMStatus{}}
		for i, n := range req.Disks {
			m.Disks = append(m.Disks, rebound.Disk{Name: "disk" + string(rune('0'+i)), Size: n})
		}
		return m, nil
	}}
}

func TestMachineCreateVM(t *testing.T) {
	dir, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Chdir(dir)
	for _, tc := range []struct {
		name string
		args []string
		want rebound.CreateMachineRequest
	}{
		{"direct kernel boot", []string{"--driver", "qemu", "--cpus", "2", "--memory", "1G", "--disk", "256M",
			"--kernel", ".guest/vmlinux", "--initrd", ".guest/initramfs.cpio.gz", "--append", "console=ttyS0 rebound.check=1", "--network", "lan"},
			rebound.CreateMachineRequest{Driver: "qemu", Disks: []int64{256 << 20}, VM: &rebound.VMSpec{CPUs: 2, MemoryMiB: 1024,
				Kernel: dir + "/.guest/vmlinux", Initrd: dir + "/.guest/initramfs.cpio.gz", Append: "console=ttyS0 rebound.check=1", Network: "lan"}}},
		{"defaults", []string{"--driver=qemu", "--disk", "1G"},
			rebound.CreateMachineRequest{Driver: "qemu", Disks: []int64{1 << 30}, VM: &rebound.VMSpec{CPUs: 1, MemoryMiB: 256}}},
		// Imports come first whatever the flag order; empty disks follow
		// with "" in Import.
		{"imports first", []string{"--disk", "1G", "--import", "img/a.qcow2", "--driver", "qemu", "--disk", "2G", "--import", "/srv/b.raw", "--memory", "512MiB"},
			rebound.CreateMachineRequest{Driver: "qemu", Disks: []int64{0, 0, 1 << 30, 2 << 30},
				Import: []string{dir + "/img/a.qcow2", "/srv/b.raw", "", ""}, VM: &rebound.VMSpec{CPUs: 1, MemoryMiB: 512}}},
		{"import without a VM", []string{"--import", "a.raw"},
			rebound.CreateMachineRequest{Driver: "none", Disks: []int64{0}, Import: []string{dir + "/a.raw"}}},
		{"kernel alone", []string{"--driver", "qemu", "--disk", "1M", "--kernel", "/boot/vmlinuz"},
			rebound.CreateMachineRequest{Driver: "qemu", Disks: []int64{1 << 20}, VM: &rebound.VMSpec{CPUs: 1, MemoryMiB: 256, Kernel: "/boot/vmlinuz"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got rebound.CreateMachineRequest
			f := createFake(&got)
			r := runCLI(t, f, append([]string{"machine", "create", "vm1", "--site", "a", "-o", "json"}, tc.args...)...)
			wantCode(t, r, 0)
			tc.want.Name, tc.want.Site = "vm1", "a"
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("request\n got %+v %+v\nwant %+v %+v", got, got.VM, tc.want, tc.want.VM)
			}
			m := decode[rebound.Machine](t, r.stdout)
			if !reflect.DeepEqual(m.VM, tc.want.VM) || len(m.Disks) != len(tc.want.Disks) {
				t.Fatalf("json %+v", m)
			}
		})
	}

	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{[]string{"--disk", "1G", "--cpus", "2"}, "--cpus needs --driver qemu"},
		{[]string{"--disk", "1G", "--memory", "1G"}, "--memory needs --driver qemu"},
		{[]string{"--disk", "1G", "--kernel", "k"}, "--kernel needs --driver qemu"},
		{[]string{"--disk", "1G", "--driver", "none", "--initrd", "i"}, "--initrd needs --driver qemu"},
		{[]string{"--disk", "1G", "--append", "quiet"}, "--append needs --driver qemu"},
		{[]string{"--disk", "1G", "--network", "lan"}, "--network needs --driver qemu"},
		{[]string{"--disk", "1G", "--driver", "kvm"}, `--driver must be none or qemu, not "kvm"`},
		{[]string{"--driver", "qemu"}, "at least one --disk SIZE or --import FILE is required"},
		{[]string{"--driver", "qemu", "--disk", "1G", "--cpus", "0"}, "--cpus must be at least 1, not 0"},
		{[]string{"--driver", "qemu", "--disk", "1G", "--cpus", "two"}, "invalid argument"},
		{[]string{"--driver", "qemu", "--disk", "1G", "--memory", "1000"}, "--memory must be a whole number of MiB, not 1000"},
		{[]string{"--driver", "qemu", "--disk", "1G", "--memory", "lots"}, `--memory: invalid size "lots"`},
		{[]string{"--driver", "qemu", "--disk", "1G", "--initrd", "i"}, "--initrd needs --kernel"},
		{[]string{"--driver", "qemu", "--disk", "1G", "--append", "quiet"}, "--append needs --kernel"},
		{[]string{"--driver", "qemu", "--disk", "1G", "--kernel", ""}, "--kernel must not be empty"},
		{[]string{"--driver", "qemu", "--disk", "1G", "--network="}, "--network must not be empty"},
		{[]string{"--import", ""}, "--import must not be empty"},
		{[]string{"--import", "a.raw", "--disk", "0"}, `invalid size "0"`},
	} {
		f := &fakeService{}
		args := append([]string{"machine", "create", "vm1", "--site", "a"}, tc.args...)
		r := runCLI(t, f, args...)
		wantCode(t, r, ExitUsage)
		wantCalls(t, f)
		if !strings.Contains(r.stderr, tc.msg) {
			t.Errorf("%q: stderr %q, want %q", tc.args, r.stderr, tc.msg)
		}
		if r := runCLI(t, f, append(args, "-o", "json")...); r.code != ExitUsage || !strings.Contains(r.stdout, `"code":"invalid"`) {
			t.Errorf("%q -o json: %d %q", tc.args, r.code, r.stdout)
		}
	}
}

func powerFake() *fakeService {
	return &fakeService{
		StartMachineFn: func(name string) (*rebound.Job, error) { return jobFn("start", name), nil },
		StopMachineFn:  func(name string) (*rebound.Job, error) { return jobFn("stop", name), nil },
	}
}

func TestMachineStartStop(t *testing.T) {
	for _, verb := range []string{"start", "stop"} {
		call := map[string]string{"start": "StartMachine", "stop": "StopMachine"}[verb]
		f := powerFake()
		r := runCLI(t, f, "machine", verb, "vm1")
		wantCode(t, r, 0)
		wantCalls(t, f, call+" vm1")
		if !strings.Contains(r.stdout, "j1") || !strings.Contains(r.stdout, verb) || !strings.Contains(r.stdout, "running") {
			t.Fatalf("table:\n%s", r.stdout)
		}
		f.calls = nil
		r = runCLI(t, f, "machine", verb, "vm1", "-o", "json")
		wantCode(t, r, 0)
		wantCalls(t, f, call+" vm1")
		if j := decode[rebound.Job](t, r.stdout); j.ID != "j1" || j.Type != verb || j.Machine != "vm1" {
			t.Fatalf("json %+v", j)
		}

		// --wait follows the job; a failed one exits 1.
		for _, end := range []string{rebound.JobSucceeded, rebound.JobFailed} {
			f = powerFake()
			f.GetJobFn = jobScript(
				rebound.Job{Type: verb, Machine: "vm1", State: rebound.JobRunning, Step: "qemu"},
				rebound.Job{Type: verb, Machine: "vm1", State: end, Step: "qemu", Error: map[string]string{rebound.JobFailed: "qemu exited: status 1"}[end]},
			)
			r = runCLI(t, f, "machine", verb, "vm1", "--wait", "-o", "json")
			if j := decode[rebound.Job](t, r.stdout); j.State != end {
				t.Fatalf("%s --wait: %+v", verb, j)
			}
			if end == rebound.JobSucceeded {
				wantCode(t, r, 0)
			} else {
				wantCode(t, r, ExitFailed)
				if !strings.Contains(r.stderr, "job j1 ("+verb+" vm1) failed: qemu exited: status 1") {
					t.Fatalf("stderr %q", r.stderr)
				}
			}
		}

		// Server refusals keep their exit codes.
		for code, exit := range map[string]int{rebound.ENOTFOUND: ExitNotFound, rebound.ECONFLICT: ExitConflict, rebound.EUNAVAILABLE: ExitUnavailable} {
			f = &fakeService{StartMachineFn: func(string) (*rebound.Job, error) { return nil, rebound.Errorf(code, "machine vm1: %s", code) },
				StopMachineFn: func(string) (*rebound.Job, error) { return nil, rebound.Errorf(code, "machine vm1: %s", code) }}
			r = runCLI(t, f, "machine", verb, "vm1")
			wantCode(t, r, exit)
			if r.stderr != "rebound: machine vm1: "+code+"\n" {
				t.Fatalf("stderr %q", r.stderr)
			}
		}

		for _, args := range [][]string{{"machine", verb}, {"machine", verb, "a", "b"}, {"machine", verb, ""}, {"machine", verb, "a", "--wait=maybe"}} {
			f := powerFake()
			r := runCLI(t, f, args...)
			wantCode(t, r, ExitUsage)
			wantCalls(t, f)
		}
	}
}

func TestMachineConsole(t *testing.T) {
	// Every byte value, invalid UTF-8, NULs and CRLFs, no final newline.
	var log bytes.Buffer
	log.WriteString("SeaBIOS\r\n")
	for i := range 256 {
		log.WriteByte(byte(i))
	}
	log.WriteString("\xff\xfe\x00rebound-guest: verdict OK")
	f := &fakeService{ConsoleFn: func(name string, tail int) ([]byte, error) { return log.Bytes(), nil }}

	r := runCLI(t, f, "machine", "console", "vm1")
	wantCode(t, r, 0)
	wantCalls(t, f, "Console vm1 65536")
	if r.stdout != log.String() || r.stderr != "" {
		t.Fatalf("stdout %q\nstderr %q", r.stdout, r.stderr)
	}
	for tail, want := range map[string]int{"1M": 1 << 20, "4MiB": 4 << 20, "100": 100} {
		f.calls = nil
		wantCode(t, runCLI(t, f, "machine", "console", "vm1", "--tail", tail), 0)
		wantCalls(t, f, "Console vm1 "+strconv.Itoa(want))
	}

	f.calls = nil
	r = runCLI(t, f, "machine", "console", "vm1", "-o", "json")
	wantCode(t, r, 0)
	got := decode[Console](t, r.stdout)
	if got.Machine != "vm1" || !strings.HasPrefix(got.Console, "SeaBIOS\r\n\x00\x01") || !strings.HasSuffix(got.Console, "\ufffd\ufffd\x00rebound-guest: verdict OK") {
		t.Fatalf("json %+v", got)
	}
	// An empty log is empty output, not an error.
	f = &fakeService{ConsoleFn: func(string, int) ([]byte, error) { return nil, nil }}
	if r := runCLI(t, f, "machine", "console", "vm1"); r.code != 0 || r.stdout != "" {
		t.Fatalf("empty: %d %q", r.code, r.stdout)
	}
	if r := runCLI(t, f, "machine", "console", "vm1", "-o", "json"); decode[Console](t, r.stdout) != (Console{Machine: "vm1"}) {
		t.Fatalf("empty json %q", r.stdout)
	}

	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{[]string{"--tail", "5M"}, "--tail must be at most 4MiB, not 5M"},
		{[]string{"--tail", "0"}, "must be positive"},
		{[]string{"--tail", "all"}, `--tail: invalid size "all"`},
		{[]string{"--tail"}, "flag needs an argument"},
		{[]string{"extra"}, `unexpected argument "extra"`},
	} {
		f := &fakeService{}
		r := runCLI(t, f, append([]string{"machine", "console", "vm1"}, tc.args...)...)
		wantCode(t, r, ExitUsage)
		wantCalls(t, f)
		if !strings.Contains(r.stderr, tc.msg) {
			t.Errorf("%q: stderr %q, want %q", tc.args, r.stderr, tc.msg)
		}
	}
	f = &fakeService{ConsoleFn: func(string, int) ([]byte, error) {
		return nil, rebound.Errorf(rebound.ENOTFOUND, `machine "nope" not found`)
	}}
	r = runCLI(t, f, "machine", "console", "nope")
	wantCode(t, r, ExitNotFound)
	if r.stdout != "" {
		t.Fatalf("stdout %q", r.stdout)
	}
}

func vmMachine() *rebound.Machine {
	m := sampleMachine()
	m.Driver, m.TestFailover = rebound.DriverQEMU, nil
	m.VM = &rebound.VMSpec{CPUs: 2, MemoryMiB: 512, Kernel: "/srv/guest/vmlinux", Initrd: "/srv/guest/initramfs.cpio.gz",
		Append: "console=ttyS0 quiet", Network: "lan"}
	m.VMStatus = &rebound.VMStatus{Running: true, Accel: "tcg", PID: 4242, Network: "br-lan"}
	return m
}

func TestMachineShowVM(t *testing.T) {
	m := vmMachine()
	f := &fakeService{GetMachineFn: func(string) (*rebound.Machine, error) { return m, nil }}
	r := runCLI(t, f, "machine", "show", "web1")
	wantCode(t, r, 0)
	wantLines(t, r.stdout,
		"Driver: qemu",
		"VM: 2 CPUs, 512MiB memory, network lan",
		`Boot: kernel /srv/guest/vmlinux, initrd /srv/guest/initramfs.cpio.gz, append "console=ttyS0 quiet"`,
		"Power: running (tcg, pid 4242, network br-lan)")
	r = runCLI(t, f, "machine", "show", "web1", "-o", "json")
	if got := decode[rebound.Machine](t, r.stdout); !reflect.DeepEqual(got.VM, m.VM) || !reflect.DeepEqual(got.VMStatus, m.VMStatus) {
		t.Fatalf("json %+v %+v", got.VM, got.VMStatus)
	}

	// BIOS boot, one CPU, no NIC, stopped; then status unknown.
	m.VM = &rebound.VMSpec{CPUs: 1, MemoryMiB: 256}
	m.VMStatus = &rebound.VMStatus{}
	r = runCLI(t, f, "machine", "show", "web1")
	wantLines(t, r.stdout, "VM: 1 CPU, 256MiB memory, no network", "Boot: BIOS from disk0", "Power: stopped")
	m.VMStatus = nil
	wantLines(t, runCLI(t, f, "machine", "show", "web1").stdout, "Power: -")

	// A machine without a VM shows none of it.
	m = sampleMachine()
	r = runCLI(t, f, "machine", "show", "web1")
	for _, no := range []string{"VM:", "Boot:", "Power:"} {
		if strings.Contains(r.stdout, no) {
			t.Fatalf("table has %q:\n%s", no, r.stdout)
		}
	}

	// The list keeps its columns.
	f = &fakeService{ListMachinesFn: func() ([]rebound.Machine, error) { return []rebound.Machine{*vmMachine()}, nil }}
	r = runCLI(t, f, "machine", "list")
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if len(lines) != 2 || strings.Join(strings.Fields(lines[0]), " ") != "NAME STATE DIRECTION HEALTH LAG/RPO LAST-POINT HOME DISKS" ||
		strings.Join(strings.Fields(lines[1]), " ") != "web1 protected a -> b warning 1.3s - a 4GiB,512MiB" {
		t.Fatalf("list:\n%s", r.stdout)
	}
}

func TestPowerUnsupportedService(t *testing.T) {
	f := powerFake()
	for _, args := range [][]string{{"machine", "start", "vm1"}, {"machine", "stop", "vm1"}, {"machine", "console", "vm1"}} {
		r := runCLI(t, plainService{f}, args...)
		wantCode(t, r, ExitFailed)
		if !strings.Contains(r.stderr, "cannot start or stop machines or read their consoles") {
			t.Fatalf("%q: stderr %q", args, r.stderr)
		}
	}
	wantCalls(t, f)
}

// TestPowerOverHTTP drives the VM verbs through the real REST server and
// client over TLS: the create request and console bytes arrive intact; a
// server without a PowerService makes them exit 1 with its 501 message.
func TestPowerOverHTTP(t *testing.T) {
	var created rebound.CreateMachineRequest
	f := createFake(&created)
	f.StartMachineFn = powerFake().StartMachineFn
	f.StopMachineFn = powerFake().StopMachineFn
	f.GetJobFn = jobScript(rebound.Job{Type: "start", Machine: "vm1", State: rebound.JobSucceeded})
	console := make([]byte, 3<<20)
	rand.Read(console)
	f.ConsoleFn = func(name string, tail int) ([]byte, error) {
		return console[max(0, len(console)-tail):], nil
	}
	auth := func(ctx context.Context, tok string) (rebound.Principal, error) {
		return rebound.Principal{User: "admin", Role: rebound.RoleAdmin, Via: "token"}, nil
	}
	with := httptest.NewTLSServer((&rhttp.Server{Service: f, Loop: f, Power: f, Authenticate: auth}).Handler())
	defer with.Close()
	without := httptest.NewTLSServer((&rhttp.Server{Service: f, Loop: f, Authenticate: auth}).Handler())
	defer without.Close()

	dir := clearEnv(t)
	ca := filepath.Join(dir, "ca.crt")
	os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: with.Certificate().Raw}), 0o644)
	run := func(url string, args ...string) result {
		var out, errb bytes.Buffer
		c := NewCLI(nil, &out, &errb)
		c.PollInterval = time.Millisecond
		c.IsTerminal = func(io.Writer) bool { return false }
		code := c.Run(context.Background(), append(args, "--server", url, "--token", "t", "--ca", ca))
		return result{code, out.String(), errb.String()}
	}

	r := run(with.URL, "machine", "create", "vm1", "--site", "a", "--driver", "qemu", "--import", "/srv/debian.qcow2", "--disk", "64M",
		"--kernel", "/srv/vmlinux", "--append", "console=ttyS0", "--network", "lan", "-o", "json")
	wantCode(t, r, 0)
	want := rebound.CreateMachineRequest{Name: "vm1", Site: "a", Driver: "qemu", Disks: []int64{0, 64 << 20},
		Import: []string{"/srv/debian.qcow2", ""}, VM: &rebound.VMSpec{CPUs: 1, MemoryMiB: 256, Kernel: "/srv/vmlinux", Append: "console=ttyS0", Network: "lan"}}
	if !reflect.DeepEqual(created, want) {
		t.Fatalf("created %+v %+v", created, created.VM)
	}
	if m := decode[rebound.Machine](t, r.stdout); !reflect.DeepEqual(m.VM, want.VM) {
		t.Fatalf("json %+v", m.VM)
	}

	f.calls = nil
	wantCode(t, run(with.URL, "machine", "start", "vm1", "--wait"), 0)
	wantCode(t, run(with.URL, "machine", "stop", "vm1"), 0)
	wantCalls(t, f, "StartMachine vm1", "GetJob j1", "StopMachine vm1")

	// 3 MiB of random bytes, byte for byte, to stdout.
	r = run(with.URL, "machine", "console", "vm1", "--tail", "4M")
	wantCode(t, r, 0)
	if sha256.Sum256([]byte(r.stdout)) != sha256.Sum256(console) {
		t.Fatalf("console: %d bytes differ from the %d sent", len(r.stdout), len(console))
	}
	r = run(with.URL, "machine", "console", "vm1", "--tail", "1K")
	if r.code != 0 || r.stdout != string(console[len(console)-1024:]) {
		t.Fatalf("tail 1K: %d, %d bytes", r.code, len(r.stdout))
	}
	console = []byte("booted\nrebound-guest: verdict OK\n")
	r = run(with.URL, "machine", "console", "vm1", "-o", "json")
	if got := decode[Console](t, r.stdout); got != (Console{Machine: "vm1", Console: string(console)}) {
		t.Fatalf("json %+v", got)
	}

	f.calls = nil
	for _, args := range [][]string{{"machine", "start", "vm1"}, {"machine", "stop", "vm1"}, {"machine", "console", "vm1"}} {
		r := run(without.URL, args...)
		wantCode(t, r, ExitFailed)
		if !strings.Contains(r.stderr, "rebound: machine "+args[1]+" is not implemented by this server (it runs no virtual machines)") {
			t.Fatalf("%q: stderr %q", args, r.stderr)
		}
		r = run(without.URL, append(args, "-o", "json")...)
		if r.code != ExitFailed || !strings.Contains(r.stdout, `"code":"not_implemented"`) {
			t.Fatalf("%q -o json: %d %q", args, r.code, r.stdout)
		}
	}
	wantCalls(t, f)
}

// wantLines checks out has each line, comparing with runs of blanks as one.
func wantLines(t *testing.T, out string, want ...string) {
	t.Helper()
	have := map[string]bool{}
	for _, l := range strings.Split(out, "\n") {
		have[strings.Join(strings.Fields(l), " ")] = true
	}
	for _, w := range want {
		if !have[w] {
			t.Fatalf("table lacks %q:\n%s", w, out)
		}
	}
}
