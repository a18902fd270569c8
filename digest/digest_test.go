package digest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/rebound-dr/rebound"
)

// naive is the reference: sha256 of each block, truncated.
func naive(b []byte, blockSize int64) [][]byte {
	var out [][]byte
	for off := int64(0); off < int64(len(b)); off += blockSize {
		s := sha256.Sum256(b[off:min(off+blockSize, int64(len(b)))])
		out = append(out, s[:Size])
	}
	return out
}

func randData(seed uint64, n int) []byte {
	rng := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// sparseFile writes data to a file, leaving its zero 1 MiB chunks as holes.
func sparseFile(t testing.TB, data []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(int64(len(data))); err != nil {
		t.Fatal(err)
	}
	for off := 0; off < len(data); off += 1 << 20 {
		c := data[off:min(off+1<<20, len(data))]
		if allZero(c) {
			continue
		}
		if _, err := f.WriteAt(c, int64(off)); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

func TestDigests(t *testing.T) {
	const size = 13<<20 + 1234 // not whole blocks nor whole chunks
	data := randData(1, size)
	clear(data[1<<20 : 6<<20])        // a hole in the file
	clear(data[10<<20 : 10<<20+8192]) // zero blocks amid data
	path := sparseFile(t, data)
	ctx := context.Background()
	for _, bs := range []int64{4096, 65536, 1000, 4 << 20, 5 << 20} {
		want := naive(data, bs)
		for _, w := range []int{0, 1, 3} {
			got, err := ReaderAt(ctx, bytes.NewReader(data), size, bs, w)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("ReaderAt block %d workers %d differs from the reference", bs, w)
			}
			got, err = File(ctx, path, size, bs, w)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("File block %d workers %d differs from the reference", bs, w)
			}
		}
	}
	// A prefix of the file.
	got, err := File(ctx, path, 5000, 4096, 2)
	if err != nil || !reflect.DeepEqual(got, naive(data[:5000], 4096)) {
		t.Fatalf("prefix: %v", err)
	}
	if got, err := File(ctx, path, 0, 4096, 2); err != nil || len(got) != 0 {
		t.Fatalf("empty: %v %d", err, len(got))
	}
}

func TestDigestErrors(t *testing.T) {
	ctx := context.Background()
	data := randData(2, 10<<20)
	path := sparseFile(t, data)
	if _, err := File(ctx, path, 11<<20, 4096, 0); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("file shorter than size: %v", err)
	}
	if _, err := File(ctx, filepath.Join(t.TempDir(), "none"), 1, 4096, 0); err == nil {
		t.Fatal("missing file")
	}
	for _, bs := range []int64{0, -1, MaxBlockSize + 1} {
		if _, err := ReaderAt(ctx, bytes.NewReader(data), 1<<20, bs, 0); rebound.ErrorCode(err) != rebound.EINVALID {
			t.Fatalf("block size %d: %v", bs, err)
		}
	}
	if _, err := ReaderAt(ctx, bytes.NewReader(data), int64(len(data))+1, 4096, 0); err == nil {
		t.Fatal("reader shorter than size")
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := File(cctx, path, int64(len(data)), 4096, 2); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled: %v", err)
	}
}

func TestDiff(t *testing.T) {
	const size = 3<<20 + 100
	a := randData(3, size)
	b := append([]byte(nil), a...)
	b[5] ^= 1                             // block 0
	b[4096*10+7] ^= 1                     // block 10
	b[4096*11] ^= 1                       // block 11: merged with 10
	b[size-1] ^= 1                        // the short last block
	copy(b[1<<20:], make([]byte, 3*4096)) // blocks 256..258
	ctx := context.Background()
	da, _ := ReaderAt(ctx, bytes.NewReader(a), size, 4096, 0)
	db, _ := ReaderAt(ctx, bytes.NewReader(b), size, 4096, 0)
	got := Diff(da, db, 4096, size)
	last := int64(size) / 4096 * 4096
	want := []rebound.Region{{Offset: 0, Length: 4096}, {Offset: 10 * 4096, Length: 2 * 4096}, {Offset: 1 << 20, Length: 3 * 4096}, {Offset: last, Length: size - last}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("diff:\n got %v\nwant %v", got, want)
	}
	if d := Diff(da, da, 4096, size); len(d) != 0 {
		t.Fatalf("self diff %v", d)
	}
	// One side shorter: the rest differs.
	got = Diff(da[:100], da, 4096, size)
	if !reflect.DeepEqual(got, []rebound.Region{{Offset: 100 * 4096, Length: size - 100*4096}}) {
		t.Fatalf("short side: %v", got)
	}
}

// BenchmarkFile1G digests a 1 GiB file of random data (in the page cache
// after the first pass) at 4 KiB blocks.
func BenchmarkFile1G(b *testing.B) {
	benchFile(b, false)
}

// BenchmarkFile1GSparse: the same file size, mostly holes.
func BenchmarkFile1GSparse(b *testing.B) {
	benchFile(b, true)
}

func benchFile(b *testing.B, sparse bool) {
	const size = 1 << 30
	p := filepath.Join(b.TempDir(), "disk")
	f, err := os.Create(p)
	if err != nil {
		b.Fatal(err)
	}
	f.Truncate(size)
	chunk := randData(9, 4<<20)
	for off := int64(0); off < size; off += int64(len(chunk)) {
		if sparse && off%(64<<20) != 0 {
			continue
		}
		chunk[0]++
		if _, err := f.WriteAt(chunk, off); err != nil {
			b.Fatal(err)
		}
	}
	f.Close()
	b.SetBytes(size)
	b.ResetTimer()
	for range b.N {
		if _, err := File(context.Background(), p, size, 4096, 0); err != nil {
			b.Fatal(err)
		}
	}
}

// TestHoleTail: a file ending in a hole with a short last block; the hole
// chunks are digested without reading and must match the reference.
func TestHoleTail(t *testing.T) {
	const size = 9<<20 + 100
	data := make([]byte, size)
	copy(data, randData(5, 3<<20))
	path := sparseFile(t, data)
	for _, bs := range []int64{4096, 1 << 20, 3000} {
		got, err := File(context.Background(), path, size, bs, 2)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, naive(data, bs)) {
			t.Fatalf("block %d: digests of a hole tail differ from the reference", bs)
		}
	}
}
