package grpc

import (
	"bytes"
	"context"
	"fmt"
	mrand "math/rand/v2"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/grpc/pb"
	ggrpc "google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

func batchReq(recs ...*pb.Record) *pb.ReplicateRequest {
	return &pb.ReplicateRequest{Body: &pb.ReplicateRequest_Batch{Batch: &pb.Batch{Records: recs}}}
}

// randData returns n bytes of a seeded random sequence.
func randData(n int, seed uint64) []byte {
	b := make([]byte, n)
	r := mrand.New(mrand.NewPCG(seed, 2))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// codecCases are messages the codec must encode and decode as proto does.
func codecCases() map[string]proto.Message {
	many := make([]*pb.Record, 1000)
	for i := range many {
		n := []int{0, 1, inlineData - 1, inlineData, 4096, 65537}[i%6]
		many[i] = &pb.Record{Seq: 1<<40 + uint64(i), Time: -int64(i), Kind: uint32(rebound.RecordWrite), Disk: uint32(i % 3),
			Offset: int64(i) << 20, Length: int64(n), Data: randData(n, uint64(i))}
	}
	big := make([]*pb.Record, 4)
	for i := range big {
		big[i] = &pb.Record{Seq: uint64(i + 1), Kind: uint32(rebound.RecordWrite), Offset: int64(i) << 22, Length: 4 << 20, Data: randData(4<<20, uint64(i))}
	}
	return map[string]proto.Message{
		"empty batch": batchReq(),
		"zero-length records": batchReq(
			&pb.Record{},
			&pb.Record{Seq: 1, Kind: uint32(rebound.RecordZero), Length: 4096, Data: []byte{}},
			&pb.Record{Seq: 2, Kind: uint32(rebound.RecordTrim), Offset: -1, Length: 1 << 62},
		),
		"many records": batchReq(many...),
		"big records":  batchReq(big...),
		"points": batchReq(
			&pb.Record{Seq: 7, Time: 1700000000000, Kind: uint32(rebound.RecordMark), PointKind: string(rebound.PointCrash)},
			&pb.Record{Seq: 8, Kind: uint32(rebound.RecordMark), PointKind: string(rebound.PointApp)},
			&pb.Record{Seq: 12, Kind: uint32(rebound.RecordResyncBegin), PointKind: string(rebound.ResyncSourceCrash)},
			&pb.Record{Seq: 13, Kind: uint32(rebound.RecordWrite), Length: 600, Data: randData(600, 13), PointKind: "é✓"},
		),
		"hello":     &pb.ReplicateRequest{Body: &pb.ReplicateRequest_Hello{Hello: &pb.ReplHello{Version: 1, StreamId: "vm1", SourceSite: "site-a", Generation: "g2"}}},
		"no body":   &pb.ReplicateRequest{},
		"nil batch": &pb.ReplicateRequest{Body: &pb.ReplicateRequest_Batch{}},
		"nil record": batchReq(&pb.Record{Seq: 1}, nil, &pb.Record{Seq: 3, Length: inlineData,
			Data: randData(inlineData, 3)}),
		"ack":       &pb.ReplicateResponse{Body: &pb.ReplicateResponse_Ack{Ack: &pb.Ack{DurableSeq: 99}}},
		"hello ack": &pb.ReplicateResponse{Body: &pb.ReplicateResponse_HelloAck{HelloAck: &pb.HelloAck{Version: 1, DurableSeq: 3, Repair: &pb.RepairRequest{LostFrom: 1, LostTo: 2, Digests: [][]byte{{1, 2}}}}}},
	}
}

func newOf(m proto.Message) proto.Message { return m.ProtoReflect().New().Interface() }

// chunked cuts b into buffers of n bytes, as the transport delivers a
// message (one per HTTP/2 data frame).
func chunked(b []byte, n int) mem.BufferSlice {
	var out mem.BufferSlice
	for len(b) > 0 {
		k := min(n, len(b))
		out = append(out, mem.SliceBuffer(b[:k:k]))
		b = b[k:]
	}
	return out
}

// TestCodec_WireIdentical: Marshal writes proto.Marshal's bytes, Unmarshal
// gives proto.Unmarshal's message, and each side reads what the standard
// codec writes.
func TestCodec_WireIdentical(t *testing.T) {
	for name, m := range codecCases() {
		t.Run(name, func(t *testing.T) {
			want, err := proto.Marshal(m)
			if err != nil {
				t.Fatal(err)
			}
			out, err := codec{}.Marshal(m)
			if err != nil {
				t.Fatal(err)
			}
			if got := out.Materialize(); !bytes.Equal(got, want) {
				t.Fatalf("marshal: %d bytes differ from proto.Marshal's %d", len(got), len(want))
			}
			wantMsg := newOf(m)
			if err := proto.Unmarshal(want, wantMsg); err != nil {
				t.Fatal(err)
			}
			for _, n := range []int{1, 7, 16 << 10, len(want) + 1} {
				if n < 16<<10 && len(want) > 64<<10 {
					continue // tiny buffers of megabytes: slow, and prove nothing more
				}
				got := newOf(m)
				if err := (codec{}).Unmarshal(chunked(want, n), got); err != nil {
					t.Fatalf("unmarshal in %d-byte buffers: %v", n, err)
				}
				if !proto.Equal(got, wantMsg) {
					t.Fatalf("unmarshal in %d-byte buffers differs from proto.Unmarshal", n)
				}
			}
			// Against gRPC's own codec, both ways.
			stdOut, err := stdCodec.Marshal(m)
			if err != nil {
				t.Fatal(err)
			}
			got := newOf(m)
			if err := (codec{}).Unmarshal(stdOut, got); err != nil || !proto.Equal(got, wantMsg) {
				t.Fatalf("codec reads the standard codec's output: err %v, equal %v", err, proto.Equal(got, wantMsg))
			}
			stdOut.Free()
			got = newOf(m)
			if err := stdCodec.Unmarshal(out, got); err != nil || !proto.Equal(got, wantMsg) {
				t.Fatalf("standard codec reads the codec's output: err %v, equal %v", err, proto.Equal(got, wantMsg))
			}
		})
	}
	if n := (codec{}).Name(); n != stdCodec.Name() || n != "proto" {
		t.Fatalf("name %q: the content-type must stay the proto codec's", n)
	}
}

// TestCodec_NonCanonical: valid encodings proto.Marshal does not write
// (unknown fields, repeated scalars, a merged batch, a known field of
// another wire type) decode as proto.Unmarshal decodes them, and a batch
// holding unknown fields or a bad string marshals as proto.Marshal does.
func TestCodec_NonCanonical(t *testing.T) {
	rec := func(fields ...[]byte) []byte { return bytes.Join(fields, nil) }
	varint := func(num protowire.Number, v uint64) []byte {
		return protowire.AppendVarint(protowire.AppendTag(nil, num, protowire.VarintType), v)
	}
	lenField := func(num protowire.Number, v []byte) []byte {
		return protowire.AppendBytes(protowire.AppendTag(nil, num, protowire.BytesType), v)
	}
	batch := func(recs ...[]byte) []byte {
		var b []byte
		for _, r := range recs {
			b = append(b, lenField(fBatchRecords, r)...)
		}
		return lenField(fReqBatch, b)
	}
	data := randData(1000, 1)
	good := rec(varint(fSeq, 5), lenField(fData, data))
	hello := lenField(1, lenField(2, []byte("vm1")))
	for name, wire := range map[string][]byte{
		"unknown record field": batch(rec(good, varint(99, 1))),
		"unknown batch field":  append(batch(good), varint(3, 1)...),
		"seq twice":            batch(rec(varint(fSeq, 1), good, varint(fSeq, 9))),
		"data twice":           batch(rec(good, lenField(fData, []byte("x")), lenField(fData, nil))),
		"batch twice (merged)": append(batch(good), batch(good, good)...),
		"hello then batch":     append(hello, batch(good)...),
		"batch then hello":     append(batch(good), hello...),
		"seq as bytes":         batch(rec(lenField(fSeq, []byte("abc")), good)),
		"data as varint":       batch(rec(varint(fData, 3))),
		"batch as varint":      varint(fReqBatch, 1),
		"long varints":         batch(rec(append(protowire.AppendTag(nil, fSeq, protowire.VarintType), 0x85, 0x80, 0x80, 0x00))),
		"empty":                nil,
	} {
		want := &pb.ReplicateRequest{}
		if err := proto.Unmarshal(wire, want); err != nil {
			t.Fatalf("%s: test input is invalid: %v", name, err)
		}
		got := &pb.ReplicateRequest{}
		if err := (codec{}).Unmarshal(chunked(wire, 100), got); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !proto.Equal(got, want) {
			t.Fatalf("%s: decoded %v, proto.Unmarshal %v", name, got, want)
		}
	}

	withUnknown := batchReq(&pb.Record{Seq: 1, Length: 600, Data: data[:600]})
	withUnknown.GetBatch().Records[0].ProtoReflect().SetUnknown(varint(99, 7))
	out, err := codec{}.Marshal(withUnknown)
	if want, _ := proto.Marshal(withUnknown); err != nil || !bytes.Equal(out.Materialize(), want) {
		t.Fatalf("unknown fields: %v", err)
	}
	badUTF8 := batchReq(&pb.Record{Seq: 1, Kind: 4, PointKind: "\xff"})
	if _, err := (codec{}).Marshal(badUTF8); err == nil {
		t.Fatal("a point kind of invalid UTF-8 marshalled")
	} else if _, perr := proto.Marshal(badUTF8); perr == nil {
		t.Fatal("proto.Marshal took invalid UTF-8")
	}
}

// TestCodec_MarshalReferencesData: a payload of inlineData bytes or more
// goes out as the record's own memory, not a copy; smaller ones are copied
// into the framing.
func TestCodec_MarshalReferencesData(t *testing.T) {
	m := codecCases()["many records"].(*pb.ReplicateRequest)
	out, err := codec{}.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	aliased := map[*byte]int{}
	for _, b := range out {
		if d := b.ReadOnlyData(); len(d) > 0 {
			aliased[&d[0]] = len(d)
		}
	}
	refs := 0
	for i, r := range m.GetBatch().Records {
		if len(r.Data) == 0 {
			continue
		}
		n, ok := aliased[&r.Data[0]]
		switch {
		case len(r.Data) >= inlineData && (!ok || n != len(r.Data)):
			t.Fatalf("record %d: its %d bytes were copied", i, len(r.Data))
		case len(r.Data) < inlineData && ok:
			t.Fatalf("record %d: its %d bytes got a buffer of their own", i, len(r.Data))
		}
		if ok {
			refs++
		}
	}
	if refs == 0 || len(out) < 2*refs || len(out) > 2*refs+1 {
		t.Fatalf("%d buffers for %d referenced payloads", len(out), refs)
	}
}

// dataOffsets returns where each record's data starts in wire (a batch
// proto.Marshal wrote), -1 for records without data.
func dataOffsets(t *testing.T, wire []byte, recs []*pb.Record) []int {
	t.Helper()
	var offs []int
	pos := 0
	for _, r := range recs {
		if len(r.Data) == 0 {
			offs = append(offs, -1)
			continue
		}
		i := bytes.Index(wire[pos:], r.Data)
		if i < 0 {
			t.Fatal("payload not in the wire bytes")
		}
		offs = append(offs, pos+i)
		pos += i + len(r.Data)
	}
	return offs
}

// TestCodec_UnmarshalAliases: every decoded Data points into one buffer
// laid out like the message (its offset from the first equals the wire's),
// none into gRPC's buffers, which may be reused once Unmarshal returns.
func TestCodec_UnmarshalAliases(t *testing.T) {
	var recs []*pb.Record
	for i := range 40 {
		n := 1 + i*997 // odd sizes: separate allocations could not line up like this
		recs = append(recs, &pb.Record{Seq: uint64(i + 1), Kind: 1, Length: int64(n), Data: randData(n, uint64(i))})
		if i%2 == 1 {
			recs[i].PointKind = "app" // a field after the data, in the same record
		}
	}
	m := batchReq(recs...)
	wire, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	offs := dataOffsets(t, wire, recs)
	in := chunked(append([]byte(nil), wire...), 16<<10)
	got := &pb.ReplicateRequest{}
	if err := (codec{}).Unmarshal(in, got); err != nil {
		t.Fatal(err)
	}
	for _, b := range in { // as gRPC's pool may once Unmarshal returned
		d := b.ReadOnlyData()
		for i := range d {
			d[i] = 0xee
		}
	}
	grecs := got.GetBatch().Records
	base := uintptr(unsafe.Pointer(&grecs[0].Data[0])) - uintptr(offs[0])
	for i, r := range grecs {
		if !bytes.Equal(r.Data, recs[i].Data) {
			t.Fatalf("record %d: data changed when gRPC's buffers were reused", i)
		}
		if p := uintptr(unsafe.Pointer(&r.Data[0])); p != base+uintptr(offs[i]) {
			t.Fatalf("record %d: data at %#x, want %#x: not aliasing the one message buffer", i, p, base+uintptr(offs[i]))
		}
		if cap(r.Data) != len(r.Data) {
			t.Fatalf("record %d: cap %d > len %d: an append would overwrite the next field", i, cap(r.Data), len(r.Data))
		}
		for _, b := range in {
			d := b.ReadOnlyData()
			if p := uintptr(unsafe.Pointer(&r.Data[0])); p >= uintptr(unsafe.Pointer(&d[0])) && p < uintptr(unsafe.Pointer(&d[0]))+uintptr(len(d)) {
				t.Fatalf("record %d aliases gRPC's buffer", i)
			}
		}
	}
}

// A released batch's buffer is reused by the next batch decoded; one not
// released keeps its data, whatever is decoded after it.
func TestCodec_ReleaseReuses(t *testing.T) {
	decode := func(seed uint64) (*pb.Batch, []*pb.Record) {
		t.Helper()
		var recs []*pb.Record
		for i := range 8 {
			n := 64<<10 + i
			recs = append(recs, &pb.Record{Seq: seed*100 + uint64(i), Kind: 1, Length: int64(n), Data: randData(n, seed*100+uint64(i))})
		}
		wire, err := proto.Marshal(batchReq(recs...))
		if err != nil {
			t.Fatal(err)
		}
		got := &pb.ReplicateRequest{}
		if err := (codec{}).Unmarshal(chunked(wire, 16<<10), got); err != nil {
			t.Fatal(err)
		}
		return got.GetBatch(), recs
	}
	same := func(t *testing.T, b *pb.Batch, want []*pb.Record) {
		t.Helper()
		for i, r := range b.Records {
			if r.Seq != want[i].Seq || !bytes.Equal(r.Data, want[i].Data) {
				t.Fatalf("record %d of batch %d changed", i, want[0].Seq/100)
			}
		}
	}
	a, _ := decode(1)
	releaseBatch(a)
	b, bw := decode(2) // most likely in a's buffer
	same(t, b, bw)
	c, cw := decode(3) // b still held: c must not get its buffer
	same(t, b, bw)
	same(t, c, cw)
	if _, ok := batchBufs.Load(b); !ok {
		t.Fatal("an unreleased batch lost its buffer's entry")
	}
	releaseBatch(b)
	releaseBatch(c)
	releaseBatch(c) // twice: harmless
	if _, ok := batchBufs.Load(b); ok {
		t.Fatal("a released batch is still mapped")
	}
}

// malformed are inputs both proto.Unmarshal and the codec must refuse.
func malformed() map[string][]byte {
	good, _ := proto.Marshal(batchReq(&pb.Record{Seq: 1, Kind: 1, Length: 3, Data: []byte("abc"), PointKind: "app"}, &pb.Record{Seq: 2}))
	tag := func(num protowire.Number, typ protowire.Type) []byte { return protowire.AppendTag(nil, num, typ) }
	wrap := func(rec []byte) []byte { // rec as the one record of a batch
		b := protowire.AppendBytes(tag(fBatchRecords, protowire.BytesType), rec)
		return protowire.AppendBytes(tag(fReqBatch, protowire.BytesType), b)
	}
	cases := map[string][]byte{
		"bad tag varint":       {0x92, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80},
		"bad length varint":    append(tag(fReqBatch, protowire.BytesType), 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02),
		"batch length too big": protowire.AppendVarint(tag(fReqBatch, protowire.BytesType), 1<<40),
		"data length too big":  wrap(protowire.AppendVarint(tag(fData, protowire.BytesType), 1<<31)),
		"data length > int64":  wrap(protowire.AppendVarint(tag(fData, protowire.BytesType), 1<<63)),
		"seq varint overflow":  wrap(append(tag(fSeq, protowire.VarintType), 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02)),
		"seq varint truncated": wrap(append(tag(fSeq, protowire.VarintType), 0xff)),
		"field number 0":       wrap([]byte{0x00, 0x01}),
		"wire type 6":          wrap(append(tag(fSeq, 6), 0)),
		"wire type 7 in batch": protowire.AppendBytes(tag(fReqBatch, protowire.BytesType), append(tag(fBatchRecords, 7), 0)),
		"end group alone":      wrap(tag(fSeq, protowire.EndGroupType)),
		"start group unclosed": wrap(tag(fSeq, protowire.StartGroupType)),
		"point kind bad UTF-8": wrap(protowire.AppendBytes(tag(fPointKind, protowire.BytesType), []byte{0xc3, 0x28})),
		"fixed32 truncated":    wrap(append(tag(fDisk, protowire.Fixed32Type), 1, 2)),
	}
	r := append(tag(fReqBatch, protowire.BytesType), 4)
	r = append(r, tag(fBatchRecords, protowire.BytesType)...)
	cases["record length too big"] = append(r, 100, 0x08, 0x01)
	for i := 1; i < len(good); i++ {
		cases[fmt.Sprintf("truncated to %d", i)] = good[:i]
	}
	return cases
}

// TestCodec_Malformed: bad bytes give an error, never a panic, and the
// error is proto.Unmarshal's.
func TestCodec_Malformed(t *testing.T) {
	for name, wire := range malformed() {
		perr := proto.Unmarshal(wire, &pb.ReplicateRequest{})
		if perr == nil {
			t.Fatalf("%s: test input is valid", name)
		}
		err := (codec{}).Unmarshal(chunked(wire, 3), &pb.ReplicateRequest{})
		if err == nil {
			t.Fatalf("%s: decoded", name)
		}
		if err.Error() != perr.Error() {
			t.Fatalf("%s: error %q, proto.Unmarshal's %q", name, err, perr)
		}
	}
}

// FuzzCodecUnmarshal: on any bytes the codec agrees with proto.Unmarshal
// (both fail, or both give equal messages), and what it decodes it
// marshals back as proto.Marshal does.
func FuzzCodecUnmarshal(f *testing.F) {
	for name, m := range codecCases() {
		if _, ok := m.(*pb.ReplicateRequest); !ok || name == "many records" || name == "big records" {
			continue
		}
		b, err := proto.Marshal(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, uint16(7))
	}
	for _, b := range malformed() {
		f.Add(b, uint16(3))
	}
	f.Fuzz(func(t *testing.T, wire []byte, cut uint16) {
		want := &pb.ReplicateRequest{}
		perr := proto.Unmarshal(wire, want)
		got := &pb.ReplicateRequest{}
		in := chunked(wire, int(cut)+1)
		err := (codec{}).Unmarshal(in, got)
		if (err == nil) != (perr == nil) {
			t.Fatalf("codec error %v, proto.Unmarshal's %v", err, perr)
		}
		if err != nil {
			return
		}
		if !proto.Equal(got, want) {
			t.Fatalf("decoded %v, proto.Unmarshal %v", got, want)
		}
		out, err := codec{}.Marshal(got)
		pout, perr := proto.Marshal(want)
		if (err == nil) != (perr == nil) {
			t.Fatalf("marshal error %v, proto.Marshal's %v", err, perr)
		}
		if err == nil && !bytes.Equal(out.Materialize(), pout) {
			t.Fatal("marshal differs from proto.Marshal")
		}
	})
}

// rawMsg is a message already in wire form, for a client that sends bytes
// the Sender never would.
type rawMsg []byte

type rawCodec struct{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	if b, ok := v.(rawMsg); ok {
		return mem.BufferSlice{mem.SliceBuffer(b)}, nil
	}
	return stdCodec.Marshal(v)
}
func (rawCodec) Unmarshal(d mem.BufferSlice, v any) error { return stdCodec.Unmarshal(d, v) }
func (rawCodec) Name() string                             { return "proto" }

var _ encoding.CodecV2 = rawCodec{}

// TestReplicate_CodecInterop: a Sender (this codec, uncompressed, so its
// referenced payloads go straight to the transport) feeds a server on
// gRPC's standard codec, and a client on the standard codec feeds a
// server on this one; both sinks get every record intact. A malformed
// batch ends the stream with a status, and the server goes on serving.
func TestReplicate_CodecInterop(t *testing.T) {
	e := newEnv(t)
	_, cli := e.site(t, "site-a", "site-b")
	src := newMemSource()
	const n = 60
	for i := range n {
		src.add(testRecord(i))
	}

	stdSink := newMemSink()
	stdSrv, _ := newReplServer(t, e, stdSink, ggrpc.ForceServerCodecV2(stdCodec))
	s := &Sender{Addr: stdSrv.addr, TLS: cli, StreamID: "vm1", SourceSite: "site-a", Source: src, BatchBytes: 32 << 10, Compression: CompressNone}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- s.Run(ctx) }()
	waitFor(t, 20*time.Second, "all records acked", func() bool { return s.Stats().AckedSeq == n })
	cancel()
	<-done
	checkSink(t, stdSink, src, n)

	sink := newMemSink()
	srv, _ := newReplServer(t, e, sink)
	// A client on gRPC's standard codec (rawCodec hands it every message
	// but rawMsg).
	cc, err := ggrpc.NewClient(srv.addr, ggrpc.WithTransportCredentials(credentials.NewTLS(cli)), ggrpc.WithDefaultCallOptions(ggrpc.ForceCodecV2(rawCodec{})))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	rctx, rcancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer rcancel()
	open := func() pb.Replication_ReplicateClient {
		st, err := pb.NewReplicationClient(cc).Replicate(rctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := st.Send(&pb.ReplicateRequest{Body: &pb.ReplicateRequest_Hello{Hello: &pb.ReplHello{Version: ProtocolVersion, StreamId: "vm1", SourceSite: "site-a"}}}); err != nil {
			t.Fatal(err)
		}
		if m, err := st.Recv(); err != nil || m.GetHelloAck() == nil {
			t.Fatalf("hello: %v %v", m, err)
		}
		return st
	}
	st := open()
	for i := 0; i < n; i += 7 {
		var recs []*pb.Record
		for _, r := range src.recs[i:min(i+7, n)] {
			recs = append(recs, &pb.Record{Seq: r.Seq, Time: r.Time, Kind: uint32(r.Kind), Disk: r.Disk, Offset: r.Offset, Length: r.Length, Data: r.Data, PointKind: string(r.PointKind)})
		}
		if err := st.Send(batchReq(recs...)); err != nil {
			t.Fatal(err)
		}
		if m, err := st.Recv(); err != nil || m.GetAck().GetDurableSeq() != recs[len(recs)-1].Seq {
			t.Fatalf("ack: %v %v", m, err)
		}
	}
	st.CloseSend()
	checkSink(t, sink, src, n)

	for name, wire := range map[string][]byte{"truncated": {0x12, 0x05, 0x0a}, "bad varint": malformed()["seq varint overflow"]} {
		st := open()
		if err := st.SendMsg(rawMsg(wire)); err != nil {
			t.Fatal(err)
		}
		_, err := st.Recv()
		if status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "unmarshal") {
			t.Fatalf("%s: %v", name, err)
		}
		if sink.Durable() != n {
			t.Fatalf("%s: sink moved to %d", name, sink.Durable())
		}
	}
	// The server still takes a good stream.
	st = open()
	if err := st.Send(batchReq(&pb.Record{Seq: n + 1, Kind: uint32(rebound.RecordMark), PointKind: string(rebound.PointApp)})); err != nil {
		t.Fatal(err)
	}
	if m, err := st.Recv(); err != nil || m.GetAck().GetDurableSeq() != n+1 {
		t.Fatalf("after bad input: %v %v", m, err)
	}
	st.CloseSend()
}

// BenchmarkCodecBatch marshals and unmarshals a 4 MiB batch with gRPC's
// proto codec and with this one. Between the two the message is copied
// into 16 KiB buffers made once, as the transport reads it off the socket
// into HTTP/2 data frames: the same cost for both codecs.
func BenchmarkCodecBatch(b *testing.B) {
	for _, size := range []int{1 << 20, 4 << 10} {
		var recs []*pb.Record
		for i := range (4 << 20) / size {
			recs = append(recs, &pb.Record{Seq: uint64(i + 1), Time: 1700000000000 + int64(i), Kind: 1, Offset: int64(i) * int64(size), Length: int64(size), Data: randData(size, uint64(i))})
		}
		m := batchReq(recs...)
		wire, err := proto.Marshal(m)
		if err != nil {
			b.Fatal(err)
		}
		frames := chunked(make([]byte, len(wire)), 16<<10)
		for _, c := range []struct {
			name  string
			codec encoding.CodecV2
		}{{"std", stdCodec}, {"zerocopy", codec{}}} {
			b.Run(fmt.Sprintf("%dKiB/%s", size>>10, c.name), func(b *testing.B) {
				b.SetBytes(4 << 20)
				b.ReportAllocs()
				for b.Loop() {
					out, err := c.codec.Marshal(m)
					if err != nil {
						b.Fatal(err)
					}
					if n := copyTo(frames, out); n != len(wire) {
						b.Fatalf("marshalled %d bytes, want %d", n, len(wire))
					}
					out.Free()
					got := &pb.ReplicateRequest{}
					if err := c.codec.Unmarshal(frames, got); err != nil {
						b.Fatal(err)
					}
					if len(got.GetBatch().Records) != len(recs) {
						b.Fatal("records lost")
					}
					releaseBatch(got.GetBatch()) // as the server does once applied
				}
			})
		}
	}
}

// copyTo copies src into the buffers of dst in order and returns the
// bytes copied.
func copyTo(dst, src mem.BufferSlice) int {
	n, di, doff := 0, 0, 0
	for _, s := range src {
		p := s.ReadOnlyData()
		for len(p) > 0 && di < len(dst) {
			d := dst[di].ReadOnlyData()[doff:]
			k := copy(d, p)
			p, n, doff = p[k:], n+k, doff+k
			if k == len(d) {
				di, doff = di+1, 0
			}
		}
	}
	return n
}
