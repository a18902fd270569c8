package grpc

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/grpc/pb"
)

// maxOutbox bounds the events a site keeps until a server acknowledges
// them: a site cut off from every server for long drops the oldest beyond
// it, counts them, and reports the count (an events.dropped event) once a
// channel is up again. A var for tests.
var maxOutbox = 1000

// eventRetry is how long an event sent on a channel that is still up
// waits for its ack before it is sent again, on the next live channel
// (that server's store refused it: a full disk, its database down). A
// resend is harmless: the store keeps one event per ID.
var eventRetry = 30 * time.Second

// channelSender is one live control channel's send.
type channelSender struct {
	idx  int // the server's index in the site's addresses
	send func(*pb.SiteMessage) error
	// acks: the server's welcome said it acks events once stored; a
	// server that does not (an older one) gets each event once, and a
	// send that succeeded counts as delivered, as before.
	acks bool
}

// outEvent is an event in the outbox.
type outEvent struct {
	ev *pb.SiteEvent
	on *channelSender // the channel it was last sent on; nil: not sent since
	at time.Time      // when it was sent there
	// retries counts the sends that got no ack while their channel
	// stayed up; each goes to the next live channel in turn.
	retries int
}

// eventRouter delivers the site's events to the servers exactly once: it
// gives each an ID (a random per-process prefix and a counter; the server
// puts the site's name in front) and keeps it in a bounded outbox until a
// server acks that its store holds it. An event goes on one live channel,
// the first in the servers' order; when that channel goes down before the
// ack it goes again on the next live one (the store drops the second copy
// if the first arrived after all). The outbox is memory only
// (docs/design/ha.md, "Sites and agents", says why).
type eventRouter struct {
	mu       sync.Mutex
	live     []*channelSender // by server index; nil while down
	changed  chan struct{}    // closed and replaced when live changes
	onChange func(i int, up bool)
	onAck    func(ids []string) // for tests

	prefix  string
	next    uint64
	outbox  []*outEvent // oldest first
	dropped int         // events dropped from the outbox since the last events.dropped
}

func newEventRouter(n int) *eventRouter {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return &eventRouter{live: make([]*channelSender, n), changed: make(chan struct{}), prefix: hex.EncodeToString(b[:])}
}

// set makes s the i-th server's live channel (nil: down), unless it was
// already replaced by a newer one (old must match).
func (r *eventRouter) set(i int, old, s *channelSender) {
	r.mu.Lock()
	if r.live[i] != old {
		r.mu.Unlock()
		return
	}
	r.live[i] = s
	close(r.changed)
	r.changed = make(chan struct{})
	if r.onChange != nil {
		r.onChange(i, s != nil) // under mu: heard in order
	}
	r.mu.Unlock()
}

// changes returns what closes on the next change of the live channels.
func (r *eventRouter) changes() <-chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.changed
}

// liveLocked returns the live channels in the servers' order.
func (r *eventRouter) liveLocked() []*channelSender {
	var live []*channelSender
	for _, s := range r.live {
		if s != nil {
			live = append(live, s)
		}
	}
	return live
}

// add puts e in the outbox with a new ID, dropping the oldest beyond
// maxOutbox.
func (r *eventRouter) add(e rebound.Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.addLocked(&pb.SiteEvent{Time: e.Time.UnixNano(), Machine: e.Machine, Kind: e.Kind, Message: e.Message})
	if over := len(r.outbox) - maxOutbox; over > 0 {
		if r.dropped == 0 {
			slog.Warn("no server has stored this site's events for long: dropping the oldest", "outbox", maxOutbox)
		}
		for _, o := range r.outbox[:over] {
			slog.Warn("event dropped", "kind", o.ev.Kind, "machine", o.ev.Machine, "message", o.ev.Message)
		}
		r.dropped += over
		r.outbox = append(r.outbox[:0:0], r.outbox[over:]...)
	}
}

func (r *eventRouter) addLocked(ev *pb.SiteEvent) {
	r.next++
	ev.Id = r.prefix + "-" + strconv.FormatUint(r.next, 10)
	r.outbox = append(r.outbox, &outEvent{ev: ev})
}

// ack forgets the events a server stored.
func (r *eventRouter) ack(ids []string) {
	done := make(map[string]bool, len(ids))
	for _, id := range ids {
		done[id] = true
	}
	r.mu.Lock()
	kept := r.outbox[:0]
	for _, o := range r.outbox {
		if !done[o.ev.Id] {
			kept = append(kept, o)
		}
	}
	clear(r.outbox[len(kept):])
	r.outbox = kept
	onAck := r.onAck
	r.mu.Unlock()
	if onAck != nil {
		onAck(ids)
	}
}

// pending is the number of events not yet acknowledged.
func (r *eventRouter) pending() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.outbox)
}

// run takes the site's events into the outbox and delivers them until ctx
// ends.
func (r *eventRouter) run(ctx context.Context, events <-chan rebound.Event) {
	t := time.NewTicker(eventRetry / 2)
	defer t.Stop()
	for {
		changed := r.changes() // before flush: a change during it wakes us
		r.flush(time.Now())
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case e := <-events:
			r.add(e)
		case <-t.C:
		}
	}
}

// flush sends every event that needs a send: not sent yet, sent on a
// channel that went down since, or sent eventRetry ago without an ack.
func (r *eventRouter) flush(now time.Time) {
	for {
		r.mu.Lock()
		live := r.liveLocked()
		if len(live) == 0 {
			r.mu.Unlock()
			return
		}
		if r.dropped > 0 {
			r.addLocked(&pb.SiteEvent{Time: now.UnixNano(), Kind: "events.dropped", Message: fmt.Sprintf(
				"%d events of this site were dropped: no server stored them while it kept the last %d (check the site's log for them)", r.dropped, maxOutbox)})
			r.dropped = 0
		}
		var pick *outEvent
		for _, o := range r.outbox {
			if o.on != nil && r.live[o.on.idx] == o.on {
				if now.Sub(o.at) < eventRetry {
					continue // in flight on a live channel
				}
				o.retries++
			}
			pick = o
			break
		}
		if pick == nil {
			r.mu.Unlock()
			return
		}
		to := live[pick.retries%len(live)]
		msg := &pb.SiteMessage{Body: &pb.SiteMessage_Event{Event: pick.ev}}
		r.mu.Unlock()

		err := to.send(msg)

		r.mu.Lock()
		if err != nil {
			pick.on = nil
			r.mu.Unlock()
			// That channel is broken: its Recv sees it too and reconnects.
			slog.Warn("event not delivered on a control channel; trying the next server", "kind", pick.ev.Kind, "machine", pick.ev.Machine, "err", err)
			r.set(to.idx, to, nil)
			continue
		}
		if to.acks {
			pick.on, pick.at = to, now
		} else {
			// An older server: sent is all it can tell.
			for k, o := range r.outbox {
				if o == pick {
					r.outbox = append(r.outbox[:k], r.outbox[k+1:]...)
					break
				}
			}
		}
		r.mu.Unlock()
	}
}
