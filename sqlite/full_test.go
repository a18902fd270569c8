package sqlite

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/internal/loopfs"
)

// TestDiskFull: the store on a small ext4 that fills. A write that needs
// new blocks fails with rebound.ENOSPACE naming the directory and the next
// step, DiskFull is signalled, reads go on, and once space is freed the
// same write succeeds. Transactions (tx) are translated too.
func TestDiskFull(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "store")
	loopfs.Mount(t, dir, 16<<20, "ext4")
	db, err := Open(filepath.Join(dir, "rebound.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close() // before the unmount
	if err := db.AddEvent(ctx, rebound.Event{Kind: "before", Message: "x"}); err != nil {
		t.Fatal(err)
	}
	if err := db.CreateJob(ctx, &rebound.Job{Type: "protect", State: rebound.JobRunning}); err != nil {
		t.Fatal(err)
	}
	// An empty WAL: the next write needs new blocks.
	var busy, pages, done int
	if err := db.db.QueryRowContext(ctx, `PRAGMA wal_checkpoint(TRUNCATE)`).Scan(&busy, &pages, &done); err != nil || busy != 0 {
		t.Fatalf("checkpoint: busy %d, %v", busy, err)
	}
	free := loopfs.Fill(t, dir)
	big := rebound.Event{Kind: "during", Message: strings.Repeat("x", 64<<10)}
	err = db.AddEvent(ctx, big)
	wantCode(t, err, rebound.ENOSPACE)
	msg := rebound.ErrorMessage(err)
	if !strings.Contains(msg, "server data disk full at "+dir) || !strings.Contains(msg, "free space in "+dir) {
		t.Fatalf("error message %q does not name the directory and the next step", msg)
	}
	select {
	case <-db.DiskFull():
	default:
		t.Fatal("DiskFull not signalled")
	}
	_, err = db.FailInterruptedJobs(ctx, "x") // a transaction
	wantCode(t, err, rebound.ENOSPACE)
	evs, err := db.ListEvents(ctx, "", 0)
	if err != nil || len(evs) != 1 || evs[0].Kind != "before" {
		t.Fatalf("reads with the disk full: %v %+v", err, evs)
	}
	if n, err := db.FreeBytes(); err != nil || n > 64<<10 {
		t.Fatalf("free bytes of the full disk: %d %v", n, err)
	}
	free()
	if err := db.AddEvent(ctx, big); err != nil {
		t.Fatalf("write after freeing space: %v", err)
	}
	if n, err := db.FailInterruptedJobs(ctx, "x"); n != 1 || err != nil {
		t.Fatalf("transaction after freeing space: %d jobs, %v", n, err)
	}
}
