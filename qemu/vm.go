package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
	"github.com/rebound-dr/rebound"
)

// VM is a running (or exited) QEMU virtual machine. Its methods are safe
// for concurrent use. Dropping a VM without Close leaves QEMU running.
type VM struct {
	cfg    VMConfig
	pid    int
	accel  string // kvm or tcg; empty if unknown
	logger *slog.Logger

	done     chan struct{} // closed when the process is gone
	exitOnce sync.Once
	code     int // exit code; -1 when unknown (an attached VM)
	exitErr  error

	agentSem chan struct{} // one agent session at a time: the channel has one client
	stop     chan struct{} // stops an attached VM's watcher
	stopOnce sync.Once
	wg       sync.WaitGroup
}

func newVM(cfg VMConfig, pid int) *VM {
	return &VM{cfg: cfg, pid: pid, logger: slog.Default(), done: make(chan struct{}), code: -1,
		agentSem: make(chan struct{}, 1), stop: make(chan struct{})}
}

func (v *VM) exit(code int, err error) {
	v.exitOnce.Do(func() {
		v.code, v.exitErr = code, err
		close(v.done)
	})
}

// Attach finds the VM running in cfg.Dir, after a site restart or from
// another handle. It fails with ENOTFOUND when no QEMU of that directory
// runs. The exit code of an attached VM is unknown.
func Attach(cfg VMConfig) (*VM, error) {
	if cfg.Dir == "" {
		return nil, rebound.Errorf(rebound.EINVALID, "vm %s: runtime directory required", cfg.Name)
	}
	b, err := os.ReadFile(filepath.Join(cfg.Dir, PIDFile))
	if err != nil {
		return nil, rebound.Errorf(rebound.ENOTFOUND, "vm %s is not running: %v", cfg.Name, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return nil, rebound.Errorf(rebound.ENOTFOUND, "vm %s: bad pid file %q", cfg.Name, b)
	}
	v := newVM(cfg, pid)
	if !v.alive() {
		return nil, rebound.Errorf(rebound.ENOTFOUND, "vm %s is not running (pid %d gone)", cfg.Name, pid)
	}
	v.accel = cmdlineAccel(pid)
	v.wg.Add(1)
	go v.watch()
	return v, nil
}

// alive reports whether pid is a live (not zombie) QEMU of this VM's
// directory; the check on the command line guards against pid reuse.
func (v *VM) alive() bool {
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", v.pid))
	if err != nil || !bytes.Contains(cmdline, []byte(filepath.Join(v.cfg.Dir, QMPSocket))) {
		return false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", v.pid))
	if err != nil {
		return false
	}
	// The state follows the parenthesised command name.
	if i := bytes.LastIndexByte(stat, ')'); i >= 0 && i+2 < len(stat) && (stat[i+2] == 'Z' || stat[i+2] == 'X') {
		return false
	}
	return true
}

// cmdlineAccel reads the accelerator a running QEMU was started with.
func cmdlineAccel(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	args := strings.Split(string(b), "\x00")
	for i := 0; i+1 < len(args); i++ {
		if args[i] == "-accel" {
			return args[i+1]
		}
	}
	return ""
}

// watch polls an attached VM's process, which is not our child.
func (v *VM) watch() {
	defer v.wg.Done()
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-v.stop:
			return
		case <-v.done:
			return
		case <-t.C:
			if !v.alive() {
				v.exit(-1, nil)
				return
			}
		}
	}
}

// Close releases the handle and leaves QEMU running.
func (v *VM) Close() error {
	v.stopOnce.Do(func() { close(v.stop) })
	v.wg.Wait()
	return nil
}

// Config returns the VM's configuration.
func (v *VM) Config() VMConfig { return v.cfg }

// Accel returns the accelerator the VM runs on: "kvm" or "tcg".
func (v *VM) Accel() string { return v.accel }

// PID returns QEMU's process id.
func (v *VM) PID() int { return v.pid }

