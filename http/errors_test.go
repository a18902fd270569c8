package http

import (
	"context"
	"encoding/pem"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/rebound-dr/rebound"
)

// TestClientWrongAddress: each way of pointing the client at something
// that is not the API says so and what to check, with an exit-worthy code.
func TestClientWrongAddress(t *testing.T) {
	ctx := context.Background()
	tlsSrv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/grpc")
		w.WriteHeader(http.StatusUnsupportedMediaType) // what a gRPC port answers
	}))
	defer tlsSrv.Close()
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: tlsSrv.Certificate().Raw})
	plain := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		io.WriteString(w, "<html>hello</html>")
	}))
	defer plain.Close()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	down := l.Addr().String()
	l.Close()
	host := strings.TrimPrefix(tlsSrv.URL, "https://")

	for _, c := range []struct {
		name, url string
		code      string
		want      []string
	}{
		{"grpc port", tlsSrv.URL, rebound.EUNAVAILABLE, []string{tlsSrv.URL + " is not a Rebound API (HTTP 415 Unsupported Media Type): check --server", "--api-addr of `rebound server`"}},
		{"http to https", "http://" + host, rebound.EINVALID, []string{"http://" + host + " speaks HTTPS, not HTTP: use --server https://" + host}},
		{"https to plain http", "https://" + strings.TrimPrefix(plain.URL, "http://"), rebound.EUNAVAILABLE, []string{"is not a Rebound API (it answered in plain HTTP"}},
		{"plain web server", plain.URL, rebound.EUNAVAILABLE, []string{plain.URL + " is not a Rebound API (HTTP 200 OK)"}},
		{"down", "https://" + down, rebound.EUNAVAILABLE, []string{"connection refused. Is it running? Start one with `rebound up`", "check --server (or REBOUND_SERVER)"}},
	} {
		cl, err := NewClient(c.url, "tok", caPEM)
		if err != nil {
			t.Fatal(err)
		}
		_, err = cl.ListMachines(ctx)
		if rebound.ErrorCode(err) != c.code {
			t.Errorf("%s: code %q: %v", c.name, rebound.ErrorCode(err), err)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: %q lacks %q", c.name, err, w)
			}
		}
	}
	// The certificate of another CA.
	cl, _ := NewClient(tlsSrv.URL, "tok", nil)
	if _, err := cl.ListMachines(ctx); rebound.ErrorCode(err) != rebound.EUNAVAILABLE || !strings.Contains(err.Error(), "not signed by the configured CA (--ca, REBOUND_CA or the config file)") {
		t.Fatalf("unknown CA: %v", err)
	}
}
