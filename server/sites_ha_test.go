package server

import (
	"context"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

func hasSite(t *testing.T, s *Server, name string) bool {
	t.Helper()
	sites, err := s.ListSites(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range sites {
		if st.Name == name {
			return true
		}
	}
	return false
}

// TestSiteRemovedOnOtherServer: a site removed through server 1 disappears
// from server 2 at its next watchdog pass (every 5 s), without a restart:
// server 2 held it in memory from its reports. A report that reaches
// server 2 after the removal and stores the site again is undone (every
// certificate of the site is revoked), and later reports are dropped.
func TestSiteRemovedOnOtherServer(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		for _, how := range []string{"gone", "stored-again"} {
			t.Run(kind+"/"+how, func(t *testing.T) {
				ctx := context.Background()
				f := newHA(t, kind, time.Hour, nil, nil)
				// edge enrolled with a certificate, and reports to both.
				secret, err := f.db.CreateJoinToken(ctx, "edge", "site", false, time.Hour)
				if err != nil {
					t.Fatal(err)
				}
				if err := f.db.Enroll(ctx, secret, "edge", "site", "0a1b"); err != nil {
					t.Fatal(err)
				}
				report := func(s *Server, addr string) {
					s.SiteReport("edge", &rebound.SiteStatus{Site: "edge", NBDAddr: addr, ReplAddr: "edge:8443"})
				}
				report(f.s1, "edge:10809")
				report(f.s2, "edge:10809")
				// core, enrolled and reporting too, stays.
				secret, err = f.db.CreateJoinToken(ctx, "core", "site", false, time.Hour)
				if err != nil {
					t.Fatal(err)
				}
				if err := f.db.Enroll(ctx, secret, "core", "site", "0c0d"); err != nil {
					t.Fatal(err)
				}
				f.s2.SiteReport("core", &rebound.SiteStatus{Site: "core", NBDAddr: "core:10809", ReplAddr: "core:8443"})
				if !hasSite(t, f.s2, "edge") {
					t.Fatal("server 2 does not list edge before the removal")
				}
				if _, err := f.s1.RemoveSite(ctx, "edge", false); err != nil {
					t.Fatal(err)
				}
				if hasSite(t, f.s1, "edge") {
					t.Fatal("server 1 lists the site it removed")
				}
				if !hasSite(t, f.s2, "edge") {
					t.Fatal("server 2 forgot edge before its watchdog pass: the test shows nothing")
				}
				if how == "stored-again" {
					// A report on server 2's channel, still open until it
					// reloads the revocations, changes an address: server
					// 2 stores the site again.
					report(f.s2, "edge:10810")
					if _, err := f.db.GetSite(ctx, "edge"); err != nil {
						t.Fatalf("the late report did not store the site again (%v): the test shows nothing", err)
					}
				}
				stored, err := f.db.ListSites(ctx)
				if err != nil {
					t.Fatal(err)
				}
				f.s2.forgetRemovedSites(ctx, stored) // server 2's watchdog pass
				if hasSite(t, f.s2, "edge") {
					t.Fatal("server 2 lists edge after its watchdog pass")
				}
				if _, err := f.db.GetSite(ctx, "edge"); rebound.ErrorCode(err) != rebound.ENOTFOUND {
					t.Fatalf("edge in the store after server 2's pass: %v", err)
				}
				report(f.s2, "edge:10811") // a report later still: dropped
				if hasSite(t, f.s2, "edge") || hasSite(t, f.s1, "edge") {
					t.Fatal("a report after the removal brought edge back")
				}
				if !hasSite(t, f.s2, "core") {
					t.Fatal("server 2 forgot core, a site that was not removed")
				}
			})
		}
	}
}
