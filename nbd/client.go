package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/rebound-dr/rebound"
)

// Error is an error reply from an NBD server. errors.Is(err, syscall.EPERM)
// and friends match its Errno.
type Error struct {
	Op     string
	Off    int64
	Length int64
	Errno  syscall.Errno
}

func (e *Error) Error() string {
	return fmt.Sprintf("nbd %s at %d+%d: %v", e.Op, e.Off, e.Length, e.Errno)
}

func (e *Error) Unwrap() error { return e.Errno }

// ErrClientClosed is returned by calls on a closed Client.
var ErrClientClosed = errors.New("nbd: client closed")

// Client is an NBD client for one export. It is safe for concurrent use:
// requests from several goroutines are pipelined on the one connection and
// matched to replies by handle.
type Client struct {
	nc       net.Conn
	tlsConf  *tls.Config // negotiate TLS first (nil: plain)
	size     int64
	flags    uint16
	maxBlock int
	out      batchWriter

	mu      sync.Mutex
	pending map[uint64]*call
	next    uint64
	err     error // set once the connection is unusable
	closing bool
	readerD chan struct{}
}

type call struct {
	buf   []byte // READ destination
	errno uint32
	err   error
	done  chan struct{}
}

var callPool = sync.Pool{New: func() any { return &call{done: make(chan struct{}, 1)} }}

// Dial connects to the export named by an NBD URI (see ParseURI) and
// negotiates with NBD_OPT_GO, falling back to NBD_OPT_EXPORT_NAME. An
// nbds:// URI negotiates TLS first with the certificates of its
// tls-certificates=DIR parameter, checking that the server's certificate
// names the URI's host or tls-hostname=NAME (see DialTLS).
func Dial(ctx context.Context, uri string) (*Client, error) {
	return dial(ctx, uri, nil)
}

func dial(ctx context.Context, uri string, conf *tls.Config) (*Client, error) {
	p, err := parseURI(uri)
	if err != nil {
		return nil, err
	}
	network, addr, export := p.network, p.addr, p.export
	serverName := p.host
	if p.tlsHost != "" {
		serverName = p.tlsHost
	}
	if conf, err = dialTLSConfig(uri, p.tls, p.certDir, serverName, conf); err != nil {
		return nil, err
	}
	if conf != nil && conf.ServerName == "" {
		conf = conf.Clone()
		conf.ServerName = serverName
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, rebound.Errorf(rebound.EUNAVAILABLE, "nbd dial %s: %v", uri, err)
	}
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
	} else {
		nc.SetDeadline(time.Now().Add(handshakeTimeout))
	}
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Unix(1, 0)) })
	c := &Client{nc: nc, tlsConf: conf, pending: make(map[uint64]*call), maxBlock: MaxPayload, readerD: make(chan struct{})}
	err = c.handshake(export)
	if !stop() && err == nil {
		err = ctx.Err()
	}
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("nbd handshake with %s: %w", uri, err)
	}
	nc.SetDeadline(time.Time{})
	c.out.w = c.nc // the TLS connection once negotiated
	go c.readReplies()
	return c, nil
}

