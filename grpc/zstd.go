package grpc

import (
	"encoding/binary"
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
	encOnce sync.Once
	enc     *zstd.Encoder // EncodeAll is safe for concurrent use
	encErr  error

	writers  sync.Pool // *zstdWriter
	decoders sync.Pool // *zstd.Decoder
}

func (c *zstdCompressor) Name() string { return Compressor }

// zstdWriter collects a whole message and compresses it on Close with
// EncodeAll, writing the result to gRPC in one piece: gRPC's buffer pool
// clears a whole pooled buffer per Write, so many small block writes cost
// more than the compression itself.
type zstdWriter struct {
	w   io.Writer
	src []byte
	dst []byte
	c   *zstdCompressor
}

func (w *zstdWriter) Write(p []byte) (int, error) {
	w.src = append(w.src, p...)
	return len(p), nil
}

func (w *zstdWriter) Close() error {
	if incompressible(w.c.enc, w.src, w.dst[:0]) {
		w.dst = rawFrame(w.src, w.dst[:0])
	} else {
		w.dst = w.c.enc.EncodeAll(w.src, w.dst[:0])
	}
	_, err := w.w.Write(w.dst)
	w.w, w.src = nil, w.src[:0]
	// Do not pin huge buffers in the pool, but keep a full batch's (4 MiB
	// of payload and its framing): growing one afresh for every message
	// costs more than compressing it, the more so as the codec writes a
	// batch in many pieces.
	if cap(w.src) <= 8<<20 {
		w.c.writers.Put(w)
	}
	return err
}

func (c *zstdCompressor) Compress(w io.Writer) (io.WriteCloser, error) {
	c.encOnce.Do(func() {
		// Fastest keeps up with a fast link on one core for typical disk
		// data; replication is bound by the link more often than by ratio.
		c.enc, c.encErr = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest))
	})
	if c.encErr != nil {
		return nil, c.encErr
	}
	if zw, ok := c.writers.Get().(*zstdWriter); ok {
		zw.w = w
		return zw, nil
	}
	return &zstdWriter{w: w, c: c}, nil
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

// sampleSize is how much of a message is compressed to decide whether the
// rest is worth compressing.
const sampleSize = 64 << 10

// incompressible says whether msg (at least 4 samples long) looks like
// already compressed or encrypted data: its first sampleSize bytes shrink
// by less than 5%. Compressing such a message costs CPU on both ends for
// nothing; scratch is a buffer to compress the sample into.
func incompressible(enc *zstd.Encoder, msg, scratch []byte) bool {
	if len(msg) < 4*sampleSize {
		return false
	}
	out := enc.EncodeAll(msg[:sampleSize], scratch)
	return len(out) > sampleSize*95/100
}

// rawFrame appends a zstd frame holding src in raw (stored) blocks: any
// zstd decoder reads it, and it costs one copy, no compression.
func rawFrame(src, dst []byte) []byte {
	const maxBlock = 128 << 10
	// Magic, then a frame header: single segment with an 8-byte content
	// size (so no window descriptor), no checksum, no dictionary.
	dst = append(dst, 0x28, 0xb5, 0x2f, 0xfd, 0xe0)
	dst = binary.LittleEndian.AppendUint64(dst, uint64(len(src)))
	for {
		n := min(len(src), maxBlock)
		last := uint32(0)
		if n == len(src) {
			last = 1
		}
		h := last | 0<<1 | uint32(n)<<3 // block type 0: raw
		dst = append(dst, byte(h), byte(h>>8), byte(h>>16))
		dst = append(dst, src[:n]...)
		src = src[n:]
		if last == 1 {
			return dst
		}
	}
}
