package grpc

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/grpc/pb"
	"github.com/rebound-dr/rebound/internal/failpoint"
	"github.com/rebound-dr/rebound/pki"
	ggrpc "google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/status"
)

// ReplicationServer receives replication streams on a site's listener.
// A stream is accepted only from the site the server made its source, for
// the source copy's generation the target was set up with; see
// docs/design/security.md.
type ReplicationServer struct {
	// Target returns a stream this site is the target of, or an error
	// (ENOTFOUND for a stream it does not hold).
	Target func(streamID string) (Target, error)
	// OnRefuse, if set, hears of every stream refused to a peer holding a
	// valid certificate (the site reports it to the server as an event).
	OnRefuse func(Refusal)

	mu    sync.Mutex
	locks map[string]*sync.Mutex // per stream: one writer at a time

	pb.UnimplementedReplicationServer
}

// Register adds the Replication service to s.
func (r *ReplicationServer) Register(s *ggrpc.Server) { pb.RegisterReplicationServer(s, r) }

func (r *ReplicationServer) lock(streamID string) *sync.Mutex {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.locks == nil {
		r.locks = make(map[string]*sync.Mutex)
	}
	l := r.locks[streamID]
	if l == nil {
		l = new(sync.Mutex)
		r.locks[streamID] = l
	}
	return l
}

// Target is a stream a site receives and who may feed it.
type Target struct {
	Sink    rebound.ReplSink
	Machine string
	// SourceSite is the only site (or agent) whose certificate may feed the
	// stream: the target spec's PeerSite.
	SourceSite string
	// Generation is the source copy's generation the target was set up
	// for; the source's hello must carry it. Empty (state written before
	// generations) skips the check.
	Generation string
}

// Refusal is a stream refused to a peer that holds a valid certificate.
type Refusal struct {
	StreamID string
	Machine  string // empty when the stream is unknown
	Peer     pki.Identity
	Reason   string
}

// Replicate receives one stream connection. Batches are validated against
// the sink's durable position and appended; several batches that arrived
// together are appended at once (one fsync), then acknowledged.
func (r *ReplicationServer) Replicate(stream pb.Replication_ReplicateServer) error {
	id, err := peerSiteOrAgent(stream.Context())
	if err != nil {
		return err
	}
	site := id.Name
	first, err := recvFirst(stream.Recv)
	if err != nil {
		return err
	}
	hello := first.GetHello()
	if hello == nil {
		return status.Error(codes.InvalidArgument, "replicate: first message must be a hello")
	}
	if err := checkVersion("replicate", hello.Version); err != nil {
		return err
	}
	tgt, err := r.Target(hello.StreamId)
	if err == nil && tgt.Sink == nil {
		err = rebound.Errorf(rebound.ENOTFOUND, "no sink")
	}
	if err != nil {
		if rebound.ErrorCode(err) == rebound.ENOTFOUND {
			return status.Errorf(codes.NotFound, "replicate: this site holds no stream %q", hello.StreamId)
		}
		return toStatus(err)
	}
	if hello.SourceSite != site {
		return r.refuse(Refusal{StreamID: hello.StreamId, Machine: tgt.Machine, Peer: id,
			Reason: fmt.Sprintf("certificate is for site %q, hello says %q", site, hello.SourceSite)})
	}
	if reason := admit(id, hello, tgt); reason != "" {
		return r.refuse(Refusal{StreamID: hello.StreamId, Machine: tgt.Machine, Peer: id, Reason: reason})
	}
	sink := tgt.Sink
	slog.Debug("replication stream connected", "stream", hello.StreamId, "from", site)
	lock := r.lock(hello.StreamId)
	helloAck := &pb.HelloAck{Version: ProtocolVersion, DurableSeq: sink.Durable()}
	if rs, ok := sink.(rebound.RepairSink); ok {
		// A journal that dropped damaged records asks for its repair on
		// every connect until the repair resync has begun.
		req, err := rs.RepairRequest(stream.Context())
		if err != nil {
			return toStatus(fmt.Errorf("replicate: repair digests: %w", err))
		}
		if req != nil {
			helloAck.Repair = &pb.RepairRequest{LostFrom: req.From, LostTo: req.To, BlockSize: req.BlockSize, Digests: req.Digests}
		}
	}
	if err := stream.Send(&pb.ReplicateResponse{Body: &pb.ReplicateResponse_HelloAck{HelloAck: helloAck}}); err != nil {
		return err
	}

	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	batches := make(chan *pb.Batch, 8)
	recvErr := make(chan error, 1)
	// Every batch received goes back to the codec's pool once applied or
	// dropped; the receiver closes batches when it ends.
	defer func() {
		go func() {
			for b := range batches {
				releaseBatch(b)
			}
		}()
	}()
	go func() {
		defer close(batches)
		for {
			m, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			b := m.GetBatch()
			if b == nil {
				recvErr <- status.Errorf(codes.InvalidArgument, "replicate: expected a batch, got %T", m.Body)
				return
			}
			select {
			case batches <- b:
			case <-ctx.Done():
				releaseBatch(b)
				recvErr <- ctx.Err()
				return
			}
		}
	}()

	for b := range batches {
		group := []*pb.Batch{b}
	more:
		for {
			select {
			case b, ok := <-batches:
				if !ok {
					break more
				}
				group = append(group, b)
			default:
				break more
			}
		}
		durable, err := r.apply(lock, sink, group)
		for _, b := range group {
			releaseBatch(b)
		}
		if err != nil {
			return err
		}
		if err := stream.Send(&pb.ReplicateResponse{Body: &pb.ReplicateResponse_Ack{Ack: &pb.Ack{DurableSeq: durable}}}); err != nil {
			return err
		}
	}
	if err := <-recvErr; !errors.Is(err, io.EOF) {
		return err
	}
	return nil
}

