package qemu

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"path/filepath"
	"time"

	"github.com/rebound-dr/rebound"
)

// go-qemu has no guest agent client, so this is the small protocol
// qemu-guest-agent speaks on its virtio-serial channel: one JSON command per
// line, one JSON response per line. A session starts with a 0xFF byte (the
// agent resets its parser on it) and guest-sync-delimited, whose answer is
// preceded by 0xFF: everything before it is a stale answer to an earlier
// session and is skipped.

// DefaultAgentTimeout bounds an agent call whose context has no deadline.
const DefaultAgentTimeout = 10 * time.Second

// ThawTimeout bounds the thaw FreezeThaw always runs, even after its
// context is done.
var ThawTimeout = 10 * time.Second

type agentResponse struct {
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
}

func (v *VM) agentUnavailable(err error) error {
	return rebound.Errorf(rebound.EUNAVAILABLE, "vm %s: guest agent not responding: %v", v.cfg.Name, err)
}

// agentCall runs one agent command in its own session and decodes its
// return value into out. sent reports whether the command reached the
// agent's channel: a freeze that was sent must be thawed even if its answer
// never came. noReply commands (guest-shutdown) answer only on error.
func (v *VM) agentCall(ctx context.Context, cmd string, args, out any, noReply bool) (sent bool, err error) {
	if v.cfg.NoAgent {
		return false, rebound.Errorf(rebound.EUNAVAILABLE, "vm %s has no guest agent channel", v.cfg.Name)
	}
	if !v.Running() {
		return false, rebound.Errorf(rebound.ECONFLICT, "vm %s is not running", v.cfg.Name)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultAgentTimeout)
		defer cancel()
	}
	select {
	case v.agentSem <- struct{}{}:
		defer func() { <-v.agentSem }()
	case <-ctx.Done():
		return false, v.agentUnavailable(fmt.Errorf("another agent call is running: %w", ctx.Err()))
	}

	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", filepath.Join(v.cfg.Dir, AgentSocket))
	if err != nil {
		return false, v.agentUnavailable(err)
	}
	defer conn.Close()
	dl, _ := ctx.Deadline()
	conn.SetDeadline(dl)
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	r := bufio.NewReader(conn)

	if err := v.agentSync(ctx, conn, r, dl); err != nil {
		return false, err
	}
	conn.SetDeadline(dl)

	req := map[string]any{"execute": cmd}
	if args != nil { // qemu-ga refuses "arguments": null
		req["arguments"] = args
	}
	if err := writeJSON(conn, "", req); err != nil {
		return false, v.agentUnavailable(err)
	}
	if noReply {
		// Success has no answer; an error comes at once.
		conn.SetDeadline(time.Now().Add(500 * time.Millisecond))
	}
	line, err := readAnswer(r)
	if err != nil {
		var ne net.Error
		if noReply && errors.As(err, &ne) && ne.Timeout() && ctx.Err() == nil {
			return true, nil
		}
		if noReply && errors.Is(err, io.EOF) { // the guest closed the channel powering off
			return true, nil
		}
		return true, v.agentUnavailable(fmt.Errorf("no answer to %s: %w", cmd, err))
	}
	var resp agentResponse
	if err := json.Unmarshal(line, &resp); err != nil {
		return true, fmt.Errorf("vm %s: guest agent: bad answer to %s: %w", v.cfg.Name, cmd, err)
	}
	if resp.Error != nil {
		return true, rebound.Errorf(rebound.ECONFLICT, "vm %s: guest agent: %s: %s", v.cfg.Name, cmd, resp.Error.Desc)
	}
	if out != nil {
		if err := json.Unmarshal(resp.Return, out); err != nil {
			return true, fmt.Errorf("vm %s: guest agent: bad answer to %s: %w", v.cfg.Name, cmd, err)
		}
	}
	return true, nil
}

// syncRetry is how long one guest-sync waits before it is sent again: the
// agent may open its port after the first one was sent.
const syncRetry = time.Second

// agentSync sends guest-sync-delimited until the agent answers one of them
// or the deadline passes. Answers to other sessions' commands are skipped.
// Only the first sync is preceded by 0xFF: qemu-ga answers a 0xFF with a
// parse error, and a resent 0xFF would leave that error behind the
// answered sync, where the command's answer is read.
func (v *VM) agentSync(ctx context.Context, conn net.Conn, r *bufio.Reader, dl time.Time) error {
	sent := map[int64]bool{}
	prefix := "\xff"
	for {
		id := rand.Int64N(1 << 52) // JSON numbers stay exact below 2^53
		sent[id] = true
		if err := writeJSON(conn, prefix, map[string]any{"execute": "guest-sync-delimited", "arguments": map[string]any{"id": id}}); err != nil {
			return v.agentUnavailable(err)
		}
		prefix = ""
		end := time.Now().Add(syncRetry)
		if end.After(dl) {
			end = dl
		}
		conn.SetReadDeadline(end)
		err := readSync(r, sent)
		if err == nil {
			return nil
		}
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() || ctx.Err() != nil || !time.Now().Before(dl) {
			return v.agentUnavailable(fmt.Errorf("no answer to guest-sync: %w", err))
		}
	}
}

