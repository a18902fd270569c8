// Package site is the site appliance: it serves the disks of the machines
// active at its site over NBD, captures their writes into ordered streams,
// ships them to peer sites, receives peers' streams into journals, and
// exports recovery points on failover. It implements rebound.SiteService;
// the server reaches it through the control channel the site opens.
package site

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/capture"
	rgrpc "github.com/rebound-dr/rebound/grpc"
	"github.com/rebound-dr/rebound/internal/failpoint"
	"github.com/rebound-dr/rebound/journal"
	"github.com/rebound-dr/rebound/nbd"
	"github.com/rebound-dr/rebound/overlay"
	"github.com/rebound-dr/rebound/pki"
	"github.com/rebound-dr/rebound/qemu"
)

// Version is the site appliance's version string, reported to the server;
// the rebound command sets it to its build's version.
var Version = "0.1.0"

// Machine roles at a site.
const (
	RoleActive   = "active"   // served, not replicated
	RoleSource   = "source"   // served, captured and shipped
	RoleTarget   = "target"   // receiving a peer's stream
	RoleReleased = "released" // failed over elsewhere and committed: disks kept, not served
	RoleDetached = "detached" // a replica kept by unprotect --keep-replica: disks kept, not served
)

// The capture modes of Config.Capture.
const (
	CaptureDirect = "direct"
	CaptureSpool  = "spool"
)

// Config configures a Site.
type Config struct {
	Name    string
	DataDir string
	// PeerTLS is the mTLS config used to dial peers' replication listeners.
	PeerTLS *tls.Config
	// NBDHost is the host written into NBD URIs (the TCP listener's address
	// when empty).
	NBDHost string
	// FreezeHook and ThawHook run around app-consistent points with the
	// machine name as their argument and in REBOUND_MACHINE.
	FreezeHook, ThawHook string
	HookTimeout          time.Duration
	SpoolLimit           int64
	// Capture is how source streams keep the records the peer has not
	// acked: CaptureDirect ("" too: in memory, the spool only on
	// congestion, an activity map for a crash; docs/design/capture.md) or
	// CaptureSpool (every record appended to the spool before the write
	// is acknowledged).
	Capture string
	// JournalSegment is the target journals' wal segment size (0: the
	// wal's default); tests make it small to get many segments.
	JournalSegment int64
	// QEMU runs the VMs of qemu machines; nil: this site runs none.
	QEMU *qemu.Driver
	// NBDSocket is the unix socket VMs reach the exports through.
	NBDSocket string
	// NBDTLS, when set, says the TCP NBD listener serves its exports over
	// TLS: their URIs are nbds:// and a VM on them uses these credentials.
	NBDTLS *qemu.NBDTLS
	// Networks maps a machine's logical network to this site's (network
	// mapping); an unmapped network is QEMU user networking.
	Networks map[string]qemu.NICConfig
	// ExpireEvery is how often journals fold expired records into their base.
	ExpireEvery time.Duration
	Logger      *slog.Logger
	// External maps a machine to the paths of its disks when they are a
	// server's own devices (rebound agent): used in place, and a source of
	// such a machine is captured by Scan instead of by NBD writes.
	External map[string][]string
	// Scan captures an external machine's source stream until ctx is done.
	Scan func(ctx context.Context, machine, streamID string, stream *capture.Stream)
	// ReadExternal reads an external machine's disk for the stream's copies.
	ReadExternal func(machine string, disk int, p []byte, off int64) (int, error)
}

// Site is one site appliance.
type Site struct {
	cfg    Config
	logger *slog.Logger
	// regroupCrash, set by tests, stops a target regroup right after its
	// intent is saved, as a crash there would.
	regroupCrash func() bool
	NBD          *nbd.Server
	Repl         *rgrpc.ReplicationServer

	addrMu   sync.Mutex // guards nbdAddr and replAddr, read under mu too
	nbdAddr  string     // TCP address NBD listens on
	replAddr string

	// events go to the server over the control channel (Events).
	events   chan rebound.Event
	evMu     sync.Mutex
	evLast   map[string]time.Time // refusal key → last reported
	mu       sync.Mutex
	machines map[string]*machine
	units    map[string]*unit
	store    stateStore      // the state files (state.go)
	dirty    map[string]bool // units added or dropped since the last save
	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup
}

