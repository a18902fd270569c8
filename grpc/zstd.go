package grpc

import (
	"io"
	"sync"

	"github.com/klauspost/compress/zstd"
	"google.golang.org/grpc/encoding"
)

// Compressor is the name of the zstd compressor every Rebound client call
// uses (grpc.UseCompressor). Registering it on import lets servers answer in
// kind.
const Compressor = "zstd"

// maxDecoded bounds what one message may decompress to, against zstd bombs.
// gRPC checks the message size limit too; this bounds the decoder's window.
const maxDecoded = 128 << 20

func init() { encoding.RegisterCompressor(&zstdCompressor{}) }

type zstdCompressor struct {
	encoders sync.Pool // *zstdWriter
	decoders sync.Pool // *zstdReader
}

func (c *zstdCompressor) Name() string { return Compressor }

type zstdWriter struct {
	*zstd.Encoder
	c *zstdCompressor
}

func (w *zstdWriter) Close() error {
	err := w.Encoder.Close()
	w.c.encoders.Put(w)
	return err
}

func (c *zstdCompressor) Compress(w io.Writer) (io.WriteCloser, error) {
	if zw, ok := c.encoders.Get().(*zstdWriter); ok {
		zw.Reset(w)
		return zw, nil
	}
	// Fastest keeps up with a 10 GbE link on one core for typical disk
	// data; replication is bound by the link more often than by ratio.
	enc, err := zstd.NewWriter(w, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1), zstd.WithLowerEncoderMem(true))
	if err != nil {
		return nil, err
	}
	return &zstdWriter{Encoder: enc, c: c}, nil
}

type zstdReader struct {
	*zstd.Decoder
	c *zstdCompressor
}

// Read returns the decoder to the pool once the message is fully read.
func (r *zstdReader) Read(p []byte) (int, error) {
	if r.Decoder == nil {
		return 0, io.EOF
	}
	n, err := r.Decoder.Read(p)
	if err == io.EOF {
		d := r.Decoder
		r.Decoder = nil
		r.c.decoders.Put(d)
	}
	return n, err
}

func (c *zstdCompressor) Decompress(r io.Reader) (io.Reader, error) {
	if d, ok := c.decoders.Get().(*zstd.Decoder); ok {
		if err := d.Reset(r); err != nil {
			return nil, err
		}
		return &zstdReader{Decoder: d, c: c}, nil
	}
	d, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(maxDecoded), zstd.WithDecoderMaxWindow(maxDecoded))
	if err != nil {
		return nil, err
	}
	return &zstdReader{Decoder: d, c: c}, nil
}
