package grpc

import (
	"fmt"
	"sync"
	"unicode/utf8"

	"github.com/rebound-dr/rebound/grpc/pb"
	"google.golang.org/grpc/encoding"
	protoenc "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// codec is the gRPC codec of every Rebound connection (NewServer, Dial). It
// writes and reads the same protobuf bytes as gRPC's proto codec, under
// the same name, so a peer on the standard codec notices nothing; it only
// spares the copies of replication payloads. A batch (ReplicateRequest)
// is marshalled with each record's Data referenced, not copied, and
// unmarshalled with each Data aliasing the one buffer the message is read
// into, instead of copied out of it. Every other message, and any batch
// not in the canonical form, goes through proto.Marshal/Unmarshal.
type codec struct{}

// stdCodec is gRPC's proto codec (registered by the import), which codec
// delegates to.
var stdCodec = encoding.GetCodecV2(protoenc.Name)

// inlineData is the payload size below which Marshal copies a record's
// data into the framing buffer: a buffer of its own costs more than that.
const inlineData = 512

func (codec) Name() string { return protoenc.Name }

// Protobuf field numbers of pb.ReplicateRequest, pb.Batch and pb.Record.
const (
	fReqBatch     = 2
	fBatchRecords = 1
	fSeq          = 1
	fTime         = 2
	fKind         = 3
	fDisk         = 4
	fOffset       = 5
	fLength       = 6
	fData         = 7
	fPointKind    = 8
)

// Marshal writes a batch as proto.Marshal would: fields in number order,
// zero values left out. The framing goes to one buffer cut between the
// payloads, which are appended as buffers of their own. gRPC may read them
// after SendMsg returns (the transport writes later), so the records' Data
// must stay unchanged until the peer acks them: rebound.ReplSource.Read's
// contract.
func (codec) Marshal(v any) (mem.BufferSlice, error) {
	req, ok := v.(*pb.ReplicateRequest)
	if !ok {
		return stdCodec.Marshal(v)
	}
	b, ok := req.Body.(*pb.ReplicateRequest_Batch)
	if !ok || b.Batch == nil || !canonical(req, b.Batch) {
		return stdCodec.Marshal(v)
	}
	recs := b.Batch.Records
	sizes := make([]int, len(recs))
	batchSize, refd, nrefd := 0, 0, 0
	for i, r := range recs {
		sizes[i] = recordSize(r)
		batchSize += protowire.SizeTag(fBatchRecords) + protowire.SizeBytes(sizes[i])
		if len(r.Data) >= inlineData {
			refd += len(r.Data)
			nrefd++
		}
	}
	total := protowire.SizeTag(fReqBatch) + protowire.SizeBytes(batchSize)
	framing := total - refd // the bytes hdr holds: all but the referenced payloads
	hdr := make([]byte, 0, framing)
	hdr = protowire.AppendTag(hdr, fReqBatch, protowire.BytesType)
	hdr = protowire.AppendVarint(hdr, uint64(batchSize))
	// hdr is cut at each referenced payload; the pieces are capped slices
	// of it, so the appends after a cut do not touch them.
	pieces := make([]mem.SliceBuffer, 0, 2*nrefd+1)
	last := 0
	for i, r := range recs {
		hdr = protowire.AppendTag(hdr, fBatchRecords, protowire.BytesType)
		hdr = protowire.AppendVarint(hdr, uint64(sizes[i]))
		hdr = appendVarintField(hdr, fSeq, r.Seq)
		hdr = appendVarintField(hdr, fTime, uint64(r.Time))
		hdr = appendVarintField(hdr, fKind, uint64(r.Kind))
		hdr = appendVarintField(hdr, fDisk, uint64(r.Disk))
		hdr = appendVarintField(hdr, fOffset, uint64(r.Offset))
		hdr = appendVarintField(hdr, fLength, uint64(r.Length))
		if n := len(r.Data); n > 0 {
			hdr = protowire.AppendTag(hdr, fData, protowire.BytesType)
			hdr = protowire.AppendVarint(hdr, uint64(n))
			if n < inlineData {
				hdr = append(hdr, r.Data...)
			} else {
				pieces = append(pieces, hdr[last:len(hdr):len(hdr)], r.Data)
				last = len(hdr)
			}
		}
		if r.PointKind != "" {
			hdr = protowire.AppendTag(hdr, fPointKind, protowire.BytesType)
			hdr = protowire.AppendString(hdr, r.PointKind)
		}
	}
	if len(hdr) > last {
		pieces = append(pieces, hdr[last:])
	}
	// Pointers into one array: a SliceBuffer put in an interface as a value
	// would be one allocation per piece.
	out := make(mem.BufferSlice, len(pieces))
	for i := range pieces {
		out[i] = &pieces[i]
	}
	if len(hdr) != framing || out.Len() != total {
		// A record changed under Marshal: the caller broke the contract.
		return nil, fmt.Errorf("grpc codec: a record changed while its batch was marshalled (%d bytes of framing, expected %d)", len(hdr), framing)
	}
	return out, nil
}

// canonical reports whether Marshal may encode the batch itself: no
// unknown fields and no nil records (proto.Marshal's business), and
// point kinds valid UTF-8 (proto.Marshal's error).
func canonical(req *pb.ReplicateRequest, b *pb.Batch) bool {
	if len(req.ProtoReflect().GetUnknown()) > 0 || len(b.ProtoReflect().GetUnknown()) > 0 {
		return false
	}
	for _, r := range b.Records {
		if r == nil || len(r.ProtoReflect().GetUnknown()) > 0 || !utf8.ValidString(r.PointKind) {
			return false
		}
	}
	return true
}

func recordSize(r *pb.Record) int {
	n := varintFieldSize(fSeq, r.Seq) + varintFieldSize(fTime, uint64(r.Time)) +
		varintFieldSize(fKind, uint64(r.Kind)) + varintFieldSize(fDisk, uint64(r.Disk)) +
		varintFieldSize(fOffset, uint64(r.Offset)) + varintFieldSize(fLength, uint64(r.Length))
	if len(r.Data) > 0 {
		n += protowire.SizeTag(fData) + protowire.SizeBytes(len(r.Data))
	}
	if r.PointKind != "" {
		n += protowire.SizeTag(fPointKind) + protowire.SizeBytes(len(r.PointKind))
	}
	return n
}

func varintFieldSize(num protowire.Number, v uint64) int {
	if v == 0 {
		return 0
	}
	return protowire.SizeTag(num) + protowire.SizeVarint(v)
}

func appendVarintField(b []byte, num protowire.Number, v uint64) []byte {
	if v == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.VarintType)
	return protowire.AppendVarint(b, v)
}