// machine is a machine as this site holds it: its disks and what serves
// them. Its stream is its unit's. Fields are guarded by Site.mu.
type machine struct {
	state  machineState
	unit   *unit
	offset int // the unit's index of this machine's disk 0

	files    []*capture.FileDisk // RoleActive
	trackers []*capture.Tracker  // RoleActive after a failover: writes since the point

	vm, testVM *qemu.VM    // qemu machines: the VM here, the test failover's VM
	live       []*liveDisk // what NBD connections hold (see liveDisk)
}

// machineState is what survives a restart of a machine (state.json, in
// its unit's members).
type machineState struct {
	Name  string         `json:"name"`
	Disks []rebound.Disk `json:"disks"`

	// VM runs the machine under QEMU; Power and TestPower are the desired
	// states of its VM here and of the test failover's VM.
	VM        *rebound.VMSpec `json:"vm,omitempty"`
	Power     string          `json:"power,omitempty"`
	TestPower string          `json:"testPower,omitempty"`

	// Hooks are the machine's own freeze and thaw hooks (rebound machine
	// set); they win over the site's --freeze-hook and --thaw-hook.
	Hooks rebound.Hooks `json:"hooks,omitempty"`
}

type activation struct {
	spec  rebound.ActivateSpec
	view  *journal.View
	disks []*overlay.Disk
	// trackers (failover, not test) record every write since the point:
	// after commit they seed the delta of a reprotect.
	trackers []*capture.Tracker
}

// New returns a site. Call Open to load its state and Serve* to listen.
func New(cfg Config) *Site {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.HookTimeout == 0 {
		cfg.HookTimeout = 30 * time.Second
	}
	if cfg.ExpireEvery == 0 {
		cfg.ExpireEvery = 10 * time.Second
	}
	s := &Site{cfg: cfg, logger: cfg.Logger.With("site", cfg.Name), machines: map[string]*machine{}, units: map[string]*unit{}, dirty: map[string]bool{},
		events: make(chan rebound.Event, 64), evLast: map[string]time.Time{}}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.NBD = &nbd.Server{Lookup: s.lookupExport, List: s.listExports, Logger: s.logger}
	s.Repl = &rgrpc.ReplicationServer{Target: s.target, OnRefuse: s.refused}
	return s
}

// SetAddrs records the listeners' addresses, reported to the server.
func (s *Site) SetAddrs(nbdAddr, replAddr string) {
	s.addrMu.Lock()
	defer s.addrMu.Unlock()
	s.nbdAddr, s.replAddr = nbdAddr, replAddr
}

// Open loads the site's state from its data directory and reopens every
// unit's disks, streams and journals.
func (s *Site) Open() error {
	if err := os.MkdirAll(filepath.Join(s.cfg.DataDir, "machines"), 0o700); err != nil {
		return err
	}
	s.store = stateStore{dir: s.cfg.DataDir}
	if checkState || os.Getenv(checkStateEnv) == "1" {
		s.store.written = map[string][]byte{}
	}
	states, migrated, logged, err := s.store.load()
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	// A migrated state and a log's records become a snapshot at once.
	save := migrated || logged
	var cleanup []string
	for _, st := range states {
		if st.Generation == "" { // state from before generations
			st.Generation, save = newGeneration(), true
		}
		ms := make([]*machine, len(st.Members))
		for i, mst := range st.Members {
			ms[i] = &machine{state: mst}
		}
		u := newUnit(st.Name, st.unitFields, ms)
		if u.state.Regroup != nil {
			// A regroup the site was killed in is finished first.
			rm, err := s.finishRegroup(u)
			if err != nil {
				return fmt.Errorf("open machine %s: %w", st.Name, err)
			}
			cleanup, save = append(cleanup, rm...), true
		}
		if err := s.openUnit(u); err != nil {
			return fmt.Errorf("open machine %s: %w", st.Name, err)
		}
		s.addUnitLocked(u)
	}
	clear(s.dirty)
	if save {
		// A generation must not change at the next start; a migrated
		// state is written in the current version at once.
		if err := s.snapshotLocked(); err != nil {
			return err
		}
		if err := removeAll(cleanup); err != nil {
			s.logger.Warn("regroup: remove old journals", "err", err)
		}
	} else if err := s.store.openLog(); err != nil {
		return err
	}
	if s.store.written != nil && !save {
		for _, u := range s.units {
			s.store.written[u.name], _ = json.Marshal(unitStateOf(u))
		}
	}
	return nil
}

