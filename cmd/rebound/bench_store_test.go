package main

import (
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
	rhttp "github.com/rebound-dr/rebound/http"
	"github.com/rebound-dr/rebound/internal/pgtest"
)

// benchMachines is how many machines BenchmarkAPIStore's store holds.
const benchMachines = 2000

// BenchmarkAPIStore measures the API's machine list and machine show, over
// HTTPS with a token, with 2,000 protected machines in the store, on
// SQLite and on PostgreSQL (a real server on a unix socket).
func BenchmarkAPIStore(b *testing.B) {
	for _, kind := range []string{"sqlite", "postgres"} {
		b.Run(kind, func(b *testing.B) {
			ctx := context.Background()
			cfg := ServerConfig{DataDir: b.TempDir(), APIAddr: "127.0.0.1:0", GRPCAddr: "127.0.0.1:0"}
			if kind == "postgres" {
				cfg.DB = pgtest.DSN(b)
			}
			m := &ServerMain{Config: cfg, Logger: slog.New(slog.DiscardHandler)}
			if err := m.Run(ctx); err != nil {
				b.Fatal(err)
			}
			defer m.Close()
			ts := time.Date(2026, 11, 30, 0, 0, 0, 0, time.UTC)
			for i := range benchMachines {
				name := fmt.Sprintf("vm%04d", i)
				if err := m.DB.CreateMachine(ctx, &rebound.Machine{
					Name: name, Driver: "qemu", State: rebound.MachineProtected, ActiveSite: "primary", HomeSite: "primary",
					Disks: []rebound.Disk{{Name: "disk0", Size: 32 << 30, NBD: "nbd://127.0.0.1:10809/" + name + "-disk0"},
						{Name: "disk1", Size: 64 << 30, NBD: "nbd://127.0.0.1:10809/" + name + "-disk1"}},
					VM:         &rebound.VMSpec{MemoryMiB: 2048, CPUs: 2},
					Protection: &rebound.Protection{SourceSite: "primary", TargetSite: "recovery", Policy: "default", ReplState: "streaming", LastPointTime: ts},
				}); err != nil {
					b.Fatal(err)
				}
			}
			if _, err := m.DB.EnsureUser(ctx, "admin", rebound.RoleAdmin); err != nil {
				b.Fatal(err)
			}
			tok, err := m.DB.CreateToken(ctx, "admin", "bench")
			if err != nil {
				b.Fatal(err)
			}
			cl, err := rhttp.NewClient(m.APIURL, tok.Secret, m.CA.CertPEM())
			if err != nil {
				b.Fatal(err)
			}
			b.Run("list", func(b *testing.B) {
				for b.Loop() {
					ms, err := cl.ListMachines(ctx)
					if err != nil || len(ms) != benchMachines {
						b.Fatalf("list: %d machines, %v", len(ms), err)
					}
				}
				ms := float64(b.Elapsed().Microseconds()) / 1000 / float64(b.N)
				b.ReportMetric(ms, "ms/list")
				benchReport(b, "| %s | list %d machines | %.1f ms |\n", kind, benchMachines, ms)
			})
			b.Run("show", func(b *testing.B) {
				i := 0
				for b.Loop() {
					name := fmt.Sprintf("vm%04d", i%benchMachines)
					if got, err := cl.GetMachine(ctx, name); err != nil || got.Name != name {
						b.Fatalf("show %s: %v", name, err)
					}
					i++
				}
				ms := float64(b.Elapsed().Microseconds()) / 1000 / float64(b.N)
				b.ReportMetric(ms, "ms/show")
				benchReport(b, "| %s | show one of %d machines | %.2f ms |\n", kind, benchMachines, ms)
			})
		})
	}
}
