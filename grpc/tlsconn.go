package grpc

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"syscall"

	"google.golang.org/grpc/credentials"
)

// crypto/tls writes each record (at most 16 KiB) with its own write to the
// socket and reads the socket about a record at a time, so replicating at
// hundreds of MB/s costs tens of thousands of syscalls a second on either
// side. coalescedCreds puts a batchConn under the TLS conn: the records of
// one Write leave in one socket write, and reads fetch up to readBatch
// bytes per syscall. See docs/design/wire.md.
const (
	// writeBatch bounds the plaintext of one coalesced TLS write; a
	// larger Write is cut into pieces of this size.
	writeBatch = 1 << 20
	// writeBufCap holds writeBatch's records with their headers and tags
	// (and the small records of a fresh connection) without an early flush.
	writeBufCap = writeBatch + 64<<10
	readBatch   = 256 << 10
)

// Buffers are pooled and held only while a write or a burst of reads is
// under way, so an idle connection keeps neither.
var (
	writeBufs = sync.Pool{New: func() any { b := make([]byte, 0, writeBufCap); return &b }}
	readBufs  = sync.Pool{New: func() any { b := make([]byte, readBatch); return &b }}
)

// coalescedCreds wraps TLS transport credentials (credentials.NewTLS) so
// that their connections write and read the socket in batches. AuthInfo,
// ALPN and the handshake are the wrapped credentials'.
type coalescedCreds struct {
	credentials.TransportCredentials
}

// coalesceTLS is false only in benchmarks comparing with plain tls.Conn.
var coalesceTLS = true

func coalesced(c credentials.TransportCredentials) credentials.TransportCredentials {
	if !coalesceTLS {
		return c
	}
	return &coalescedCreds{TransportCredentials: c}
}

func (c *coalescedCreds) ClientHandshake(ctx context.Context, authority string, raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	bc := &batchConn{Conn: raw}
	conn, info, err := c.TransportCredentials.ClientHandshake(ctx, authority, bc)
	if err != nil {
		return nil, nil, err
	}
	return &coalescedConn{Conn: conn, bc: bc}, info, nil
}

func (c *coalescedCreds) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	bc := &batchConn{Conn: raw}
	conn, info, err := c.TransportCredentials.ServerHandshake(bc)
	if err != nil {
		return nil, nil, err
	}
	return &coalescedConn{Conn: conn, bc: bc}, info, nil
}

func (c *coalescedCreds) Clone() credentials.TransportCredentials {
	return coalesced(c.TransportCredentials.Clone())
}

// coalescedConn is the TLS conn over a batchConn. Each Write holds the
// batchConn's records back while tls.Conn encrypts, then sends them in one
// socket write before returning: nothing stays buffered after a Write.
type coalescedConn struct {
	net.Conn // the TLS conn
	bc       *batchConn
}

func (c *coalescedConn) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		chunk := p[:min(len(p), writeBatch)]
		c.bc.hold()
		m, err := c.Conn.Write(chunk)
		if ferr := c.bc.release(); ferr != nil && err == nil {
			m, err = 0, ferr // how much of chunk arrived is unknown
		}
		n += m
		if err != nil {
			return n, err
		}
		p = p[len(chunk):]
	}
	return n, nil
}

// Close sends close_notify and closes the socket. A Write in flight may be
// blocked on a full socket; like tls.Conn.Close during a Write, this then
// closes the socket at once instead of queueing close_notify behind it.
func (c *coalescedConn) Close() error {
	if c.bc.holding() {
		return c.bc.Close()
	}
	return c.Conn.Close()
}

// SyscallConn keeps the socket reachable through the wrapper, as grpc-go
// expects of a TCP connection.
func (c *coalescedConn) SyscallConn() (syscall.RawConn, error) { return c.bc.SyscallConn() }