// Close stops every goroutine and closes every file. NBD and gRPC servers
// are owned by the caller.
func (s *Site) Close() error {
	s.cancel()
	s.wg.Wait()
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for _, u := range s.units {
		errs = append(errs, s.closeUnit(u))
	}
	if s.store.written != nil {
		s.checkWrittenLocked()
	}
	errs = append(errs, s.closeState())
	return errors.Join(errs...)
}

func (s *Site) machineDir(name string) string {
	return filepath.Join(s.cfg.DataDir, "machines", name)
}

func (s *Site) diskPath(name string, i int) string {
	if p := s.cfg.External[name]; i < len(p) {
		return p[i]
	}
	return filepath.Join(s.machineDir(name), fmt.Sprintf("disk%d.raw", i))
}

// openUnit opens the files of u according to its persisted role.
func (s *Site) openUnit(u *unit) error {
	st := &u.state
	switch st.Role {
	case RoleActive:
		return s.openUnitFiles(u)
	case RoleSource:
		return s.startSource(u, false)
	case RoleTarget:
		j, err := journal.Open(filepath.Join(s.unitDir(u), "journal"), u.disks(), s.journalOptions(u.name))
		if err != nil {
			return err
		}
		u.journal = j
		if j.Corrupt() != nil {
			s.repairJournal(u, j)
		}
		s.startExpiry(u, j)
		if st.Act != nil {
			if u.act, err = s.activate(u, *st.Act); err != nil {
				return err
			}
		}
		if st.Test != nil {
			if u.test, err = s.activate(u, *st.Test); err != nil {
				return err
			}
		}
		return nil
	case RoleReleased:
		return nil
	case RoleDetached:
		// A crash after the detach was saved can leave its journal.
		return journal.Remove(filepath.Join(s.unitDir(u), "journal"))
	}
	return fmt.Errorf("unknown role %q", st.Role)
}

// openUnitFiles opens every member's disk files (RoleActive).
func (s *Site) openUnitFiles(u *unit) error {
	for _, m := range u.members {
		if err := s.openFiles(m); err != nil {
			return err
		}
	}
	return nil
}

func (s *Site) closeUnitFiles(u *unit) error {
	var errs []error
	for _, m := range u.members {
		errs = append(errs, s.closeFiles(m))
	}
	return errors.Join(errs...)
}

func (s *Site) openFiles(m *machine) error {
	for i, d := range m.state.Disks {
		f, err := capture.OpenFileDisk(s.diskPath(m.state.Name, i), d.Size)
		if err != nil {
			return err
		}
		m.files = append(m.files, f)
	}
	return s.openTrackers(m)
}

func (s *Site) closeFiles(m *machine) error {
	var errs []error
	for _, f := range m.files {
		f.SetTracker(nil)
		errs = append(errs, f.Close())
	}
	m.files = nil
	for _, t := range m.trackers {
		errs = append(errs, t.Close())
	}
	m.trackers = nil
	return errors.Join(errs...)
}

// startSource opens the capture stream over the unit's disks and starts
// shipping it. A new stream begins with the initial copy.
func (s *Site) startSource(u *unit, initial bool) error {
	var seed [][]rebound.Region
	if initial {
		seed = allDisks
	}
	return s.startSourceSeed(u, seed)
}

// allDisks asks startSourceSeed for a full initial copy.
var allDisks = [][]rebound.Region{}

// external returns the one member of u whose disks are a server's own
// devices (rebound agent), or "".
func (s *Site) external(u *unit) string {
	for _, m := range u.members {
		if s.cfg.External[m.state.Name] != nil {
			return m.state.Name
		}
	}
	return ""
}

