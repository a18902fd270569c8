package nbd

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rebound-dr/rebound/internal/nbdtest"
)

func TestQemuIO(t *testing.T) {
	ts := startServer(t, exportSpec{Name: "disk0", Size: 16 << 20})
	for _, uri := range []string{ts.tcpURI("disk0"), ts.unixURI("disk0")} {
		out := run(t, "qemu-io", "-f", "raw",
			"-c", "write -P 0xab 0 1M",
			"-c", "write -f -P 0xcd 1M 64k",
			"-c", "aio_write -P 0x11 2M 256k",
			"-c", "aio_write -P 0x12 3M 256k",
			"-c", "aio_write -P 0x13 4M 256k",
			"-c", "aio_flush",
			"-c", "write -P 0x77 6M 1M",
			"-c", "discard 6M 512k",
			"-c", "write -P 0x55 8M 1M",
			"-c", "write -z 8M 256k",
			"-c", "flush",
			"-c", "read -P 0xab 0 1M",
			"-c", "read -P 0xcd 1M 64k",
			"-c", "read -P 0x11 2M 256k",
			"-c", "read -P 0x12 3M 256k",
			"-c", "read -P 0x13 4M 256k",
			"-c", "read -P 0 6M 512k",
			"-c", "read -P 0x77 6656k 512k",
			"-c", "read -P 0 8M 256k",
			"-c", "read -P 0x55 8448k 768k",
			uri)
		if strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "error") {
			t.Fatalf("qemu-io on %s:\n%s", uri, out)
		}
		b := readFile(t, ts.files["disk0"])
		checkRange(t, b, 0, 1<<20, 0xab)
		checkRange(t, b, 1<<20, 64<<10, 0xcd)
		checkRange(t, b, 2<<20, 256<<10, 0x11)
		checkRange(t, b, 3<<20, 256<<10, 0x12)
		checkRange(t, b, 4<<20, 256<<10, 0x13)
		checkRange(t, b, 6<<20, 512<<10, 0)
		checkRange(t, b, 6<<20+512<<10, 512<<10, 0x77)
		checkRange(t, b, 8<<20, 256<<10, 0)
		checkRange(t, b, 8<<20+256<<10, 768<<10, 0x55)
	}
	// qemu-io's pattern check must be able to fail against this server.
	out, err := runErr(t, "qemu-io", "-f", "raw", "-c", "read -P 0x99 0 4k", ts.tcpURI("disk0"))
	if err == nil && !strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("wrong pattern verified:\n%s", out)
	}
}

func TestQemuImg(t *testing.T) {
	const size = 24 << 20
	ts := startServer(t, exportSpec{Name: "img", Size: size}, exportSpec{Name: "bench", Size: 8 << 20})
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	randomFile(t, src, size)

	run(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, ts.tcpURI("img"))
	if got, want := fileSHA(t, ts.files["img"]), fileSHA(t, src); got != want {
		t.Fatalf("export sha256 %s != source %s", got, want)
	}
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, ts.unixURI("img"))

	back := filepath.Join(dir, "back.raw")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", ts.unixURI("img"), back)
	if got, want := fileSHA(t, back), fileSHA(t, src); got != want {
		t.Fatalf("copied-out sha256 %s != source %s", got, want)
	}

	// compare must notice a difference through our server.
	other := filepath.Join(dir, "other.raw")
	randomFile(t, other, size)
	if out, err := runErr(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", other, ts.tcpURI("img")); err == nil {
		t.Fatalf("qemu-img compare found no difference:\n%s", out)
	}

	// bench writes its pattern (0xa5 by default) over the first count*size bytes.
	run(t, "qemu-img", "bench", "-w", "-t", "none", "-f", "raw", "-c", "2000", "-d", "16", "-s", "4k",
		"--pattern=0x5a", ts.tcpURI("bench"))
	b := readFile(t, ts.files["bench"])
	checkRange(t, b, 0, 2000*4096, 0x5a)
	checkRange(t, b, 2000*4096, len(b)-2000*4096, 0)
}

func TestNbdinfo(t *testing.T) {
	ts := startServer(t, exportSpec{Name: "alpha", Size: 3 << 20}, exportSpec{Name: "beta", Size: 1 << 20, ReadOnly: true})
	out := run(t, "nbdinfo", "--size", ts.tcpURI("alpha"))
	if strings.TrimSpace(out) != "3145728" {
		t.Fatalf("nbdinfo --size = %q", out)
	}
	out = run(t, "nbdinfo", ts.unixURI("beta"))
	for _, want := range []string{`export="beta"`, "export-size: 1048576", "is_read_only: true", "can_multi_conn: true", "can_fua: true", "description: disk beta"} {
		if !strings.Contains(out, want) {
			t.Errorf("nbdinfo output lacks %q:\n%s", want, out)
		}
	}
	out = run(t, "nbdinfo", "--list", ts.tcpURI(""))
	for _, want := range []string{`export="alpha"`, `export="beta"`} {
		if !strings.Contains(out, want) {
			t.Errorf("nbdinfo --list lacks %q:\n%s", want, out)
		}
	}
	// Unknown export: the client shows our message.
	out, err := runErr(t, "nbdinfo", ts.tcpURI("nope"))
	if err == nil || !strings.Contains(out, "No such file or directory for export: nope") {
		t.Fatalf("nbdinfo on unknown export: err=%v\n%s", err, out)
	}
	out, err = runErr(t, "qemu-io", "-f", "raw", "-c", "read 0 4k", ts.tcpURI("nope"))
	if err == nil || !strings.Contains(out, `no such export "nope" on this rebound site`) {
		t.Fatalf("qemu-io on unknown export: err=%v\n%s", err, out)
	}
}

func TestNbdcopy(t *testing.T) {
	const size = 32 << 20
	ts := startServer(t, exportSpec{Name: "copy", Size: size})
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	data := randomFile(t, src, size)
	run(t, "nbdcopy", "--connections=4", "--requests=16", src, ts.tcpURI("copy"))
	if got, want := fileSHA(t, ts.files["copy"]), fileSHA(t, src); got != want {
		t.Fatalf("export sha256 %s != source %s", got, want)
	}
	back := filepath.Join(dir, "back.raw")
	run(t, "nbdcopy", "--connections=4", ts.unixURI("copy"), back)
	if !bytes.Equal(readFile(t, back), data) {
		t.Fatal("nbdcopy out of the export differs from the source")
	}
}

// TestWriteZeroesNoHole: qemu-io's WRITE_ZEROES with NO_HOLE keeps the raw
// file allocated, without it the range is punched; both read back zero.
func TestWriteZeroesNoHole(t *testing.T) {
	tool(t, "qemu-io")
	ts := startServer(t, exportSpec{Name: "z", Size: 8 << 20})
	nbdtest.CheckZeroes(t, ts.tcpURI("z"), ts.files["z"], 1<<20)
}
