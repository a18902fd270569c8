package server

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rebound-dr/rebound"
)

type metrics struct {
	lag        *prometheus.GaugeVec
	backlog    *prometheus.GaugeVec
	dirty      *prometheus.GaugeVec
	throughput *prometheus.GaugeVec
	throttled  *prometheus.GaugeVec
	health     *prometheus.GaugeVec
	siteUp     *prometheus.GaugeVec
	jobs       *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		lag: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "rebound_replication_lag_seconds",
			Help: "Age of the oldest write the target does not hold yet."}, []string{"machine"}),
		backlog: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "rebound_replication_backlog_bytes",
			Help: "Bytes captured at the source and not yet acknowledged by the target."}, []string{"machine"}),
		dirty: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "rebound_replication_dirty_bytes",
			Help: "Bytes only tracked in the dirty-region map (spool overflowed)."}, []string{"machine"}),
		throughput: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "rebound_replication_throughput_bytes_per_second",
			Help: "Acknowledged replication throughput."}, []string{"machine"}),
		throttled: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "rebound_replication_throttled_writes",
			Help: "Writes the throttle congestion policy held back since the source stream opened."}, []string{"machine"}),
		health: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "rebound_machine_health",
			Help: "0 normal, 1 warning, 2 critical."}, []string{"machine"}),
		siteUp: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "rebound_site_up",
			Help: "1 when the site is connected."}, []string{"site"}),
		jobs: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "rebound_jobs_total",
			Help: "Jobs ended, by type and state."}, []string{"type", "state"}),
	}
	if reg != nil {
		reg.MustRegister(m.lag, m.backlog, m.dirty, m.throughput, m.throttled, m.health, m.siteUp, m.jobs)
	}
	return m
}

// forgetReplication drops a machine's replication series: it is not
// replicated (any more), and a stale lag would read as a live one.
func (m *metrics) forgetReplication(machine string) {
	for _, g := range []*prometheus.GaugeVec{m.lag, m.backlog, m.dirty, m.throughput, m.throttled} {
		g.DeleteLabelValues(machine)
	}
}

// forget drops every series of a deleted machine.
func (m *metrics) forget(machine string) {
	m.forgetReplication(machine)
	m.health.DeleteLabelValues(machine)
}

// SiteConnected is called when a site opens its control channel. It
// records the site and, in a goroutine the server owns (the site's answers
// come on the channel whose handler calls this), finishes work that waited
// for it. Close cancels that work and waits for it.
func (s *Server) SiteConnected(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.goOwnedLocked(func(ctx context.Context) { s.siteConnected(ctx, name) })
}

func (s *Server) siteConnected(ctx context.Context, name string) {
	s.event("", name, "site.connected", "site "+name+" connected")
	s.metrics.siteUp.WithLabelValues(name).Set(1)
	site, err := s.site(name)
	if err != nil {
		return
	}
	s.fenceReturnedSource(ctx, name, site)
	s.syncPolicies(ctx, name, site)
	s.unfenceServingSource(ctx, name, site)
	keys, err := s.pendingReleases(ctx, name)
	if err != nil {
		return
	}
	for _, machine := range keys {
		if err := site.Release(ctx, machine, s.failoverTime(ctx, machine)); err != nil {
			s.Logger.Warn("release after reconnect", "site", name, "machine", machine, "err", err)
			continue
		}
		_ = s.DB.PutSetting(ctx, "pending-release/"+name+"/"+machine, "")
		s.event(machine, name, "source.released", "old source released after reconnecting")
	}
}

// fenceReturnedSource fences the machines that failed over away from a
// site while it was unreachable (I9): the machine runs at the recovery site
// now, and the returning source must not serve its old disks until a
// cancel unfences them.
func (s *Server) fenceReturnedSource(ctx context.Context, name string, site rebound.SiteService) {
	ms, err := s.DB.ListMachines(ctx)
	if err != nil {
		s.Logger.Warn("list machines after reconnect", "site", name, "err", err)
		return
	}
	for _, m := range ms {
		if m.State != rebound.MachineFailedOver || m.Failover == nil || m.Failover.FromSite != name {
			continue
		}
		if _, err := site.Fence(ctx, m.Name); err != nil {
			s.Logger.Warn("fence returned source", "site", name, "machine", m.Name, "err", err)
			continue
		}
		s.event(m.Name, name, "source.fenced", "old source fenced after reconnecting: the machine is failed over to "+m.Failover.ToSite)
	}
}

