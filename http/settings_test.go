package http

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

// TestSetMachine: PATCH /api/v1/machines/{name} carries only the fields
// given (nil stays nil, "" is a clear), and the planned verbs carry their
// shutdown options.
func TestSetMachine(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	c, f := e.client, e.fake

	f.machine = testMachine()
	f.machine.Settings = rebound.MachineSettings{FreezeHook: "/f", Shutdown: rebound.ShutdownForce, ShutdownTimeout: rebound.Duration(30 * time.Second)}
	freeze, empty, force := "/usr/local/bin/freeze", "", rebound.ShutdownForce
	d := rebound.Duration(30 * time.Second)
	for _, req := range []rebound.SetMachineRequest{
		{Name: "web", FreezeHook: &freeze},
		{Name: "web", ThawHook: &empty, Shutdown: &force, ShutdownTimeout: &d},
	} {
		m, err := c.SetMachine(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		same(t, m, f.machine)
		check(t, f, "SetMachine", req)
	}

	// Unknown fields are refused, as everywhere.
	r, err := http.NewRequest("PATCH", e.srv.URL+"/api/v1/machines/web", bytes.NewReader([]byte(`{"freeze":"/x"}`)))
	if err != nil {
		t.Fatal(err)
	}
	r.Header.Set("Authorization", "Bearer "+testToken)
	resp, err := e.srv.Client().Do(r)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 400 || !strings.Contains(string(b), "freeze") {
		t.Fatalf("unknown field: %d %s", resp.StatusCode, b)
	}

	f.job = testJob()
	sh := rebound.ShutdownOptions{Mode: rebound.ShutdownForce, Timeout: rebound.Duration(5 * time.Second)}
	fr := rebound.FailoverRequest{Machine: "web", Planned: true, Shutdown: sh}
	if _, err := c.Failover(ctx, fr); err != nil {
		t.Fatal(err)
	}
	check(t, f, "Failover", fr)
	if _, err := c.Failback(ctx, fr); err != nil {
		t.Fatal(err)
	}
	check(t, f, "Failback", fr)
}