// startSourceSeed opens the capture stream and starts shipping it. A nil
// seed reopens an existing stream; allDisks starts with a full copy; other
// regions start with a delta resync of just those regions.
func (s *Site) startSourceSeed(u *unit, seed [][]rebound.Region) error {
	st := &u.state
	specs := s.diskSpecs(u)
	// 4 KiB regions: a delta resync sends what changed, not 64 KiB around it.
	extName := s.external(u)
	ext := extName != ""
	if ext && !u.lone() {
		return rebound.Errorf(rebound.EINVALID, "machine %s is a server's own disks (rebound agent): it replicates alone, not in a group", extName)
	}
	// Direct: protocol A, the spool only on congestion (capture.md).
	direct := !ext && s.cfg.Capture != CaptureSpool
	opts := capture.Options{SpoolLimit: s.cfg.SpoolLimit, RegionSize: 4096, External: ext, Direct: direct, Logger: s.logger.With("machine", u.name)}
	if st.Spec != nil {
		opts.Congestion = st.Spec.Policy.Congestion
	}
	if read := s.cfg.ReadExternal; ext && read != nil {
		opts.ReadDisk = func(disk int, p []byte, off int64) (int, error) { return read(extName, disk, p, off) }
	}
	stream, err := capture.Open(s.streamDir(u), specs, opts)
	if err != nil {
		return err
	}
	if seed == nil && stream.Head() == 0 && st.Spec != nil {
		// A crash inside the seeding left an empty stream: seed it again,
		// or the target never gets the resync's end and its first point.
		seed = allDisks
		if st.Spec.Seed == rebound.SeedDelta {
			seed = s.deltaSeedFromFiles(u, st.Spec.Regions)
		}
	}
	switch {
	case seed == nil || ext: // an external machine's Scan sends what differs
	case len(seed) == 0:
		err = stream.StartInitialCopy()
	default:
		err = stream.StartResync(seed)
	}
	if err != nil {
		stream.Close()
		return err
	}
	u.stream = stream
	ctx, cancel := context.WithCancel(s.ctx)
	u.stop = cancel
	spec := *st.Spec
	u.policyC = make(chan rebound.Policy, 1)
	policyC := u.policyC
	// Site certificates name the site, not its address.
	peerTLS := s.cfg.PeerTLS.Clone()
	peerTLS.ServerName = spec.PeerSite
	name := u.name
	u.sender = &rgrpc.Sender{
		Addr: spec.PeerAddr, TLS: peerTLS, StreamID: spec.StreamID,
		SourceSite: s.cfg.Name, Generation: spec.Generation, Source: repairingStream{stream, s, name, spec.PeerSite},
		Compression: rgrpc.CompressAuto,
	}
	sender := u.sender
	sent := make(chan struct{})
	u.sent = sent
	s.wg.Add(2)
	go func() {
		defer s.wg.Done()
		defer close(sent)
		failpoint.Hit(ctx, "site/sender/start") // tests hold a new stream's sending (a resync) here
		if err := sender.Run(ctx); err != nil && ctx.Err() == nil {
			s.logger.Error("replication sender stopped", "machine", name, "err", err)
		}
	}()
	go func() {
		defer s.wg.Done()
		if ext && s.cfg.Scan != nil {
			s.cfg.Scan(ctx, extName, spec.StreamID, stream)
			return
		}
		s.cutPoints(ctx, name, stream, spec.Policy, policyC)
	}()
	return nil
}

// cutPoints cuts a crash-consistent point every CrashInterval and an
// app-consistent one every AppInterval, while the stream is consistent. A
// policy from policyC restarts both intervals.
func (s *Site) cutPoints(ctx context.Context, name string, stream *capture.Stream, p rebound.Policy, policyC <-chan rebound.Policy) {
	for {
		np, ok := s.cutPointsUntil(ctx, name, stream, p, policyC)
		if !ok {
			return
		}
		p = np
	}
}

// cutPointsUntil cuts points by p until ctx ends (false) or a new policy
// arrives (it, true).
func (s *Site) cutPointsUntil(ctx context.Context, name string, stream *capture.Stream, p rebound.Policy, policyC <-chan rebound.Policy) (rebound.Policy, bool) {
	crash := time.Duration(p.CrashInterval)
	if crash <= 0 {
		crash = 5 * time.Second
	}
	tc := time.NewTicker(crash)
	defer tc.Stop()
	var appC <-chan time.Time
	if app := time.Duration(p.AppInterval); app > 0 {
		ta := time.NewTicker(app)
		defer ta.Stop()
		appC = ta.C
	}
	for {
		select {
		case <-ctx.Done():
			return p, false
		case np := <-policyC:
			return np, true
		case <-tc.C:
			st := stream.Stats()
			if st.State == "syncing" || st.State == "resyncing" || st.State == "overflow" {
				continue
			}
			if _, err := stream.Mark(rebound.PointCrash); err != nil {
				s.logger.Warn("cut crash-consistent point", "machine", name, "err", err)
			}
		case <-appC:
			if _, err := s.CutPoint(ctx, name, rebound.PointApp); err != nil {
				s.logger.Warn("cut app-consistent point", "machine", name, "err", err)
			}
		}
	}
}

