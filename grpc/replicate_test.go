package grpc

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/grpc/pb"
	"github.com/rebound-dr/rebound/pki"
	ggrpc "google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// memSource is a ReplSource over a growing slice; Read blocks for more.
type memSource struct {
	mu    sync.Mutex
	recs  []*rebound.Record // recs[i].Seq == i+1
	more  chan struct{}     // closed and replaced on append
	acked uint64
}

func newMemSource() *memSource { return &memSource{more: make(chan struct{})} }

func (s *memSource) add(r *rebound.Record) {
	s.mu.Lock()
	r.Seq = uint64(len(s.recs) + 1)
	s.recs = append(s.recs, r)
	close(s.more)
	s.more = make(chan struct{})
	s.mu.Unlock()
}

func (s *memSource) Read(ctx context.Context, from uint64, maxBytes int) ([]*rebound.Record, error) {
	for {
		s.mu.Lock()
		if from == 0 || from <= s.acked {
			s.mu.Unlock()
			return nil, fmt.Errorf("read from %d: acked up to %d", from, s.acked)
		}
		if int(from) <= len(s.recs) {
			var out []*rebound.Record
			n := 0
			for _, r := range s.recs[from-1:] {
				if len(out) > 0 && n+len(r.Data) > maxBytes {
					break
				}
				out = append(out, r)
				n += len(r.Data)
			}
			s.mu.Unlock()
			return out, nil
		}
		more := s.more
		s.mu.Unlock()
		select {
		case <-more:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

func (s *memSource) Acked(seq uint64) {
	s.mu.Lock()
	s.acked = max(s.acked, seq)
	s.mu.Unlock()
}

// memSink is a ReplSink that flags any gap or duplicate it is handed.
// Durable is immediate (no fsync).
type memSink struct {
	mu      sync.Mutex
	recs    []*rebound.Record
	keep    bool // keep data (else only hash it)
	sum     [32]byte
	bad     error
	appends int
}

func newMemSink() *memSink { return &memSink{keep: true} }

func (s *memSink) Durable() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return uint64(len(s.recs))
}

func (s *memSink) Append(recs []*rebound.Record) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.appends++
	for _, r := range recs {
		d := uint64(len(s.recs))
		if r.Seq <= d {
			// Allowed by the contract, but the server filters resends
			// itself: seeing one here means a duplicate got through.
			s.bad = fmt.Errorf("duplicate: %d at durable %d", r.Seq, d)
			continue
		}
		if r.Seq != d+1 {
			s.bad = fmt.Errorf("gap: %d after %d", r.Seq, d)
			return s.bad
		}
		if !s.keep {
			r = &rebound.Record{Seq: r.Seq, Length: r.Length}
		} else {
			// The contract: no Data kept past Append (the codec reuses it).
			c := *r
			c.Data = append([]byte(nil), r.Data...)
			r = &c
		}
		s.recs = append(s.recs, r)
	}
	return nil
}

func (s *memSink) snapshot() []*rebound.Record {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*rebound.Record(nil), s.recs...)
}

// semiCompressible returns n bytes that zstd shrinks to about half.
func semiCompressible(n int, seed uint64) []byte {
	b := make([]byte, n)
	r := mrand.New(mrand.NewPCG(seed, 1))
	for i := 0; i < n; i += 64 {
		if r.IntN(2) == 0 {
			for j := i; j < min(i+64, n); j++ {
				b[j] = byte(r.Uint32())
			}
		} else {
			copy(b[i:min(i+64, n)], "rebound rebound rebound rebound rebound rebound rebound rebound!")
		}
	}
	return b
}

func testRecord(i int) *rebound.Record {
	switch i % 10 {
	case 3:
		return &rebound.Record{Kind: rebound.RecordZero, Offset: int64(i) * 4096, Length: 8192, Time: int64(i)}
	case 7:
		return &rebound.Record{Kind: rebound.RecordMark, PointKind: rebound.PointCrash, Time: int64(i)}
	}
	n := 512 + (i%5)*4096
	return &rebound.Record{Kind: rebound.RecordWrite, Disk: uint32(i % 3), Offset: int64(i) * 4096, Length: int64(n), Data: semiCompressible(n, uint64(i)), Time: int64(i)}
}

func newReplServer(t testing.TB, e *env, sink rebound.ReplSink, opts ...ggrpc.ServerOption) (*testServer, *ReplicationServer) {
	srvTLS, _ := e.site(t, "site-b", "")
	rs := &ReplicationServer{Target: func(id string) (Target, error) {
		if id != "vm1" {
			return Target{}, rebound.Errorf(rebound.ENOTFOUND, "no stream %q", id)
		}
		return Target{Sink: sink, Machine: "vm1", SourceSite: "site-a"}, nil
	}}
	return startServer(t, srvTLS, rs.Register, opts...), rs
}

