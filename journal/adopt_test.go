package journal

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/rebound-dr/rebound"
)

// adoptModel is a model whose disks start with random content, written to
// files in dir.
func adoptModel(t *testing.T, dir string) (*model, []string) {
	t.Helper()
	m := newModel(41, 300<<10, 200<<10+77)
	var paths []string
	for i, d := range m.disks {
		for k := range d {
			d[k] = byte(m.rng.Uint32())
		}
		clear(d[10<<10 : 50<<10]) // and a hole
		p := filepath.Join(dir, "old"+string(rune('0'+i)))
		if err := os.WriteFile(p, d, 0o600); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	return m, paths
}

func TestAdopt(t *testing.T) {
	dir := t.TempDir()
	m, paths := adoptModel(t, dir)
	jdir := filepath.Join(dir, "journal")
	if err := Adopt(jdir, m.diskTable(), paths); err != nil {
		t.Fatal(err)
	}
	for _, p := range paths {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Fatalf("%s still exists after adopt: %v", p, err)
		}
	}
	j := openJ(t, jdir, m)
	// A delta resync: only some regions are sent, inside a window.
	m.add(&rebound.Record{Kind: rebound.RecordResyncBegin})
	for range 10 {
		m.random()
	}
	m.add(&rebound.Record{Kind: rebound.RecordResyncEnd})
	first := m.seq
	for range 800 {
		m.random()
	}
	m.feed(t, j, 1, m.seq)
	if _, err := j.View(first - 1); err == nil {
		t.Fatal("a position inside the delta window is served")
	}
	m.checkViews(t, j, first, 20)
	v, err := j.View(first)
	if err != nil {
		t.Fatal(err)
	}
	if got := hashView(t, v, m.sizes(), m.rng); got != m.hashes[first] {
		t.Fatal("first point differs from the adopted content plus the delta")
	}
	v.Close()

	// RegionsAfter matches the records.
	for _, s := range []uint64{0, first, m.seq - 100, m.seq} {
		want := make([][]rebound.Region, len(m.disks))
		for _, r := range m.recs[s:] {
			if (r.Kind == rebound.RecordWrite || r.Kind == rebound.RecordZero || r.Kind == rebound.RecordTrim) && r.Length > 0 {
				want[r.Disk] = append(want[r.Disk], rebound.Region{Offset: r.Offset, Length: r.Length})
			}
		}
		for i := range want {
			want[i] = rebound.MergeRegions(want[i])
		}
		if got := j.RegionsAfter(s); !reflect.DeepEqual(got, want) {
			t.Fatalf("RegionsAfter(%d):\n got %v\nwant %v", s, got, want)
		}
	}

	// Reopen keeps the adopted base.
	j.Close()
	j = openJ(t, jdir, m)
	m.checkViews(t, j, first, 5)
	// After a fold, ranges below the base are unknown: whole disks.
	if b, err := j.Expire(time.Unix(0, m.recs[first+100].Time)); err != nil || b <= 1 {
		t.Fatalf("expire: base %d, %v", b, err)
	}
	got := j.RegionsAfter(1)
	for i, d := range m.disks {
		if len(got[i]) != 1 || got[i][0] != (rebound.Region{Offset: 0, Length: int64(len(d))}) {
			t.Fatalf("RegionsAfter below the base: %v", got)
		}
	}
	m.checkViews(t, j, first+100, 5)
	j.Close()

	// A dir holding a journal is refused, and nothing moves.
	other, _ := adoptModel(t, t.TempDir())
	p2 := filepath.Join(dir, "again")
	os.WriteFile(p2, other.disks[0], 0o600)
	if err := Adopt(jdir, m.diskTable()[:1], []string{p2}); rebound.ErrorCode(err) != rebound.ECONFLICT {
		t.Fatalf("adopt into a journal: %v", err)
	}
	if _, err := os.Stat(p2); err != nil {
		t.Fatal(err)
	}
}

func TestAdoptBadInput(t *testing.T) {
	dir := t.TempDir()
	m, paths := adoptModel(t, dir)
	jdir := filepath.Join(dir, "j")
	disks := m.diskTable()
	if err := Adopt(jdir, disks, paths[:1]); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("fewer paths: %v", err)
	}
	bad := append([]rebound.Disk(nil), disks...)
	bad[1].Size++
	if err := Adopt(jdir, bad, paths); rebound.ErrorCode(err) != rebound.EINVALID {
		t.Fatalf("size mismatch: %v", err)
	}
	// Nothing moved by the refused calls.
	for _, p := range paths {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("refused adopt moved %s: %v", p, err)
		}
	}
	if err := Adopt(jdir, disks, []string{paths[0], filepath.Join(dir, "missing")}); rebound.ErrorCode(err) != rebound.ENOTFOUND {
		t.Fatalf("missing file: %v", err)
	}
	// A crash after moving disk 0: repeating Adopt finishes it.
	if err := os.MkdirAll(jdir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(paths[0], filepath.Join(jdir, baseName(0))); err != nil {
		t.Fatal(err)
	}
	if err := Adopt(jdir, disks, paths); err != nil {
		t.Fatal(err)
	}
	j := openJ(t, jdir, m)
	defer j.Close()
	m.add(&rebound.Record{Kind: rebound.RecordResyncBegin})
	m.add(&rebound.Record{Kind: rebound.RecordResyncEnd})
	m.feed(t, j, 1, m.seq)
	m.checkViews(t, j, 2, 1)
}
