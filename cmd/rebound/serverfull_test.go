package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	nethttp "net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	rhttp "github.com/rebound-dr/rebound/http"
	"github.com/rebound-dr/rebound/internal/loopfs"
)

// TestServerDataDiskFull: the server's data directory is a small ext4 on a
// loop device, filled up while a machine replicates.
//   - The API still serves live status that changes: the recovery site
//     stopped shows offline, the machine spooling with a lag; it comes back
//     online and streaming.
//   - API writes fail with 507 / exit 7, "server data disk full at DIR",
//     naming the next step; /healthz answers 507 with the reason; the
//     machine's health is critical with it; the log says it.
//   - The data path goes on: a point cut meanwhile holds the source's bytes.
//
// After the space is freed /healthz is ok, writes work, the events record
// the condition and what happened meanwhile (the site going offline), the
// log says the space returned and health is normal again.
func TestServerDataDiskFull(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	serverDir := filepath.Join(root, "server")
	logf, err := openUpLog(root) // rebound.log of up, beside the server's directory
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { logf.Close() })
	up, svc := fixedUpLog(t, func(c *UpConfig) {
		c.DataDir = root
		loopfs.Mount(t, serverDir, 64<<20, "ext4")
	}, logf)
	cl := svc.(*rhttp.Client)
	const size = 8 << 20
	o := newOracle(t, size, 41)
	src := createProtected(t, svc, "vm1", size, o)
	waitReplicatedAll(t, up, "vm1")
	waitMachine(t, svc, "vm1", 30*time.Second, "protected and normal", func(m *rebound.Machine) bool {
		return m.State == rebound.MachineProtected && m.Health == rebound.HealthNormal
	})

	// An empty WAL, so the store's next write needs new blocks.
	truncateWAL(t, filepath.Join(serverDir, "rebound.db"))
	free := loopfs.Fill(t, serverDir)
	fullAt := time.Now().UTC()

	// API writes: refused with the cause and the next step.
	var perr error
	for i := 0; ; i++ {
		_, perr = svc.PutPolicy(ctx, rebound.Policy{Name: fmt.Sprintf("full%d", i), RPOThreshold: rebound.Duration(time.Minute)})
		if perr != nil || i == 2000 {
			break
		}
	}
	want := "server data disk full at " + serverDir
	wantErr(t, "put policy with the server's disk full", perr, rebound.ENOSPACE, want, "free space in "+serverDir)
	r := runCLI(t, svc, "machine", "create", "vm2", "--site", "primary", "--disk", "1M")
	if r.code != ExitNoSpace || !strings.Contains(r.stderr, want) {
		t.Fatalf("machine create with the server's disk full: exit %d, want %d:\n%s", r.code, ExitNoSpace, r.stderr)
	}
	req, _ := nethttp.NewRequest("POST", up.Server.APIURL+"/api/v1/machines", strings.NewReader(`{"name":"vm3","site":"primary","disks":[1048576]}`))
	req.Header.Set("Authorization", "Bearer "+up.AdminToken)
	resp, err := cl.HTTPClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != nethttp.StatusInsufficientStorage || !bytes.Contains(b, []byte(`"code":"no_space"`)) {
		t.Fatalf("POST /api/v1/machines with the server's disk full: %s %s", resp.Status, b)
	}

	// /healthz and health say so.
	waitUntil(t, 20*time.Second, "/healthz answering 507", func() bool {
		code, _ := healthz(t, cl, up.Server.APIURL)
		return code == nethttp.StatusInsufficientStorage
	})
	_, hb := healthz(t, cl, up.Server.APIURL)
	if hb.Status != rebound.ENOSPACE || !strings.Contains(hb.Reason, want) {
		t.Fatalf("/healthz with the server's disk full: %+v", hb)
	}
	wantErr(t, "client health check", cl.Health(ctx), rebound.ENOSPACE, want)
	waitMachine(t, svc, "vm1", 20*time.Second, "health critical: server disk full", func(m *rebound.Machine) bool {
		return m.Health == rebound.HealthCritical && strings.Contains(m.HealthReason, want)
	})

	// Live status goes on changing: recovery stopped is offline, the
	// machine spools with a growing lag.
	rcfg := stopSite(t, up, "recovery")
	o.write(src, 20)
	waitUntil(t, 40*time.Second, "recovery shown offline", func() bool {
		return liveSiteStatus(t, svc, "recovery") == rebound.SiteOffline
	})
	waitMachine(t, svc, "vm1", 30*time.Second, "spooling with a lag", func(m *rebound.Machine) bool {
		p := m.Protection
		return p.ReplState == "spooling" && p.LagSeconds > 0 && p.BacklogBytes > 0 &&
			m.Health == rebound.HealthCritical && strings.Contains(m.HealthReason, want)
	})
	startSite(t, up, rcfg)
	waitMachine(t, svc, "vm1", 30*time.Second, "streaming again", func(m *rebound.Machine) bool {
		p := m.Protection
		return p.ReplState == "streaming" && p.BacklogBytes == 0 && p.ReportedAt.After(fullAt)
	})
	if liveSiteStatus(t, svc, "recovery") != rebound.SiteOnline {
		t.Fatal("recovery reports but is not shown online")
	}
	// The data path: a point cut now holds the source's bytes.
	o.write(src, 20)
	p := o.point(svc, "vm1", false)
	if _, err := svc.PutPolicy(ctx, rebound.Policy{Name: "stillfull"}); rebound.ErrorCode(err) != rebound.ENOSPACE {
		t.Fatalf("the disk is still full, yet put policy: %v", err)
	}

	free()
	waitUntil(t, 30*time.Second, "/healthz ok", func() bool {
		code, _ := healthz(t, cl, up.Server.APIURL)
		return code == nethttp.StatusOK
	})
	if _, err := svc.PutPolicy(ctx, rebound.Policy{Name: "after", RPOThreshold: rebound.Duration(time.Minute)}); err != nil {
		t.Fatalf("put policy after the space was freed: %v", err)
	}
	if r := runCLI(t, svc, "machine", "create", "vm2", "--site", "primary", "--disk", "1M"); r.code != 0 {
		t.Fatalf("machine create after the space was freed: exit %d\n%s", r.code, r.stderr)
	}
	waitMachine(t, svc, "vm1", 30*time.Second, "health normal again", func(m *rebound.Machine) bool {
		return m.Health == rebound.HealthNormal
	})
	evs, err := svc.ListEvents(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	event := func(what string, ok func(e rebound.Event) bool) {
		t.Helper()
		for _, e := range evs {
			if ok(e) {
				return
			}
		}
		b, _ := json.MarshalIndent(evs, "", " ")
		t.Fatalf("no event %s in:\n%s", what, b)
	}
	event("server.disk_full naming the directory, from when it filled", func(e rebound.Event) bool {
		return e.Kind == "server.disk_full" && strings.Contains(e.Message, want) && !e.Time.Before(fullAt)
	})
	event("server.disk_ok", func(e rebound.Event) bool {
		return e.Kind == "server.disk_ok" && strings.Contains(e.Message, serverDir)
	})
	event("site.offline of recovery while the disk was full", func(e rebound.Event) bool {
		return e.Kind == "site.offline" && e.Site == "recovery" && !e.Time.Before(fullAt)
	})
	event("health.critical with the reason", func(e rebound.Event) bool {
		return e.Kind == "health.critical" && e.Machine == "vm1" && strings.Contains(e.Message, want)
	})
	// The store's copy caught up with the live status.
	waitUntil(t, 20*time.Second, "recovery stored online", func() bool {
		st, err := up.Server.DB.GetSite(ctx, "recovery")
		return err == nil && st.Status == rebound.SiteOnline
	})
	log, err := os.ReadFile(logf.Name())
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range []string{"server data disk full", "server data disk has space again"} {
		if !bytes.Contains(log, []byte(line)) || !bytes.Contains(log, []byte("dir="+serverDir)) {
			t.Fatalf("rebound.log does not say %q with the directory", line)
		}
	}
	got, sum := testFailoverSum(t, svc, "vm1", p.ID)
	if got.ID != p.ID || sum != o.points[p.ID] {
		t.Fatalf("point %s cut while the server's disk was full: test failover %s hash %s, want %s", p.ID, got.ID, sum, o.points[p.ID])
	}
	if diskSum(t, src) != o.model.Sum() {
		t.Fatal("source disk differs from the model")
	}
}

// truncateWAL checkpoints the store's write-ahead log into the database
// and truncates it, through a connection of its own.
func truncateWAL(t *testing.T, path string) {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+path+"?_pragma=busy_timeout(10000)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	waitUntil(t, 20*time.Second, "the WAL truncated", func() bool {
		var busy, logPages, done int
		if err := db.QueryRow(`PRAGMA wal_checkpoint(TRUNCATE)`).Scan(&busy, &logPages, &done); err != nil {
			t.Fatal(err)
		}
		return busy == 0
	})
}

// healthzBody is what /healthz answers.
type healthzBody struct {
	Status, Reason string
}

func healthz(t *testing.T, cl *rhttp.Client, url string) (int, healthzBody) {
	t.Helper()
	resp, err := cl.HTTPClient.Get(url + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var b healthzBody
	if err := json.NewDecoder(resp.Body).Decode(&b); err != nil {
		t.Fatalf("/healthz %s: %v", resp.Status, err)
	}
	return resp.StatusCode, b
}

func liveSiteStatus(t *testing.T, svc rebound.Service, name string) string {
	t.Helper()
	sites, err := svc.ListSites(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range sites {
		if s.Name == name {
			return s.Status
		}
	}
	return ""
}