func (c *Client) handshake(export string) error {
	br := bufio.NewReader(c.nc)
	var h [18]byte
	if _, err := io.ReadFull(br, h[:]); err != nil {
		return err
	}
	if binary.BigEndian.Uint64(h[0:]) != nbdMagic {
		return errors.New("not an NBD server (bad magic)")
	}
	if binary.BigEndian.Uint64(h[8:]) != optMagic {
		return errors.New("server does not speak newstyle negotiation")
	}
	sflags := binary.BigEndian.Uint16(h[16:])
	if sflags&flagFixedNewstyle == 0 {
		return errors.New("server does not speak fixed newstyle negotiation")
	}
	cflags := uint32(flagFixedNewstyle)
	noZeroes := sflags&flagNoZeroes != 0
	if noZeroes {
		cflags |= flagNoZeroes
	}
	req := binary.BigEndian.AppendUint32(nil, cflags)
	if c.tlsConf != nil {
		var err error
		if br, err = c.startTLS(br, req); err != nil {
			return err
		}
		req = nil
	}

	// NBD_OPT_GO with the export name, asking for block size constraints.
	data := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	data = append(data, export...)
	data = binary.BigEndian.AppendUint16(data, 1)
	data = binary.BigEndian.AppendUint16(data, infoBlockSize)
	req = appendOpt(req, optGo, data)
	if _, err := c.nc.Write(req); err != nil {
		return err
	}
	gotExport := false
	for {
		var rh [20]byte
		if _, err := io.ReadFull(br, rh[:]); err != nil {
			return err
		}
		if binary.BigEndian.Uint64(rh[0:]) != optReplyMagic {
			return errors.New("bad option reply magic")
		}
		typ := binary.BigEndian.Uint32(rh[12:])
		n := binary.BigEndian.Uint32(rh[16:])
		if n > 64<<10 {
			return fmt.Errorf("option reply too long (%d bytes)", n)
		}
		p := make([]byte, n)
		if _, err := io.ReadFull(br, p); err != nil {
			return err
		}
		switch {
		case typ == repAck:
			if !gotExport {
				return errors.New("server sent no export information")
			}
			return c.checkBuffered(br)
		case typ == repInfo:
			if len(p) < 2 {
				return errors.New("short NBD_REP_INFO")
			}
			switch binary.BigEndian.Uint16(p) {
			case infoExport:
				if len(p) != 12 {
					return errors.New("bad NBD_INFO_EXPORT")
				}
				c.size = int64(binary.BigEndian.Uint64(p[2:]))
				c.flags = binary.BigEndian.Uint16(p[10:])
				gotExport = true
			case infoBlockSize:
				if len(p) != 14 {
					return errors.New("bad NBD_INFO_BLOCK_SIZE")
				}
				if m := binary.BigEndian.Uint32(p[10:]); m > 0 && m < MaxPayload {
					c.maxBlock = int(m)
				}
			}
		case typ == repErrUnsup:
			// Old server: NBD_OPT_EXPORT_NAME cannot report errors, it hangs up.
			if _, err := c.nc.Write(appendOpt(nil, optExportName, []byte(export))); err != nil {
				return err
			}
			want := 10
			if !noZeroes {
				want += 124
			}
			b := make([]byte, want)
			if _, err := io.ReadFull(br, b); err != nil {
				return fmt.Errorf("export %q refused: %w", export, err)
			}
			c.size = int64(binary.BigEndian.Uint64(b))
			c.flags = binary.BigEndian.Uint16(b[8:])
			return c.checkBuffered(br)
		case typ&repFlagError != 0:
			msg := string(p)
			if msg == "" {
				msg = fmt.Sprintf("error %#x", typ)
			}
			code := rebound.EUNAVAILABLE
			switch typ {
			case repErrUnknown:
				code = rebound.ENOTFOUND
			case repErrTLSReqd:
				code = rebound.EUNAUTHORIZED
			}
			return rebound.Errorf(code, "export %q: %s", export, msg)
		default:
			// Unknown replies to GO are informational; ignore them.
		}
	}
}

// checkBuffered makes sure the handshake reader holds no transmission
// bytes, since transmission reads the connection directly.
func (c *Client) checkBuffered(br *bufio.Reader) error {
	if br.Buffered() != 0 {
		return errors.New("server sent data before any request")
	}
	return nil
}

func appendOpt(b []byte, opt uint32, data []byte) []byte {
	b = binary.BigEndian.AppendUint64(b, optMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// Size returns the export size in bytes.
func (c *Client) Size() int64 { return c.size }

// ReadOnly reports whether the server exports the disk read-only.
func (c *Client) ReadOnly() bool { return c.flags&tflagReadOnly != 0 }

// readReplies matches replies to calls until the connection fails.
func (c *Client) readReplies() {
	defer close(c.readerD)
	br := bufio.NewReaderSize(c.nc, 128<<10)
	var h [replySize]byte
	var err error
	for {
		if _, err = io.ReadFull(br, h[:]); err != nil {
			break
		}
		if m := binary.BigEndian.Uint32(h[0:]); m != simpleReplyMagic {
			err = fmt.Errorf("bad reply magic %#x", m)
			break
		}
		handle := binary.BigEndian.Uint64(h[8:])
		c.mu.Lock()
		cl := c.pending[handle]
		delete(c.pending, handle)
		c.mu.Unlock()
		if cl == nil {
			err = fmt.Errorf("reply for unknown handle %d", handle)
			break
		}
		cl.errno = binary.BigEndian.Uint32(h[4:])
		if cl.errno == 0 && len(cl.buf) > 0 {
			if _, err = io.ReadFull(br, cl.buf); err != nil {
				cl.err = err
				cl.done <- struct{}{}
				break
			}
		}
		cl.done <- struct{}{}
	}
	c.fail(err)
}

// fail marks the connection unusable and completes every pending call.
func (c *Client) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil || c.err == ErrClientClosed {
		c.err = nil
		if c.closing || err == nil || errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
			c.err = ErrClientClosed
		}
		if c.err == nil {
			c.err = rebound.Errorf(rebound.EUNAVAILABLE, "nbd connection failed: %v", err)
		}
	}
	for h, cl := range c.pending {
		delete(c.pending, h)
		cl.err = c.err
		cl.done <- struct{}{}
	}
}

