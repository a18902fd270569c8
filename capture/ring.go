package capture

import "github.com/rebound-dr/rebound"

// ring holds the newest records of a stream in memory. In direct mode
// (protocol A) it is the send buffer: the records the peer has not acked
// live only here, and the stream never lets them be evicted (room); in
// spool mode it is a cache, so the sender rarely reads the spool. Their
// data lives in one preallocated buffer: copying a write into warm memory
// costs far less on the write path than allocating fresh memory for every
// record (page faults, GC). Entries are consecutive seqs ending at the
// stream's head; the oldest are evicted as the buffer wraps. Positions are
// linear (a record at lin is at lin%len(buf)); a record never straddles
// the end of the buffer: it starts the next lap instead. Not safe for
// concurrent use: the stream's mutex guards it.
type ring struct {
	buf  []byte
	lin  int64 // linear position where the next record's data goes
	recs []ringRec
}

type ringRec struct {
	rec *rebound.Record // Data points into buf
	lin int64
}

func newRing(size int64) *ring { return &ring{buf: make([]byte, size)} }

// place returns where n bytes go if the cursor is at lin.
func (r *ring) place(lin int64, n int) int64 {
	size := int64(len(r.buf))
	if n > 0 && lin%size+int64(n) > size {
		lin += size - lin%size
	}
	return lin
}

// add caches rec with a copy of its data; rec.Data is left alone.
func (r *ring) add(rec *rebound.Record) {
	n := len(rec.Data)
	size := int64(len(r.buf))
	if int64(n) > size {
		r.recs = r.recs[:0] // too big to cache: keep the seqs consecutive
		return
	}
	l := r.place(r.lin, n)
	end := l + int64(n)
	for len(r.recs) > 0 && r.recs[0].lin+size < end {
		r.evict()
	}
	c := *rec
	c.Data = nil
	if n > 0 {
		p := l % size
		c.Data = r.buf[p : p+int64(n) : p+int64(n)]
		copy(c.Data, rec.Data)
	}
	r.recs = append(r.recs, ringRec{rec: &c, lin: l})
	r.lin = end
}

// room reports whether recs can be added without evicting any record
// with seq >= keep (the records the peer has not acked), recs included.
func (r *ring) room(keep uint64, recs []*rebound.Record) bool {
	size := int64(len(r.buf))
	start := int64(-1)
	if n := len(r.recs); n > 0 && keep <= r.recs[n-1].rec.Seq {
		first := r.recs[0].rec.Seq
		if keep < first {
			return false
		}
		start = r.recs[keep-first].lin
	}
	if start < 0 && len(recs) > 0 && keep < recs[0].Seq {
		return false // unacked records the ring no longer holds
	}
	l := r.lin
	for _, rec := range recs {
		n := len(rec.Data)
		if int64(n) > size {
			return false
		}
		l = r.place(l, n)
		if start < 0 {
			start = l
		}
		l += int64(n)
	}
	return start < 0 || start+size >= l
}

// from returns the cached records with seq >= seq (shared, not copies:
// valid until the ring moves on).
func (r *ring) from(seq uint64) []*rebound.Record {
	if len(r.recs) == 0 || seq > r.recs[len(r.recs)-1].rec.Seq {
		return nil
	}
	i := 0
	if first := r.recs[0].rec.Seq; seq > first {
		i = int(seq - first)
	}
	out := make([]*rebound.Record, 0, len(r.recs)-i)
	for _, x := range r.recs[i:] {
		out = append(out, x.rec)
	}
	return out
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