// admit says why a certified peer may not feed the stream ("" if it may):
// only the site the server made the stream's source, for the generation the
// target was set up with, and an agent only for its own machine.
func admit(id pki.Identity, hello *pb.ReplHello, tgt Target) string {
	switch {
	case id.Name != tgt.SourceSite:
		return fmt.Sprintf("site %q is not the source of stream %q of machine %q: only %q may feed it", id.Name, hello.StreamId, tgt.Machine, tgt.SourceSite)
	case id.Role == pki.RoleAgent && id.Machine != tgt.Machine:
		return fmt.Sprintf("agent %q is bound to machine %q and may not feed stream %q of machine %q", id.Name, id.Machine, hello.StreamId, tgt.Machine)
	case tgt.Generation != "" && hello.Generation != tgt.Generation:
		return fmt.Sprintf("stream %q of machine %q follows generation %q, the source sent %q: protect or reprotect the machine again to start a stream of this copy", hello.StreamId, tgt.Machine, tgt.Generation, orNone(hello.Generation))
	}
	return ""
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

// refuse reports a refusal and returns the PermissionDenied the peer gets.
func (r *ReplicationServer) refuse(f Refusal) error {
	slog.Warn("replication stream refused", "stream", f.StreamID, "machine", f.Machine, "peer", f.Peer.Name, "role", f.Peer.Role, "reason", f.Reason)
	if r.OnRefuse != nil {
		r.OnRefuse(f)
	}
	return status.Error(codes.PermissionDenied, "replicate: refused: "+f.Reason)
}

// apply validates and appends a group of batches under the stream's lock.
// Valid batches before a bad one are applied; nothing of the bad one is.
func (r *ReplicationServer) apply(lock *sync.Mutex, sink rebound.ReplSink, group []*pb.Batch) (uint64, error) {
	lock.Lock()
	defer lock.Unlock()
	durable := sink.Durable()
	next := durable + 1
	var recs []*rebound.Record
	var bad error
	for _, b := range group {
		out, n, err := validateBatch(b.Records, next)
		if err != nil {
			bad = err
			break
		}
		recs, next = append(recs, out...), n
	}
	if len(recs) > 0 {
		if err := sink.Append(recs); err != nil {
			return 0, toStatus(fmt.Errorf("replicate: append: %w", err))
		}
		durable = sink.Durable()
	}
	if bad != nil {
		return 0, status.Error(codes.InvalidArgument, bad.Error())
	}
	return durable, nil
}

// validateBatch drops records below next and checks the rest continue at
// next without a gap and are well formed. It returns the records to append
// and the next expected sequence.
func validateBatch(in []*pb.Record, next uint64) ([]*rebound.Record, uint64, error) {
	out := make([]*rebound.Record, 0, len(in))
	for _, p := range in {
		if p.Seq < next {
			continue // already durable: a resend after reconnect
		}
		if p.Seq != next && !crashJump(p.Seq, next, rebound.RecordKind(p.Kind), rebound.PointKind(p.PointKind)) {
			return nil, 0, fmt.Errorf("replicate: gap: record %d follows %d", p.Seq, next-1)
		}
		next = p.Seq
		rec := &rebound.Record{
			Seq: p.Seq, Time: p.Time, Kind: rebound.RecordKind(p.Kind), Disk: p.Disk,
			Offset: p.Offset, Length: p.Length, Data: p.Data, PointKind: rebound.PointKind(p.PointKind),
		}
		if err := validateRecord(rec, p.Kind); err != nil {
			return nil, 0, fmt.Errorf("replicate: record %d: %w", p.Seq, err)
		}
		out = append(out, rec)
		next++
	}
	return out, next, nil
}

// crashJump reports whether a record at seq may follow next-1 with a
// gap: a source restarted after a crash (capture, direct mode) lost the
// seqs in between and continues with a ResyncBegin tagged
// ResyncSourceCrash; the journal records the gap (docs/design/journal.md).
func crashJump(seq, next uint64, kind rebound.RecordKind, pk rebound.PointKind) bool {
	return seq > next && kind == rebound.RecordResyncBegin && pk == rebound.ResyncSourceCrash
}

func validateRecord(r *rebound.Record, kind uint32) error {
	if kind < uint32(rebound.RecordWrite) || kind > uint32(rebound.RecordResyncEnd) {
		return fmt.Errorf("unknown kind %d", kind)
	}
	if r.Offset < 0 || r.Length < 0 {
		return fmt.Errorf("negative offset %d or length %d", r.Offset, r.Length)
	}
	switch r.Kind {
	case rebound.RecordWrite:
		if int64(len(r.Data)) != r.Length {
			return fmt.Errorf("write carries %d bytes, length says %d", len(r.Data), r.Length)
		}
	case rebound.RecordMark:
		if r.PointKind != rebound.PointCrash && r.PointKind != rebound.PointApp {
			return fmt.Errorf("mark has point kind %q", r.PointKind)
		}
		fallthrough
	default:
		if len(r.Data) != 0 {
			return fmt.Errorf("%s record carries data", r.Kind)
		}
	}
	return nil
}

// Sender ships a stream from its source to the target site's
// ReplicationServer, reconnecting until its context ends.
type Sender struct {
	Addr string
	// TLS is this site's client config naming the target site, e.g.
	// pki.ClientTLS(cert, key, ca, targetSiteName): the target is
	// verified by its site name, whatever address it has.
	TLS        *tls.Config
	StreamID   string
	SourceSite string
	// Generation is the source copy's generation (the spec's); the target
	// refuses a stream of another.
	Generation string
	Source     rebound.ReplSource
	// MaxInFlight bounds the payload bytes sent but not acknowledged
	// (default 32 MiB); BatchBytes the payload per batch (default 4 MiB).
	// Larger batches mean fewer messages and fewer journal fsyncs per byte.
	MaxInFlight int
	BatchBytes  int
	// Compression of the stream: CompressZstd (default, also ""),
	// CompressNone, or CompressAuto: none when Addr is a loopback address
	// (the link costs nothing there, zstd costs CPU on both ends of the
	// same machine), zstd otherwise.
	Compression string

	mu    sync.Mutex
	stats SenderStats
}

// Sender.Compression values.
const (
	CompressZstd = "zstd"
	CompressNone = "none"
	CompressAuto = "auto"
)

// compressTo says whether a stream to addr is compressed under mode.
func compressTo(mode, addr string) bool {
	switch mode {
	case CompressNone:
		return false
	case CompressAuto:
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			host = addr
		}
		if host == "localhost" {
			return false
		}
		ip := net.ParseIP(host)
		return ip == nil || !ip.IsLoopback()
	}
	return true
}