// unfenceServingSource serves again the machines a reconnecting site is
// the source of while no failover runs: a failover job that fenced the
// source and then lost it (the site died mid-drain) could not unfence it,
// and the machine would stay down at its active site.
func (s *Server) unfenceServingSource(ctx context.Context, name string, site rebound.SiteService) {
	ms, err := s.DB.ListMachines(ctx)
	if err != nil {
		return
	}
	for _, m := range ms {
		if m.Protection == nil || m.Protection.SourceSite != name || m.Failover != nil ||
			(m.State != rebound.MachineProtected && m.State != rebound.MachineSyncing) {
			continue
		}
		// Holding the machine keeps a failover from fencing it meanwhile.
		if err := s.lockMachine(m.Name); err != nil {
			continue
		}
		if cur, err := s.DB.GetMachine(ctx, m.Name); err == nil && cur.Failover == nil &&
			(cur.State == rebound.MachineProtected || cur.State == rebound.MachineSyncing) {
			if err := site.Unfence(ctx, m.Name); err != nil {
				s.Logger.Warn("unfence source after reconnect", "site", name, "machine", m.Name, "err", err)
			}
		}
		s.unlockMachine(m.Name)
	}
}

func (s *Server) pendingReleases(ctx context.Context, site string) ([]string, error) {
	var out []string
	ms, err := s.DB.ListMachines(ctx)
	if err != nil {
		return nil, err
	}
	for _, m := range ms {
		v, ok, err := s.DB.GetSetting(ctx, "pending-release/"+site+"/"+m.Name)
		if err == nil && ok && v == "1" {
			out = append(out, m.Name)
		}
	}
	return out, nil
}

// SiteDisconnected is called when a site's control channel closes.
func (s *Server) SiteDisconnected(name string) {
	s.event("", name, "site.disconnected", "site "+name+" disconnected")
	s.metrics.siteUp.WithLabelValues(name).Set(0)
}

// SiteReport takes a site's periodic status: it updates the site and the
// replication figures and health of its machines.
func (s *Server) SiteReport(name string, st *rebound.SiteStatus) {
	ctx := context.Background()
	s.mu.Lock()
	removed := s.removed[name]
	s.mu.Unlock()
	if removed {
		return // a report that raced the site's removal
	}
	site := rebound.Site{
		Name: name, Status: rebound.SiteOnline, NBDAddr: st.NBDAddr, ReplAddr: st.ReplAddr,
		FreeBytes: st.FreeBytes, LastSeen: time.Now().UTC(), Version: st.Version,
	}
	// Served from memory first; the store's copy is best-effort (live.go).
	if s.live.putSite(site) {
		if err := s.DB.PutSite(ctx, site); err != nil {
			s.storeFailed("store site report", err, "site", name)
		} else {
			s.live.siteStored(site)
		}
	}
	for _, ms := range st.Machines {
		ms := ms
		err := s.updateLive(ctx, ms.Name, func(m *rebound.Machine) {
			if m.VM != nil && m.ActiveSite == name {
				m.VMStatus = ms.VM
			}
			p := m.Protection
			if p == nil {
				return
			}
			// A failed-over machine's old source is fenced: its figures
			// describe a stream that no longer replicates anything.
			if ms.Role == "source" && p.SourceSite == name && m.State != rebound.MachineFailedOver {
				p.ReplState, p.LagSeconds, p.BacklogBytes = ms.ReplState, ms.LagSeconds, ms.BacklogBytes
				p.DirtyBytes, p.ThroughputBps, p.ReportedAt = ms.DirtyBytes, ms.ThroughputBps, st.Time
				p.ReplError, p.ThrottledWrites = ms.ReplError, ms.ThrottledWrites
				if ms.SyncTotal > 0 && (m.State == rebound.MachineSyncing || ms.ReplState == "resyncing") {
					p.SyncProgress = float64(ms.SyncDone) / float64(ms.SyncTotal)
				}
				s.metrics.lag.WithLabelValues(m.Name).Set(ms.LagSeconds)
				s.metrics.backlog.WithLabelValues(m.Name).Set(float64(ms.BacklogBytes))
				s.metrics.dirty.WithLabelValues(m.Name).Set(float64(ms.DirtyBytes))
				s.metrics.throughput.WithLabelValues(m.Name).Set(ms.ThroughputBps)
				s.metrics.throttled.WithLabelValues(m.Name).Set(float64(ms.ThrottledWrites))
			}
			if ms.Role == "target" && p.TargetSite == name {
				if !ms.LastPointTime.IsZero() {
					p.LastPointTime = ms.LastPointTime
				}
				p.JournalError = ms.ReplError
			}
			s.setHealth(ctx, m)
		})
		if err != nil && rebound.ErrorCode(err) != rebound.ENOTFOUND {
			s.storeFailed("store machine report", err, "machine", ms.Name)
		}
	}
}

