// Package lograte keeps a flood of bad connections from flooding the log:
// a port scanner or a misconfigured client must not turn every refused
// handshake into a line.
package lograte

import (
	"log/slog"
	"strings"
	"sync"
	"time"
)

// Limiter lets Burst lines through per window of Every; the rest are
// counted, and the next line let through says how many were dropped.
// The zero value lets 5 lines a minute through. Safe for concurrent use.
type Limiter struct {
	Every time.Duration
	Burst int
	// Now is the clock; nil is time.Now.
	Now func() time.Time

	mu      sync.Mutex
	start   time.Time
	n       int
	dropped int
}

// Allow reports whether a line may be logged now and, if so, how many
// lines were dropped before it.
func (l *Limiter) Allow() (ok bool, dropped int) {
	every, burst, now := l.Every, l.Burst, time.Now
	if every <= 0 {
		every = time.Minute
	}
	if burst <= 0 {
		burst = 5
	}
	if l.Now != nil {
		now = l.Now
	}
	t := now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if t.Sub(l.start) >= every {
		l.start, l.n = t, 0
	}
	if l.n >= burst {
		l.dropped++
		return false, 0
	}
	l.n++
	dropped, l.dropped = l.dropped, 0
	return true, dropped
}

// Warn logs msg at warning level through l, adding a "suppressed" count
// when lines were dropped before it.
func (l *Limiter) Warn(log *slog.Logger, msg string, args ...any) {
	ok, dropped := l.Allow()
	if !ok {
		return
	}
	if dropped > 0 {
		args = append(args, "suppressed", dropped)
	}
	log.Warn(msg, args...)
}

// Writer adapts a Limiter and a logger to an io.Writer, for a standard
// library logger such as http.Server.ErrorLog.
type Writer struct {
	Limiter *Limiter
	Logger  *slog.Logger
	Msg     string
}

func (w Writer) Write(p []byte) (int, error) {
	w.Limiter.Warn(w.Logger, w.Msg, "err", strings.TrimSpace(string(p)))
	return len(p), nil
}
