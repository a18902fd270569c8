package agent

import (
	"context"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

const benchSize = 256 << 20

// benchDevice is a loop device over a file of random bytes (data blocks
// are all hashed; zero blocks would be skipped by the scan).
func benchDevice(b *testing.B) string {
	b.Helper()
	for _, tool := range []string{"losetup", "sha256sum", "b3sum"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.Fatalf("%s is needed: %v", tool, err)
		}
	}
	path := filepath.Join(b.TempDir(), "dev.img")
	buf := make([]byte, benchSize)
	_, _ = rand.Read(buf)
	if err := os.WriteFile(path, buf, 0o600); err != nil {
		b.Fatal(err)
	}
	out, err := exec.Command("losetup", "-f", "--show", path).CombinedOutput()
	if err != nil {
		b.Fatalf("losetup: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	b.Cleanup(func() { _ = exec.Command("losetup", "-d", dev).Run() })
	return dev
}

func dropCache(b *testing.B, path string) {
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	DropCache(f)
	f.Close()
}

// BenchmarkScan compares the agent's scan of a device (64 KiB block
// digests, parallel 4 MiB reads, the device's cache dropped first as in a
// cycle) with b3sum and sha256sum reading the same device, cache dropped
// too. MB/s is the device's bytes per second.
func BenchmarkScan(b *testing.B) {
	dev := benchDevice(b)
	b.Run("agent", func(b *testing.B) {
		b.SetBytes(benchSize)
		for range b.N {
			if _, err := ScanFile(context.Background(), dev, benchSize, DefaultBlockSize, 0); err != nil {
				b.Fatal(err)
			}
		}
	})
	for _, tool := range []string{"b3sum", "sha256sum"} {
		b.Run(tool, func(b *testing.B) {
			b.SetBytes(benchSize)
			for range b.N {
				dropCache(b, dev)
				if out, err := exec.Command(tool, dev).CombinedOutput(); err != nil {
					b.Fatalf("%s: %v: %s", tool, err, out)
				}
			}
		})
	}
}
