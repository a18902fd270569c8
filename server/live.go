package server

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/lograte"
)

// live is the status sites report and the server derives from it: sites'
// presence and machines' replication figures, VM status and health. It is
// the one place that status is kept; the API serves it from here, so it
// stays true while the store cannot be written (a full data disk). The
// store gets a best-effort copy, which a restarted server starts from.
type live struct {
	mu       sync.Mutex
	sites    map[string]rebound.Site
	siteAt   map[string]time.Time // report time of a site's stored copy
	machines map[string]liveMachine
}

// liveMachine is a machine's live part as last derived.
type liveMachine struct {
	health, reason string
	vm             *rebound.VMStatus
	prot           *rebound.Protection // nil: not protected
}

func newLive() *live {
	return &live{sites: map[string]rebound.Site{}, siteAt: map[string]time.Time{}, machines: map[string]liveMachine{}}
}

// record keeps m's live part. Every machine write goes through
// updateMachine, which records its result, so the live part is never older
// than the stored one.
func (l *live) record(m *rebound.Machine) {
	e := liveMachine{health: m.Health, reason: m.HealthReason}
	if m.VMStatus != nil {
		v := *m.VMStatus
		e.vm = &v
	}
	if m.Protection != nil {
		p := *m.Protection
		e.prot = &p
	}
	l.mu.Lock()
	l.machines[m.Name] = e
	l.mu.Unlock()
}

// overlay puts the live part on a machine read from the store. The
// replication figures go only onto the protection they were reported for.
func (l *live) overlay(m *rebound.Machine) {
	l.mu.Lock()
	e, ok := l.machines[m.Name]
	l.mu.Unlock()
	if !ok {
		return
	}
	m.Health, m.HealthReason = e.health, e.reason
	if e.vm != nil {
		v := *e.vm
		m.VMStatus = &v
	}
	p, lp := m.Protection, e.prot
	if p == nil || lp == nil || p.SourceSite != lp.SourceSite || p.TargetSite != lp.TargetSite {
		return
	}
	p.ReplState, p.SyncProgress, p.LagSeconds, p.BacklogBytes = lp.ReplState, lp.SyncProgress, lp.LagSeconds, lp.BacklogBytes
	p.DirtyBytes, p.ThroughputBps, p.LastPointTime, p.ReportedAt = lp.DirtyBytes, lp.ThroughputBps, lp.LastPointTime, lp.ReportedAt
	p.ReplError, p.JournalError, p.ThrottledWrites = lp.ReplError, lp.JournalError, lp.ThrottledWrites
}

func (l *live) forget(machine string) {
	l.mu.Lock()
	delete(l.machines, machine)
	l.mu.Unlock()
}

func (l *live) site(name string) (rebound.Site, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	st, ok := l.sites[name]
	return st, ok
}

// siteStoreEvery is how often a site whose report changed only its
// telemetry (last seen, free bytes) has its stored copy refreshed.
const siteStoreEvery = 30 * time.Second

// putSite keeps a site's report and says whether the store needs it: its
// first report, a change of address, status or version, or a copy older
// than siteStoreEvery. Call siteStored once the store has it.
func (l *live) putSite(st rebound.Site) (store bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	old, ok := l.sites[st.Name]
	l.sites[st.Name] = st
	at, stored := l.siteAt[st.Name]
	return !ok || !stored || old.Status != st.Status || old.NBDAddr != st.NBDAddr || old.ReplAddr != st.ReplAddr ||
		old.Version != st.Version || st.LastSeen.Sub(at) >= siteStoreEvery
}

// siteNames lists the sites held in memory, and whether this server
// stored each (siteStored).
func (l *live) siteNames() map[string]bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make(map[string]bool, len(l.sites))
	for name := range l.sites {
		_, stored := l.siteAt[name]
		out[name] = stored
	}
	return out
}

// siteStored notes that the store holds st.
func (l *live) siteStored(st rebound.Site) {
	l.mu.Lock()
	l.siteAt[st.Name] = st.LastSeen
	l.mu.Unlock()
}

