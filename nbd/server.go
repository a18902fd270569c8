package nbd

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rebound-dr/rebound/internal/lograte"
)

// Backend is one disk served over NBD. Implementations must be safe for
// concurrent use; the server issues requests of one connection in parallel.
type Backend interface {
	// Size is the disk size in bytes; it must not change while served.
	Size() int64
	// ReadAt and WriteAt follow io.ReaderAt/io.WriterAt; the server only
	// calls them with ranges inside [0, Size()).
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Flush makes every completed write durable.
	Flush() error
	// Trim discards a range; in Rebound trimmed ranges read back as zeroes.
	Trim(off, length int64) error
	// WriteZeroes makes a range read back as zeroes; it may deallocate
	// the range (punch a hole).
	WriteZeroes(off, length int64) error
	// WriteZeroesNoHole makes a range read back as zeroes and leaves it
	// allocated (NBD_CMD_FLAG_NO_HOLE: the server MUST NOT deallocate, so
	// later writes there cannot fail for lack of space).
	WriteZeroesNoHole(off, length int64) error
}

// Export is a named disk.
type Export struct {
	Name, Description string
	Backend           Backend
	ReadOnly          bool
}

// Server serves exports over NBD (fixed newstyle handshake; simple or
// structured replies, see structured.go).
type Server struct {
	// Lookup returns the export for a name. An error (e.g. unknown or
	// fenced) is sent to the client as NBD_REP_ERR_UNKNOWN with the error
	// text as the message.
	Lookup func(name string) (*Export, error)
	// List returns the names for NBD_OPT_LIST (descriptions come from
	// Lookup) and picks the default export: the empty name is the only
	// export if there is exactly one. Nil lists nothing.
	List func() []string
	// Logger receives connection errors. Nil discards them.
	Logger *slog.Logger
	// TLSConfig enables NBD_OPT_STARTTLS (see tls.go). Nil: plain only.
	TLSConfig *tls.Config
	// RequireTLS says whether a connection with this local address must
	// negotiate TLS first. Nil: TCP off loopback does (tlsRequiredFor).
	RequireTLS func(local net.Addr) bool

	mu        sync.Mutex
	closed    bool
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	gen       map[string]uint64 // bumped by Disconnect, see conn.attach
	wg        sync.WaitGroup
	// badLog limits lines about clients that fail the handshake or send
	// garbage: a scanner must not flood the log.
	badLog lograte.Limiter
}

// handshakeTimeout bounds how long a client may take to pick an export;
// stopWriteTimeout bounds how long a stopping connection waits for its
// client to read the last replies.
const (
	handshakeTimeout = 30 * time.Second
	stopWriteTimeout = 10 * time.Second
)

// Limits on one connection's in-flight work.
const (
	maxInflight      = 128
	maxInflightBytes = 64 << 20
)

func (s *Server) logger() *slog.Logger {
	if s.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return s.Logger
}

// Serve accepts connections on l until l fails or Close is called, in which
// case it returns net.ErrClosed. It may be called for several listeners.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.Close()
		return net.ErrClosed
	}
	if s.listeners == nil {
		s.listeners = make(map[net.Listener]struct{})
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
	}()

	var delay time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed || errors.Is(err, net.ErrClosed) {
				return net.ErrClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				time.Sleep(delay)
				continue
			}
			return err
		}
		delay = 0
		if !s.serveConn(nc) {
			return net.ErrClosed
		}
	}
}

// serveConn starts serving nc in its own goroutine; false if the server is
// closed.
func (s *Server) serveConn(nc net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		nc.Close()
		return false
	}
	if s.conns == nil {
		s.conns = make(map[*conn]struct{})
	}
	c := newConn(s, nc)
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		c.serve()
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
	}()
	return true
}

