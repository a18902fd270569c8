package overlay_test

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/rebound-dr/rebound"
	"github.com/rebound-dr/rebound/journal"
	"github.com/rebound-dr/rebound/overlay"
)

// TestOverJournalView runs an overlay over a real journal view: the
// failed-over disk. Reads start as the point's bytes, writes stay in the
// overlay, and flatten makes the data file the whole disk.
func TestOverJournalView(t *testing.T) {
	const size = 300<<10 + 100
	dir := t.TempDir()
	j, err := journal.Open(filepath.Join(dir, "j"), []rebound.Disk{{Name: "a", Size: size}}, journal.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	rng := rand.New(rand.NewPCG(1, 1))
	model := make([]byte, size)
	recs := []*rebound.Record{{Seq: 1, Kind: rebound.RecordResyncBegin}}
	for i := 0; i < 100; i++ {
		n := 1 + rng.Int64N(20000)
		off := rng.Int64N(size - n)
		data := make([]byte, n)
		for k := range data {
			data[k] = byte(rng.Uint32())
		}
		copy(model[off:], data)
		recs = append(recs, &rebound.Record{Seq: uint64(len(recs) + 1), Kind: rebound.RecordWrite, Offset: off, Length: n, Data: data})
	}
	recs = append(recs, &rebound.Record{Seq: uint64(len(recs) + 1), Kind: rebound.RecordResyncEnd})
	if err := j.Append(recs); err != nil {
		t.Fatal(err)
	}
	p, err := j.Resolve(rebound.PointLatest)
	if err != nil {
		t.Fatal(err)
	}
	v, err := j.View(p.Seq)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	d, err := overlay.Open(filepath.Join(dir, "disk0.raw"), v.Disk(0), size)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	got := make([]byte, size)
	if _, err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatal("overlay over view differs from the point")
	}
	// Writes after failover, then more records land in the journal: the
	// overlay's view does not move.
	w := bytes.Repeat([]byte{0xAB}, 5000)
	if _, err := d.WriteAt(w, 1234); err != nil {
		t.Fatal(err)
	}
	copy(model[1234:], w)
	if err := j.Append([]*rebound.Record{{Seq: uint64(len(recs) + 1), Kind: rebound.RecordWrite, Offset: 0, Length: 3, Data: []byte{1, 2, 3}}}); err != nil {
		t.Fatal(err)
	}
	if err := d.Flatten(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatal("flattened disk differs")
	}
}
