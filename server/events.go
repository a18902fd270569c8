package server

import (
	"strings"

	"github.com/rebound-dr/rebound"
)

// SiteEvent records an event a site reported over its control channel
// (e.g. "replication.refused": a stream it refused to a peer). site is the
// channel's authenticated name; an agent's events about other machines
// never get here (grpc.ControlServer drops them).
func (s *Server) SiteEvent(site string, e rebound.Event) {
	kind := e.Kind
	if !strings.Contains(kind, ".") {
		kind = "site." + kind
	}
	s.Logger.Warn("site event", "site", site, "machine", e.Machine, "kind", kind, "message", e.Message)
	s.event(e.Machine, site, kind, e.Message)
}
