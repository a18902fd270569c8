package grpc

import (
	"bytes"
	"io"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/klauspost/compress/zstd"
	"google.golang.org/grpc/encoding"
)

func TestZstd_RoundTrip(t *testing.T) {
	c := encoding.GetCompressor(Compressor)
	if c == nil {
		t.Fatal("zstd compressor not registered")
	}
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for _, n := range []int{0, 1, 1000, 64 << 10, 3 << 20} {
				in := semiCompressible(n, uint64(g*n))
				var buf bytes.Buffer
				w, err := c.Compress(&buf)
				if err != nil {
					t.Error(err)
					return
				}
				w.Write(in[:n/2])
				w.Write(in[n/2:])
				if err := w.Close(); err != nil {
					t.Error(err)
					return
				}
				if n >= 64<<10 && buf.Len() > n*3/4 {
					t.Errorf("%d bytes compressed to %d", n, buf.Len())
				}
				r, err := c.Decompress(&buf)
				if err != nil {
					t.Error(err)
					return
				}
				out, err := io.ReadAll(r)
				if err != nil || !bytes.Equal(in, out) {
					t.Errorf("size %d: round trip differs (err %v, got %d bytes)", n, err, len(out))
				}
			}
		}(g)
	}
	wg.Wait()

	// Garbage is an error, and the pool keeps working afterwards.
	r, err := c.Decompress(bytes.NewReader([]byte("this is not zstd at all")))
	if err == nil {
		_, err = io.ReadAll(r)
	}
	if err == nil {
		t.Fatal("garbage decompressed")
	}
}

// A message whose sample does not compress (random bytes, like encrypted
// or already compressed disk data) is sent in raw zstd blocks: barely
// larger than itself, and any zstd decoder reads it back.
func TestZstd_IncompressibleStoredRaw(t *testing.T) {
	c := encoding.GetCompressor(Compressor)
	rng := rand.New(rand.NewPCG(9, 10))
	for _, n := range []int{4 * sampleSize, 128 << 10 * 3, 3<<20 + 17} {
		in := make([]byte, n)
		for i := range in {
			in[i] = byte(rng.Uint32())
		}
		var buf bytes.Buffer
		w, err := c.Compress(&buf)
		if err != nil {
			t.Fatal(err)
		}
		w.Write(in)
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		raw := rawFrame(in, nil)
		if !bytes.Equal(buf.Bytes(), raw) {
			t.Fatalf("%d random bytes were not stored raw (%d bytes, raw frame %d)", n, buf.Len(), len(raw))
		}
		for _, dec := range []func() (io.Reader, error){
			func() (io.Reader, error) { return c.Decompress(bytes.NewReader(raw)) },
			func() (io.Reader, error) { return zstd.NewReader(bytes.NewReader(raw)) },
		} {
			r, err := dec()
			if err != nil {
				t.Fatal(err)
			}
			out, err := io.ReadAll(r)
			if err != nil || !bytes.Equal(out, in) {
				t.Fatalf("%d bytes: raw frame reads back differently (err %v, %d bytes)", n, err, len(out))
			}
		}
	}
	if out, err := zstdDecodeAll(rawFrame(nil, nil)); err != nil || len(out) != 0 {
		t.Fatalf("empty raw frame: %v, %d bytes", err, len(out))
	}
}

func zstdDecodeAll(b []byte) ([]byte, error) {
	d, err := zstd.NewReader(nil)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	return d.DecodeAll(b, nil)
}
