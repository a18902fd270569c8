package server

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/rebound-dr/rebound"
)

// SiteEvent records an event a site reported over its control channel
// (e.g. "replication.refused": a stream it refused to a peer), or one the
// control server reports about a site (site.duplicate). site is the
// channel's authenticated name; an agent's events about other machines
// never get here (grpc.ControlServer drops them).
func (s *Server) SiteEvent(site string, e rebound.Event) {
	_ = s.StoreSiteEvent(site, e)
}

// StoreSiteEvent records a site's event and says whether the store holds
// it: nil once it is stored, or was before (the same EventID: a site
// resends an event until one server acks it, docs/design/ha.md). An event
// with an EventID that the store refuses (its disk full, the database
// down) is not kept in memory: the error leaves it unacked, so the site
// keeps it and sends it again. One without (an older site) is recorded as
// the server's own events are: kept in memory while the disk is full.
func (s *Server) StoreSiteEvent(site string, e rebound.Event) error {
	kind := e.Kind
	if !strings.Contains(kind, ".") {
		kind = "site." + kind
	}
	if e.EventID == "" {
		s.Logger.Warn("site event", "site", site, "machine", e.Machine, "kind", kind, "message", e.Message)
		s.event(e.Machine, site, kind, e.Message)
		return nil
	}
	// The site's time: a resent event may arrive long after it happened.
	ev := rebound.Event{Time: e.Time, Machine: e.Machine, Site: site, Kind: kind, Message: e.Message, EventID: e.EventID}
	if ev.Time.IsZero() {
		ev.Time = time.Now().UTC()
	}
	ctx := s.ctx
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := s.DB.AddEvent(ctx, ev); err != nil {
		// At a bounded rate: the site resends every unacked event.
		s.store.log.Warn(s.Logger, "site event not stored; the site keeps it and sends it again", "site", site, "kind", kind, "id", e.EventID, "err", err)
		return fmt.Errorf("store event %s of site %s: %w", e.EventID, site, err)
	}
	// Logged once stored: a site resends what a full store refused.
	s.Logger.Warn("site event", "site", site, "machine", e.Machine, "kind", kind, "message", e.Message, "id", e.EventID)
	return nil
}
