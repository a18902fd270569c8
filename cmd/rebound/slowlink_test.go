package main

import (
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// slowLink is a TCP proxy to target whose client-to-target direction
// carries at most rate bytes per second: a replication link slower than
// the writer, without netem (missing on these machines). The other
// direction (acks) is not limited.
func slowLink(t *testing.T, target string, rate int) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			in, err := l.Accept()
			if err != nil {
				return
			}
			out, err := net.Dial("tcp", target)
			if err != nil {
				in.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, in, out)
			mu.Unlock()
			wg.Add(2)
			go func() {
				defer wg.Done()
				defer out.Close()
				defer in.Close()
				paced(out, in, rate)
			}()
			go func() {
				defer wg.Done()
				defer in.Close()
				defer out.Close()
				io.Copy(in, out)
			}()
		}
	}()
	return l.Addr().String()
}

// paced copies src to dst at no more than rate bytes per second.
func paced(dst io.Writer, src io.Reader, rate int) {
	buf := make([]byte, 32<<10)
	start, sent := time.Now(), 0
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
			sent += n
			if ahead := time.Duration(float64(sent)/float64(rate)*float64(time.Second)) - time.Since(start); ahead > 0 {
				time.Sleep(ahead)
			}
		}
		if err != nil {
			return
		}
	}
}