// overlaySites puts the live sites on the stored ones; a site whose first
// report the store refused is served from memory alone.
func (l *live) overlaySites(stored []rebound.Site) []rebound.Site {
	l.mu.Lock()
	defer l.mu.Unlock()
	seen := map[string]bool{}
	for i, st := range stored {
		if ls, ok := l.sites[st.Name]; ok {
			stored[i] = ls
		}
		seen[st.Name] = true
	}
	var extra []rebound.Site
	for name, st := range l.sites {
		if !seen[name] {
			extra = append(extra, st)
		}
	}
	if len(extra) == 0 {
		return stored
	}
	out := append(stored, extra...)
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// getMachine reads a machine with its live part.
func (s *Server) getMachine(ctx context.Context, name string) (*rebound.Machine, error) {
	m, err := s.DB.GetMachine(ctx, name)
	if err != nil {
		return nil, err
	}
	s.live.overlay(m)
	return m, nil
}

// listMachines reads every machine with its live part.
func (s *Server) listMachines(ctx context.Context) ([]rebound.Machine, error) {
	ms, err := s.DB.ListMachines(ctx)
	if err != nil {
		return nil, err
	}
	for i := range ms {
		s.live.overlay(&ms[i])
	}
	return ms, nil
}

// listSites reads every site with its live status.
func (s *Server) listSites(ctx context.Context) ([]rebound.Site, error) {
	sts, err := s.DB.ListSites(ctx)
	if err != nil {
		return nil, err
	}
	return s.live.overlaySites(sts), nil
}

// getSite reads a site with its live status.
func (s *Server) getSite(ctx context.Context, name string) (*rebound.Site, error) {
	if st, ok := s.live.site(name); ok {
		return &st, nil
	}
	return s.DB.GetSite(ctx, name)
}

// The store's condition: a full data disk.

// minFreeBytes is the free space the store needs before a full disk counts
// as cleared; below it a write that happens to fit would end the condition
// only for the next one to bring it back.
const minFreeBytes = 1 << 20

// maxPendingEvents bounds the events kept in memory while the store refuses
// them.
const maxPendingEvents = 1000

// storeState is the store's condition as the server reports it.
type storeState struct {
	mu      sync.Mutex
	full    bool
	since   time.Time
	noted   bool            // the server.disk_full event is stored
	pending []rebound.Event // events the store refused, written once it takes them
	lost    int             // events dropped past maxPendingEvents
	log     lograte.Limiter // refused writes
	remind  lograte.Limiter // "still full"
}

// disk is the store's local disk, or noDisk for a store on a database
// server (PostgreSQL), whose full disk its errors report.
func (s *Server) disk() rebound.LocalStore {
	if l, ok := s.DB.(rebound.LocalStore); ok {
		return l
	}
	return noDisk{}
}

type noDisk struct{}

func (noDisk) Dir() string { return "the database server" }
func (noDisk) FullError() error {
	return rebound.Errorf(rebound.ENOSPACE, "the database server's disk is full: free space there")
}
func (noDisk) DiskFull() <-chan struct{} { return nil }
func (noDisk) FreeBytes() (int64, error) {
	return 0, errors.New("the store is not on this server's disk")
}

// StoreError is nil while the store can be written, else the reason it
// cannot (a rebound.ENOSPACE error naming the directory). /healthz answers
// with it.
func (s *Server) StoreError(ctx context.Context) error {
	s.store.mu.Lock()
	defer s.store.mu.Unlock()
	if !s.store.full {
		return nil
	}
	return rebound.Errorf(rebound.ENOSPACE, "%s (since %s)", rebound.ErrorMessage(s.disk().FullError()), s.store.since.Format(time.RFC3339))
}

// storeReason is the health reason while the store is full, "" otherwise.
func (s *Server) storeReason() string {
	s.store.mu.Lock()
	defer s.store.mu.Unlock()
	if !s.store.full {
		return ""
	}
	return fmt.Sprintf("server data disk full at %s: no job (a failover included) can start and changes are not saved; free space in %s", s.disk().Dir(), s.disk().Dir())
}

// storeFailed reports a store write that failed: a full disk is logged at
// a bounded rate (the condition has its own lines), anything else as is.
func (s *Server) storeFailed(msg string, err error, args ...any) {
	args = append(args, "err", err)
	if rebound.ErrorCode(err) == rebound.ENOSPACE {
		s.store.log.Warn(s.Logger, msg, args...)
		return
	}
	s.Logger.Error(msg, args...)
}

// watchStore turns the store's full-disk signals into the condition and,
// while it holds, checks every few seconds whether space returned.
func (s *Server) watchStore() {
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-s.disk().DiskFull():
			s.storeFull()
		case <-t.C:
			s.probeStore()
		}
	}
}

