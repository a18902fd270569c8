// Package workload generates disk writes: the built-in workload of
// `rebound up --demo`, the load of benchmarks, and the oracle of the
// consistency tests, which keeps a model of the disk to hash.
package workload

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"math/rand/v2"
	"time"
)

// Disk is what a workload writes to (an nbd.Client, for one).
type Disk interface {
	Size() int64
	WriteAt(p []byte, off int64) (int, error)
	WriteZeroes(off, length int64) error
	Trim(off, length int64) error
	Flush() error
}

// OpKind is a kind of operation.
type OpKind int

const (
	OpWrite OpKind = iota
	OpZero
	OpTrim
)

// Op is one operation.
type Op struct {
	Kind   OpKind
	Offset int64
	Data   []byte // OpWrite
	Length int64
}

// Options shape a generator.
type Options struct {
	Seed int64
	// MinLen and MaxLen bound an operation's length; lengths and offsets
	// are multiples of Align (default 512).
	MinLen, MaxLen int
	Align          int
	// ZeroFraction and TrimFraction are the shares of zero and trim ops.
	ZeroFraction, TrimFraction float64
	// Compressible makes half of each write's bytes repeat, like real data.
	Compressible bool
}

// Gen generates random operations for a disk of a given size.
type Gen struct {
	opts Options
	size int64
	rng  *rand.Rand
}

// NewGen returns a generator.
func NewGen(size int64, opts Options) *Gen {
	if opts.Align <= 0 {
		opts.Align = 512
	}
	if opts.MinLen <= 0 {
		opts.MinLen = opts.Align
	}
	if opts.MaxLen < opts.MinLen {
		opts.MaxLen = 256 << 10
	}
	return &Gen{opts: opts, size: size, rng: rand.New(rand.NewPCG(uint64(opts.Seed), uint64(opts.Seed)^0x9e3779b97f4a7c15))}
}

// Next returns the next operation.
func (g *Gen) Next() Op {
	a := int64(g.opts.Align)
	n := int64(g.opts.MinLen) + g.rng.Int64N(int64(g.opts.MaxLen-g.opts.MinLen)+1)
	n = max(a, n/a*a)
	if n > g.size {
		n = g.size / a * a
	}
	off := g.rng.Int64N((g.size-n)/a+1) * a
	x := g.rng.Float64()
	switch {
	case x < g.opts.ZeroFraction:
		return Op{Kind: OpZero, Offset: off, Length: n}
	case x < g.opts.ZeroFraction+g.opts.TrimFraction:
		return Op{Kind: OpTrim, Offset: off, Length: n}
	}
	data := make([]byte, n)
	fill(g.rng, data, g.opts.Compressible)
	return Op{Kind: OpWrite, Offset: off, Data: data, Length: n}
}

func fill(rng *rand.Rand, p []byte, compressible bool) {
	i := 0
	for ; i+8 <= len(p); i += 8 {
		v := rng.Uint64()
		for k := 0; k < 8; k++ {
			p[i+k] = byte(v >> (8 * k))
		}
	}
	for ; i < len(p); i++ {
		p[i] = byte(rng.Uint32())
	}
	if compressible {
		for j := 0; j < len(p); j += 1024 {
			end := min(j+512, len(p))
			for k := j; k < end; k++ {
				p[k] = byte(j >> 10)
			}
		}
	}
}

// Apply performs op on d.
func Apply(d Disk, op Op) error {
	switch op.Kind {
	case OpZero:
		return d.WriteZeroes(op.Offset, op.Length)
	case OpTrim:
		return d.Trim(op.Offset, op.Length)
	}
	_, err := d.WriteAt(op.Data, op.Offset)
	return err
}

// Model is an in-memory copy of a disk, for oracles. Rebound reads trimmed
// ranges back as zeroes.
type Model struct{ Data []byte }

// NewModel returns a zeroed model of size bytes.
func NewModel(size int64) *Model { return &Model{Data: make([]byte, size)} }

// Apply applies op to the model.
func (m *Model) Apply(op Op) {
	if op.Kind == OpWrite {
		copy(m.Data[op.Offset:], op.Data)
		return
	}
	clear(m.Data[op.Offset : op.Offset+op.Length])
}

// Sum returns the model's SHA-256 in hex.
func (m *Model) Sum() string {
	h := sha256.Sum256(m.Data)
	return hex.EncodeToString(h[:])
}

// Stats counts what Run did.
type Stats struct {
	Ops   int64
	Bytes int64
}

// Run writes to d until ctx is done, at about rate bytes per second (0: as
// fast as it can), flushing every second.
func Run(ctx context.Context, d Disk, opts Options, rate int64) (Stats, error) {
	g := NewGen(d.Size(), opts)
	var st Stats
	start, lastFlush := time.Now(), time.Now()
	for ctx.Err() == nil {
		op := g.Next()
		if err := Apply(d, op); err != nil {
			if ctx.Err() != nil {
				break
			}
			return st, err
		}
		st.Ops++
		st.Bytes += op.Length
		if time.Since(lastFlush) > time.Second {
			if err := d.Flush(); err != nil {
				return st, err
			}
			lastFlush = time.Now()
		}
		if rate > 0 {
			due := start.Add(time.Duration(float64(st.Bytes) / float64(rate) * float64(time.Second)))
			if wait := time.Until(due); wait > 0 {
				select {
				case <-ctx.Done():
				case <-time.After(wait):
				}
			}
		}
	}
	return st, nil
}