// Unmarshal reads a message into one buffer, and a batch's records' Data
// alias it: gRPC frees data when Unmarshal returns, so the records must
// not point into its pooled buffers. The buffer of a batch comes from
// recvBufs and goes back there at releaseBatch, once the batch is applied
// (rebound.ReplSink.Append keeps no Data); a batch never released is left
// to the garbage collector. Anything but a canonical batch (a hello,
// unknown fields, a field twice, malformed bytes) is left to
// proto.Unmarshal, which copies what it keeps, so results and errors are
// the standard codec's.
func (codec) Unmarshal(data mem.BufferSlice, v any) error {
	req, ok := v.(*pb.ReplicateRequest)
	if !ok {
		return stdCodec.Unmarshal(data, v)
	}
	p := getRecvBuf(data.Len())
	buf := *p
	data.CopyTo(buf)
	if b, ok := decodeBatchRequest(buf); ok {
		req.Reset()
		req.Body = &pb.ReplicateRequest_Batch{Batch: b}
		batchBufs.Store(b, p)
		return nil
	}
	err := proto.Unmarshal(buf, req)
	recvBufs.Put(p)
	return err
}

// recvBufs holds the buffers batches are read into. A fresh buffer per
// 4 MiB message cost the receiver its zeroing and page faults, a tenth
// of its CPU; these are reused without clearing (every byte is written).
var recvBufs sync.Pool // *[]byte

