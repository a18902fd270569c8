package grpc

import (
	"bytes"
	"io"
	"sync"
	"testing"

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
