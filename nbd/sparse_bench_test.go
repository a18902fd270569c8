package nbd

import (
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// countingProxy forwards TCP connections to a server and counts the bytes
// the server sends, the same way for any server.
func countingProxy(tb testing.TB, network, addr string) (string, *atomic.Int64) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	var n atomic.Int64
	var wg sync.WaitGroup
	tb.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial(network, addr)
			if err != nil {
				c.Close()
				continue
			}
			wg.Add(2)
			go func() { defer wg.Done(); io.Copy(s, c); s.(interface{ CloseWrite() error }).CloseWrite() }()
			go func() {
				defer wg.Done()
				k, _ := io.Copy(c, s)
				n.Add(k)
				c.Close()
				s.Close()
			}()
		}
	}()
	return l.Addr().String(), &n
}

// BenchmarkSparseReadOut: nbdcopy and qemu-img convert --target-is-zero
// read out a 1 GiB disk holding 16 MiB of data, from Rebound's server and
// from qemu-nbd serving the same file; the bytes each server sends are
// counted by a proxy in front of it. Target: at most 1.1x the data.
// $REBOUND_BENCH_OUT gets the table rows (scripts/bench.sh).
func BenchmarkSparseReadOut(b *testing.B) {
	uri, path, _, data := sparseExport(b)
	host, _, _ := parseHostPort(uri)
	sock := filepath.Join(b.TempDir(), "q.sock")
	// --fork returns once the socket is ready.
	pidf := filepath.Join(b.TempDir(), "q.pid")
	run(b, "qemu-nbd", "-f", "raw", "-x", "s", "-k", sock, "-t", "-e", "8", "-r", "--fork", "--pid-file", pidf, path)
	defer func() {
		if pb, err := os.ReadFile(pidf); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(pb))); err == nil {
				syscall.Kill(pid, syscall.SIGTERM)
			}
		}
	}()
	servers := []struct{ name, network, addr string }{{"rebound", "tcp", host}, {"qemu-nbd", "unix", sock}}
	var rows string
	for range b.N {
		rows = ""
		for _, cl := range []string{"nbdcopy", "qemu-img convert --target-is-zero"} {
			for _, s := range servers {
				addr, sent := countingProxy(b, s.network, s.addr)
				dst := filepath.Join(b.TempDir(), "dst.raw")
				if err := os.WriteFile(dst, nil, 0o644); err != nil {
					b.Fatal(err)
				}
				if err := os.Truncate(dst, 1<<30); err != nil {
					b.Fatal(err)
				}
				u := URI("tcp", addr, "s")
				start := time.Now()
				if cl == "nbdcopy" {
					run(b, "nbdcopy", u, dst)
				} else {
					run(b, "qemu-img", "convert", "-n", "--target-is-zero", "-f", "raw", "-O", "raw", u, dst)
				}
				el := time.Since(start)
				if !sameFile(b, dst, path) {
					b.Fatalf("%s from %s: copy differs", cl, s.name)
				}
				os.Remove(dst)
				w := sent.Load()
				ratio := float64(w) / float64(data)
				met := "yes"
				if ratio > 1.1 {
					met = "no"
				}
				if s.name == "qemu-nbd" {
					met = ""
				}
				rows += fmt.Sprintf("| %s | %s | %.1f MiB | %.3f× | %.2f s | ≤ 1.1× | %s |\n", cl, s.name, float64(w)/(1<<20), ratio, el.Seconds(), met)
				b.ReportMetric(ratio, fmt.Sprintf("x-%s-%s", s.name, cl[:7]))
			}
		}
	}
	if out := os.Getenv("REBOUND_BENCH_OUT"); out != "" {
		if err := os.WriteFile(out, []byte(rows), 0o644); err != nil {
			b.Fatal(err)
		}
	} else {
		b.Log("\n" + rows)
	}
}

// parseHostPort returns the host:port of an nbd:// URI.
func parseHostPort(uri string) (string, string, error) {
	var hp string
	if _, err := fmt.Sscanf(uri, "nbd://%s", &hp); err != nil {
		return "", "", err
	}
	for i := range hp {
		if hp[i] == '/' {
			return hp[:i], hp[i:], nil
		}
	}
	return hp, "", nil
}
