package overlay

import (
	"bytes"
	"context"
	"math/rand/v2"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/rebound-dr/rebound"
)

func TestWritten(t *testing.T) {
	baseData := randBase(7, testSize)
	model := append([]byte(nil), baseData...)
	path := filepath.Join(t.TempDir(), "disk")
	d, err := Open(path, bytes.NewReader(baseData), testSize)
	if err != nil {
		t.Fatal(err)
	}
	if w := d.Written(); len(w) != 0 {
		t.Fatalf("fresh overlay written %v", w)
	}
	nblocks := (int64(testSize) + BlockSize - 1) / BlockSize
	touched := make([]bool, nblocks)
	rng := rand.New(rand.NewPCG(8, 9))
	for range 60 {
		o := randOp(rng, testSize)
		o.apply(t, d, model)
		for b := o.off / BlockSize; b <= (o.off+o.n-1)/BlockSize; b++ {
			touched[b] = true
		}
	}
	// The last block too: its region is clipped to the size.
	op{kind: 0, off: testSize - 3, data: []byte{1, 2, 3}, n: 3}.apply(t, d, model)
	touched[nblocks-1] = true
	var want []rebound.Region
	for b := int64(0); b < nblocks; b++ {
		if !touched[b] {
			continue
		}
		e := b
		for e < nblocks && touched[e] {
			e++
		}
		want = append(want, rebound.Region{Offset: b * BlockSize, Length: min(e*BlockSize, testSize) - b*BlockSize})
		b = e
	}
	got := d.Written()
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("written:\n got %v\nwant %v", got, want)
	}
	// Outside the written regions the disk reads as the base.
	cur := readAll(t, d, testSize, rng)
	for _, r := range got {
		copy(cur[r.Offset:r.Offset+r.Length], baseData[r.Offset:r.Offset+r.Length])
	}
	if !bytes.Equal(cur, baseData) {
		t.Fatal("bytes outside Written differ from the base")
	}
	// Survives a reopen; after Flatten everything is present.
	d.Close()
	if d, err = Open(path, bytes.NewReader(baseData), testSize); err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if !reflect.DeepEqual(d.Written(), want) {
		t.Fatal("written changed across a reopen")
	}
	if err := d.Flatten(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	if w := d.Written(); !reflect.DeepEqual(w, []rebound.Region{{Offset: 0, Length: testSize}}) {
		t.Fatalf("after flatten: %v", w)
	}
}
