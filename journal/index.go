package journal

import "github.com/rebound-dr/rebound/wal"

// node is one extent of a disk in a persistent treap keyed by start.
// Extents of one tree never overlap. A node whose epoch equals the epoch
// of the operation at hand is private to it and mutated in place; any
// other node may be shared with a snapshot and is copied first.
type node struct {
	start, end  int64
	seq         uint64       // the record the bytes come from
	zero        bool         // zero or trim: reads back as zeroes
	loc         wal.Location // data of byte start (writes)
	prio        uint64
	left, right *node
	epoch       uint64
}

func prio(start int64, seq uint64) uint64 {
	x := uint64(start)*0x9e3779b97f4a7c15 ^ seq
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	return x ^ x>>31
}

func cow(n *node, ep uint64) *node {
	if n.epoch == ep {
		return n
	}
	c := *n
	c.epoch = ep
	return &c
}

// split returns the trees of nodes with start < key and start >= key.
func split(n *node, key int64, ep uint64) (*node, *node) {
	if n == nil {
		return nil, nil
	}
	n = cow(n, ep)
	if n.start < key {
		l, r := split(n.right, key, ep)
		n.right = l
		return n, r
	}
	l, r := split(n.left, key, ep)
	n.left = r
	return l, n
}

// merge joins a and b; every key of a is below every key of b.
func merge(a, b *node, ep uint64) *node {
	if a == nil {
		return b
	} else if b == nil {
		return a
	}
	if a.prio > b.prio {
		a = cow(a, ep)
		a.right = merge(a.right, b, ep)
		return a
	}
	b = cow(b, ep)
	b.left = merge(a, b.left, ep)
	return b
}

func maxNode(n *node) *node {
	if n == nil {
		return nil
	}
	for n.right != nil {
		n = n.right
	}
	return n
}

// tailOf returns a new node for [at, n.end) of n.
func tailOf(n *node, at int64, ep uint64) *node {
	t := &node{start: at, end: n.end, seq: n.seq, zero: n.zero, loc: n.loc, epoch: ep}
	if !n.zero {
		t.loc.Offset += at - n.start
	}
	t.prio = prio(t.start, t.seq)
	return t
}

// insert sets [x.start, x.end) to x in the tree rooted at root, trimming
// or splitting the extents it overlaps, and returns the new root. Expected
// O(log n) plus the number of extents x replaces.
func insert(root *node, x *node, ep uint64) *node {
	s, e := x.start, x.end
	x.epoch = ep
	x.prio = prio(s, x.seq)
	l, r := split(root, s, ep)
	var tail *node
	if m := maxNode(l); m != nil && m.end > s {
		// The extent just before s overlaps: keep its head, maybe its tail.
		l1, mm := split(l, m.start, ep) // mm is the single node m
		if mm.end > e {
			tail = tailOf(mm, e, ep)
		}
		mm.end = s
		l = merge(l1, mm, ep)
	}
	mid, r2 := split(r, e, ep)
	if m := maxNode(mid); m != nil && m.end > e {
		tail = tailOf(m, e, ep)
	}
	return merge(merge(l, x, ep), merge(tail, r2, ep), ep)
}

// visit calls fn for every extent overlapping [lo, hi), in order.
func visit(n *node, lo, hi int64, fn func(*node) error) error {
	for n != nil {
		if lo < n.start {
			if err := visit(n.left, lo, hi, fn); err != nil {
				return err
			}
		}
		if n.start >= hi {
			return nil
		}
		if n.end > lo {
			if err := fn(n); err != nil {
				return err
			}
		}
		n = n.right
	}
	return nil
}

func count(n *node) int {
	if n == nil {
		return 0
	}
	return 1 + count(n.left) + count(n.right)
}