// batchBufs maps a decoded batch to its buffer until releaseBatch.
var batchBufs sync.Map // *pb.Batch -> *[]byte

// getRecvBuf returns a pooled buffer of n bytes (capacity rounded up to
// 1 MiB, so batches of similar size reuse each other's).
func getRecvBuf(n int) *[]byte {
	if p, ok := recvBufs.Get().(*[]byte); ok && cap(*p) >= n {
		*p = (*p)[:n]
		return p
	}
	b := make([]byte, n, (n+1<<20-1)&^(1<<20-1))
	return &b
}

// releaseBatch returns b's buffer to the pool: nothing may use b's
// records' Data afterwards. A batch the codec did not decode is ignored.
func releaseBatch(b *pb.Batch) {
	if p, ok := batchBufs.LoadAndDelete(b); ok {
		recvBufs.Put(p)
	}
}

// decodeBatchRequest decodes a ReplicateRequest that is exactly one batch
// field. ok is false for anything else, valid or not.
func decodeBatchRequest(buf []byte) (*pb.Batch, bool) {
	num, typ, n := protowire.ConsumeTag(buf)
	if n < 0 || num != fReqBatch || typ != protowire.BytesType {
		return nil, false
	}
	body, m := protowire.ConsumeBytes(buf[n:])
	if m < 0 || n+m != len(buf) {
		return nil, false
	}
	off := n + m - len(body) // body's offset in buf
	count := 0
	for p := 0; p < len(body); count++ {
		num, typ, n := protowire.ConsumeTag(body[p:])
		if n < 0 || num != fBatchRecords || typ != protowire.BytesType {
			return nil, false
		}
		m := protowire.ConsumeFieldValue(num, typ, body[p+n:])
		if m < 0 {
			return nil, false
		}
		p += n + m
	}
	// One allocation for all records: they live and die together.
	slab := make([]pb.Record, count)
	b := &pb.Batch{}
	if count > 0 {
		b.Records = make([]*pb.Record, count)
	}
	for i, p := 0, 0; i < count; i++ {
		_, _, n := protowire.ConsumeTag(body[p:])
		rb, m := protowire.ConsumeBytes(body[p+n:])
		start := off + p + n + m - len(rb)
		if !decodeRecord(&slab[i], buf[start:start+len(rb):start+len(rb)]) {
			return nil, false
		}
		b.Records[i] = &slab[i]
		p += n + m
	}
	return b, true
}

// decodeRecord decodes a Record whose fields are all known; a field seen
// twice takes the last value, as in proto.Unmarshal.
func decodeRecord(r *pb.Record, b []byte) bool {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return false
		}
		b = b[n:]
		switch {
		case num >= fSeq && num <= fLength && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return false
			}
			b = b[n:]
			switch num {
			case fSeq:
				r.Seq = v
			case fTime:
				r.Time = int64(v)
			case fKind:
				r.Kind = uint32(v)
			case fDisk:
				r.Disk = uint32(v)
			case fOffset:
				r.Offset = int64(v)
			case fLength:
				r.Length = int64(v)
			}
		case (num == fData || num == fPointKind) && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return false
			}
			b = b[n:]
			if num == fPointKind {
				if !utf8.Valid(v) {
					return false
				}
				r.PointKind = string(v) // a copy: a string must not alias the buffer
			} else if len(v) == 0 {
				r.Data = nil
			} else {
				r.Data = v[:len(v):len(v)] // capped: an append must not run into the next field
			}
		default:
			return false
		}
	}
	return true
}