// SenderStats is a snapshot of a Sender.
type SenderStats struct {
	Connected   bool
	LastError   string
	BytesSent   int64 // payload bytes, resends included
	RecordsSent int64
	AckedSeq    uint64
	// Stopped says why the sender stopped for good: the target acked
	// records this source never wrote, or the stream broke its sequence.
	// Only a new stream (a resync) recovers; no record is skipped meanwhile.
	Stopped string
}

// stopError ends a Sender for good (see SenderStats.Stopped).
type stopError struct{ err error }

func (e *stopError) Error() string { return e.err.Error() }
func (e *stopError) Unwrap() error { return e.err }

func stop(format string, args ...any) error {
	return &stopError{rebound.Errorf(rebound.ECONFLICT, format, args...)}
}

// resyncHint ends a stop's message: what holds and what must happen.
const resyncHint = "Nothing was skipped: writes keep spooling here, and the stream must be replaced by a new one (a full resync)"

// header is a source that knows its head (capture.Stream): an ack beyond
// it stops the sender.
type header interface{ Head() uint64 }

// checkAck stops the stream on an ack beyond the source's head: the target
// holds records this source never wrote (another writer, or records lost
// here), and the source's next records would be taken for duplicates and
// dropped.
func (s *Sender) checkAck(seq uint64) error {
	h, ok := s.Source.(header)
	if !ok {
		return nil
	}
	if head := h.Head(); seq > head {
		return stop("replication of stream %s stopped: the target holds records up to %d but this source wrote only up to %d; its journal has records this source never sent. %s", s.StreamID, seq, head, resyncHint)
	}
	return nil
}