// stopSource stops the sender and tickers and closes the stream. It waits
// for the sender to return, so no send of the old stream reaches the peer
// after it (a new stream or a stopped target). The tickers are not waited
// for: an app-consistent cut takes s.mu, which the caller holds.
func (s *Site) stopSource(u *unit) error {
	if u.stop != nil {
		u.stop()
		u.stop = nil
	}
	if u.sent != nil {
		<-u.sent
		u.sent = nil
	}
	var err error
	if u.stream != nil {
		err = u.stream.Close()
		u.stream = nil
	}
	u.sender = nil
	return err
}

func (s *Site) closeUnit(u *unit) error {
	var errs []error
	for _, m := range u.members {
		// VMs outlive the site process: a restarted site attaches to them.
		for _, vm := range []*qemu.VM{m.vm, m.testVM} {
			if vm != nil {
				vm.Close()
			}
		}
		m.vm, m.testVM = nil, nil
	}
	errs = append(errs, s.closeUnitFiles(u), s.stopSource(u))
	for _, a := range []*activation{u.act, u.test} {
		if a != nil {
			errs = append(errs, a.close())
		}
	}
	u.act, u.test = nil, nil
	if u.journal != nil {
		errs = append(errs, u.journal.Close())
		u.journal = nil
	}
	return errors.Join(errs...)
}

func (a *activation) close() error {
	var errs []error
	for _, d := range a.disks {
		errs = append(errs, d.Close())
	}
	for _, t := range a.trackers {
		errs = append(errs, t.Close())
	}
	if a.view != nil {
		errs = append(errs, a.view.Close())
	}
	return errors.Join(errs...)
}

// exportName is the NBD export name of a machine's disk.
func exportName(machine string, disk int, test bool) string {
	if test {
		return fmt.Sprintf("%s-disk%d-test", machine, disk)
	}
	return fmt.Sprintf("%s-disk%d", machine, disk)
}

// nbdURI builds the URI of an export that qemu-io and nbdcopy accept:
// nbds:// when the TCP listener requires TLS.
func (s *Site) nbdURI(export string) string {
	s.addrMu.Lock()
	addr := s.nbdAddr
	s.addrMu.Unlock()
	if s.cfg.NBDHost != "" {
		if _, port, err := net.SplitHostPort(addr); err == nil {
			addr = net.JoinHostPort(s.cfg.NBDHost, port)
		}
	}
	if s.cfg.NBDTLS != nil {
		return nbd.TLSURI(addr, export)
	}
	return nbd.URI("tcp", addr, export)
}

func (s *Site) disksWithURIs(name string, disks []rebound.Disk, test bool) []rebound.Disk {
	out := make([]rebound.Disk, len(disks))
	for i, d := range disks {
		out[i] = rebound.Disk{Name: d.Name, Size: d.Size, NBD: s.nbdURI(exportName(name, i, test))}
	}
	return out
}

// unitDisksWithURIs returns the unit's disks with the exports of their
// members, in unit order.
func (s *Site) unitDisksWithURIs(u *unit, test bool) []rebound.Disk {
	var out []rebound.Disk
	for _, m := range u.members {
		out = append(out, s.disksWithURIs(m.state.Name, m.state.Disks, test)...)
	}
	return out
}

// lookupExport resolves an NBD export name to the disk behind it.
func (s *Site) lookupExport(name string) (*nbd.Export, error) {
	test := strings.HasSuffix(name, "-test")
	base := strings.TrimSuffix(name, "-test")
	i := strings.LastIndex(base, "-disk")
	if i < 0 {
		return nil, fmt.Errorf("unknown export %q", name)
	}
	var idx int
	if _, err := fmt.Sscanf(base[i+len("-disk"):], "%d", &idx); err != nil {
		return nil, fmt.Errorf("unknown export %q", name)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	m, ok := s.machines[base[:i]]
	if !ok || idx < 0 || idx >= len(m.state.Disks) || exportName(m.state.Name, idx, test) != name {
		return nil, fmt.Errorf("unknown export %q", name)
	}
	u := m.unit
	var b nbd.Backend
	switch {
	case test:
		if u.test != nil {
			b = u.test.disks[m.offset+idx]
		}
	case u.state.Fenced:
		return nil, fmt.Errorf("export %q is fenced: machine %s is failing over", name, m.state.Name)
	case currentLocked(m, idx) != nil:
		b = s.liveLocked(m)[idx]
	}
	if b == nil {
		return nil, fmt.Errorf("export %q is not active at site %s", name, s.cfg.Name)
	}
	return &nbd.Export{Name: name, Description: m.state.Disks[idx].Name, Backend: b}, nil
}

func (s *Site) listExports() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var names []string
	for _, m := range s.machines {
		served := servedLocked(m, false)
		for i := range m.state.Disks {
			if served {
				names = append(names, exportName(m.state.Name, i, false))
			}
			if m.unit.test != nil {
				names = append(names, exportName(m.state.Name, i, true))
			}
		}
	}
	sort.Strings(names)
	return names
}

