package nbd

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// optResult is one option reply.
type optResult struct {
	typ  uint32
	data []byte
}

// negotiate sends options one by one on a fresh connection and returns
// their replies (every reply up to the final ACK or error of each).
type negConn struct {
	t  *testing.T
	nc net.Conn
}

func dialNeg(t *testing.T, addr string) *negConn {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(nc, make([]byte, 18)); err != nil {
		t.Fatal(err)
	}
	if _, err := nc.Write(binary.BigEndian.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes)); err != nil {
		t.Fatal(err)
	}
	return &negConn{t: t, nc: nc}
}

// opt sends one option and reads replies until ACK or an error reply.
func (n *negConn) opt(opt uint32, data []byte) []optResult {
	n.t.Helper()
	if _, err := n.nc.Write(appendOpt(nil, opt, data)); err != nil {
		n.t.Fatal(err)
	}
	var out []optResult
	for {
		var h [20]byte
		if _, err := io.ReadFull(n.nc, h[:]); err != nil {
			n.t.Fatalf("option %d reply: %v", opt, err)
		}
		r := optResult{typ: binary.BigEndian.Uint32(h[12:]), data: make([]byte, binary.BigEndian.Uint32(h[16:]))}
		io.ReadFull(n.nc, r.data)
		out = append(out, r)
		if r.typ == repAck || r.typ&repFlagError != 0 {
			return out
		}
	}
}