func checkSink(t *testing.T, sink *memSink, src *memSource, n int) {
	t.Helper()
	got := sink.snapshot()
	if sink.bad != nil {
		t.Fatal(sink.bad)
	}
	if len(got) != n {
		t.Fatalf("sink holds %d records, want %d", len(got), n)
	}
	for i, r := range got {
		w := src.recs[i]
		if r.Seq != uint64(i+1) || r.Kind != w.Kind || r.Offset != w.Offset || r.Length != w.Length || r.Disk != w.Disk ||
			r.Time != w.Time || r.PointKind != w.PointKind || sha256.Sum256(r.Data) != sha256.Sum256(w.Data) {
			t.Fatalf("record %d differs: got %+v", i+1, r)
		}
	}
}

func TestReplicate_InOrder(t *testing.T) {
	e := newEnv(t)
	sink := newMemSink()
	seen := &compressionSeen{}
	ts, _ := newReplServer(t, e, sink, ggrpc.StatsHandler(seen))
	_, cli := e.site(t, "site-a", "site-b")
	src := newMemSource()
	const n = 500
	for i := 0; i < n/2; i++ {
		src.add(testRecord(i))
	}
	s := &Sender{Addr: ts.addr, TLS: cli, StreamID: "vm1", SourceSite: "site-a", Source: src, BatchBytes: 64 << 10, MaxInFlight: 256 << 10}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- s.Run(ctx) }()
	for i := n / 2; i < n; i++ { // the rest arrives while streaming
		src.add(testRecord(i))
	}
	waitFor(t, 20*time.Second, "all records acked", func() bool { return s.Stats().AckedSeq == n })
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
	checkSink(t, sink, src, n)
	st := s.Stats()
	if st.RecordsSent != n || st.LastError != "" || src.acked != n {
		t.Fatalf("stats %+v source acked %d", st, src.acked)
	}
	if got := seen.get(pb.Replication_Replicate_FullMethodName); got != Compressor {
		t.Fatalf("replication compression %q", got)
	}
}

// Connections die at random moments, on either side; the sink ends with
// exactly 1..N.
func TestReplicate_Chaos(t *testing.T) {
	e := newEnv(t)
	sink := newMemSink()
	ts, _ := newReplServer(t, e, sink)
	_, cli := e.site(t, "site-a", "site-b")
	src := newMemSource()
	const n = 3000
	produced := make(chan struct{})
	go func() { // writes keep coming during the whole run
		defer close(produced)
		for i := 0; i < n; i++ {
			src.add(testRecord(i))
			if i%20 == 0 {
				time.Sleep(10 * time.Millisecond)
			}
		}
	}()
	newSender := func() (*Sender, context.CancelFunc, chan error) {
		s := &Sender{Addr: ts.addr, TLS: cli, StreamID: "vm1", SourceSite: "site-a", Source: src, BatchBytes: 32 << 10, MaxInFlight: 128 << 10}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- s.Run(ctx) }()
		return s, cancel, done
	}
	s, cancel, done := newSender()
	r := mrand.New(mrand.NewPCG(1, 2))
	kills := 0
	for running := true; running; {
		select {
		case <-produced:
			running = false
		default:
		}
		time.Sleep(time.Duration(r.IntN(60)) * time.Millisecond)
		if r.IntN(2) == 0 {
			ts.restart() // the target restarts
		} else {
			cancel() // the source restarts
			<-done
			s, cancel, done = newSender()
		}
		kills++
	}
	sink.mu.Lock()
	appends := sink.appends
	sink.mu.Unlock()
	if kills < 10 || appends < 10 {
		t.Fatalf("only %d kills, %d appends: the test did not exercise reconnects", kills, appends)
	}
	waitFor(t, 30*time.Second, "all records durable", func() bool { return sink.Durable() == n && s.Stats().AckedSeq == n })
	cancel()
	<-done
	checkSink(t, sink, src, n)
	t.Logf("%d kills, %d appends", kills, appends)
}

