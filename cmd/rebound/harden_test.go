package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

// testServer runs a ServerMain alone on ephemeral ports.
func testServer(t *testing.T, cfg ServerConfig) *ServerMain {
	t.Helper()
	cfg.DataDir, cfg.APIAddr, cfg.GRPCAddr = t.TempDir(), "127.0.0.1:0", "127.0.0.1:0"
	m := &ServerMain{Config: cfg, Logger: slog.New(slog.DiscardHandler)}
	if err := m.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// closedByServer reads conn until the server closes it. The deadline is
// far beyond the server's timeouts: reaching it means the server kept the
// connection open.
func closedByServer(t *testing.T, what string, conn net.Conn) {
	t.Helper()
	conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	_, err := io.Copy(io.Discard, conn)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("%s: the server kept the connection open", what)
	}
}

// TestAPITimeouts: connections that never authenticate are closed by the
// server: one that never starts TLS, one that stops in the middle of its
// headers, one that trickles its headers a byte at a time (slowloris),
// and a keep-alive connection left idle after a 401.
func TestAPITimeouts(t *testing.T) {
	m := testServer(t, ServerConfig{APITimeouts: APITimeouts{ReadHeader: 300 * time.Millisecond, Read: time.Second, Idle: 300 * time.Millisecond}})
	addr := strings.TrimPrefix(m.APIURL, "https://")
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(m.CA.CertPEM())
	dialTLS := func() *tls.Conn {
		c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pool})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}

	t.Run("no TLS", func(t *testing.T) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		closedByServer(t, "a connection that never says hello", c)
	})

	t.Run("partial headers", func(t *testing.T) {
		c := dialTLS()
		if _, err := io.WriteString(c, "GET /api/v1/sites HTTP/1.1\r\nHost: x\r\n"); err != nil {
			t.Fatal(err)
		}
		closedByServer(t, "a connection whose headers never end", c)
	})

	t.Run("slowloris", func(t *testing.T) {
		c := dialTLS()
		stop := make(chan struct{})
		done := make(chan struct{})
		go func() {
			// One header byte at a time, for ever: each byte would reset
			// a per-read timeout, not ReadHeaderTimeout.
			defer close(done)
			req := "GET /api/v1/sites HTTP/1.1\r\nHost: x\r\n"
			for i := 0; ; i++ {
				b := req[i%len(req)]
				if i >= len(req) {
					b = 'x' // an endless header line
				}
				if _, err := c.Write([]byte{b}); err != nil {
					return
				}
				select {
				case <-stop:
					return
				case <-time.After(20 * time.Millisecond):
				}
			}
		}()
		closedByServer(t, "a connection trickling its headers", c)
		close(stop)
		<-done
	})

	t.Run("idle keep-alive", func(t *testing.T) {
		c := dialTLS()
		if _, err := io.WriteString(c, "GET /api/v1/sites HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 401 || resp.Close {
			t.Fatalf("unauthenticated request: %s, close %v; want 401 on a kept-alive connection", resp.Status, resp.Close)
		}
		closedByServer(t, "an idle unauthenticated keep-alive connection", c)
	})
}

// TestMetricsAuth: /metrics on the API needs a token; --metrics-addr
// serves it over plain HTTP without one, and only it. A server configured
// without timeouts runs the API with the default ones.
func TestMetricsAuth(t *testing.T) {
	m := testServer(t, ServerConfig{MetricsAddr: "127.0.0.1:0"})
	ctx := context.Background()
	if _, err := m.DB.EnsureUser(ctx, "prom", rebound.RoleViewer); err != nil {
		t.Fatal(err)
	}
	res, err := m.DB.CreateToken(ctx, "prom", "scrape")
	if err != nil {
		t.Fatal(err)
	}
	tok := res.Secret
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(m.CA.CertPEM())
	cl := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	get := func(url, token string) (int, string) {
		t.Helper()
		req, _ := http.NewRequest("GET", url, nil)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := cl.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if st, body := get(m.APIURL+"/metrics", ""); st != 401 || !strings.Contains(body, "missing bearer token") {
		t.Fatalf("API /metrics without a token: %d %s", st, body)
	}
	if st, body := get(m.APIURL+"/metrics", "rbd_wrong"); st != 401 {
		t.Fatalf("API /metrics with a bad token: %d %s", st, body)
	}
	if st, body := get(m.APIURL+"/metrics", tok); st != 200 || !strings.Contains(body, "go_goroutines") {
		t.Fatalf("API /metrics with a token: %d %.200s", st, body)
	}
	if !strings.HasPrefix(m.MetricsURL, "http://127.0.0.1:") {
		t.Fatalf("MetricsURL %q", m.MetricsURL)
	}
	if st, body := get(m.MetricsURL, ""); st != 200 || !strings.Contains(body, "go_goroutines") {
		t.Fatalf("--metrics-addr without a token: %d %.200s", st, body)
	}
	// The plain listener serves metrics only, never the API.
	if st, _ := get(strings.TrimSuffix(m.MetricsURL, "/metrics")+"/api/v1/sites", tok); st != 404 {
		t.Fatalf("API route on the metrics listener: %d", st)
	}

	// Zero timeouts in the config take the defaults.
	if h := m.http; h.ReadHeaderTimeout != DefaultAPITimeouts.ReadHeader || h.ReadTimeout != DefaultAPITimeouts.Read || h.IdleTimeout != DefaultAPITimeouts.Idle {
		t.Fatalf("API timeouts %v %v %v, want the defaults", h.ReadHeaderTimeout, h.ReadTimeout, h.IdleTimeout)
	}

	// Without --metrics-addr there is no plain listener.
	if m2 := testServer(t, ServerConfig{}); m2.MetricsURL != "" {
		t.Fatalf("MetricsURL %q without MetricsAddr", m2.MetricsURL)
	}
}
