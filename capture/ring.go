package capture

import "github.com/rebound-dr/rebound"

// ring caches the newest records of a stream so the sender rarely reads
// the spool. Their data lives in one preallocated buffer: copying a write
// into warm memory costs far less on the write path than allocating fresh
// memory for every record (page faults, GC). Entries are consecutive seqs
// ending at the stream's head; the oldest are evicted as the buffer wraps.
// Not safe for concurrent use: the stream's mutex guards it.
type ring struct {
	buf  []byte
	pos  int // where the next record's data goes
	recs []ringRec
}

type ringRec struct {
	rec *rebound.Record // Data points into buf
	off int
}

func newRing(size int64) *ring { return &ring{buf: make([]byte, size)} }

// add caches rec with a copy of its data; rec.Data is left alone.
func (r *ring) add(rec *rebound.Record) {
	n := len(rec.Data)
	if n > len(r.buf) {
		r.recs = r.recs[:0] // too big to cache: keep the seqs consecutive
		return
	}
	if r.pos+n > len(r.buf) {
		// Wrap: everything still ahead of pos belongs to the older lap.
		for len(r.recs) > 0 && r.recs[0].off >= r.pos {
			r.evict()
		}
		r.pos = 0
	}
	for len(r.recs) > 0 && r.recs[0].off >= r.pos && r.recs[0].off < r.pos+n {
		r.evict()
	}
	c := *rec
	c.Data = nil
	if n > 0 {
		c.Data = r.buf[r.pos : r.pos+n : r.pos+n]
		copy(c.Data, rec.Data)
	}
	r.recs = append(r.recs, ringRec{rec: &c, off: r.pos})
	r.pos += n
}

func (r *ring) evict() {
	r.recs[0] = ringRec{}
	r.recs = r.recs[1:]
}

// first returns the oldest cached seq, 0 when empty.
func (r *ring) first() uint64 {
	if len(r.recs) == 0 {
		return 0
	}
	return r.recs[0].rec.Seq
}

// batch copies out the records from seq from on, about maxBytes of payload
// and at least one record. The copies stay valid after the ring moves on.
func (r *ring) batch(from uint64, maxBytes int) []*rebound.Record {
	i := int(from - r.recs[0].rec.Seq)
	var out []*rebound.Record
	size := 0
	for ; i < len(r.recs); i++ {
		src := r.recs[i].rec
		size += len(src.Data)
		if len(out) > 0 && size > maxBytes {
			break
		}
		c := *src
		if src.Data != nil {
			c.Data = append([]byte(nil), src.Data...)
		}
		out = append(out, &c)
	}
	return out
}