// Raw protocol: hello checks and bad batches.
func TestReplicate_BadInput(t *testing.T) {
	e := newEnv(t)
	sink := newMemSink()
	ts, _ := newReplServer(t, e, sink)
	_, siteCli := e.site(t, "site-a", "site-b")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	dial := func(conf *tls.Config) pb.ReplicationClient {
		cc, err := Dial(ts.addr, conf)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cc.Close() })
		return pb.NewReplicationClient(cc)
	}
	rc := dial(siteCli)
	hello := func(v uint32, id string) (pb.Replication_ReplicateClient, *pb.HelloAck, error) {
		st, err := rc.Replicate(ctx)
		if err != nil {
			return nil, nil, err
		}
		st.Send(&pb.ReplicateRequest{Body: &pb.ReplicateRequest_Hello{Hello: &pb.ReplHello{Version: v, StreamId: id, SourceSite: "site-a"}}})
		m, err := st.Recv()
		if err != nil {
			return nil, nil, err
		}
		return st, m.GetHelloAck(), nil
	}
	_, _, err := hello(9, "vm1")
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "version 9") {
		t.Fatalf("wrong version: %v", err)
	}
	st, err := rc.Replicate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	st.Send(&pb.ReplicateRequest{Body: &pb.ReplicateRequest_Hello{Hello: &pb.ReplHello{Version: 1, StreamId: "vm1", SourceSite: "site-c"}}})
	if _, err := st.Recv(); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("impersonating source: %v", err)
	}
	_, _, err = hello(1, "nope")
	if status.Code(err) != codes.NotFound || !strings.Contains(err.Error(), `"nope"`) {
		t.Fatalf("unknown stream: %v", err)
	}

	send := func(recs ...*pb.Record) error {
		st, ack, err := hello(1, "vm1")
		if err != nil {
			return err
		}
		if ack.DurableSeq != sink.Durable() {
			t.Fatalf("hello ack %d, sink %d", ack.DurableSeq, sink.Durable())
		}
		if err := st.Send(&pb.ReplicateRequest{Body: &pb.ReplicateRequest_Batch{Batch: &pb.Batch{Records: recs}}}); err != nil {
			return err
		}
		m, err := st.Recv()
		if err != nil {
			return err
		}
		if m.GetAck().GetDurableSeq() != sink.Durable() {
			t.Fatalf("ack %d, sink %d", m.GetAck().GetDurableSeq(), sink.Durable())
		}
		st.CloseSend()
		return nil
	}
	w := func(seq uint64, data string) *pb.Record {
		return &pb.Record{Seq: seq, Kind: uint32(rebound.RecordWrite), Length: int64(len(data)), Data: []byte(data)}
	}
	if err := send(w(1, "a"), w(2, "bb")); err != nil {
		t.Fatal(err)
	}
	// A resend overlapping what is durable is fine.
	if err := send(w(2, "bb"), w(3, "ccc")); err != nil {
		t.Fatal(err)
	}
	for name, batch := range map[string][]*pb.Record{
		"gap":          {w(4, "d"), w(6, "f")},
		"gap at start": {w(5, "e")},
		"bad kind":     {w(4, "d"), {Seq: 5, Kind: 99}},
		"short write":  {w(4, "d"), {Seq: 5, Kind: 1, Length: 10, Data: []byte("x")}},
		"neg offset":   {{Seq: 4, Kind: 2, Offset: -1, Length: 1}},
		"zero data":    {{Seq: 4, Kind: 2, Length: 1, Data: []byte("x")}},
		"mark kind":    {{Seq: 4, Kind: 4, PointKind: "weird"}},
	} {
		err := send(batch...)
		if status.Code(err) != codes.InvalidArgument {
			t.Fatalf("%s: %v", name, err)
		}
		if sink.Durable() != 3 {
			t.Fatalf("%s: sink moved to %d", name, sink.Durable())
		}
		t.Logf("%s: %v", name, err)
	}
	if sink.bad != nil {
		t.Fatal(sink.bad)
	}
	// A certificate that is not a site's may not replicate.
	c, k, _ := e.ca.Issue("agent-x", nil, pki.ClientAuth)
	agent, _ := pki.ClientTLS(c, k, e.ca.CertPEM(), "site-b")
	rc = dial(agent)
	if _, _, err := hello(1, "vm1"); status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "agent-x") {
		t.Fatalf("agent cert: %v", err)
	}
}

func BenchmarkReplicate(b *testing.B) {
	e := newEnv(b)
	sink := newMemSink()
	sink.keep = false
	ts, _ := newReplServer(b, e, sink)
	_, cli := e.site(b, "site-a", "site-b")
	src := newMemSource()
	data := make([][]byte, 16)
	for i := range data {
		data[i] = semiCompressible(64<<10, uint64(i))
	}
	for i := 0; i < b.N; i++ {
		src.add(&rebound.Record{Kind: rebound.RecordWrite, Offset: int64(i) << 16, Length: 64 << 10, Data: data[i%len(data)]})
	}
	s := &Sender{Addr: ts.addr, TLS: cli, StreamID: "vm1", SourceSite: "site-a", Source: src}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	b.SetBytes(64 << 10)
	b.ResetTimer()
	done := make(chan error)
	go func() { done <- s.Run(ctx) }()
	for sink.Durable() < uint64(b.N) {
		time.Sleep(time.Millisecond)
	}
	b.StopTimer()
	cancel()
	<-done
}

