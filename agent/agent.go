// Package agent protects a Linux server's own block devices or files
// without a kernel module. The agent is a site appliance (package site)
// whose one machine's disks are the server's devices, used in place. Its
// change capture is a scan loop instead of NBD write capture: each cycle
// optionally freezes a filesystem, hashes every disk in 64 KiB blocks,
// copies the blocks whose digests changed since the previous cycle into
// the capture stream inside a resync window, thaws, and cuts one recovery
// point. See docs/design/agent.md.
package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/capture"
	"github.com/rebound-dr/rebound/digest"
)

// Defaults for Config.
const (
	DefaultInterval      = 10 * time.Second
	DefaultFreezeTimeout = time.Minute
	DefaultBlockSize     = 64 << 10
)

// Config configures an Agent.
type Config struct {
	// Machine is the protected machine's name (the agent's site name too).
	Machine string
	// Disks are the paths of the block devices or files, in disk order.
	Disks []string
	// FreezeMount, if set, is frozen (fsfreeze -f) while a cycle reads
	// the disks, and thawed afterwards, always; the cycle's point is then
	// app-consistent.
	FreezeMount string
	// Interval is the least time between the starts of two cycles.
	Interval time.Duration
	// FreezeTimeout bounds a freeze: a cycle that needs longer thaws and
	// cuts no point.
	FreezeTimeout time.Duration
	BlockSize     int64
	Workers       int // hashing goroutines; default GOMAXPROCS
	// StateDir holds the last cycle's digests, per stream.
	StateDir string
	Logger   *slog.Logger

	// OnFrozen, if set, is called while the cycle still holds the freeze,
	// after the copy is in the stream (tests record what the point holds).
	OnFrozen func()
	// OnPoint, if set, is called with each point a cycle cuts.
	OnPoint func(rebound.RecoveryPoint)
}

// Stats describes the agent's cycles.
type Stats struct {
	Cycles       int
	LastPoint    rebound.RecoveryPoint
	LastScan     time.Duration // hashing time of the last cycle
	LastScanned  int64         // bytes hashed by the last cycle
	LastChanged  int64         // bytes the last cycle copied
	LastFrozen   time.Duration // how long the last cycle held the freeze
	LastError    string
	ScannedTotal int64
	ChangedTotal int64
}

// Agent runs the scan-based change capture of one machine.
type Agent struct {
	cfg    Config
	disks  []rebound.Disk
	direct []*directDisk // the disks, read past the page cache
	logger *slog.Logger
	ready  chan struct{} // closed once Service has read the fenced state

	cycleMu sync.Mutex // one cycle at a time; Fence waits for it

	mu       sync.Mutex
	stream   *capture.Stream
	streamID string
	prev     [][][]byte // the last cycle's digests of stream streamID; nil: none
	fenced   bool
	stats    Stats
}