func (s *Server) storeFull() {
	s.store.mu.Lock()
	if s.store.full {
		s.store.mu.Unlock()
		return
	}
	since := time.Now().UTC()
	s.store.full, s.store.since, s.store.noted = true, since, false
	s.store.mu.Unlock()
	free, _ := s.disk().FreeBytes()
	s.Logger.Error("server data disk full: the store cannot be written; status is kept in memory, jobs and changes are refused until space is freed",
		"dir", s.disk().Dir(), "freeBytes", free)
	// The event may still fit; if not, it is written once space returns.
	if s.DB.AddEvent(s.ctx, s.fullEvent(since)) == nil {
		s.store.mu.Lock()
		s.store.noted = true
		s.store.mu.Unlock()
	}
	s.rederiveHealth(s.ctx)
}

// probeStore ends the condition once the directory has room and a write
// succeeds, then stores what waited.
func (s *Server) probeStore() {
	s.store.mu.Lock()
	full, since := s.store.full, s.store.since
	s.store.mu.Unlock()
	if !full {
		return
	}
	free, err := s.disk().FreeBytes()
	if err == nil && free < minFreeBytes {
		s.store.remind.Warn(s.Logger, "server data disk still full", "dir", s.disk().Dir(), "freeBytes", free, "since", since)
		return
	}
	if err := s.DB.PutSetting(s.ctx, "store-probe", time.Now().UTC().Format(time.RFC3339Nano)); err != nil {
		s.store.remind.Warn(s.Logger, "server data disk still refuses writes", "dir", s.disk().Dir(), "freeBytes", free, "err", err)
		return
	}
	s.store.mu.Lock()
	s.store.full = false
	noted, pending, lost := s.store.noted, s.store.pending, s.store.lost
	s.store.pending, s.store.lost = nil, 0
	s.store.mu.Unlock()
	dur := time.Since(since).Round(time.Second)
	s.Logger.Warn("server data disk has space again: the store is written again", "dir", s.disk().Dir(), "freeBytes", free,
		"fullFor", dur, "eventsRecordedLate", len(pending), "eventsLost", lost)
	if !noted {
		pending = append([]rebound.Event{s.fullEvent(since)}, pending...)
	}
	for _, e := range pending {
		s.addEvent(e)
	}
	msg := fmt.Sprintf("server data disk at %s has space again after %s full; %d events of that time were recorded late", s.disk().Dir(), dur, len(pending))
	if lost > 0 {
		msg += fmt.Sprintf(", %d were lost", lost)
	}
	s.addEvent(rebound.Event{Time: time.Now().UTC(), Kind: "server.disk_ok", Message: msg})
	s.rederiveHealth(s.ctx)
}

func (s *Server) fullEvent(since time.Time) rebound.Event {
	return rebound.Event{Time: since, Kind: "server.disk_full", Message: rebound.ErrorMessage(s.disk().FullError())}
}

// addEvent stores an event; one the full store refuses waits in memory.
func (s *Server) addEvent(e rebound.Event) {
	err := s.DB.AddEvent(context.Background(), e)
	if err == nil {
		return
	}
	if rebound.ErrorCode(err) != rebound.ENOSPACE {
		s.Logger.Error("add event", "kind", e.Kind, "err", err)
		return
	}
	s.store.mu.Lock()
	if len(s.store.pending) < maxPendingEvents {
		s.store.pending = append(s.store.pending, e)
	} else {
		s.store.lost++
	}
	s.store.mu.Unlock()
}

// rederiveHealth derives every machine's health again, for a change that
// is not a site's report (the store's condition, the watchdog).
func (s *Server) rederiveHealth(ctx context.Context) {
	ms, err := s.DB.ListMachines(ctx)
	if err != nil {
		return
	}
	for _, m := range ms {
		if err := s.updateLive(ctx, m.Name, func(m *rebound.Machine) { s.setHealth(ctx, m) }); err != nil && rebound.ErrorCode(err) != rebound.ENOTFOUND {
			s.storeFailed("store health", err, "machine", m.Name)
		}
	}
}
