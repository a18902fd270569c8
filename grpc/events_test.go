package grpc

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/grpc/pb"
)

// eventStore stands for the database two servers share: one row per
// EventID, as the store's unique index keeps it.
type eventStore struct {
	mu     sync.Mutex
	rows   map[string]rebound.Event
	plain  int            // events without an ID
	stored map[string]int // per server, store calls
}

func newEventStore() *eventStore {
	return &eventStore{rows: map[string]rebound.Event{}, stored: map[string]int{}}
}

func (st *eventStore) storeAs(server string) func(string, rebound.Event) error {
	return func(_ string, e rebound.Event) error {
		st.mu.Lock()
		defer st.mu.Unlock()
		st.stored[server]++
		if e.EventID == "" {
			st.plain++
		} else if _, ok := st.rows[e.EventID]; !ok {
			st.rows[e.EventID] = e
		}
		return nil
	}
}

// byMessage returns the stored rows whose message is msg.
func (st *eventStore) byMessage(msg string) []rebound.Event {
	st.mu.Lock()
	defer st.mu.Unlock()
	var out []rebound.Event
	for _, e := range st.rows {
		if e.Message == msg {
			out = append(out, e)
		}
	}
	return out
}

func (st *eventStore) calls(server string) int {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.stored[server]
}

// TestControl_EventExactlyOnce: an event sent on the channel to server 1,
// which dies before acking it (before storing it, or after storing it and
// before the ack: a hook stops the whole gRPC server there), is delivered
// through server 2 and stored exactly once; the site forgets it only once
// server 2 acked it, and later events go to server 2 the same way.
func TestControl_EventExactlyOnce(t *testing.T) {
	for _, stage := range []string{"received", "stored"} {
		t.Run("died-after-"+stage, func(t *testing.T) {
			e := newEnv(t)
			st := newEventStore()
			s1, s2 := newMultiServer(t, e), newMultiServer(t, e)
			s1.ctl.StoreEvent, s2.ctl.StoreEvent = st.storeAs("s1"), st.storeAs("s2")
			killed := make(chan string, 1)
			s1.ctl.eventHook = func(at string, ev rebound.Event) error {
				if at != stage {
					return nil
				}
				// Server 1 dies here: listener and connections closed,
				// so the site cannot reconnect to it either.
				s1.ts.stop()
				killed <- ev.EventID
				return errors.New("server 1 died")
			}
			_, cli := e.site(t, "site-a", "127.0.0.1")
			acks := make(chan string, 16)
			hook := func(o *controlOpts) {
				o.onAck = func(ids []string) {
					for _, id := range ids {
						acks <- id
					}
				}
			}
			events := make(chan rebound.Event)
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error)
			go func() {
				done <- RunControls(ctx, []string{s1.ts.addr, s2.ts.addr}, cli, &fakeSite{name: "site-a"}, 50*time.Millisecond, WithEvents(events), hook)
			}()
			t.Cleanup(func() {
				cancel()
				if err := <-done; !errors.Is(err, context.Canceled) {
					t.Errorf("RunControls: %v", err)
				}
			})
			s1.callable(t, "server 1 to call the site")
			s2.callable(t, "server 2 to call the site")

			send := func(msg string) {
				t.Helper()
				select {
				case events <- rebound.Event{Time: time.Now(), Machine: "vm1", Kind: "replication.refused", Message: msg}:
				case <-time.After(10 * time.Second):
					t.Fatalf("event %s not taken", msg)
				}
			}
			waitAck := func(id string) {
				t.Helper()
				for {
					select {
					case got := <-acks:
						if "site-a/"+got == id {
							return
						}
					case <-time.After(20 * time.Second):
						t.Fatalf("event %s never acked", id)
					}
				}
			}

			send("e1")
			var id string
			select {
			case id = <-killed:
			case <-time.After(10 * time.Second):
				t.Fatal("e1 never reached server 1")
			}
			if !strings.HasPrefix(id, "site-a/") {
				t.Fatalf("event ID %q: want the site's name in front", id)
			}
			waitAck(id)
			rows := st.byMessage("e1")
			if len(rows) != 1 || rows[0].EventID != id || rows[0].Site != "site-a" || rows[0].Machine != "vm1" {
				t.Fatalf("e1 stored as %+v, want one row with ID %s", rows, id)
			}
			wantS1 := map[string]int{"received": 0, "stored": 1}[stage]
			if n := st.calls("s1"); n != wantS1 {
				t.Fatalf("server 1 stored %d events, want %d", n, wantS1)
			}
			if n := st.calls("s2"); n != 1 {
				t.Fatalf("server 2 stored %d events, want e1 once", n)
			}

			// The next event goes to server 2, the only one left.
			send("e2")
			waitAck(func() string {
				var id2 string
				waitFor(t, 20*time.Second, "e2 stored", func() bool {
					r := st.byMessage("e2")
					if len(r) == 1 {
						id2 = r[0].EventID
					}
					return id2 != ""
				})
				return id2
			}())
			if rows := st.byMessage("e1"); len(rows) != 1 {
				t.Fatalf("e1 stored %d times", len(rows))
			}
		})
	}
}

// fakeChannel records the events sent on it.
type fakeChannel struct {
	mu   sync.Mutex
	sent []*pb.SiteEvent
	fail bool
}

func (f *fakeChannel) sender(idx int, acks bool) *channelSender {
	return &channelSender{idx: idx, acks: acks, send: func(m *pb.SiteMessage) error {
		f.mu.Lock()
		defer f.mu.Unlock()
		if f.fail {
			return errors.New("broken")
		}
		f.sent = append(f.sent, m.GetEvent())
		return nil
	}}
}

func (f *fakeChannel) messages() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for _, e := range f.sent {
		out = append(out, e.Message)
	}
	return out
}