// Running reports whether QEMU still runs.
func (v *VM) Running() bool {
	select {
	case <-v.done:
		return false
	default:
	}
	// A closed attached handle no longer watches: look.
	select {
	case <-v.stop:
		return v.alive()
	default:
		return true
	}
}

// Wait waits for QEMU to exit and returns its exit code (-1 when unknown:
// an attached VM, or a signal).
func (v *VM) Wait(ctx context.Context) (int, error) {
	select {
	case <-v.done:
		return v.code, nil
	case <-ctx.Done():
		return -1, fmt.Errorf("vm %s still running: %w", v.cfg.Name, ctx.Err())
	}
}

// Console returns the serial console log of the current boot.
func (v *VM) Console() ([]byte, error) {
	b, err := os.ReadFile(filepath.Join(v.cfg.Dir, ConsoleLog))
	if errors.Is(err, os.ErrNotExist) {
		return nil, rebound.Errorf(rebound.ENOTFOUND, "vm %s has no console log", v.cfg.Name)
	}
	return b, err
}

// WaitConsole waits until the console log holds s, the VM exits or ctx is
// done.
func (v *VM) WaitConsole(ctx context.Context, s string) error {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		if b, _ := v.Console(); bytes.Contains(b, []byte(s)) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("vm %s: %q not on the console: %w", v.cfg.Name, s, ctx.Err())
		case <-v.done:
			if b, _ := v.Console(); bytes.Contains(b, []byte(s)) {
				return nil
			}
			return fmt.Errorf("vm %s exited before %q was on the console", v.cfg.Name, s)
		case <-t.C:
		}
	}
}

// DefaultShutdownTimeout bounds Shutdown when its context has no deadline.
const DefaultShutdownTimeout = time.Minute

// Shutdown shuts the guest down cleanly: through the guest agent if it
// answers, else (or if the guest has not gone halfway to the deadline) with
// an ACPI power button press. It waits for QEMU to exit until ctx is done
// (DefaultShutdownTimeout without a deadline), then kills it and returns an
// EUNAVAILABLE error saying so.
func (v *VM) Shutdown(ctx context.Context) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultShutdownTimeout)
		defer cancel()
	}
	how, err := v.PowerDown(ctx)
	if err == nil {
		return nil
	}
	if err := v.Kill(); err != nil {
		return err
	}
	return rebound.Errorf(rebound.EUNAVAILABLE, "vm %s: guest did not shut down in time (%s); killed", v.cfg.Name, how)
}

// PowerDown asks the guest to shut down, as Shutdown does, and waits for
// QEMU to exit until ctx is done (DefaultShutdownTimeout without a
// deadline). A guest still running then is left running: the error is
// EUNAVAILABLE and how says what was tried ("acpi", "guest agent, then
// acpi").
func (v *VM) PowerDown(ctx context.Context) (how string, err error) {
	if !v.Running() {
		return "", nil
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultShutdownTimeout)
		defer cancel()
	}
	how = "guest agent"
	actx, cancel := context.WithTimeout(ctx, agentShutdownWait(ctx))
	err = v.agentShutdown(actx)
	cancel()
	if err == nil {
		dl, _ := ctx.Deadline()
		wctx, cancel := context.WithTimeout(ctx, time.Until(dl)/2)
		_, err = v.waitGone(wctx)
		cancel()
		if err == nil {
			v.logger.Info("qemu: shut down", "via", how, "code", v.code)
			return how, nil
		}
		how = "guest agent, then acpi"
	} else {
		how = "acpi"
		v.logger.Info("qemu: agent shutdown failed, pressing the power button", "err", err)
	}
	if _, err := v.qmp(ctx, "system_powerdown", nil); err != nil && v.Running() {
		v.logger.Warn("qemu: system_powerdown", "err", err)
	}
	if _, err := v.waitGone(ctx); err == nil {
		v.logger.Info("qemu: shut down", "via", how, "code", v.code)
		return how, nil
	}
	return how, rebound.Errorf(rebound.EUNAVAILABLE, "vm %s: guest did not shut down in time (%s); still running", v.cfg.Name, how)
}

