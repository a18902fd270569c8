package lograte

import (
	"bytes"
	"log"
	"log/slog"
	"strings"
	"testing"
	"time"
)

func TestLimiter(t *testing.T) {
	now := time.Unix(1000, 0)
	l := &Limiter{Every: time.Minute, Burst: 3, Now: func() time.Time { return now }}
	var buf bytes.Buffer
	logger := slog.New(slog.NewTextHandler(&buf, nil))
	std := log.New(Writer{Limiter: l, Logger: logger, Msg: "tls handshake failed"}, "", 0)
	for i := range 300 {
		std.Printf("http: TLS handshake error from 127.0.0.1:%d: EOF", 40000+i)
	}
	if n := strings.Count(buf.String(), "\n"); n != 3 {
		t.Fatalf("300 failures in one window logged %d lines, want 3:\n%s", n, buf.String())
	}
	now = now.Add(time.Minute)
	buf.Reset()
	std.Printf("http: TLS handshake error from 127.0.0.1:1: EOF")
	if !strings.Contains(buf.String(), "suppressed=297") || !strings.Contains(buf.String(), "127.0.0.1:1") {
		t.Fatalf("next window's line does not count the dropped ones: %s", buf.String())
	}
}
