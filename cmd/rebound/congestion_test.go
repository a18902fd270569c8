package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/nbd"
)

// TestCongestionPolicy writes 4x the spool limit sequentially through a
// protected machine's export. Under a policy with congestion throttle,
// over a replication link slower than the writer (slowLink, 8 MiB/s),
// writes are throttled (throttledWrites > 0) and the stream never
// overflows (no "spool full" in the log); after `policy set --congestion track` reaches the site, the
// same write with the recovery site down overflows, and the dirty regions
// resync when it returns. Each time a test failover of a new point holds
// exactly the bytes written.
func TestCongestionPolicy(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	const spool = 16 << 20
	const size = 4 * spool
	var log syncBuffer
	up, svc := fixedUpLog(t, func(c *UpConfig) { c.SpoolLimit = spool }, &log)
	pol := rebound.DefaultPolicy()
	pol.Name, pol.Congestion = "steady", rebound.CongestionThrottle
	if _, err := svc.PutPolicy(ctx, pol); err != nil {
		t.Fatal(err)
	}
	m, err := svc.CreateMachine(ctx, rebound.CreateMachineRequest{Name: "vm1", Site: "primary", Disks: []int64{size}})
	if err != nil {
		t.Fatal(err)
	}
	// The recovery site advertises a slow link to its replication port.
	rec := up.Sites["recovery"]
	slow := slowLink(t, rec.ReplAddr, 8<<20)
	rec.Site.SetAddrs(rec.NBDAddr, slow)
	waitUntil(t, 15*time.Second, "the server to learn the slow link", func() bool {
		sites, err := svc.ListSites(ctx)
		if err != nil {
			return false
		}
		for _, s := range sites {
			if s.Name == "recovery" && s.ReplAddr == slow {
				return true
			}
		}
		return false
	})
	waitJob(t, svc)(svc.Protect(ctx, rebound.ProtectRequest{Machine: "vm1", To: "recovery", Policy: "steady"}))
	uri := m.Disks[0].NBD
	model := make([]byte, size)
	rng := rand.New(rand.NewPCG(41, 42))
	// writeAll overwrites the whole disk in 1 MiB writes, 4 in flight.
	writeAll := func() {
		t.Helper()
		cl, err := nbd.Dial(ctx, uri)
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Close()
		for i := range model {
			model[i] = byte(rng.Uint32())
		}
		errs := make(chan error, 4)
		for w := range 4 {
			go func() {
				for off := int64(w) << 20; off < size; off += 4 << 20 {
					if _, err := cl.WriteAt(model[off:off+1<<20], off); err != nil {
						errs <- err
						return
					}
				}
				errs <- nil
			}()
		}
		for range 4 {
			if err := <-errs; err != nil {
				t.Fatalf("write: %v", err)
			}
		}
	}
	// checkPoint waits for the stream to drain, cuts a point and compares
	// a test failover of it with the model.
	checkPoint := func(what string) {
		t.Helper()
		waitMachine(t, svc, "vm1", 60*time.Second, "streaming, drained", func(m *rebound.Machine) bool {
			p := m.Protection
			return p != nil && p.ReplState == "streaming" && p.BacklogBytes == 0 && p.DirtyBytes == 0
		})
		p, err := svc.CreatePoint(ctx, "vm1", false)
		if err != nil {
			t.Fatalf("%s: point: %v", what, err)
		}
		sum := sha256.Sum256(model)
		got, gotSum := testFailoverSum(t, svc, "vm1", p.ID)
		if got.ID != p.ID || gotSum != hex.EncodeToString(sum[:]) {
			t.Fatalf("%s: test failover of %s: point %s, bytes differ from what was written", what, p.ID, got.ID)
		}
	}

	writeAll()
	if strings.Contains(log.String(), "spool full") {
		t.Fatalf("throttle: the stream overflowed:\n%s", log.String())
	}
	got, err := svc.GetMachine(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	if got.Protection == nil || got.Protection.ThrottledWrites == 0 {
		t.Fatalf("throttle: no write was throttled behind a link slower than the writer: %+v", got.Protection)
	}
	checkPoint("throttle")

	pol.Congestion = rebound.CongestionTrack
	if _, err := svc.PutPolicy(ctx, pol); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 15*time.Second, "the policy change at the source", func() bool {
		return strings.Contains(log.String(), "congestion=track")
	})
	rcfg := stopSite(t, up, "recovery")
	writeAll()
	waitMachine(t, svc, "vm1", 15*time.Second, "overflow", func(m *rebound.Machine) bool {
		p := m.Protection
		return p != nil && p.ReplState == "overflow" && p.DirtyBytes > 0
	})
	if !strings.Contains(log.String(), "spool full") {
		t.Fatal("track: no overflow logged")
	}
	startSite(t, up, rcfg)
	checkPoint("track")
}
