package http

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/rebound-dr/rebound"
)

// TestHealthzReportsStore: /healthz answers 200 "ok" while Healthy is nil,
// and the error's status with its code and reason otherwise (507 for a full
// data disk), which the client's Health returns as that error.
func TestHealthzReportsStore(t *testing.T) {
	var bad error
	srv := httptest.NewServer((&Server{Service: &fakeService{}, Healthy: func(context.Context) error { return bad }}).Handler())
	defer srv.Close()
	c, _ := NewClient(srv.URL, "", nil)
	get := func() (int, healthBody) {
		resp, err := http.Get(srv.URL + "/healthz")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var b healthBody
		if err := json.NewDecoder(resp.Body).Decode(&b); err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode, b
	}
	if st, b := get(); st != 200 || b.Status != "ok" || b.Reason != "" || c.Health(context.Background()) != nil {
		t.Fatalf("healthy: %d %+v", st, b)
	}
	const msg = "server data disk full at /var/lib/rebound: free space in /var/lib/rebound"
	bad = rebound.Errorf(rebound.ENOSPACE, msg)
	if st, b := get(); st != http.StatusInsufficientStorage || b.Status != rebound.ENOSPACE || b.Reason != msg {
		t.Fatalf("disk full: %d %+v", st, b)
	}
	if err := c.Health(context.Background()); rebound.ErrorCode(err) != rebound.ENOSPACE || rebound.ErrorMessage(err) != msg {
		t.Fatalf("client health with the disk full: %v", err)
	}
}