func metaData(export string, queries ...string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	b = append(b, export...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

func goData(export string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	return append(append(b, export...), 0, 0)
}

// goExport enters transmission on export; it returns the transmission
// flags.
func (n *negConn) goExport(export string) uint16 {
	n.t.Helper()
	rs := n.opt(optGo, goData(export))
	if last := rs[len(rs)-1]; last.typ != repAck {
		n.t.Fatalf("GO %q: reply %#x %q", export, last.typ, last.data)
	}
	for _, r := range rs {
		if r.typ == repInfo && binary.BigEndian.Uint16(r.data) == infoExport {
			return binary.BigEndian.Uint16(r.data[10:])
		}
	}
	n.t.Fatal("no INFO_EXPORT")
	return 0
}

type chunkMsg struct {
	flags   uint16
	typ     uint16
	handle  uint64
	payload []byte
}

// readChunk reads one structured reply chunk.
func readChunk(t *testing.T, nc net.Conn) chunkMsg {
	t.Helper()
	var h [chunkHeaderSize]byte
	if _, err := io.ReadFull(nc, h[:]); err != nil {
		t.Fatalf("read chunk: %v", err)
	}
	if m := binary.BigEndian.Uint32(h[:]); m != structuredReplyMagic {
		t.Fatalf("chunk magic %#x", m)
	}
	c := chunkMsg{flags: binary.BigEndian.Uint16(h[4:]), typ: binary.BigEndian.Uint16(h[6:]), handle: binary.BigEndian.Uint64(h[8:])}
	c.payload = make([]byte, binary.BigEndian.Uint32(h[16:]))
	if _, err := io.ReadFull(nc, c.payload); err != nil {
		t.Fatal(err)
	}
	return c
}

// readReplyChunks reads the chunks of one reply (up to DONE).
func readReplyChunks(t *testing.T, nc net.Conn) []chunkMsg {
	t.Helper()
	var out []chunkMsg
	for {
		c := readChunk(t, nc)
		out = append(out, c)
		if c.flags&replyFlagDone != 0 {
			return out
		}
	}
}

func chunkErrno(t *testing.T, cs []chunkMsg) uint32 {
	t.Helper()
	last := cs[len(cs)-1]
	if last.typ != replyTypeError {
		t.Fatalf("want an error chunk, got type %d", last.typ)
	}
	return binary.BigEndian.Uint32(last.payload)
}

// TestNegotiation: meta context options and their bad input.
func TestNegotiation(t *testing.T) {
	ts := startServer(t, exportSpec{Name: "a", Size: 1 << 20}, exportSpec{Name: "b", Size: 1 << 20})
	n := dialNeg(t, ts.tcp)
	want := func(rs []optResult, typ uint32, what string) {
		t.Helper()
		if got := rs[len(rs)-1].typ; got != typ {
			t.Fatalf("%s: reply %#x (%q), want %#x", what, got, rs[len(rs)-1].data, typ)
		}
	}
	want(n.opt(optSetMetaContext, metaData("a", metaAllocation)), repErrInvalid, "SET before STRUCTURED_REPLY")
	want(n.opt(optStructuredReply, []byte{1}), repErrInvalid, "STRUCTURED_REPLY with data")
	want(n.opt(optStructuredReply, nil), repAck, "STRUCTURED_REPLY")
	want(n.opt(optSetMetaContext, []byte{0, 0, 0, 9, 'a'}), repErrInvalid, "truncated SET")
	want(n.opt(optSetMetaContext, append(metaData("a", metaAllocation), 7)), repErrInvalid, "SET with trailing bytes")
	want(n.opt(optSetMetaContext, metaData("a", "nocolon")), repErrInvalid, "query without namespace")
	rs := n.opt(optSetMetaContext, metaData("zzz", metaAllocation))
	want(rs, repErrUnknown, "SET for an unknown export")
	if !strings.Contains(string(rs[0].data), `no such export "zzz"`) {
		t.Errorf("unknown export message %q", rs[0].data)
	}
	// LIST: everything, by wildcard, by name; unknown namespaces ignored.
	for _, q := range [][]string{nil, {"base:"}, {metaAllocation, "qemu:dirty-bitmap:x"}} {
		rs := n.opt(optListMetaContext, metaData("a", q...))
		if len(rs) != 2 || rs[0].typ != repMetaContext || string(rs[0].data[4:]) != metaAllocation || rs[1].typ != repAck {
			t.Fatalf("LIST %q: %+v", q, rs)
		}
	}
	if rs := n.opt(optListMetaContext, metaData("a", "x-other:thing")); len(rs) != 1 || rs[0].typ != repAck {
		t.Fatalf("LIST of an unknown namespace: %+v", rs)
	}
	// SET of base: alone selects nothing.
	if rs := n.opt(optSetMetaContext, metaData("a", "base:")); len(rs) != 1 || rs[0].typ != repAck {
		t.Fatalf("SET base: %+v", rs)
	}
	rs = n.opt(optSetMetaContext, metaData("a", metaAllocation))
	if len(rs) != 2 || rs[0].typ != repMetaContext || binary.BigEndian.Uint32(rs[0].data) != metaAllocationID {
		t.Fatalf("SET base:allocation: %+v", rs)
	}
	// Selected for "a", but the client goes to "b": no block status.
	flags := n.goExport("b")
	if flags&tflagSendDF == 0 || flags&tflagSendCache == 0 || flags&tflagSendFastZero == 0 {
		t.Fatalf("transmission flags %#x lack DF, CACHE or FAST_ZERO", flags)
	}
	n.nc.Write(reqHeader(cmdBlockStatus, 0, 1, 0, 4096))
	if e := chunkErrno(t, readReplyChunks(t, n.nc)); e != errInval {
		t.Fatalf("block status for another export's context: errno %d", e)
	}

	// Without structured replies: no DF flag, simple replies, BLOCK_STATUS
	// and DF refused.
	n = dialNeg(t, ts.tcp)
	if flags := n.goExport("a"); flags&tflagSendDF != 0 {
		t.Fatalf("DF advertised without structured replies: %#x", flags)
	}
	var msg []byte
	msg = append(msg, reqHeader(cmdBlockStatus, 0, 1, 0, 4096)...)
	msg = append(msg, reqHeader(cmdRead, cmdFlagDF, 2, 0, 512)...)
	msg = append(msg, reqHeader(cmdCache, 0, 3, 0, 1<<20)...)
	msg = append(msg, reqHeader(cmdCache, 0, 4, 1<<20-1, 2)...)
	n.nc.Write(msg)
	wantErr := map[uint64]uint32{1: errInval, 2: errInval, 3: 0, 4: errInval}
	for range wantErr {
		errno, h := readReply(t, n.nc)
		if w, ok := wantErr[h]; !ok || errno != w {
			t.Fatalf("handle %d errno %d, want %d", h, errno, w)
		}
		delete(wantErr, h)
	}
}

// TestStructuredCommands: reads, block status, FAST_ZERO and CACHE on a
// connection with structured replies and base:allocation.
func TestStructuredCommands(t *testing.T) {
	const size = 1 << 20
	ts := startServer(t, exportSpec{Name: "a", Size: size})
	c := ts.dial(t, ts.tcpURI("a"))
	data := bytes.Repeat([]byte{0x5a}, 64<<10)
	if _, err := c.WriteAt(data, 256<<10); err != nil { // data at 256K..320K, holes around
		t.Fatal(err)
	}
	n := dialNeg(t, ts.tcp)
	n.opt(optStructuredReply, nil)
	n.opt(optSetMetaContext, metaData("a", metaAllocation))
	n.goExport("a")
	nc := n.nc

	// Block status of the whole disk: hole, data, hole.
	nc.Write(reqHeader(cmdBlockStatus, 0, 1, 0, size))
	cs := readReplyChunks(t, nc)
	if len(cs) != 1 || cs[0].typ != replyTypeBlockStatus || cs[0].handle != 1 {
		t.Fatalf("block status reply %+v", cs)
	}
	p := cs[0].payload[4:]
	type desc struct{ n, st uint32 }
	var ds []desc
	for ; len(p) >= 8; p = p[8:] {
		ds = append(ds, desc{binary.BigEndian.Uint32(p), binary.BigEndian.Uint32(p[4:])})
	}
	want := []desc{{256 << 10, stateHole | stateZero}, {64 << 10, 0}, {size - 320<<10, stateHole | stateZero}}
	if len(ds) != len(want) {
		t.Fatalf("descriptors %v, want %v", ds, want)
	}
	for i := range ds {
		if ds[i] != want[i] {
			t.Fatalf("descriptors %v, want %v", ds, want)
		}
	}
	// REQ_ONE: one descriptor, within the request.
	nc.Write(reqHeader(cmdBlockStatus, cmdFlagReqOne, 2, 4096, 8192))
	cs = readReplyChunks(t, nc)
	if l := len(cs[0].payload); l != 12 || binary.BigEndian.Uint32(cs[0].payload[4:]) != 8192 {
		t.Fatalf("REQ_ONE reply %x", cs[0].payload)
	}
	// Bad block status requests get error chunks; the connection stays.
	for i, h := range [][]byte{
		reqHeader(cmdBlockStatus, 0, 3, 0, 0),            // empty
		reqHeader(cmdBlockStatus, 0, 4, size-1, 2),       // past the end
		reqHeader(cmdBlockStatus, 0, 5, 1<<63, 1),        // offset overflow
		reqHeader(cmdBlockStatus, cmdFlagDF, 6, 0, 4096), // flag for READ
	} {
		nc.Write(h)
		cs := readReplyChunks(t, nc)
		if e := chunkErrno(t, cs); e != errInval || cs[0].handle != uint64(3+i) {
			t.Fatalf("bad block status %d: errno %d handle %d", i, e, cs[0].handle)
		}
	}

	// A read over hole and data: hole chunks and one data chunk.
	nc.Write(reqHeader(cmdRead, 0, 10, 128<<10, 256<<10))
	cs = readReplyChunks(t, nc)
	got := make([]byte, 256<<10)
	var holes int
	for _, ch := range cs {
		off := binary.BigEndian.Uint64(ch.payload) - 128<<10
		switch ch.typ {
		case replyTypeOffsetHole:
			holes++
			clear(got[off : off+uint64(binary.BigEndian.Uint32(ch.payload[8:]))])
		case replyTypeOffsetData:
			copy(got[off:], ch.payload[8:])
		default:
			t.Fatalf("read chunk type %d", ch.typ)
		}
	}
	if holes != 2 || !bytes.Equal(got[128<<10:192<<10], data) || !bytes.Equal(got[:128<<10], make([]byte, 128<<10)) {
		t.Fatalf("read over holes: %d hole chunks, data right %v", holes, bytes.Equal(got[128<<10:192<<10], data))
	}
	// DF: one data chunk with the zeroes in it.
	nc.Write(reqHeader(cmdRead, cmdFlagDF, 11, 128<<10, 256<<10))
	cs = readReplyChunks(t, nc)
	if len(cs) != 1 || cs[0].typ != replyTypeOffsetData || !bytes.Equal(cs[0].payload[8+128<<10:8+192<<10], data) {
		t.Fatalf("DF read: %d chunks, first type %d", len(cs), cs[0].typ)
	}
	// An empty read is one NONE chunk.
	nc.Write(reqHeader(cmdRead, 0, 13, 0, 0))
	if cs := readReplyChunks(t, nc); len(cs) != 1 || cs[0].typ != replyTypeNone || len(cs[0].payload) != 0 {
		t.Fatalf("empty read: %+v", cs)
	}
	// A bad read is an error chunk, not a simple reply.
	nc.Write(reqHeader(cmdRead, 0, 12, size-1, 2))
	if e := chunkErrno(t, readReplyChunks(t, nc)); e != errInval {
		t.Fatalf("read past end: errno %d", e)
	}

	// FAST_ZERO: a punch is fast; with NO_HOLE it is refused untouched.
	// CACHE: success.
	nc.Write(reqHeader(cmdWriteZeroes, cmdFlagFastZero|cmdFlagNoHole, 20, 256<<10, 4096))
	if errno, h := readReply(t, nc); errno != errNotSup || h != 20 {
		t.Fatalf("fast zero with NO_HOLE: errno %d handle %d", errno, h)
	}
	nc.Write(reqHeader(cmdWriteZeroes, cmdFlagFastZero, 21, 316<<10, 4096))
	if errno, h := readReply(t, nc); errno != 0 || h != 21 {
		t.Fatalf("fast zero: errno %d handle %d", errno, h)
	}
	nc.Write(reqHeader(cmdCache, 0, 22, 0, size))
	if errno, h := readReply(t, nc); errno != 0 || h != 22 {
		t.Fatalf("cache: errno %d handle %d", errno, h)
	}
	b := readFile(t, ts.files["a"])
	checkRange(t, b, 256<<10, 60<<10, 0x5a)
	checkRange(t, b, 316<<10, 4<<10, 0)

	// A backend that cannot zero fast refuses, untouched.
	mem := &memBackend{b: bytes.Repeat([]byte{1}, 8192)}
	s := &Server{Lookup: func(string) (*Export, error) { return &Export{Name: "m", Backend: mem}, nil }, Logger: ts.Logger}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(l)
	defer s.Close()
	mc := rawConn(t, l.Addr().String(), "m")
	mc.Write(reqHeader(cmdWriteZeroes, cmdFlagFastZero, 30, 0, 4096))
	if errno, h := readReply(t, mc); errno != errNotSup || h != 30 {
		t.Fatalf("fast zero on memBackend: errno %d handle %d", errno, h)
	}
	checkRange(t, mem.b, 0, 8192, 1)
}

// TestDefaultExport: the empty name is the only export; with several it
// is refused with a message naming them. LIST carries descriptions.
func TestDefaultExport(t *testing.T) {
	one := startServer(t, exportSpec{Name: "only", Size: 1 << 20})
	out := run(t, "nbdinfo", one.tcpURI(""))
	if !strings.Contains(out, "export-size: 1048576") || !strings.Contains(out, "description: disk only") {
		t.Fatalf("nbdinfo of the default export:\n%s", out)
	}
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x42 0 4k", one.tcpURI(""))
	checkRange(t, readFile(t, one.files["only"]), 0, 4096, 0x42)

	two := startServer(t, exportSpec{Name: "alpha", Size: 1 << 20}, exportSpec{Name: "beta", Size: 1 << 20})
	out, err := runErr(t, "qemu-io", "-f", "raw", "-c", "read 0 4k", two.tcpURI(""))
	if err == nil || !strings.Contains(out, "no default export") || !strings.Contains(out, "alpha, beta") {
		t.Fatalf("qemu-io on the default export of two: err=%v\n%s", err, out)
	}
	out = run(t, "nbdinfo", "--list", two.tcpURI(""))
	for _, w := range []string{"description: disk alpha", "description: disk beta"} {
		if !strings.Contains(out, w) {
			t.Errorf("nbdinfo --list lacks %q:\n%s", w, out)
		}
	}
}

// manyExtents alternates 512-byte data and zero extents, or with hole
// set is one hole; it records the lengths it was asked for.
type manyExtents struct {
	memBackend
	amu   sync.Mutex
	hole  bool
	asked []int64
}

func (m *manyExtents) Extents(off, length int64) ([]Extent, error) {
	m.amu.Lock()
	m.asked = append(m.asked, length)
	hole := m.hole
	m.amu.Unlock()
	if hole {
		return []Extent{{Length: length, Hole: true, Zero: true}}, nil
	}
	var out []Extent
	for pos := off; pos < off+length; pos += 512 {
		out = append(out, Extent{Length: min(512, off+length-pos), Zero: pos/512%2 == 1, Hole: pos/512%2 == 1})
	}
	return out, nil
}

// TestBlockStatusManyExtents: a reply carries at most MaxExtents
// descriptors, a prefix of the range; the client asks on from there.
func TestBlockStatusManyExtents(t *testing.T) {
	const size = 100000 * 512
	b := &manyExtents{memBackend: memBackend{b: make([]byte, size)}}
	s := &Server{Lookup: func(string) (*Export, error) { return &Export{Name: "m", Backend: b}, nil }}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(l)
	defer s.Close()
	n := dialNeg(t, l.Addr().String())
	n.opt(optStructuredReply, nil)
	n.opt(optSetMetaContext, metaData("m", metaAllocation))
	n.goExport("m")
	n.nc.Write(reqHeader(cmdBlockStatus, 0, 1, 0, size))
	cs := readReplyChunks(t, n.nc)
	p := cs[0].payload[4:]
	if len(p) != 8*MaxExtents {
		t.Fatalf("%d descriptors, want %d", len(p)/8, MaxExtents)
	}
	for i := 0; i < len(p); i += 8 {
		if l, st := binary.BigEndian.Uint32(p[i:]), binary.BigEndian.Uint32(p[i+4:]); l != 512 || st != uint32(i/8%2)*(stateHole|stateZero) {
			t.Fatalf("descriptor %d: %d bytes, status %d", i/8, l, st)
		}
	}
	// REQ_ONE (qemu) asks a 1 MiB window on a fragmented disk, and
	// windows growing x16 over one long hole, which comes back whole.
	b.amu.Lock()
	b.asked = nil
	b.amu.Unlock()
	n.nc.Write(reqHeader(cmdBlockStatus, cmdFlagReqOne, 2, 0, size))
	if cs := readReplyChunks(t, n.nc); len(cs[0].payload) != 12 || binary.BigEndian.Uint32(cs[0].payload[4:]) != 512 {
		t.Fatalf("REQ_ONE reply %x", cs[0].payload)
	}
	b.amu.Lock()
	if len(b.asked) != 1 || b.asked[0] != 1<<20 {
		t.Fatalf("REQ_ONE on fragments asked %v", b.asked)
	}
	b.asked, b.hole = nil, true
	b.amu.Unlock()
	n.nc.Write(reqHeader(cmdBlockStatus, cmdFlagReqOne, 3, 0, size))
	if cs := readReplyChunks(t, n.nc); len(cs[0].payload) != 12 || binary.BigEndian.Uint32(cs[0].payload[4:]) != size || binary.BigEndian.Uint32(cs[0].payload[8:]) != stateHole|stateZero {
		t.Fatalf("REQ_ONE reply over a hole %x", cs[0].payload)
	}
	b.amu.Lock()
	defer b.amu.Unlock()
	if want := []int64{1 << 20, 16 << 20, size}; fmt.Sprint(b.asked) != fmt.Sprint(want) {
		t.Fatalf("REQ_ONE over a hole asked %v, want %v", b.asked, want)
	}
}