// readSync reads up to the answer of one of the sent syncs: 0xFF, then a
// JSON line.
func readSync(r *bufio.Reader, sent map[int64]bool) error {
	for {
		if _, err := r.ReadBytes(0xff); err != nil {
			return err
		}
		line, err := r.ReadBytes('\n')
		if err != nil {
			return err
		}
		var resp struct {
			Return int64 `json:"return"`
		}
		if json.Unmarshal(line, &resp) == nil && sent[resp.Return] {
			return nil
		}
	}
}

// readAnswer reads a command's answer line. Lines holding 0xFF are the
// delimited answers of syncs resent after the answered one (or qemu-ga's
// "stray 0xFF" parse error, which quotes the raw byte): skipped.
func readAnswer(r *bufio.Reader) ([]byte, error) {
	for {
		line, err := r.ReadBytes('\n')
		if err != nil || bytes.IndexByte(line, 0xff) < 0 {
			return line, err
		}
	}
}

func writeJSON(conn net.Conn, prefix string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = conn.Write(append(append([]byte(prefix), b...), '\n'))
	return err
}

// Ping checks that the guest agent answers.
func (v *VM) Ping(ctx context.Context) error {
	_, err := v.agentCall(ctx, "guest-ping", nil, nil, false)
	return err
}

func (v *VM) agentShutdown(ctx context.Context) error {
	_, err := v.agentCall(ctx, "guest-shutdown", map[string]any{"mode": "powerdown"}, nil, true)
	return err
}

// Freeze freezes the guest's filesystems (guest-fsfreeze-freeze) and
// returns how many it froze. A guest without a running agent gets an
// EUNAVAILABLE error once ctx is done (DefaultAgentTimeout without a
// deadline). A frozen guest stalls its writers: thaw soon.
func (v *VM) Freeze(ctx context.Context) (int, error) {
	_, n, err := v.freeze(ctx)
	return n, err
}

func (v *VM) freeze(ctx context.Context) (sent bool, n int, err error) {
	sent, err = v.agentCall(ctx, "guest-fsfreeze-freeze", nil, &n, false)
	return sent, n, err
}

// Thaw thaws the guest's filesystems and returns how many it thawed.
func (v *VM) Thaw(ctx context.Context) (int, error) {
	var n int
	_, err := v.agentCall(ctx, "guest-fsfreeze-thaw", nil, &n, false)
	return n, err
}

// FreezeStatus returns "frozen" or "thawed".
func (v *VM) FreezeStatus(ctx context.Context) (string, error) {
	var s string
	_, err := v.agentCall(ctx, "guest-fsfreeze-status", nil, &s, false)
	return s, err
}

// FreezeThaw freezes the guest, runs cut and thaws, always: after cut
// fails, after ctx is done, and after a freeze whose answer was lost. The
// freeze and cut run within ctx; the thaw has its own ThawTimeout. When
// ctx ends before cut returns, the guest is thawed at once and an error is
// returned while cut still runs: its result is then not app-consistent.
func (v *VM) FreezeThaw(ctx context.Context, cut func() error) error {
	sent, _, err := v.freeze(ctx)
	if err != nil {
		if sent {
			if terr := v.thawHard(ctx); terr != nil {
				return errors.Join(err, terr)
			}
		}
		return err
	}
	done := make(chan error, 1)
	go func() { done <- cut() }()
	var cutErr error
	select {
	case cutErr = <-done:
	case <-ctx.Done():
		cutErr = fmt.Errorf("vm %s: cut did not finish while the guest was frozen: %w", v.cfg.Name, ctx.Err())
	}
	return errors.Join(cutErr, v.thawHard(ctx))
}

// thawHard thaws within ThawTimeout even when ctx is done, retrying: a
// guest left frozen stalls every writer in it.
func (v *VM) thawHard(ctx context.Context) error {
	tctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), ThawTimeout)
	defer cancel()
	var err error
	for {
		if _, err = v.Thaw(tctx); err == nil {
			return nil
		}
		v.logger.Error("qemu: thaw failed", "err", err)
		select {
		case <-tctx.Done():
			return fmt.Errorf("thaw: %w", err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}