// target finds the journal a peer's stream lands in, and who may feed it:
// the source site and generation the server set the target up with.
func (s *Site) target(streamID string) (rgrpc.Target, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, u := range s.units {
		if sp := u.state.Spec; u.state.Role == RoleTarget && sp != nil && sp.StreamID == streamID && u.journal != nil {
			return rgrpc.Target{Sink: u.journal, Machine: u.name, SourceSite: sp.PeerSite, Generation: sp.Generation}, nil
		}
	}
	return rgrpc.Target{}, rebound.Errorf(rebound.ENOTFOUND, "site %s receives no stream %q", s.cfg.Name, streamID)
}

// refuseEvery bounds how often the same refusal (peer, stream, reason) is
// reported: a peer retrying in a loop must not flood the event log.
const refuseEvery = time.Minute

// refused reports a refused replication stream to the server.
func (s *Site) refused(f rgrpc.Refusal) {
	key := f.Peer.Name + "\x00" + f.StreamID + "\x00" + f.Reason
	now := time.Now()
	s.evMu.Lock()
	last, seen := s.evLast[key]
	if !seen || now.Sub(last) >= refuseEvery {
		s.evLast[key] = now
	}
	s.evMu.Unlock()
	if seen && now.Sub(last) < refuseEvery {
		return
	}
	who := fmt.Sprintf("site %s", f.Peer.Name)
	if f.Peer.Role == pki.RoleAgent {
		who = fmt.Sprintf("agent %s (machine %s)", f.Peer.Name, f.Peer.Machine)
	}
	s.emit(rebound.Event{Time: now.UTC(), Machine: f.Machine, Kind: "replication.refused",
		Message: fmt.Sprintf("site %s refused a replication stream from %s: %s", s.cfg.Name, who, f.Reason)})
}

// Refused reports a connection refused before any stream (e.g. a
// handshake with a revoked certificate), rate-limited like a refused
// stream.
func (s *Site) Refused(f rgrpc.Refusal) { s.refused(f) }

// emit queues an event for the server. The control router drains the
// queue into its outbox even while no server is reachable (the outbox
// bounds and counts what it drops: docs/design/ha.md, "Events"), so a
// full queue means the router itself is stuck: the event is only logged.
func (s *Site) emit(e rebound.Event) {
	select {
	case s.events <- e:
	default:
		s.logger.Warn("event queue full; event only logged", "kind", e.Kind, "machine", e.Machine, "message", e.Message)
	}
}

// Events is what the site reports to the server besides its status
// (grpc.WithEvents forwards it over the control channel).
func (s *Site) Events() <-chan rebound.Event { return s.events }

// getLocked returns the machine or a not-found error.
func (s *Site) getLocked(name string) (*machine, error) {
	m, ok := s.machines[name]
	if !ok {
		return nil, rebound.Errorf(rebound.ENOTFOUND, "machine %q is not held at site %s", name, s.cfg.Name)
	}
	return m, nil
}

func (s *Site) freeBytes() int64 {
	var st syscall.Statfs_t
	if err := syscall.Statfs(s.cfg.DataDir, &st); err != nil {
		return 0
	}
	return int64(st.Bavail) * int64(st.Bsize)
}