// failingSink fails its first appends, like a full disk that frees up.
type failingSink struct {
	*memSink
	mu    sync.Mutex
	fails int
}

func (f *failingSink) Append(recs []*rebound.Record) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fails > 0 {
		f.fails--
		return rebound.Errorf(rebound.EUNAVAILABLE, "journal disk is full")
	}
	return f.memSink.Append(recs)
}

func TestSender_Errors(t *testing.T) {
	e := newEnv(t)
	sink := &failingSink{memSink: newMemSink(), fails: 3}
	ts, _ := newReplServer(t, e, sink)
	_, cli := e.site(t, "site-a", "site-b")
	src := newMemSource()
	for i := 0; i < 50; i++ {
		src.add(testRecord(i))
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// An unknown stream: the sender keeps trying and says why.
	bad := &Sender{Addr: ts.addr, TLS: cli, StreamID: "vm9", SourceSite: "site-a", Source: src}
	go bad.Run(ctx)
	waitFor(t, 10*time.Second, "unknown stream error", func() bool {
		return strings.Contains(bad.Stats().LastError, `holds no stream "vm9"`)
	})
	if bad.Stats().Connected {
		t.Fatal("connected to an unknown stream")
	}

	// Append failures: the error reaches the sender, then it recovers.
	s := &Sender{Addr: ts.addr, TLS: cli, StreamID: "vm1", SourceSite: "site-a", Source: src, BatchBytes: 4096}
	go s.Run(ctx)
	waitFor(t, 20*time.Second, "all acked", func() bool {
		st := s.Stats()
		return st.AckedSeq == 50 && st.Connected
	})
	checkSink(t, sink.memSink, src, 50)
	if sink.fails != 0 {
		t.Fatalf("%d failures left", sink.fails)
	}

	// The wrong peer name: the target's certificate is for site-b.
	_, wrongName := e.site(t, "site-a", "site-c")
	w := &Sender{Addr: ts.addr, TLS: wrongName, StreamID: "vm1", SourceSite: "site-a", Source: src}
	go w.Run(ctx)
	waitFor(t, 10*time.Second, "certificate name error", func() bool {
		return strings.Contains(w.Stats().LastError, "site-c")
	})
	t.Logf("unknown stream: %s", bad.Stats().LastError)
	t.Logf("wrong name: %s", w.Stats().LastError)
}

// CompressAuto sends a loopback stream uncompressed (zstd would only cost
// CPU on both ends of one machine) and every record still arrives intact.
func TestReplicate_AutoCompressionLoopback(t *testing.T) {
	e := newEnv(t)
	sink := newMemSink()
	seen := &compressionSeen{}
	ts, _ := newReplServer(t, e, sink, ggrpc.StatsHandler(seen))
	_, cli := e.site(t, "site-a", "site-b")
	src := newMemSource()
	const n = 200
	for i := 0; i < n; i++ {
		src.add(testRecord(i))
	}
	s := &Sender{Addr: ts.addr, TLS: cli, StreamID: "vm1", SourceSite: "site-a", Source: src, Compression: CompressAuto}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- s.Run(ctx) }()
	waitFor(t, 20*time.Second, "all records acked", func() bool { return s.Stats().AckedSeq == n })
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
	checkSink(t, sink, src, n)
	seen.mu.Lock()
	got, ok := seen.seen[pb.Replication_Replicate_FullMethodName]
	seen.mu.Unlock()
	if !ok || got == Compressor {
		t.Fatalf("loopback stream: header seen %v, compression %q", ok, got)
	}
	for _, c := range []struct {
		mode, addr string
		want       bool
	}{
		{CompressAuto, "127.0.0.1:1", false}, {CompressAuto, "[::1]:1", false}, {CompressAuto, "localhost:1", false},
		{CompressAuto, "10.0.0.1:1", true}, {CompressAuto, "site-b.example:1", true},
		{"", "127.0.0.1:1", true}, {CompressZstd, "127.0.0.1:1", true}, {CompressNone, "10.0.0.1:1", false},
	} {
		if got := compressTo(c.mode, c.addr); got != c.want {
			t.Errorf("compressTo(%q, %q) = %v, want %v", c.mode, c.addr, got, c.want)
		}
	}
}
