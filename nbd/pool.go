package nbd

import (
	"math/bits"
	"net"
	"sync"
	"sync/atomic"
)

// Buffers are pooled in power-of-two classes from 4 KiB to MaxPayload so a
// steady stream of requests allocates nothing.
const minClassShift = 12

var pools [25 - minClassShift + 1]sync.Pool // up to 1<<25 == MaxPayload

func classOf(n int) int {
	if n <= 1<<minClassShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minClassShift
}

// getBuf returns a buffer of length n (n <= MaxPayload).
func getBuf(n int) *[]byte {
	c := classOf(n)
	if p, ok := pools[c].Get().(*[]byte); ok {
		*p = (*p)[:n]
		return p
	}
	b := make([]byte, n, 1<<(c+minClassShift))
	return &b
}

func putBuf(p *[]byte) {
	if p == nil || cap(*p) > MaxPayload {
		return
	}
	c := classOf(cap(*p))
	if cap(*p) != 1<<(c+minClassShift) {
		return
	}
	pools[c].Put(p)
}

// batchWriter writes messages (a header and an optional payload) from many
// goroutines to one connection. Small messages are coalesced: the last
// writer of a burst flushes, so N replies ready at once cost one syscall.
type batchWriter struct {
	w       net.Conn
	waiting atomic.Int32
	mu      sync.Mutex
	buf     []byte
	vec     [2][]byte
	err     error
}

const (
	inlinePayload = 64 << 10  // payloads up to this are copied into buf
	flushAt       = 256 << 10 // flush early past this much buffered
)

func (b *batchWriter) write(hdr, data []byte) error {
	b.waiting.Add(1)
	b.mu.Lock()
	defer b.mu.Unlock()
	last := b.waiting.Add(-1) == 0
	if b.err != nil {
		return b.err
	}
	b.buf = append(b.buf, hdr...)
	if len(data) > inlinePayload {
		b.vec = [2][]byte{b.buf, data}
		bufs := net.Buffers(b.vec[:])
		_, err := bufs.WriteTo(b.w)
		b.vec = [2][]byte{}
		b.buf = b.buf[:0]
		b.err = err
		return err
	}
	b.buf = append(b.buf, data...)
	if last || len(b.buf) >= flushAt {
		_, err := b.w.Write(b.buf)
		b.buf = b.buf[:0]
		b.err = err
	}
	return b.err
}

// flush writes anything buffered.
func (b *batchWriter) flush() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.err == nil && len(b.buf) > 0 {
		_, b.err = b.w.Write(b.buf)
		b.buf = b.buf[:0]
	}
	return b.err
}