// runHook runs a freeze or thaw hook with a timeout.
func (s *Site) runHook(ctx context.Context, hook, machine string) error {
	if hook == "" {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, s.cfg.HookTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, hook, machine)
	cmd.Env = append(os.Environ(), "REBOUND_MACHINE="+machine, "REBOUND_SITE="+s.cfg.Name)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("hook %s: %w: %s", hook, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// journalDamage says what a damaged journal lost and what to run. The
// points before the damage are still served; those after it are gone.
// While the automatic repair runs it says so, and names the manual resync
// for a repair that does not finish.
func journalDamage(site string, u *unit, j *journal.Journal) string {
	st := &u.state
	kept := "no recovery point is left"
	if pl := j.Points(); len(pl.Points) > 0 {
		p := pl.Points[len(pl.Points)-1]
		kept = fmt.Sprintf("points up to %s (%s) are kept, every later one is lost", p.ID, p.Time.Format(time.RFC3339))
	}
	from := "SITE"
	if st.Spec != nil {
		from = st.Spec.PeerSite
	}
	manual := fmt.Sprintf("rebound unprotect %s --wait, then rebound protect %s --to %s --wait (at %s)", u.name, u.name, site, from)
	if lo, hi, armed, ok := j.Repairing(); ok {
		step := "waiting for " + from + " to compare its disks with this journal's digests"
		if armed {
			step = "the repair resync from " + from + " is running (see the machine's sync progress)"
		}
		return fmt.Sprintf("journal of %s at %s is damaged: records %d..%d were dropped, %s; repairing automatically: %s. If it does not finish: %s",
			u.name, site, lo, hi, kept, step, manual)
	}
	return fmt.Sprintf("journal of %s at %s is damaged (%v): %s; resync it: %s", u.name, site, j.Corrupt(), kept, manual)
}

// journalOptions are a target journal's: it logs to the site's log and a
// finished repair is an event.
func (s *Site) journalOptions(name string) journal.Options {
	return journal.Options{Logger: s.logger, SegmentSize: s.cfg.JournalSegment, OnRepaired: func(from, to uint64) {
		s.emit(rebound.Event{Time: time.Now().UTC(), Machine: name, Site: s.cfg.Name, Kind: "journal.repaired",
			Message: fmt.Sprintf("journal of %s at %s is repaired: the regions records %d..%d changed were resynced; new points are cut again", name, s.cfg.Name, from, to)})
	}}
}

// repairJournal reports a damaged journal (journal.damaged) and starts its
// repair: the damaged records are dropped (the points before them stay)
// and the source is asked for a digest-compare resync on its next connect
// (journal.repair.started). A journal that cannot repair itself stays
// damaged, and the message names the manual resync.
func (s *Site) repairJournal(u *unit, j *journal.Journal) {
	st := &u.state
	damage := journalDamage(s.cfg.Name, u, j)
	from, to, err := j.Repair()
	if err != nil {
		s.logger.Error("journal: automatic repair failed", "machine", u.name, "err", err)
		s.emit(rebound.Event{Time: time.Now().UTC(), Machine: u.name, Site: s.cfg.Name, Kind: "journal.damaged", Message: damage})
		return
	}
	peer := "the source"
	if st.Spec != nil {
		peer = st.Spec.PeerSite
	}
	s.emit(rebound.Event{Time: time.Now().UTC(), Machine: u.name, Site: s.cfg.Name, Kind: "journal.damaged", Message: journalDamage(s.cfg.Name, u, j)})
	s.emit(rebound.Event{Time: time.Now().UTC(), Machine: u.name, Site: s.cfg.Name, Kind: "journal.repair.started",
		Message: fmt.Sprintf("repair of the journal of %s at %s started: damaged records %d..%d dropped; %s compares its disks with this journal's digests and resyncs the blocks that differ", u.name, s.cfg.Name, from, to, peer)})
}

// repairingStream is a source stream whose repairs of the target's journal
// are events at this site.
type repairingStream struct {
	*capture.Stream
	s        *Site
	name, to string
}

func (r repairingStream) Repair(ctx context.Context, req *rebound.RepairRequest) error {
	if err := r.Stream.Repair(ctx, req); err != nil {
		return err
	}
	st := r.Stream.Stats()
	r.s.emit(rebound.Event{Time: time.Now().UTC(), Machine: r.name, Site: r.s.cfg.Name, Kind: "journal.repair.resync",
		Message: fmt.Sprintf("repairing the journal of %s at %s (records %d..%d lost): its digests were compared with the disks here; %d bytes to resync",
			r.name, r.to, req.From, req.To, st.SyncTotal-st.SyncDone)})
	return nil
}
