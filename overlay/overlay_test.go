package overlay

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

const testSize = 1<<20 + 1234 // not a whole number of blocks

func randBase(seed uint64, size int) []byte {
	rng := rand.New(rand.NewPCG(seed, 0))
	b := make([]byte, size)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	// Some zero stretches so flatten punches holes too.
	clear(b[100000:300000])
	return b
}

// op is one random mutation, applied identically to the disk and model.
type op struct {
	kind int // 0 write, 1 zeroes, 2 trim
	off  int64
	data []byte
	n    int64
}

func randOp(rng *rand.Rand, size int64) op {
	var n int64
	switch rng.IntN(4) {
	case 0:
		n = 1 + rng.Int64N(50)
	case 1:
		n = BlockSize * (1 + rng.Int64N(8))
	default:
		n = 1 + rng.Int64N(300000)
	}
	n = min(n, size)
	off := rng.Int64N(size - n + 1)
	if rng.IntN(2) == 0 {
		off &^= BlockSize - 1
	}
	o := op{kind: rng.IntN(5), off: off, n: n}
	if o.kind > 2 {
		o.kind = 0
	}
	if o.kind == 0 {
		o.data = make([]byte, n)
		for i := range o.data {
			o.data[i] = byte(rng.Uint32() | 1)
		}
	}
	return o
}

func (o op) apply(t testing.TB, d *Disk, model []byte) {
	var err error
	switch o.kind {
	case 0:
		_, err = d.WriteAt(o.data, o.off)
		copy(model[o.off:], o.data)
	case 1:
		err = d.WriteZeroes(o.off, o.n)
		clear(model[o.off : o.off+o.n])
	case 2:
		err = d.Trim(o.off, o.n)
		clear(model[o.off : o.off+o.n])
	}
	if err != nil {
		t.Fatal(err)
	}
}

func readAll(t testing.TB, d interface {
	ReadAt([]byte, int64) (int, error)
}, size int64, rng *rand.Rand) []byte {
	t.Helper()
	out := make([]byte, size)
	for off := int64(0); off < size; {
		n := min(1+rng.Int64N(200000), size-off)
		got, err := d.ReadAt(out[off:off+n], off)
		if err != nil && !(err == io.EOF && off+int64(got) == size) {
			t.Fatalf("ReadAt(%d, %d): %v", n, off, err)
		}
		off += int64(got)
	}
	return out
}

func TestModel(t *testing.T) {
	baseData := randBase(1, testSize)
	model := append([]byte(nil), baseData...)
	path := filepath.Join(t.TempDir(), "disk")
	d, err := Open(path, bytes.NewReader(baseData), testSize)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(2, 3))
	if !bytes.Equal(readAll(t, d, testSize, rng), model) {
		t.Fatal("fresh overlay differs from base")
	}
	for i := 0; i < 400; i++ {
		randOp(rng, testSize).apply(t, d, model)
		if i%20 == 0 {
			off := rng.Int64N(testSize)
			n := min(1+rng.Int64N(100000), testSize-off)
			p := make([]byte, n)
			if _, err := d.ReadAt(p, off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(p, model[off:off+n]) {
				t.Fatalf("op %d: read %d+%d differs", i, off, n)
			}
		}
	}
	if !bytes.Equal(readAll(t, d, testSize, rng), model) {
		t.Fatal("overlay differs from model")
	}
	// Out of range and a short read at the end.
	if _, err := d.WriteAt([]byte{1, 2}, testSize-1); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("write past end: %v", err)
	}
	if err := d.WriteZeroes(-1, 2); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("zero at -1: %v", err)
	}
	p := make([]byte, 10)
	if n, err := d.ReadAt(p, testSize-4); n != 4 || err != io.EOF || !bytes.Equal(p[:4], model[testSize-4:]) {
		t.Fatalf("read at end: %d %v", n, err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := d.ReadAt(p, 0); err == nil {
		t.Fatal("read after close")
	}
	d, err = Open(path, bytes.NewReader(baseData), testSize)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if !bytes.Equal(readAll(t, d, testSize, rng), model) {
		t.Fatal("reopened overlay differs from model")
	}
	if _, err := Open(filepath.Join(t.TempDir(), "x"), bytes.NewReader(baseData), testSize-1); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("size mismatch: %v", err)
	}
}

// failBase fails every read: after Flatten nothing may need the base.
type failBase struct{ size int64 }

func (f failBase) Size() int64 { return f.size }
func (f failBase) ReadAt([]byte, int64) (int, error) {
	return 0, errors.New("base must not be read")
}

