package record

import (
	"bytes"
	"strings"
	"testing"
)

func file(n int) []byte {
	b := make([]byte, n*Size)
	for k := 1; k <= n; k++ {
		Encode(b[(k-1)*Size:k*Size], uint64(k), 7, int64(k))
	}
	return b
}

func TestVerify(t *testing.T) {
	for _, c := range []struct {
		name    string
		data    func() []byte
		records uint64
		zero    uint64
		torn    int
		corrupt string
	}{
		{"empty", func() []byte { return nil }, 0, 0, 0, ""},
		{"ten", func() []byte { return file(10) }, 10, 0, 0, ""},
		{"zero tail", func() []byte { return append(file(3), make([]byte, 2*Size)...) }, 3, 2, 0, ""},
		{"torn tail", func() []byte { return append(file(3), file(4)[3*Size:3*Size+100]...) }, 3, 0, 100, ""},
		{"flipped payload", func() []byte { b := file(5); b[3*Size+1000] ^= 1; return b }, 3, 0, 0, "at record 4: checksum mismatch"},
		{"flipped sum", func() []byte { b := file(5); b[5*Size-1] ^= 0x80; return b }, 4, 0, 0, "at record 5: checksum mismatch"},
		{"swapped", func() []byte {
			b := file(4)
			r2 := append([]byte(nil), b[Size:2*Size]...)
			copy(b[Size:], b[2*Size:3*Size])
			copy(b[2*Size:], r2)
			return b
		}, 1, 0, 0, "at record 2: holds seq 3"},
		{"hole", func() []byte { b := file(4); clear(b[Size : 2*Size]); return b }, 1, 0, 0, "at record 2: all zero"},
		{"stale payload", func() []byte {
			// A self-consistent record whose payload belongs to another seq.
			b := file(2)
			Payload(b[Size+payloadOff:Size+sumOff], 9)
			return b
		}, 1, 0, 0, "at record 2: checksum mismatch"},
	} {
		t.Run(c.name, func(t *testing.T) {
			v, err := Verify(bytes.NewReader(c.data()))
			if err != nil {
				t.Fatal(err)
			}
			if v.Records != c.records || v.ZeroTail != c.zero || v.TornTail != c.torn {
				t.Fatalf("got %+v, want records %d zero %d torn %d", v, c.records, c.zero, c.torn)
			}
			if c.corrupt == "" {
				if !v.OK() || !strings.Contains(v.Line(), ", ok") {
					t.Fatalf("not ok: %s", v.Line())
				}
				return
			}
			if v.OK() || !strings.Contains(v.Line(), "REBOUND-GUEST CORRUPT "+c.corrupt) {
				t.Fatalf("line %q, want CORRUPT %s", v.Line(), c.corrupt)
			}
		})
	}
}

func TestCheck(t *testing.T) {
	b := make([]byte, Size)
	Encode(b, 42, 1, 2)
	if err := Check(b, 42); err != nil {
		t.Fatal(err)
	}
	if err := Check(b, 41); err == nil || !strings.Contains(err.Error(), "holds seq 42") {
		t.Fatalf("wrong seq: %v", err)
	}
	if Boot(b) != 1 {
		t.Fatalf("boot %d", Boot(b))
	}
	// Different seqs give different payloads.
	p1, p2 := make([]byte, 64), make([]byte, 64)
	Payload(p1, 1)
	Payload(p2, 2)
	if bytes.Equal(p1, p2) {
		t.Fatal("payloads of seq 1 and 2 are equal")
	}
}