// New checks the disks and returns an agent. Call Scan (as the site's
// Config.Scan) and Service.
func New(cfg Config) (*Agent, error) {
	if cfg.Machine == "" {
		return nil, rebound.Errorf(rebound.EINVALID, "the agent needs a name (--name)")
	}
	if len(cfg.Disks) == 0 {
		return nil, rebound.Errorf(rebound.EINVALID, "the agent needs at least one disk (--disk PATH)")
	}
	if cfg.Interval <= 0 {
		cfg.Interval = DefaultInterval
	}
	if cfg.FreezeTimeout <= 0 {
		cfg.FreezeTimeout = DefaultFreezeTimeout
	}
	if cfg.BlockSize <= 0 {
		cfg.BlockSize = DefaultBlockSize
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.StateDir == "" {
		return nil, rebound.Errorf(rebound.EINVALID, "the agent needs a state directory")
	}
	a := &Agent{cfg: cfg, logger: cfg.Logger.With("agent", cfg.Machine), ready: make(chan struct{})}
	for i, p := range cfg.Disks {
		if !filepath.IsAbs(p) {
			return nil, rebound.Errorf(rebound.EINVALID, "disk %q: give an absolute path", p)
		}
		n, err := DeviceSize(p)
		if err != nil {
			return nil, err
		}
		a.disks = append(a.disks, rebound.Disk{Name: fmt.Sprintf("disk%d", i), Size: n})
		d, err := openDirect(p, n)
		if err != nil {
			a.Close()
			return nil, err
		}
		a.direct = append(a.direct, d)
	}
	if cfg.FreezeMount != "" {
		if _, err := exec.LookPath("fsfreeze"); err != nil {
			return nil, rebound.Errorf(rebound.EINVALID, "--freeze-mount needs fsfreeze (util-linux): %v", err)
		}
	}
	return a, nil
}

// Close closes the agent's disks. Call it after the site's Close (the
// stream reads them through ReadDisk).
func (a *Agent) Close() error {
	var errs []error
	for _, d := range a.direct {
		errs = append(errs, d.Close())
	}
	a.direct = nil
	return errors.Join(errs...)
}

// ReadDisk is the site's Config.ReadExternal: the stream's copies read the
// disks past the page cache, like the scan.
func (a *Agent) ReadDisk(machine string, disk int, p []byte, off int64) (int, error) {
	if machine != a.cfg.Machine || disk < 0 || disk >= len(a.direct) {
		return 0, rebound.Errorf(rebound.EINVALID, "agent %s has no disk %d of machine %q", a.cfg.Machine, disk, machine)
	}
	return a.direct[disk].ReadAt(p, off)
}

// DeviceSize returns the size of a block device or regular file.
func DeviceSize(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, rebound.Errorf(rebound.EINVALID, "disk %s: %v", path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	switch {
	case fi.Mode().IsRegular():
		if fi.Size() == 0 {
			return 0, rebound.Errorf(rebound.EINVALID, "disk %s is empty", path)
		}
		return fi.Size(), nil
	case fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0:
		n, err := f.Seek(0, io.SeekEnd)
		if err != nil || n <= 0 {
			return 0, rebound.Errorf(rebound.EINVALID, "disk %s: cannot read the device size (%v)", path, err)
		}
		return n, nil
	}
	return 0, rebound.Errorf(rebound.EINVALID, "disk %s is neither a block device nor a regular file", path)
}

// Disks returns the machine's disks: names and sizes.
func (a *Agent) Disks() []rebound.Disk { return append([]rebound.Disk(nil), a.disks...) }

// External is the site's Config.External: the machine's disk paths.
func (a *Agent) External() map[string][]string {
	return map[string][]string{a.cfg.Machine: append([]string(nil), a.cfg.Disks...)}
}

// Stats returns the agent's cycle figures.
func (a *Agent) Stats() Stats {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.stats
}

// Scan is the site's Config.Scan: it runs a cycle every Interval on the
// machine's source stream until ctx is done (the stream stops).
func (a *Agent) Scan(ctx context.Context, machine, streamID string, stream *capture.Stream) {
	if machine != a.cfg.Machine {
		return
	}
	select {
	case <-a.ready:
	case <-ctx.Done():
		return
	}
	prev, err := a.loadDigests(streamID)
	if err != nil {
		a.logger.Warn("last digests unreadable; the next cycle sends every block that is not zero", "err", err)
	}
	a.mu.Lock()
	a.stream, a.streamID, a.prev = stream, streamID, prev
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		if a.stream == stream {
			a.stream, a.streamID, a.prev = nil, "", nil
		}
		a.mu.Unlock()
	}()
	a.removeOtherStreams(streamID)
	for {
		start := time.Now()
		if _, err := a.Cycle(ctx, rebound.PointCrash); err != nil && ctx.Err() == nil {
			if a.isFenced() {
				a.logger.Debug("cycle skipped: fenced", "err", err)
			} else {
				a.logger.Warn("cycle", "err", err)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(max(a.cfg.Interval-time.Since(start), 10*time.Millisecond)):
		}
	}
}

func (a *Agent) isFenced() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.fenced
}

// Cycle runs one cycle now and returns its point: app-consistent when a
// freeze mount is configured (kind PointApp needs one).
func (a *Agent) Cycle(ctx context.Context, kind rebound.PointKind) (p rebound.RecoveryPoint, err error) {
	if kind == rebound.PointApp && a.cfg.FreezeMount == "" {
		return p, rebound.Errorf(rebound.ECONFLICT, "agent %s has no freeze mount: app-consistent points need --freeze-mount", a.cfg.Machine)
	}
	a.cycleMu.Lock()
	defer a.cycleMu.Unlock()
	a.mu.Lock()
	stream, streamID, prev, fenced := a.stream, a.streamID, a.prev, a.fenced
	a.mu.Unlock()
	switch {
	case stream == nil:
		return p, rebound.Errorf(rebound.ECONFLICT, "machine %q is not replicated from agent %s", a.cfg.Machine, a.cfg.Machine)
	case fenced:
		return p, rebound.Errorf(rebound.ECONFLICT, "machine %q is fenced (failing over): no cycle runs", a.cfg.Machine)
	}
	defer func() {
		a.mu.Lock()
		if err != nil {
			a.stats.LastError = err.Error()
		} else {
			a.stats.LastError = ""
		}
		a.mu.Unlock()
	}()
	// A resync left by a restart finishes first; an overflow waits for the
	// link rather than holding a freeze that cannot end.
	if err := waitStreaming(ctx, stream, a.cfg.FreezeTimeout); err != nil {
		return p, err
	}
	if a.cfg.FreezeMount != "" {
		kind = rebound.PointApp
	}

	frozenAt := time.Now()
	fctx, cancel := context.WithTimeout(ctx, a.cfg.FreezeTimeout)
	defer cancel()
	thawed := true
	if a.cfg.FreezeMount != "" {
		if err := fsfreeze(fctx, "-f", a.cfg.FreezeMount); err != nil {
			// Part of it may have frozen: thaw whatever happens.
			_ = fsfreeze(context.Background(), "-u", a.cfg.FreezeMount)
			return p, rebound.Errorf(rebound.ECONFLICT, "freeze %s: %v", a.cfg.FreezeMount, err)
		}
		thawed = false
	}
	thaw := func() error {
		if thawed {
			return nil
		}
		thawed = true
		tctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		var err error
		for range 3 {
			if err = fsfreeze(tctx, "-u", a.cfg.FreezeMount); err == nil {
				return nil
			}
		}
		a.logger.Error("thaw failed", "mount", a.cfg.FreezeMount, "err", err)
		return err
	}
	defer thaw()

	scanStart := time.Now()
	cur, scanned, err := a.scan(fctx)
	if err != nil {
		return p, err
	}
	scanTime := time.Since(scanStart)

	regions := make([][]rebound.Region, len(a.disks))
	var changed int64
	for i, d := range a.disks {
		var old [][]byte
		if prev != nil {
			old = prev[i]
		}
		regions[i] = changedRegions(old, cur[i], a.cfg.BlockSize, d.Size)
		for _, r := range regions[i] {
			changed += r.Length
		}
	}
	// The first cycle of a stream opens a window even with nothing to
	// send: the target needs a consistent position for its first point.
	if prev == nil || changed > 0 {
		if err := stream.StartResync(regions); err != nil {
			return p, fmt.Errorf("agent: start copy: %w", err)
		}
		// The copy reads the disks while they are frozen: the window's
		// end is the frozen state.
		if err := waitStreaming(fctx, stream, 0); err != nil {
			return p, rebound.Errorf(rebound.EUNAVAILABLE, "agent: the copy of %d bytes did not finish within the freeze timeout %s (spool full? link slow?); thawed, no point cut: %v", changed, a.cfg.FreezeTimeout, err)
		}
	}
	if a.cfg.OnFrozen != nil {
		a.cfg.OnFrozen()
	}
	if err := thaw(); err != nil {
		return p, rebound.Errorf(rebound.EINTERNAL, "thaw %s: %v", a.cfg.FreezeMount, err)
	}
	frozen := time.Since(frozenAt)
	if p, err = stream.Mark(kind); err != nil {
		return p, fmt.Errorf("agent: cut point: %w", err)
	}
	// The digests describe what the stream holds; keep them only once the
	// stream is durable, so a crash never skips a change.
	if err := stream.Flush(); err != nil {
		return p, fmt.Errorf("agent: flush stream: %w", err)
	}
	if err := a.saveDigests(streamID, cur); err != nil {
		a.logger.Warn("saving digests failed; a restart sends more than needed", "err", err)
	}
	a.mu.Lock()
	if a.streamID == streamID {
		a.prev = cur
	}
	a.stats.Cycles++
	a.stats.LastPoint = p
	a.stats.LastScan, a.stats.LastScanned, a.stats.LastChanged, a.stats.LastFrozen = scanTime, scanned, changed, frozen
	a.stats.ScannedTotal += scanned
	a.stats.ChangedTotal += changed
	a.mu.Unlock()
	a.logger.Debug("cycle", "point", p.ID, "changed", changed, "scan", scanTime, "frozen", frozen)
	if a.cfg.OnPoint != nil {
		a.cfg.OnPoint(p)
	}
	return p, nil
}

// waitStreaming waits until no resync window is open. With limit > 0 it
// gives up after limit; an overflow is an error at once.
func waitStreaming(ctx context.Context, stream *capture.Stream, limit time.Duration) error {
	if limit > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, limit)
		defer cancel()
	}
	delay := time.Millisecond
	for {
		switch stream.Stats().State {
		case capture.StateStreaming:
			return nil
		case capture.StateOverflow:
			return rebound.Errorf(rebound.EUNAVAILABLE, "agent: the spool is full (the recovery site is unreachable or slow); cycles resume once it drains")
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(delay):
		}
		delay = min(delay*2, 20*time.Millisecond)
	}
}

