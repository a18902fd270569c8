package wal

import (
	"fmt"
	"io"
	"sort"

	"github.com/rebound-dr/rebound"
)

// Reader iterates over the log's records in seq order. A Reader sees
// records appended before each call to Next, so it can follow a log that
// is still being appended to. It is not safe for concurrent use.
type Reader struct {
	log  *Log
	from uint64
	seg  *segment // referenced while the reader is on it
	off  int64
	br   *bufReader
	done bool
}

// NewReader returns a reader of the records with Seq >= from.
func (l *Log) NewReader(from uint64) (*Reader, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil, ErrClosed
	}
	return &Reader{log: l, from: from}, nil
}

// Next returns the next record and the location of its data. It returns
// io.EOF at the current end of the log and an error wrapping ErrCorrupt at
// a bad record, which it never returns.
func (r *Reader) Next() (*rebound.Record, Location, error) {
	l := r.log
	for {
		if r.done {
			return nil, Location{}, ErrClosed
		}
		l.mu.Lock()
		if l.closed {
			l.mu.Unlock()
			return nil, Location{}, ErrClosed
		}
		if r.seg == nil {
			if len(l.segs) == 0 {
				l.mu.Unlock()
				return nil, Location{}, io.EOF
			}
			// The last segment whose first seq is <= from.
			i := sort.Search(len(l.segs), func(i int) bool { return l.segs[i].first > r.from }) - 1
			if i < 0 {
				i = 0
			}
			r.enter(l.segs[i])
		}
		limit, corrupt := r.seg.size, r.seg.corrupt
		if r.off >= limit {
			if corrupt != nil {
				l.mu.Unlock()
				return nil, Location{}, corrupt
			}
			cur := r.seg.first
			i := sort.Search(len(l.segs), func(i int) bool { return l.segs[i].first > cur })
			if r.seg.removed && (i == len(l.segs) || l.segs[i].first != r.seg.next) {
				l.mu.Unlock()
				return nil, Location{}, fmt.Errorf("wal: reader past segment %d: next segment %d: %w", cur, r.seg.next, ErrTruncated)
			}
			if i == len(l.segs) {
				l.mu.Unlock()
				return nil, Location{}, io.EOF
			}
			old := r.seg
			r.enter(l.segs[i])
			l.mu.Unlock()
			l.release(old)
			continue
		}
		l.mu.Unlock()
		r.br.limit = limit
		rec, loc, n, bad := r.br.record(r.seg.first, r.off, true)
		if bad != nil {
			return nil, Location{}, fmt.Errorf("%w: segment %s offset %d: %v", ErrCorrupt, segName(r.seg.first), r.off, bad)
		}
		r.off += n
		if rec.Seq < r.from {
			continue
		}
		return rec, loc, nil
	}
}

// enter moves the reader to the start of seg. Called with l.mu held.
func (r *Reader) enter(seg *segment) {
	seg.refs++
	r.seg = seg
	r.off = segHeaderSize
	r.br = newBufReader(seg.f, seg.size)
}

// Close releases the reader's segment.
func (r *Reader) Close() error {
	if r.done {
		return nil
	}
	r.done = true
	if r.seg != nil {
		r.log.release(r.seg)
		r.seg = nil
	}
	return nil
}