// do sends one request and waits for its reply.
func (c *Client) do(op string, typ, flags uint16, off int64, length int, payload, dst []byte) error {
	cl := callPool.Get().(*call)
	cl.buf, cl.errno, cl.err = dst, 0, nil
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		callPool.Put(cl)
		return err
	}
	c.next++
	handle := c.next
	c.pending[handle] = cl
	c.mu.Unlock()

	var h [requestSize]byte
	binary.BigEndian.PutUint32(h[0:], requestMagic)
	binary.BigEndian.PutUint16(h[4:], flags)
	binary.BigEndian.PutUint16(h[6:], typ)
	binary.BigEndian.PutUint64(h[8:], handle)
	binary.BigEndian.PutUint64(h[16:], uint64(off))
	binary.BigEndian.PutUint32(h[24:], uint32(length))
	if err := c.out.write(h[:], payload); err != nil {
		// The reader fails every pending call once the socket is dead.
		c.nc.Close()
	}
	<-cl.done
	err := cl.err
	if err == nil && cl.errno != 0 {
		err = &Error{Op: op, Off: off, Length: int64(length), Errno: wireErrno(cl.errno)}
	}
	cl.buf = nil
	callPool.Put(cl)
	return err
}

// ReadAt reads len(p) bytes at off.
func (c *Client) ReadAt(p []byte, off int64) (int, error) {
	done := 0
	for done < len(p) {
		n := min(len(p)-done, c.maxBlock)
		if err := c.do("read", cmdRead, 0, off+int64(done), n, nil, p[done:done+n]); err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

// WriteAt writes p at off; the data may sit in the server's cache until Flush.
func (c *Client) WriteAt(p []byte, off int64) (int, error) {
	return c.write(p, off, 0)
}

// WriteAtFUA writes p at off and returns once it is durable (NBD_CMD_FLAG_FUA).
func (c *Client) WriteAtFUA(p []byte, off int64) (int, error) {
	return c.write(p, off, cmdFlagFUA)
}

func (c *Client) write(p []byte, off int64, flags uint16) (int, error) {
	done := 0
	for done < len(p) {
		n := min(len(p)-done, c.maxBlock)
		if err := c.do("write", cmdWrite, flags, off+int64(done), n, p[done:done+n], nil); err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

// Flush makes every write the server has acknowledged durable.
func (c *Client) Flush() error {
	return c.do("flush", cmdFlush, 0, 0, 0, nil, nil)
}

// Trim discards a range.
func (c *Client) Trim(off, length int64) error {
	return c.ranged("trim", cmdTrim, 0, off, length)
}

// WriteZeroes makes a range read back as zeroes; the server may
// deallocate it.
func (c *Client) WriteZeroes(off, length int64) error {
	return c.ranged("write zeroes", cmdWriteZeroes, 0, off, length)
}

// WriteZeroesNoHole makes a range read back as zeroes and asks the server
// to keep it allocated (NBD_CMD_FLAG_NO_HOLE).
func (c *Client) WriteZeroesNoHole(off, length int64) error {
	return c.ranged("write zeroes", cmdWriteZeroes, cmdFlagNoHole, off, length)
}

// ranged splits a length-only command into requests of at most 1 GiB
// (the wire length is 32 bits).
func (c *Client) ranged(op string, typ, flags uint16, off, length int64) error {
	if length < 0 || off < 0 {
		return rebound.Errorf(rebound.EINVALID, "nbd %s: negative offset or length", op)
	}
	for length > 0 {
		n := min(length, 1<<30)
		if err := c.do(op, typ, flags, off, int(n), nil, nil); err != nil {
			return err
		}
		off += n
		length -= n
	}
	return nil
}

// Close sends NBD_CMD_DISC, waits for replies to requests already sent and
// closes the connection.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		<-c.readerD
		return nil
	}
	c.closing = true
	if c.err == nil {
		c.err = ErrClientClosed // new calls fail; pending ones still complete
	}
	c.mu.Unlock()

	var h [requestSize]byte
	binary.BigEndian.PutUint32(h[0:], requestMagic)
	binary.BigEndian.PutUint16(h[6:], cmdDisc)
	err := c.out.write(h[:], nil)
	if err == nil {
		// The server closes the connection once in-flight requests are done.
		if cw, ok := c.nc.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		}
		select {
		case <-c.readerD:
		case <-time.After(10 * time.Second):
		}
	}
	c.nc.Close()
	<-c.readerD
	return nil
}