// scan hashes every disk, reading past the page cache (see directDisk).
func (a *Agent) scan(ctx context.Context) ([][][]byte, int64, error) {
	out := make([][][]byte, len(a.disks))
	var total int64
	for i, d := range a.disks {
		sums, err := digest.ReaderAt(ctx, a.direct[i], d.Size, a.cfg.BlockSize, a.cfg.Workers)
		if err != nil {
			return nil, 0, err
		}
		out[i] = sums
		total += d.Size
	}
	return out, total, nil
}

// ScanFile returns the digests of the first size bytes of the device or
// file at path in blockSize blocks, read as a cycle reads them.
func ScanFile(ctx context.Context, path string, size, blockSize int64, workers int) ([][]byte, error) {
	d, err := openDirect(path, size)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	return digest.ReaderAt(ctx, d, size, blockSize, workers)
}

// DropCache asks the kernel to drop the clean cached pages of f
// (POSIX_FADV_DONTNEED), so later reads come from the device. Pages a
// mounted filesystem pins are kept: a device in use is read with O_DIRECT
// instead (see directDisk). Errors are ignored.
func DropCache(f *os.File) {
	const fadvDontNeed = 4
	_, _, _ = syscall.Syscall6(syscall.SYS_FADVISE64, f.Fd(), 0, 0, fadvDontNeed, 0, 0)
}

