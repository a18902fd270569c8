// Package digest computes fixed-block digests of a disk, fast: each worker
// preads large chunks into a pooled buffer and hashes its blocks, file holes
// and all-zero blocks are not hashed at all. Two sites compare the digests
// of their copies of a disk to find the regions that differ (reprotect with
// Verify, or without change tracking). See docs/design/resync.md.
package digest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/rebound-dr/rebound"
)

// Size is the bytes of one block digest: sha256 truncated to 128 bits,
// plenty against accidental collisions for any disk size.
const Size = 16

// chunkSize is how much one worker reads with one pread (or one block,
// if blocks are larger).
const chunkSize = 4 << 20

// MaxBlockSize bounds the block size (a worker's buffer holds a block).
const MaxBlockSize = 64 << 20

var bufPool = sync.Pool{New: func() any { b := make([]byte, chunkSize); return &b }}

// seekData is lseek's SEEK_DATA whence.
const seekData = 3

// File returns the digest of every blockSize block of the first size bytes
// of the file at path (the last block may be short). Runs of the file that
// are holes are not read. workers <= 0 means GOMAXPROCS.
func File(ctx context.Context, path string, size, blockSize int64, workers int) ([][]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("digest: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("digest: %w", err)
	}
	if fi.Size() < size {
		return nil, rebound.Errorf(rebound.EINVALID, "digest: %s has %d bytes, fewer than %d", path, fi.Size(), size)
	}
	return digest(ctx, f, size, blockSize, workers, func(off, end int64) bool {
		n, err := syscall.Seek(int(f.Fd()), off, seekData)
		if errors.Is(err, syscall.ENXIO) {
			return true // no data at or after off
		}
		return err == nil && n >= end
	})
}

// ReaderAt returns the digest of every blockSize block of the first size
// bytes of r (the last block may be short). workers <= 0 means GOMAXPROCS.
func ReaderAt(ctx context.Context, r io.ReaderAt, size, blockSize int64, workers int) ([][]byte, error) {
	return digest(ctx, r, size, blockSize, workers, nil)
}

// digest splits [0, size) into chunks of whole blocks; workers take chunks
// in order from a counter, so reads stay mostly sequential. hole, if set,
// reports that [off, end) is a file hole (reads as zeroes).
func digest(ctx context.Context, r io.ReaderAt, size, blockSize int64, workers int, hole func(off, end int64) bool) ([][]byte, error) {
	if blockSize <= 0 || blockSize > MaxBlockSize {
		return nil, rebound.Errorf(rebound.EINVALID, "digest: block size %d is not in 1..%d", blockSize, MaxBlockSize)
	}
	if size < 0 {
		return nil, rebound.Errorf(rebound.EINVALID, "digest: invalid size %d", size)
	}
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	nblocks := (size + blockSize - 1) / blockSize
	sums := make([][]byte, nblocks)
	backing := make([]byte, nblocks*Size)
	for i := range sums {
		sums[i] = backing[i*Size : (i+1)*Size : (i+1)*Size]
	}
	if nblocks == 0 {
		return sums, nil
	}
	zero := zeroSum(blockSize)
	chunk := max(chunkSize/blockSize, 1) * blockSize
	nchunks := (size + chunk - 1) / chunk
	workers = int(min(int64(workers), nchunks))

	var next atomic.Int64
	var once sync.Once
	var firstErr error
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	fail := func(err error) {
		once.Do(func() { firstErr = err; cancel() })
	}
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var bp *[]byte
			if chunk <= chunkSize {
				bp = bufPool.Get().(*[]byte)
				defer bufPool.Put(bp)
			} else {
				b := make([]byte, chunk)
				bp = &b
			}
			for {
				c := next.Add(1) - 1
				if c >= nchunks {
					return
				}
				if err := ctx.Err(); err != nil {
					fail(err)
					return
				}
				off := c * chunk
				end := min(off+chunk, size)
				first := off / blockSize
				if hole != nil && hole(off, end) {
					fillZero(sums, first, off, end, blockSize, size, zero)
					continue
				}
				buf := (*bp)[:end-off]
				if n, err := r.ReadAt(buf, off); n < len(buf) {
					if err == nil || err == io.EOF {
						err = io.ErrUnexpectedEOF
					}
					fail(fmt.Errorf("digest: read %d bytes at %d: %w", len(buf), off, err))
					return
				}
				for b := int64(0); b*blockSize < int64(len(buf)); b++ {
					blk := buf[b*blockSize : min((b+1)*blockSize, int64(len(buf)))]
					dst := sums[first+b]
					if int64(len(blk)) == blockSize && allZero(blk) {
						copy(dst, zero)
						continue
					}
					s := sha256.Sum256(blk)
					copy(dst, s[:Size])
				}
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return nil, firstErr
	}
	return sums, nil
}

// fillZero sets the digests of the blocks of a hole [off, end).
func fillZero(sums [][]byte, first, off, end, blockSize, size int64, zero []byte) {
	for b := first; b*blockSize < end; b++ {
		if n := min((b+1)*blockSize, size) - b*blockSize; n < blockSize {
			s := sha256.Sum256(make([]byte, n)) // the short last block
			copy(sums[b], s[:Size])
			continue
		}
		copy(sums[b], zero)
	}
}

var zeroes = make([]byte, 1<<20)

func zeroSum(blockSize int64) []byte {
	h := sha256.New()
	for n := blockSize; n > 0; n -= int64(len(zeroes)) {
		h.Write(zeroes[:min(n, int64(len(zeroes)))])
	}
	return h.Sum(nil)[:Size]
}

// allZero reports whether b is all zero bytes; bytes.Equal is vectorized
// and returns at the first difference, so data blocks cost next to nothing.
func allZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeroes))
		if !bytes.Equal(b[:n], zeroes[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

// Diff returns the merged regions of blocks whose digests differ, or that
// exist on one side only, clipped to size (when size > 0).
func Diff(a, b [][]byte, blockSize, size int64) []rebound.Region {
	var out []rebound.Region
	n := max(len(a), len(b))
	for i := 0; i < n; i++ {
		if i < len(a) && i < len(b) && bytes.Equal(a[i], b[i]) {
			continue
		}
		off := int64(i) * blockSize
		end := off + blockSize
		if size > 0 {
			if off >= size {
				break
			}
			end = min(end, size)
		}
		if k := len(out) - 1; k >= 0 && out[k].Offset+out[k].Length == off {
			out[k].Length = end - out[k].Offset
			continue
		}
		out = append(out, rebound.Region{Offset: off, Length: end - off})
	}
	return out
}