// Close closes the listeners and every connection (after their in-flight
// requests finish) and waits for all goroutines.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	for l := range s.listeners {
		l.Close()
	}
	for c := range s.conns {
		c.stop()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

// Disconnect closes every connection to the named export once its in-flight
// requests have finished, and waits for that, so no request of those
// connections touches the backend after it returns. It returns how many
// connections it closed. Connections still negotiating that export are
// refused when they try to attach.
func (s *Server) Disconnect(export string) int {
	s.mu.Lock()
	if s.gen == nil {
		s.gen = make(map[string]uint64)
	}
	s.gen[export]++
	var victims []*conn
	for c := range s.conns {
		if c.attached && c.name == export {
			victims = append(victims, c)
			c.stop()
		}
	}
	s.mu.Unlock()
	for _, c := range victims {
		<-c.done
	}
	return len(victims)
}

// conn is one client connection.
type conn struct {
	s    *Server
	nc   net.Conn
	br   *bufio.Reader
	log  *slog.Logger
	done chan struct{}

	// Under s.mu.
	name     string
	gen      uint64
	attached bool

	// TLS state: tlsRequired refuses other options until tlsDone.
	tlsRequired, tlsDone, tlsRefused bool
	tlsPeer                          *x509.Certificate // under s.mu

	stopping atomic.Bool
	export   *Export
	neg      negotiated // see structured.go
	out      batchWriter
	wg       sync.WaitGroup // in-flight requests

	// In-flight budget.
	bmu      sync.Mutex
	bcond    *sync.Cond
	inflight int
	inBytes  int
}

func newConn(s *Server, nc net.Conn) *conn {
	c := &conn{s: s, nc: nc, br: bufio.NewReaderSize(nc, 128<<10), done: make(chan struct{})}
	remote := "unknown"
	if a := nc.RemoteAddr(); a != nil {
		remote = a.String()
	}
	c.log = s.logger().With("remote", remote)
	c.out.w = nc
	c.bcond = sync.NewCond(&c.bmu)
	c.initTLS()
	return c
}

// stop makes the connection finish its in-flight requests and close. The
// flag is set before the deadline so the handshake's deadline reset cannot
// undo it (see serve).
func (c *conn) stop() {
	c.stopping.Store(true)
	c.nc.SetReadDeadline(time.Now())
	// A client that stopped reading must not hold Disconnect up forever.
	c.nc.SetWriteDeadline(time.Now().Add(stopWriteTimeout))
	c.bmu.Lock()
	c.bcond.Broadcast()
	c.bmu.Unlock()
}

func (c *conn) serve() {
	defer close(c.done)
	defer c.nc.Close()
	c.nc.SetDeadline(time.Now().Add(handshakeTimeout))
	e, err := c.handshake()
	if err != nil {
		if !errors.Is(err, errAbort) && !c.stopping.Load() {
			c.s.badLog.Warn(c.log, "nbd handshake failed", "err", err)
		}
		return
	}
	c.nc.SetDeadline(time.Time{})
	if c.stopping.Load() {
		return
	}
	c.export = e
	c.transmit()
}

var errAbort = errors.New("client aborted")

// attach records which export the connection serves so Disconnect finds it;
// it fails if Disconnect ran for that export since the lookup.
func (c *conn) attach(name string, gen uint64) error {
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	if c.s.gen[name] != gen || c.s.closed {
		return fmt.Errorf("export %q was disconnected", name)
	}
	c.name, c.attached = name, true
	return nil
}

func (c *conn) lookup(name string) (*Export, uint64, error) {
	c.s.mu.Lock()
	gen := c.s.gen[name]
	c.s.mu.Unlock()
	if name == "" {
		return nil, 0, c.noDefault()
	}
	if c.s.Lookup == nil {
		return nil, 0, fmt.Errorf("no export %q", name)
	}
	e, err := c.s.Lookup(name)
	if err == nil && (e == nil || e.Backend == nil) {
		err = fmt.Errorf("no export %q", name)
	}
	return e, gen, err
}

// handshake runs the fixed newstyle negotiation and returns the export the
// client chose.
func (c *conn) handshake() (*Export, error) {
	var b [18]byte
	binary.BigEndian.PutUint64(b[0:], nbdMagic)
	binary.BigEndian.PutUint64(b[8:], optMagic)
	binary.BigEndian.PutUint16(b[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := c.nc.Write(b[:]); err != nil {
		return nil, err
	}
	if _, err := io.ReadFull(c.br, b[:4]); err != nil {
		return nil, fmt.Errorf("read client flags: %w", err)
	}
	cflags := binary.BigEndian.Uint32(b[:4])
	if cflags&^(flagFixedNewstyle|flagNoZeroes) != 0 {
		return nil, fmt.Errorf("unknown client flags %#x", cflags)
	}
	if cflags&flagFixedNewstyle == 0 {
		return nil, fmt.Errorf("client does not speak fixed newstyle (flags %#x)", cflags)
	}
	noZeroes := cflags&flagNoZeroes != 0

	var h [16]byte
	for {
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return nil, fmt.Errorf("read option: %w", err)
		}
		if m := binary.BigEndian.Uint64(h[0:]); m != optMagic {
			return nil, fmt.Errorf("bad option magic %#x", m)
		}
		opt := binary.BigEndian.Uint32(h[8:])
		n := binary.BigEndian.Uint32(h[12:])
		if n > 64<<10 {
			// No option we know is that long; refuse without buffering it.
			if n > 1<<20 {
				return nil, fmt.Errorf("option %d length %d too big", opt, n)
			}
			if _, err := io.CopyN(io.Discard, c.br, int64(n)); err != nil {
				return nil, err
			}
			if err := c.optReply(opt, repErrTooBig, []byte("option too long")); err != nil {
				return nil, err
			}
			continue
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(c.br, data); err != nil {
			return nil, fmt.Errorf("read option %d data: %w", opt, err)
		}

		if done, err := c.tlsOption(opt, data); done || err != nil {
			if err != nil {
				return nil, err
			}
			continue
		}
		switch opt {
		case optExportName:
			name := c.resolveName(string(data))
			e, gen, err := c.lookup(name)
			if err == nil {
				err = c.attach(name, gen)
			}
			if err != nil {
				// This option cannot fail in-band; all we can do is hang up.
				return nil, fmt.Errorf("export %q: %w", name, err)
			}
			reply := make([]byte, 10, 134)
			binary.BigEndian.PutUint64(reply[0:], uint64(e.Backend.Size()))
			binary.BigEndian.PutUint16(reply[8:], c.transmissionFlags(e))
			if !noZeroes {
				reply = reply[:134]
			}
			if _, err := c.nc.Write(reply); err != nil {
				return nil, err
			}
			return e, nil

		case optAbort:
			c.optReply(opt, repAck, nil) // best effort; the client may be gone
			return nil, errAbort

		case optList:
			if len(data) != 0 {
				if err := c.optReply(opt, repErrInvalid, []byte("NBD_OPT_LIST takes no data")); err != nil {
					return nil, err
				}
				continue
			}
			var names []string
			if c.s.List != nil {
				names = c.s.List()
			}
			for _, name := range names {
				p := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
				p = append(append(p, name...), c.describe(name)...)
				if err := c.optReply(opt, repServer, p); err != nil {
					return nil, err
				}
			}
			if err := c.optReply(opt, repAck, nil); err != nil {
				return nil, err
			}

		case optInfo, optGo:
			e, err := c.infoOrGo(opt, data)
			if err != nil || e != nil {
				return e, err
			}

		case optStructuredReply, optListMetaContext, optSetMetaContext:
			if err := c.negotiateOpt(opt, data); err != nil {
				return nil, err
			}

		default:
			msg := fmt.Sprintf("option %d not supported", opt)
			if err := c.optReply(opt, repErrUnsup, []byte(msg)); err != nil {
				return nil, err
			}
		}
	}
}

// infoOrGo answers NBD_OPT_INFO or NBD_OPT_GO. It returns the export when a
// GO succeeded, (nil, nil) to continue negotiating, or a connection error.
func (c *conn) infoOrGo(opt uint32, data []byte) (*Export, error) {
	if len(data) < 6 {
		return nil, c.optReply(opt, repErrInvalid, []byte("short NBD_OPT_INFO/GO data"))
	}
	nlen := binary.BigEndian.Uint32(data)
	if uint64(nlen)+6 > uint64(len(data)) {
		return nil, c.optReply(opt, repErrInvalid, []byte("bad export name length"))
	}
	name := c.resolveName(string(data[4 : 4+nlen]))
	rest := data[4+nlen:]
	nreq := int(binary.BigEndian.Uint16(rest))
	if len(rest) != 2+2*nreq {
		return nil, c.optReply(opt, repErrInvalid, []byte("bad information request count"))
	}
	var wantName, wantDesc, wantBlock bool
	for i := range nreq {
		switch binary.BigEndian.Uint16(rest[2+2*i:]) {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		case infoBlockSize:
			wantBlock = true
		}
	}

	e, gen, err := c.lookup(name)
	if err != nil {
		return nil, c.optReply(opt, repErrUnknown, []byte(truncate(err.Error(), 4096)))
	}
	info := make([]byte, 12)
	binary.BigEndian.PutUint16(info[0:], infoExport)
	binary.BigEndian.PutUint64(info[2:], uint64(e.Backend.Size()))
	binary.BigEndian.PutUint16(info[10:], c.transmissionFlags(e))
	if err := c.optReply(opt, repInfo, info); err != nil {
		return nil, err
	}
	if wantName {
		p := binary.BigEndian.AppendUint16(nil, infoName)
		if err := c.optReply(opt, repInfo, append(p, e.Name...)); err != nil {
			return nil, err
		}
	}
	if wantDesc {
		p := binary.BigEndian.AppendUint16(nil, infoDescription)
		if err := c.optReply(opt, repInfo, append(p, truncate(e.Description, 4096)...)); err != nil {
			return nil, err
		}
	}
	if wantBlock {
		p := binary.BigEndian.AppendUint16(nil, infoBlockSize)
		p = binary.BigEndian.AppendUint32(p, minBlockSize)
		p = binary.BigEndian.AppendUint32(p, preferredBlockSize)
		p = binary.BigEndian.AppendUint32(p, MaxPayload)
		if err := c.optReply(opt, repInfo, p); err != nil {
			return nil, err
		}
	}
	if opt == optGo {
		if err := c.attach(name, gen); err != nil {
			return nil, c.optReply(opt, repErrUnknown, []byte(err.Error()))
		}
	}
	if err := c.optReply(opt, repAck, nil); err != nil {
		return nil, err
	}
	if opt == optGo {
		return e, nil
	}
	return nil, nil
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

func (c *conn) optReply(opt, typ uint32, data []byte) error {
	b := make([]byte, 20, 20+len(data))
	binary.BigEndian.PutUint64(b[0:], optReplyMagic)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], typ)
	binary.BigEndian.PutUint32(b[16:], uint32(len(data)))
	_, err := c.nc.Write(append(b, data...))
	return err
}

// request is one decoded transmission request.
type request struct {
	flags  uint16
	typ    uint16
	handle uint64
	off    uint64
	length uint32
	buf    *[]byte // WRITE payload
	cost   int
}

// transmit reads requests and runs each in its own goroutine; replies may
// go out of order. On exit it waits for in-flight requests so every request
// the backend executed is answered (if the connection still works).
func (c *conn) transmit() {
	defer func() {
		c.wg.Wait()
		c.out.flush()
	}()
	var h [requestSize]byte
	for {
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			if !c.stopping.Load() && err != io.EOF && !errors.Is(err, net.ErrClosed) {
				c.log.Warn("nbd read request", "export", c.export.Name, "err", err)
			}
			return
		}
		if m := binary.BigEndian.Uint32(h[0:]); m != requestMagic {
			c.s.badLog.Warn(c.log, "nbd bad request magic, closing connection", "export", c.export.Name, "magic", fmt.Sprintf("%#x", m))
			return
		}
		r := request{
			flags:  binary.BigEndian.Uint16(h[4:]),
			typ:    binary.BigEndian.Uint16(h[6:]),
			handle: binary.BigEndian.Uint64(h[8:]),
			off:    binary.BigEndian.Uint64(h[16:]),
			length: binary.BigEndian.Uint32(h[24:]),
		}
		switch r.typ {
		case cmdDisc:
			return
		case cmdWrite:
			if r.length > MaxPayload {
				// Reading the payload would pin too much memory and skipping
				// it is not worth it: refuse and hang up.
				c.log.Warn("nbd write too large, closing connection", "export", c.export.Name, "length", r.length)
				c.wg.Wait()
				c.reply(r.handle, errInval, nil)
				return
			}
			r.buf = getBuf(int(r.length))
			if _, err := io.ReadFull(c.br, *r.buf); err != nil {
				putBuf(r.buf)
				if !c.stopping.Load() {
					c.log.Warn("nbd read write payload", "export", c.export.Name, "err", err)
				}
				return
			}
			r.cost = int(r.length)
		case cmdRead:
			if r.length <= MaxPayload {
				r.cost = int(r.length)
			}
		}
		if !c.acquire(r.cost) {
			putBuf(r.buf)
			return
		}
		c.wg.Add(1)
		go c.handle(r)
	}
}

// acquire waits for room in the in-flight budget; false if stopping.
func (c *conn) acquire(cost int) bool {
	c.bmu.Lock()
	defer c.bmu.Unlock()
	for c.inflight > 0 && (c.inflight >= maxInflight || c.inBytes+cost > maxInflightBytes) {
		if c.stopping.Load() {
			return false
		}
		c.bcond.Wait()
	}
	c.inflight++
	c.inBytes += cost
	return true
}

func (c *conn) release(cost int) {
	c.bmu.Lock()
	c.inflight--
	c.inBytes -= cost
	c.bmu.Unlock()
	c.bcond.Signal()
}

func (c *conn) handle(r request) {
	defer c.wg.Done()
	defer c.release(r.cost)
	switch {
	case r.typ == cmdBlockStatus:
		c.blockStatus(&r)
		putBuf(r.buf)
		return
	case r.typ == cmdRead && c.neg.structured:
		c.structuredRead(&r)
		return
	}
	var data *[]byte
	errno := c.exec(&r, &data)
	if errno != 0 || data == nil {
		c.reply(r.handle, errno, nil)
	} else {
		c.reply(r.handle, 0, *data)
	}
	putBuf(data)
	putBuf(r.buf)
}

// exec runs one request against the backend and returns the errno to send.
// A READ's data is returned in *data.
func (c *conn) exec(r *request, data **[]byte) uint32 {
	e := c.export
	b := e.Backend
	size := uint64(b.Size())
	inRange := r.off <= size && uint64(r.length) <= size-r.off
	if errno := c.checkFlags(r); errno != 0 {
		return errno
	}
	fua := r.flags&cmdFlagFUA != 0
	off, n := int64(r.off), int64(r.length)
	switch r.typ {
	case cmdRead:
		if r.length > MaxPayload || !inRange {
			return errInval
		}
		buf := getBuf(int(r.length))
		*data = buf
		if m, err := b.ReadAt(*buf, off); err != nil && !(err == io.EOF && m == len(*buf)) {
			return c.fail("read", r, err)
		}
		return 0
	case cmdWrite:
		if e.ReadOnly {
			return errPerm
		}
		if !inRange {
			return errNoSpc
		}
		if _, err := b.WriteAt(*r.buf, off); err != nil {
			return c.fail("write", r, err)
		}
	case cmdWriteZeroes:
		if e.ReadOnly {
			return errPerm
		}
		if !inRange {
			return errNoSpc
		}
		if r.flags&cmdFlagFastZero != 0 {
			return c.fastZero(r)
		}
		zero := b.WriteZeroes
		if r.flags&cmdFlagNoHole != 0 {
			zero = b.WriteZeroesNoHole
		}
		if err := zero(off, n); err != nil {
			return c.fail("write zeroes", r, err)
		}
	case cmdTrim:
		if e.ReadOnly {
			return errPerm
		}
		if !inRange {
			return errInval
		}
		if err := b.Trim(off, n); err != nil {
			return c.fail("trim", r, err)
		}
	case cmdFlush:
		fua = true
	case cmdCache:
		// A hint; the page cache does the caching. Success, no effect.
		if !inRange {
			return errInval
		}
		return 0
	default:
		return errInval
	}
	if fua {
		if err := b.Flush(); err != nil {
			return c.fail("flush", r, err)
		}
	}
	return 0
}

func (c *conn) fail(op string, r *request, err error) uint32 {
	c.log.Warn("nbd backend error", "export", c.export.Name, "op", op, "off", r.off, "len", r.length, "err", err)
	return errnoOf(err)
}

// reply sends a simple reply. On a failed READ no data follows, as qemu-nbd
// does and qemu, libnbd and the kernel expect.
func (c *conn) reply(handle uint64, errno uint32, data []byte) {
	var h [replySize]byte
	binary.BigEndian.PutUint32(h[0:], simpleReplyMagic)
	binary.BigEndian.PutUint32(h[4:], errno)
	binary.BigEndian.PutUint64(h[8:], handle)
	if err := c.out.write(h[:], data); err != nil {
		// The client cannot hear us; stop reading more work from it.
		c.nc.Close()
	}
}