// Stats returns a snapshot.
func (s *Sender) Stats() SenderStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stats
}

// senderMaxBackoff bounds the wait between reconnects; a var for tests.
var senderMaxBackoff = 5 * time.Second

// Run sends until ctx is done and returns ctx's error. After each connect
// it resumes from the sink's durable sequence, so records are neither
// skipped nor applied twice whatever fails.
func (s *Sender) Run(ctx context.Context) error {
	for attempt := 0; ; attempt++ {
		progressed, err := s.runOnce(ctx)
		var stopped *stopError
		s.mu.Lock()
		s.stats.Connected = false
		if err != nil && ctx.Err() == nil {
			s.stats.LastError = err.Error()
			if errors.As(err, &stopped) {
				s.stats.Stopped = err.Error()
			}
		}
		s.mu.Unlock()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if stopped != nil {
			return err
		}
		if progressed {
			attempt = 0
		}
		slog.Debug("replication sender disconnected", "stream", s.StreamID, "err", err)
		if err := sleepCtx(ctx, backoff(attempt, senderMaxBackoff)); err != nil {
			return err
		}
	}
}

type inflight struct {
	last  uint64
	bytes int
}

func (s *Sender) runOnce(ctx context.Context) (connected bool, err error) {
	maxInFlight, batchBytes := s.MaxInFlight, s.BatchBytes
	if maxInFlight <= 0 {
		maxInFlight = 32 << 20
	}
	if batchBytes <= 0 {
		batchBytes = 4 << 20
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cc, err := Dial(s.Addr, s.TLS)
	if err != nil {
		return false, err
	}
	defer cc.Close()
	var opts []ggrpc.CallOption
	if !compressTo(s.Compression, s.Addr) {
		opts = append(opts, ggrpc.UseCompressor(encoding.Identity))
	}
	stream, err := pb.NewReplicationClient(cc).Replicate(ctx, opts...)
	if err != nil {
		return false, fromStatus("replicate to "+s.Addr, err)
	}
	hello := &pb.ReplHello{Version: ProtocolVersion, StreamId: s.StreamID, SourceSite: s.SourceSite, Generation: s.Generation}
	if err := stream.Send(&pb.ReplicateRequest{Body: &pb.ReplicateRequest_Hello{Hello: hello}}); err != nil {
		return false, fromStatus("replicate to "+s.Addr, recvStatus(stream, err))
	}
	m, err := stream.Recv()
	if err != nil {
		return false, fromStatus("replicate to "+s.Addr, err)
	}
	ack := m.GetHelloAck()
	if ack == nil {
		return false, fmt.Errorf("replicate to %s: expected a hello ack, got %T", s.Addr, m.Body)
	}
	if err := checkVersion("replicate", ack.Version); err != nil {
		return false, err
	}
	if err := s.checkAck(ack.DurableSeq); err != nil {
		return false, err
	}
	s.Source.Acked(ack.DurableSeq)
	if r := ack.Repair; r != nil {
		rs, ok := s.Source.(rebound.RepairSource)
		if !ok {
			return false, stop("replication of stream %s stopped: the target dropped damaged records %d..%d and needs a repair resync this source cannot run. %s", s.StreamID, r.LostFrom, r.LostTo, resyncHint)
		}
		req := &rebound.RepairRequest{From: r.LostFrom, To: r.LostTo, BlockSize: r.BlockSize, Digests: r.Digests}
		failpoint.Hit(ctx, "grpc/sender/repair") // tests hold the repair here
		if err := rs.Repair(ctx, req); err != nil {
			return false, fmt.Errorf("repair of stream %s: %w", s.StreamID, err)
		}
	}
	s.mu.Lock()
	s.stats.Connected, s.stats.LastError = true, ""
	s.stats.AckedSeq = max(s.stats.AckedSeq, ack.DurableSeq)
	s.mu.Unlock()

	// Acks free window space; the receiver goroutine owns nothing else.
	var (
		mu      sync.Mutex
		window  []inflight
		pending int
		acked   = make(chan struct{}, 1)
		done    = make(chan error, 1)
	)
	go func() {
		for {
			m, err := stream.Recv()
			if err != nil {
				done <- err
				cancel()
				return
			}
			a := m.GetAck()
			if a == nil {
				done <- fmt.Errorf("expected an ack, got %T", m.Body)
				cancel()
				return
			}
			if err := s.checkAck(a.DurableSeq); err != nil {
				done <- err
				cancel()
				return
			}
			s.Source.Acked(a.DurableSeq)
			s.mu.Lock()
			s.stats.AckedSeq = max(s.stats.AckedSeq, a.DurableSeq)
			s.mu.Unlock()
			mu.Lock()
			for len(window) > 0 && window[0].last <= a.DurableSeq {
				pending -= window[0].bytes
				window = window[1:]
			}
			mu.Unlock()
			select {
			case acked <- struct{}{}:
			default:
			}
		}
	}()
	fail := func(err error) (bool, error) {
		// A Send that fails with EOF means the receiver ended the stream;
		// Recv gets its status, so let it finish before cancelling.
		if !errors.Is(err, io.EOF) {
			cancel()
		}
		if rerr := <-done; !errors.Is(rerr, context.Canceled) && status.Code(rerr) != codes.Canceled {
			err = rerr // the receiver's status says why the stream ended
		}
		var stopped *stopError
		if errors.As(err, &stopped) {
			return true, err
		}
		return true, fromStatus("replicate to "+s.Addr, err)
	}

	next := ack.DurableSeq + 1
	for {
		for {
			mu.Lock()
			full := pending >= maxInFlight
			mu.Unlock()
			if !full {
				break
			}
			select {
			case <-acked:
			case <-ctx.Done():
				return fail(ctx.Err())
			}
		}
		recs, err := s.Source.Read(ctx, next, batchBytes)
		if rebound.ErrorCode(err) == rebound.ECONFLICT && ctx.Err() == nil {
			// The source no longer holds what the target needs next.
			return fail(stop("replication of stream %s stopped: %s. %s", s.StreamID, rebound.ErrorMessage(err), resyncHint))
		} else if err != nil {
			return fail(err)
		}
		if len(recs) == 0 {
			continue
		} else if recs[0].Seq != next && !crashJump(recs[0].Seq, next, recs[0].Kind, recs[0].PointKind) {
			return fail(stop("replication of stream %s stopped: the source returned record %d where %d was next", s.StreamID, recs[0].Seq, next))
		}
		for i := 1; i < len(recs); i++ {
			if recs[i].Seq != recs[i-1].Seq+1 {
				return fail(stop("replication of stream %s stopped: the source's record %d follows %d", s.StreamID, recs[i].Seq, recs[i-1].Seq))
			}
		}
		batch := &pb.Batch{Records: make([]*pb.Record, len(recs))}
		n := 0
		for i, r := range recs {
			batch.Records[i] = &pb.Record{
				Seq: r.Seq, Time: r.Time, Kind: uint32(r.Kind), Disk: r.Disk,
				Offset: r.Offset, Length: r.Length, Data: r.Data, PointKind: string(r.PointKind),
			}
			n += len(r.Data)
		}
		mu.Lock()
		window = append(window, inflight{last: recs[len(recs)-1].Seq, bytes: n})
		pending += n
		mu.Unlock()
		if err := stream.Send(&pb.ReplicateRequest{Body: &pb.ReplicateRequest_Batch{Batch: batch}}); err != nil {
			return fail(err)
		}
		next = recs[len(recs)-1].Seq + 1
		s.mu.Lock()
		s.stats.BytesSent += int64(n)
		s.stats.RecordsSent += int64(len(recs))
		s.mu.Unlock()
	}
}

// recvStatus returns the stream's final status when a Send failed with EOF
// (gRPC reports the server's reason only on Recv).
func recvStatus(stream pb.Replication_ReplicateClient, err error) error {
	if errors.Is(err, io.EOF) {
		if _, rerr := stream.Recv(); rerr != nil {
			return rerr
		}
	}
	return err
}
