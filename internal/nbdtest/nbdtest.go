// Package nbdtest holds checks of NBD backends with real clients, shared by
// the tests of the packages that implement backends.
package nbdtest

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"unsafe"
)

// AllocatedIn returns the bytes of [off, off+n) of path that the file
// system has allocated (FIEMAP, after a sync of delayed allocation), as
// extents written or unwritten: what SEEK_DATA cannot tell, since it
// reports unwritten extents as holes.
func AllocatedIn(t testing.TB, path string, off, n int64) int64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const (
		fsIocFiemap   = 0xc020660b
		fiemapSync    = 1
		extentLast    = 1
		maxExtents    = 256
		headerSize    = 32
		extentSize    = 56
		extentFlagsAt = 40
	)
	var total int64
	for pos, end := off, off+n; pos < end; {
		buf := make([]byte, headerSize+maxExtents*extentSize)
		binary.NativeEndian.PutUint64(buf[0:], uint64(pos))
		binary.NativeEndian.PutUint64(buf[8:], uint64(end-pos))
		binary.NativeEndian.PutUint32(buf[16:], fiemapSync)
		binary.NativeEndian.PutUint32(buf[24:], maxExtents)
		if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), fsIocFiemap, uintptr(unsafe.Pointer(&buf[0]))); e != 0 {
			t.Fatalf("FIEMAP %s: %v", path, e)
		}
		mapped := int(binary.NativeEndian.Uint32(buf[20:]))
		if mapped == 0 {
			break
		}
		last := false
		for i := range mapped {
			x := buf[headerSize+i*extentSize:]
			lo := int64(binary.NativeEndian.Uint64(x[0:]))
			hi := lo + int64(binary.NativeEndian.Uint64(x[16:]))
			total += max(0, min(hi, end)-max(lo, pos))
			if binary.NativeEndian.Uint32(x[extentFlagsAt:])&extentLast != 0 {
				last = true
			}
			if i == mapped-1 {
				pos = hi
			}
		}
		if last {
			break
		}
	}
	return total
}

// QemuIO runs qemu-io commands against uri and fails the test on any error
// it reports (qemu-io exits 0 after a failed command).
func QemuIO(t testing.TB, uri string, cmds ...string) string {
	t.Helper()
	args := []string{"-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out, err := exec.Command("qemu-io", append(args, uri)...).CombinedOutput()
	if err != nil || bytes.Contains(out, []byte("error")) || bytes.Contains(out, []byte("failed")) {
		t.Fatalf("qemu-io %s: %v\n%s", strings.Join(cmds, "; "), err, out)
	}
	return string(out)
}

// CheckZeroes drives WRITE_ZEROES with and without NBD_CMD_FLAG_NO_HOLE
// through the export at uri with qemu-io ("write -z" sends NO_HOLE, "write
// -z -u" allows unmapping and does not) and checks the allocation of path,
// the file that backs bytes [off, off+3 MiB) of the export at the same
// offsets and must be a hole there at the start:
//   - NO_HOLE over data keeps it allocated, and over a hole provisions it;
//   - without NO_HOLE the backend punches the range out;
//   - every zeroed range reads back as zeroes, through NBD and in path.
func CheckZeroes(t testing.TB, uri, path string, off int64) {
	t.Helper()
	const mib = 1 << 20
	at := func(o int64) string { return fmt.Sprint(off + o) }
	QemuIO(t, uri, "write -P 0x55 "+at(0)+" 1M", "write -P 0x66 "+at(2*mib)+" 1M", "flush")
	alloc := func(o int64) int64 { return AllocatedIn(t, path, off+o, mib) }
	if a, b, h := alloc(0), alloc(2*mib), alloc(mib); a != mib || b != mib || h != 0 {
		t.Fatalf("after writing two MiB around a hole, %d, %d and %d (hole) bytes are allocated", a, b, h)
	}

	QemuIO(t, uri, "write -z "+at(0)+" 1M", "read -P 0 "+at(0)+" 1M")
	if a := alloc(0); a != mib {
		t.Fatalf("WRITE_ZEROES with NO_HOLE over data deallocated it: %d of %d bytes allocated", a, mib)
	}
	QemuIO(t, uri, "write -z "+at(mib)+" 1M", "read -P 0 "+at(mib)+" 1M")
	if a := alloc(mib); a != mib {
		t.Fatalf("WRITE_ZEROES with NO_HOLE over a hole did not provision it: %d of %d bytes allocated", a, mib)
	}
	QemuIO(t, uri, "write -z -u "+at(2*mib)+" 1M", "read -P 0 "+at(2*mib)+" 1M", "read -P 0 "+at(0)+" 3M", "flush")
	if a := alloc(2 * mib); a != 0 {
		t.Fatalf("WRITE_ZEROES without NO_HOLE did not punch: %d bytes still allocated", a)
	}
	if a := alloc(0) + alloc(mib); a != 2*mib {
		t.Fatalf("the NO_HOLE ranges lost their allocation: %d of %d bytes allocated", a, 2*mib)
	}

	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 3*mib)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, make([]byte, len(b))) {
		t.Fatalf("%s holds non-zero bytes in the zeroed range", path)
	}
}
