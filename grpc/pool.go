package grpc

import (
	"math/bits"
	"sync"

	"google.golang.org/grpc/mem"
)

// dirtyPool is the buffer pool of every Rebound connection (NewServer,
// Dial): gRPC's default pool clears each buffer it hands out, which on a
// replication stream is one memclr of every byte received (7% of the
// receiving site's CPU). gRPC fills what it gets before reading it (frames
// are read into it whole), as its own internal dirty pools rely on; the
// bytes a buffer held before never leave this process.
type dirtyPool struct {
	tiers [dirtyPoolMax - dirtyPoolMin + 1]sync.Pool // *[]byte of cap 1<<(min+i)
}

// The tiers: 256 B to 1 MiB, as gRPC's default pool has them.
const (
	dirtyPoolMin = 8
	dirtyPoolMax = 20
)

var bufferPool mem.BufferPool = &dirtyPool{}

// tier returns the tier whose buffers hold n bytes, or -1 when n is over
// the largest (such buffers are made and dropped, not pooled).
func tier(n int) int {
	if n <= 1<<dirtyPoolMin {
		return 0
	}
	e := bits.Len(uint(n - 1)) // 1<<e >= n
	if e > dirtyPoolMax {
		return -1
	}
	return e - dirtyPoolMin
}

func (p *dirtyPool) Get(n int) *[]byte {
	t := tier(n)
	if t < 0 {
		b := make([]byte, n)
		return &b
	}
	if b, ok := p.tiers[t].Get().(*[]byte); ok {
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, 1<<(dirtyPoolMin+t))
	return &b
}

func (p *dirtyPool) Put(b *[]byte) {
	c := cap(*b)
	t := tier(c)
	if t < 0 || c != 1<<(dirtyPoolMin+t) {
		return // not one of ours
	}
	p.tiers[t].Put(b)
}