// changedRegions returns the regions whose digests differ from old; a nil
// old stands for a zero disk (the empty target of a fresh stream).
func changedRegions(old, cur [][]byte, blockSize, size int64) []rebound.Region {
	if old != nil {
		return digest.Diff(old, cur, blockSize, size)
	}
	zero := zeroDigests(size, blockSize)
	return digest.Diff(zero, cur, blockSize, size)
}

// zeroDigests returns the digests of a zero disk; the blocks share one
// slice.
func zeroDigests(size, blockSize int64) [][]byte {
	n := (size + blockSize - 1) / blockSize
	full, _ := digest.ReaderAt(context.Background(), zeroReader{}, blockSize, blockSize, 1)
	out := make([][]byte, n)
	for i := range out {
		out[i] = full[0]
	}
	if rem := size % blockSize; rem != 0 {
		last, _ := digest.ReaderAt(context.Background(), zeroReader{}, rem, blockSize, 1)
		out[n-1] = last[0]
	}
	return out
}

type zeroReader struct{}

func (zeroReader) ReadAt(p []byte, off int64) (int, error) {
	clear(p)
	return len(p), nil
}

// fsfreeze runs fsfreeze -f or -u on mount.
func fsfreeze(ctx context.Context, flag, mount string) error {
	out, err := exec.CommandContext(ctx, "fsfreeze", flag, mount).CombinedOutput()
	if err != nil {
		msg := strings.TrimSpace(string(out))
		if flag == "-u" && strings.Contains(msg, "Invalid argument") {
			return nil // not frozen
		}
		if ctx.Err() != nil {
			return errors.Join(ctx.Err(), fmt.Errorf("%s", msg))
		}
		return fmt.Errorf("fsfreeze %s %s: %v: %s", flag, mount, err, msg)
	}
	return nil
}
