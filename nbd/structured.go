package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sort"
	"strings"
)

// Structured replies, meta contexts (base:allocation), block status and
// the other transmission features negotiated beyond the simple protocol.

const (
	optListMetaContext = 9
	optSetMetaContext  = 10

	repMetaContext = 4

	structuredReplyMagic = 0x668e33ef
	replyFlagDone        = 1

	replyTypeNone        = 0
	replyTypeOffsetData  = 1
	replyTypeOffsetHole  = 2
	replyTypeBlockStatus = 5
	replyTypeError       = 1<<15 + 1

	tflagSendDF       = 1 << 7
	tflagSendCache    = 1 << 10
	tflagSendFastZero = 1 << 11

	cmdCache       = 5
	cmdBlockStatus = 7

	cmdFlagDF       = 1 << 2
	cmdFlagReqOne   = 1 << 3
	cmdFlagFastZero = 1 << 4

	stateHole = 1 << 0
	stateZero = 1 << 1

	metaAllocation   = "base:allocation"
	metaAllocationID = 1

	chunkHeaderSize = 20
	// holeChunkMin: zero runs shorter than this in a READ are sent as
	// data; a hole chunk costs 32 bytes and splits the reply.
	holeChunkMin = 4096
	// holeQueryMin: smaller READs do not ask the backend for extents
	// (seeks, locks) and go out as one data chunk: small random reads
	// must stay as cheap as with simple replies.
	holeQueryMin = 64 << 10
)

// negotiated is what a connection agreed to in the handshake.
type negotiated struct {
	structured bool
	// metaName is the export SET_META_CONTEXT selected base:allocation
	// for; block status works only if the client then picked it.
	metaName string
	metaSet  bool
}

// resetNegotiation forgets structured replies and meta contexts: the spec
// makes a client renegotiate them after NBD_OPT_STARTTLS.
func (c *conn) resetNegotiation() { c.neg = negotiated{} }

// blockStatusOK reports whether the client may send BLOCK_STATUS.
func (c *conn) blockStatusOK() bool {
	return c.neg.structured && c.neg.metaSet && c.neg.metaName == c.name
}

// transmissionFlags are the flags sent for export e on this connection:
// DF only once structured replies are on, as the spec requires.
func (c *conn) transmissionFlags(e *Export) uint16 {
	f := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes |
		tflagCanMultiConn | tflagSendCache | tflagSendFastZero)
	if e.ReadOnly {
		f |= tflagReadOnly
	}
	if c.neg.structured {
		f |= tflagSendDF
	}
	return f
}

// resolveName maps the empty (default) export name to the server's only
// export; with none or several it stays empty and lookup explains.
func (c *conn) resolveName(name string) string {
	if name != "" || c.s.List == nil {
		return name
	}
	if names := c.s.List(); len(names) == 1 {
		return names[0]
	}
	return name
}

// noDefault is the error for the empty export name when the server does
// not have exactly one export.
func (c *conn) noDefault() error {
	var names []string
	if c.s.List != nil {
		names = c.s.List()
	}
	if len(names) == 0 {
		return fmt.Errorf("no default export: this server has no exports")
	}
	sort.Strings(names)
	list := strings.Join(names, ", ")
	return fmt.Errorf("no default export: this server has %d exports, name one in the URI (nbd://host/NAME): %s", len(names), truncate(list, 3500))
}

// describe returns the description of a listed export, or "" if it cannot
// be looked up now.
func (c *conn) describe(name string) string {
	if c.s.Lookup == nil {
		return ""
	}
	e, err := c.s.Lookup(name)
	if err != nil || e == nil {
		return ""
	}
	return truncate(e.Description, 4096)
}

// negotiateOpt answers STRUCTURED_REPLY, LIST_META_CONTEXT and
// SET_META_CONTEXT. A returned error ends the connection.
func (c *conn) negotiateOpt(opt uint32, data []byte) error {
	if opt == optStructuredReply {
		if len(data) != 0 {
			return c.optReply(opt, repErrInvalid, []byte("NBD_OPT_STRUCTURED_REPLY takes no data"))
		}
		c.neg.structured = true
		return c.optReply(opt, repAck, nil)
	}
	set := opt == optSetMetaContext
	if set {
		// A SET replaces the selection even when it fails.
		c.neg.metaSet, c.neg.metaName = false, ""
		if !c.neg.structured {
			return c.optReply(opt, repErrInvalid, []byte("negotiate NBD_OPT_STRUCTURED_REPLY before NBD_OPT_SET_META_CONTEXT"))
		}
	}
	name, queries, ok := parseMetaQuery(data)
	if !ok {
		return c.optReply(opt, repErrInvalid, []byte("malformed meta context request"))
	}
	for _, q := range queries {
		if !strings.Contains(q, ":") {
			return c.optReply(opt, repErrInvalid, []byte(fmt.Sprintf("meta context query %q has no namespace (want e.g. %q)", truncate(q, 256), metaAllocation)))
		}
	}
	name = c.resolveName(name)
	if _, _, err := c.lookup(name); err != nil {
		return c.optReply(opt, repErrUnknown, []byte(truncate(err.Error(), 4096)))
	}
	match := false
	for _, q := range queries {
		if q == metaAllocation || (!set && q == "base:") {
			match = true
		}
	}
	if !set && len(queries) == 0 {
		match = true // LIST with no query lists everything
	}
	if match {
		id := uint32(0) // LIST: reserved, zero
		if set {
			id = metaAllocationID
			c.neg.metaSet, c.neg.metaName = true, name
		}
		p := binary.BigEndian.AppendUint32(nil, id)
		if err := c.optReply(opt, repMetaContext, append(p, metaAllocation...)); err != nil {
			return err
		}
	}
	return c.optReply(opt, repAck, nil)
}

