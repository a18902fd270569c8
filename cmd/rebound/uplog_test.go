package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rebound-dr/rebound/internal/loopfs"
)

// TestUpLogSpillsWhenFull: up's rebound.log on a small ext4 that fills.
// Lines the file refuses go to stderr; once space is freed the file says
// how many lines went there and why, and takes lines again.
func TestUpLogSpillsWhenFull(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	loopfs.Mount(t, dir, 16<<20, "ext4")
	f, err := openUpLog(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close() // before the unmount
	var stderr bytes.Buffer
	w := &spillWriter{f: f, spill: &stderr}
	logger := newLogger(w)
	logger.Info("before")
	free := loopfs.Fill(t, dir)
	big := strings.Repeat("x", 64<<10) // needs new blocks
	for i := range 3 {
		logger.Error("server data disk full", "i", i, "pad", big)
	}
	if n := strings.Count(stderr.String(), "server data disk full"); n != 3 {
		t.Fatalf("%d of 3 lines reached stderr with the log's disk full:\n%.300s", n, stderr.String())
	}
	free()
	logger.Warn("space again")
	b, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	note := "this log could not be written: lines went to stderr\" lines=3 err="
	i, j := bytes.Index(b, []byte(note)), bytes.Index(b, []byte("space again"))
	if !bytes.Contains(b, []byte("before")) || i < 0 || j < i || !bytes.Contains(b[i:], []byte("no space left on device")) {
		t.Fatalf("rebound.log after the space returned:\n%.2000s", b)
	}
	if strings.Contains(stderr.String(), "space again") {
		t.Fatal("a line went to stderr although the log took it")
	}
}