// agentShutdownWait bounds the agent attempt so ACPI still has time.
func agentShutdownWait(ctx context.Context) time.Duration {
	d := 3 * time.Second
	if dl, ok := ctx.Deadline(); ok {
		if left := time.Until(dl) / 3; left < d {
			d = left
		}
	}
	return d
}

// Kill stops the VM at once: QMP quit, then SIGKILL if QEMU lingers. The
// guest gets no chance to flush; QEMU's own block layer does.
func (v *VM) Kill() error {
	if !v.Running() {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	_, err := v.qmp(ctx, "quit", nil)
	cancel()
	if err == nil {
		// QEMU drains guest I/O before it exits; an unreachable NBD
		// export would hold it for the reconnect delay.
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err = v.waitGone(ctx)
		cancel()
		if err == nil {
			return nil
		}
	}
	if v.alive() {
		if err := syscall.Kill(v.pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("kill vm %s: %w", v.cfg.Name, err)
		}
	}
	ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := v.waitGone(ctx); err != nil {
		return fmt.Errorf("kill vm %s: %w", v.cfg.Name, err)
	}
	return nil
}

// waitGone is Wait that also works on a closed attached handle.
func (v *VM) waitGone(ctx context.Context) (int, error) {
	select {
	case <-v.stop:
		for v.alive() {
			select {
			case <-ctx.Done():
				return -1, ctx.Err()
			case <-time.After(50 * time.Millisecond):
			}
		}
		v.exit(-1, nil)
	default:
	}
	return v.Wait(ctx)
}

// Status returns the QMP run state ("running", "paused", "shutdown", ...).
func (v *VM) Status(ctx context.Context) (string, error) {
	b, err := v.qmp(ctx, "query-status", nil)
	if err != nil {
		return "", err
	}
	var r struct {
		Return struct {
			Status string `json:"status"`
		} `json:"return"`
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return "", err
	}
	return r.Return.Status, nil
}

// qmp runs one QMP command in its own session. The QMP socket takes one
// client at a time, so no session is kept open between calls. go-qemu's
// monitor has no deadlines: the session runs in a goroutine that ends when
// QEMU answers or exits, and the caller stops waiting when ctx is done.
func (v *VM) qmp(ctx context.Context, cmd string, args any) ([]byte, error) {
	type result struct {
		b   []byte
		err error
	}
	ch := make(chan result, 1)
	go func() {
		b, err := qmpRun(filepath.Join(v.cfg.Dir, QMPSocket), cmd, args)
		ch <- result{b, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, fmt.Errorf("vm %s: qmp %s: %w", v.cfg.Name, cmd, r.err)
		}
		return r.b, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("vm %s: qmp %s: %w", v.cfg.Name, cmd, ctx.Err())
	}
}

func qmpRun(sock, cmd string, args any) ([]byte, error) {
	mon, err := qmp.NewSocketMonitor("unix", sock, 2*time.Second)
	if err != nil {
		return nil, err
	}
	if err := mon.Connect(); err != nil {
		mon.Disconnect()
		return nil, err
	}
	defer mon.Disconnect()
	b, err := json.Marshal(qmp.Command{Execute: cmd, Args: args})
	if err != nil {
		return nil, err
	}
	return mon.Run(b)
}

// waitQMP waits until QEMU answers on QMP, or fails if it exits first.
func (v *VM) waitQMP(ctx context.Context) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
	}
	for {
		select {
		case <-v.done:
			return fmt.Errorf("qemu exited (code %d)", v.code)
		default:
		}
		qctx, cancel := context.WithTimeout(ctx, time.Second)
		_, err := v.Status(qctx)
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("qmp not answering: %w", err)
		case <-v.done:
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// qemuLog returns the tail of QEMU's own log, for errors.
func (v *VM) qemuLog() string {
	b, _ := os.ReadFile(filepath.Join(v.cfg.Dir, QEMULog))
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return strings.TrimSpace(string(b))
}