// TestEventRouter_Outbox: with no channel up the outbox keeps the newest
// maxOutbox events and counts the others, which an events.dropped event
// reports once a channel is up; an acked event is forgotten, an unacked one
// is sent again on the next live channel after eventRetry, and on another
// channel at once when its own goes down; a server that does not ack gets
// each event once.
func TestEventRouter_Outbox(t *testing.T) {
	old := maxOutbox
	maxOutbox = 4
	t.Cleanup(func() { maxOutbox = old })
	r := newEventRouter(2)
	for i := 1; i <= 7; i++ {
		r.add(rebound.Event{Kind: "k.x", Message: fmt.Sprint("m", i)})
	}
	now := time.Now()
	r.flush(now) // no channel: nothing sent
	if n := r.pending(); n != 4 {
		t.Fatalf("outbox holds %d, want %d", n, 4)
	}

	var a, b fakeChannel
	sa := a.sender(0, true)
	r.set(0, nil, sa)
	r.set(1, nil, b.sender(1, true))
	r.flush(now)
	if got := strings.Join(a.messages(), ","); !strings.HasPrefix(got, "m4,m5,m6,m7,") || len(a.sent) != 5 || a.sent[4].Kind != "events.dropped" ||
		!strings.Contains(a.sent[4].Message, "3 events") {
		t.Fatalf("sent on the first channel: %q (last %+v)", got, a.sent[len(a.sent)-1])
	}
	if len(b.sent) != 0 {
		t.Fatalf("sent on the second channel too: %v", b.messages())
	}
	ids := map[string]bool{}
	for _, e := range a.sent {
		if e.Id == "" || ids[e.Id] {
			t.Fatalf("event IDs not unique: %+v", a.sent)
		}
		ids[e.Id] = true
	}
	// Acked ones are forgotten; in flight ones wait for their ack.
	r.ack([]string{a.sent[0].Id, a.sent[1].Id})
	r.flush(now.Add(eventRetry / 2))
	if r.pending() != 3 || len(a.sent) != 5 || len(b.sent) != 0 {
		t.Fatalf("pending %d, sent %v / %v", r.pending(), a.messages(), b.messages())
	}
	// No ack within eventRetry: sent again, on the next live channel.
	r.flush(now.Add(eventRetry))
	if got := strings.Join(b.messages(), ","); got != "m6,m7,"+a.sent[4].Message {
		t.Fatalf("resent on the second channel: %q", got)
	}
	// Channel 2 goes down before acking: at once on channel 1 again.
	r.set(1, r.live[1], nil)
	r.flush(now.Add(eventRetry))
	if len(a.sent) != 8 || a.sent[5].Message != "m6" {
		t.Fatalf("after channel 2 went down, channel 1 got %v", a.messages())
	}
	r.ack([]string{a.sent[5].Id, a.sent[6].Id, a.sent[7].Id})
	if r.pending() != 0 {
		t.Fatalf("pending %d after every ack", r.pending())
	}

	// A broken channel: the event goes on the next one, and the broken
	// one counts as down.
	a.mu.Lock()
	a.fail = true
	a.mu.Unlock()
	var c fakeChannel
	r.set(1, nil, c.sender(1, false)) // an older server: no acks
	r.add(rebound.Event{Kind: "k.x", Message: "m8"})
	r.flush(now)
	if got := strings.Join(c.messages(), ","); got != "m8" || r.live[0] != nil {
		t.Fatalf("after a failed send: channel 2 got %q, channel 1 live: %v", got, r.live[0] != nil)
	}
	if r.pending() != 0 {
		t.Fatalf("an event sent to a server that does not ack is kept: pending %d", r.pending())
	}
}

// TestControl_EventFromOlderSite: a site that sends no event ID (an older
// one) has its event stored as before, without an ID, and gets no ack; the
// welcome tells a site that this server acks.
func TestControl_EventFromOlderSite(t *testing.T) {
	e := newEnv(t)
	st := newEventStore()
	s := newMultiServer(t, e)
	s.ctl.StoreEvent = st.storeAs("s")
	_, cli := e.site(t, "site-a", "127.0.0.1")
	cc, err := Dial(s.ts.addr, cli)
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	stream, err := pb.NewControlClient(cc).Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&pb.SiteMessage{Body: &pb.SiteMessage_Hello{Hello: &pb.Hello{Version: ProtocolVersion, Site: "site-a", Status: []byte(`{"site":"site-a"}`)}}}); err != nil {
		t.Fatal(err)
	}
	m, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if w := m.GetWelcome(); w == nil || !w.EventAcks {
		t.Fatalf("welcome %+v: want event_acks", m)
	}
	if err := stream.Send(&pb.SiteMessage{Body: &pb.SiteMessage_Event{Event: &pb.SiteEvent{Time: time.Now().UnixNano(), Kind: "site.old", Message: "no id"}}}); err != nil {
		t.Fatal(err)
	}
	// Then one with an ID: its ack is the first message back, so none
	// came for the first.
	if err := stream.Send(&pb.SiteMessage{Body: &pb.SiteMessage_Event{Event: &pb.SiteEvent{Time: time.Now().UnixNano(), Kind: "site.new", Message: "id", Id: "p-1"}}}); err != nil {
		t.Fatal(err)
	}
	for {
		m, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if m.GetCall() != nil {
			continue // the revocation list, unanswered
		}
		if a := m.GetEventAck(); a == nil || strings.Join(a.Ids, ",") != "p-1" {
			t.Fatalf("first message after the events: %+v, want the ack of p-1 only", m)
		}
		break
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.plain != 1 || len(st.rows) != 1 || st.rows["site-a/p-1"].Kind != "site.new" {
		t.Fatalf("stored %d without ID and %+v", st.plain, st.rows)
	}
}
