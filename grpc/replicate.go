package grpc

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/grpc/pb"
	ggrpc "google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ReplicationServer receives replication streams on a site's listener.
type ReplicationServer struct {
	// Sink returns the sink of a stream this site is the target of, or an
	// error (ENOTFOUND for a stream it does not hold).
	Sink func(streamID string) (rebound.ReplSink, error)

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

// Replicate receives one stream connection. Batches are validated against
// the sink's durable position and appended; several batches that arrived
// together are appended at once (one fsync), then acknowledged.
func (r *ReplicationServer) Replicate(stream pb.Replication_ReplicateServer) error {
	site, err := peerIsSite(stream.Context())
	if err != nil {
		return err
	}
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
	if hello.SourceSite != site {
		return status.Errorf(codes.PermissionDenied, "replicate: certificate is for site %q, hello says %q", site, hello.SourceSite)
	}
	sink, err := r.Sink(hello.StreamId)
	if err != nil {
		if rebound.ErrorCode(err) == rebound.ENOTFOUND {
			return status.Errorf(codes.NotFound, "replicate: this site holds no stream %q", hello.StreamId)
		}
		return toStatus(err)
	}
	if sink == nil {
		return status.Errorf(codes.NotFound, "replicate: this site holds no stream %q", hello.StreamId)
	}
	slog.Debug("replication stream connected", "stream", hello.StreamId, "from", site)
	lock := r.lock(hello.StreamId)
	if err := stream.Send(&pb.ReplicateResponse{Body: &pb.ReplicateResponse_HelloAck{HelloAck: &pb.HelloAck{Version: ProtocolVersion, DurableSeq: sink.Durable()}}}); err != nil {
		return err
	}

	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	batches := make(chan *pb.Batch, 8)
	recvErr := make(chan error, 1)
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
		if p.Seq != next {
			return nil, 0, fmt.Errorf("replicate: gap: record %d follows %d", p.Seq, next-1)
		}
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
	Source     rebound.ReplSource
	// MaxInFlight bounds the payload bytes sent but not acknowledged
	// (default 16 MiB); BatchBytes the payload per batch (default 1 MiB).
	MaxInFlight int
	BatchBytes  int

	mu    sync.Mutex
	stats SenderStats
}

// SenderStats is a snapshot of a Sender.
type SenderStats struct {
	Connected   bool
	LastError   string
	BytesSent   int64 // payload bytes, resends included
	RecordsSent int64
	AckedSeq    uint64
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
		s.mu.Lock()
		s.stats.Connected = false
		if err != nil && ctx.Err() == nil {
			s.stats.LastError = err.Error()
		}
		s.mu.Unlock()
		if ctx.Err() != nil {
			return ctx.Err()
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
		maxInFlight = 16 << 20
	}
	if batchBytes <= 0 {
		batchBytes = 1 << 20
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cc, err := Dial(s.Addr, s.TLS)
	if err != nil {
		return false, err
	}
	defer cc.Close()
	stream, err := pb.NewReplicationClient(cc).Replicate(ctx)
	if err != nil {
		return false, fromStatus("replicate to "+s.Addr, err)
	}
	if err := stream.Send(&pb.ReplicateRequest{Body: &pb.ReplicateRequest_Hello{Hello: &pb.ReplHello{Version: ProtocolVersion, StreamId: s.StreamID, SourceSite: s.SourceSite}}}); err != nil {
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
	s.Source.Acked(ack.DurableSeq)
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
		if err != nil {
			return fail(err)
		}
		if len(recs) == 0 {
			continue
		} else if recs[0].Seq != next {
			return fail(rebound.Errorf(rebound.EINTERNAL, "source returned record %d, asked for %d", recs[0].Seq, next))
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