// parseMetaQuery decodes a LIST/SET_META_CONTEXT payload: export name
// then counted queries, consuming the data exactly.
func parseMetaQuery(data []byte) (name string, queries []string, ok bool) {
	if len(data) < 4 {
		return "", nil, false
	}
	n := uint64(binary.BigEndian.Uint32(data))
	if 4+n+4 > uint64(len(data)) {
		return "", nil, false
	}
	name = string(data[4 : 4+n])
	rest := data[4+n:]
	count := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	for range count {
		if len(rest) < 4 {
			return "", nil, false
		}
		ql := uint64(binary.BigEndian.Uint32(rest))
		if 4+ql > uint64(len(rest)) {
			return "", nil, false
		}
		queries = append(queries, string(rest[4:4+ql]))
		rest = rest[4+ql:]
	}
	return name, queries, len(rest) == 0
}

// checkFlags returns EINVAL for a command flag the command does not take
// or the connection did not negotiate.
func (c *conn) checkFlags(r *request) uint32 {
	allowed := uint16(cmdFlagFUA | cmdFlagNoHole)
	switch r.typ {
	case cmdRead:
		if c.neg.structured {
			allowed |= cmdFlagDF
		}
	case cmdWriteZeroes:
		allowed |= cmdFlagFastZero
	case cmdBlockStatus:
		allowed |= cmdFlagReqOne
	}
	if r.flags&^allowed != 0 {
		return errInval
	}
	return 0
}

// chunk appends a structured reply chunk header.
func chunk(b []byte, flags, typ uint16, handle uint64, length uint32) []byte {
	b = binary.BigEndian.AppendUint32(b, structuredReplyMagic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, handle)
	return binary.BigEndian.AppendUint32(b, length)
}

// send writes one message; on failure the connection is closed, as in
// reply.
func (c *conn) send(hdr, data []byte) {
	if err := c.out.write(hdr, data); err != nil {
		c.nc.Close()
	}
}

// replyError sends a structured error chunk ending the reply.
func (c *conn) replyError(handle uint64, errno uint32, msg string) {
	msg = truncate(msg, 4096)
	b := chunk(nil, replyFlagDone, replyTypeError, handle, uint32(6+len(msg)))
	b = binary.BigEndian.AppendUint32(b, errno)
	b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
	c.send(append(b, msg...), nil)
}

// structuredRead answers a READ with structured replies: ranges the
// backend reports as zero go out as OFFSET_HOLE chunks (unless the client
// set DF, which asks for one content chunk), the rest as OFFSET_DATA.
func (c *conn) structuredRead(r *request) {
	var data *[]byte
	errno := c.exec(r, &data)
	defer putBuf(data)
	if errno != 0 {
		msg := fmt.Sprintf("read of %d bytes at %d failed", r.length, r.off)
		if errno == errInval {
			msg = fmt.Sprintf("read of %d bytes at %d: outside the %d-byte export, over %d bytes, or a bad flag", r.length, r.off, c.export.Backend.Size(), MaxPayload)
		}
		c.replyError(r.handle, errno, msg)
		return
	}
	buf := *data
	if len(buf) == 0 { // a data chunk must carry data
		c.send(chunk(nil, replyFlagDone, replyTypeNone, r.handle, 0), nil)
		return
	}
	type run struct {
		off, n int64
		zero   bool
	}
	runs := []run{{0, int64(len(buf)), false}}
	if r.flags&cmdFlagDF == 0 && len(buf) >= holeQueryMin {
		if xs, err := ExtentsOf(c.export.Backend, int64(r.off), int64(len(buf))); err == nil {
			runs = runs[:0]
			var pos int64
			for _, x := range xs {
				n := min(x.Length, int64(len(buf))-pos)
				if n <= 0 {
					break
				}
				zero := x.Zero && n >= holeChunkMin
				if k := len(runs); k > 0 && runs[k-1].zero == zero {
					runs[k-1].n += n
				} else {
					runs = append(runs, run{pos, n, zero})
				}
				pos += n
			}
			if pos < int64(len(buf)) { // a short answer: the rest as data
				if k := len(runs); k > 0 && !runs[k-1].zero {
					runs[k-1].n += int64(len(buf)) - pos
				} else {
					runs = append(runs, run{pos, int64(len(buf)) - pos, false})
				}
			}
		}
	}
	var hdr []byte
	for i, x := range runs {
		flags := uint16(0)
		if i == len(runs)-1 {
			flags = replyFlagDone
		}
		at := r.off + uint64(x.off)
		if x.zero {
			hdr = chunk(hdr, flags, replyTypeOffsetHole, r.handle, 12)
			hdr = binary.BigEndian.AppendUint64(hdr, at)
			hdr = binary.BigEndian.AppendUint32(hdr, uint32(x.n))
			continue
		}
		hdr = chunk(hdr, flags, replyTypeOffsetData, r.handle, uint32(8+x.n))
		hdr = binary.BigEndian.AppendUint64(hdr, at)
		c.send(hdr, buf[x.off:x.off+x.n])
		hdr = hdr[:0]
	}
	if len(hdr) > 0 {
		c.send(hdr, nil)
	}
}