func TestFlatten(t *testing.T) {
	baseData := randBase(4, testSize)
	model := append([]byte(nil), baseData...)
	path := filepath.Join(t.TempDir(), "disk")
	d, err := Open(path, bytes.NewReader(baseData), testSize)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(5, 6))
	for i := 0; i < 50; i++ {
		randOp(rng, testSize).apply(t, d, model)
	}
	// Writes go on while flattening.
	var mu sync.Mutex
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		r := rand.New(rand.NewPCG(7, 8))
		for {
			select {
			case <-stop:
				return
			default:
			}
			mu.Lock()
			randOp(r, testSize).apply(t, d, model)
			mu.Unlock()
		}
	}()
	var calls int
	var last int64
	err = d.Flatten(context.Background(), func(done, total int64) {
		calls++
		if done < last || total != testSize {
			t.Errorf("progress %d/%d after %d", done, total, last)
		}
		last = done
	})
	close(stop)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if last != testSize || calls == 0 {
		t.Fatalf("progress ended at %d", last)
	}
	if d.Present() != testSize {
		t.Fatalf("present %d after flatten", d.Present())
	}
	if !bytes.Equal(readAll(t, d, testSize, rng), model) {
		t.Fatal("flattened overlay differs from model")
	}
	d.Close()
	// The data file alone is the disk.
	raw, _ := os.ReadFile(path)
	if !bytes.Equal(raw, model) {
		t.Fatal("data file is not the disk after flatten")
	}
	d, err = Open(path, failBase{testSize}, testSize)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if !bytes.Equal(readAll(t, d, testSize, rng), model) {
		t.Fatal("flattened overlay read the base")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := d.Flatten(ctx, nil); err != nil && !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
}

// The kill test runs writes in a child process, SIGKILLs it mid-stream and
// checks every acknowledged write survived.
const childEnv = "OVERLAY_KILL_CHILD"

func TestKillChild(t *testing.T) {
	path := os.Getenv(childEnv)
	if path == "" {
		return // only meaningful as TestKill's child
	}
	baseData := randBase(9, testSize)
	d, err := Open(path, bytes.NewReader(baseData), testSize)
	if err != nil {
		fmt.Println("error", err)
		os.Exit(1)
	}
	rng := rand.New(rand.NewPCG(10, 11))
	model := make([]byte, testSize)
	w := bufio.NewWriter(os.Stdout)
	for i := 0; ; i++ {
		randOp(rng, testSize).apply(t, d, model)
		fmt.Fprintln(w, i) // acknowledged
		w.Flush()
	}
}

func TestKill(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "disk")
	cmd := exec.Command(os.Args[0], "-test.run=^TestKillChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), childEnv+"="+path)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(out)
	acked := -1
	deadline := time.Now().Add(20 * time.Second)
	for sc.Scan() {
		n, err := strconv.Atoi(sc.Text())
		if err != nil {
			t.Fatalf("child: %s", sc.Text())
		}
		acked = n
		if acked >= 300 || time.Now().After(deadline) {
			break
		}
	}
	cmd.Process.Signal(syscall.SIGKILL)
	// Writes the child made after our last read are acknowledged too;
	// drain them so acked is the child's true last ack.
	for sc.Scan() {
		if n, err := strconv.Atoi(sc.Text()); err == nil {
			acked = n
		}
	}
	cmd.Wait()
	if acked < 50 {
		t.Fatalf("child acknowledged only %d writes", acked)
	}
	// Rebuild the expected state: writes 0..acked surely, write acked+1
	// maybe in part (it may have been in flight).
	baseData := randBase(9, testSize)
	rng := rand.New(rand.NewPCG(10, 11))
	want := append([]byte(nil), baseData...)
	apply := func(o op, m []byte) {
		switch o.kind {
		case 0:
			copy(m[o.off:], o.data)
		default:
			clear(m[o.off : o.off+o.n])
		}
	}
	for i := 0; i <= acked; i++ {
		apply(randOp(rng, testSize), want)
	}
	next := randOp(rng, testSize)
	maybe := append([]byte(nil), want...)
	apply(next, maybe)

	d, err := Open(path, bytes.NewReader(baseData), testSize)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	got := readAll(t, d, testSize, rng)
	for i := range got {
		if got[i] != want[i] && got[i] != maybe[i] {
			t.Fatalf("after kill at ack %d: byte %d is %d, want %d", acked, i, got[i], want[i])
		}
	}
	t.Logf("killed after %d acknowledged writes; all present", acked+1)
}