// batchConn is the socket under a TLS conn. Between hold and release it
// collects what tls.Conn writes and release sends it in one write; outside
// that (handshake, alerts and key updates sent from Read, close_notify)
// writes go straight through. Everything goes out in the order tls.Conn
// wrote it: a write from another goroutine during a hold joins the batch.
type batchConn struct {
	net.Conn

	// Reads: tls.Conn reads under its own lock, one at a time.
	rbuf       *[]byte // pooled, nil when idle
	r, w       int     // rbuf[r:w] is unread
	rerr       error   // the socket's error, returned after rbuf drains
	readFilled bool    // the last socket read filled its buffer: more is likely waiting

	holds atomic.Int32 // Writes between hold and release, flush included
	mu    sync.Mutex   // orders writes; held across socket writes
	wbuf  *[]byte      // pooled, nil when no hold
	werr  error        // a failed socket write leaves a torn record: every later write fails
}

func (b *batchConn) Read(p []byte) (int, error) {
	if b.r == b.w && b.rerr != nil {
		err := b.rerr
		b.rerr = nil
		return 0, err
	}
	if b.r == b.w && (!b.readFilled || len(p) >= readBatch) {
		// Idle or a reader with room enough: read into p, so a connection
		// waiting for its peer holds no buffer.
		n, err := b.Conn.Read(p)
		b.readFilled = n == len(p)
		return n, err
	}
	if b.r == b.w {
		if b.rbuf == nil {
			b.rbuf = readBufs.Get().(*[]byte)
		}
		n, err := b.Conn.Read(*b.rbuf)
		b.readFilled = n == len(*b.rbuf)
		b.r, b.w = 0, n
		if n == 0 {
			b.putReadBuf()
			return 0, err
		}
		b.rerr = err
	}
	n := copy(p, (*b.rbuf)[b.r:b.w])
	b.r += n
	if b.r == b.w && !b.readFilled {
		b.putReadBuf()
	}
	return n, nil
}

func (b *batchConn) putReadBuf() {
	b.r, b.w = 0, 0
	if b.rbuf != nil {
		readBufs.Put(b.rbuf)
		b.rbuf = nil
	}
}

func (b *batchConn) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.werr != nil {
		return 0, b.werr
	}
	if b.holds.Load() == 0 {
		return b.writeLocked(p)
	}
	if b.wbuf == nil {
		b.wbuf = writeBufs.Get().(*[]byte)
	}
	if len(*b.wbuf)+len(p) > cap(*b.wbuf) {
		if err := b.flushLocked(); err != nil {
			return 0, err
		}
		if len(p) > cap(*b.wbuf) {
			return b.writeLocked(p)
		}
	}
	*b.wbuf = append(*b.wbuf, p...)
	return len(p), nil
}

func (b *batchConn) writeLocked(p []byte) (int, error) {
	n, err := b.Conn.Write(p)
	if err != nil {
		b.werr = err
	}
	return n, err
}

func (b *batchConn) flushLocked() error {
	if b.wbuf == nil || len(*b.wbuf) == 0 {
		return b.werr
	}
	_, err := b.writeLocked(*b.wbuf)
	*b.wbuf = (*b.wbuf)[:0]
	return err
}

func (b *batchConn) hold() { b.holds.Add(1) }

// release sends what is held, so a Write returns with its records (and any
// alert or key update written meanwhile) on the socket. The hold ends
// after the flush so that Close, seeing it, does not wait behind a flush
// blocked on a full socket.
func (b *batchConn) release() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	err := b.flushLocked()
	if b.holds.Add(-1) == 0 && b.wbuf != nil {
		writeBufs.Put(b.wbuf)
		b.wbuf = nil
	}
	return err
}

// holding reports a Write in flight, without waiting for the write lock.
func (b *batchConn) holding() bool { return b.holds.Load() > 0 }

func (b *batchConn) SyscallConn() (syscall.RawConn, error) {
	if sc, ok := b.Conn.(syscall.Conn); ok {
		return sc.SyscallConn()
	}
	return nil, errors.ErrUnsupported
}