// setHealth derives a machine's health from its state and replication
// figures. A machine that has no working replication it should have (failed
// over, or unprotected after a committed failover) is a warning whose
// reason names the command that protects it again.
func (s *Server) setHealth(ctx context.Context, m *rebound.Machine) {
	health, reason := rebound.HealthNormal, ""
	replicated := false
	switch m.State {
	case rebound.MachineFailedOver:
		health, reason = rebound.HealthWarning, "replication stopped: "+nextStep(m)
	case rebound.MachineFailingOver:
		health, reason = rebound.HealthWarning, "replication stopped: failing over"
	case rebound.MachineUnprotected:
		if m.PreviousSite != "" && m.PreviousSite != m.ActiveSite {
			health, reason = rebound.HealthWarning, fmt.Sprintf("unprotected: run rebound reprotect %s", m.Name)
		}
	}
	if p := m.Protection; p != nil && (m.State == rebound.MachineProtected || m.State == rebound.MachineSyncing) {
		replicated = true
		pol, err := s.DB.GetPolicy(ctx, p.Policy)
		threshold := 30 * time.Second
		if err == nil && pol.RPOThreshold > 0 {
			threshold = time.Duration(pol.RPOThreshold)
		}
		lag := time.Duration(p.LagSeconds * float64(time.Second))
		switch {
		case s.siteOffline(ctx, p.SourceSite):
			health, reason = rebound.HealthCritical, fmt.Sprintf("source site %s is offline", p.SourceSite)
		case p.ReplError != "":
			health, reason = rebound.HealthCritical, p.ReplError
		case p.JournalError != "":
			health, reason = rebound.HealthCritical, p.JournalError
		case p.ReplState == "overflow":
			health, reason = rebound.HealthCritical, "spool full: only changed regions are tracked; they resync when the link returns"
		case lag > threshold:
			health, reason = rebound.HealthWarning, fmt.Sprintf("lag %s is above the RPO threshold %s", lag.Round(time.Second), threshold)
		case p.ReplState == "spooling":
			health, reason = rebound.HealthWarning, fmt.Sprintf("target site %s is unreachable; writes spool at %s", p.TargetSite, p.SourceSite)
		case s.siteOffline(ctx, p.TargetSite):
			health, reason = rebound.HealthWarning, fmt.Sprintf("target site %s is offline", p.TargetSite)
		}
	}
	// A full store stops every job, a failover's included.
	if full := s.storeReason(); full != "" && m.State != rebound.MachineUnprotected {
		if reason != "" {
			full += "; " + reason
		}
		health, reason = rebound.HealthCritical, full
	}
	if health != m.Health {
		s.event(m.Name, "", "health."+health, strings.TrimSpace("health "+health+" "+reason))
	}
	m.Health, m.HealthReason = health, reason
	s.metrics.health.WithLabelValues(m.Name).Set(map[string]float64{rebound.HealthNormal: 0, rebound.HealthWarning: 1, rebound.HealthCritical: 2}[health])
	if !replicated {
		s.metrics.forgetReplication(m.Name)
	}
}

func (s *Server) siteOffline(ctx context.Context, name string) bool {
	if _, ok := s.Site(name); ok {
		st, err := s.getSite(ctx, name)
		return err != nil || time.Since(st.LastSeen) > SiteOfflineAfter
	}
	return true
}

// watchdog forgets sites removed through another server, marks silent
// sites offline and re-derives health.
func (s *Server) watchdog() {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
		ctx := s.ctx
		stored, err := s.DB.ListSites(ctx)
		if err != nil {
			continue
		}
		sites := s.live.overlaySites(s.forgetRemovedSites(ctx, stored))
		for _, st := range sites {
			if st.Status == rebound.SiteOnline && s.siteOffline(ctx, st.Name) {
				st.Status = rebound.SiteOffline
				s.live.putSite(st) // a change of status: stored below
				if err := s.DB.PutSite(ctx, st); err != nil {
					s.storeFailed("store site status", err, "site", st.Name)
				} else {
					s.live.siteStored(st)
				}
				s.metrics.siteUp.WithLabelValues(st.Name).Set(0)
				s.event("", st.Name, "site.offline", "site "+st.Name+" went offline")
			}
		}
		s.rederiveHealth(ctx)
	}
}

// failoverTime is when the machine's last committed failover happened, for
// a release that waited for its site to reconnect.
func (s *Server) failoverTime(ctx context.Context, machine string) time.Time {
	v, ok, err := s.DB.GetSetting(ctx, "failover-time/"+machine)
	if err != nil || !ok {
		return time.Time{}
	}
	t, _ := time.Parse(time.RFC3339Nano, v)
	return t
}
