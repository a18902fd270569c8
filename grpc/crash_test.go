package grpc

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/journal"
)

// jumpSource serves records whose seqs jump once, as a capture stream
// restarted after a crash does: seqs lo..hi were lost and the next record
// is a ResyncBegin tagged ResyncSourceCrash at hi+1.
type jumpSource struct {
	mu     sync.Mutex
	recs   []*rebound.Record
	lo, hi uint64
	acked  uint64
}

func (s *jumpSource) Read(ctx context.Context, from uint64, maxBytes int) ([]*rebound.Record, error) {
	s.mu.Lock()
	if from >= s.lo && from <= s.hi {
		from = s.hi + 1
	}
	var out []*rebound.Record
	for _, r := range s.recs {
		if r.Seq < from {
			continue
		}
		// A batch ends before the jump: the peer takes it only first.
		if len(out) > 0 && (r.Seq != out[len(out)-1].Seq+1 || len(out) >= 7) {
			break
		}
		out = append(out, r)
	}
	s.mu.Unlock()
	if len(out) == 0 {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return out, nil
}

func (s *jumpSource) Acked(seq uint64) {
	s.mu.Lock()
	s.acked = max(s.acked, seq)
	s.mu.Unlock()
}

// TestReplicate_SourceCrashJump: the sender and the receiver let a
// stream jump past seqs its source lost in a crash, but only at a
// ResyncBegin tagged ResyncSourceCrash; the journal behind them records
// the gap and holds every record sent.
func TestReplicate_SourceCrashJump(t *testing.T) {
	e := newEnv(t)
	disks := []rebound.Disk{{Name: "a", Size: 1 << 20}}
	j, err := journal.Open(t.TempDir(), disks, journal.Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	ts, _ := newReplServer(t, e, j)
	_, cli := e.site(t, "site-a", "site-b")

	src := &jumpSource{lo: 21, hi: 500}
	add := func(seq uint64, r *rebound.Record) {
		r.Seq, r.Time = seq, int64(seq)
		src.recs = append(src.recs, r)
	}
	add(1, &rebound.Record{Kind: rebound.RecordResyncBegin})
	for s := uint64(2); s < 20; s++ {
		add(s, &rebound.Record{Kind: rebound.RecordWrite, Offset: int64(s) * 4096, Length: 4096, Data: make([]byte, 4096)})
	}
	add(20, &rebound.Record{Kind: rebound.RecordResyncEnd})
	add(501, &rebound.Record{Kind: rebound.RecordResyncBegin, PointKind: rebound.ResyncSourceCrash})
	for s := uint64(502); s < 510; s++ {
		add(s, &rebound.Record{Kind: rebound.RecordZero, Offset: int64(s) * 512, Length: 512})
	}
	add(510, &rebound.Record{Kind: rebound.RecordResyncEnd})
	add(511, &rebound.Record{Kind: rebound.RecordMark, PointKind: rebound.PointCrash})

	s := &Sender{Addr: ts.addr, TLS: cli, StreamID: "vm1", SourceSite: "site-a", Source: src, BatchBytes: 64 << 10, MaxInFlight: 256 << 10}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- s.Run(ctx) }()
	waitFor(t, 20*time.Second, "all records acked", func() bool { return s.Stats().AckedSeq == 511 || s.Stats().Stopped != "" })
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
	if st := s.Stats(); st.AckedSeq != 511 || st.Stopped != "" {
		t.Fatalf("sender %+v", st)
	}
	if j.Durable() != 511 {
		t.Fatalf("journal durable %d, want 511", j.Durable())
	}
	pl := j.Points()
	if n := len(pl.Points); n == 0 || pl.Points[n-1].Seq != 511 {
		t.Fatalf("points %+v: want p511 after the crash window", pl.Points)
	}
	if _, err := j.View(505); err == nil {
		t.Fatal("view inside the source-crash window")
	}
}
