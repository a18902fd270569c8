package grpc

import "testing"

// The pool hands out buffers of the asked length from power-of-two tiers,
// and keeps only buffers of its own tiers.
func TestDirtyPool(t *testing.T) {
	p := &dirtyPool{}
	for _, c := range []struct{ n, cap int }{
		{0, 256}, {1, 256}, {256, 256}, {257, 512}, {16 << 10, 16 << 10}, {16<<10 + 1, 32 << 10}, {1 << 20, 1 << 20}, {1<<20 + 1, 1<<20 + 1},
	} {
		b := p.Get(c.n)
		if len(*b) != c.n || cap(*b) != c.cap {
			t.Fatalf("Get(%d): len %d cap %d, want len %d cap %d", c.n, len(*b), cap(*b), c.n, c.cap)
		}
		p.Put(b)
	}
	foreign := make([]byte, 3000)
	p.Put(&foreign)
	if b := p.Get(3000); cap(*b) != 4096 {
		t.Fatalf("Get(3000) after a foreign Put: cap %d, want the 4096 tier", cap(*b))
	}
	// A prefix of a pooled buffer goes back whole.
	b := p.Get(5000)
	*b = (*b)[:10]
	p.Put(b)
	if b := p.Get(8192); len(*b) != 8192 {
		t.Fatalf("Get(8192): len %d", len(*b))
	}
}