// extents asks the backend for the extents of r's range. With REQ_ONE
// only the first extent matters, and clients (qemu) send REQ_ONE with up
// to 2 GiB per request, extent after extent: asking windows that grow
// from 1 MiB until one holds the first extent's end keeps each request's
// work small on a fragmented disk, and a long hole costs a few calls.
func (c *conn) extents(r *request) ([]Extent, error) {
	off, length := int64(r.off), int64(r.length)
	if r.flags&cmdFlagReqOne == 0 {
		return ExtentsOf(c.export.Backend, off, length)
	}
	for w := min(int64(1<<20), length); ; w = min(w*16, length) {
		xs, err := ExtentsOf(c.export.Backend, off, w)
		if err != nil || len(xs) != 1 || xs[0].Length < w || w == length {
			return xs, err
		}
	}
}

// blockStatus answers NBD_CMD_BLOCK_STATUS for base:allocation.
func (c *conn) blockStatus(r *request) {
	if !c.neg.structured {
		c.reply(r.handle, errInval, nil) // no structured replies: no block status
		return
	}
	if !c.blockStatusOK() {
		c.replyError(r.handle, errInval, "NBD_CMD_BLOCK_STATUS needs the base:allocation meta context selected with NBD_OPT_SET_META_CONTEXT for this export")
		return
	}
	if errno := c.checkFlags(r); errno != 0 {
		c.replyError(r.handle, errno, "unknown flag for NBD_CMD_BLOCK_STATUS")
		return
	}
	size := uint64(c.export.Backend.Size())
	if r.length == 0 || r.off > size || uint64(r.length) > size-r.off {
		c.replyError(r.handle, errInval, fmt.Sprintf("block status of %d bytes at %d: outside the %d-byte export or empty", r.length, r.off, size))
		return
	}
	xs, err := c.extents(r)
	if err != nil {
		c.replyError(r.handle, c.fail("block status", r, err), "block status failed")
		return
	}
	// Clip to the request, merge equal neighbours, bound the count.
	var out []Extent
	var pos int64
	for _, x := range xs {
		n := min(x.Length, int64(r.length)-pos)
		if n <= 0 {
			break
		}
		x.Length = n
		out = AppendExtent(out, x)
		pos += n
		if len(out) >= MaxExtents {
			break
		}
	}
	if len(out) == 0 {
		out = []Extent{{Length: int64(r.length)}}
	}
	if r.flags&cmdFlagReqOne != 0 {
		out = out[:1]
	}
	b := chunk(nil, replyFlagDone, replyTypeBlockStatus, r.handle, uint32(4+8*len(out)))
	b = binary.BigEndian.AppendUint32(b, metaAllocationID)
	for _, x := range out {
		var st uint32
		if x.Hole {
			st |= stateHole
		}
		if x.Zero {
			st |= stateZero
		}
		b = binary.BigEndian.AppendUint32(b, uint32(x.Length))
		b = binary.BigEndian.AppendUint32(b, st)
	}
	c.send(b, nil)
}

// fastZero runs a WRITE_ZEROES with NBD_CMD_FLAG_FAST_ZERO: punched or
// recorded if the backend can do it fast, else NBD_ENOTSUP at once with
// nothing changed. NO_HOLE ranges must stay allocated, which is never
// faster than a write here.
func (c *conn) fastZero(r *request) uint32 {
	if r.flags&cmdFlagNoHole != 0 {
		return errNotSup
	}
	err := WriteZeroesFast(c.export.Backend, int64(r.off), int64(r.length))
	if errors.Is(err, ErrNotFast) {
		return errNotSup
	}
	if err != nil {
		return c.fail("fast zero", r, err)
	}
	if r.flags&cmdFlagFUA != 0 {
		if err := c.export.Backend.Flush(); err != nil {
			return c.fail("flush", r, err)
		}
	}
	return 0
}
