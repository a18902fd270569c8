package http

import (
	"context"
	"encoding/pem"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/rebound-dr/rebound"
)

// countingServer answers every request with status and body, and counts
// them.
func countingServer(t *testing.T, status int, body string) (*httptest.Server, *atomic.Int32) {
	var n atomic.Int32
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_, _ = w.Write([]byte(body))
	}))
	t.Cleanup(srv.Close)
	return srv, &n
}

// deadURL is an https URL nothing listens on.
func deadURL(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := "https://" + ln.Addr().String()
	ln.Close()
	return u
}

// newMultiClient is NewClient with urls, trusting the httptest certificate.
func newMultiClient(t *testing.T, srv *httptest.Server, urls ...string) *Client {
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	c, err := NewClient(strings.Join(urls, ","), "t", caPEM)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestClientSeveralServers: the client moves past a server that refuses
// the connection, sticks to the one that answered, and never moves on
// after an HTTP answer (a 409 is an answer).
func TestClientSeveralServers(t *testing.T) {
	ctx := context.Background()
	good, goodN := countingServer(t, http.StatusOK, `[{"name":"vm1"}]`)
	dead := deadURL(t)

	c := newMultiClient(t, good, dead, good.URL)
	if c.BaseURL != dead || len(c.Fallback) != 1 || c.Fallback[0] != good.URL {
		t.Fatalf("NewClient: base %q fallback %v", c.BaseURL, c.Fallback)
	}
	ms, err := c.ListMachines(ctx)
	if err != nil || len(ms) != 1 || ms[0].Name != "vm1" {
		t.Fatalf("list through the second server: %v %v", ms, err)
	}
	// A POST that was never written goes to the next server as well.
	c2 := newMultiClient(t, good, dead, good.URL)
	// (The answer is a list, not a job: the decode error does not matter,
	// the second server getting the request does.)
	_, err = c2.Protect(ctx, rebound.ProtectRequest{Machine: "vm1"})
	if goodN.Load() != 2 {
		t.Fatalf("POST after a refused connection: %v (second server saw %d requests, want 2)", err, goodN.Load())
	}

	// Both dead: one error naming both.
	c3 := newMultiClient(t, good, dead, deadURL(t))
	_, err = c3.ListMachines(ctx)
	if rebound.ErrorCode(err) != rebound.EUNAVAILABLE || !strings.Contains(err.Error(), "no Rebound server answered") || !strings.Contains(err.Error(), dead) {
		t.Fatalf("both servers down: %v", err)
	}

	// An HTTP answer is final, even an error.
	conflict, conflictN := countingServer(t, http.StatusConflict, `{"error":{"code":"conflict","message":"machine vm1 is busy"}}`)
	other, otherN := countingServer(t, http.StatusOK, `[]`)
	c4 := newMultiClient(t, conflict, conflict.URL, other.URL)
	_, err = c4.ListMachines(ctx)
	if rebound.ErrorCode(err) != rebound.ECONFLICT || conflictN.Load() != 1 || otherN.Load() != 0 {
		t.Fatalf("409 from the first server: %v (first saw %d, second %d; want 1, 0)", err, conflictN.Load(), otherN.Load())
	}

	// A single URL behaves as before: its own message.
	c5 := newMultiClient(t, good, dead)
	if _, err := c5.ListMachines(ctx); rebound.ErrorCode(err) != rebound.EUNAVAILABLE || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("one dead server: %v", err)
	}
	if _, err := NewClient("https://a:1,ftp://b", "", nil); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("bad second URL: %v", err)
	}
}
